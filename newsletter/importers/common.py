"""What every importer produces: an article held in memory until it is written.

Importers never write into an issue themselves. They return an
:class:`ImportedArticle`; :mod:`newsletter.importers.sources` writes all of a
command's articles only after every source has been read, so a bad source leaves
no partial file behind.
"""

from __future__ import annotations

import datetime as dt
import html
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nh3

from .. import content
from ..content import ARTICLES_DIR, ISSUE_FILE, dump_front_matter
from ..errors import ContentError

# The fields an editor is told about when an importer could not find them.
REPORTED_FIELDS = ("title", "author", "source", "date", "url", "image", "summary")


@dataclass(frozen=True)
class ImportedArticle:
    """One article read from a URL, feed item or draft, not yet on disk."""

    origin: str  # what the user gave: a URL, feed:ID or a file path
    title: str
    body: str  # Markdown
    author: str = ""
    source: str = ""
    date: dt.date | None = None
    url: str = ""
    image: str = ""
    image_alt: str = ""
    summary: str = ""
    bio: str = ""
    # Local images the body uses: (file to copy, name under the issue's images/).
    images: tuple[tuple[Path, str], ...] = ()
    notes: tuple[str, ...] = field(default=())  # what the editor should check
    placeholders: tuple[str, ...] = ()  # fields filled with a stand-in ("Untitled")

    @property
    def word_count(self) -> int:
        return len(self.body.split())

    def missing(self, fields: tuple[str, ...] = REPORTED_FIELDS) -> tuple[str, ...]:
        """The reported fields that are still empty, for "fill these in" messages."""
        return tuple(
            name for name in fields if not getattr(self, name) or name in self.placeholders
        )

    def front_matter(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "author": self.author,
            "source": self.source,
            "date": self.date,
            "url": self.url,
            "image": self.image,
            "image_alt": self.image_alt if self.image else "",
            "summary": self.summary,
            "bio": self.bio,
        }

    def to_text(self, image_names: Mapping[str, str] | None = None) -> str:
        """The article file's text; ``image_names`` renames images that clashed in the issue."""
        body = self.body
        for old, new in (image_names or {}).items():
            body = body.replace(f"](../images/{old})", f"](../images/{new})")
        return dump_front_matter(self.front_matter(), body.strip() + "\n")


# Control characters (a terminal obeys ESC sequences in a title that `feed pull` prints),
# lone surrogates and noncharacters (no XML, so no feed, can hold them).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")


def plain_text(value: str) -> str:
    """Metadata as one line of plain text: tags removed (nh3), entities decoded, no
    control characters (also none written as entities, like ``&#27;``)."""
    cleaned = nh3.clean(
        _CONTROLS.sub(" ", value), tags=set(), clean_content_tags={"script", "style"}
    )
    return " ".join(_CONTROLS.sub(" ", html.unescape(cleaned)).split())


_SAFE_SCHEMES = ("http", "https", "mailto")


def safe_link(target: str, base: str = "") -> str:
    """An absolute http(s)/mailto link, or "" for anything else (javascript:, data:...)."""
    # A control character is no part of a URL: encoded, it never reaches a terminal raw.
    target = _CONTROLS.sub(
        lambda m: urllib.parse.quote(m.group(), errors="replace"), target.strip()
    )
    if not target:
        return ""
    absolute = urllib.parse.urljoin(base, target) if base else target
    scheme = urllib.parse.urlsplit(absolute).scheme.lower()
    return absolute if scheme in _SAFE_SCHEMES else ""


_TRACKING = re.compile(r"^(utm_[a-z]+|fbclid|gclid|mc_cid|mc_eid)$", re.I)


def url_key(url: str) -> str:
    """A URL normalised for "have we used this before?" (scheme, case, slash, tracking)."""
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    port = parts.port
    if port and not (
        (parts.scheme == "http" and port == 80) or (parts.scheme == "https" and port == 443)
    ):
        host = f"{host}:{port}"
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if not _TRACKING.match(k)
        ]
    )
    path = parts.path.rstrip("/") or "/"
    return f"{host}{path}" + (f"?{query}" if query else "")


def used_urls(issues_dir: Path, *, exclude: Path | None = None) -> dict[str, tuple[str, str]]:
    """url_key -> (issue, article file) for every article listed in every issue.

    Read leniently: a broken file in an old issue must not stop today's import.
    """
    found: dict[str, tuple[str, str]] = {}
    skip = exclude.resolve() if exclude else None
    for folder in content.iter_issue_folders(issues_dir):
        if skip is not None and folder.resolve() == skip:
            continue
        try:
            data, _, _ = content.split_front_matter(
                content.read_text(folder / ISSUE_FILE), folder / ISSUE_FILE
            )
        except ContentError:
            continue
        number = data.get("number")
        label = f"{number} ({folder.name})" if isinstance(number, int) else folder.name
        names = data.get("articles")
        for name in names if isinstance(names, list) else []:
            path = folder / ARTICLES_DIR / str(name)
            try:
                fields, _, _ = content.split_front_matter(content.read_text(path), path)
            except ContentError:
                continue
            url = fields.get("url")
            if isinstance(url, str) and url.strip():
                found.setdefault(url_key(url), (label, str(name)))
    return found
