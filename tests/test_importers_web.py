"""Web page import: fetching with limits, extraction, Markdown and sanitising."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from newsletter.config import FetchSettings
from newsletter.errors import ImportSourceError
from newsletter.importers import web
from tests.support.importers import BASE_URL, make_workspace, one_error_line, run, snapshot
from tests.support.local_http import HTML, LocalServer, Reply, closed_port, drip, serve
from tests.support.web_pages import BOILERPLATE, bare_page, blog_post, news_article

AGENT = "newsletter-tests"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


def _assert_no_boilerplate(text: str) -> None:
    for phrase in BOILERPLATE:
        assert phrase not in text, phrase


# --- extraction ----------------------------------------------------------------------------


@pytest.mark.server
def test_news_page_gives_metadata_and_clean_markdown(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/story"] = Reply(body=news_article().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")

    article = web.import_url(server.url("/story"), cfg)

    assert article.title == "Harbour towns rethink the winter ferry timetable"
    assert article.author == "Maren Holt"
    assert article.source == "The Coastal Ledger"
    assert article.date == dt.date(2025, 3, 14)
    assert article.url == "https://news.example.org/2025/03/harbour-ferry-timetable"
    assert article.image == "https://news.example.org/media/ferry-lead.jpg"
    assert article.image_alt == "A ferry leaving the harbour at dawn"  # from the <img> itself
    assert article.summary == "Three councils want a shared timetable before next winter."
    assert article.missing() == ()
    body = article.body
    assert body.startswith("Three harbour councils met on Thursday")
    assert "Harbour towns rethink" not in body  # the <h1> is the title, not the body
    assert (
        "[joint transport committee](https://councils.example.org/ferry-plan), would move" in body
    )
    assert "- fewer cancellations announced on the day,\n- a timetable" in body
    assert "> We heard the same thing at every meeting" in body
    assert "*trial month*" in body
    assert f"[town library]({server.url('/library/ferry-plan')})" in body  # made absolute
    assert "open it here" in body and "javascript" not in body  # unsafe link unwrapped
    assert "\n    " not in body  # source indentation is not content
    _assert_no_boilerplate(body)


def test_blog_post_metadata_from_json_ld_and_ordered_list() -> None:
    article = web.extract(blog_post(), "https://tramnotes.example.net/2024/11/number-4")

    assert article.title == "Why the number 4 tram is always late on Mondays"
    assert article.author == "Ruairi Kestle"
    assert article.source == "Tram Notes"
    assert article.date == dt.date(2024, 11, 2)
    assert article.url == "https://tramnotes.example.net/2024/11/number-4"  # no canonical
    assert "1. the weekend's track inspection" in article.body
    assert "3. the market stalls on Bridge Street" in article.body
    assert "> Fix the changeover and you win back half of it." in article.body
    assert article.missing() == ("image", "summary")
    _assert_no_boilerplate(article.body)


def test_page_without_metadata_reports_what_is_missing() -> None:
    article = web.extract(bare_page(), "https://shelters.example.com/counted")

    assert article.title == "Bus shelters, counted"
    assert {"author", "date", "image"} <= set(article.missing())
    assert article.source == "shelters.example.com"
    assert any("host name" in note for note in article.notes)
    assert article.body.count("\n\n") >= 5  # six paragraphs stay six paragraphs


def test_excerpt_keeps_n_paragraphs_and_links_to_the_rest() -> None:
    article = web.extract(news_article(), "https://news.example.org/x", excerpt=2)

    blocks = article.body.strip().split("\n\n")
    assert len(blocks) == 3
    assert blocks[0].startswith("Three harbour councils")
    assert blocks[1].startswith("The proposal, published by")
    assert blocks[2] == (
        "[Read the full article →](https://news.example.org/2025/03/harbour-ferry-timetable)"
    )


def test_html_left_in_the_text_is_sanitised() -> None:
    page = news_article().replace(
        "<p>Operators have asked",
        "<p>Water is H<sub>2</sub>O, says &amp;lt;img src=x onerror=alert(1)&amp;gt; the "
        "sign, and <code>&lt;b&gt;</code> is code; 5 &lt; 6.</p><p>Operators have asked",
    )
    body = web.extract(page, "https://news.example.org/x").body

    assert "H<sub>2</sub>O" in body
    assert "onerror" not in body and "<img" not in body
    assert "`<b>`" in body  # code is not HTML
    assert "5 \\< 6" in body or "5 < 6" in body


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("x<sup>2</sup> and y<sub>i</sub>", "x<sup>2</sup> and y<sub>i</sub>"),
        ("before <script>alert(1)</script> after", "before  after"),
        ('a <span style="color:red" onclick="x()">b</span> c', "a b c"),
        ("an \\<em> escape stays", "an \\<em> escape stays"),
        ("code `<div>` stays", "code `<div>` stays"),
        ("[a](<https://example.org/a_(b)>) stays", "[a](<https://example.org/a_(b)>) stays"),
        ("fish & chips > 3", "fish & chips > 3"),
        ("<!-- hidden --> shown", " shown"),
    ],
)
def test_sanitise_html(markdown: str, expected: str) -> None:
    assert web.sanitise_html(markdown) == expected


def test_page_with_no_article_text_is_an_error() -> None:
    page = "<html><head><title>Login</title></head><body><form>Sign in</form></body></html>"
    with pytest.raises(ImportSourceError, match="could not find the article text"):
        web.extract(page, "https://example.com/login")


# --- fetching ------------------------------------------------------------------------------


@pytest.mark.server
def test_fetch_sends_user_agent_and_follows_redirects(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/old"] = Reply(301, headers={"Location": "/story"})
    server.routes["/story"] = Reply(body=news_article(canonical="").encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")

    article = web.import_url(server.url("/old"), cfg)

    assert article.url == server.url("/story")  # no canonical: the URL after redirects
    seen = server.requests_for("/story")[0]
    assert seen.headers["user-agent"] == f"newsletter/0.1.0 (+{BASE_URL})"
    assert "text/html" in seen.headers["accept"]


def _settings(**changes: float) -> FetchSettings:
    """Fetch settings for the local test server: allow_private, since it is on 127.0.0.1."""
    values = {"timeout": 5.0, "max_bytes": 100_000, "allow_private": True, **changes}
    return FetchSettings(**values)  # type: ignore[arg-type]


def test_unreachable_host() -> None:
    port = closed_port()
    with pytest.raises(ImportSourceError, match="could not connect") as caught:
        web.fetch(f"http://127.0.0.1:{port}/x", _settings(), AGENT)
    assert caught.value.where == f"127.0.0.1:{port}"


@pytest.mark.server
def test_stalled_server_times_out(server: LocalServer) -> None:
    release = threading.Event()
    server.routes["/slow"] = Reply(body=b"<html></html>", headers=HTML, stall=release)
    try:
        with pytest.raises(ImportSourceError, match="timed out"):
            web.fetch(server.url("/slow"), _settings(timeout=0.3), AGENT)
    finally:
        release.set()


@pytest.mark.server
@pytest.mark.parametrize(
    "answer",
    [
        # Headers that never end, one byte at a time.
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Padding: " + b"a" * 1000,
        # Headers, then a body that never ends (no length: it would end at the close).
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n<html><body>"
        + b"<p>more</p>" * 100,
    ],
    ids=["headers", "body"],
)
def test_a_server_that_drips_its_answer_is_cut_off_at_the_deadline(answer: bytes) -> None:
    """Each byte comes within the timeout, so only the overall deadline can stop it."""
    settings = _settings(timeout=0.25)  # each read waits 0.25 s at most; all of it, 1 s
    for dripper in drip(answer, interval=0.02):
        started = time.monotonic()
        with pytest.raises(ImportSourceError, match=r"took longer than 1 s to download") as caught:
            web.fetch(dripper.url("/slow"), settings, AGENT)
        elapsed = time.monotonic() - started
        assert caught.value.where == f"127.0.0.1:{dripper.port}"
        # Cut off at the deadline, long before the answer would have ended (~20 s on).
        assert elapsed < 10 and dripper.sent < len(answer) // 2, (elapsed, dripper.sent)


@pytest.mark.server
def test_what_a_server_says_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    """A reason phrase (or a Location) is the server's text: an ESC in it would make the
    editor's terminal obey it (retitle the window, clear it, write the clipboard)."""
    cfg = make_workspace(tmp_path / "ws")
    answer = b"HTTP/1.1 404 \x1b]0;owned\x07\x1b[2J\r\nContent-Length: 0\r\n\r\n"
    for dripper in drip(answer, interval=0):
        line = one_error_line(run(cfg, "issue", "add", "1", dripper.url("/story")))
    assert "\x1b" not in line and "\x07" not in line
    assert "the server answered 404 \\x1b]0;owned\\x07\\x1b[2J" in line


@pytest.mark.server
def test_non_html_answer_is_refused_before_reading(server: LocalServer) -> None:
    server.routes["/file.pdf"] = Reply(
        body=b"%PDF-1.7", headers={"Content-Type": "application/pdf"}
    )
    with pytest.raises(ImportSourceError, match="not a web page: the server sent application/pdf"):
        web.fetch(server.url("/file.pdf"), _settings(), AGENT)


@pytest.mark.server
def test_declared_size_over_the_limit(server: LocalServer) -> None:
    server.routes["/big"] = Reply(body=b"<html>" + b"x" * 5000, headers=HTML)
    with pytest.raises(ImportSourceError, match="larger than the 1,000 byte limit"):
        web.fetch(server.url("/big"), _settings(max_bytes=1000), AGENT)


@pytest.mark.server
def test_streamed_size_over_the_limit_stops_reading(server: LocalServer) -> None:
    body = b"<html><body>" + b"<p>more</p>" * 50_000 + b"</body></html>"
    server.routes["/endless"] = Reply(body=body, headers=HTML, omit_length=True)
    with pytest.raises(ImportSourceError, match="larger than the 100,000 byte limit"):
        web.fetch(server.url("/endless"), _settings(max_bytes=100_000), AGENT)


@pytest.mark.server
def test_http_error_status(server: LocalServer) -> None:
    with pytest.raises(ImportSourceError, match="answered 404"):
        web.fetch(server.url("/missing"), _settings(), AGENT)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a.html", "example.org/x"])
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ImportSourceError, match="only http and https"):
        web.check_url(url)


# --- the same failures through the CLI: one line, exit 1, nothing written ------------------


@pytest.mark.server
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", "could not connect"),
        ("timeout", "timed out"),
        ("non-html", "not a web page"),
        ("too-large", "larger than"),
        ("file-scheme", "only http and https"),
        ("ftp-scheme", "only http and https"),
    ],
)
def test_bad_urls_fail_cleanly_in_the_cli(
    server: LocalServer, tmp_path: Path, case: str, message: str
) -> None:
    cfg = make_workspace(tmp_path / "ws", timeout=0.3, max_bytes=10_000)
    release = threading.Event()
    server.routes["/slow"] = Reply(body=b"<html></html>", headers=HTML, stall=release)
    server.routes["/doc"] = Reply(body=b"{}", headers={"Content-Type": "application/json"})
    server.routes["/big"] = Reply(body=b"<html>" + b"x" * 20_000, headers=HTML, omit_length=True)
    url = {
        "unreachable": f"http://127.0.0.1:{closed_port()}/story",
        "timeout": server.url("/slow"),
        "non-html": server.url("/doc"),
        "too-large": server.url("/big"),
        "file-scheme": "file:///etc/hostname",
        "ftp-scheme": "ftp://127.0.0.1/story.html",
    }[case]
    before = snapshot(cfg.root)
    try:
        result = run(cfg, "issue", "add", "1", url)
    finally:
        release.set()
    assert message in one_error_line(result)
    assert snapshot(cfg.root) == before


@pytest.mark.server
def test_cli_adds_a_web_page_and_names_missing_fields(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/bare"] = Reply(body=bare_page().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")

    result = run(cfg, "issue", "add", "1", server.url("/bare"))

    assert result.exit_code == 0, result.output
    assert "added 01-bus-shelters-counted.md" in result.stdout
    assert "not found: author, date, image, summary" in result.stdout
    written = (cfg.issues_dir / "001-first" / "articles" / "01-bus-shelters-counted.md").read_text()
    assert written.startswith("---\ntitle: Bus shelters, counted\n")
    assert f"url: {server.url('/bare')}" in written


@pytest.mark.server
def test_redirect_to_a_file_url_is_refused(server: LocalServer) -> None:
    server.routes["/sneaky"] = Reply(302, headers={"Location": "file:///etc/passwd"})
    with pytest.raises(
        ImportSourceError, match="redirect led to an address that cannot be fetched"
    ):
        web.fetch(server.url("/sneaky"), _settings(), AGENT)
