"""Plain-text drafts and whole digests to articles.

A draft is shaped like the digests editors paste together from many sites::

    Title of the piece
                                         (blank lines separate everything)
    By Jane Doe, The Source, 3/14/25     (or "..., March 14, 2025", or "Source, 3/14/25")

    A paragraph.

      1. A numbered point.
      2. Another one.

    “A paragraph wholly in quotes becomes a block quote.”

    image 14.png                         (a file beside the draft)

A digest is many of these in a row: an optional first line with the lead
headlines joined by " | " (the subject), articles found by their title-and-byline
pairs, ``***`` separators, and a closing tagline line.

Encoding: UTF-8 (with or without a BOM), UTF-16 with a BOM, or else Windows-1252
when it decodes cleanly and reads like Western text (no control characters, at
most a quarter of the letters non-ASCII: Cyrillic or Greek read as cp1252 is
nearly all accented letters). Anything else is refused with one error naming the
first bad line, rather than guessed and imported as mojibake.
"""

from __future__ import annotations

import codecs
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..content import SUBJECT_SEPARATOR
from ..errors import ImportSourceError
from .common import ImportedArticle

_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ),
        start=1,
    )
    for name in names
}
_DATE = r"(?P<date>\d{1,2}/\d{1,2}/(?:\d{4}|\d{2})|[A-Za-z]{3,9}\.?\s+\d{1,2},?\s+\d{4})"
_BYLINE_BY = re.compile(rf"^By\s+(?P<rest>.+?)(?:,\s*{_DATE})?\s*$", re.I)
_BYLINE_SOURCE = re.compile(rf"^(?P<rest>[^,!?;:]{{1,80}}?),\s*{_DATE}\s*$")
# "image 14.png", or with its alt text: "image 14.png: A ferry at dusk" ("" for decoration).
_IMAGE = re.compile(
    r"^image[:\s]\s*(?P<name>[^\s/\\][^/\\]*?\.(?:png|jpe?g|gif|webp|svg))"
    r"(?:\s*[:|\u2013\u2014-]\s*(?P<alt>\S.*))?$",
    re.I,
)
_NUMBERED = re.compile(r"^\s*(?P<n>\d{1,3})[.)]\s+(?P<text>\S.*)$")
_BULLET = re.compile(r"^\s*[•\-*–]\s+(?P<text>\S.*)$")  # noqa: RUF001 (en dash bullets)
_SEPARATOR = re.compile(r"^\s*(?:\*\s*){3,}$|^\s*(?:-\s*){3,}$|^\s*(?:_\s*){3,}$")
_QUOTES = {"“": "”", '"': '"', "„": "“", "«": "»"}
MAX_TITLE = 200


@dataclass(frozen=True)
class Block:
    """Lines between blank lines, with the 1-based line number of the first one."""

    line: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines)

    @property
    def single(self) -> bool:
        return len(self.lines) == 1


@dataclass(frozen=True)
class Byline:
    author: str
    source: str
    date: dt.date | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Digest:
    """A digest split into articles, plus what was around them."""

    path: Path
    subject: str
    tagline: str
    intro: str
    articles: tuple[ImportedArticle, ...]
    notes: tuple[str, ...] = field(default=())


# --- reading ------------------------------------------------------------------------------


def decode(data: bytes, where: str) -> tuple[str, str]:
    """Bytes to text and the name of the encoding used, or one clear error."""
    if data.startswith(codecs.BOM_UTF8):
        return _decode_strict(data, "utf-8-sig", where), "UTF-8"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decode_strict(data, "utf-16", where), "UTF-16"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
    else:
        _check_controls(text, where)
        return text, "UTF-8"
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        text = ""
    letters = [c for c in text if c.isalpha()]
    foreign = sum(1 for c in letters if ord(c) > 0x7F)
    # Western text has a few accented letters; other scripts read as cp1252 are mostly them.
    if text and not _has_controls(text) and foreign <= max(3, len(letters) // 4):
        return text, "Windows-1252"
    raise ImportSourceError(
        "unknown text encoding (not UTF-8, UTF-16 or Windows-1252)",
        where=f"{where}:{bad_line}",
        hint="save the file as UTF-8 and try again",
    )


def _decode_strict(data: bytes, codec: str, where: str) -> str:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ImportSourceError(
            f"the file starts like {codec.upper()} but does not decode as it",
            where=f"{where}:{line}",
            hint="save the file as UTF-8 and try again",
        ) from None
    _check_controls(text.removeprefix("\ufeff"), where)
    return text.removeprefix("\ufeff")


def _has_controls(text: str) -> bool:
    return any(ord(c) < 32 and c not in "\t\n\r\f\v" for c in text)


def _check_controls(text: str, where: str) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        if _has_controls(line):
            raise ImportSourceError(
                "this is not a text file (it has control characters)",
                where=f"{where}:{number}",
                hint="give a plain-text .txt draft saved as UTF-8",
            )


def read_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The draft's blocks of non-blank lines, tidied, and notes about how it was read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImportSourceError("file not found", where=str(path), hint="check the path") from None
    except IsADirectoryError:
        raise ImportSourceError("is a folder, not a file", where=str(path)) from None
    text, encoding = decode(data, str(path))
    notes = [] if encoding == "UTF-8" else [f"read as {encoding}; save drafts as UTF-8"]
    blocks: list[Block] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        # Non-breaking spaces are left over from pasted links: plain spaces read the same.
        line = raw.replace("\u00a0", " ").replace("\u200b", "").rstrip()
        if not line.strip():
            if current:
                blocks.append(Block(start, tuple(current)))
                current = []
            continue
        if not current:
            start = number
        current.append(line)
    if current:
        blocks.append(Block(start, tuple(current)))
    return blocks, notes


# --- bylines ------------------------------------------------------------------------------


def parse_date(text: str) -> dt.date | None:
    """'3/14/25', '3/14/2025', 'March 14, 2025' or 'Sept. 5, 2024' as a date (US order)."""
    text = text.strip()
    numeric = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})", text)
    try:
        if numeric:
            month, day, year = (int(g) for g in numeric.groups())
            if year < 100:
                year += 2000 if year <= dt.date.today().year % 100 + 1 else 1900
            return dt.date(year, month, day)
        named = re.fullmatch(r"([A-Za-z]{3,9})\.?\s+(\d{1,2}),?\s+(\d{4})", text)
        if named and named.group(1).lower() in _MONTHS:
            return dt.date(
                int(named.group(3)), _MONTHS[named.group(1).lower()], int(named.group(2))
            )
    except ValueError:
        return None
    return None


def parse_byline(block: Block) -> Byline | None:
    """A byline block, or None when the block is not one."""
    text = block.text
    if not block.single or len(text) > 160 or text.endswith((".", "!", "?", ":", ";")):
        return None
    match = _BYLINE_BY.match(text)
    if match:
        date_text = match.group("date")
        parts = [p.strip() for p in match.group("rest").split(",") if p.strip()]
        if not parts or not _looks_like_name(parts[0]):
            return None
        date = parse_date(date_text) if date_text else None
        notes = (f"date '{date_text}' is not a real date",) if date_text and not date else ()
        return Byline(parts[0], ", ".join(parts[1:]), date, notes)
    match = _BYLINE_SOURCE.match(text)
    if match and len(match.group("rest").split()) <= 8:
        date = parse_date(match.group("date"))
        if date is None:
            return None
        return Byline("", match.group("rest").strip(), date)
    return None


_PARTICLES = {"de", "da", "del", "der", "van", "von", "la", "le", "du", "bin", "al", "and", "&"}


def _looks_like_name(text: str) -> bool:
    """'Jane Doe', 'Ana de la Cruz', 'Staff and agencies': capitalised, at most six words."""
    words = text.split()
    if not words or len(words) > 6 or not text[0].isupper():
        return False
    capitalised = sum(1 for w in words if w[0].isupper() or w.lower() in _PARTICLES)
    return capitalised == len(words)


# --- Markdown -----------------------------------------------------------------------------


def _escape(text: str) -> str:
    """Escape what Markdown would misread in plain prose, and nothing more."""
    text = text.replace("\\", "\\\\").replace("`", "\\`")
    text = text.replace("*", "\\*")
    text = re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", text)
    text = re.sub(r"<(?=[A-Za-z/!?])", r"\\<", text)
    text = re.sub(r"\[([^\]]*)\](?=[(\[:])", r"\\[\1\\]", text)
    text = re.sub(r"&(?=#?\w+;)", "&amp;", text)
    # A paragraph that starts like block syntax (heading, quote, list, rule) stays prose.
    text = re.sub(r"^(\s*)([#>]|[-+](?=\s))", r"\1\\\2", text)
    text = re.sub(r"^(\s*\d{1,9})([.)])(?=\s|$)", r"\1\\\2", text)
    return text


def _wholly_quoted(text: str) -> str | None:
    """The inside of a paragraph that is one quotation from start to end, else None."""
    if len(text) < 3:
        return None
    close = _QUOTES.get(text[0])
    if close is None:
        return None
    stripped = text.rstrip(".")
    if not stripped.endswith(close):
        return None
    inner = stripped[1:-1]
    if close in inner or (close != text[0] and text[0] in inner):
        return None
    return inner.strip()


def _is_heading(block: Block) -> bool:
    text = block.text
    letters = [c for c in text if c.isalpha()]
    return (
        block.single
        and len(text.split()) <= 10
        and len(letters) >= 3
        and all(c.isupper() for c in letters)
        and not text.endswith((".", ","))
    )


def block_markdown(
    block: Block, draft: Path, images: list[tuple[Path, str]], notes: list[str]
) -> str:
    """One block of a draft as Markdown; image lines are checked and collected."""
    where = f"{draft}:{block.line}"
    image = _IMAGE.match(block.text) if block.single else None
    if image:
        name = image.group("name").strip()
        file = draft.parent / name
        if not file.is_file():
            raise ImportSourceError(
                f"image '{name}' not found beside the draft",
                where=where,
                hint=f"put {name} in {draft.parent} or remove the line",
            )
        images.append((file, name))
        alt = (image.group("alt") or "").strip()
        if not alt:
            notes.append(
                f"{where}: image {name} has no description (send refuses it): write "
                f'"image {name}: what it shows" in the draft, or fill in ![...]'
            )
        elif alt not in ('""', "''"):
            alt = re.sub(r"([\\\[\]])", r"\\\1", alt)
        return f"![{alt}](../images/{_url_path(name)})"
    first = _NUMBERED.match(block.lines[0])
    if first and (
        block.lines[0][:1].isspace()
        or first.group("n") == "1"
        or sum(1 for line in block.lines if _NUMBERED.match(line)) > 1
    ):
        return _list(block, _NUMBERED, ordered=True)
    if _BULLET.match(block.lines[0]) and len(block.lines) > 1:
        return _list(block, _BULLET, ordered=False)
    if _is_heading(block):
        return f"### {_escape(block.text)}"
    inner = _wholly_quoted(block.text)
    if inner is not None:
        return f"> {_escape(inner)}"
    return _escape(block.text)


def _url_path(name: str) -> str:
    return name.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


def _list(block: Block, pattern: re.Pattern[str], *, ordered: bool) -> str:
    items: list[str] = []
    for line in block.lines:
        match = pattern.match(line)
        if match:
            items.append(match.group("text").strip())
        elif items:
            items[-1] = f"{items[-1]} {line.strip()}"
    if ordered:
        first = _NUMBERED.match(block.lines[0])
        start = int(first.group("n")) if first else 1
        return "\n".join(f"{start + i}. {_escape(t)}" for i, t in enumerate(items))
    return "\n".join(f"- {_escape(t)}" for t in items)


# --- one draft ----------------------------------------------------------------------------


def _title_like(block: Block) -> bool:
    text = block.text
    return (
        block.single
        and 0 < len(text) <= MAX_TITLE
        and not text.endswith((".", ",", ";", ":"))
        and not _IMAGE.match(text)
        and not _SEPARATOR.match(text)
        and parse_byline(block) is None
    )


def build_article(
    origin: str,
    draft: Path,
    title: str,
    byline: Byline | None,
    body: Sequence[Block],
    notes: list[str],
    *,
    title_line: int = 1,
) -> ImportedArticle:
    """An article from its title, byline and body blocks (shared by drafts and digests)."""
    images: list[tuple[Path, str]] = []
    paragraphs = [
        block_markdown(block, draft, images, notes)
        for block in body
        if not _SEPARATOR.match(block.text)
    ]
    bio = ""
    author = byline.author if byline else ""
    if author and len(paragraphs) > 1:
        last = paragraphs[-1]
        if last.startswith(author + " ") and len(last.split()) <= 150:
            bio = paragraphs.pop()
            notes.append(f"{draft}: the last paragraph, about {author}, became the bio")
    if byline is None:
        notes.append(
            f"{draft}:{title_line + 1}: no byline after the title "
            "(expected 'By NAME, SOURCE, M/D/YY' or 'SOURCE, M/D/YY')"
        )
    else:
        notes.extend(f"{draft}: {note}" for note in byline.notes)
    if not paragraphs:
        raise ImportSourceError(
            f"the article '{title}' has no text",
            where=f"{draft}:{title_line}",
            hint="add paragraphs after the title and byline",
        )
    return ImportedArticle(
        origin=origin,
        title=title,
        body="\n\n".join(paragraphs) + "\n",
        author=author,
        source=byline.source if byline else "",
        date=byline.date if byline else None,
        bio=bio,
        images=tuple(images),
        notes=tuple(notes),
    )


def parse_draft(path: Path) -> ImportedArticle:
    """A single-article .txt draft: title, byline (optional), body."""
    blocks, notes = read_blocks(path)
    blocks = [b for b in blocks if not _SEPARATOR.match(b.text)]
    if not blocks:
        raise ImportSourceError("the draft is empty", where=str(path), hint="write a title first")
    head = blocks[0]
    if len(head.lines) > 1 and parse_byline(Block(head.line + 1, head.lines[1:2])):
        # Title and byline on consecutive lines, without a blank line between.
        second = Block(head.line + 1, head.lines[1:2])
        rest_lines = head.lines[2:]
        head = Block(head.line, head.lines[:1])
        extra = [Block(second.line + 1, rest_lines)] if rest_lines else []
        blocks = [head, second, *extra, *blocks[1:]]
    if not head.single or len(head.text) > MAX_TITLE:
        raise ImportSourceError(
            "the first line should be the title, on its own line",
            where=f"{path}:{head.line}",
            hint="put the title first, then a blank line",
        )
    rest = blocks[1:]
    byline: Byline | None = None
    lead: list[Block] = []
    # The byline is the next block, or the one after a short note ("Video link ...").
    for skip in (0, 1):
        if len(rest) > skip and (found := parse_byline(rest[skip])):
            byline, lead, rest = found, rest[:skip], rest[skip + 1 :]
            break
    bylines = [b.line for b in rest if parse_byline(b) and _preceded_by_title(rest, b)]
    if bylines:
        notes.append(
            f"{path}:{bylines[0]}: another byline: is this a whole digest? "
            "`newsletter issue import-digest` splits those"
        )
    return build_article(
        str(path), path, head.text, byline, [*lead, *rest], notes, title_line=head.line
    )


def _preceded_by_title(blocks: Sequence[Block], block: Block) -> bool:
    index = blocks.index(block)
    return index > 0 and _title_like(blocks[index - 1])


# --- a whole digest -----------------------------------------------------------------------


def split_digest(path: Path, *, tagline: str = "") -> Digest:
    """Split a digest into articles at each title-and-byline pair, in order.

    ``tagline`` is the newsletter's configured tagline; the digest's last line is
    taken as its tagline when it matches, or when it looks like one (short, no
    full stop) and is not part of an article's text.
    """
    blocks, notes = read_blocks(path)
    blocks = [b for b in blocks if not _SEPARATOR.match(b.text)]
    if not blocks:
        raise ImportSourceError("the digest is empty", where=str(path), hint="check the file")
    subject = ""
    first_title = ""
    if blocks[0].single and SUBJECT_SEPARATOR in blocks[0].text:
        subject = blocks[0].text
        first_title = subject.split(SUBJECT_SEPARATOR)[0].strip()
    found_tagline = ""
    last = blocks[-1]
    if len(blocks) > 2 and parse_byline(last) is None and _looks_like_tagline(last, tagline):
        found_tagline = last.text
        blocks = blocks[:-1]
    # Each byline, and where its title is.
    pairs: list[tuple[int, int]] = []  # (title index, byline index)
    floor = 1 if subject else 0
    for index, block in enumerate(blocks):
        if index < 1 or parse_byline(block) is None:
            continue
        title_index = _find_title(blocks, index, floor)
        if title_index is None and subject and index == 1:
            title_index = 0  # the subject line doubles as the first article's title
        if title_index is None:
            notes.append(
                f"{path}:{block.line}: a byline with no title line above it; left in the text"
            )
            continue
        pairs.append((title_index, index))
        floor = index + 1
    if not pairs:
        raise ImportSourceError(
            "no articles found: each needs a title line, then a byline",
            where=str(path),
            hint="write bylines as 'By NAME, SOURCE, M/D/YY' or 'SOURCE, M/D/YY'",
        )
    start_intro = 1 if subject else 0
    intro_blocks = blocks[start_intro : pairs[0][0]]
    articles: list[ImportedArticle] = []
    for number, (title_index, byline_index) in enumerate(pairs):
        end = pairs[number + 1][0] if number + 1 < len(pairs) else len(blocks)
        title_block = blocks[title_index]
        title = first_title if title_index == 0 and subject else title_block.text
        byline = parse_byline(blocks[byline_index])
        lead = blocks[title_index + 1 : byline_index]  # a note between title and byline
        article_notes: list[str] = []
        if title_index == 0 and subject:
            article_notes.append(
                f"{path}:{title_block.line}: title taken from the subject's first headline"
            )
        articles.append(
            build_article(
                f"{path}:{title_block.line}",
                path,
                title,
                byline,
                [*lead, *blocks[byline_index + 1 : end]],
                article_notes,
                title_line=title_block.line,
            )
        )
    if found_tagline and tagline and found_tagline.casefold() != tagline.casefold():
        notes.append(
            f"{path}:{last.line}: the tagline differs from [newsletter] tagline in newsletter.toml"
        )
    intro_images: list[tuple[Path, str]] = []
    intro = "\n\n".join(block_markdown(b, path, intro_images, notes) for b in intro_blocks)
    if intro_images:
        raise ImportSourceError(
            "an image before the first article cannot go in the intro",
            where=f"{path}:{intro_blocks[0].line}",
            hint="move the image line into an article",
        )
    return Digest(
        path=path,
        subject=subject,
        tagline=found_tagline,
        intro=intro,
        articles=tuple(articles),
        notes=tuple(notes),
    )


def _find_title(blocks: Sequence[Block], byline_index: int, floor: int) -> int | None:
    """The title above a byline: the block just before it, or the one before a short note."""
    before = byline_index - 1
    if before >= floor and _title_like(blocks[before]):
        return before
    if before - 1 >= floor and _title_like(blocks[before - 1]) and _is_note(blocks[before]):
        return before - 1
    return None


def _is_note(block: Block) -> bool:
    """A short line between a title and its byline, like "Video link to ... ."."""
    return block.single and len(block.text) <= 120 and block.text.endswith(".")


def _looks_like_tagline(block: Block, tagline: str) -> bool:
    text = block.text
    if tagline and text.casefold() == tagline.casefold():
        return True
    return (
        block.single
        and len(text) <= 100
        and len(text.split()) <= 14
        and not text.endswith((".", "!", "?", ":", ","))
        and not _IMAGE.match(text)
        and text[:1] not in _QUOTES
    )
