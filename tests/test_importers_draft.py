"""Plain-text drafts and digests: bylines, Markdown, images, encodings, the split."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from newsletter import content, render
from newsletter.errors import ImportSourceError
from newsletter.importers import draft
from tests.support import REPO
from tests.support.importers import make_workspace, one_error_line, run, snapshot

PNG = (REPO / "examples" / "1.png").read_bytes()

# A digest in the sample's shape, written for these tests.
DIGEST = """\
Ferries Find Their Rhythm | Tide Clocks Return to the Quay

The Harbour Ledger, 3/14/25

  1. Northby's harbour board agreed a winter ferry timetable on Monday, with crossings \
every twenty minutes.
  2. The quay's tide clock, stopped since a storm in 2019, was restarted by volunteers on Wednesday.
  3. A pilot scheme will test bicycle racks on two of the ferries from April.

***

Tide Clocks Return to the Quay

By Mara Lindqvist, Tideline Weekly, March 15, 2025

For six years the tide clock on the north quay said it was always a quarter past high water.

image 7.png

The volunteers who fixed it met every Thursday evening in the chandler's back room.

“A clock that is wrong twice a day is still a clock. One that is wrong all day is a sculpture.”

“We did it for the fishermen,” said one volunteer. “They still look at it out of habit.”

Mara Lindqvist writes about harbours for Tideline Weekly and keeps a tide table on her fridge.

What the Ferry Crews Say

Audio version linked from the site.

Port Gazette, 2/9/25

THE CREWS SPEAK

2016. That was the last year the crews were asked, and the answers were much the same.

Crew members said the *new* timetable is easier <b>to keep</b>, because it repeats.

Pier Notes: Benches and Bollards

By Ana de la Cruz, Quay Post, 11/2/24

Bollards make poor benches, but people sit on them anyway.

Weekly notes on harbours
"""


def _write(folder: Path, name: str, text: str, *, images: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        (folder / image).write_bytes(PNG)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "author", "source", "date"),
    [
        ("By Jeff Doe, Substack, 3/15/25", "Jeff Doe", "Substack", dt.date(2025, 3, 15)),
        (
            "By Sigrun Talvik, Nordic Streets Journal, November 12, 2026",
            "Sigrun Talvik",
            "Nordic Streets Journal",
            dt.date(2026, 11, 12),
        ),
        ("RT, 3/13/25", "", "RT", dt.date(2025, 3, 13)),
        ("Consortium News, 2/25/2025", "", "Consortium News", dt.date(2025, 2, 25)),
        (
            "By Ana de la Cruz, Quay Post, Sept. 5, 2024",
            "Ana de la Cruz",
            "Quay Post",
            dt.date(2024, 9, 5),
        ),
        ("By Jo Bloggs", "Jo Bloggs", "", None),
    ],
)
def test_bylines(line: str, author: str, source: str, date: dt.date | None) -> None:
    byline = draft.parse_byline(draft.Block(1, (line,)))
    assert byline is not None
    assert (byline.author, byline.source, byline.date) == (author, source, date)


@pytest.mark.parametrize(
    "line",
    [
        "By the end of the month, prices rose 4 percent",
        "Moscow said on Monday that it would not comment, 3/13/25 notwithstanding.",
        "Just a paragraph of ordinary prose.",
        "By Jane Doe, Paper, 3/14/25\nsecond line",
    ],
)
def test_not_bylines(line: str) -> None:
    assert draft.parse_byline(draft.Block(1, tuple(line.splitlines()))) is None


def test_digest_splits_into_articles_with_bylines(tmp_path: Path) -> None:
    path = _write(tmp_path, "digest.txt", DIGEST, images=("7.png",))

    digest = draft.split_digest(path, tagline="")

    assert digest.subject == "Ferries Find Their Rhythm | Tide Clocks Return to the Quay"
    assert digest.tagline == "Weekly notes on harbours"
    got = [(a.title, a.author, a.source, a.date) for a in digest.articles]
    assert got == [
        ("Ferries Find Their Rhythm", "", "The Harbour Ledger", dt.date(2025, 3, 14)),
        (
            "Tide Clocks Return to the Quay",
            "Mara Lindqvist",
            "Tideline Weekly",
            dt.date(2025, 3, 15),
        ),
        ("What the Ferry Crews Say", "", "Port Gazette", dt.date(2025, 2, 9)),
        ("Pier Notes: Benches and Bollards", "Ana de la Cruz", "Quay Post", dt.date(2024, 11, 2)),
    ]
    roundup, clocks, crews, pier = digest.articles
    assert roundup.body.startswith("1. Northby's harbour board")
    assert "\n2. The quay's tide clock" in roundup.body and "\n3. A pilot scheme" in roundup.body
    assert "***" not in roundup.body
    assert "![](../images/7.png)" in clocks.body
    assert clocks.images == ((tmp_path / "7.png", "7.png"),)
    assert "> A clock that is wrong twice a day is still a clock." in clocks.body
    assert "\n“We did it for the fishermen,” said" in clocks.body  # not wholly a quote
    assert clocks.bio.startswith("Mara Lindqvist writes about harbours")
    assert "keeps a tide table" not in clocks.body
    assert crews.body.startswith("Audio version linked from the site.")
    assert "### THE CREWS SPEAK" in crews.body
    assert "2016\\. That was the last year" in crews.body  # prose, not a list
    assert "\\*new\\*" in crews.body and "\\<b>" in crews.body
    assert "Weekly notes on harbours" not in pier.body
    assert [a.word_count for a in digest.articles] == [len(a.body.split()) for a in digest.articles]


def test_example_digest_from_the_repo(tmp_path: Path) -> None:
    example = REPO / "examples" / "digest.txt"
    if not example.is_file():  # pragma: no cover - the example ships with the repo
        pytest.fail("examples/digest.txt is missing")
    digest = draft.split_digest(example, tagline="")

    assert len(digest.articles) == 3
    assert digest.subject.endswith("| Varnholm Opens Its First Winter Cycle Hub")
    assert digest.articles[1].title == "Varnholm Opens Its First Winter Cycle Hub"
    assert digest.articles[1].author == "Sigrun Talvik"
    assert digest.articles[1].date == dt.date(2026, 11, 12)
    assert digest.articles[2].source == "The Quayside Review"
    assert digest.tagline == "Weekly Notes on Cities, Transit & Public Spaces"


def test_single_draft_with_and_without_byline(tmp_path: Path) -> None:
    with_byline = _write(
        tmp_path,
        "a.txt",
        "Night Buses Matter\nBy Oren Hall, The Commute, 11/4/26\n\nFirst paragraph here.\n",
    )
    article = draft.parse_draft(with_byline)
    assert (article.title, article.author, article.source) == (
        "Night Buses Matter",
        "Oren Hall",
        "The Commute",
    )
    assert article.body == "First paragraph here.\n"

    without = _write(tmp_path, "b.txt", "Night Buses Matter\n\nFirst paragraph here.\n")
    article = draft.parse_draft(without)
    assert article.title == "Night Buses Matter"
    assert {"author", "source", "date"} <= set(article.missing())
    assert any("no byline" in note for note in article.notes)


def test_missing_image_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "d.txt", "Title\n\nBy A Writer, Paper, 1/2/25\n\nText.\n\nimage 9.png\n"
    )
    with pytest.raises(ImportSourceError) as caught:
        draft.parse_draft(path)
    assert caught.value.where == f"{path}:7"
    assert "image '9.png' not found" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("Title\n\nCafé “quoted” text.\n".encode("utf-8-sig"), "UTF-8"),
        ("Title\n\nCafé “quoted” text.\n".encode("utf-16"), "UTF-16"),
        ("Title\n\nCafé “quoted” text.\n".encode("cp1252"), "Windows-1252"),
    ],
)
def test_encodings_that_are_read(tmp_path: Path, data: bytes, encoding: str) -> None:
    path = tmp_path / "enc.txt"
    path.write_bytes(data)
    article = draft.parse_draft(path)
    assert article.body == "Café “quoted” text.\n"
    assert any(encoding in note for note in article.notes) == (encoding != "UTF-8")


@pytest.mark.parametrize(
    "data",
    [
        "Заголовок\n\nТекст статьи о гавани и паромах.\n".encode("koi8_r"),
        "見出し\n\n港とフェリーの記事です。\n".encode("shift_jis"),
        b"Title\n\n\x00\x01\x02binary\xff\xfe",
    ],
)
def test_unknown_encoding_is_one_clear_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(ImportSourceError, match=r"encoding|not a text file") as caught:
        draft.parse_draft(path)
    assert str(caught.value.where).startswith(f"{path}:")


# --- through the CLI -----------------------------------------------------------------------


def test_import_digest_cli_creates_an_issue_that_builds(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    path = _write(tmp_path / "in", "digest.txt", DIGEST, images=("7.png",))

    result = run(cfg, "issue", "import-digest", str(path), "--title", "Quay Week")

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Created issue 2: Quay Week" in out
    assert "Subject: Ferries Find Their Rhythm | Tide Clocks Return to the Quay" in out
    assert "Tagline: Weekly notes on harbours (not an article)" in out
    assert "2. Tide Clocks Return to the Quay  [" in out
    assert "Mara Lindqvist, Tideline Weekly, 2025-03-15" in out
    assert "Port Gazette, 2025-02-09" in out
    issue = content.read_issue(content.find_issue(cfg.issues_dir, "2"))
    assert issue.explicit_subject == "Ferries Find Their Rhythm | Tide Clocks Return to the Quay"
    assert [a.title for a in issue.articles][1:] == [
        "Tide Clocks Return to the Quay",
        "What the Ferry Crews Say",
        "Pier Notes: Benches and Bollards",
    ]
    assert (issue.path / "images" / "7.png").read_bytes() == PNG
    content.require_buildable(issue)  # every image it references is there
    rendered = render.render_issue(issue, cfg)
    assert "Tide Clocks Return to the Quay" in rendered.html
    assert "A clock that is wrong twice a day" in rendered.html


def test_import_digest_with_a_missing_image_leaves_no_issue(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    path = _write(tmp_path / "in", "digest.txt", DIGEST)  # 7.png not provided
    before = snapshot(cfg.root)

    line = one_error_line(run(cfg, "issue", "import-digest", str(path)))

    assert f"{path}:17: image '7.png' not found" in line
    assert snapshot(cfg.root) == before


def test_issue_add_draft_in_unknown_encoding_fails_cleanly(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    path = tmp_path / "koi8.txt"
    path.write_bytes("Заголовок\n\nТекст статьи.\n".encode("koi8_r"))
    before = snapshot(cfg.root)

    line = one_error_line(run(cfg, "issue", "add", "1", str(path)))

    assert "unknown text encoding" in line and f"{path}:1" in line
    assert snapshot(cfg.root) == before


def test_issue_add_draft_copies_images_and_renames_clashes(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    first = _write(
        tmp_path / "a", "a.txt", "First Piece\n\nText one.\n\nimage 1.png\n", images=("1.png",)
    )
    second_dir = tmp_path / "b"
    second = _write(second_dir, "b.txt", "Second Piece\n\nText two.\n\nimage 1.png\n")
    (second_dir / "1.png").write_bytes(PNG + b"different")

    result = run(cfg, "issue", "add", "1", str(first), str(second))

    assert result.exit_code == 0, result.output
    folder = content.find_issue(cfg.issues_dir, "1")
    issue = content.read_issue(folder)
    assert [a.title for a in issue.articles] == ["First Piece", "Second Piece"]
    assert "![](../images/1.png)" in issue.articles[0].body
    assert "![](../images/1-2.png)" in issue.articles[1].body
    assert (folder / "images" / "1.png").read_bytes() == PNG
    assert (folder / "images" / "1-2.png").read_bytes() == PNG + b"different"
    assert "no byline" in result.stdout


def test_examples_draft_imports(tmp_path: Path) -> None:
    cfg = make_workspace(tmp_path / "ws")
    source = tmp_path / "draft"
    shutil.copytree(REPO / "examples", source)

    result = run(cfg, "issue", "add", "1", str(source / "draft.txt"))

    assert result.exit_code == 0, result.output
    article = content.read_issue(content.find_issue(cfg.issues_dir, "1")).articles[0]
    assert article.title == "The Night Bus Is the Quiet Backbone of a City"
    assert (article.author, article.source, article.date) == (
        "Oren Halloway",
        "The Civic Commute",
        dt.date(2026, 11, 4),
    )


@pytest.mark.parametrize(
    "text",
    [
        "Le maire a présenté à l'équipe réunie le nouveau tracé du tramway, très apprécié.",
        "Die Fähre fährt künftig öfter über den Fluss, sagte der Bürgermeister am Dienstag.",
    ],
)
def test_western_text_in_cp1252_is_read(text: str) -> None:
    assert draft.decode(text.encode("cp1252"), "x.txt") == (text, "Windows-1252")


@pytest.mark.parametrize(
    ("codec", "text"),
    [
        ("cp1251", "Паром ходит чаще по новому расписанию"),
        ("iso8859_7", "Το πλοίο θα εκτελεί περισσότερα δρομολόγια"),
    ],
)
def test_other_scripts_are_not_guessed_as_cp1252(codec: str, text: str) -> None:
    with pytest.raises(ImportSourceError, match="unknown text encoding"):
        draft.decode(text.encode(codec), "x.txt")


def test_a_draft_gives_each_image_its_alt_text_on_its_own_line(tmp_path: Path) -> None:
    """`image N.png: what it shows` sets the alt text in the draft; `""` marks decoration;
    an image without either is imported with a note, and a real send refuses it."""
    from newsletter import render

    cfg = make_workspace(tmp_path / "ws")
    draft = _write(
        tmp_path / "d",
        "d.txt",
        "Clock Piece\n\nText one.\n\nimage 1.png: The tide clock [restored] at noon\n\n"
        'image 2.png: ""\n\nimage 3.png\n',
        images=("1.png", "2.png", "3.png"),
    )
    result = run(cfg, "issue", "add", "1", str(draft))
    assert result.exit_code == 0, result.output
    issue = content.read_issue(content.find_issue(cfg.issues_dir, "1"))
    body = issue.articles[0].body
    assert r"![The tide clock \[restored\] at noon](../images/1.png)" in body
    assert '![""](../images/2.png)' in body and "![](../images/3.png)" in body
    notes = [line for line in result.stdout.splitlines() if "has no description" in line]
    assert len(notes) == 1 and "image 3.png" in notes[0]
    assert '"image 3.png: what it shows"' in notes[0]
    rendered = render.render_issue(issue, cfg)
    assert [m.rsplit(": ", 1)[1] for m in rendered.missing_alt] == ["image '../images/3.png'"]
    assert 'alt="The tide clock [restored] at noon"' in rendered.html
