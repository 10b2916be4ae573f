"""Preview an issue in a browser while writing it: build, serve, watch, rebuild.

A small stdlib HTTP server, bound to loopback by default, serves one page (the
files in ``preview_ui/``), a JSON snapshot of the latest build, a Server-Sent
Events stream that announces each rebuild, and a private build folder
(``.newsletter/preview/<issue>/``) with the email filled in for one example
subscriber. A watchfiles thread rebuilds on every save; a failed build becomes
part of the snapshot, so the page shows the error and the server keeps going.

Request paths are routed before anything decodes them, and build files are
looked up one checked segment at a time, so ``..`` in any spelling, absolute
paths and symlinks that lead out of the build folder all end in 404.
"""

from __future__ import annotations

import email.policy
import json
import logging
import mimetypes
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import watchfiles
from watchfiles._rust_notify import RustNotify  # documented backend; ready once constructed

from . import config as config_module
from . import content, message, render
from .config import Config
from .errors import NewsletterError, PreviewError
from .files import atomic_write_bytes
from .package_data import default_theme_dir
from .transport import is_loopback

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
PREVIEW_DIR = "preview"
UI_DIR = Path(__file__).with_name("preview_ui")
# The only preview assets served, by exact request path: nothing is looked up from the URL.
UI_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/_preview/preview.css": ("preview.css", "text/css; charset=utf-8"),
    "/_preview/preview.js": ("preview.js", "text/javascript; charset=utf-8"),
}
BUILD_PREFIX = "/build/"
EMAIL_FILE = "email.html"
TEXT_FILE = "email.txt"
WEB_FILE = "web.html"
SOURCE_FILE = "sample.eml"
KEEPALIVE_SECONDS = 15.0

# The page may talk to this server only: no CDN, no fonts, no analytics.
UI_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# Email documents: inline styles as in a mail client, no scripts at all.
BUILD_CSP = (
    "default-src 'none'; img-src 'self' data: https: http:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


@dataclass(frozen=True)
class Envelope:
    """What an inbox shows before the message is opened."""

    sender: str
    recipient: str
    subject: str
    preheader: str
    html_size: int
    over_gmail_clip: bool
    clip_bytes: int = render.GMAIL_CLIP_BYTES


@dataclass(frozen=True)
class BuildProblem:
    """Why the latest build failed, split so the page can show the file and line."""

    message: str
    where: str | None = None
    hint: str | None = None
    text: str = ""


@dataclass(frozen=True)
class PreviewState:
    """One build's outcome: everything the page shows, or the problem that stopped it."""

    version: int
    issue: str
    seconds: float = 0.0
    envelope: Envelope | None = None
    titles: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    text: str = ""
    headers: str = ""
    source: str = ""
    problem: BuildProblem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.envelope is not None

    def as_json(self) -> dict[str, Any]:
        """The snapshot the page renders (``/api/state``)."""
        envelope = self.envelope
        return {
            "version": self.version,
            "ok": self.ok,
            "issue": self.issue,
            "seconds": round(self.seconds, 3),
            "envelope": None
            if envelope is None
            else {
                "from": envelope.sender,
                "to": envelope.recipient,
                "subject": envelope.subject,
                "preheader": envelope.preheader,
                "html_size": envelope.html_size,
                "over_gmail_clip": envelope.over_gmail_clip,
                "clip_bytes": envelope.clip_bytes,
            },
            "titles": list(self.titles),
            "warnings": list(self.warnings),
            "text": self.text,
            "headers": self.headers,
            "source": self.source,
            "error": None
            if self.problem is None
            else {
                "message": self.problem.message,
                "where": self.problem.where,
                "hint": self.problem.hint,
                "text": self.problem.text,
            },
            "files": {
                "email": f"{BUILD_PREFIX}{EMAIL_FILE}?v={self.version}",
                "text": f"{BUILD_PREFIX}{TEXT_FILE}?v={self.version}",
                "web": f"{BUILD_PREFIX}{WEB_FILE}?v={self.version}",
                "source": f"{BUILD_PREFIX}{SOURCE_FILE}?v={self.version}",
            },
        }


# --- building ----------------------------------------------------------------------------


def preview_dir(config: Config, issue_path: Path) -> Path:
    """The private build folder for one issue's preview (under ``.newsletter/``)."""
    return config.state_dir / PREVIEW_DIR / issue_path.name


def message_parts(data: bytes) -> tuple[str, str, EmailMessage]:
    """(HTML part, text part, parsed message) of a serialised message."""
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    html_part = parsed.get_body(preferencelist=("html",))
    text_part = parsed.get_body(preferencelist=("plain",))
    html = html_part.get_content() if html_part is not None else ""
    text = text_part.get_content() if text_part is not None else ""
    # Parts keep the wire's CRLF line ends; the page and the files use plain newlines.
    return str(html).replace("\r\n", "\n"), str(text).replace("\r\n", "\n"), parsed


def build_preview(
    config: Config, issue_path: Path, out_dir: Path, *, version: int = 1
) -> PreviewState:
    """Render the issue and write the preview files; raise NewsletterError if it cannot."""
    started = time.perf_counter()
    issue = content.read_issue(issue_path)
    # Rendered twice: with real image URLs for the message as sent (its size and
    # source), and with build-relative ones for the frames, so nothing is fetched
    # from the internet.
    sent = render.render_issue(issue, config)
    shown = render.render_issue(issue, config, asset_base="")
    source = message.sample_message(sent, config)
    html, text, _ = message_parts(message.sample_message(shown, config))
    _, _, parsed = message_parts(source)
    files = {
        EMAIL_FILE: html.encode("utf-8"),
        TEXT_FILE: text.encode("utf-8"),
        WEB_FILE: shown.web_html.encode("utf-8"),
        SOURCE_FILE: source,
    }
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    kept = set(files)
    base = out_dir.resolve()
    for asset, relative in shown.assets:
        target = out_dir / relative
        if not target.resolve().is_relative_to(base):
            continue  # "images/../../x.png": never write outside the build folder
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(asset, tmp)
        tmp.replace(target)
        kept.add(relative)
    _prune(out_dir, kept)
    raw_source = source.decode("utf-8", "replace").replace("\r\n", "\n")
    head, _, _ = raw_source.partition("\n\n")
    return PreviewState(
        version=version,
        issue=issue.slug,
        seconds=time.perf_counter() - started,
        envelope=Envelope(
            sender=str(parsed["From"] or ""),
            recipient=str(parsed["To"] or ""),
            subject=str(parsed["Subject"] or sent.subject),
            preheader=sent.preheader,
            html_size=sent.html_size,
            over_gmail_clip=sent.over_gmail_clip,
        ),
        titles=tuple(article.title for article in issue.articles),
        warnings=sent.warnings,
        text=text,
        headers=head,
        source=raw_source,
    )


def _prune(out_dir: Path, kept: set[str]) -> None:
    """Remove what an earlier build wrote and this one did not (a renamed image...)."""
    for path in sorted(out_dir.rglob("*"), reverse=True):
        relative = path.relative_to(out_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif relative not in kept:
            path.unlink(missing_ok=True)


def _problem(exc: BaseException) -> BuildProblem:
    if isinstance(exc, NewsletterError):
        return BuildProblem(message=exc.message, where=exc.where, hint=exc.hint, text=str(exc))
    text = f"unexpected {type(exc).__name__}: {exc}"
    return BuildProblem(
        message=text, hint="this is a bug in newsletter; the terminal shows details", text=text
    )


# --- safety ------------------------------------------------------------------------------


def host_warning(host: str) -> str | None:
    """A warning to print when the preview would be reachable from other machines."""
    if is_loopback(host, resolve=True):
        return None
    return (
        f"the preview listens on {host}, so other machines on the network can read this "
        "unpublished issue; leave out --host to keep it on 127.0.0.1"
    )


def resolve_build_file(root: Path, raw: str) -> Path | None:
    """The file under ``root`` that a still-encoded URL path names, or None (404).

    Decodes once, then refuses empty, ``.``, ``..`` and hidden segments, backslashes
    and NULs, and anything whose real path (symlinks followed) is not inside ``root``.
    """
    try:
        relative = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    try:
        base = root.resolve(strict=True)
        real = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(base) or not real.is_file():
        return None
    return real


# --- the server --------------------------------------------------------------------------


class PreviewServer:
    """Build, serve and watch one issue; ``start()`` returns once the page can be loaded.

    ``version`` goes up by one with every build, good or bad; tests and the page
    wait on it (``wait_for_version``, ``/events``) instead of sleeping.
    """

    def __init__(
        self,
        config: Config,
        issue_path: Path,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        watch: bool = True,
        on_build: Callable[[PreviewState], None] | None = None,
    ) -> None:
        self.config = config
        self.issue_path = issue_path.resolve()
        self.host = host
        self.port = port
        self.build_dir = preview_dir(config, self.issue_path)
        self._watch = watch
        self._on_build = on_build
        self._state = PreviewState(version=0, issue=self.issue_path.name)
        self._changed = threading.Condition()
        self._build_lock = threading.Lock()
        self._stopping = threading.Event()
        self._restart_tree = threading.Event()
        self._tree_filter = watchfiles.DefaultFilter()
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle

    def start(self) -> PreviewServer:
        """Bind, start watching, build once, then serve in background threads."""
        self._httpd = httpd = _bind(self.host, self.port, self)
        self.port = int(httpd.server_address[1])
        try:
            # Watches are live once made: made before the first build, no save is missed.
            watches = (self._open_tree_watch(), self._open_root_watch()) if self._watch else None
        except OSError as exc:
            httpd.server_close()
            raise PreviewError(
                f"cannot watch files for changes: {exc}",
                where=str(self.issue_path),
                hint="raise the limit fs.inotify.max_user_watches, or close other watchers",
            ) from None
        except BaseException:
            httpd.server_close()
            raise
        self.rebuild()
        self._spawn("preview-http", lambda: httpd.serve_forever(poll_interval=0.1))
        if watches is not None:
            tree, root = watches
            self._spawn(
                "preview-watch",
                lambda: self._watch_loop(
                    tree, self._open_tree_watch, self._accept_tree, self._restart_tree
                ),
            )
            self._spawn(
                "preview-watch-root",
                lambda: self._watch_loop(root, self._open_root_watch, self._accept_root),
            )
        return self

    def stop(self) -> None:
        """Stop serving and watching; open event streams end; safe to call twice."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        if self._httpd is not None:
            if any(t.name == "preview-http" and t.is_alive() for t in self._threads):
                self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def wait(self) -> None:
        """Block until ``stop()`` (Ctrl-C interrupts this in the main thread)."""
        while not self._stopping.wait(1.0):
            pass

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- state

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    @property
    def state(self) -> PreviewState:
        return self._state

    @property
    def version(self) -> int:
        return self._state.version

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Wait until a build numbered ``version`` or later has finished."""
        with self._changed:
            return self._changed.wait_for(lambda: self._state.version >= version, timeout)

    def wait_for_change(self, seen: int | None, timeout: float) -> int | None:
        """The current version once it differs from ``seen`` (or on timeout); None when stopping."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._stopping.is_set() or self._state.version != seen, timeout
            )
            return None if self._stopping.is_set() else self._state.version

    # -- building

    def rebuild(self, *, reload_config: bool = False) -> PreviewState:
        """Build now; a failure is recorded in the state, never raised."""
        with self._build_lock:
            version = self._state.version + 1
            started = time.perf_counter()
            try:
                if reload_config:
                    self.config = config_module.load(self.config.root, db=self.config.db_override)
                state = build_preview(self.config, self.issue_path, self.build_dir, version=version)
            except Exception as exc:
                if not isinstance(exc, NewsletterError):
                    log.exception("preview build failed")
                state = PreviewState(
                    version=version,
                    issue=self.issue_path.name,
                    seconds=time.perf_counter() - started,
                    problem=_problem(exc),
                )
            with self._changed:
                self._state = state
                self._changed.notify_all()
        if self._on_build is not None:
            self._on_build(state)
        return state

    def _watched_trees(self) -> list[Path]:
        candidates = [self.issue_path, self.config.templates_dir, default_theme_dir()]
        found: list[Path] = []
        for path in candidates:
            if path.is_dir():
                real = path.resolve()
                if not any(real == f or real.is_relative_to(f) for f in found):
                    found = [f for f in found if not f.is_relative_to(real)] + [real]
        return found

    def _open_tree_watch(self) -> RustNotify:
        return RustNotify([str(p) for p in self._watched_trees()], False, False, 300, True, True)

    def _open_root_watch(self) -> RustNotify:
        return RustNotify([str(self.config.root)], False, False, 300, False, True)

    def _accept_tree(self, change: watchfiles.Change, path: str) -> bool:
        return self._tree_filter(change, path)

    def _accept_root(self, _change: watchfiles.Change, path: str) -> bool:
        """Only the config file, and templates/ appearing or going."""
        return Path(path).name in (config_module.CONFIG_NAME, self.config.templates_dir.name)

    def _watch_loop(
        self,
        notify: RustNotify | None,
        reopen: Callable[[], RustNotify],
        accept: Callable[[watchfiles.Change, str], bool],
        restart: threading.Event | None = None,
    ) -> None:
        """Rebuild on each batch of accepted changes until the server stops.

        ``restart`` closes the watch and opens a new one over the current paths,
        then rebuilds once, in case a save fell between the two.
        """
        stop = _AnySet(self._stopping, restart or threading.Event())
        try:
            while not self._stopping.is_set():
                if notify is None:
                    try:
                        notify = reopen()
                    except OSError:
                        log.debug("cannot watch yet", exc_info=True)
                        self._stopping.wait(0.5)
                        continue
                    self.rebuild(reload_config=True)
                raw = notify.watch(400, 50, 1000, stop)
                if raw == "stop":
                    notify.close()
                    notify = None
                    if restart is not None:
                        restart.clear()
                    continue
                if isinstance(raw, str):  # timeout, or a signal (only the main thread gets those)
                    continue
                changes = [(watchfiles.Change(k), p) for k, p in raw]
                changes = [(k, p) for k, p in changes if accept(k, p)]
                if changes:
                    self._changes_seen(changes)
        finally:
            if notify is not None:
                notify.close()

    def _changes_seen(self, changes: Iterable[tuple[watchfiles.Change, str]]) -> None:
        paths = [Path(p) for _, p in changes]
        reload_config = any(p.name == config_module.CONFIG_NAME for p in paths)
        templates = [self.config.templates_dir.resolve(), default_theme_dir().resolve()]
        if any(p == t or p.is_relative_to(t) for p in paths for t in templates):
            render.clear_template_cache()
        if any(p.name == self.config.templates_dir.name for p in paths):
            self._restart_tree.set()  # templates/ appeared or went: watch the new set
        self.rebuild(reload_config=reload_config)


class _AnySet:
    """A stop event for watchfiles that is set when any of its events is."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)


def _bind(host: str, port: int, preview: PreviewServer) -> _HTTPServer:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    server_class = type("_Server", (_HTTPServer,), {"address_family": family})
    try:
        httpd: _HTTPServer = server_class((host.strip("[]"), port), _Handler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = (
            "stop the other program, pick another --port, or use --port 0 for a free one"
            if exc.errno == 98
            else "use --host 127.0.0.1"
        )
        raise PreviewError(f"cannot listen: {reason}", where=f"{host}:{port}", hint=hint) from None
    httpd.preview = preview
    return httpd


class _HTTPServer(ThreadingHTTPServer):
    """Threads per request (event streams hold one each); quiet about clients that leave."""

    daemon_threads = True
    allow_reuse_address = True
    preview: PreviewServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        log.exception("preview request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes by exact path; the only lookup from the URL is ``resolve_build_file``."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "newsletter-preview"
    sys_version = ""
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, *, head: bool) -> None:
        preview = self.server.preview
        if not self._host_allowed():
            self._send(403, b"forbidden host\n", "text/plain; charset=utf-8", head=head)
            return
        path = urlsplit(self.path).path if "://" in self.path[:16] else self.path
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path in UI_FILES:
            name, kind = UI_FILES[path]
            self._send(200, (UI_DIR / name).read_bytes(), kind, head=head, csp=UI_CSP)
        elif path == "/api/state":
            body = json.dumps(preview.state.as_json()).encode("utf-8")
            self._send(200, body, "application/json", head=head, csp=UI_CSP)
        elif path == "/events" and not head:
            self._events(preview)
        elif path.startswith(BUILD_PREFIX):
            found = resolve_build_file(preview.build_dir, path[len(BUILD_PREFIX) :])
            if found is None:
                self._not_found(head)
                return
            self._send(200, found.read_bytes(), _content_type(found), head=head, csp=BUILD_CSP)
        else:
            self._not_found(head)

    def _host_allowed(self) -> bool:
        """Refuse other Host names on loopback, so a web page cannot rebind DNS to us."""
        preview = self.server.preview
        header = self.headers.get("Host")
        if header is None or not is_loopback(preview.host, resolve=True):
            return True
        name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        return name.strip("[]").lower() in {
            "localhost",
            "127.0.0.1",
            "::1",
            preview.host.strip("[]"),
        }

    def _not_found(self, head: bool) -> None:
        self._send(404, b"not found\n", "text/plain; charset=utf-8", head=head)

    def _send(
        self, status: int, body: bytes, kind: str, *, head: bool, csp: str | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            if csp:
                self.send_header("Content-Security-Policy", csp)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _events(self, preview: PreviewServer) -> None:
        """Server-Sent Events: the current version at once, then each new one."""
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(b"retry: 500\n\n")
            seen: int | None = None
            while True:
                version = preview.wait_for_change(seen, KEEPALIVE_SECONDS)
                if version is None:
                    return
                if version == seen:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    self.wfile.write(f"event: version\ndata: {version}\n\n".encode())
                    seen = version
                self.wfile.flush()
        except (ConnectionError, TimeoutError):
            return


def _content_type(path: Path) -> str:
    if path.suffix == ".eml":
        return "text/plain; charset=utf-8"
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if kind.startswith("text/"):
        kind = f"{kind}; charset=utf-8"
    return kind
