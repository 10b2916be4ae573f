// The preview page: render /api/state, and refresh when /events announces a new build.
// No libraries and nothing from outside this server.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  let version = null;
  let loading = null;

  function kb(bytes) {
    return `${(bytes / 1024).toFixed(1)} KB`;
  }

  function setStatus(name, text) {
    const status = $("status");
    status.dataset.status = name;
    status.textContent = text;
  }

  function splitAddress(value) {
    const match = /^\s*"?([^"<]*?)"?\s*<([^>]+)>\s*$/.exec(value || "");
    return match ? [match[1] || match[2], `<${match[2]}>`] : [value || "", ""];
  }

  // Reload a frame, keeping the reader's scroll position across rebuilds.
  function loadFrame(frame, url) {
    let y = 0;
    try {
      y = frame.contentWindow ? frame.contentWindow.scrollY : 0;
    } catch (_) {
      y = 0;
    }
    frame.onload = () => {
      const doc = frame.contentDocument;
      if (!doc) return;
      if (y) frame.contentWindow.scrollTo(0, y);
      // Links open in a new tab; a click must not replace the email inside the frame.
      doc.addEventListener("click", (event) => {
        const link = event.target.closest ? event.target.closest("a[href]") : null;
        if (!link) return;
        const href = link.getAttribute("href") || "";
        if (href.startsWith("#")) return;
        event.preventDefault();
        window.open(link.href, "_blank", "noopener,noreferrer");
      });
      frame.dataset.version = frame.dataset.pending || "";
    };
    frame.dataset.pending = String(version);
    frame.src = url;
  }

  function render(state) {
    version = state.version;
    document.body.dataset.version = String(state.version);
    document.body.dataset.state = state.ok ? "ok" : "error";
    $("issue").textContent = state.issue;

    const error = state.error;
    $("error").hidden = !error;
    if (error) {
      $("error-where").textContent = error.where || "";
      $("error-where").parentElement.hidden = !error.where;
      $("error-message").textContent = error.message;
      $("error-hint").textContent = error.hint || "";
      $("error-hint").hidden = !error.hint;
      setStatus("error", "build failed");
    } else {
      setStatus("live", `live · built in ${state.seconds.toFixed(2)} s`);
    }

    const env = state.envelope;
    $("envelope").hidden = !env;
    document.querySelector(".tabs").hidden = !env;
    for (const panel of document.querySelectorAll(".panel")) {
      panel.classList.toggle("stale", !env);
    }
    if (env) {
      document.title = `Preview: ${env.subject}`;
      const [name, addr] = splitAddress(env.from);
      $("env-from-name").textContent = name;
      $("env-from-addr").textContent = addr;
      $("env-avatar").textContent = (name.trim()[0] || "?").toUpperCase();
      $("env-to").textContent = env.to;
      $("env-subject").textContent = env.subject;
      $("env-preheader").textContent = env.preheader || "(no preheader: the inbox shows the first words of the email)";
      $("env-preheader").classList.toggle("missing", !env.preheader);
      $("env-size").textContent = `HTML ${kb(env.html_size)} of Gmail's ${kb(env.clip_bytes)}`;
      const ratio = env.html_size / env.clip_bytes;
      $("env-meter").style.width = `${Math.min(100, ratio * 100).toFixed(1)}%`;
      const meter = $("env-meter").parentElement;
      meter.dataset.level = env.over_gmail_clip ? "over" : ratio > 0.85 ? "near" : "ok";
      const clip = $("env-clip");
      clip.dataset.level = meter.dataset.level;
      clip.hidden = meter.dataset.level === "ok";
      clip.textContent = env.over_gmail_clip
        ? "Over Gmail's clipping size: Gmail will cut this email off and show “View entire message”."
        : `Close to Gmail's clipping size: ${kb(env.clip_bytes - env.html_size)} left.`;
      $("text-part").textContent = state.text;
      $("headers").textContent = state.headers;
      $("source").textContent = state.source;
      $("web-link").href = state.files.web;
      loadFrame($("frame-desktop"), state.files.email);
      loadFrame($("frame-mobile"), state.files.email);
    } else {
      document.title = "Preview: build failed";
    }

    const list = $("warning-list");
    list.replaceChildren(
      ...state.warnings.map((text) => {
        const item = document.createElement("li");
        item.textContent = text;
        return item;
      }),
    );
    $("warnings").hidden = state.warnings.length === 0;
  }

  async function refresh() {
    // One request at a time; a newer version arriving meanwhile triggers one more.
    if (loading) return loading;
    loading = (async () => {
      try {
        const response = await fetch("/api/state", { cache: "no-store" });
        render(await response.json());
      } catch (_) {
        setStatus("offline", "server stopped");
      } finally {
        loading = null;
      }
    })();
    return loading;
  }

  function listen() {
    const events = new EventSource("/events");
    events.addEventListener("version", async (event) => {
      const announced = Number(event.data);
      if (announced !== version) {
        setStatus("building", "rebuilding…");
        await refresh();
        if (version !== null && version < announced) await refresh();
      }
    });
    events.addEventListener("open", () => {
      if (document.body.dataset.state === "ok") setStatus("live", "live");
    });
    events.addEventListener("error", () => setStatus("offline", "reconnecting…"));
  }

  function tabs() {
    const buttons = document.querySelectorAll("[role=tab]");
    for (const button of buttons) {
      button.addEventListener("click", () => {
        for (const other of buttons) {
          const selected = other === button;
          other.setAttribute("aria-selected", String(selected));
          $(`tab-${other.dataset.tab}`).hidden = !selected;
        }
      });
    }
    const views = document.querySelectorAll("[data-view]:not(.devices)");
    for (const button of views) {
      button.addEventListener("click", () => {
        document.querySelector(".devices").dataset.view = button.dataset.view;
        for (const other of views) other.setAttribute("aria-pressed", String(other === button));
      });
    }
  }

  tabs();
  refresh().then(listen);
})();
