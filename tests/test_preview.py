"""The preview server, driven by real headless Chromium through Playwright.

Each test gets its own small workspace in tmp_path and its own server on a free
loopback port. Waiting is on conditions (Playwright's expect, the server's
version), never on sleeps. Screenshots land in tmp_path for a person to look at.
"""

from __future__ import annotations

import http.client
import os
import re
import selectors
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from newsletter import config as config_module
from newsletter import message, preview
from newsletter.preview import PreviewServer
from tests.support import CHROMIUM, CHROMIUM_ARGS, REPO

WAIT_MS = 8000

CONFIG = """\
[newsletter]
name = "The Test Gazette"
tagline = "Small news, read closely."
sender = "The Test Gazette <editor@example.org>"
reply_to = "letters@example.org"
base_url = "https://example.org/gazette"
postal_address = "1 Example Street, Example Town"

[unsubscribe]
url = "https://example.org/gazette/u"
"""

ISSUE = """\
---
number: 1
date: 2026-03-02
title: Tides and Timetables
preheader: Two short stories about water and waiting.
articles:
  - 01-harbour-wall.md
  - 02-night-bus.md
---
A short introduction to **two** stories.
"""

FIRST = """\
---
title: The Harbour Wall Gets a Second Life
source: Example Times
author: Ada Writer
date: 2026-02-27
url: https://example.org/news/harbour-wall
image: ../images/wall.png
image_alt: A long grey harbour wall under a pale sky
---
The old harbour wall will be repaired rather than replaced, the council said on Friday.

![](../images/wall.png)

The full decision is at https://example.org/council/decisions/2026/\
harbour-wall-repair-rather-than-replacement-final-report-appendix-b.pdf for anyone who wants it.
"""

SECOND = """\
---
title: Riding the Last Night Bus
source: Example Weekly
date: 2026-02-26
---
The 23:50 from the station is the quietest bus in town.

1. It waits for the last train.
2. It stops everywhere on request.

> Nobody is in a hurry at midnight.
"""


def png(width: int, height: int, rgb: tuple[int, int, int] = (70, 110, 150)) -> bytes:
    """A plain PNG, wider than a phone, so the mobile test means something."""
    row = b"\x00" + bytes(rgb) * width
    raw = row * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def write_workspace(root: Path) -> Path:
    """A one-issue workspace; returns the issue folder."""
    (root / "templates").mkdir(parents=True)
    (root / "newsletter.toml").write_text(CONFIG, encoding="utf-8")
    issue = root / "issues" / "001-tides-and-timetables"
    (issue / "articles").mkdir(parents=True)
    (issue / "images").mkdir()
    (issue / "images" / "wall.png").write_bytes(png(1100, 420))
    (issue / "issue.md").write_text(ISSUE, encoding="utf-8")
    (issue / "articles" / "01-harbour-wall.md").write_text(FIRST, encoding="utf-8")
    (issue / "articles" / "02-night-bus.md").write_text(SECOND, encoding="utf-8")
    return issue


def save(path: Path, text: str) -> None:
    """Save as an editor does (write a temporary file, rename it over the old one)."""
    tmp = path.with_name(f".{path.name}.saving")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


READER = message.sample_recipient()
TITLES = ("The Harbour Wall Gets a Second Life", "Riding the Last Night Bus")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def issue_dir(tmp_path: Path) -> Path:
    return write_workspace(tmp_path / "ws")


@pytest.fixture
def server(issue_dir: Path) -> Iterator[PreviewServer]:
    cfg = config_module.load(issue_dir.parents[1])
    with PreviewServer(cfg, issue_dir, "127.0.0.1", 0) as running:
        yield running


class Visits:
    """Every URL the page and its frames asked for."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def outside(self, origin: str) -> list[str]:
        return [u for u in self.urls if not (u.startswith(origin) or u.startswith("data:"))]


def open_page(browser: Browser, server: PreviewServer, width: int) -> tuple[Page, Visits]:
    context = browser.new_context(viewport={"width": width, "height": 900})
    visits = Visits()
    context.on("request", lambda request: visits.urls.append(request.url))
    page = context.new_page()
    page.goto(server.url)
    wait_for_frames(page)
    return page, visits


def wait_for_frames(page: Page) -> None:
    """Until both email frames have loaded the build the page shows."""
    page.wait_for_function(
        """() => document.body.dataset.state === 'ok' &&
                 ['frame-desktop', 'frame-mobile'].every(id =>
                   document.getElementById(id).dataset.version ===
                     document.body.dataset.version)""",
        timeout=WAIT_MS,
    )


def frame_document(page: Page, frame_id: str) -> object:
    handle = page.locator(f"#{frame_id}").element_handle()
    assert handle is not None
    frame = handle.content_frame()
    assert frame is not None
    return frame


# --- the page ------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.server
def test_page_shows_envelope_subject_titles_and_warnings(
    browser: Browser, server: PreviewServer, tmp_path: Path
) -> None:
    page, visits = open_page(browser, server, 1280)
    state = server.state
    assert state.ok and state.envelope is not None
    expect(page.locator("#env-subject")).to_have_text(state.envelope.subject)
    assert TITLES[0] in state.envelope.subject
    expect(page.locator("#env-from-name")).to_have_text("The Test Gazette")
    expect(page.locator("#env-to")).to_contain_text(READER.email)
    expect(page.locator("#env-preheader")).to_have_text(
        "Two short stories about water and waiting."
    )
    expect(page.locator("#env-size")).to_contain_text("KB of Gmail's 102.0 KB")
    expect(page.locator("#env-clip")).to_be_hidden()
    # The body image has no alt text: the build says so, and so does the page.
    expect(page.locator("#warning-list")).to_contain_text("has no alt text")
    for frame_id in ("#frame-desktop", "#frame-mobile"):
        frame = page.frame_locator(frame_id)
        for title in TITLES:
            expect(frame.locator("h2", has_text=title)).to_be_visible()
        # Placeholders are filled for the example subscriber.
        expect(frame.locator("body")).to_contain_text(f"Hello {READER.first_name},")
        expect(frame.locator("body")).not_to_contain_text("%%nl:")
    desktop = page.locator("#frame-desktop").bounding_box()
    assert desktop is not None and desktop["width"] >= 600
    page.screenshot(path=str(tmp_path / "preview-1280.png"))
    assert visits.outside(server.url.rstrip("/")) == []
    page.context.close()


@pytest.mark.browser
@pytest.mark.server
@pytest.mark.parametrize("width", [375, 600])
def test_mobile_frame_has_no_horizontal_overflow(
    browser: Browser, server: PreviewServer, tmp_path: Path, width: int
) -> None:
    page, visits = open_page(browser, server, width)
    mobile = page.locator("#frame-mobile")
    box = mobile.bounding_box()
    assert box is not None
    assert box["width"] == pytest.approx(min(375, width), abs=1)
    frame = frame_document(page, "frame-mobile")
    scroll, client = frame.evaluate(  # type: ignore[attr-defined]
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert client >= 340
    assert scroll <= client, f"email overflows the phone frame: {scroll} > {client}"
    # The page around it does not scroll sideways either.
    page_scroll, page_client = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert page_scroll <= page_client
    page.screenshot(path=str(tmp_path / f"preview-{width}.png"), full_page=True)
    mobile.screenshot(path=str(tmp_path / f"mobile-frame-{width}.png"))
    # The whole email at this width, for a person to look at.
    email = page.context.new_page()
    email.set_viewport_size({"width": width, "height": 900})
    email.goto(f"{server.url}build/email.html")
    email.screenshot(path=str(tmp_path / f"email-{width}.png"), full_page=True)
    assert visits.outside(server.url.rstrip("/")) == []
    page.context.close()


@pytest.mark.browser
@pytest.mark.server
def test_plain_text_and_source_views(browser: Browser, server: PreviewServer) -> None:
    page, _ = open_page(browser, server, 1280)
    text = page.locator("#text-part")
    expect(text).to_be_hidden()
    page.get_by_role("tab", name="Plain text").click()
    expect(text).to_be_visible()
    shown = text.text_content()
    assert shown == server.state.text
    assert "RIDING THE LAST NIGHT BUS" in shown.upper()
    assert "1. It waits for the last train." in shown
    assert f"subscribed as\n{READER.email}" in shown
    assert "%%nl:" not in shown
    page.get_by_role("tab", name="Headers & source").click()
    headers = page.locator("#headers")
    expect(headers).to_be_visible()
    expect(headers).to_contain_text(f"To: {READER.name} <{READER.email}>")
    expect(headers).to_contain_text("From: The Test Gazette <editor@example.org>")
    expect(headers).to_contain_text("Subject: The Harbour Wall Gets a Second Life")
    page.locator("summary", has_text="Full source").click()
    source = page.locator("#source")
    expect(source).to_contain_text("Content-Type: text/html")
    assert "%%nl:" not in (source.text_content() or "")
    # The sample message uses the real image addresses; the frames use local copies.
    unfolded = (source.text_content() or "").replace("=\n", "")  # quoted-printable soft breaks
    assert "https://example.org/gazette/001-tides-and-timetables/images/wall.png" in unfolded
    page.context.close()


@pytest.mark.browser
@pytest.mark.server
def test_editing_an_article_updates_the_page_without_a_reload(
    browser: Browser, server: PreviewServer, issue_dir: Path
) -> None:
    page, _ = open_page(browser, server, 1280)
    page.evaluate("() => { window.notReloaded = true; }")
    before = server.version
    save(
        issue_dir / "articles" / "02-night-bus.md",
        SECOND.replace("quietest bus in town", "friendliest bus on the coast"),
    )
    desktop = page.frame_locator("#frame-desktop")
    expect(desktop.locator("body")).to_contain_text("friendliest bus on the coast", timeout=WAIT_MS)
    expect(page.frame_locator("#frame-mobile").locator("body")).to_contain_text(
        "friendliest bus on the coast", timeout=WAIT_MS
    )
    assert server.version > before
    assert page.evaluate("() => window.notReloaded") is True
    expect(page.locator("#text-part")).to_contain_text("friendliest bus on the coast")
    page.context.close()


@pytest.mark.browser
@pytest.mark.server
def test_a_broken_file_shows_its_error_and_fixing_it_brings_the_email_back(
    browser: Browser, server: PreviewServer, issue_dir: Path
) -> None:
    page, _ = open_page(browser, server, 1280)
    article = issue_dir / "articles" / "01-harbour-wall.md"
    # Line 3 has an unclosed bracket: the YAML error points at the file and line.
    save(article, FIRST.replace("source: Example Times", "source: [Example Times"))
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#error-where")).to_have_text(re.compile(r"01-harbour-wall\.md:\d+$"))
    problem = server.state.problem
    assert problem is not None and problem.where is not None
    expect(page.locator("#error-where")).to_have_text(problem.where)
    assert problem.where == f"{article}:{problem.where.rsplit(':', 1)[1]}"
    line = int(problem.where.rsplit(":", 1)[1])
    assert 3 <= line <= 4
    expect(page.locator("#error-message")).to_contain_text("malformed front matter")
    expect(page.locator("#tab-email")).to_be_hidden()
    expect(page.locator("#envelope")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("build failed")

    save(article, FIRST)
    expect(error).to_be_hidden(timeout=WAIT_MS)
    wait_for_frames(page)
    expect(page.locator("#tab-email")).to_be_visible()
    expect(page.frame_locator("#frame-desktop").locator("h2", has_text=TITLES[0])).to_be_visible()
    page.context.close()


@pytest.mark.browser
@pytest.mark.server
def test_an_email_over_gmails_clip_is_flagged(
    browser: Browser, server: PreviewServer, issue_dir: Path
) -> None:
    paragraph = (
        "The night bus stops at every shelter on the coast road, "
        "and the driver knows most riders by name. "
    )
    save(issue_dir / "articles" / "02-night-bus.md", SECOND + ("\n" + paragraph * 3 + "\n") * 300)
    wait_until(
        server, lambda: server.state.envelope is not None and server.state.envelope.over_gmail_clip
    )
    page, _ = open_page(browser, server, 1280)
    clip = page.locator("#env-clip")
    expect(clip).to_be_visible()
    expect(clip).to_contain_text("Over Gmail's clipping size")
    expect(page.locator("#warning-list")).to_contain_text("over Gmail's ~102 KB clipping size")
    page.context.close()


# --- safety --------------------------------------------------------------------------------


def raw_get(server: PreviewServer, target: str, host: str | None = None) -> tuple[int, bytes]:
    """A GET with the request target exactly as given: nothing normalises it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.putrequest("GET", target, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


TRAVERSALS = [
    "/../../etc/passwd",
    "/build/../../../../etc/passwd",
    "/build/../newsletter.toml",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/build/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/build/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/build/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/build/%252e%252e/%252e%252e/etc/passwd",
    "/build/..%5c..%5c..%5cetc%5cpasswd",
    "/build/%2fetc%2fpasswd",
    "/build//etc/passwd",
    "/build/./email.html/../../../etc/passwd",
    "/build/images/../../../newsletter.toml",
    "/build/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/build/email.html%00.png",
    "//etc/passwd",
    "/etc/passwd",
    "http://127.0.0.1/../../etc/passwd",
    "/_preview/../../newsletter.toml",
    "/_preview/%2e%2e/preview.py",
]


@pytest.mark.server
def test_path_traversal_gets_404(server: PreviewServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret", encoding="utf-8")
    (server.build_dir / "link-out.txt").symlink_to(secret)
    (server.build_dir / "dir-out").symlink_to(tmp_path)
    # What may be served is served (so a 404 below means something).
    assert raw_get(server, "/build/email.html")[0] == 200
    assert raw_get(server, "/build/images/wall.png")[0] == 200
    assert raw_get(server, "/build/email.html?v=3")[0] == 200
    assert raw_get(server, "/_preview/preview.js")[0] == 200
    for target in [*TRAVERSALS, "/build/link-out.txt", "/build/dir-out/secret.txt"]:
        status, body = raw_get(server, target)
        assert status == 404, target
        assert b"root:" not in body and b"top secret" not in body and b"[newsletter]" not in body


@pytest.mark.server
def test_foreign_host_header_is_refused(server: PreviewServer) -> None:
    assert raw_get(server, "/", host="attacker.example.com")[0] == 403
    assert raw_get(server, "/", host=f"localhost:{server.port}")[0] == 200


def test_host_warning_only_off_loopback() -> None:
    assert preview.host_warning("127.0.0.1") is None
    assert preview.host_warning("localhost") is None
    assert preview.host_warning("::1") is None
    warning = preview.host_warning("0.0.0.0")
    assert warning is not None and "other machines" in warning


# --- the library and the command -------------------------------------------------------------


def wait_until(server: PreviewServer, condition: object, seconds: float = 8.0) -> None:
    """Wait for builds until ``condition()`` holds (a deadline, not a sleep)."""
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out at version {server.version}: {server.state.problem}"
        server.wait_for_version(server.version + 1, remaining)


@pytest.mark.server
def test_template_and_config_changes_rebuild(server: PreviewServer, issue_dir: Path) -> None:
    root = issue_dir.parents[1]
    save(root / "templates" / "email.txt", "CUSTOM TEXT for {{ recipient.email }}\n")
    wait_until(server, lambda: server.state.text == f"CUSTOM TEXT for {READER.email}\n")

    config_text = (root / "newsletter.toml").read_text(encoding="utf-8")
    save(root / "newsletter.toml", config_text.replace("The Test Gazette", "The Renamed Gazette"))
    wait_until(server, lambda: "The Renamed Gazette" in server.state.headers)
    assert "The Renamed Gazette" in (server.build_dir / "email.html").read_text(encoding="utf-8")

    save(root / "newsletter.toml", config_text.replace("[unsubscribe]", "[unsubscribe"))
    wait_until(server, lambda: server.state.problem is not None)
    problem = server.state.problem
    assert problem is not None and problem.where is not None
    assert problem.where.startswith(str(root / "newsletter.toml") + ":")

    save(root / "newsletter.toml", config_text)
    wait_until(server, lambda: server.state.ok)
    assert "The Test Gazette" in server.state.headers


@pytest.mark.server
def test_a_templates_folder_made_while_previewing_is_watched(
    issue_dir: Path, tmp_path: Path
) -> None:
    root = issue_dir.parents[1]
    (root / "templates").rmdir()
    cfg = config_module.load(root)
    with PreviewServer(cfg, issue_dir, "127.0.0.1", 0) as server:
        staged = tmp_path / "staged" / "templates"
        staged.mkdir(parents=True)
        (staged / "email.txt").write_text("FIRST {{ recipient.first_name }}\n", encoding="utf-8")
        staged.rename(root / "templates")
        wait_until(server, lambda: server.state.text == f"FIRST {READER.first_name}\n")
        save(root / "templates" / "email.txt", "SECOND {{ recipient.first_name }}\n")
        wait_until(server, lambda: server.state.text == f"SECOND {READER.first_name}\n")


@pytest.mark.server
def test_stop_ends_event_streams_and_frees_the_port(issue_dir: Path) -> None:
    cfg = config_module.load(issue_dir.parents[1])
    server = PreviewServer(cfg, issue_dir, "127.0.0.1", 0).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/events")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    lines = [response.readline() for _ in range(4)]
    assert lines == [
        b"retry: 500\n",
        b"\n",
        b"event: version\n",
        f"data: {server.version}\n".encode(),
    ]
    started = time.monotonic()
    server.stop()
    assert response.read() == b"\n"  # the end of the event, then the stream ends
    assert time.monotonic() - started < 5
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        raw_get(server, "/")


def read_line_with(proc: subprocess.Popen[str], needle: str, seconds: float = 20) -> str:
    """The first line of the child's stdout that holds ``needle``.

    The pipe is read unbuffered: select() cannot see lines already sitting in the text
    wrapper's buffer. On failure the child is killed first, so reading its stderr never hangs.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and selector.select(timeout=left):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        seen += chunk
        for line in seen.decode("utf-8", "replace").splitlines(keepends=True):
            if needle in line and line.endswith("\n"):
                return line
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"no line with {needle!r} in {seen!r}; stderr: {err}")


def preview_command(issue_dir: Path, *options: str) -> list[str]:
    workspace = str(issue_dir.parents[1])
    return [sys.executable, "-m", "newsletter", "-C", workspace, "preview", "1", *options]


@pytest.mark.server
def test_cli_serves_and_stops_cleanly_on_ctrl_c(issue_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        preview_command(issue_dir, "--port", "0", "--no-open"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = read_line_with(proc, "http://127.0.0.1:")
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match is not None
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=5)
        conn.request("GET", "/api/state")
        response = conn.getresponse()
        assert response.status == 200
        assert b'"ok": true' in response.read()
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "Preview stopped." in out


@pytest.mark.server
def test_cli_refuses_a_port_in_use(issue_dir: Path, server: PreviewServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        preview_command(issue_dir, "--port", str(server.port), "--no-open"),
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: 127.0.0.1:{server.port}: cannot listen")
    assert "Traceback" not in result.stderr
