"""Feeds: the list, conditional pulls the server can see, items, feed:ID import."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from newsletter.importers import feeds
from tests.support.importers import make_workspace, one_error_line, run, snapshot
from tests.support.local_http import HTML, LocalServer, Reply, Request, serve
from tests.support.web_pages import BOILERPLATE, news_article, rss_feed

ETAG = '"v1-abc"'
LAST_MODIFIED = "Fri, 14 Mar 2025 09:00:00 GMT"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


def _conditional(body: bytes) -> Callable[[Request], Reply]:
    """A feed route that answers 304 when the client presents our validators."""

    def reply(request: Request) -> Reply:
        if request.headers.get("if-none-match") == ETAG:
            return Reply(304, headers={"ETag": ETAG})
        return Reply(
            body=body,
            headers={
                "Content-Type": "application/rss+xml",
                "ETag": ETAG,
                "Last-Modified": LAST_MODIFIED,
            },
        )

    return reply


def _feed_items(server: LocalServer) -> list[tuple[str, str, str]]:
    return [
        (
            "Harbour towns rethink the winter ferry timetable",
            server.url("/story"),
            "Fri, 14 Mar 2025 08:30:00 GMT",
        ),
        ("Lighthouse keepers return", server.url("/lighthouse"), "Thu, 13 Mar 2025 08:00:00 GMT"),
    ]


def _ids(output: str) -> list[str]:
    return re.findall(r"^  ([0-9a-f]{7,12})  ", output, re.M)


def test_feed_add_list_remove(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")

    assert run(cfg, "feed", "add", "ledger", "https://news.example.org/feed.xml").exit_code == 0
    assert run(cfg, "feed", "add", "trams", "https://tramnotes.example.net/atom").exit_code == 0
    listed = run(cfg, "feed", "list").stdout
    assert listed.splitlines() == [
        "ledger  https://news.example.org/feed.xml",
        "trams  https://tramnotes.example.net/atom",
    ]
    text = cfg.feeds_path.read_text()
    assert 'ledger = "https://news.example.org/feed.xml"' in text
    assert "duplicate" not in text

    assert "already a feed called 'ledger'" in one_error_line(
        run(cfg, "feed", "add", "ledger", "https://other.example.org/rss")
    )
    assert "only http and https" in one_error_line(
        run(cfg, "feed", "add", "local", "file:///etc/feed.xml")
    )
    assert "is not allowed" in one_error_line(
        run(cfg, "feed", "add", "bad name", "https://x.example.org/")
    )

    assert run(cfg, "feed", "remove", "ledger").exit_code == 0
    assert [f.name for f in feeds.read_feeds(cfg)] == ["trams"]
    assert "no feed called 'ledger'" in one_error_line(run(cfg, "feed", "remove", "ledger"))


def test_feed_add_and_remove_keep_the_editors_comments(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    cfg.feeds_path.write_text(
        "# Feeds for The Harbour Ledger: ask Maren before adding one.\n"
        "\n"
        "[feeds]\n"
        'ledger = "https://news.example.org/feed.xml"  # the paper itself\n'
        'trams = "https://tramnotes.example.net/atom"\n',
        encoding="utf-8",
    )

    assert run(cfg, "feed", "add", "quay", "https://quay.example.org/rss").exit_code == 0
    assert cfg.feeds_path.read_text(encoding="utf-8") == (
        "# Feeds for The Harbour Ledger: ask Maren before adding one.\n"
        "\n"
        "[feeds]\n"
        'ledger = "https://news.example.org/feed.xml"  # the paper itself\n'
        'trams = "https://tramnotes.example.net/atom"\n'
        'quay = "https://quay.example.org/rss"\n'
    )
    assert run(cfg, "feed", "remove", "trams").exit_code == 0
    assert cfg.feeds_path.read_text(encoding="utf-8") == (
        "# Feeds for The Harbour Ledger: ask Maren before adding one.\n"
        "\n"
        "[feeds]\n"
        'ledger = "https://news.example.org/feed.xml"  # the paper itself\n'
        'quay = "https://quay.example.org/rss"\n'
    )
    assert [(f.name, f.url) for f in feeds.read_feeds(cfg)] == [
        ("ledger", "https://news.example.org/feed.xml"),
        ("quay", "https://quay.example.org/rss"),
    ]


def test_a_feeds_file_that_is_not_utf8_is_one_error_and_left_alone(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    original = b'# Caf\xe9 news\n[feeds]\nledger = "https://news.example.org/feed.xml"\n'
    cfg.feeds_path.write_bytes(original)
    line = one_error_line(run(cfg, "feed", "add", "quay", "https://quay.example.org/rss"))
    assert "not UTF-8" in line and str(cfg.feeds_path) in line
    assert cfg.feeds_path.read_bytes() == original


def test_a_new_feeds_file_starts_with_a_header(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    assert run(cfg, "feed", "add", "ledger", "https://news.example.org/feed.xml").exit_code == 0
    assert cfg.feeds_path.read_text(encoding="utf-8") == (
        feeds.HEADER + '\n[feeds]\nledger = "https://news.example.org/feed.xml"\n'
    )


@pytest.mark.server
def test_pull_lists_items_then_uses_etag_and_gets_304(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/feed.xml"] = _conditional(rss_feed(_feed_items(server)))
    cfg = make_workspace(tmp_path / "ws")
    feeds.add_feed(cfg, "ledger", server.url("/feed.xml"))

    first = run(cfg, "feed", "pull")
    second = run(cfg, "feed", "pull")

    assert first.exit_code == 0, first.output
    assert "ledger: 2 new, 2 not used yet" in first.stdout
    assert "Harbour towns rethink the winter ferry timetable  (new)" in first.stdout
    requests = server.requests_for("/feed.xml")
    assert "if-none-match" not in requests[0].headers
    assert requests[1].headers["if-none-match"] == ETAG
    assert requests[1].headers["if-modified-since"] == LAST_MODIFIED
    assert second.exit_code == 0, second.output
    assert "ledger: not modified, 2 not used yet" in second.stdout
    assert "(new)" not in second.stdout
    assert _ids(first.stdout) == _ids(second.stdout)  # ids are stable
    assert len(set(_ids(first.stdout))) == 2


@pytest.mark.server
def test_issue_add_feed_item_imports_the_page_and_hides_it_next_time(
    server: LocalServer, tmp_path: Path
) -> None:
    server.routes["/feed.xml"] = _conditional(rss_feed(_feed_items(server)))
    server.routes["/story"] = Reply(body=news_article(canonical="").encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")
    feeds.add_feed(cfg, "ledger", server.url("/feed.xml"))
    pulled = run(cfg, "feed", "pull").stdout
    story_id = _ids(pulled)[0]  # newest first: the ferry story

    result = run(cfg, "issue", "add", "1", f"feed:{story_id}")

    assert result.exit_code == 0, result.output
    assert f"from feed:{story_id}" in result.stdout
    article = (cfg.issues_dir / "001-first" / "articles").glob("01-*.md").__next__().read_text()
    assert "author: Maren Holt" in article
    assert f"url: {server.url('/story')}" in article
    for phrase in BOILERPLATE:
        assert phrase not in article
    again = run(cfg, "feed", "pull").stdout
    assert story_id not in _ids(again)
    assert "1 already in an issue" in again


@pytest.mark.server
def test_malformed_feed_is_one_error_and_state_survives(
    server: LocalServer, tmp_path: Path
) -> None:
    server.routes["/good.xml"] = Reply(
        body=rss_feed(_feed_items(server)), headers={"Content-Type": "application/rss+xml"}
    )
    server.routes["/broken.xml"] = Reply(
        body=b'<?xml version="1.0"?><rss version="2.0"><channel><title>T</title><item><title>A',
        headers={"Content-Type": "application/rss+xml"},
    )
    server.routes["/page"] = Reply(body=news_article().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")
    feeds.add_feed(cfg, "good", server.url("/good.xml"))
    feeds.add_feed(cfg, "broken", server.url("/broken.xml"))
    feeds.add_feed(cfg, "html", server.url("/page"))

    result = run(cfg, "feed", "pull")

    line = one_error_line(result)
    assert "2 of 3 feeds failed" in line
    assert "broken: " in line and "malformed feed: not well-formed XML" in line
    assert "html: " in line and "malformed feed" in line
    assert "good: 2 new" in result.stdout  # the good feed still counts
    state = json.loads(cfg.feed_state_path.read_text())
    assert set(state["feeds"]) == {"good"}


def _rss_item(title: str, author: str, description: str, link: str) -> bytes:
    """One item, its fields written as given (entities and all)."""
    return (
        '<?xml version="1.0"?><rss version="2.0"><channel><title>T</title><item>'
        f"<title>{title}</title><author>{author}</author><description>{description}"
        f"</description><link>{link}</link></item></channel></rss>"
    ).encode()


@pytest.mark.server
def test_a_hostile_feed_cannot_write_to_the_terminal_or_stop_the_pull(
    server: LocalServer, tmp_path: Path
) -> None:
    """Well-formed XML can carry terminal escapes as escaped entities (&amp;#27;, which
    the item's HTML turns into ESC), and &#xD800; breaks feedparser's loose parser."""
    escape = "&amp;#27;]0;owned&amp;#7;&amp;#27;[2J"
    server.routes["/escapes.xml"] = Reply(
        body=_rss_item(
            f"Harbour {escape} news", f"Ann {escape}", f"About {escape} it", server.url("/a")
        ),
        headers={"Content-Type": "application/rss+xml"},
    )
    server.routes["/surrogate.xml"] = Reply(
        body=_rss_item("Bad &#xD800; title", "Ann", "x", server.url("/b")),
        headers={"Content-Type": "application/rss+xml"},
    )
    server.routes["/good.xml"] = Reply(
        body=rss_feed(_feed_items(server)), headers={"Content-Type": "application/rss+xml"}
    )
    cfg = make_workspace(tmp_path / "ws")
    feeds.add_feed(cfg, "escapes", server.url("/escapes.xml"))
    feeds.add_feed(cfg, "surrogate", server.url("/surrogate.xml"))
    feeds.add_feed(cfg, "good", server.url("/good.xml"))

    result = run(cfg, "feed", "pull")

    line = one_error_line(result)
    assert "1 of 3 feeds failed" in line and "surrogate: " in line and "malformed feed" in line
    assert "good: 2 new" in result.stdout and "escapes: 1 new" in result.stdout
    assert "Harbour ]0;owned [2J news" in result.stdout
    items = json.loads(cfg.feed_state_path.read_text(encoding="utf-8"))["items"]
    remembered = [str(value) for item in items.values() for value in item.values()]
    for text in (result.output, *remembered):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text), repr(text)


@pytest.mark.server
def test_pull_of_one_malformed_feed_via_cli(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/junk"] = Reply(
        body=b"not xml at all {}", headers={"Content-Type": "text/plain"}
    )
    cfg = make_workspace(tmp_path / "ws")
    feeds.add_feed(cfg, "junk", server.url("/junk"))
    before = snapshot(cfg.root / "issues")

    line = one_error_line(run(cfg, "feed", "pull", "junk"))

    assert "malformed feed" in line
    assert snapshot(cfg.root / "issues") == before


def test_unknown_feed_item(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    assert "no feed item 'feed:abcdef1'" in one_error_line(
        run(cfg, "issue", "add", "1", "feed:abcdef1")
    )


@pytest.mark.server
def test_atom_feed_items(server: LocalServer, tmp_path: Path) -> None:
    from tests.support.web_pages import atom_feed

    server.routes["/atom"] = Reply(
        body=atom_feed([("Number 4 tram", server.url("/tram"), "2024-11-02T07:15:00Z")]),
        headers={"Content-Type": "application/atom+xml"},
    )
    cfg = make_workspace(tmp_path / "ws")
    feeds.add_feed(cfg, "trams", server.url("/atom"))

    report = feeds.pull(cfg)

    (result,) = report.results
    (item,) = result.items
    assert (item.title, item.url, item.author) == (
        "Number 4 tram",
        server.url("/tram"),
        "Ruairi Kestle",
    )
    assert item.published is not None and item.published.isoformat() == "2024-11-02"
    assert feeds.find_item(cfg, item.id) == item
