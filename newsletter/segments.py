"""Tags, and segments: named filters over tags, status, fields and sign-up date.

A segment is a small expression, written in ``newsletter.toml``::

    [segments]
    europe = "tag:europe and not tag:harbours"
    lisbon = 'field:city = "Lisbon" or (tag:portugal and joined >= 2026-01-01)'

The grammar (keywords in any case; ``not`` binds tighter than ``and``, which binds
tighter than ``or``)::

    segment = or ;   or = and { "or" and } ;   and = not { "and" not } ;
    not     = "not" not | "(" or ")" | term ;
    term    = "tag:" NAME                      a tag (a word, or "quoted text")
            | "status:" STATUS                 active, pending, unsubscribed, bounced, complained
            | "field:" KEY [ ("=" | "!=") VALUE ]   a field has a value / equals VALUE
            | "joined" ("<" | "<=" | ">" | ">=" | "=") YYYY-MM-DD   the sign-up date (UTC)

A segment is parsed once (errors name the position, counted from 1) and compiled
to one SQL condition on the alias ``s`` (the ``subscribers`` table) whose values
are all bound parameters: nothing from the config or a reader is ever spliced into
the SQL text. The database evaluates it, so counting a segment of a million
subscribers costs one query (``bench/segments.py``).

Tags are words or short phrases, stored lower-case with single spaces, without
commas, semicolons, double quotes or control characters. The tag ``paused`` is the
reader's pause (see :data:`PAUSED`): every send leaves such a subscriber out.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import NewsletterError
from .models import Status

if TYPE_CHECKING:
    from .db import Dialect

PAUSED = "paused"  # the tag a reader's "pause" sets: no send goes to them while it is there
MAX_TAG = 64  # characters
MAX_TAGS_IN_CELL = 100  # tags one CSV cell may carry: more is a mistake, not a subscriber
TAG_SEPARATORS = re.compile(r"[,;]")
_BAD_TAG_CHARS = re.compile(r"[\x00-\x1f\x7f\"]")
MAX_EXPRESSION = 2000  # characters: a segment is a line in a config file


class TagError(NewsletterError):
    """A tag that cannot be stored (empty, too long, a separator or control character)."""


def normalize_tag(text: str) -> str:
    """The stored form of a tag: lower-case, single spaces; TagError when it cannot be one."""
    tag = " ".join(text.split()).lower()
    if not tag:
        raise TagError("a tag cannot be empty", hint="write a word, e.g. europe")
    if TAG_SEPARATORS.search(tag) or _BAD_TAG_CHARS.search(tag):
        raise TagError(
            f"the tag {text.strip()!r} has a comma, semicolon, quote or control character",
            hint="use letters, digits, spaces, - or _",
        )
    if len(tag) > MAX_TAG:
        raise TagError(
            f"the tag {tag[:20]!r}... has {len(tag)} characters (at most {MAX_TAG})",
            hint="use a shorter tag",
        )
    return tag


def split_tags(cell: str) -> list[str]:
    """The tags in a CSV cell: separated by ``,`` or ``;``; quotes around each are dropped
    (Mailchimp writes ``"Tag one","Tag two"``). Duplicates go; the order stays."""
    out: dict[str, None] = {}
    for piece in TAG_SEPARATORS.split(cell):
        piece = piece.strip().strip('"').strip()
        if piece:
            out[normalize_tag(piece)] = None
            if len(out) > MAX_TAGS_IN_CELL:
                raise TagError(
                    f"more than {MAX_TAGS_IN_CELL} tags in one cell",
                    hint="is a column of something else read as tags?",
                )
    return list(out)


def join_tags(tags: Iterable[str]) -> str:
    """The CSV cell for some tags (what :func:`split_tags` reads back)."""
    return ";".join(tags)


# --- the expression language -----------------------------------------------------------


class SegmentSyntaxError(Exception):
    """A segment expression that does not parse: ``position`` counts characters from 1."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"position {position}: {message}")
        self.position = position
        self.message = message


@dataclass(frozen=True)
class _Token:
    kind: str  # word, string, prefix, op, lparen, rparen, end
    text: str  # the value: a string without its quotes, a prefix without its colon
    position: int  # 1-based
    raw: str = ""  # as written


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<op><=|>=|!=|=|<|>)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<prefix>[A-Za-z_]+:)
  | (?P<word>[^\s()"=!<>]+)
    """,
    re.VERBOSE,
)


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            if text[at] == '"':
                raise SegmentSyntaxError(at + 1, "a quoted value is not closed")
            raise SegmentSyntaxError(at + 1, f"unexpected {text[at]!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            value = match.group()
            if kind == "string":
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            elif kind == "prefix":
                value = value[:-1].lower()
            out.append(_Token(kind, value, at + 1, match.group()))
        at = match.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


# The parsed expression: a small tree of these.
@dataclass(frozen=True)
class HasTag:
    tag: str


@dataclass(frozen=True)
class HasStatus:
    status: Status


@dataclass(frozen=True)
class FieldTest:
    key: str  # lower-case
    op: str  # "has", "=" or "!="
    value: str = ""


@dataclass(frozen=True)
class Joined:
    op: str  # <, <=, >, >=, =
    day: dt.date


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" or "or"
    operands: tuple[Node, ...]


Node = HasTag | HasStatus | FieldTest | Joined | Not | BoolOp
_FIELD_KEY = re.compile(r"[A-Za-z0-9_]+")
_KEYWORDS = ("and", "or", "not")


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token.kind == "word" and token.text.lower() == word:
            self.at += 1
            return True
        return False

    def fail(self, token: _Token, expected: str) -> SegmentSyntaxError:
        found = "the end" if token.kind == "end" else repr(token.raw)
        return SegmentSyntaxError(token.position, f"expected {expected}, found {found}")

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise SegmentSyntaxError(1, "the segment is empty; write e.g. tag:europe")
        node = self.or_()
        token = self.peek()
        if token.kind != "end":
            raise self.fail(token, "'and', 'or' or the end")
        return node

    def or_(self) -> Node:
        operands = [self.and_()]
        while self.keyword("or"):
            operands.append(self.and_())
        return operands[0] if len(operands) == 1 else BoolOp("or", tuple(operands))

    def and_(self) -> Node:
        operands = [self.not_()]
        while self.keyword("and"):
            operands.append(self.not_())
        return operands[0] if len(operands) == 1 else BoolOp("and", tuple(operands))

    def not_(self) -> Node:
        if self.keyword("not"):
            return Not(self.not_())
        token = self.peek()
        if token.kind == "lparen":
            self.take()
            node = self.or_()
            closing = self.peek()
            if closing.kind != "rparen":
                raise self.fail(closing, "')'")
            self.take()
            return node
        return self.term()

    def value(self, what: str) -> _Token:
        token = self.take()
        if token.kind not in ("word", "string"):
            raise self.fail(token, what)
        return token

    def term(self) -> Node:
        token = self.peek()
        if token.kind == "prefix":
            self.take()
            if token.text == "tag":
                name = self.value("a tag after 'tag:'")
                try:
                    return HasTag(normalize_tag(name.text))
                except TagError as exc:
                    raise SegmentSyntaxError(name.position, exc.message) from None
            if token.text == "status":
                name = self.value("a status after 'status:'")
                try:
                    return HasStatus(Status(name.text.lower()))
                except ValueError:
                    known = ", ".join(s.value for s in Status)
                    raise SegmentSyntaxError(
                        name.position, f"unknown status {name.text!r} (use one of: {known})"
                    ) from None
            if token.text == "field":
                return self.field()
            raise SegmentSyntaxError(
                token.position, f"unknown '{token.text}:' (use tag:, status: or field:)"
            )
        if token.kind == "word" and token.text.lower() == "joined":
            self.take()
            op = self.take()
            if op.kind != "op" or op.text == "!=":
                raise self.fail(op, "<, <=, >, >= or = after 'joined'")
            day = self.take()
            try:
                parsed = dt.date.fromisoformat(day.text) if day.kind == "word" else None
            except ValueError:
                parsed = None
            if parsed is None or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day.text):
                raise self.fail(day, "a date as YYYY-MM-DD")
            return Joined(op.text, parsed)
        if token.kind == "word" and token.text.lower() in _KEYWORDS:
            raise self.fail(token, "tag:, status:, field:, joined, 'not' or '('")
        raise self.fail(token, "tag:, status:, field:, joined, 'not' or '('")

    def field(self) -> Node:
        key = self.take()
        if key.kind != "word" or not _FIELD_KEY.fullmatch(key.text):
            raise self.fail(key, "a field name (letters, digits, _) after 'field:'")
        op = self.peek()
        if op.kind != "op":
            return FieldTest(key.text.lower(), "has")
        self.take()
        if op.text not in ("=", "!="):
            raise SegmentSyntaxError(op.position, f"a field compares with = or !=, not {op.text}")
        value = self.value('a value (a word or "quoted text")')
        return FieldTest(key.text.lower(), op.text, value.text)


def parse(text: str) -> Node:
    """The tree of ``text``; SegmentSyntaxError (with the position) when it does not parse."""
    if len(text) > MAX_EXPRESSION:
        raise SegmentSyntaxError(MAX_EXPRESSION + 1, f"longer than {MAX_EXPRESSION} characters")
    return _Parser(text).parse()


# --- SQL ---------------------------------------------------------------------------------


# The sign-up date: the one an import read from its file (signed_up: "2019-03-04",
# "2019-03-04T12:34:56", "...+00:00"), else when the subscriber was added (created_at,
# "2026-01-01T09:30:00.000000+00:00"). All ISO 8601: they sort as text, and every instant
# of a day sorts at or after the bare date.
_SIGNED_UP = "coalesce(s.signed_up, s.created_at)"


def _day_start(day: dt.date) -> str:
    return day.isoformat()


def to_sql(node: Node, dialect: Dialect) -> tuple[str, list[Any]]:
    """One SQL condition on ``s`` (subscribers) and its parameters, in order, for the
    engine of ``dialect`` (only the walk over a subscriber's fields differs)."""
    if isinstance(node, HasTag):
        return (
            "s.id IN (SELECT t.subscriber_id FROM subscriber_tags t WHERE t.tag = ?)",
            [node.tag],
        )
    if isinstance(node, HasStatus):
        return "s.status = ?", [node.status.value]
    if isinstance(node, FieldTest):
        # Names and values match ignoring the case of ASCII letters, on both engines.
        match = f"SELECT 1 FROM {dialect.json_object_items('s.fields', 'f')}"
        match += f" WHERE {dialect.ascii_lower('f.key')} = ?"
        if node.op == "has":
            return f"EXISTS ({match} AND trim(f.value) <> '')", [node.key]
        condition = f"EXISTS ({match} AND {dialect.nocase_equals_param('f.value')})"
        if node.op == "!=":
            condition = f"NOT {condition}"
        return condition, [node.key, node.value]
    if isinstance(node, Joined):
        start = _day_start(node.day)
        after = _day_start(node.day + dt.timedelta(days=1))
        if node.op == "<":
            return f"{_SIGNED_UP} < ?", [start]
        if node.op == "<=":
            return f"{_SIGNED_UP} < ?", [after]
        if node.op == ">":
            return f"{_SIGNED_UP} >= ?", [after]
        if node.op == ">=":
            return f"{_SIGNED_UP} >= ?", [start]
        return f"({_SIGNED_UP} >= ? AND {_SIGNED_UP} < ?)", [start, after]
    if isinstance(node, Not):
        sql, params = to_sql(node.operand, dialect)
        return f"NOT ({sql})", params
    parts = [to_sql(operand, dialect) for operand in node.operands]
    joined = f" {node.op.upper()} ".join(f"({sql})" for sql, _ in parts)
    return joined, [param for _, params in parts for param in params]


def tags_used(node: Node) -> set[str]:
    """Every tag the expression names (the preferences page says which topics matter)."""
    if isinstance(node, HasTag):
        return {node.tag}
    if isinstance(node, Not):
        return tags_used(node.operand)
    if isinstance(node, BoolOp):
        return set().union(*(tags_used(operand) for operand in node.operands))
    return set()


@dataclass(frozen=True)
class Segment:
    """A named filter from ``[segments]``: its text, where it is written, and its tree."""

    name: str
    expression: str
    node: Node
    where: str = ""  # "newsletter.toml:12", for messages

    def sql(self, dialect: Dialect) -> tuple[str, list[Any]]:
        return to_sql(self.node, dialect)


class SegmentError(NewsletterError):
    """A segment that does not parse, or one that is not defined."""


_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def make_segment(name: str, expression: str, *, where: str = "") -> Segment:
    """Parse one ``[segments]`` entry; SegmentError names the segment and the position."""
    if not _SEGMENT_NAME.fullmatch(name):
        raise SegmentError(
            f"[segments] {name!r} is not a usable name",
            where=where or None,
            hint="use letters, digits, _, - and . (at most 64)",
        )
    try:
        node = parse(expression)
    except SegmentSyntaxError as exc:
        raise SegmentError(
            f"[segments] {name}: position {exc.position}: {exc.message}",
            where=where or None,
            hint="see README, Segments, for the language",
        ) from None
    return Segment(name, expression, node, where)


def require_segment(segments: Mapping[str, Segment], name: str) -> Segment:
    """The segment called ``name``, or SegmentError listing the ones there are."""
    found = segments.get(name)
    if found is None:
        names = ", ".join(sorted(segments))
        raise SegmentError(
            f"no segment {name!r} in [segments]",
            hint=f"define it there, or use one of: {names}"
            if names
            else 'define it in newsletter.toml, e.g. [segments] europe = "tag:europe"',
        )
    return found
