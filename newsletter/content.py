"""Articles and issues on disk: front matter, order, numbering.

An issue is a folder ``issues/NNN-slug/`` with ``issue.md`` (front matter plus
the intro) and ``articles/*.md``. The issue keeps its own copy of each article,
so re-building an old issue gives the same output.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ContentError
from .files import atomic_write_text

ISSUE_FILE = "issue.md"
ARTICLES_DIR = "articles"
IMAGES_DIR = "images"
ARTICLE_FIELDS = (
    "title",
    "author",
    "source",
    "date",
    "url",
    "image",
    "image_alt",
    "summary",
    "bio",
)
ISSUE_FIELDS = ("number", "date", "title", "subject", "preheader", "articles", "send_at", "segment")
SUBJECT_SEPARATOR = " | "
_FENCE = "---"
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass(frozen=True)
class Article:
    """One article as the editor wrote it."""

    path: Path
    title: str
    body: str
    body_line: int = 1  # line of the file where the Markdown body starts
    author: str = ""
    source: str = ""
    date: dt.date | None = None
    url: str = ""
    image: str = ""
    image_alt: str = ""
    summary: str = ""
    bio: str = ""
    image_line: int = 1  # line of the 'image:' field, for error messages

    @property
    def word_count(self) -> int:
        return len(self.body.split())

    def image_paths(self) -> list[tuple[str, int]]:
        """Local image references (lead image and in-body) with their line numbers."""
        found: list[tuple[str, int]] = []
        if self.image and not _is_remote(self.image):
            found.append((self.image, self.image_line))
        for offset, line in enumerate(self.body.splitlines()):
            for match in _MD_IMAGE.finditer(line):
                if not _is_remote(match.group(1)):
                    found.append((match.group(1), self.body_line + offset))
        return found


@dataclass(frozen=True)
class Issue:
    """A dated, numbered issue and its articles, in order."""

    path: Path
    number: int
    date: dt.date
    title: str
    preheader: str
    intro: str
    articles: tuple[Article, ...]
    explicit_subject: str = ""
    intro_line: int = 1  # line of issue.md where the intro starts, for error messages
    # When the worker sends it, as written in issue.md (parsed by newsletter.schedule);
    # send_at_where is "issue.md:LINE" for its error messages.
    send_at: str = ""
    send_at_where: str = ""
    segment: str = ""  # the [segments] entry it goes to ("" = every active subscriber)

    @property
    def slug(self) -> str:
        """The folder name: the issue's web address, build folder and ledger key."""
        return self.path.name

    def subject(self, max_length: int = 100) -> str:
        """The explicit subject, or the lead titles joined by " | ", cut at a word."""
        if self.explicit_subject:
            return self.explicit_subject
        return default_subject([a.title for a in self.articles], max_length) or self.title


def default_subject(titles: Iterable[str], max_length: int = 100) -> str:
    """Join lead titles with " | " while they fit; always keep at least the first (cut)."""
    subject = ""
    for title in titles:
        candidate = f"{subject}{SUBJECT_SEPARATOR}{title}" if subject else title
        if len(candidate) > max_length:
            if not subject:
                subject = _cut(title, max_length)
            break
        subject = candidate
    return subject


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:–-")  # noqa: RUF001 (en dash)
    return f"{cut}…"


def slugify(text: str, max_length: int = 50) -> str:
    """ASCII, lower-case, hyphenated: safe for folder and file names."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "untitled"


# --- reading -----------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """Read a UTF-8 file, naming the line of the first bad byte otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ContentError("file not found", where=str(path), hint="check the path") from None
    except IsADirectoryError:
        raise ContentError("is a folder, not a file", where=str(path), hint="name a file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ContentError(
            "not UTF-8 text", where=f"{path}:{line}", hint="re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def split_front_matter(text: str, path: Path) -> tuple[dict[str, Any], str, int]:
    """Parse ``---`` YAML front matter; return (fields, body, line where the body starts)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != _FENCE:
        raise ContentError(
            "no front matter",
            where=f"{path}:1",
            hint="start the file with '---', the fields (title: ...), then '---'",
        )
    for index in range(1, len(lines)):
        if lines[index].strip() == _FENCE:
            break
    else:
        raise ContentError(
            "front matter is not closed",
            where=f"{path}:1",
            hint="add a line '---' after the last field",
        )
    raw = "".join(lines[1:index])
    try:
        data = yaml.safe_load(raw) if raw.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = (mark.line + 2) if mark is not None else 1
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ContentError(
            f"malformed front matter: {problem}",
            where=f"{path}:{line}",
            hint="fix the YAML (quote values that contain ': ')",
        ) from None
    except ValueError as exc:  # PyYAML builds dates itself: 2026-02-30 fails here
        raise ContentError(
            f"impossible date: {exc}",
            where=f"{path}:{_bad_date_line(raw) + 1}",
            hint="write a real date as YYYY-MM-DD",
        ) from None
    if not isinstance(data, dict):
        raise ContentError(
            "front matter must be 'key: value' lines", where=f"{path}:2", hint="fix the YAML"
        )
    body = "".join(lines[index + 1 :])
    return data, body, index + 2


def _bad_date_line(raw: str) -> int:
    """The line of front matter whose YYYY-MM-DD value is not a real date (1 if none)."""
    for number, line in enumerate(raw.splitlines(), start=1):
        match = re.search(r":\s*(\d{4}-\d{1,2}-\d{1,2})\s*$", line)
        if match:
            try:
                year, month, day = (int(part) for part in match.group(1).split("-"))
                dt.date(year, month, day)
            except ValueError:
                return number
    return 1


def _line_of_key(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^{re.escape(key)}\s*:", line):
            return number
    return 1


def _as_date(value: Any, where: str, field: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ContentError(
        f"{field} '{value}' is not a date", where=where, hint="write it as YYYY-MM-DD"
    )


def _as_str(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value).strip()
    raise ContentError(f"{field} must be text", where=where, hint="write it as a single value")


def _reject_unknown_fields(
    data: dict[str, Any], allowed: tuple[str, ...], path: Path, text: str
) -> None:
    """A typo in a field name is an error at its line, not a silently ignored value."""
    for key in data:
        if key not in allowed:
            raise ContentError(
                f"unknown front matter field '{key}'",
                where=f"{path}:{_line_of_key(text, str(key))}",
                hint=f"use one of: {', '.join(allowed)}",
            )


def read_article(path: Path) -> Article:
    """Read and validate one article file."""
    text = read_text(path)
    data, body, body_line = split_front_matter(text, path)
    _reject_unknown_fields(data, ARTICLE_FIELDS, path, text)
    values = {
        key: _as_str(data.get(key), f"{path}:{_line_of_key(text, key)}", key)
        for key in ARTICLE_FIELDS
        if key != "date"
    }
    if not values["title"]:
        raise ContentError(
            "missing title", where=f"{path}:1", hint="add 'title: ...' to the front matter"
        )
    for key in ("title", "author", "source", "image_alt"):
        if "\n" in values[key] or "\r" in values[key]:
            raise ContentError(
                f"{key} has a line break",
                where=f"{path}:{_line_of_key(text, key)}",
                hint=f"put the {key} on one line (it goes into headers and bylines)",
            )
    if values["image"] and not values["image_alt"]:
        raise ContentError(
            "image has no image_alt",
            where=f"{path}:{_line_of_key(text, 'image')}",
            hint="add 'image_alt: ...' describing the picture",
        )
    return Article(
        path=path,
        body=body,
        body_line=body_line,
        date=_as_date(data.get("date"), f"{path}:{_line_of_key(text, 'date')}", "date"),
        image_line=_line_of_key(text, "image"),
        **values,
    )


def read_issue(folder: Path) -> Issue:
    """Read an issue folder: issue.md and its articles, in the listed order."""
    path = folder / ISSUE_FILE
    if not path.is_file():
        raise ContentError(
            f"no {ISSUE_FILE} in this folder", where=str(folder), hint="is this an issue folder?"
        )
    text = read_text(path)
    data, intro, intro_line = split_front_matter(text, path)
    _reject_unknown_fields(data, ISSUE_FIELDS, path, text)
    number = data.get("number")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ContentError(
            "number must be a positive whole number",
            where=f"{path}:{_line_of_key(text, 'number')}",
            hint="set 'number: N'",
        )
    date = _as_date(data.get("date"), f"{path}:{_line_of_key(text, 'date')}", "date")
    if date is None:
        raise ContentError("missing date", where=f"{path}:1", hint="add 'date: YYYY-MM-DD'")
    names = data.get("articles") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ContentError(
            "articles must be a list of file names",
            where=f"{path}:{_line_of_key(text, 'articles')}",
            hint="write one '  - NN-name.md' line per article",
        )
    articles_line = _line_of_key(text, "articles")
    seen: set[str] = set()
    articles: list[Article] = []
    for offset, name in enumerate(names, start=1):
        where = f"{path}:{articles_line + offset}"
        if name in seen:
            raise ContentError(
                f"article '{name}' is listed twice", where=where, hint="remove one of the lines"
            )
        seen.add(name)
        article_path = folder / ARTICLES_DIR / name
        if not article_path.is_file():
            raise ContentError(
                f"article '{name}' is listed but {ARTICLES_DIR}/{name} does not exist",
                where=where,
                hint="add the file or remove the line",
            )
        articles.append(read_article(article_path))
    for key in ("title", "subject", "preheader"):
        value = data.get(key)
        if isinstance(value, str) and ("\n" in value.strip() or "\r" in value):
            raise ContentError(
                f"{key} has a line break",
                where=f"{path}:{_line_of_key(text, key)}",
                hint=f"put the {key} on one line (it goes into the email's headers)",
            )
    return Issue(
        path=folder,
        number=number,
        date=date,
        title=_as_str(data.get("title"), str(path), "title") or f"Issue {number}",
        preheader=_as_str(data.get("preheader"), str(path), "preheader"),
        intro=intro.strip(),
        articles=tuple(articles),
        explicit_subject=_as_str(data.get("subject"), str(path), "subject"),
        segment=_as_str(data.get("segment"), str(path), "segment").strip(),
        intro_line=intro_line + intro[: len(intro) - len(intro.lstrip())].count("\n"),
        send_at=_send_at_text(data.get("send_at"), f"{path}:{_line_of_key(text, 'send_at')}"),
        send_at_where=f"{path}:{_line_of_key(text, 'send_at')}",
    )


def _send_at_text(value: Any, where: str) -> str:
    """``send_at`` as text: YAML reads an unquoted ISO time as a datetime (naive when it has
    no zone, which newsletter.schedule then refuses, naming the form it wants)."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str):
        return value.strip()
    raise ContentError(
        "send_at must be a time with its zone",
        where=where,
        hint='write e.g. send_at: "2026-12-04 07:00 Europe/Berlin"',
    )


def iter_issue_folders(issues_dir: Path) -> Iterator[Path]:
    """Issue folders, oldest first."""
    if not issues_dir.is_dir():
        return
    for child in sorted(issues_dir.iterdir()):
        if child.is_dir() and (child / ISSUE_FILE).is_file():
            yield child


def list_issues(issues_dir: Path) -> list[Issue]:
    """Every issue in the workspace, by number."""
    return sorted(
        (read_issue(folder) for folder in iter_issue_folders(issues_dir)), key=lambda i: i.number
    )


def find_issue(issues_dir: Path, ref: str) -> Path:
    """Resolve an issue reference: a slug, a number, or a folder path."""
    candidate = Path(ref)
    if (candidate / ISSUE_FILE).is_file():
        return candidate.resolve()
    folders = list(iter_issue_folders(issues_dir))
    for folder in folders:
        if folder.name == ref:
            return folder
    if ref.isdigit():
        wanted = int(ref)
        matches = [folder for folder in folders if _folder_number(folder) == wanted]
        if len(matches) > 1:
            raise ContentError(
                f"{len(matches)} issues have number {wanted}: {', '.join(m.name for m in matches)}",
                where=str(issues_dir),
                hint="give the folder name instead, and renumber one of them in its issue.md",
            )
        if matches:
            return matches[0]
    names = ", ".join(f.name for f in folders[-5:]) or "none yet"
    raise ContentError(
        f"no issue '{ref}'",
        where=str(issues_dir),
        hint=f"give a number, slug or folder (recent: {names}); `newsletter issue list` shows all",
    )


def _folder_number(folder: Path) -> int | None:
    try:
        data, _, _ = split_front_matter(read_text(folder / ISSUE_FILE), folder / ISSUE_FILE)
    except ContentError:
        match = re.match(r"(\d+)-", folder.name)
        return int(match.group(1)) if match else None
    number = data.get("number")
    return number if isinstance(number, int) else None


# --- writing -----------------------------------------------------------------------------


def dump_front_matter(fields: Mapping[str, Any], body: str) -> str:
    """Front matter plus body, in a stable, readable form."""
    clean = {k: v for k, v in fields.items() if v not in (None, "", [], ())}
    header = yaml.safe_dump(clean, sort_keys=False, allow_unicode=True, width=1000)
    return f"{_FENCE}\n{header}{_FENCE}\n{body.lstrip()}"


def _write_issue_file(issue_path: Path, data: Mapping[str, Any], intro: str) -> None:
    atomic_write_text(
        issue_path / ISSUE_FILE, dump_front_matter(data, intro + "\n" if intro else "")
    )


def _issue_data(folder: Path) -> tuple[dict[str, Any], str]:
    path = folder / ISSUE_FILE
    data, intro, _ = split_front_matter(read_text(path), path)
    return data, intro.strip()


def new_issue(issues_dir: Path, *, title: str = "", date: dt.date | None = None) -> Issue:
    """Create the next numbered issue folder, with an empty article list."""
    numbers = [n for n in (_folder_number(f) for f in iter_issue_folders(issues_dir)) if n]
    number = max(numbers, default=0) + 1
    date = date or dt.date.today()
    title = title or f"Issue {number}"
    folder = issues_dir / f"{number:03d}-{slugify(title, 40)}"
    if folder.exists():
        raise ContentError("folder already exists", where=str(folder), hint="choose another title")
    (folder / ARTICLES_DIR).mkdir(parents=True)
    data = {
        "number": number,
        "date": date,
        "title": title,
        "preheader": "",
        "articles": [],
    }
    _write_issue_file(folder, data, "")
    return read_issue(folder)


def add_articles(folder: Path, sources: Iterable[Path]) -> list[Path]:
    """Copy article files (and the local images they use) into the issue, appended in order."""
    data, intro = _issue_data(folder)
    names: list[str] = list(data.get("articles") or [])
    existing = [
        read_article(folder / ARTICLES_DIR / n)
        for n in names
        if (folder / ARTICLES_DIR / n).is_file()
    ]
    added: list[Path] = []
    plans: list[tuple[Article, str]] = []
    for source in sources:
        article = read_article(source)
        _check_images(article)
        _check_images_stay_inside(article, folder)
        for other in [*existing, *(a for a, _ in plans)]:
            same_url = bool(article.url) and other.url == article.url
            if same_url or other.title.casefold() == article.title.casefold():
                raise ContentError(
                    f"this article is already in the issue as {other.path.name}",
                    where=str(source),
                    hint="remove it first, or add a different article",
                )
        base = re.sub(r"^\d+-", "", source.stem)
        stem = f"{len(names) + len(plans) + 1:02d}-{slugify(base)}"
        # A removed article's file stays in articles/, so the plain name may be taken.
        name, suffix = f"{stem}.md", 2
        while name in names or (folder / ARTICLES_DIR / name).exists():
            name, suffix = f"{stem}-{suffix}.md", suffix + 1
        plans.append((article, name))
    for article, name in plans:
        target = folder / ARTICLES_DIR / name
        text = read_text(article.path)
        atomic_write_text(target, text)
        for image, _line in article.image_paths():
            src = (article.path.parent / image).resolve()
            dst = (target.parent / image).resolve()
            if folder.resolve() in dst.parents and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        names.append(name)
        added.append(target)
    data["articles"] = names
    _write_issue_file(folder, data, intro)
    return added


# The formats every mail client shows, by their first bytes.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def _check_images(article: Article) -> None:
    for image, line in article.image_paths():
        path = article.path.parent / image
        if not path.is_file():
            raise ContentError(
                f"image '{image}' not found",
                where=f"{article.path}:{line}",
                hint=f"put the file at {path} or fix the path",
            )
        with path.open("rb") as handle:
            head = handle.read(12)
        is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        if not (head.startswith(_IMAGE_SIGNATURES) or is_webp):
            raise ContentError(
                f"'{image}' is not a PNG, JPEG, GIF or WebP image",
                where=f"{article.path}:{line}",
                hint="export it in one of those formats (mail clients show nothing else reliably)",
            )


def _check_images_stay_inside(article: Article, folder: Path) -> None:
    """Images are copied next to the issue's copy of the article: the path must land inside."""
    articles_dir = (folder / ARTICLES_DIR).resolve()
    for image, line in article.image_paths():
        landing = (articles_dir / image).resolve()
        if folder.resolve() not in landing.parents:
            raise ContentError(
                f"image '{image}' would land outside the issue folder",
                where=f"{article.path}:{line}",
                hint="put the image beside the article or in ../images/ and refer to it from there",
            )


def _resolve_article(names: list[str], ref: str, folder: Path) -> int:
    if ref.isdigit() and 1 <= int(ref) <= len(names):
        return int(ref) - 1
    for index, name in enumerate(names):
        if ref in (name, Path(name).stem, re.sub(r"^\d+-", "", Path(name).stem)):
            return index
    raise ContentError(
        f"no article '{ref}' in this issue",
        where=str(folder / ISSUE_FILE),
        hint="give its position or file name; `newsletter issue show` lists them",
    )


def remove_article(folder: Path, ref: str) -> str:
    """Take an article out of the issue's order (its file stays, for the record)."""
    data, intro = _issue_data(folder)
    names: list[str] = list(data.get("articles") or [])
    index = _resolve_article(names, ref, folder)
    removed = names.pop(index)
    data["articles"] = names
    _write_issue_file(folder, data, intro)
    return removed


def move_article(folder: Path, ref: str, position: int) -> list[str]:
    """Move one article to a 1-based position."""
    data, intro = _issue_data(folder)
    names: list[str] = list(data.get("articles") or [])
    if not 1 <= position <= len(names):
        raise ContentError(
            f"position {position} is out of range",
            where=str(folder / ISSUE_FILE),
            hint=f"use 1 to {len(names)}",
        )
    name = names.pop(_resolve_article(names, ref, folder))
    names.insert(position - 1, name)
    data["articles"] = names
    _write_issue_file(folder, data, intro)
    return names


def require_buildable(issue: Issue) -> None:
    """Errors that stop a build: no articles, missing images."""
    if not issue.articles:
        raise ContentError(
            "the issue has no articles",
            where=str(issue.path / ISSUE_FILE),
            hint=f"add some with `newsletter issue add {issue.number} FILE.md`",
        )
    for article in issue.articles:
        _check_images(article)


def _is_remote(ref: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.I)) or ref.startswith("//")
