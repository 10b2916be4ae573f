"""`issue add` for every kind of source, and `issue import-digest`.

Every source is read first (fetched, extracted, parsed, its images checked);
only when all of them are good is anything written, through
:func:`newsletter.content.add_articles`, so a bad source leaves no partial file.
Imported articles are staged as files in a temporary folder shaped like an issue
(``articles/`` beside ``images/``), which lets ``add_articles`` do the naming,
ordering and image copying exactly as it does for Markdown files.
"""

from __future__ import annotations

import datetime as dt
import filecmp
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import content
from ..config import Config
from ..content import ARTICLES_DIR, IMAGES_DIR, ISSUE_FILE
from ..errors import ImportSourceError
from ..files import atomic_write_text
from . import draft, feeds, web
from .common import ImportedArticle, url_key, used_urls

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
MARKDOWN_SUFFIXES = (".md", ".markdown")
DRAFT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class Added:
    """One article now in the issue, and what the editor should look at."""

    path: Path
    origin: str
    title: str
    word_count: int
    author: str = ""
    source: str = ""
    date: dt.date | None = None
    missing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AddReport:
    issue: Path
    added: tuple[Added, ...]
    warnings: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class DigestReport:
    issue: content.Issue
    digest: draft.Digest
    added: AddReport


@dataclass(frozen=True)
class _Prepared:
    origin: str
    markdown: Path | None = None  # a Markdown file, added as it is
    article: ImportedArticle | None = None


def source_kind(source: str) -> str:
    """'url', 'feed', 'markdown' or 'draft' for what the user typed; bad ones raise."""
    scheme = _SCHEME.match(source)
    if scheme and not Path(source).exists() and len(scheme.group(1)) > 1:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return "url"
        if name == "feed":
            return "feed"
        web.check_url(source)  # raises the one "only http(s)" error
    suffix = Path(source).suffix.lower()
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    if suffix in DRAFT_SUFFIXES:
        return "draft"
    raise ImportSourceError(
        "cannot tell what kind of source this is",
        where=source,
        hint="give a .md article, a .txt draft, an http(s) URL or feed:ID",
    )


def read_source(config: Config, source: str, *, excerpt: int | None = None) -> _Prepared:
    """Read one source into memory (no file is written)."""
    kind = source_kind(source)
    if kind == "markdown":
        path = Path(source)
        content.read_article(path)  # fail now, with the file's own line numbers
        return _Prepared(source, markdown=path)
    if kind == "draft":
        return _Prepared(source, article=draft.parse_draft(Path(source)))
    if kind == "url":
        return _Prepared(source, article=web.import_url(source, config, excerpt=excerpt))
    item = feeds.find_item(config, source.split(":", 1)[1])
    article = web.import_url(item.url, config, excerpt=excerpt, origin=source)
    return _Prepared(source, article=_fill_from_feed(article, item))


def _fill_from_feed(article: ImportedArticle, item: feeds.FeedItem) -> ImportedArticle:
    """The feed's own title, author, date and summary fill what the page lacked."""
    filled: list[str] = []
    placeholders = tuple(p for p in article.placeholders if not (p == "title" and item.title))
    title = article.title if "title" not in article.placeholders else item.title or article.title
    if title != article.title:
        filled.append("title")
    author = article.author or item.author
    summary = article.summary or item.summary
    date = article.date or item.published
    filled += [
        name
        for name, before, after in (
            ("author", article.author, author),
            ("summary", article.summary, summary),
            ("date", article.date, date),
        )
        if before != after
    ]
    if not filled:
        return article
    return replace(
        article,
        title=title,
        author=author,
        summary=summary,
        date=date,
        placeholders=placeholders,
        notes=(*article.notes, f"from the feed entry: {', '.join(filled)}"),
    )


# --- issue add ------------------------------------------------------------------------------


def add_sources(
    config: Config,
    issue_ref: str,
    sources: Sequence[str],
    *,
    force: bool = False,
    excerpt: int | None = None,
) -> AddReport:
    """Add Markdown files, URLs, drafts and feed items to an issue, in the order given.

    An article whose URL is already in another issue is refused unless ``force``
    (then it is a warning). Nothing is written unless every source could be read.
    """
    folder = content.find_issue(config.issues_dir, issue_ref)
    warnings: list[str] = []
    if excerpt is not None:
        if excerpt < 1:
            raise ImportSourceError(
                f"--excerpt {excerpt}: keep at least one paragraph", hint="use 1 or more"
            )
        if any(source_kind(s) not in ("url", "feed") for s in sources):
            warnings.append("--excerpt applies to web pages and feed items only")
    used = used_urls(config.issues_dir, exclude=folder)
    prepared: list[_Prepared] = []
    for source in sources:
        item = read_source(config, source, excerpt=excerpt)
        url = item.article.url if item.article else content.read_article(Path(source)).url
        earlier = used.get(url_key(url)) if url else None
        if earlier:
            message = f"{url} was already in issue {earlier[0]} as {earlier[1]}"
            if not force:
                raise ImportSourceError(
                    message, where=source, hint="add --force to add it to this issue anyway"
                )
            warnings.append(f"{source}: {message} (added anyway: --force)")
        prepared.append(item)
    _check_not_in_issue(folder, prepared)
    added = _write(folder, prepared)
    return AddReport(folder, tuple(added), tuple(warnings))


def _check_not_in_issue(folder: Path, prepared: Sequence[_Prepared]) -> None:
    """The same article twice in one issue, named by what the user typed."""
    data, _, _ = content.split_front_matter(
        content.read_text(folder / ISSUE_FILE), folder / ISSUE_FILE
    )
    seen: list[tuple[str, str, str]] = []  # (url key, title, where it is)
    for name in data.get("articles") or []:
        path = folder / ARTICLES_DIR / str(name)
        if path.is_file():
            existing = content.read_article(path)
            seen.append((url_key(existing.url) if existing.url else "", existing.title, name))
    for item in prepared:
        if item.article:
            url, title = item.article.url, item.article.title
        else:
            assert item.markdown is not None
            parsed = content.read_article(item.markdown)
            url, title = parsed.url, parsed.title
        key = url_key(url) if url else ""
        for other_key, other_title, where in seen:
            if (key and key == other_key) or title.casefold() == other_title.casefold():
                raise ImportSourceError(
                    f"this article is already in the issue as {where}",
                    where=item.origin,
                    hint="remove it first, or add a different article",
                )
        seen.append((key, title, f"'{item.origin}'"))


def _write(folder: Path, prepared: Sequence[_Prepared]) -> list[Added]:
    """Stage imported articles in a temporary issue-shaped folder, then add them all."""
    images_dir = folder / IMAGES_DIR
    taken: dict[str, Path] = {}  # image name -> the file it stands for, in this issue
    with tempfile.TemporaryDirectory(prefix="newsletter-import-") as tmp:
        stage = Path(tmp)
        (stage / ARTICLES_DIR).mkdir()
        (stage / IMAGES_DIR).mkdir()
        paths: list[Path] = []
        for number, item in enumerate(prepared, start=1):
            if item.markdown is not None:
                paths.append(item.markdown)
                continue
            assert item.article is not None
            renames: dict[str, str] = {}
            for source_file, name in item.article.images:
                final = _image_name(name, source_file, images_dir, taken)
                taken[final] = source_file
                shutil.copyfile(source_file, stage / IMAGES_DIR / final)
                if final != name:
                    renames[name] = final
            staged = stage / ARTICLES_DIR / f"{number:03d}-{content.slugify(item.article.title)}.md"
            staged.write_text(item.article.to_text(renames), encoding="utf-8")
            paths.append(staged)
        written = content.add_articles(folder, paths)
    added: list[Added] = []
    for item, path in zip(prepared, written, strict=True):
        if item.article is not None:
            article = item.article
            added.append(
                Added(
                    path,
                    item.origin,
                    article.title,
                    article.word_count,
                    article.author,
                    article.source,
                    article.date,
                    article.missing(),
                    article.notes,
                )
            )
        else:
            parsed = content.read_article(path)
            added.append(
                Added(
                    path,
                    item.origin,
                    parsed.title,
                    parsed.word_count,
                    parsed.author,
                    parsed.source,
                    parsed.date,
                )
            )
    return added


def _image_name(name: str, source: Path, images_dir: Path, taken: dict[str, Path]) -> str:
    """``name``, or ``name-2`` etc. when the issue already has a different file by that name."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, counter = name, 1
    while True:
        existing = images_dir / candidate
        if candidate in taken:
            if filecmp.cmp(taken[candidate], source, shallow=False):
                return candidate
        elif not existing.exists() or filecmp.cmp(existing, source, shallow=False):
            return candidate
        counter += 1
        candidate = f"{stem}-{counter}{suffix}"


# --- issue import-digest --------------------------------------------------------------------


def import_digest(
    config: Config, path: Path, *, title: str = "", date: dt.date | None = None
) -> DigestReport:
    """Split a plain-text digest into a new issue: subject, intro and one article each.

    The digest is parsed (and its images checked) before the issue folder is made;
    if writing fails after that, the new folder is removed again.
    """
    digest = draft.split_digest(path, tagline=config.newsletter.tagline)
    created = content.new_issue(config.issues_dir, title=title, date=date)
    try:
        if digest.subject or digest.intro:
            issue_path = created.path / ISSUE_FILE
            data, body, _ = content.split_front_matter(content.read_text(issue_path), issue_path)
            if digest.subject:
                data = _with_subject(data, digest.subject)
            atomic_write_text(
                issue_path, content.dump_front_matter(data, (digest.intro or body).strip() + "\n")
            )
        prepared = [_Prepared(a.origin, article=a) for a in digest.articles]
        _check_not_in_issue(created.path, prepared)
        added = _write(created.path, prepared)
    except BaseException:
        shutil.rmtree(created.path, ignore_errors=True)
        raise
    report = AddReport(created.path, tuple(added))
    return DigestReport(content.read_issue(created.path), digest, report)


def _with_subject(data: dict[str, object], subject: str) -> dict[str, object]:
    """Put ``subject`` after ``title``, where an editor expects to find it."""
    ordered: dict[str, object] = {}
    for key, value in data.items():
        ordered[key] = value
        if key == "title":
            ordered["subject"] = subject
    ordered.setdefault("subject", subject)
    return ordered
