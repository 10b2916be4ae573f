"""Web pages to articles: fetch with limits, extract with trafilatura, write Markdown.

Fetching uses urllib3 (already a dependency of trafilatura) with a connect/read
timeout, an overall deadline, a size limit enforced while streaming, and a
User-Agent that says who we are. Only http(s) URLs are fetched.

Extraction uses trafilatura for the main text and metadata. Its XML body is
turned into Markdown one block at a time: trafilatura renders (and escapes) the
inline text, we add what its Markdown lacks (block quotes, demoted headings, link
schemes checked) and pass any raw HTML that survives through nh3.
"""

from __future__ import annotations

import datetime as dt
import html
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nh3
import urllib3

from .. import __version__
from ..config import Config, FetchSettings
from ..errors import ImportSourceError
from . import network
from .common import ImportedArticle, plain_text, safe_link

if TYPE_CHECKING:
    from lxml.etree import _Element

HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHUNK = 64 * 1024
# trafilatura's Markdown writes these as inline HTML; everything else is removed.
_INLINE_TAGS = {"sub", "sup", "u"}
READ_MORE = "Read the full article"
MIN_WORDS = 20  # less than this is a login wall, a script-only page or an error page
# Page furniture that trafilatura sometimes keeps when it sits inside the article.
_CLASS_TOKENS = ("ad", "ads", "advert", "advertisement", "sponsored", "promo", "newsletter-signup")
PRUNE_XPATH = [
    *(f"//*[contains(concat(' ', normalize-space(@class), ' '), ' {t} ')]" for t in _CLASS_TOKENS),
    "//*[@data-ad-slot]",
    "//*[contains(@id, 'cookie')]",
]


@dataclass(frozen=True)
class FetchResult:
    """One HTTP answer: the final URL after redirects, status, headers and body."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def charset(self) -> str:
        match = re.search(r"charset=\"?([\w.:-]+)", self.headers.get("content-type", ""), re.I)
        return match.group(1) if match else ""


def user_agent(config: Config) -> str:
    """Who is asking, and where to read about it."""
    return f"newsletter/{__version__} (+{config.newsletter.base_url})"


def check_url(url: str) -> urllib.parse.SplitResult:
    """Refuse anything but an absolute http(s) URL, before any connection is made."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"'{scheme}:' URLs" if scheme else "a URL without http:// or https://"
        raise ImportSourceError(
            f"cannot import {shown}: only http and https pages are fetched",
            where=url,
            hint="give a web page's http(s) address, or a .md or .txt file path",
        )
    if not parts.hostname:
        raise ImportSourceError(
            "the URL has no host name", where=url, hint="write it as https://host/path"
        )
    return parts


def _where(parts: urllib.parse.SplitResult) -> str:
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        port = 0
    return f"{parts.hostname}:{port}"


MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def fetch(
    url: str,
    settings: FetchSettings,
    agent: str,
    *,
    accept: str = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1",
    content_types: tuple[str, ...] | None = HTML_TYPES,
    headers: Mapping[str, str] | None = None,
    what: str = "page",
) -> FetchResult:
    """GET ``url`` and return its body, or raise one :class:`ImportSourceError`.

    Redirects are followed (at most 5), each hop's host checked like the first
    (see :mod:`.network`: no loopback, private or metadata addresses unless
    ``settings.allow_private``). A 304 is returned as-is with an empty body, for
    conditional feed requests. ``content_types`` (when given) is checked before the
    body is read, and the body is streamed so a large answer is cut off at
    ``settings.max_bytes`` instead of being read whole.
    """
    parts = check_url(url)
    where = _where(parts)
    timeout = urllib3.Timeout(connect=settings.timeout, read=settings.timeout)
    deadline = time.monotonic() + 4 * settings.timeout
    sent = {"User-Agent": agent, "Accept": accept, **(headers or {})}
    watchdog = network.Watchdog(deadline)  # a server that drips its answer is cut off
    try:
        for hop in range(MAX_REDIRECTS + 1):
            addresses = network.resolve(
                parts, where, allow_private=settings.allow_private, redirect=hop > 0
            )
            pool, response = network.open_pinned(
                parts, addresses, headers=sent, timeout=timeout, watchdog=watchdog
            )
            try:
                location = response.headers.get("location", "")
                if response.status not in _REDIRECTS or not location:
                    result = _read(response, url, where, settings, deadline, content_types, what)
                    if watchdog.fired:  # the body may look complete where it was cut off
                        raise _too_slow(what, where, settings)
                    return result
            finally:
                response.release_conn()
                pool.close()
            url = urllib.parse.urljoin(url, location.strip())
            parts = _redirect_target(url, where)
            where = _where(parts)
        raise ImportSourceError(
            "too many redirects", where=where, hint="check the URL in a browser"
        )
    except ImportSourceError:
        if watchdog.fired:  # cut off: what was read makes no sense, and is not the reason
            raise _too_slow(what, where, settings) from None
        raise
    except urllib3.exceptions.HTTPError as exc:
        if watchdog.fired:
            raise _too_slow(what, where, settings) from None
        raise _network_error(exc, where, settings) from None
    except (OSError, ValueError) as exc:
        if watchdog.fired:
            raise _too_slow(what, where, settings) from None
        raise ImportSourceError(
            f"could not fetch the {what}: {exc}", where=where, hint="check the URL"
        ) from None
    finally:
        watchdog.close()


def _redirect_target(url: str, where: str) -> urllib.parse.SplitResult:
    try:
        return check_url(url)
    except ImportSourceError:
        raise ImportSourceError(
            f"a redirect led to an address that cannot be fetched ({url})",
            where=where,
            hint="only http and https pages are fetched",
        ) from None


def _read(
    response: urllib3.BaseHTTPResponse,
    url: str,
    where: str,
    settings: FetchSettings,
    deadline: float,
    content_types: tuple[str, ...] | None,
    what: str,
) -> FetchResult:
    final_url = url
    result_headers = {k.lower(): v for k, v in response.headers.items()}
    if response.status == 304:
        return FetchResult(final_url, 304, result_headers, b"")
    if response.status >= 400:
        reason = response.reason or ""
        raise ImportSourceError(
            f"the server answered {response.status} {reason}".rstrip(),
            where=where,
            hint="check the URL in a browser",
        )
    limit = settings.max_bytes
    declared = result_headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(what, where, limit)
    kind = FetchResult(final_url, response.status, result_headers, b"").content_type
    if content_types is not None and kind and kind not in content_types:
        raise ImportSourceError(
            f"not a web page: the server sent {kind}",
            where=where,
            hint="import HTML pages only; for other files write a Markdown article by hand",
        )
    chunks: list[bytes] = []
    size = 0
    for chunk in response.stream(_CHUNK, decode_content=True):
        size += len(chunk)
        if size > limit:
            raise _too_large(what, where, limit)
        if time.monotonic() > deadline:
            raise _too_slow(what, where, settings)
        chunks.append(chunk)
    body = b"".join(chunks)
    if content_types is not None and not kind and not _looks_like_html(body):
        raise ImportSourceError(
            "not a web page: no content type and the body is not HTML",
            where=where,
            hint="import HTML pages only",
        )
    return FetchResult(final_url, response.status, result_headers, body)


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<body" in head


def _too_slow(what: str, where: str, settings: FetchSettings) -> ImportSourceError:
    return ImportSourceError(
        f"the {what} took longer than {4 * settings.timeout:g} s to download",
        where=where,
        hint="try again later, or raise [fetch] timeout in newsletter.toml",
    )


def _too_large(what: str, where: str, limit: int) -> ImportSourceError:
    return ImportSourceError(
        f"the {what} is larger than the {limit:,} byte limit",
        where=where,
        hint="raise [fetch] max_bytes in newsletter.toml if you trust it",
    )


def _network_error(
    exc: urllib3.exceptions.HTTPError, where: str, settings: FetchSettings
) -> ImportSourceError:
    hint = "check the URL, your connection, or try again later"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        # (a subclass of ConnectTimeoutError in urllib3 2, so it comes first)
        message = "could not connect (connection refused or unreachable)"
    elif isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        message = f"no connection after {settings.timeout:g} s (timed out)"
    elif isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        message = f"the server sent nothing for {settings.timeout:g} s (timed out)"
        hint = "try again later, or raise [fetch] timeout in newsletter.toml"
    elif isinstance(exc, urllib3.exceptions.SSLError):
        message = "the secure connection failed (TLS certificate or protocol)"
    elif isinstance(exc, urllib3.exceptions.ProtocolError):
        message = "the connection broke off"
    else:
        message = f"could not fetch: {exc}"
    return ImportSourceError(message, where=where, hint=hint)


# --- extraction ---------------------------------------------------------------------------


def import_url(
    url: str, config: Config, *, excerpt: int | None = None, origin: str | None = None
) -> ImportedArticle:
    """Fetch a page and turn it into an article (nothing is written)."""
    page = fetch(url, config.fetch, user_agent(config))
    text: str | bytes = page.body
    if page.charset:
        try:
            text = page.body.decode(page.charset, errors="replace")
        except LookupError:
            text = page.body  # unknown charset name: let the HTML parser sniff it
    return extract(text, page.url, excerpt=excerpt, origin=origin or url)


def extract(
    document: str | bytes, url: str, *, excerpt: int | None = None, origin: str | None = None
) -> ImportedArticle:
    """The main text and metadata of an HTML page, as an :class:`ImportedArticle`."""
    import trafilatura
    from trafilatura.utils import load_html

    where = _where(urllib.parse.urlsplit(url)) if url else origin or "page"
    tree = load_html(document)
    if tree is None:
        raise ImportSourceError(
            "the page is not HTML that can be read", where=where, hint="check the URL"
        )
    today = dt.date.today().isoformat()
    doc: Any = trafilatura.bare_extraction(
        tree,
        url=url,
        with_metadata=True,
        include_comments=False,
        include_links=True,
        include_formatting=True,
        include_tables=True,
        include_images=False,
        prune_xpath=PRUNE_XPATH,
        # Dates only from markup and metadata: a date guessed from the text is worse
        # than none, because the editor is told about a missing one.
        date_extraction_params={
            "original_date": True,
            "extensive_search": False,
            "max_date": today,
        },
    )
    if doc is None or doc.body is None or not len(doc.body):
        raise ImportSourceError(
            "could not find the article text on this page",
            where=where,
            hint="the page may need JavaScript or a login; copy the text into a .txt draft",
        )
    notes: list[str] = []
    title = plain_text(doc.title or "")
    canonical = _http_url(doc.url or "", url) or url
    blocks = markdown_blocks(doc.body, title=title, base=url)
    words = sum(len(block.split()) for block in blocks)
    if words < MIN_WORDS:
        raise ImportSourceError(
            f"could not find the article text on this page (only {words} words)",
            where=where,
            hint="the page may need JavaScript or a login; copy the text into a .txt draft",
        )
    if excerpt is not None:
        blocks = excerpt_blocks(blocks, excerpt, canonical)
    source = plain_text(doc.sitename or "")
    host = urllib.parse.urlsplit(canonical).netloc.lower().removeprefix("www.")
    if not source or source.lower().removeprefix("www.") in (host, doc.hostname or ""):
        source = host
        notes.append(f"source: the site gives no name; used its host name '{host}'")
    image, image_alt = _lead_image(tree, doc.image or "", url)
    if image and not image_alt:
        notes.append(f"lead image {image} has no description; add image and image_alt by hand")
        image = ""
    return ImportedArticle(
        origin=origin or url,
        title=title or "Untitled",
        body="\n\n".join(blocks) + "\n",
        author=plain_text(doc.author or ""),
        source=source,
        date=_iso_date(doc.date),
        url=canonical,
        image=image,
        image_alt=image_alt,
        summary=plain_text(doc.description or ""),
        notes=tuple(notes),
        placeholders=() if title else ("title",),
    )


def _iso_date(value: str | None) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _http_url(value: str, base: str) -> str:
    link = safe_link(value, base)
    return link if link.startswith(("http://", "https://")) else ""


def _lead_image(tree: _Element, image: str, base: str) -> tuple[str, str]:
    """The og:image (or JSON-LD image) URL and the best description we can find for it."""
    image = _http_url(image, base)
    if not image:
        return "", ""
    for xpath in (
        '//meta[@property="og:image:alt"]/@content',
        '//meta[@name="twitter:image:alt"]/@content',
        '//meta[@property="twitter:image:alt"]/@content',
    ):
        values = tree.xpath(xpath)
        if isinstance(values, list) and values and str(values[0]).strip():
            return image, plain_text(str(values[0]))
    wanted = urllib.parse.urlsplit(image).path
    for img in tree.iter("img"):
        src = _http_url(str(img.get("src") or ""), base)
        alt = str(img.get("alt") or "").strip()
        if alt and src and urllib.parse.urlsplit(src).path == wanted:
            return image, plain_text(alt)
    return image, ""


# --- Markdown -----------------------------------------------------------------------------


def markdown_blocks(body: _Element, *, title: str = "", base: str = "") -> list[str]:
    """trafilatura's XML body as Markdown blocks (paragraphs, lists, quotes, headings)."""
    from trafilatura.xml import xmltotxt

    _clean_links(body, base)
    _collapse_whitespace(body)
    blocks: list[str] = []
    for child in body:
        tag = str(child.tag)
        text = xmltotxt(child, include_formatting=True).strip()
        if not text:
            continue
        if tag == "head":
            heading = text.lstrip("#").strip()
            if not blocks and _same_text(heading, title):
                continue  # the page's own <h1>: it is the article's title already
            blocks.append(f"### {sanitise_html(heading)}")
        elif tag == "code" or text.startswith("```"):
            blocks.append(text)
        elif tag == "quote":
            quoted = sanitise_html(text)
            blocks.append("\n".join(f"> {line}".rstrip() for line in quoted.splitlines()))
        else:
            blocks.append(sanitise_html(text))
    return blocks


def _collapse_whitespace(body: _Element) -> None:
    """Source line breaks and indentation are not content; <br> (``lb``) still is."""
    for element in body.iter():
        if element.tag == "code" or any(a.tag == "code" for a in element.iterancestors()):
            continue
        if element.text:
            element.text = re.sub(r"\s+", " ", element.text)
        if element.tail:
            element.tail = re.sub(r"\s+", " ", element.tail)


def _same_text(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return " ".join(re.sub(r"[\\*_`]", "", s).split()).casefold()

    return bool(a) and norm(a) == norm(b)


def _clean_links(body: _Element, base: str) -> None:
    """Make link targets absolute; unwrap links whose scheme is not http(s)/mailto."""
    from lxml.etree import strip_tags

    unsafe = []
    for ref in body.iter("ref"):
        target = safe_link(str(ref.get("target") or ""), base)
        if target:
            ref.set("target", target)
        else:
            ref.set("unsafe", "1")
            unsafe.append(ref)
    if unsafe:
        for ref in unsafe:
            ref.tag = "unsafe-ref"
        strip_tags(body, "unsafe-ref")


_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_AUTOLINK = re.compile(r"<[A-Za-z][A-Za-z0-9+.-]{1,31}:[^<>\s]*>")
_ESCAPED_LT = re.compile(r"\\<")
_RAW_HTML_HINT = re.compile(r"(?<!\\)<[A-Za-z/!?]|&")


def sanitise_html(markdown: str) -> str:
    """Pass raw HTML in a Markdown block through nh3, leaving Markdown itself alone.

    Code spans, autolinks, ``<...>`` link destinations and ``\\<`` escapes are not
    HTML, so they are set aside first; nh3 then drops every tag but <sub>, <sup>
    and <u> (with no attributes) and the text is un-escaped back to Markdown.
    """
    if not _RAW_HTML_HINT.search(markdown):
        return markdown
    kept: list[str] = []

    def keep(match: re.Match[str]) -> str:
        kept.append(match.group(0))
        return f"\ue000{len(kept) - 1}\ue001"

    protected = _CODE_SPAN.sub(keep, markdown)
    protected = _AUTOLINK.sub(keep, protected)
    protected = _ESCAPED_LT.sub(keep, protected)
    cleaned = nh3.clean(
        protected,
        tags=_INLINE_TAGS,
        attributes={},
        clean_content_tags={"script", "style"},
        link_rel=None,
        strip_comments=True,
    )
    text = html.unescape(cleaned)
    return re.sub(r"\ue000(\d+)\ue001", lambda m: kept[int(m.group(1))], text)


def excerpt_blocks(blocks: Iterable[str], paragraphs: int, url: str) -> list[str]:
    """The first ``paragraphs`` text blocks (headings ride along), then a link to the rest."""
    if paragraphs < 1:
        raise ImportSourceError(
            f"--excerpt {paragraphs}: keep at least one paragraph", hint="use --excerpt 1 or more"
        )
    kept: list[str] = []
    count = 0
    for block in blocks:
        if count >= paragraphs:
            break
        kept.append(block)
        if not block.startswith("#"):
            count += 1
    while kept and kept[-1].startswith("#"):
        kept.pop()
    target = f"<{url}>" if re.search(r"[\s()<>]", url) else url
    kept.append(f"[{READ_MORE} →]({target})")
    return kept
