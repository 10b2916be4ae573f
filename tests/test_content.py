"""Articles and issues on disk: reading, front matter errors, numbering, order, lookups."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from newsletter import content
from newsletter.config import Config
from newsletter.content import Issue
from newsletter.errors import ContentError

EXAMPLE = "001-trams-ferries-benches"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(func: object, *args: object) -> str:
    with pytest.raises(ContentError) as info:
        func(*args)  # type: ignore[operator]
    text = str(info.value)
    assert "\n" not in text
    return text


@pytest.fixture
def example(cfg: Config) -> Issue:
    return content.read_issue(cfg.issues_dir / EXAMPLE)


@pytest.fixture
def empty_issue(cfg: Config) -> Issue:
    return content.new_issue(cfg.issues_dir, title="Second Thoughts", date=dt.date(2026, 11, 27))


# --- reading -------------------------------------------------------------------------------


def test_example_issue_has_five_articles_in_order(example: Issue) -> None:
    assert example.number == 1
    assert example.date == dt.date(2026, 11, 20)
    assert example.title == "Trams, Ferries and the Return of the Bench"
    assert example.preheader.startswith("A harbour tram opens early")
    assert example.intro.startswith("Welcome to the first issue")
    assert [a.path.name for a in example.articles] == [
        "01-harbour-tram-opens-early.md",
        "02-ferry-timetable-waterfront.md",
        "03-river-promenade-history.md",
        "04-library-square-remarks.md",
        "05-what-benches-tell-us.md",
    ]
    assert example.articles[1].title == "The Ferry Timetable That Rewired a Waterfront"
    assert example.slug == EXAMPLE


def test_example_bylines_fields(example: Issue) -> None:
    brief, ferry = example.articles[0], example.articles[1]
    assert (brief.author, brief.source, brief.date) == (
        "",
        "The Harbour Ledger",
        dt.date(2026, 11, 18),
    )
    assert (ferry.author, ferry.source, ferry.date) == (
        "Marguerite Ollerenshaw",
        "The Quayside Review",
        dt.date(2026, 11, 16),
    )
    assert ferry.image == "../images/ferry-quay.png"
    assert ferry.image_alt.startswith("A white passenger ferry")
    assert ferry.bio.startswith("Marguerite Ollerenshaw writes")
    assert ferry.word_count > 500
    # The body starts after the closing fence, and the line number says where.
    lines = ferry.path.read_text(encoding="utf-8").splitlines()
    assert lines[ferry.body_line - 1].startswith("Two years ago")


def test_article_with_only_a_title(tmp_path: Path) -> None:
    article = content.read_article(write(tmp_path / "a.md", "---\ntitle: Just This\n---\nHello.\n"))
    assert (article.title, article.author, article.date, article.body) == (
        "Just This",
        "",
        None,
        "Hello.\n",
    )


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "\ufeff---\ntitle: BOM\n---\nx\n".encode())
    assert content.read_article(path).title == "BOM"


# --- front matter errors -------------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "---\ntitle: Fine\nauthor: A: B\n---\nbody\n")
    text = error_of(content.read_article, path)
    assert text.startswith(f"{path}:3: malformed front matter")
    assert "; " in text  # what to do follows


def test_unclosed_front_matter(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "---\ntitle: Never closed\nbody\n")
    assert error_of(content.read_article, path).startswith(f"{path}:1: front matter is not closed")


def test_no_front_matter(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "# Just Markdown\n")
    assert error_of(content.read_article, path).startswith(f"{path}:1: no front matter")


@pytest.mark.parametrize("front", ["author: Someone\n", "title: ''\n", "title:\n", ""])
def test_missing_title(tmp_path: Path, front: str) -> None:
    path = write(tmp_path / "a.md", f"---\n{front}---\nbody\n")
    text = error_of(content.read_article, path)
    assert text.startswith(f"{path}:1: missing title")
    assert "title:" in text


def test_unknown_field_names_it_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "---\ntitle: T\nauthour: Typo\n---\nbody\n")
    text = error_of(content.read_article, path)
    assert text.startswith(f"{path}:3: unknown front matter field 'authour'")


def test_bad_date(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "---\ntitle: T\ndate: 15 March\n---\nbody\n")
    text = error_of(content.read_article, path)
    assert text.startswith(f"{path}:3: date '15 March' is not a date")


def test_image_without_alt_text_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", "---\ntitle: T\nimage: x.png\n---\nbody\n")
    assert error_of(content.read_article, path).startswith(f"{path}:3: image has no image_alt")


def test_non_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    path = write(tmp_path / "a.md", b"---\ntitle: T\n---\nline four\ncaf\xe9 au lait\n")
    text = error_of(content.read_article, path)
    assert text.startswith(f"{path}:5: not UTF-8 text")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.md"
    assert error_of(content.read_article, path).startswith(f"{path}: file not found")


# --- issues: numbering, add, remove, move --------------------------------------------------


def test_new_issue_takes_the_next_number(cfg: Config, empty_issue: Issue) -> None:
    assert empty_issue.number == 2
    assert empty_issue.path == cfg.issues_dir / "002-second-thoughts"
    assert empty_issue.articles == ()
    assert empty_issue.date == dt.date(2026, 11, 27)
    third = content.new_issue(cfg.issues_dir)
    assert (third.number, third.title, third.path.name) == (3, "Issue 3", "003-issue-3")
    assert [i.number for i in content.list_issues(cfg.issues_dir)] == [1, 2, 3]


def test_new_issue_in_an_empty_workspace_is_number_one(tmp_path: Path) -> None:
    issue = content.new_issue(tmp_path / "issues", title="Première: Édition!")
    assert issue.number == 1
    assert issue.path.name == "001-premiere-edition"


def test_add_copies_articles_and_their_images(example: Issue, empty_issue: Issue) -> None:
    sources = [example.articles[2].path, example.articles[1].path]
    added = content.add_articles(empty_issue.path, sources)
    assert [p.name for p in added] == [
        "01-river-promenade-history.md",
        "02-ferry-timetable-waterfront.md",
    ]
    issue = content.read_issue(empty_issue.path)
    assert [a.title for a in issue.articles] == [
        example.articles[2].title,
        example.articles[1].title,
    ]
    # The issue keeps its own copies, images included.
    assert (empty_issue.path / "images" / "ferry-quay.png").read_bytes() == (
        example.path / "images" / "ferry-quay.png"
    ).read_bytes()
    assert (empty_issue.path / "images" / "promenade-1894-map.png").is_file()
    content.require_buildable(issue)


def test_adding_the_same_article_twice_is_refused(example: Issue, empty_issue: Issue) -> None:
    source = example.articles[0].path
    content.add_articles(empty_issue.path, [source])
    before = (empty_issue.path / content.ISSUE_FILE).read_text(encoding="utf-8")
    text = error_of(content.add_articles, empty_issue.path, [source])
    assert text.startswith(f"{source}: this article is already in the issue as 01-")
    # Also within one call, and nothing is written when any source is refused.
    text = error_of(content.add_articles, empty_issue.path, [example.articles[3].path] * 2)
    assert "already in the issue" in text
    assert (empty_issue.path / content.ISSUE_FILE).read_text(encoding="utf-8") == before
    assert sorted(p.name for p in (empty_issue.path / "articles").iterdir()) == [
        "01-harbour-tram-opens-early.md"
    ]


def test_add_with_a_missing_image_names_file_and_line(tmp_path: Path, empty_issue: Issue) -> None:
    body_image = write(tmp_path / "b.md", "---\ntitle: B\n---\nOne.\n\n![A dog](dog.png)\n")
    text = error_of(content.add_articles, empty_issue.path, [body_image])
    assert text.startswith(f"{body_image}:6: image 'dog.png' not found")
    lead_image = write(
        tmp_path / "l.md", "---\ntitle: L\nauthor: A\nimage: gone.png\nimage_alt: Gone\n---\nx\n"
    )
    text = error_of(content.add_articles, empty_issue.path, [lead_image])
    assert text.startswith(f"{lead_image}:4: image 'gone.png' not found")
    assert not any((empty_issue.path / "articles").iterdir())


def test_missing_image_at_build_time(example: Issue) -> None:
    (example.path / "images" / "bench.png").unlink()
    issue = content.read_issue(example.path)
    text = error_of(content.require_buildable, issue)
    article = example.path / "articles" / "05-what-benches-tell-us.md"
    line = (
        article.read_text(encoding="utf-8")
        .splitlines()
        .index(
            next(x for x in article.read_text(encoding="utf-8").splitlines() if "bench.png" in x)
        )
    )
    assert text.startswith(f"{article}:{line + 1}: image '../images/bench.png' not found")


def test_issue_with_no_articles_cannot_be_built(empty_issue: Issue) -> None:
    text = error_of(content.require_buildable, empty_issue)
    assert text.startswith(f"{empty_issue.path / 'issue.md'}: the issue has no articles")
    assert "newsletter issue add 2" in text


def test_remove_and_move(example: Issue) -> None:
    folder = example.path
    assert content.remove_article(folder, "2") == "02-ferry-timetable-waterfront.md"
    # The file stays for the record; only the order changes.
    assert (folder / "articles" / "02-ferry-timetable-waterfront.md").is_file()
    order = content.move_article(folder, "what-benches-tell-us", 1)
    assert order == [
        "05-what-benches-tell-us.md",
        "01-harbour-tram-opens-early.md",
        "03-river-promenade-history.md",
        "04-library-square-remarks.md",
    ]
    issue = content.read_issue(folder)
    assert [a.path.name for a in issue.articles] == order
    # Front matter and intro survive the rewrite of issue.md.
    assert issue.preheader == example.preheader
    assert issue.intro == example.intro
    assert issue.date == example.date
    text = error_of(content.move_article, folder, "1", 9)
    assert "position 9 is out of range" in text and "use 1 to 4" in text
    assert "no article 'nope'" in error_of(content.remove_article, folder, "nope")


def test_remove_then_add_again_takes_a_fresh_file_name(example: Issue, empty_issue: Issue) -> None:
    source = example.articles[0].path
    names = []
    for _ in range(3):
        names.append(content.add_articles(empty_issue.path, [source])[0].name)
        content.remove_article(empty_issue.path, "1")
    assert names == [
        "01-harbour-tram-opens-early.md",
        "01-harbour-tram-opens-early-2.md",
        "01-harbour-tram-opens-early-3.md",
    ]


def test_issue_listing_an_article_twice_or_a_missing_one(example: Issue) -> None:
    issue_md = example.path / content.ISSUE_FILE
    text = issue_md.read_text(encoding="utf-8")
    issue_md.write_text(
        text.replace("  - 02-ferry", "  - 01-harbour-tram-opens-early.md\n  - 02-ferry"),
        encoding="utf-8",
    )
    assert error_of(content.read_issue, example.path).startswith(
        f"{issue_md}:8: article '01-harbour-tram-opens-early.md' is listed twice"
    )
    issue_md.write_text(text.replace("03-river", "03-rivers"), encoding="utf-8")
    assert error_of(content.read_issue, example.path).startswith(
        f"{issue_md}:9: article '03-rivers"
    )


# --- finding issues ------------------------------------------------------------------------


def test_find_issue_by_number_slug_or_path(cfg: Config, example: Issue, empty_issue: Issue) -> None:
    issues = cfg.issues_dir
    assert content.find_issue(issues, "1") == example.path
    assert content.find_issue(issues, "001") == example.path
    assert content.find_issue(issues, "2") == empty_issue.path
    assert content.find_issue(issues, EXAMPLE) == example.path
    assert content.find_issue(issues, str(example.path)) == example.path.resolve()


def test_find_unknown_issue(cfg: Config) -> None:
    text = error_of(content.find_issue, cfg.issues_dir, "42")
    assert text.startswith(f"{cfg.issues_dir}: no issue '42'")
    assert EXAMPLE in text
    assert "no issue 'nope'" in error_of(content.find_issue, cfg.issues_dir, "nope")


# --- subjects ------------------------------------------------------------------------------


def test_default_subject_joins_lead_titles_up_to_the_limit(example: Issue) -> None:
    titles = [a.title for a in example.articles]
    assert example.subject() == f"{titles[0]} | {titles[1]}"
    assert len(example.subject()) <= 100
    assert content.default_subject(titles, 60) == titles[0]
    assert content.default_subject(["A", "B", "C"], 100) == "A | B | C"
    assert content.default_subject(["A", "B", "C"], 5) == "A | B"


def test_default_subject_cuts_one_long_title_at_a_word() -> None:
    title = "An extraordinarily long headline about trams, ferries and benches in Port Alder"
    cut = content.default_subject([title], 40)
    assert len(cut) <= 40
    assert cut.endswith("…")
    assert title.startswith(cut[:-1])
    assert not cut[:-1].endswith(" ")


def test_explicit_subject_wins_and_empty_issue_falls_back_to_title(
    example: Issue, empty_issue: Issue
) -> None:
    issue_md = example.path / content.ISSUE_FILE
    issue_md.write_text(
        issue_md.read_text(encoding="utf-8").replace(
            "number: 1\n", "number: 1\nsubject: Hand-made\n"
        ),
        encoding="utf-8",
    )
    assert content.read_issue(example.path).subject() == "Hand-made"
    assert empty_issue.subject() == "Second Thoughts"


def test_a_line_break_in_a_title_or_subject_is_refused_at_its_line(tmp_path: Path) -> None:
    article = tmp_path / "a.md"
    article.write_text('---\nsource: X\ntitle: "Two\\nlines"\n---\nBody.\n', encoding="utf-8")
    with pytest.raises(ContentError) as caught:
        content.read_article(article)
    assert f"{article}:3" in str(caught.value) and "line break" in str(caught.value)


def test_an_impossible_date_is_one_error_at_its_line(tmp_path: Path) -> None:
    article = tmp_path / "a.md"
    article.write_text("---\ntitle: T\nsource: S\ndate: 2026-02-30\n---\nBody.\n", encoding="utf-8")
    with pytest.raises(ContentError) as caught:
        content.read_article(article)
    assert str(caught.value).startswith(f"{article}:4: impossible date")


def test_an_image_path_that_would_leave_the_issue_is_refused(tmp_path: Path, cfg: Config) -> None:
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    article = tmp_path / "deep" / "er" / "a.md"
    article.write_text(
        "---\ntitle: Far away\nimage: ../../pic.png\nimage_alt: A picture\n---\nBody.\n",
        encoding="utf-8",
    )
    folder = content.find_issue(cfg.issues_dir, "1")
    before = (folder / "issue.md").read_text(encoding="utf-8")
    with pytest.raises(ContentError) as caught:
        content.add_articles(folder, [article])
    assert str(caught.value).startswith(f"{article}:3: image '../../pic.png' would land outside")
    assert (folder / "issue.md").read_text(encoding="utf-8") == before


def test_two_issues_with_one_number_are_an_error_not_a_guess(cfg: Config) -> None:
    first = content.find_issue(cfg.issues_dir, "1")
    twin = cfg.issues_dir / "001-twin"
    twin.mkdir()
    (twin / "issue.md").write_text(
        (first / "issue.md").read_text(encoding="utf-8"), encoding="utf-8"
    )
    with pytest.raises(ContentError, match="2 issues have number 1"):
        content.find_issue(cfg.issues_dir, "1")
    assert content.find_issue(cfg.issues_dir, "001-twin") == twin


def test_a_file_that_is_not_an_image_is_refused(tmp_path: Path, cfg: Config) -> None:
    (tmp_path / "fake.png").write_text("just text", encoding="utf-8")
    article = tmp_path / "a.md"
    article.write_text(
        '---\ntitle: Fake\nsource: S\n---\nSee ![a fake](fake.png "Caption").\n', encoding="utf-8"
    )
    folder = content.find_issue(cfg.issues_dir, "1")
    with pytest.raises(ContentError) as caught:
        content.add_articles(folder, [article])
    assert str(caught.value).startswith(f"{article}:5: 'fake.png' is not a PNG, JPEG, GIF or WebP")
