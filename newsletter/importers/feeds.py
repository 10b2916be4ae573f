"""RSS and Atom feeds: a named list the editor keeps, and pulls that remember.

The list is ``feeds.toml`` at the workspace root: editor content, kept in git, and
fine to edit by hand; `feed add` and `feed remove` change only their own line (through
tomlkit), so the editor's comments and layout stay. What the tool learns (ETag,
Last-Modified, the items each feed last listed) goes to ``.newsletter/feeds.json``,
written atomically, so a pull can send conditional requests and ``feed:ID`` keeps
working after a 304.

Item ids are the first hex digits of a hash of the entry's id (or link), so an
item keeps its id from one pull to the next.

A feed that is not well-formed XML is refused with one error naming the line,
rather than read half-way by feedparser's lenient mode and silently missing items.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tomllib
import xml.sax
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tomlkit
from tomlkit.items import InlineTable, Table

from ..config import Config
from ..errors import ConfigError, ImportSourceError
from ..files import atomic_write_text
from .common import plain_text, safe_link, url_key, used_urls
from .web import check_url, fetch, user_agent

FEED_ACCEPT = (
    "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_ID = re.compile(r"^[0-9a-f]{7,12}$")
MAX_REMEMBERED = 2000
STATE_VERSION = 1
HEADER = (
    "# Feeds that `newsletter feed pull` reads: NAME = URL.\n"
    "# Edit by hand, or with `newsletter feed add NAME URL` and `newsletter feed remove NAME`.\n"
)


@dataclass(frozen=True)
class Feed:
    name: str
    url: str


@dataclass(frozen=True)
class FeedItem:
    """One entry of a feed, with the short id that `issue add ISSUE feed:ID` takes."""

    id: str
    feed: str
    title: str
    url: str
    published: dt.date | None = None
    author: str = ""
    summary: str = ""


@dataclass(frozen=True)
class FeedResult:
    """What one feed gave in a pull."""

    feed: Feed
    not_modified: bool
    items: tuple[FeedItem, ...]  # not used in any issue yet, newest first
    new_ids: frozenset[str]  # items seen for the first time in this pull
    used: int  # items skipped because an issue already has them


@dataclass(frozen=True)
class PullReport:
    results: tuple[FeedResult, ...]
    errors: tuple[str, ...] = field(default=())

    def raise_for_errors(self) -> None:
        """One error line for every feed that failed (after the others were reported)."""
        if self.errors:
            count = len(self.errors)
            total = count + len(self.results)
            raise ImportSourceError(
                f"{count} of {total} feeds failed: " + "; ".join(self.errors),
                hint="fix or remove the feed (`newsletter feed remove NAME`)",
            )


# --- the list -----------------------------------------------------------------------------


def read_feeds(config: Config) -> list[Feed]:
    """The feeds in ``feeds.toml``, in file order (none when the file does not exist)."""
    path = config.feeds_path
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"invalid TOML: {exc}", where=str(path), hint="fix the line, or remove the file"
        ) from None
    table = data.get("feeds", {})
    unknown = [key for key in data if key != "feeds"]
    if unknown or not isinstance(table, dict):
        raise ConfigError(
            'feeds.toml holds one [feeds] table of NAME = "URL" lines',
            where=str(path),
            hint="move the lines under [feeds]",
        )
    feeds: list[Feed] = []
    for name, url in table.items():
        if not isinstance(url, str) or not _NAME.match(name):
            raise ConfigError(
                f"feed '{name}' must be NAME = \"https://...\"",
                where=f"{path}:{_line_of(text, name)}",
                hint="use letters, digits, - and _ for the name, and quote the URL",
            )
        feeds.append(Feed(name, url))
    return feeds


def _line_of(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return 1


def _edit_feeds(config: Config, *, add: Feed | None = None, remove: str | None = None) -> None:
    """Add or remove one line of ``feeds.toml``, keeping every other line and comment.

    Called after :func:`read_feeds` has checked the file; a new file gets a header.
    """
    path = config.feeds_path
    try:
        document = tomlkit.parse(path.read_text(encoding="utf-8") if path.is_file() else HEADER)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte {exc.start})", where=str(path), hint="save it as UTF-8"
        ) from None
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(
            f"invalid TOML: {exc}", where=str(path), hint="fix the line, or remove the file"
        ) from None
    if "feeds" not in document:
        document.add("feeds", tomlkit.table())
    table = document["feeds"]
    assert isinstance(table, Table | InlineTable)  # read_feeds refused anything else
    if remove is not None:
        del table[remove]
    if add is not None:
        table[add.name] = add.url
    atomic_write_text(path, tomlkit.dumps(document))


def add_feed(config: Config, name: str, url: str) -> Feed:
    """Add a feed to ``feeds.toml`` (the URL is checked for its scheme, not fetched)."""
    if not _NAME.match(name):
        raise ImportSourceError(
            f"feed name '{name}' is not allowed",
            hint="use up to 40 letters, digits, - and _ (starting with a letter or digit)",
        )
    check_url(url)
    feeds = read_feeds(config)
    for feed in feeds:
        if feed.name == name:
            raise ImportSourceError(
                f"there is already a feed called '{name}'",
                where=str(config.feeds_path),
                hint="choose another name, or remove the old one first",
            )
        if url_key(feed.url) == url_key(url):
            raise ImportSourceError(
                f"this URL is already the feed '{feed.name}'", where=str(config.feeds_path)
            )
    added = Feed(name, url.strip())
    _edit_feeds(config, add=added)
    return added


def remove_feed(config: Config, name: str) -> Feed:
    """Take a feed out of ``feeds.toml``; what the tool remembered about it is forgotten."""
    feeds = read_feeds(config)
    for feed in feeds:
        if feed.name == name:
            _edit_feeds(config, remove=name)
            state = _load_state(config)
            state["feeds"].pop(name, None)
            _save_state(config, state)
            return feed
    names = ", ".join(f.name for f in feeds) or "none"
    raise ImportSourceError(
        f"no feed called '{name}'", where=str(config.feeds_path), hint=f"feeds: {names}"
    )


# --- state --------------------------------------------------------------------------------


def _load_state(config: Config) -> dict[str, Any]:
    empty: dict[str, Any] = {"version": STATE_VERSION, "feeds": {}, "items": {}}
    path = config.feed_state_path
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty  # the tool's own cache: start again rather than stop the editor
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return empty
    if not isinstance(data.get("feeds"), dict) or not isinstance(data.get("items"), dict):
        return empty
    return data


def _save_state(config: Config, state: dict[str, Any]) -> None:
    items: dict[str, Any] = state["items"]
    if len(items) > MAX_REMEMBERED:
        listed = {i for f in state["feeds"].values() for i in f.get("items", [])}
        oldest = sorted(
            (k for k in items if k not in listed), key=lambda k: items[k].get("first_seen", "")
        )
        for key in oldest[: len(items) - MAX_REMEMBERED]:
            del items[key]
    atomic_write_text(
        config.feed_state_path, json.dumps(state, ensure_ascii=False, indent=1) + "\n"
    )


def _item(data: Mapping[str, Any], item_id: str) -> FeedItem:
    published = data.get("published")
    return FeedItem(
        id=item_id,
        feed=str(data.get("feed", "")),
        title=str(data.get("title", "")),
        url=str(data.get("url", "")),
        published=dt.date.fromisoformat(published) if isinstance(published, str) else None,
        author=str(data.get("author", "")),
        summary=str(data.get("summary", "")),
    )


def find_item(config: Config, item_id: str) -> FeedItem:
    """A feed item by the id `feed pull` printed."""
    wanted = item_id.strip().lower()
    items = _load_state(config)["items"]
    if _ID.match(wanted):
        matches = [key for key in items if key.startswith(wanted)]
        if len(matches) == 1:
            return _item(items[matches[0]], matches[0])
    raise ImportSourceError(
        f"no feed item 'feed:{item_id}'",
        hint="run `newsletter feed pull` and use one of the ids it lists",
    )


# --- pulling ------------------------------------------------------------------------------


def pull(config: Config, names: Sequence[str] = (), *, used: set[str] | None = None) -> PullReport:
    """Fetch the feeds (conditionally) and list their items no issue has used yet.

    ``used`` is the set of :func:`url_key` values already in issues (default: read
    from the workspace). A feed that fails is reported in ``errors``; the others count.
    """
    feeds = read_feeds(config)
    if not feeds:
        raise ImportSourceError(
            "no feeds yet", where=str(config.feeds_path), hint="add one with `newsletter feed add`"
        )
    if names:
        known = {f.name for f in feeds}
        for name in names:
            if name not in known:
                raise ImportSourceError(
                    f"no feed called '{name}'",
                    where=str(config.feeds_path),
                    hint=f"feeds: {', '.join(sorted(known))}",
                )
        feeds = [f for f in feeds if f.name in names]
    if used is None:
        used = set(used_urls(config.issues_dir))
    state = _load_state(config)
    results: list[FeedResult] = []
    errors: list[str] = []
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for feed in feeds:
        try:
            results.append(_pull_one(config, feed, state, used, now))
        except ImportSourceError as exc:
            errors.append(f"{feed.name}: {exc}")
    _save_state(config, state)
    return PullReport(tuple(results), tuple(errors))


def _pull_one(
    config: Config, feed: Feed, state: dict[str, Any], used: set[str], now: str
) -> FeedResult:
    import feedparser

    remembered: dict[str, Any] = state["feeds"].get(feed.name, {})
    if remembered.get("url") != feed.url:
        remembered = {}  # the URL changed: its validators and items no longer apply
    headers: dict[str, str] = {}
    if remembered.get("etag"):
        headers["If-None-Match"] = str(remembered["etag"])
    if remembered.get("last_modified"):
        headers["If-Modified-Since"] = str(remembered["last_modified"])
    answer = fetch(
        feed.url,
        config.fetch,
        user_agent(config),
        accept=FEED_ACCEPT,
        content_types=None,
        headers=headers,
        what="feed",
    )
    items: dict[str, Any] = state["items"]
    new_ids: set[str] = set()
    if answer.status == 304:
        ids = [i for i in remembered.get("items", []) if i in items]
    else:
        try:
            parsed = feedparser.parse(
                answer.body,
                response_headers={
                    "content-type": answer.headers.get("content-type", "application/xml"),
                    "content-location": answer.url,
                },
            )
        except (UnicodeError, ValueError) as exc:  # e.g. &#xD800; read by its loose parser
            raise ImportSourceError(
                f"malformed feed: {exc}",
                where=feed.url,
                hint="ask the site to fix its feed, or import its articles by URL",
            ) from None
        _check_parsed(parsed, feed)
        ids = []
        for entry in parsed.entries:
            data = _entry_data(entry, feed, answer.url)
            if data is None:
                continue
            item_id = _item_id(data["key"], items)
            if item_id not in items:
                new_ids.add(item_id)
                data["first_seen"] = now
            else:
                data["first_seen"] = items[item_id].get("first_seen", now)
            items[item_id] = data
            if item_id not in ids:
                ids.append(item_id)
        remembered = {
            "url": feed.url,
            "etag": answer.headers.get("etag", ""),
            "last_modified": answer.headers.get("last-modified", ""),
            "items": ids,
        }
    remembered["checked"] = now
    state["feeds"][feed.name] = remembered
    listed = [_item(items[i], i) for i in ids]
    fresh = [item for item in listed if url_key(item.url) not in used]
    fresh.sort(key=lambda i: i.published or dt.date.min, reverse=True)
    return FeedResult(
        feed=feed,
        not_modified=answer.status == 304,
        items=tuple(fresh),
        new_ids=frozenset(new_ids),
        used=len(listed) - len(fresh),
    )


def _check_parsed(parsed: Any, feed: Feed) -> None:
    problem = parsed.get("bozo_exception") if parsed.get("bozo") else None
    if isinstance(problem, xml.sax.SAXParseException):
        raise ImportSourceError(
            f"malformed feed: not well-formed XML ({problem.getMessage()})",
            where=f"{feed.url}:{problem.getLineNumber()}",
            hint="ask the site to fix its feed, or import its articles by URL",
        )
    if not parsed.get("version"):
        raise ImportSourceError(
            "malformed feed: this is not RSS or Atom",
            where=feed.url,
            hint="check the feed's address (look for an RSS or Atom link on the site)",
        )


def _entry_data(entry: Any, feed: Feed, base: str) -> dict[str, Any] | None:
    link = safe_link(str(entry.get("link") or ""), base)
    if not link.startswith(("http://", "https://")):
        return None
    published = None
    parsed_time = entry.get("published_parsed") or entry.get("updated_parsed")
    if parsed_time:
        try:
            published = dt.date(*parsed_time[:3]).isoformat()
        except ValueError:
            published = None
    summary = plain_text(str(entry.get("summary") or ""))
    return {
        "key": str(entry.get("id") or link),
        "feed": feed.name,
        "title": plain_text(str(entry.get("title") or "")) or link,
        "url": link,
        "published": published,
        "author": plain_text(str(entry.get("author") or "")),
        "summary": summary[:500],
    }


def _item_id(key: str, items: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    for length in (7, 10, 12):
        candidate = digest[:length]
        if candidate not in items or items[candidate].get("key") == key:
            return candidate
    return digest[:12]
