"""`issue add` across source kinds: order, duplicates across issues, all-or-nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from newsletter import content
from newsletter.errors import ImportSourceError
from newsletter.importers import sources
from newsletter.importers.common import url_key
from tests.support.importers import make_workspace, one_error_line, run, snapshot
from tests.support.local_http import HTML, LocalServer, Reply, closed_port, serve
from tests.support.web_pages import blog_post, news_article

CANONICAL = "https://news.example.org/2025/03/harbour-ferry-timetable"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


def _markdown(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "note.md"
    path.write_text("---\ntitle: An Editor's Note\n---\nHello readers.\n", encoding="utf-8")
    return path


def _draft(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "piece.txt"
    path.write_text(
        "Quay Benches\n\nBy Ana Ruiz, Quay Post, 1/2/25\n\nSit down.\n", encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("https://example.org/a", "url"),
        ("HTTP://example.org/a", "url"),
        ("feed:abc1234", "feed"),
        ("notes/piece.md", "markdown"),
        ("notes/piece.txt", "draft"),
    ],
)
def test_source_kind(source: str, kind: str) -> None:
    assert sources.source_kind(source) == kind


@pytest.mark.parametrize(
    "source", ["file:///tmp/a.html", "ftp://example.org/a", "mailto:a@example.org"]
)
def test_other_schemes_are_refused(source: str) -> None:
    with pytest.raises(ImportSourceError, match="only http and https"):
        sources.source_kind(source)


def test_unknown_kind_of_file() -> None:
    with pytest.raises(ImportSourceError, match="cannot tell what kind"):
        sources.source_kind("photo.png")


def test_url_key_ignores_what_does_not_name_the_page() -> None:
    assert url_key("https://www.Example.org/a/?utm_source=x#top") == url_key("http://example.org/a")
    assert url_key("https://example.org/a?id=1") != url_key("https://example.org/a?id=2")


@pytest.mark.server
def test_mixed_sources_are_added_in_order(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/story"] = Reply(body=news_article().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")
    note, piece = _markdown(tmp_path / "in"), _draft(tmp_path / "in")

    result = run(cfg, "issue", "add", "1", str(note), server.url("/story"), str(piece))

    assert result.exit_code == 0, result.output
    issue = content.read_issue(content.find_issue(cfg.issues_dir, "1"))
    assert [a.path.name for a in issue.articles] == [
        "01-note.md",
        "02-harbour-towns-rethink-the-winter-ferry-timetable.md",
        "03-quay-benches.md",
    ]
    assert issue.articles[1].url == CANONICAL
    assert issue.articles[1].date == dt.date(2025, 3, 14)
    assert issue.articles[2].author == "Ana Ruiz"
    assert "Maren Holt, The Coastal Ledger, 2025-03-14" in result.stdout


@pytest.mark.server
def test_one_bad_source_means_nothing_is_written(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/story"] = Reply(body=news_article().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")
    note = _markdown(tmp_path / "in")
    before = snapshot(cfg.root)

    result = run(
        cfg,
        "issue",
        "add",
        "1",
        str(note),
        server.url("/story"),
        f"http://127.0.0.1:{closed_port()}/x",
    )

    assert "could not connect" in one_error_line(result)
    assert snapshot(cfg.root) == before


@pytest.mark.server
def test_url_used_in_an_earlier_issue_is_refused_then_forced(
    server: LocalServer, tmp_path: Path
) -> None:
    server.routes["/story"] = Reply(body=news_article().encode(), headers=HTML)
    server.routes["/amp/story"] = Reply(body=news_article().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")
    assert run(cfg, "issue", "add", "1", server.url("/story")).exit_code == 0
    content.new_issue(cfg.issues_dir, title="Second", date=dt.date(2026, 11, 27))
    before = snapshot(cfg.root)

    # A different address for the same page: the canonical URL gives it away.
    refused = run(cfg, "issue", "add", "2", server.url("/amp/story"))

    line = one_error_line(refused)
    assert f"{CANONICAL} was already in issue 1 (001-first)" in line
    assert "--force" in line
    assert snapshot(cfg.root) == before

    forced = run(cfg, "issue", "add", "2", "--force", server.url("/amp/story"))

    assert forced.exit_code == 0, forced.output
    assert "Warning:" in forced.stderr and "already in issue 1 (001-first)" in forced.stderr
    second = content.read_issue(content.find_issue(cfg.issues_dir, "2"))
    assert [a.url for a in second.articles] == [CANONICAL]


@pytest.mark.server
def test_same_article_twice_in_one_issue_names_the_source(
    server: LocalServer, tmp_path: Path
) -> None:
    server.routes["/story"] = Reply(body=news_article().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")
    url = server.url("/story")

    line = one_error_line(run(cfg, "issue", "add", "1", url, url))

    assert f"{url}: this article is already in the issue as '{url}'" in line


@pytest.mark.server
def test_excerpt_through_the_cli(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/post"] = Reply(body=blog_post().encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws")

    result = run(cfg, "issue", "add", "1", "--excerpt", "1", server.url("/post"))

    assert result.exit_code == 0, result.output
    (article,) = content.read_issue(content.find_issue(cfg.issues_dir, "1")).articles
    blocks = article.body.strip().split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith("Every Monday morning the number 4 tram")
    assert blocks[1] == f"[Read the full article →]({server.url('/post')})"


def test_excerpt_must_be_positive(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    result = run(cfg, "issue", "add", "1", "--excerpt", "0", "https://example.org/a")
    assert result.exit_code == 2  # a usage error, caught by click before anything runs
    assert "--excerpt" in result.output and "Traceback" not in result.output
