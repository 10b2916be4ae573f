"""Email HTML with less markup and the same rendering: more room before Gmail clips (~102 KB).

Runs on premailer's output (styles inlined). Every step removes only what no mail client
needs, and says why; where a client's support is the reason, the fact comes from
caniemail.com (feature pages named in the comments) or from the MJML source. A screenshot
test compares the result with the uncompacted HTML, light and dark, at 375 and 600 px.

What is kept on purpose: MJML's Outlook conditional comments (only adjacent ones become
one), MJML's font declarations on each mj-text's ``<div>`` (Outlook for Windows does not
pass fonts from outside a table into its cells), declarations on headings (Outlook gives
``h1``-``h6`` its own styles), link colours (every client colours links its own way), and
every ``<style>`` rule a client can still use (media queries, dark mode, Outlook.com's
``[data-ogsc]``): Gmail with a non-Google account ignores ``<style>``, so the inline
declarations stay complete for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from lxml import etree

# Two Outlook-only comments in a row are one: "<![endif]--><!--[if mso | IE]>" says nothing.
_OUTLOOK_SEAM = "<![endif]--><!--[if mso | IE]>"
_STYLE_ATTRIBUTE = re.compile(r"""(\sstyle=)("[^"]*"|'[^']*')""")
_STYLE_BLOCK = re.compile(r"<style\b([^>]*)>(.*?)</style>", re.I | re.S)
_CSS_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_HEAD = re.compile(r"<head\b.*?</head>", re.I | re.S)
_CLASS_IN_CSS = re.compile(r"\.(-?[_a-zA-Z][\w-]*)")

# MJML writes, for each column width, a rule that gives the column its share of the row
# above 480 px (and the same for Thunderbird, .moz-text-html). A column of 100 % already
# has width:100% inline, so for it the rule sets what is there: nothing changes.
_FULL_WIDTH_COLUMN_RULE = re.compile(
    r"^(?:@media[^{]*\{)?(?:\.moz-text-html )?\.mj-column-per-100\{"
    r"width:100%(?:!important)?;max-width:100%\}\}?$"
)

# Properties a child inherits (CSS 2.1), compared with the value it would inherit.
_INHERITED = frozenset(
    {
        "color",
        "font-family",
        "font-size",
        "font-style",
        "font-weight",
        "letter-spacing",
        "line-height",
        "text-align",
        "text-transform",
    }
)
# Elements that get none of those properties from a client's own style sheet, so what
# they inherit is what they show. Not headings (Outlook's Word engine styles h1-h6 itself),
# not links (every client colours them), not em/strong/code/small and the like.
_PLAIN = frozenset({"p", "div", "li", "ol", "ul", "span", "blockquote"})
_CELLS = frozenset({"td", "th"})
_OUTLOOK_ONLY = re.compile(r"^\s*\[if\b")


def compact_html(markup: str) -> str:
    """``markup`` (premailer's output) with less markup and the same rendering.

    Adjacent Outlook conditional comments become one (as MJML's minifier does); style
    blocks lose comments and spaces, and MJML's rules for full-width columns, which
    repeat the inline width; inline declarations that repeat what the element inherits
    anyway go, and others no client needs (:func:`_needless`); mj-text rows merge where no
    gap changes (:func:`_merge_text_rows`); class names no remaining style rule uses go;
    style attributes lose spaces, the last ``;`` and long forms of colours, zeros and sides.
    """
    markup = markup.replace(_OUTLOOK_SEAM, "")
    markup = _STYLE_BLOCK.sub(_compact_style_block, markup)
    used = _classes_in_css(markup)
    markup = _compact_tree(markup, used)
    markup = _STYLE_ATTRIBUTE.sub(lambda m: m.group(1) + _compact_declarations(m.group(2)), markup)
    markup = _OUTLOOK_COMMENT.sub(
        lambda m: _drop_unused_classes_in_comment(m.group(0), used), markup
    )
    # Line breaks between the head's elements (MJML's Outlook settings, its style tags).
    return _HEAD.sub(lambda m: re.sub(r">\n\s*<", "><", m.group(0)), markup, count=1)


def _compact_style_block(match: re.Match[str]) -> str:
    attributes, css = match.group(1), compact_css(match.group(2))
    if _FULL_WIDTH_COLUMN_RULE.match(css):
        return ""
    return f"<style{attributes}>{css}</style>"


def compact_css(css: str) -> str:
    """A style sheet without comments and the spaces CSS does not need."""
    pieces = re.split(r"(\"[^\"]*\"|'[^']*')", " ".join(_CSS_COMMENT.sub(" ", css).split()))
    for index in range(0, len(pieces), 2):
        # A space before ":" can matter in a selector ("a :hover"); one after ":" or ","
        # never, nor one around a child combinator or before !important.
        piece = re.sub(r"([:,])\s+", r"\1", pieces[index])
        piece = re.sub(r"\s*>\s*", ">", piece)
        piece = re.sub(r"\s+!important", "!important", piece)
        pieces[index] = re.sub(r"\s*([{};])\s*", r"\1", piece)
    return "".join(pieces).replace(";}", "}")


# --- declarations --------------------------------------------------------------------------


def declarations(style: str) -> list[tuple[str, str]]:
    """``"a:1; b:x"`` as ``[("a", "1"), ("b", "x")]``: a ``;`` inside quotes or
    parentheses (``url(data:...;base64,...)``) does not end a declaration."""
    return list(_declarations(style))


_DECLARATION = re.compile(r"""(?:[^;"'(]|"[^"]*"|'[^']*'|\([^)]*\))+""")


@lru_cache(maxsize=4096)
def _declarations(style: str) -> tuple[tuple[str, str], ...]:
    found = []
    for piece in _DECLARATION.findall(style):
        name, colon, value = piece.partition(":")
        if colon and name.strip() and value.strip():
            found.append((name.strip().lower(), value.strip()))
    return tuple(found)


_LONG_HEX = re.compile(r"#([0-9a-fA-F])\1([0-9a-fA-F])\2([0-9a-fA-F])\3\b")
_ZERO_PX = re.compile(r"(?<![\w.#-])0px\b")


@lru_cache(maxsize=4096)
def _short_value(name: str, value: str) -> str:
    """The same value, written shorter.

    - ``#rrggbb`` with doubled digits as ``#rgb`` (CSS1; premailer itself already writes
      ``#111`` for every client). bgcolor attributes, which Lotus Notes misread in the
      short form, are left alone.
    - In margins and paddings, ``0px`` as ``0`` (CSS 2.1: a zero length needs no unit)
      and four sides in as few as say the same (``8px 24px 8px 24px`` is ``8px 24px``):
      the theme's own ``margin:0 0 16px`` already reaches every client, Outlook included.
    - No space after ``,`` outside quoted font names.
    """
    value = _outside_quotes(
        value, lambda piece: _LONG_HEX.sub(r"#\1\2\3", re.sub(r",\s+", ",", piece))
    )
    if name.startswith(("margin", "padding")):
        value = _ZERO_PX.sub("0", value)
    if name in ("margin", "padding"):
        value = " ".join(_fewest_sides(value.split()))
    return value


def _outside_quotes(value: str, change: Callable[[str], str]) -> str:
    pieces = re.split(r"(\"[^\"]*\"|'[^']*')", value)
    return "".join(change(piece) if index % 2 == 0 else piece for index, piece in enumerate(pieces))


def _fewest_sides(sides: list[str]) -> list[str]:
    """CSS box shorthand: left defaults to right, bottom to top, right to top."""
    if len(sides) == 4 and sides[3] == sides[1]:
        sides = sides[:3]
    if len(sides) == 3 and sides[2] == sides[0]:
        sides = sides[:2]
    if len(sides) == 2 and sides[1] == sides[0]:
        sides = sides[:1]
    return sides


@lru_cache(maxsize=4096)
def _compact_declarations(quoted: str) -> str:
    """``"a: 1; b: x, y;"`` as ``"a:1;b:x,y"``."""
    quote, body = quoted[0], quoted[1:-1]
    found = declarations(body)
    if not found:
        return quoted
    return quote + ";".join(f"{name}:{_short_value(name, value)}" for name, value in found) + quote


@lru_cache(maxsize=4096)
def _comparable(value: str) -> str:
    """A value as it compares: quotes, spaces after commas, colour and zero forms aside."""
    value = _short_value("", value.replace('"', "'"))
    return _ZERO_PX.sub("0", value).lower()


# --- the document tree -----------------------------------------------------------------------

Styles = dict[etree._Element, list[tuple[str, str]]]


def _classes_in_css(markup: str) -> set[str]:
    """Every class name a ``<style>`` (Outlook's conditional ones too) mentions."""
    return set(_CLASS_IN_CSS.findall(" ".join(m.group(2) for m in _STYLE_BLOCK.finditer(markup))))


_OUTLOOK_COMMENT = re.compile(r"<!--\[if [^\]]*\]>.*?<!\[endif\]-->", re.S)
_CLASS_ATTRIBUTE = re.compile(r'\sclass="([^"]*)"')


def _drop_unused_classes_in_comment(comment: str, used: set[str]) -> str:
    """MJML's Outlook-only tables carry ``CLASS-outlook`` for Outlook's own style rules;
    with none that uses it, it only hooks nothing."""

    def keep(match: re.Match[str]) -> str:
        kept = [name for name in match.group(1).split() if name in used]
        return f' class="{" ".join(kept)}"' if kept else ""

    return _CLASS_ATTRIBUTE.sub(keep, comment)


def _compact_tree(markup: str, used: set[str]) -> str:
    """The steps that need the document tree, through lxml (premailer's output is lxml's,
    so everything they leave alone is written back byte for byte)."""
    start = markup.find("<html")
    if start < 0:
        return markup
    root = etree.fromstring(markup[start:], etree.HTMLParser())
    if root is None:
        return markup
    _merge_text_rows(root)
    if _drop_needless_declarations(root):
        head = root.find("head")
        if head is not None:
            head.append(etree.Comment(_OUTLOOK_WORD_BREAK))
    _unwrap_tbody(root)
    _drop_unused_classes(root, used)
    _unwrap_bare_divs(root)
    written: bytes = etree.tostring(root, method="html", encoding="utf-8")
    return markup[:start] + written.decode("utf-8")


def _styles(root: etree._Element) -> Styles:
    return {
        element: declarations(element.get("style", ""))
        for element in root.iter(etree.Element)
        if element.get("style") is not None
    }


def _set_style(element: etree._Element, found: list[tuple[str, str]]) -> None:
    if found:
        element.set("style", ";".join(f"{name}:{value}" for name, value in found))
    elif "style" in element.attrib:
        del element.attrib["style"]


def _drop_needless_declarations(root: etree._Element) -> bool:
    """Inline declarations no client needs out (decided on the whole tree first, then
    applied). True if ``word-break`` moved to MJML's wrapper (see :func:`_hoist_word_break`)."""
    styles = _styles(root)
    drops = {element: _needless(element, found, styles) for element, found in styles.items()}
    hoisted = _hoist_word_break(root, styles, drops)
    for element, dropped in drops.items():
        if dropped:
            _set_style(element, [(n, v) for n, v in styles[element] if n not in dropped])
    return hoisted


def _needless(element: etree._Element, found: list[tuple[str, str]], styles: Styles) -> set[str]:
    """The declarations of ``element`` that no client needs.

    - An inherited property with the value the element inherits anyway, on an element
      no client styles by itself (``_PLAIN``), when the value comes from an ancestor in
      the same table cell (or the cell itself) with only such plain elements between and
      no Outlook conditional comment beside any of them: MJML relies on the same
      inheritance from each mj-text's div, in every client, Outlook included. The cell is
      the limit because Outlook for Windows does not pass fonts into a table's cells.
      A cell's ``align`` attribute counts as its text-align (caniemail, "align
      attribute": supported by every client tested).
    - ``font-size:0px`` on a cell that holds only a div with its own size in px: MJML
      sets it on every cell of a column against the gap some WebKit clients leave
      between inline blocks (mjml issue 2542: "size is reset in the next div"); such a
      cell has no inline content. Not when the div ends in a table: Outlook for Windows
      adds a paragraph after a table, in the cell's size.
    - ``margin:0`` on a div: no client's style sheet gives a div a margin.
    - ``height:auto`` on an image with no height attribute: the initial value, and
      Outlook for Windows sizes images by their attributes only.
    """
    tag = element.tag if isinstance(element.tag, str) else ""
    return {
        name
        for name, value in found
        if "!important" not in value and _is_needless(element, tag, name, value, styles)
    }


def _is_needless(element: etree._Element, tag: str, name: str, value: str, styles: Styles) -> bool:
    if name in _INHERITED and tag in _PLAIN:
        inherited = _inherited_value(element, name, styles)
        return inherited is not None and _comparable(inherited) == _comparable(value)
    if (name, tag) == ("font-size", "td") and _comparable(value) == "0":
        return _holds_only_a_sized_div(element, styles)
    if (name, tag) == ("margin", "div"):
        return set(_comparable(value).split()) == {"0"}
    return (name, tag, value) == ("height", "img", "auto") and "height" not in element.attrib


def _inherited_value(element: etree._Element, name: str, styles: Styles) -> str | None:
    """The value of ``name`` that ``element`` inherits, if every client surely passes it on."""
    node = element
    while True:
        if _beside_outlook_comment(node):
            return None
        parent = node.getparent()
        if parent is None or not isinstance(parent.tag, str):
            return None
        for declared, value in reversed(styles.get(parent, [])):
            if declared == name:
                return None if "!important" in value else value
        if name == "text-align" and parent.get("align") and parent.tag in _CELLS:
            return str(parent.get("align"))
        if parent.tag not in _PLAIN or parent.get("align") is not None:
            return None
        node = parent


def _beside_outlook_comment(node: etree._Element) -> bool:
    """Is there an Outlook conditional comment among ``node``'s siblings before it?
    Outlook then sees other elements around it (MJML's tables for Outlook)."""
    sibling = node.getprevious()
    while sibling is not None:
        if isinstance(sibling, etree._Comment) and _OUTLOOK_ONLY.match(sibling.text or ""):
            return True
        sibling = sibling.getprevious()
    return False


def _holds_only_a_sized_div(cell: etree._Element, styles: Styles) -> bool:
    children = list(cell)
    if len(children) != 1 or children[0].tag != "div" or (cell.text or "").strip():
        return False
    div = children[0]
    if (div.tail or "").strip() or not re.fullmatch(
        r"\d+(?:\.\d+)?px", dict(styles.get(div, [])).get("font-size", "")
    ):
        return False
    last = div
    while len(last):
        last = last[-1]
        if not isinstance(last.tag, str) or last.tag == "table":
            return False
    return True


# Outlook for Windows reads <style> rules by tag, but not inheritance into table cells.
_OUTLOOK_WORD_BREAK = "[if mso]><style>td{word-break:break-word}</style><![endif]"


def _hoist_word_break(
    root: etree._Element, styles: Styles, drops: dict[etree._Element, set[str]]
) -> bool:
    """MJML's ``word-break:break-word`` once on its body wrapper instead of on every cell.

    MJML puts it on each cell of a column so that a long word or address wraps instead
    of widening the email. word-break is inherited (CSS Text 3), so on the wrapper (a div,
    which Gmail keeps with its style: MJML's background colour lives there too) it
    reaches every cell in the clients that support it (caniemail, "word-break": the
    browser-based ones; Yahoo, AOL and Windows Mail support it nowhere). Outlook for
    Windows does not pass styles from outside a table into its cells, so it gets the
    rule in a conditional ``<style>`` (it reads rules by tag name there).
    """
    body = root.find("body")
    wrapper = next((c for c in body if c.tag == "div"), None) if body is not None else None
    if wrapper is None:
        return False
    cells = [
        e
        for e, found in styles.items()
        if e.tag in _CELLS and ("word-break", "break-word") in found
    ]
    if len(cells) < 2:
        return False
    for cell in cells:
        drops[cell].add("word-break")
    found = styles.setdefault(wrapper, [])
    drops.setdefault(wrapper, set())
    if ("word-break", "break-word") not in found:
        found.append(("word-break", "break-word"))
        _set_style(wrapper, [(n, v) for n, v in found if n not in drops[wrapper]])
    return True


# Their margins never collapse with their content's: a table's never, and a paragraph
# holds no blocks (an HTML parser ends it at the first one).
_BLOCKS_WITHOUT_COLLAPSE = frozenset({"table", "p"})
_SEAM_BLOCKS = frozenset(
    {"table", "p", "div", "ol", "ul", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6"}
)


def _merge_text_rows(root: etree._Element) -> None:
    """Two mj-text rows in a row as one, where that changes no spacing.

    Each mj-text is a table row, a cell and a div (about 150 bytes). Two of them with the
    same cell (but for its padding) and the same div, where the first has no bottom
    padding and the second no top padding, read the same as one cell holding both divs'
    content, provided the gap between the two stays what it was. It does when the block
    on one side of the seam has no margin there and takes none from what it holds (a
    table, a paragraph, a heading): margins collapse (browsers) or add up (Outlook for
    Windows) to the other side's margin either way.
    """
    for row in list(root.iter("tr")):
        following = row.getnext()
        while following is not None and _mergeable(row, following):
            first_div, second_div = row[0][0], following[0][0]
            top, right, _, left = _padding(row[0])
            bottom = _padding(following[0])[2]
            for child in list(second_div):
                first_div.append(child)
            found = [
                (n, v)
                for n, v in declarations(row[0].get("style", ""))
                if not n.startswith("padding")
            ]
            found.append(("padding", " ".join((top, right, bottom, left))))
            _set_style(row[0], found)
            following.getparent().remove(following)
            following = row.getnext()


def _mergeable(row: etree._Element, following: etree._Element) -> bool:
    if following.tag != "tr" or (row.tail or "").strip():
        return False
    cells = []
    for candidate in (row, following):
        if len(candidate) != 1 or candidate[0].tag not in _CELLS:
            return False
        cell = candidate[0]
        if len(cell) != 1 or cell[0].tag != "div" or (cell.text or "").strip():
            return False
        if (cell[0].tail or "").strip() or not len(cell[0]):
            return False
        cells.append(cell)
    first, second = cells
    if _without_padding(first) != _without_padding(second):
        return False
    if dict(first[0].attrib) != dict(second[0].attrib):
        return False
    padding_one, padding_two = _padding(first), _padding(second)
    if padding_one[2] != "0" or padding_two[0] != "0" or padding_one[1::2] != padding_two[1::2]:
        return False
    last, head = first[0][-1], second[0][0]
    if not isinstance(last.tag, str) or not isinstance(head.tag, str):
        return False
    if last.tag not in _SEAM_BLOCKS or head.tag not in _SEAM_BLOCKS:
        return False
    if (last.tail or "").strip() or (first[0].text or "").strip() or (second[0].text or "").strip():
        return False
    return _no_margin(last, "bottom") or _no_margin(head, "top")


def _without_padding(cell: etree._Element) -> tuple[object, ...]:
    attributes = {k: v for k, v in cell.attrib.items() if k != "style"}
    found = sorted(
        (n, v) for n, v in declarations(cell.get("style", "")) if not n.startswith("padding")
    )
    return (cell.tag, sorted(attributes.items()), found)


def _padding(cell: etree._Element) -> tuple[str, str, str, str]:
    """A cell's padding as (top, right, bottom, left), from ``padding`` and its longhands."""
    sides = ["0", "0", "0", "0"]
    for name, value in declarations(cell.get("style", "")):
        if name == "padding":
            sides = _four(value)
        elif name in ("padding-top", "padding-right", "padding-bottom", "padding-left"):
            sides[("top", "right", "bottom", "left").index(name[8:])] = value
    top, right, bottom, left = (_comparable(side) for side in sides)
    return top, right, bottom, left


def _four(value: str) -> list[str]:
    parts = value.split()
    if len(parts) == 1:
        return parts * 4
    if len(parts) == 2:
        return [parts[0], parts[1], parts[0], parts[1]]
    if len(parts) == 3:
        return [parts[0], parts[1], parts[2], parts[1]]
    return parts[:4]


def _no_margin(element: etree._Element, side: str) -> bool:
    """Does ``element`` surely have no margin on ``side`` (its own, or one of its
    content's collapsing through it)?"""
    if element.tag not in _BLOCKS_WITHOUT_COLLAPSE:
        return False
    margin = "0" if element.tag == "table" else None  # no client gives a table a margin
    for name, value in declarations(element.get("style", "")):
        if name == "margin":
            margin = _four(value)[0 if side == "top" else 2]
        elif name == f"margin-{side}":
            margin = value
    return margin is not None and _comparable(margin) == "0"


def _unwrap_tbody(root: etree._Element) -> None:
    """``<tbody>`` without attributes out: HTML lets a table leave it implied and every
    parser puts it back (browsers, and so webmail), so the tree clients build is the same."""
    for tbody in list(root.iter("tbody")):
        parent = tbody.getparent()
        if tbody.attrib or parent is None or (tbody.text or "").strip():
            continue
        index, children, tail = parent.index(tbody), list(tbody), tbody.tail
        for offset, child in enumerate(children):
            parent.insert(index + offset, child)
        parent.remove(tbody)
        if tail and children:
            children[-1].tail = (children[-1].tail or "") + tail


def _drop_unused_classes(root: etree._Element, used: set[str]) -> None:
    """Class names that no rule left in a ``<style>`` uses: a class only hooks CSS (mail
    clients run no scripts), and the rest of the theme's CSS is inline by now."""
    for element in root.iter(etree.Element):
        names = element.get("class")
        if names is None:
            continue
        kept = [name for name in names.split() if name in used]
        if kept:
            element.set("class", " ".join(kept))
        else:
            del element.attrib["class"]


def _unwrap_bare_divs(root: etree._Element) -> None:
    """A div with no attributes that is all its parent div holds, out: a div without
    style is a box with no margin, padding or border, so its content lays out the same
    in the parent (margins collapse through it anyway)."""
    for div in list(root.iter("div")):
        parent = div.getparent()
        if div.attrib or parent is None or parent.tag != "div" or len(parent) != 1:
            continue
        if (parent.text or "").strip() or (div.tail or "").strip():
            continue
        parent.text = (parent.text or "") + (div.text or "")
        for child in list(div):
            parent.append(child)
        parent.remove(div)
