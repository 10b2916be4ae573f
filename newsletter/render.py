"""Turn an issue into email HTML, a plain-text part and a web page.

Jinja2 renders the theme to MJML, mjml-python turns MJML into responsive HTML,
and premailer inlines the CSS. All of this runs once per issue: values that
differ per recipient are left as placeholders that ``message`` fills in.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import gettext
import hashlib
import html
import logging
import re
import shutil
import textwrap
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote

import jinja2
import mjml
from markdown_it import MarkdownIt
from markdown_it.token import Token

from . import i18n, images
from .compact import compact_html
from .config import Config
from .content import _MD_IMAGE, ISSUE_FILE, Article, Issue, require_buildable
from .errors import ContentError, RenderError
from .files import atomic_write_bytes
from .package_data import default_theme_dir

GMAIL_CLIP_BYTES = 102 * 1024
DEFAULT_THEME_PREFIX = "!default"
EMAIL_TEMPLATE = "email.mjml"
TEXT_TEMPLATE = "email.txt"
TEXT_WIDTH = 72
PLACEHOLDER_KEYS = ("name", "first_name", "email", "unsubscribe_url", "preferences_url")
# The one spelling of a placeholder: ``%%nl:<key>:<nonce>%%`` (built and matched only here).
_PLACEHOLDER_RE = re.compile(r"(%%nl:[a-z0-9_.]+:[0-9a-f]{10}%%)")
_FIELD_KEY = re.compile(r"^[A-Za-z0-9_]+$")

# cssutils (under premailer) logs every vendor property it does not know.
logging.getLogger("CSSUTILS").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class RenderedIssue:
    """The issue rendered once; ``html`` and ``text`` still hold placeholders.

    ``placeholders`` maps each token to its key (``name``, ``email``,
    ``unsubscribe_url``, ``first_name`` or ``field.<name>``). Values put into
    ``html`` must be HTML-escaped; values put into ``text`` go in as they are.
    """

    issue: Issue
    subject: str
    preheader: str
    html: str
    text: str
    web_html: str
    placeholders: Mapping[str, str]
    assets: tuple[tuple[Path, str], ...] = ()
    warnings: tuple[str, ...] = ()
    # Body images with no alt text that are not marked decorative (``![""](...)``):
    # "FILE: image 'SRC'" each. Sending refuses while there are any.
    missing_alt: tuple[str, ...] = ()

    @property
    def html_size(self) -> int:
        return len(self.html.encode("utf-8"))

    @property
    def over_gmail_clip(self) -> bool:
        return self.html_size > GMAIL_CLIP_BYTES

    @property
    def visible_share(self) -> float:
        """How much of the email's HTML is text a reader sees (the rest is markup)."""
        return len(visible_text(self.html).encode("utf-8")) / max(self.html_size, 1)

    @property
    def words_before_clip(self) -> int:
        """About how many more words fit before Gmail clips the email.

        Each word the issue has now brings its share of all the markup, so this errs
        on the safe side: a new paragraph costs less than the average word did.
        """
        words = len(visible_text(self.html).split())
        room = GMAIL_CLIP_BYTES - self.html_size
        if room <= 0 or not words:
            return 0
        return int(room / (self.html_size / words))


@dataclass(frozen=True)
class BuildResult:
    """What ``build`` wrote, and what the editor should know."""

    rendered: RenderedIssue
    out_dir: Path
    files: Mapping[str, int] = field(default_factory=dict)  # file name -> size in bytes


class Placeholders:
    """Tokens for per-recipient values, unguessable from the editor's side.

    The nonce is a hash of the issue's own text, so the editor cannot write a
    token into the content (it would change the hash), and builds stay
    reproducible for golden tests.
    """

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self.used: dict[str, str] = {}

    def token(self, key: str) -> str:
        token = f"%%nl:{key}:{self.nonce}%%"
        assert _PLACEHOLDER_RE.fullmatch(token), token
        self.used[token] = key
        return token


class ReaderValueMisuse(Exception):
    """A template looked at a reader's value instead of printing it (see ReaderValue)."""

    def __init__(self, key: str, operation: str) -> None:
        super().__init__(key, operation)
        self.key = key
        self.operation = operation


class ReaderValue(str):
    """A per-reader value as templates see it: a placeholder, filled in at send time.

    Templates are rendered once for all readers, so a template may print the value but
    not test, compare or change it: ``{% if recipient.field("plan") == "paid" %}`` would
    see the placeholder and take the same branch for every reader. Such a use raises,
    and the build fails naming the template's file and line.
    """

    __slots__ = ("key",)
    key: str

    def __new__(cls, token: str, key: str) -> ReaderValue:
        value = super().__new__(cls, token)
        value.key = key
        return value

    def __str__(self) -> str:
        return str.__str__(self)

    def __html__(self) -> str:
        return str.__str__(self)  # a token has nothing to escape

    def __hash__(self) -> int:
        return str.__hash__(self)

    def _misuse(self, operation: str) -> ReaderValueMisuse:
        return ReaderValueMisuse(self.key, operation)

    def __eq__(self, other: object) -> bool:
        raise self._misuse("compared with ==")

    def __ne__(self, other: object) -> bool:
        raise self._misuse("compared with !=")

    def __lt__(self, other: object) -> bool:
        raise self._misuse("compared with <")

    def __le__(self, other: object) -> bool:
        raise self._misuse("compared with <=")

    def __gt__(self, other: object) -> bool:
        raise self._misuse("compared with >")

    def __ge__(self, other: object) -> bool:
        raise self._misuse("compared with >=")

    def __bool__(self) -> bool:
        raise self._misuse("tested with if")

    def __len__(self) -> int:
        raise self._misuse("measured")

    def __contains__(self, other: object) -> bool:
        raise self._misuse("searched with in")

    def __iter__(self) -> Iterator[str]:
        raise self._misuse("looped over")

    def __getitem__(self, index: Any) -> str:
        raise self._misuse("indexed or sliced")

    def __mod__(self, other: Any) -> str:
        raise self._misuse("formatted")

    def __mul__(self, other: Any) -> str:
        raise self._misuse("repeated")

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name == "key":
            return super().__getattribute__(name)
        raise ReaderValueMisuse(super().__getattribute__("key"), f"changed with .{name}()")


class RecipientPlaceholders:
    """What templates see as ``recipient``: placeholders in the email, blanks on the web."""

    def __init__(self, placeholders: Placeholders | None) -> None:
        self._placeholders = placeholders

    def _value(self, key: str) -> str:
        if self._placeholders is None:
            return ""
        return ReaderValue(self._placeholders.token(key), key)

    @property
    def name(self) -> str:
        return self._value("name")

    @property
    def first_name(self) -> str:
        return self._value("first_name")

    @property
    def email(self) -> str:
        return self._value("email")

    @property
    def unsubscribe_url(self) -> str:
        return self._value("unsubscribe_url")

    @property
    def preferences_url(self) -> str:
        """The reader's own preferences page (topics, pause), a signed link like unsubscribe's."""
        return self._value("preferences_url")

    def field(self, key: str) -> str:
        """A subscriber's free field (from the CSV import), e.g. ``recipient.field("city")``."""
        if not _FIELD_KEY.match(key):
            raise ValueError(f"field name {key!r} must be letters, digits and underscores")
        return self._value(f"field.{key.lower()}")


# --- Markdown ----------------------------------------------------------------------------


@cache
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"typographer": True})
    md.enable(["replacements", "smartquotes"])
    md.enable("table")
    md.enable("strikethrough")
    return md


# Blocks whose inside markdown-it parses one level deeper; past maxNesting it drops it.
_CONTAINERS = frozenset({"blockquote_open", "list_item_open"})


def _parse(text: str, where: str, first_line: int) -> list[Token]:
    """markdown-it's tokens, or an error where it would silently drop what is nested deeper.

    Past ``maxNesting`` (20) levels markdown-it skips the rest of the block: a 5,000-level
    quote, or a page imported with one, would lose its text and all that follows. The limit
    guards against recursion, so it stays; the editor is told where instead.
    """
    md = _markdown()
    tokens = md.parse(text)
    deepest = md.options.maxNesting - 1
    for token in tokens:
        if token.level >= deepest and token.type in _CONTAINERS:
            line = first_line + (token.map[0] if token.map else 0)
            raise ContentError(
                f"quotes or lists nested more than {deepest} levels deep (a list level"
                " counts two): what is inside would be left out of the email",
                where=f"{where}:{line}" if where else f"line {line}",
                hint="use fewer '>' or indent the list less",
            )
    return tokens


DECORATIVE_ALT = ('""', "''")  # ![""](rule.png): an image that says nothing, alt=""


def is_decorative(image: Token) -> bool:
    """An image whose alt text the editor wrote as ``""``: decoration, skipped by readers."""
    return image.content.strip() in DECORATIVE_ALT


def _rewrite_images(
    tokens: Sequence[Token],
    asset_base: str,
    warnings: list[str],
    where: str,
    widths: Mapping[str, int] | None = None,
    missing: list[str] | None = None,
) -> None:
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                src = str(child.attrs.get("src", ""))
                child.attrs["src"] = asset_url(src, asset_base)
                width = widths.get(src) or widths.get(unquote(src)) if widths else None
                if width:
                    child.attrs["width"] = str(width)
                if is_decorative(child):
                    child.children = []  # rendered as alt=""
                    continue
                alt = "".join(c.content for c in child.children or ())
                if not alt.strip():
                    warnings.append(
                        f"{where}: image '{src}' has no alt text (write ![\"\"](...) if it"
                        " is only decoration)"
                    )
                    if missing is not None:
                        missing.append(f"{where}: image '{src}'")


def asset_url(src: str, asset_base: str) -> str:
    """An image reference, relative to an article, as the reader's client will fetch it."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^//", src, re.I):
        return src
    relative = src
    while relative.startswith("../"):
        relative = relative[3:]
    relative = relative.removeprefix("./")
    if not src.startswith("../"):
        relative = f"articles/{relative}"
    return f"{asset_base.rstrip('/')}/{relative}" if asset_base else relative


def markdown_html(
    text: str,
    *,
    asset_base: str = "",
    warnings: list[str] | None = None,
    where: str = "",
    first_line: int = 1,
) -> str:
    """Markdown to HTML for an email body (images with a title become captioned figures)."""
    return _tokens_html(_parse(text, where, first_line), asset_base, warnings, where)


def markdown_both(
    text: str,
    *,
    asset_base: str = "",
    warnings: list[str] | None = None,
    where: str = "",
    first_line: int = 1,
    image_dir: Path | None = None,
    missing_alt: list[str] | None = None,
    image_labels: tuple[str, str] = ("Image", "picture"),
) -> tuple[str, str]:
    """``(markdown_html(...), markdown_text(text))`` from one parse.

    An issue is mostly Markdown, so this is most of a render. Results are kept for
    text seen before: re-rendering after one article changed (the preview server,
    `issue show` then `build`) converts only that article again. ``image_dir`` is
    where the text's image paths start, to show each image at its own width.
    ``image_labels`` are the text part's words for an image: "[Image: alt]", and for
    one with neither alt text nor title, in the reader's language.
    """
    widths = image_widths(text, image_dir) if image_dir is not None else ()
    markup, plain, found, missing = _markdown_both(
        text, asset_base, where, first_line, widths, image_labels
    )
    if warnings is not None:
        warnings.extend(found)
    if missing_alt is not None:
        missing_alt.extend(missing)
    return markup, plain


def image_widths(text: str, image_dir: Path) -> tuple[tuple[str, int], ...]:
    """(src, width to show it at) for each local image the Markdown ``text`` uses.

    Read outside the render cache, so a replaced image file is seen at once.
    """
    found: dict[str, int] = {}
    for match in _MD_IMAGE.finditer(text):
        src = match.group(1)
        path = image_dir / src
        if src in found or re.match(r"^[a-z][a-z0-9+.-]*:|^//", src, re.I) or not path.is_file():
            continue
        found[src] = images.info(path).display_width
    return tuple(found.items())


@lru_cache(maxsize=256)
def _markdown_both(
    text: str,
    asset_base: str,
    where: str,
    first_line: int,
    widths: tuple[tuple[str, int], ...] = (),
    image_labels: tuple[str, str] = ("Image", "picture"),
) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    warnings: list[str] = []
    missing: list[str] = []
    tokens = _parse(text, where, first_line)
    # The text first: _tokens_html rewrites the images' addresses in the tokens.
    plain = _TextWriter(TEXT_WIDTH, image_labels).render(tokens)
    markup = _tokens_html(tokens, asset_base, warnings, where, dict(widths), missing)
    return markup, plain, tuple(warnings), tuple(missing)


def _tokens_html(
    tokens: Sequence[Token],
    asset_base: str,
    warnings: list[str] | None,
    where: str,
    widths: Mapping[str, int] | None = None,
    missing: list[str] | None = None,
) -> str:
    md = _markdown()
    _rewrite_images(
        tokens, asset_base, warnings if warnings is not None else [], where, widths, missing
    )
    _shift_headings(tokens)
    rendered = str(md.renderer.render(tokens, md.options, {}))
    if _has_raw_html(tokens):
        rendered = _clean_html(rendered)
    return _captioned_images(rendered)


# The masthead is the h1 and an article's title its h2: the Markdown's own headings go
# below them (# and ## become h3, ### h4, ...), so a sub-heading never reads as a new article.
FIRST_BODY_HEADING = 3


def _shift_headings(tokens: Sequence[Token]) -> None:
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            level = int(token.tag[1:])
            token.tag = f"h{min(max(level + 1, FIRST_BODY_HEADING), 6)}"


def _has_raw_html(tokens: Sequence[Token]) -> bool:
    return any(
        token.type == "html_block" or any(c.type == "html_inline" for c in token.children or ())
        for token in tokens
    )


def _clean_html(markup: str) -> str:
    """Raw HTML an editor (or an import) left in Markdown, made safe for the email.

    A stray ``<b>`` or ``</mj-text>`` would break the MJML (reported against the
    template, not the article) and ``<script>`` would reach inboxes; nh3 keeps the
    safe tags and attributes (``<img width alt>``, ``<sub>``, ...) and balances them.
    """
    import nh3

    return str(nh3.clean(markup, clean_content_tags={"script", "style"}, link_rel=None))


_IMG_PARAGRAPH = re.compile(r"<p>\s*(<img [^>]*?)\s*/?>\s*</p>")


def _captioned_images(body: str) -> str:
    def replace(match: re.Match[str]) -> str:
        tag = match.group(1)
        title = re.search(r'title="([^"]*)"', tag)
        tag = re.sub(r'\s*title="[^"]*"', "", tag)
        # Its own width (read from the file), at most the column's: a narrow image is not
        # stretched. Remote images, whose size is unknown, get the column's.
        own = re.search(r'\swidth="(\d+)"', tag)
        width = min(int(own.group(1)), images.COLUMN_WIDTH) if own else images.COLUMN_WIDTH
        tag = re.sub(r'\s*width="[^"]*"', "", tag)
        style = f' style="max-width:{width}px"' if width < images.COLUMN_WIDTH else ""
        image = f'{tag} class="body-image" width="{width}"{style} />'
        caption = f'<p class="caption">{title.group(1)}</p>' if title else ""
        return f'<div class="figure">{image}{caption}</div>'

    return _IMG_PARAGRAPH.sub(replace, body)


# --- plain text --------------------------------------------------------------------------


def markdown_text(text: str, width: int = TEXT_WIDTH) -> str:
    """Markdown to readable plain text: lists numbered, quotes marked, links written out."""
    return _TextWriter(width).render(_parse(text, "", 1))


def _join_blocks(blocks: Sequence[str], depths: Sequence[int]) -> str:
    """Blank lines between blocks; inside a quote the blank line keeps its ">" marks."""
    out: list[str] = []
    previous = 0
    for block, depth in zip(blocks, depths, strict=True):
        if not block.strip():
            continue
        if out:
            shared = min(previous, depth)
            out.append(("\n" + ">" * shared + "\n") if shared else "\n\n")
        out.append(block)
        previous = depth
    return "".join(out)


class _TextWriter:
    """Walks markdown-it block tokens and writes wrapped plain text."""

    def __init__(self, width: int, image_labels: tuple[str, str] = ("Image", "picture")) -> None:
        self.width = width
        self.image_label, self.picture_label = image_labels

    def render(self, tokens: Sequence[Token]) -> str:
        blocks: list[str] = []
        quote_depth = 0
        lists: list[list[int]] = []  # stack of [ordered, counter]
        item_prefix: str | None = None
        depths: list[int] = []  # the quote depth of each block
        new_top_list = False
        for index, token in enumerate(tokens):
            if token.type == "blockquote_open":
                quote_depth += 1
            elif token.type == "blockquote_close":
                quote_depth -= 1
            elif token.type in ("ordered_list_open", "bullet_list_open"):
                start = int(token.attrs.get("start", 1) or 1)
                new_top_list = not lists  # its first item starts a new block
                lists.append([token.type == "ordered_list_open", start])
            elif token.type in ("ordered_list_close", "bullet_list_close"):
                lists.pop()
            elif token.type == "list_item_open":
                ordered, counter = lists[-1]
                item_prefix = f"{counter}. " if ordered else "- "
                lists[-1][1] = counter + 1
            elif token.type == "inline":
                content = self.inline(token.children or [])
                indent = "   " * max(len(lists) - 1, 0)
                prefix = "> " * quote_depth
                if item_prefix is not None:
                    first, rest = (
                        prefix + indent + item_prefix,
                        prefix + indent + " " * len(item_prefix),
                    )
                    item_prefix = None
                    # Items follow the previous item (of this list or, for a nested
                    # list's first item, of its parent) without a blank line.
                    last = blocks[-1].rsplit("\n", 1)[-1] if blocks else None
                    # markdown-it hides the paragraphs of a tight list; a loose list
                    # keeps a blank line between its items.
                    tight = index > 0 and tokens[index - 1].hidden and not new_top_list
                    new_top_list = False
                    tight_join = (
                        tight
                        and last is not None
                        and any(
                            last.startswith(level) and _is_list_line(last, level)
                            for level in (prefix + "   " * depth for depth in range(len(lists)))
                        )
                    )
                    text = self.wrap(content, first, rest)
                    if tight_join:
                        blocks[-1] = f"{blocks[-1]}\n{text}"
                    else:
                        blocks.append(text)
                elif index and tokens[index - 1].type == "heading_open":
                    heading = tokens[index - 1].tag
                    prefix = "> " * quote_depth
                    shown = content.upper() if heading == "h2" else content
                    title = self.wrap(shown, prefix, prefix)
                    underline = min(max(len(line) for line in title.split("\n")), self.width)
                    blocks.append(title + "\n" + prefix + "-" * (underline - len(prefix)))
                else:
                    # A list item's later paragraphs line up under its text.
                    body_indent = prefix + "   " * len(lists)
                    blocks.append(self.wrap(content, body_indent, body_indent))
            elif token.type == "hr":
                blocks.append("* * *")
            elif token.type in ("fence", "code_block"):
                blocks.append(textwrap.indent(token.content.rstrip("\n"), "    "))
            depths.extend([quote_depth] * (len(blocks) - len(depths)))
        return _join_blocks(blocks, depths)

    def wrap(self, text: str, first: str, rest: str) -> str:
        lines: list[str] = []
        for index, paragraph_line in enumerate(text.split("\n")):
            lines.extend(
                wrap_line(paragraph_line, self.width, first if index == 0 else rest, rest)
                or [first.rstrip()]
            )
        return "\n".join(lines)

    def inline(self, children: Sequence[Token]) -> str:
        out: list[str] = []
        href_stack: list[str] = []
        start_stack: list[int] = []
        for child in children:
            if child.type == "text" or child.type == "code_inline":
                out.append(child.content)
            elif child.type in ("softbreak",):
                out.append(" ")
            elif child.type == "hardbreak":
                out.append("\n")
            elif child.type == "link_open":
                href_stack.append(str(child.attrs.get("href", "")))
                start_stack.append(len(out))
            elif child.type == "link_close":
                href = href_stack.pop()
                label = "".join(out[start_stack.pop() :])
                if href and href != label and not href.startswith("#"):
                    out.append(f" <{href}>")
            elif child.type == "image":
                if is_decorative(child):
                    continue
                alt = "".join(c.content for c in child.children or ())
                title = str(child.attrs.get("title", "") or "")
                out.append(f"[{self.image_label}: {alt or title or self.picture_label}]")
                if title and title != alt:
                    out.append(f" {title}")
            elif child.type in ("em_open", "em_close"):
                out.append("_")
            elif child.type in ("strong_open", "strong_close"):
                out.append("*")
        return "".join(out).strip()


# Text that textwrap treats differently from "words separated by single spaces": other
# ASCII whitespace, runs of spaces, spaces at either end, or a word made only of other
# whitespace (which textwrap drops at line ends).
_IRREGULAR_SPACE = re.compile(r"[\t\n\x0b\x0c\r]|  |^ | $|(?:^| )[^\S ]+(?= |$)")


def wrap_line(line: str, width: int, first: str, rest: str) -> list[str]:
    """``textwrap.wrap(line, width, initial_indent=first, subsequent_indent=rest,
    break_long_words=False, break_on_hyphens=False)``, with a fast path.

    textwrap was a fifth of a warm render; nearly every line of an issue is words with
    single spaces, which this fills greedily to the same result (a test checks that).
    """
    if _IRREGULAR_SPACE.search(line):
        return textwrap.wrap(
            line,
            width=width,
            initial_indent=first,
            subsequent_indent=rest,
            break_long_words=False,
            break_on_hyphens=False,
        )
    if not line:
        return []
    words = line.split(" ")
    lines: list[str] = []
    indent, room = first, width - len(first)
    current, length = [words[0]], len(words[0])
    for word in words[1:]:
        if length + 1 + len(word) <= room:
            current.append(word)
            length += 1 + len(word)
        else:
            lines.append(indent + " ".join(current))
            indent, room = rest, width - len(rest)
            current, length = [word], len(word)
    lines.append(indent + " ".join(current))
    return lines


def _is_list_line(block: str, prefix: str) -> bool:
    last = block.rsplit("\n", 1)[-1][len(prefix) :]
    return bool(re.match(r"(\d+\. |- )", last)) or last.startswith("   ")


# --- the Jinja environment ---------------------------------------------------------------


def theme_translations(config: Config) -> gettext.NullTranslations:
    """The theme's messages in the workspace's language (its own catalogs first)."""
    return i18n.translations(config.newsletter.locale, config.templates_dir)


def theme_gettext(config: Config) -> Callable[..., str]:
    """``_("Unsubscribe from %(newsletter)s", newsletter=...)`` for Python code, in the
    workspace's language (the same catalogs as the templates)."""
    translations = theme_translations(config)

    def gettext(message: str, **values: Any) -> str:
        translated = translations.gettext(message)
        return translated % values if values else translated

    return gettext


def render_theme_template(config: Config, name: str, values: Mapping[str, Any]) -> str:
    """One of the theme's other templates (``service/...``, ``archive/...``), which the
    workspace's templates/ overrides file by file like the email's, in its language."""
    env = workspace_environment(config)
    env.install_gettext_translations(theme_translations(config), newstyle=True)  # type: ignore[attr-defined]
    return _render_template(env, name, {"locale": config.newsletter.locale, **values})


def greeting_fallback(config: Config) -> str:
    """Who "Hello ...," greets when a reader's first name is unknown."""
    news = config.newsletter
    return news.greeting_fallback or theme_translations(config).gettext("there")


def unknown_fields(rendered: RenderedIssue, known: Iterable[str]) -> list[str]:
    """A warning for each ``recipient.field(NAME)`` the templates use that no subscriber
    has (a typo such as ``field("citty")`` would print nothing for every reader)."""
    have = {name.lower() for name in known}
    used = sorted({key for key in rendered.placeholders.values() if key.startswith("field.")})
    return [
        f'templates use recipient.field("{key[6:]}"), which no subscriber has: it will be'
        " empty for every reader (check the name against `newsletter subscribers export`)"
        for key in used
        if key[6:] not in have
    ]


def template_environment(workspace_templates: Path | None) -> jinja2.Environment:
    """Workspace templates override the packaged theme file by file; ``!default/`` reaches it."""
    theme = str(default_theme_dir())
    loaders: list[jinja2.BaseLoader] = [
        jinja2.PrefixLoader({DEFAULT_THEME_PREFIX: jinja2.FileSystemLoader(theme)}, delimiter="/"),
    ]
    if workspace_templates is not None and workspace_templates.is_dir():
        loaders.append(jinja2.FileSystemLoader(str(workspace_templates)))
    loaders.append(jinja2.FileSystemLoader(theme))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("mjml", "html", "xml"), default_for_string=True, default=False
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=True,
        extensions=["jinja2.ext.i18n"],
    )
    env.install_null_translations(newstyle=True)  # type: ignore[attr-defined]
    env.filters["markdown"] = lambda text: markdown_html(str(text))
    env.filters["wrap"] = wrap_text
    for name, function in list(env.filters.items()):
        if name not in _PRINTING_FILTERS:
            env.filters[name] = _refusing_reader_values(name, function)
    return env


# Filters that print a value as it is (escaped, marked safe, wrapped whole): the only ones a
# per-reader placeholder may go through.
_PRINTING_FILTERS = frozenset({"e", "escape", "forceescape", "safe", "string", "default", "d"})


def _refusing_reader_values(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a Jinja filter), refusing a per-reader value: in a text template
    Jinja passes it ``str(value)``, the bare placeholder, which no check could catch later."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0
        value = args[skip] if len(args) > skip else None
        if isinstance(value, ReaderValue):
            raise ReaderValueMisuse(value.key, f"changed with | {name}")
        return function(*args, **kwargs)

    return checked


def wrap_text(text: object, width: int = TEXT_WIDTH, indent: str = "") -> str:
    """``text`` wrapped for the plain-text part; lines after the first start with ``indent``.

    A word longer than the line (a web address) stays whole, on a line of its own, and so
    does one with a reader's value in it (an address of any length fills it at send time).
    """
    lines: list[str] = []
    words: list[str] = []
    for word in str(text).split():
        if _PLACEHOLDER_RE.search(word):
            lines.extend(wrap_line(" ".join(words), width, indent if lines else "", indent))
            lines.append((indent if lines else "") + word)
            words = []
        else:
            words.append(word)
    lines.extend(wrap_line(" ".join(words), width, indent if lines else "", indent))
    return "\n".join(lines)


def workspace_environment(config: Config) -> jinja2.Environment:
    """The environment for a workspace, kept while its set of template files stays the same.

    Jinja2 re-checks a cached template only against the file it came from, so a
    newly added override would be ignored by a long-running process (the preview
    server) until restart; keying on the file names avoids that.
    """
    folder = config.templates_dir
    if not folder.is_dir():
        return _cached_environment(None, ())
    names = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    return _cached_environment(folder, names)


@lru_cache(maxsize=16)
def _cached_environment(
    workspace_templates: Path | None, file_names: tuple[str, ...]
) -> jinja2.Environment:
    return template_environment(workspace_templates)


def clear_template_cache() -> None:
    """Forget loaded templates, so a template added or removed while previewing is seen."""
    _cached_environment.cache_clear()


def format_date(
    date: dt.date | None, pattern: str, locale: str = "en", *, default: str = "long"
) -> str:
    """Fill ``{month}/{day}/{yy}``-style patterns (portable, unlike strftime's ``%-m``), with
    ``locale``'s month and weekday names; an empty pattern is the locale's own ``default``
    (``long``: November 20, 2026; ``short``: 11/20/26) format."""
    if date is None:
        return ""
    if not pattern:
        return i18n.locale_date(date, default, locale)
    fields = {
        "day": date.day,
        "dd": f"{date.day:02d}",
        "month": date.month,
        "mm": f"{date.month:02d}",
        "yy": f"{date.year % 100:02d}",
        "year": date.year,
    }
    if "{month_name}" in pattern:
        fields["month_name"] = i18n.month_names(locale)[date.month]
    if "{mon}" in pattern:
        fields["mon"] = i18n.month_names(locale, "abbreviated")[date.month]
    if "{weekday}" in pattern:
        fields["weekday"] = i18n.weekday_name(date, locale)
    return pattern.format(**fields)


def byline(
    article: Article,
    date_format: str,
    locale: str = "en",
    gettext: Callable[[str], str] | None = None,
) -> str:
    """ "By Author, Source, 3/15/25", or "Source, 3/14/25" with no author."""
    date = format_date(article.date, date_format, locale, default="short")
    parts = [p for p in (article.source, date) if p]
    if article.author:
        _ = gettext or _english
        by = _("By %(author)s") % {"author": article.author}
        return ", ".join([by, *parts])
    return ", ".join(parts)


def _english(message: str) -> str:
    return message


@dataclass(frozen=True)
class _ArticleView:
    """What the templates see of an article: text already turned into HTML and plain text."""

    number: int
    anchor: str
    title: str
    byline: str
    url: str
    image: str
    image_alt: str
    image_width: int  # the lead image's width in the email: its own, at most the column's
    summary: str
    body_html: str
    body_text: str
    bio_html: str
    bio_text: str
    author: str
    source: str
    word_count: int


def _nonce(issue: Issue, config: Config) -> str:
    digest = hashlib.sha256()
    digest.update(f"{config.newsletter!r}{issue.title}{issue.preheader}{issue.intro}".encode())
    for article in issue.articles:
        # Not the full path: the same issue must give the same tokens wherever it lives.
        digest.update(f"{dataclasses.replace(article, path=Path(article.path.name))!r}".encode())
    return digest.hexdigest()[:10]


def _article_views(
    issue: Issue,
    config: Config,
    asset_base: str,
    warnings: list[str],
    missing_alt: list[str] | None = None,
) -> list[_ArticleView]:
    views = []
    labels = _image_labels(config)
    for number, article in enumerate(issue.articles, start=1):
        where = str(article.path)
        body_html, body_text = markdown_both(
            article.body,
            asset_base=asset_base,
            warnings=warnings,
            where=where,
            first_line=article.body_line,
            image_dir=article.path.parent,
            missing_alt=missing_alt,
            image_labels=labels,
        )
        lead = article.path.parent / article.image if article.image else None
        lead_width = (
            images.info(lead).display_width
            if lead is not None and lead.is_file()
            else images.COLUMN_WIDTH
        )
        bio_html, bio_text = (
            markdown_both(article.bio, where=f"{where} (bio)") if article.bio else ("", "")
        )
        views.append(
            _ArticleView(
                number=number,
                anchor=f"article-{number}",
                title=article.title,
                byline=byline(
                    article,
                    config.newsletter.date_format,
                    config.newsletter.locale,
                    theme_translations(config).gettext,
                ),
                url=article.url,
                image=asset_url(article.image, asset_base) if article.image else "",
                image_alt=article.image_alt,
                image_width=lead_width,
                summary=article.summary,
                body_html=body_html,
                body_text=body_text,
                bio_html=bio_html,
                bio_text=bio_text,
                author=article.author,
                source=article.source,
                word_count=article.word_count,
            )
        )
        if article.url.startswith("http://"):
            warnings.append(f"{where}: url uses http, not https")
    return views


def _image_labels(config: Config) -> tuple[str, str]:
    translations = theme_translations(config)
    return translations.gettext("Image"), translations.gettext("picture")


def _context(
    issue: Issue,
    config: Config,
    *,
    subject: str,
    recipient: RecipientPlaceholders,
    web: bool,
    asset_base: str,
    warnings: list[str],
    missing_alt: list[str] | None = None,
) -> dict[str, Any]:
    news = config.newsletter
    urls = config.public_urls
    intro_html, intro_text = markdown_both(
        issue.intro,
        asset_base=asset_base,
        warnings=warnings,
        where=str(issue.path / ISSUE_FILE),
        first_line=issue.intro_line,
        image_dir=issue.path / "articles",
        missing_alt=missing_alt,
        image_labels=_image_labels(config),
    )
    return {
        "newsletter": news,
        "issue": issue,
        "subject": subject,
        "preheader": issue.preheader,
        "issue_date": format_date(issue.date, news.issue_date_format, news.locale),
        "intro_html": intro_html,
        "intro_text": intro_text,
        "articles": _article_views(issue, config, asset_base, warnings, missing_alt),
        "recipient": recipient,
        "web": web,
        "web_url": urls.issue(issue.slug),
        "archive_url": urls.home,
        "feed_url": urls.feed,
        "subscribe_url": urls.subscribe,
        # The preferences page is answered by `newsletter serve`, like the https unsubscribe.
        "preferences": bool(config.unsubscribe.url),
        "locale": news.locale,
    }


def _render_template(env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
    try:
        return env.get_template(name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"template syntax error: {exc.message}",
            where=f"{exc.filename or exc.name}:{exc.lineno}",
            hint="fix the template",
        ) from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(
            f"template '{exc.name}' not found",
            where=name,
            hint="check the name, or use '!default/...' for the packaged theme",
        ) from None
    except jinja2.UndefinedError as exc:
        raise RenderError(
            f"unknown template variable: {exc.message}",
            where=_template_location(exc) or name,
            hint="fix the name, or use `| default(...)` in the template",
        ) from None
    except ValueError as exc:
        raise RenderError(
            str(exc), where=_template_location(exc) or name, hint="fix the template"
        ) from None
    except ReaderValueMisuse as exc:
        shown = (
            f'recipient.field("{exc.key.removeprefix("field.")}")'
            if exc.key.startswith("field.")
            else f"recipient.{exc.key}"
        )
        raise RenderError(
            f"{shown} is {exc.operation}: the email is rendered once for every reader, so"
            " this would come out the same for all of them",
            where=_template_location(exc) or name,
            hint=f"print it as it is ({{{{ {shown} }}}}); send readers who differ separate"
            " issues (segments) instead of testing their values in a template",
        ) from None


def _template_file(env: jinja2.Environment, name: str) -> str:
    """The file a template name resolves to (a workspace override or the theme), for errors."""
    return env.get_template(name).filename or name


def _template_location(exc: BaseException) -> str | None:
    """The innermost template file and line of an error raised while rendering."""
    location = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if frame.f_globals.get("__jinja_template__") is not None or filename.endswith(
            (".mjml", ".txt", ".html", ".css")
        ):
            location = f"{filename}:{line}"
    return location


def mjml_to_html(
    source: str, *, template: str = EMAIL_TEMPLATE, inline: bool = True, compact: bool = True
) -> str:
    """MJML to email HTML with CSS inlined; media queries stay in <style>.

    As in MJML itself, an ``<mj-style inline="inline">`` is inlined and not kept in
    ``<head>`` (only what cannot be inlined, such as a media query, stays there). The
    rest is made smaller without changing what a client shows (:func:`merge_sections`,
    premailer without ``align`` copies, :func:`compact.compact_html`); ``compact=False``
    skips these steps, for comparing. With
    ``inline=False`` (the web page, for browsers) every style stays in ``<head>``.
    """
    css: list[str] = []
    if inline and compact:
        css = [match.group(1) for match in _INLINE_STYLE.finditer(source)]
        source = merge_sections(_INLINE_STYLE.sub("", source))
    try:
        raw = mjml.mjml2html(source, fonts={})
    except ValueError as exc:
        raise RenderError(
            f"MJML error: {exc}", where=template, hint="check the MJML the template produces"
        ) from None
    if not inline:
        return raw
    raw = _STYLE_OPEN.sub(_keep_mjml_styles_in_head, raw)
    inliner = _premailer_class()(
        allow_network=False,
        strip_important=False,
        keep_style_tags=True,
        remove_classes=False,
        disable_validation=True,
        css_text=css,
        # Keep the pixel width="..." that MJML and the theme put on images: premailer would
        # overwrite it with CSS's "100%" (and add height="auto"), and Outlook for Windows
        # then shows each image at its natural size.
        # Nor its align="..." copy of every text-align: every client reads text-align
        # (caniemail, "text-align"), and on a table align means the table's own place.
        disable_basic_attributes=["width", "height", *(["align"] if compact else [])],
        # This step parses every <img> style with cssutils (slow) to look for a float;
        # without "float" in any CSS or <img> tag it cannot find one.
        align_floating_images=_may_float(raw) or any("float" in c.lower() for c in css),
        cssutils_logging_level=logging.CRITICAL,
    )
    inlined = str(inliner.transform(raw, pretty_print=False)).replace(
        ' data-premailer="ignore"', ""
    )
    if not inlined.lstrip().lower().startswith("<!doctype"):
        inlined = "<!doctype html>\n" + inlined
    return compact_html(inlined) if compact else inlined


# A section and its one column, both with only their default attributes.
_PLAIN_SECTION = re.compile(
    r"<mj-section>\s*<mj-column>"
    r"((?:(?!<mj-(?:section|column|wrapper|group|raw)\b|</mj-(?:section|column)>).)*)"
    r"</mj-column>\s*</mj-section>",
    re.S,
)
_ATTRIBUTES = re.compile(r"<mj-attributes>(.*?)</mj-attributes>", re.S)


def merge_sections(source: str) -> str:
    """MJML with each run of adjacent plain one-column sections made one section.

    Every section costs about a kilobyte of tables and Outlook comments. Sections with no
    padding of their own (the theme's mj-attributes say ``padding="0"``) and one column
    stack exactly as one section whose column holds all their content. Anything else
    (other attributes, several columns, a padding by default) is left as it is.
    """
    defaults = " ".join(_ATTRIBUTES.findall(source))
    if not re.search(r'<mj-section\b[^>]*\bpadding="0(?:px)?"', defaults) or re.search(
        r"<mj-column\b|<mj-all\b[^>]*\b(?:padding|border)", defaults
    ):
        return source
    out: list[str] = []
    run: list[str] = []
    position = 0
    for match in _PLAIN_SECTION.finditer(source):
        between = source[position : match.start()]
        if run and between.strip():
            out.append(_one_section(run))
            run = []
        if not run:
            out.append(between)
        run.append(match.group(1))
        position = match.end()
    if run:
        out.append(_one_section(run))
    out.append(source[position:])
    return "".join(out)


def _one_section(contents: list[str]) -> str:
    return "<mj-section><mj-column>" + "".join(contents) + "</mj-column></mj-section>"


_INLINE_STYLE = re.compile(r"<mj-style\s+inline=[\"']inline[\"']\s*>(.*?)</mj-style>", re.I | re.S)
_STYLE_BLOCK = re.compile(r"<style\b[^>]*>(.*?)</style>", re.I | re.S)
_STYLE_OPEN = re.compile(r"<style\b([^>]*)>(.*?)</style>", re.I | re.S)
_MJML_OWN_CSS = ("#outlook a", ".mj-", ".moz-text-html")


def _keep_mjml_styles_in_head(match: re.Match[str]) -> str:
    """MJML's own reset and layout CSS is written for <head>, not for inlining.

    Inlining it would copy the reset onto every table and cell (~6 KB, ~3 ms) and
    turn its Outlook-only column fixes into rules every client obeys.
    """
    attributes, css = match.group(1), match.group(2)
    if any(marker in css for marker in _MJML_OWN_CSS) and "data-premailer" not in attributes:
        return f'<style{attributes} data-premailer="ignore">{css}</style>'
    return match.group(0)


_IMG_FLOAT = re.compile(r"<img\b[^>]*float", re.I)


def _may_float(markup: str) -> bool:
    """Could premailer find an image with a CSS float (from a style block or its own style)?"""
    return bool(_IMG_FLOAT.search(markup)) or any(
        "float" in css.lower() for css in _STYLE_BLOCK.findall(markup)
    )


@cache
def _premailer_class() -> Any:
    """premailer.Premailer, imported on first use and with its CSS rules cached.

    The import costs ~0.1 s (cssutils, requests) that `--help`, `issue list` and
    the like do not need. On every call premailer re-serialises each rule of the
    theme's CSS through cssutils, which is most of its time; the result depends only
    on the CSS text and the options, so it is kept. (Rules are only mutated later
    when ``keep_style_tags`` is off, so those calls are not cached.)
    """
    import cssutils
    import premailer

    # We inline with validation off, but premailer validates each element's existing
    # inline style anyway (merge_styles), and cssutils compiles one large regex per CSS
    # property the first time: ~0.15 s of a cold build, for log lines nobody sees.
    # Without profiles there is nothing to validate against; the output is the same.
    cssutils.profile.removeProfile(all=True)

    rules: dict[tuple[Any, ...], Any] = {}

    class CachingPremailer(premailer.Premailer):  # type: ignore[misc]
        def _parse_style_rules(self, css_body: str, ruleset_index: int) -> Any:
            if not self.keep_style_tags:
                return super()._parse_style_rules(css_body, ruleset_index)
            key = (
                css_body,
                ruleset_index,
                self.strip_important,
                self.disable_validation,
                self.exclude_pseudoclasses,
                self.include_star_selectors,
            )
            if key not in rules:
                if len(rules) > 64:
                    rules.clear()
                rules[key] = super()._parse_style_rules(css_body, ruleset_index)
            return rules[key]

        def _process_css_text(self, css_text: str, index: int, rules: Any, head: Any) -> None:
            # premailer keeps all of css_text in <head> when keep_style_tags is on; an
            # mj-style inline="inline" keeps only what it could not inline.
            these_rules, leftover = self._parse_style_rules(css_text, index)
            rules.extend(these_rules)
            if head is not None and leftover:
                from lxml import etree

                style = etree.Element("style")
                style.attrib["type"] = "text/css"
                style.text = self._css_rules_to_string(leftover)
                head.append(style)

    return CachingPremailer


def render_issue(
    issue: Issue, config: Config, *, asset_base: str | None = None, compact: bool = True
) -> RenderedIssue:
    """Render an issue once: email HTML and text with placeholders, and the web page.

    ``asset_base`` is where images are fetched from: by default the issue's web
    address (``base_url/slug``), ``""`` for paths relative to the build folder.
    ``compact=False`` leaves out the steps that only make the email's HTML smaller
    (see :func:`mjml_to_html`), to compare with.
    """
    require_buildable(issue)
    base = config.public_urls.issue(issue.slug).rstrip("/") if asset_base is None else asset_base
    env = workspace_environment(config)
    env.install_gettext_translations(theme_translations(config), newstyle=True)  # type: ignore[attr-defined]
    subject = issue.subject(config.newsletter.subject_max_length)
    placeholders = Placeholders(_nonce(issue, config))
    warnings: list[str] = []
    missing_alt: list[str] = []
    email_ctx = _context(
        issue,
        config,
        subject=subject,
        recipient=RecipientPlaceholders(placeholders),
        web=False,
        asset_base=base,
        warnings=warnings,
        missing_alt=missing_alt,
    )
    email_mjml = _render_template(env, EMAIL_TEMPLATE, email_ctx)
    email_template = _template_file(env, EMAIL_TEMPLATE)
    email_html = mjml_to_html(email_mjml, template=email_template, compact=compact)
    text = _tidy_text(_render_template(env, TEXT_TEMPLATE, email_ctx))
    web_ctx = dict(email_ctx, recipient=RecipientPlaceholders(None), web=True)
    web_ctx["articles"] = email_ctx["articles"]
    # Browsers read <style> blocks, so the web page skips premailer's inlining.
    web_html = web_landmarks(
        mjml_to_html(
            _render_template(env, EMAIL_TEMPLATE, web_ctx), template=email_template, inline=False
        )
    )
    warnings.extend(_transparent_images(issue))
    if not issue.preheader:
        warnings.append(
            f"{issue.path / 'issue.md'}: no preheader; "
            "the inbox will show the first words of the email instead"
        )
    rendered = RenderedIssue(
        issue=issue,
        subject=subject,
        preheader=issue.preheader,
        html=email_html,
        text=text,
        web_html=web_html,
        placeholders=MappingProxyType(dict(placeholders.used)),
        assets=tuple(_assets(issue)),
        warnings=tuple(dict.fromkeys(warnings)),
        missing_alt=tuple(dict.fromkeys(missing_alt)),
    )
    if rendered.over_gmail_clip:
        warnings.append(
            f"email HTML is {rendered.html_size / 1024:.0f} KB, over Gmail's ~102 KB clipping "
            "size; shorten the issue or use excerpts"
        )
        rendered = RenderedIssue(
            **{**rendered.__dict__, "warnings": tuple(dict.fromkeys(warnings))}
        )
    return rendered


_LANDMARK = re.compile(r"<!--(/?)landmark:(header|nav|main|footer)-->")
# MJML's wrapper announces an email (role="article"): right in a mail client, but on a web
# page it would make the page's header and footer parts of an article, not landmarks.
_EMAIL_ROLE = re.compile(
    r'(<div)\s+aria-label="[^"]*"|\s+aria-roledescription="email"|\s+role="article"'
)


def web_landmarks(markup: str) -> str:
    """The web page's ``<!--landmark:main-->`` markers as the elements they stand for.

    MJML cannot put an element around its sections, so the theme marks where the page's
    header, main and footer start and end (on the web page only; an email sits inside
    the client's own page, which has its own).
    """
    if not _LANDMARK.search(markup):
        return markup
    body = markup.find("<body")
    start = markup.find("<div", body)
    end = markup.find(">", start) + 1
    wrapper = _EMAIL_ROLE.sub(lambda m: m.group(1) or "", markup[start:end])
    markup = markup[:start] + wrapper + markup[end:]
    return _LANDMARK.sub(lambda m: f"<{m.group(1)}{m.group(2)}>", markup)


def _tidy_text(text: str) -> str:
    """Collapse runs of blank lines the template leaves, and end with one newline."""
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def issue_images(issue: Issue) -> list[tuple[Path, str]]:
    """(original file, path relative to the issue's page) of each local image, in order."""
    return list(_assets(issue))


def _assets(issue: Issue) -> Iterator[tuple[Path, str]]:
    seen: set[str] = set()
    for article in issue.articles:
        for image, _ in article.image_paths():
            source = (article.path.parent / image).resolve()
            relative = asset_url(image, "")
            if relative not in seen:
                seen.add(relative)
                yield source, relative


def _transparent_images(issue: Issue) -> Iterator[str]:
    """A warning for each image with see-through parts.

    The dark theme gives images a light ground, but clients that darken an email by
    themselves (Gmail's apps, Outlook for Windows) put a dark one behind them, where a
    dark drawing or logo on a transparent background disappears.
    """
    for source, relative in _assets(issue):
        if source.is_file() and images.info(source).transparent:
            yield (
                f"{source}: image '{relative}' is transparent: in dark mode some clients show"
                " it on a dark ground, where dark lines vanish; give it a solid light background"
            )


def find_placeholders(text: str) -> list[str]:
    """Every placeholder token left in ``text`` (a test and a safety check use this)."""
    return _PLACEHOLDER_RE.findall(text)


def split_on_placeholders(text: str) -> list[str]:
    """``text`` cut around anything spelled like a placeholder: literal pieces at even
    indexes, placeholder-shaped tokens at odd ones (``message`` fills those per recipient)."""
    return _PLACEHOLDER_RE.split(text)


def fill_placeholders(text: str, fill: Callable[[re.Match[str]], str]) -> str:
    """``text`` with every placeholder-shaped token replaced by ``fill(match)``."""
    return _PLACEHOLDER_RE.sub(fill, text)


def visible_text(markup: str) -> str:
    """The text a reader sees in an HTML document (for size comparisons and checks)."""
    markup = re.sub(r"(?is)<(style|script|head)\b.*?</\1>", " ", markup)
    markup = re.sub(r"(?is)<!--.*?-->", " ", markup)
    markup = re.sub(r"(?s)<[^>]+>", " ", markup)
    return " ".join(html.unescape(markup).split())


def build(issue: Issue, config: Config, out_dir: Path | None = None) -> BuildResult:
    """Render and write ``email.html``, ``email.txt``, ``web.html`` and the images (as
    readers get them: a large one is resized once, its original stays in the issue)."""
    rendered = render_issue(issue, config)
    out = out_dir or config.build_dir / issue.slug
    files = {
        "email.html": rendered.html.encode("utf-8"),
        "email.txt": rendered.text.encode("utf-8"),
        "web.html": rendered.web_html.encode("utf-8"),
    }
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    for source, relative in rendered.assets:
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(images.published_file(source, config.publish_dir / "images"), tmp)
        tmp.replace(target)
    return BuildResult(rendered=rendered, out_dir=out, files={n: len(d) for n, d in files.items()})
