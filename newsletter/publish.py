"""Publishing: each issue's web page and images at their public address, before any send.

One layout, whether ``newsletter serve`` answers or a static host does (see
:class:`~newsletter.config.PublicUrls`)::

    BASE/                 the archive's index: issues newest first, a subscribe form
    BASE/feed.xml         an Atom feed of the issues
    BASE/SLUG/            an issue's web page (OpenGraph and Twitter-card tags)
    BASE/SLUG/images/...  its images, as the email's ``src`` points at them

Which issues are on the web is in the database (``publications``): ``publish``
puts a page up and ``send`` publishes first; a proof (``send --test``) puts it up
unlisted (it answers at its address, but the index and the feed do not show it
until it is sent or published). ``publish --undo`` takes it down, but the images
of an issue that was sent stay, since emails point at them. Issues sent before
publishing existed count as published. Nothing here
carries a name, an address or a token: the pages are rendered with the
personal placeholders left blank, and that is checked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import content, images, render
from .config import Config
from .content import Issue
from .errors import ContentError, NewsletterError, RenderError
from .store import Store

INDEX_FILE = "index.html"
FEED_FILE = "feed.xml"
EXPORT_MARKER = ".newsletter-archive"  # marks a folder `publish --to` may replace
HEADLINES = 4  # lead headlines shown per issue on the index page
ARCHIVE_TEMPLATE = "archive/index.html"  # in the theme; a workspace may override it
DESCRIPTION_CHARS = 200
# Names the service answers itself: an issue folder may not be published under them.
RESERVED = frozenset(
    {"u", "p", "subscribe", "confirm", "healthz", "archive", "hooks", FEED_FILE, INDEX_FILE}
)


class PublishError(NewsletterError):
    """An issue cannot be put on the web (or taken down) as asked."""


# --- which issues are on the web ------------------------------------------------------------


@dataclass(frozen=True)
class Visibility:
    """Which issues the index and feed list, whose pages answer (listed ones, plus those
    a proof put up), and whose images do (pages, plus every sent issue)."""

    listed: frozenset[str]
    pages: frozenset[str]
    assets: frozenset[str]


def visibility(store: Store) -> Visibility:
    """What the web shows now, from the database."""
    states = store.publication_states()
    sent = set(store.sent_issue_keys())
    listed = {key for key, state in states.items() if state == "published"}
    listed |= {key for key in sent if key not in states}  # sent before `publish` existed
    pages = listed | {key for key, state in states.items() if state == "unlisted"}
    return Visibility(frozenset(listed), frozenset(pages), frozenset(pages | sent))


def issue_folder(config: Config, slug: str) -> Path | None:
    """The issue folder named ``slug``, only if it is a real issue inside issues/."""
    if not slug or slug in RESERVED or "/" in slug or slug.startswith("."):
        return None
    folder = config.issues_dir / slug
    if folder.parent.resolve() != config.issues_dir.resolve():
        return None
    if not (folder / content.ISSUE_FILE).is_file():
        return None
    return folder


# --- one issue's page -------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuePage:
    """An issue rendered for the web, and the images it may show (relative path -> original)."""

    issue: Issue
    html: str
    assets: dict[str, Path]
    description: str
    image: str  # the lead image's path relative to the page ("" when it has none)
    image_alt: str

    def published_image(self, relative: str, config: Config) -> Path | None:
        """The file readers get for one of the page's images (resized once if large)."""
        source = self.assets.get(relative)
        if source is None or not source.is_file():
            return None
        return images.published_file(source, image_cache(config))


def image_cache(config: Config) -> Path:
    """Where the lighter copies of large images are kept (``build`` uses the same)."""
    return config.publish_dir / "images"


def issue_page(config: Config, issue: Issue) -> IssuePage:
    """The issue's web page with its sharing tags; raises if it cannot be built."""
    rendered = render.render_issue(issue, config, asset_base="")
    if render.find_placeholders(rendered.web_html):
        raise RenderError(
            "the web page still has personal placeholders",
            where=str(issue.path),
            hint="the templates must not use recipient values when web is true",
        )
    image, alt = _lead_image(issue, rendered)
    description = _description(issue)
    page = IssuePage(
        issue=issue,
        html="",
        assets={relative: source for source, relative in rendered.assets},
        description=description,
        image=image,
        image_alt=alt,
    )
    return dataclasses.replace(page, html=_with_head_tags(rendered.web_html, config, page))


def _lead_image(issue: Issue, rendered: render.RenderedIssue) -> tuple[str, str]:
    for article in issue.articles:
        if article.image:
            return render.asset_url(article.image, ""), article.image_alt
    for _source, relative in rendered.assets:
        return relative, ""
    return "", ""


def _description(issue: Issue) -> str:
    """The preheader, else the start of the intro, else the lead headlines."""
    text = issue.preheader or render.visible_text(render.markdown_html(issue.intro))
    if not text:
        text = "; ".join(article.title for article in issue.articles[:HEADLINES])
    text = " ".join(text.split())
    if len(text) > DESCRIPTION_CHARS:
        text = text[: DESCRIPTION_CHARS - 1].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"
    return text


def _meta(attribute: str, name: str, value: str) -> str:
    return f'<meta {attribute}="{name}" content="{html.escape(value, quote=True)}">'


def _with_head_tags(page_html: str, config: Config, page: IssuePage) -> str:
    """OpenGraph and Twitter-card tags, a canonical link and the feed, in the page's head."""
    urls = config.public_urls
    issue = page.issue
    url = urls.issue(issue.slug)
    title = f"{issue.title} · {config.newsletter.name}"
    tags = [
        _meta("name", "description", page.description),
        f'<link rel="canonical" href="{html.escape(url)}">',
        f'<link rel="alternate" type="application/atom+xml" href="{html.escape(urls.feed)}"'
        f' title="{html.escape(config.newsletter.name)}">',
        _meta("property", "og:type", "article"),
        _meta("property", "og:site_name", config.newsletter.name),
        _meta("property", "og:title", issue.title),
        _meta("property", "og:description", page.description),
        _meta("property", "og:url", url),
        _meta("property", "article:published_time", issue.date.isoformat()),
        _meta("name", "twitter:card", "summary_large_image" if page.image else "summary"),
        _meta("name", "twitter:title", title),
        _meta("name", "twitter:description", page.description),
    ]
    if page.image:
        remote = re.match(r"^[a-z][a-z0-9+.-]*:|^//", page.image, re.I)  # a lead image by URL
        image_url = page.image if remote else urls.asset(issue.slug, page.image)
        if image_url.startswith("//"):
            image_url = f"https:{image_url}"
        tags += [
            _meta("property", "og:image", image_url),
            _meta("name", "twitter:image", image_url),
        ]
        if page.image_alt:
            tags += [
                _meta("property", "og:image:alt", page.image_alt),
                _meta("name", "twitter:image:alt", page.image_alt),
            ]
    block = "\n".join(tags) + "\n"
    match = re.search(r"</head\s*>", page_html, re.I)
    if match is None:
        return block + page_html
    return page_html[: match.start()] + block + page_html[match.start() :]


class PageCache:
    """Rendered pages, kept until a file of the issue, the templates or the config changes."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._pages: dict[str, tuple[tuple[Any, ...], IssuePage]] = {}

    def _signature(self, folder: Path) -> tuple[Any, ...]:
        stamps: list[Any] = []
        for root in (folder, self._config.templates_dir):
            if root.is_dir():
                stamps.extend(
                    (str(p), p.stat().st_mtime_ns, p.stat().st_size)
                    for p in sorted(root.rglob("*"))
                    if p.is_file()
                )
        if self._config.path.is_file():
            stamps.append(self._config.path.stat().st_mtime_ns)
        return tuple(stamps)

    def get(self, folder: Path) -> IssuePage:
        signature = self._signature(folder)
        with self._lock:
            cached = self._pages.get(folder.name)
            if cached is not None and cached[0] == signature:
                return cached[1]
        page = issue_page(self._config, content.read_issue(folder))
        with self._lock:
            self._pages[folder.name] = (signature, page)
        return page


# --- publish and take down --------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """What ``publish`` did for one issue."""

    issue: Issue
    url: str
    already: bool  # it was on the web before
    weight: images.ImageWeight
    listed: bool  # in the index and the feed


def publish_issue(config: Config, store: Store, issue: Issue, *, listed: bool = True) -> Published:
    """Put the issue's page and images on the web: check both build, then record it.

    ``listed=False`` (a proof) makes them answer without showing the issue in the
    index and the feed, unless it is listed already. Large images get their lighter
    copy now, once. Refuses (nothing recorded) when the page cannot be built or an
    image cannot be read.
    """
    if issue.slug in RESERVED:
        raise PublishError(
            f"an issue folder may not be called '{issue.slug}': the service answers there",
            where=str(issue.path),
            hint="rename the folder",
        )
    try:
        page = issue_page(config, issue)
        weight = images.weight(page.assets.values(), image_cache(config))
    except NewsletterError as exc:
        raise PublishError(
            f"issue {issue.number} cannot be published: {exc.message}",
            where=exc.where or str(issue.path),
            hint=exc.hint or "fix it, then publish (or send) again",
        ) from None
    before = visibility(store)
    listed = listed or issue.slug in before.listed
    store.set_publication(issue.slug, "published" if listed else "unlisted")
    return Published(
        issue, config.public_urls.issue(issue.slug), issue.slug in before.pages, weight, listed
    )


def require_alt_text(rendered: render.RenderedIssue) -> None:
    """Refuse to send an issue with an image that says nothing to readers who cannot see it."""
    if not rendered.missing_alt:
        return
    first, _, image = rendered.missing_alt[0].rpartition(": ")
    more = len(rendered.missing_alt) - 1
    raise PublishError(
        f"{image} has no alt text" + (f" (and {more} more images)" if more else ""),
        where=first,
        hint='describe it: ![A ferry at dusk](...), or write ![""](...) if it is only decoration;'
        " `newsletter check` lists them all",
    )


@dataclass(frozen=True)
class Withdrawn:
    """What ``publish --undo`` did: the page is down; images stay if emails point at them."""

    issue: Issue
    was_published: bool
    images_kept: tuple[str, ...]  # relative paths still served, because the issue was sent


def unpublish_issue(config: Config, store: Store, issue: Issue) -> Withdrawn:
    """Take the issue's page (and listing, and feed entry) down."""
    before = visibility(store)
    store.set_publication(issue.slug, "withdrawn")
    kept: tuple[str, ...] = ()
    if issue.slug in visibility(store).assets:
        kept = tuple(relative for _source, relative in render.issue_images(issue))
    return Withdrawn(issue, issue.slug in before.pages, kept)


# --- the archive index and the feed ---------------------------------------------------------


@dataclass(frozen=True)
class ArchiveEntry:
    """One issue as the index and the feed show it."""

    slug: str
    number: int
    date: dt.date
    title: str
    description: str
    headlines: tuple[str, ...]


def archive_entries(config: Config, keys: Iterable[str]) -> list[ArchiveEntry]:
    """The published issues among ``keys``, newest first (unreadable ones are left out)."""
    entries = []
    for key in keys:
        folder = issue_folder(config, key)
        if folder is None:
            continue
        try:
            issue = content.read_issue(folder)
        except ContentError:
            continue
        entries.append(
            ArchiveEntry(
                slug=issue.slug,
                number=issue.number,
                date=issue.date,
                title=issue.title,
                description=_description(issue),
                headlines=tuple(article.title for article in issue.articles),
            )
        )
    entries.sort(key=lambda entry: (entry.date, entry.number), reverse=True)
    return entries


def index_html(config: Config, entries: Sequence[ArchiveEntry]) -> str:
    """The archive's home page: issues newest first with their lead headlines, a subscribe form.

    Links to the issues and the feed are relative, so the page works wherever the
    folder is served; the form posts to the service's /subscribe.
    """
    news = config.newsletter
    _ = render.theme_gettext(config)
    shown = [
        {
            **dataclasses.asdict(entry),
            "shown_date": render.format_date(entry.date, news.issue_date_format, news.locale),
        }
        for entry in entries
    ]
    return render.render_theme_template(
        config,
        ARCHIVE_TEMPLATE,
        {
            "name": news.name,
            "tagline": news.tagline,
            "description": news.tagline or _("The archive of %(name)s", name=news.name),
            "urls": config.public_urls,
            "entries": shown,
            "headlines": HEADLINES,
            "feed_link": FEED_FILE,
            "postal_address": news.postal_address,
        },
    )


# What XML 1.0 cannot hold (lxml refuses the whole feed for one such character).
_NOT_XML = re.compile(r"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def feed_xml(config: Config, entries: Sequence[ArchiveEntry]) -> bytes:
    """An Atom feed of the published issues (newest first), made with feedgen.

    A character XML cannot hold (a control character pasted into a title) is left
    out, rather than the whole feed failing.
    """
    from feedgen.feed import FeedGenerator

    entries = [
        dataclasses.replace(
            entry,
            title=_NOT_XML.sub("", entry.title),
            description=_NOT_XML.sub("", entry.description),
            headlines=tuple(_NOT_XML.sub("", title) for title in entry.headlines),
        )
        for entry in entries
    ]
    news = config.newsletter
    urls = config.public_urls
    feed = FeedGenerator()
    feed.id(urls.home)
    feed.title(news.name)
    if news.tagline:
        feed.subtitle(news.tagline)
    feed.author({"name": news.name})
    feed.link(href=urls.home, rel="alternate")
    feed.link(href=urls.feed, rel="self")
    feed.language(news.locale)
    feed.generator("newsletter")
    newest = entries[0].date if entries else dt.date(2000, 1, 1)
    feed.updated(_moment(newest))
    for entry in entries:
        item = feed.add_entry(order="append")
        url = urls.issue(entry.slug)
        item.id(url)
        item.title(entry.title)
        item.link(href=url, rel="alternate")
        item.published(_moment(entry.date))
        item.updated(_moment(entry.date))
        if entry.description:
            item.summary(entry.description)
        if entry.headlines:
            listing = "".join(f"<li>{html.escape(title)}</li>" for title in entry.headlines)
            heading = html.escape(render.theme_gettext(config)("In this issue"))
            item.content(f"<p>{heading}:</p><ul>{listing}</ul>", type="html")
    data: bytes = feed.atom_str(pretty=True)
    return data


def _moment(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


# --- the static export ------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """What ``publish --to`` wrote."""

    out_dir: Path
    pages: tuple[str, ...]  # issue slugs with a page
    image_only: tuple[str, ...]  # taken-down issues whose images stay (they were sent)
    files: int
    bytes: int


def export_archive(config: Config, store: Store, out_dir: Path) -> Export:
    """Write the whole archive as static files for any web server or static host.

    The folder is built beside ``out_dir`` and swapped in when complete, so a
    failure leaves the previous export as it was. An existing folder is replaced
    only when it is empty or an earlier export (it holds ``.newsletter-archive``).
    """
    out_dir = out_dir.resolve()
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / EXPORT_MARKER).is_file())
    ):
        raise PublishError(
            "the folder is not empty and is not an earlier archive export",
            where=str(out_dir),
            hint="give an empty or new folder (publish --to replaces its whole content)",
        )
    if not out_dir.parent.is_dir():
        raise PublishError(
            f"the folder {out_dir.parent} does not exist",
            where=str(out_dir),
            hint="create it first, or fix the path",
        )
    seen = visibility(store)
    entries = archive_entries(config, seen.listed)
    try:
        return _export(config, seen, entries, out_dir)
    except OSError as exc:  # not allowed to write there, the disk is full...
        raise PublishError(
            f"cannot write the archive: {exc.strerror or exc}",
            where=str(exc.filename or out_dir),
            hint="check the folder's permissions and free space; the folder is unchanged",
        ) from None


def _export(config: Config, seen: Visibility, entries: list[ArchiveEntry], out_dir: Path) -> Export:
    """Build the archive in a staging folder beside ``out_dir``, then swap it in."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        written: dict[Path, int] = {}

        def write(relative: str, data: bytes) -> None:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written[target] = len(data)

        write(EXPORT_MARKER, b"written by `newsletter publish --to`; replaced by the next one\n")
        write(INDEX_FILE, index_html(config, entries).encode("utf-8"))
        write(FEED_FILE, feed_xml(config, entries))
        pages: list[str] = []
        image_only: list[str] = []
        for key in sorted(seen.assets):
            folder = issue_folder(config, key)
            if folder is None:
                continue
            page = issue_page(config, content.read_issue(folder))
            if key in seen.pages:
                write(f"{key}/{INDEX_FILE}", page.html.encode("utf-8"))
                pages.append(key)
            else:
                image_only.append(key)
            for relative in page.assets:
                source = page.published_image(relative, config)
                target = staging / key / relative
                if source is None or not target.resolve().is_relative_to(staging / key):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                written[target] = target.stat().st_size
        for path in staging.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(staging, 0o755)
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Export(out_dir, tuple(pages), tuple(image_only), len(written), sum(written.values()))


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with ``staging`` (two renames; the old one is removed after)."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- what the public address answers ------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What a path under the public address is: ``kind`` and, for issues, slug and file."""

    kind: str  # index, feed, page, asset, service
    slug: str = ""
    relative: str = ""


SERVICE_PATHS = ("u/", "subscribe", "confirm/", "healthz")


def route(config: Config, url: str) -> Route | None:
    """What ``url`` (an absolute address under the public one) names, or None if outside it."""
    base = config.public_urls.base
    if url == base:
        return Route("index")
    if not url.startswith(base + "/"):
        return None
    path = url[len(base) + 1 :].split("#", 1)[0].split("?", 1)[0]
    if path in ("", INDEX_FILE):
        return Route("index")
    if path == FEED_FILE:
        return Route("feed")
    if path.startswith(SERVICE_PATHS):
        return Route("service", relative=path)
    slug, _, rest = path.partition("/")
    if rest in ("", INDEX_FILE):
        return Route("page", slug)
    return Route("asset", slug, rest)
