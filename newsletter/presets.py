"""Bringing a list over from another tool: its export's columns mapped to ours.

``subscribers import FILE --from mailchimp|substack|buttondown|listmonk|ghost`` knows
each tool's export (see README, Import presets); ``--map "email=Email Address,..."``
names the columns of any other CSV. A mapping turns each row of the foreign file into
our canonical columns before the usual import reads it (:meth:`Store.import_csv`):

``email``, ``name``, ``status`` (one of ours), ``tags`` (``;``-separated),
``created_at`` (the sign-up date), ``consent_at`` (when the address confirmed), then
personalisation fields.

The rule every preset keeps: **a subscriber the old tool would not mail is never
imported as active.** Each preset reads the tool's own flags (Mailchimp's unsubscribed
and cleaned exports, Substack's ``email_disabled``, Buttondown's ``subscriber_type``,
listmonk's ``status``, Ghost's ``subscribed_to_emails``); a value it does not know
makes the row a bad row, never an active one, and a file without the column that
carries the flag is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .errors import StoreError
from .models import Status
from .segments import TagError, join_tags, split_tags

CANONICAL = ("email", "name", "status", "tags", "created_at", "consent_at")
PRESETS = ("mailchimp", "substack", "buttondown", "listmonk", "ghost")
PAID_TAG = "paid"
# The header of a last canonical cell holding a JSON object of more fields (listmonk's
# attributes, known only row by row). A NUL never appears in a CSV header we read.
EXTRA_FIELDS = "\x00fields"


class RowProblem(ValueError):
    """One row of a foreign file that cannot be imported (the message says why)."""


@dataclass(frozen=True)
class BoundMapping:
    """A mapping applied to one file's header: the canonical header, a line per decision
    (for ``--dry-run``), and the function that turns a row into canonical cells."""

    header: tuple[str, ...]
    description: tuple[str, ...]
    convert: Callable[[Sequence[str]], list[str]] = field(repr=False)


@dataclass(frozen=True)
class ColumnMapping:
    """How a CSV's columns become ours: a preset (``--from``) or the editor's ``--map``."""

    name: str
    bind: Callable[[Sequence[str], Path], BoundMapping] = field(repr=False)


# --- dates --------------------------------------------------------------------------------

# Go's time.String() (listmonk): "2021-03-04 05:06:07.123456 +0000 UTC".
_GO_TIME = re.compile(r"^(.*\d)\s+([+-]\d{2}:?\d{2})(?:\s+[A-Za-z]{1,6})?$")


def parse_moment(text: str) -> str:
    """An export's date or time as our ISO 8601 UTC text; ValueError when it is neither.

    ISO dates and times (``2026-01-31``, ``2018-02-12 10:54:27``, ``...T20:43:22.178Z``,
    with or without an offset; without one it is taken as UTC) and Go's
    ``2021-03-04 05:06:07.123 +0000 UTC``.
    """
    value = text.strip()
    go = _GO_TIME.match(value)
    if go:
        value = go.group(1) + go.group(2)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


# --- helpers ------------------------------------------------------------------------------


def _field_name(header: str) -> str:
    """A template-friendly field name: ``ZIP Code`` -> ``zip_code``."""
    return re.sub(r"[^0-9a-z]+", "_", header.strip().lower()).strip("_") or "field"


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _flag(value: str, column: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise RowProblem(f"{column} is {value.strip()!r}, not true or false")


class _Columns:
    """Finds an export's columns by name (any case) and reads them from a row."""

    def __init__(self, header: Sequence[str], path: Path, tool: str) -> None:
        self.header = [cell.strip() for cell in header]
        self.index = {cell.lower(): i for i, cell in enumerate(self.header) if cell}
        self.path = path
        self.tool = tool
        self.used: set[int] = set()
        self.dropped: list[int] = []

    def find(self, *names: str) -> int | None:
        for name in names:
            i = self.index.get(name.lower())
            if i is not None:
                self.used.add(i)
                return i
        return None

    def require(self, *names: str, why: str) -> int:
        i = self.find(*names)
        if i is None:
            raise StoreError(
                f"not a {self.tool} export: no {names[0]!r} column ({why};"
                f" columns: {', '.join(self.header) or 'none'})",
                where=f"{self.path}:1",
                hint="export the list again from the tool, or use --map to name the columns",
            )
        return i

    def drop(self, *names: str) -> None:
        """Columns the preset knows and leaves out (system data, not the reader's)."""
        for name in names:
            i = self.find(name)
            if i is not None:
                self.dropped.append(i)

    def rest(self) -> list[int]:
        return [i for i, cell in enumerate(self.header) if cell and i not in self.used]

    @staticmethod
    def cell(row: Sequence[str], i: int | None) -> str:
        return row[i].strip() if i is not None and i < len(row) else ""


class _Output:
    """Builds the canonical header and rows: the fixed columns, then the fields."""

    def __init__(self, columns: _Columns, field_columns: Sequence[int]) -> None:
        self.columns = columns
        names: list[str] = []
        for i in field_columns:
            name = _field_name(columns.header[i])
            while name in CANONICAL or name in names:
                name += "_field"
            names.append(name)
        self.fields = list(zip(field_columns, names, strict=True))
        self.header = (*CANONICAL, *names)

    def row(
        self,
        source: Sequence[str],
        *,
        email: str,
        name: str = "",
        status: Status,
        tags: Sequence[str] = (),
        created_at: str = "",
        consent_at: str = "",
        extra: dict[str, str] | None = None,
    ) -> list[str]:
        fields = [self.columns.cell(source, i) for i, _ in self.fields]
        out = [email, name, status.value, join_tags(tags), created_at, consent_at, *fields]
        if extra:
            out.append(json.dumps(extra, ensure_ascii=False))
        return out


def _date(value: str, column: str) -> str:
    if not value:
        return ""
    try:
        return parse_moment(value)
    except ValueError:
        raise RowProblem(f"{column} {value!r} is not a date") from None


def _tags(value: str, column: str) -> list[str]:
    try:
        return split_tags(value)
    except TagError as exc:
        raise RowProblem(f"{column}: {exc.message}") from None


def _describe(columns: _Columns, lines: list[str], output: _Output) -> tuple[str, ...]:
    kept = [f"field {name} <- {columns.header[i]}" for i, name in output.fields]
    dropped = [columns.header[i] for i in sorted(columns.dropped)]
    return (*lines, *kept, *(["left out: " + ", ".join(dropped)] if dropped else []))


# --- Mailchimp ----------------------------------------------------------------------------

# Columns Mailchimp adds to every audience export: its own bookkeeping, not the reader's.
_MAILCHIMP_SYSTEM = (
    "MEMBER_RATING",
    "OPTIN_IP",
    "CONFIRM_IP",
    "LATITUDE",
    "LONGITUDE",
    "GMTOFF",
    "DSTOFF",
    "TIMEZONE",
    "CC",
    "REGION",
    "LAST_CHANGED",
    "LEID",
    "EUID",
    "NOTES",
    "UNSUB_CAMPAIGN_TITLE",
    "UNSUB_CAMPAIGN_ID",
    "UNSUB_REASON",
    "UNSUB_REASON_OTHER",
    "CLEAN_CAMPAIGN_TITLE",
    "CLEAN_CAMPAIGN_ID",
    "SSUB_TIME",
)


def _mailchimp(header: Sequence[str], path: Path) -> BoundMapping:
    """Mailchimp's audience export: one file each for subscribed, unsubscribed, cleaned
    (and non-subscribed) contacts, told apart by their columns and their file names."""
    c = _Columns(header, path, "Mailchimp audience")
    email = c.require("Email Address", why="the address column")
    first, last = c.find("First Name"), c.find("Last Name")
    tags = c.find("TAGS")
    optin, confirm = c.find("OPTIN_TIME"), c.find("CONFIRM_TIME")
    unsub, clean = c.find("UNSUB_TIME"), c.find("CLEAN_TIME")
    c.drop(*_MAILCHIMP_SYSTEM)
    name = path.name.lower()
    if unsub is not None or "unsubscribed" in name.replace("nonsubscribed", ""):
        whole, why = Status.UNSUBSCRIBED, "an unsubscribed export (UNSUB_TIME)"
    elif clean is not None or "cleaned" in name:
        whole, why = Status.BOUNCED, "a cleaned export (CLEAN_TIME)"
    elif re.search(r"non[-_ ]?subscribed|transactional", name):
        whole, why = Status.PENDING, "a non-subscribed export (never opted in)"
    else:
        whole, why = Status.ACTIVE, "a subscribed export"
    out = _Output(c, c.rest())

    def convert(row: Sequence[str]) -> list[str]:
        status = whole
        if c.cell(row, unsub):
            status = Status.UNSUBSCRIBED
        elif c.cell(row, clean):
            status = Status.BOUNCED
        full = " ".join(part for part in (c.cell(row, first), c.cell(row, last)) if part)
        return out.row(
            row,
            email=c.cell(row, email),
            name=full,
            status=status,
            tags=_tags(c.cell(row, tags), "TAGS"),
            created_at=_date(c.cell(row, optin), "OPTIN_TIME"),
            consent_at=_date(c.cell(row, confirm), "CONFIRM_TIME"),
        )

    lines = [
        "email <- Email Address",
        "name <- First Name + Last Name",
        f"status <- {whole.value}: {why}; a row with UNSUB_TIME is unsubscribed,"
        " with CLEAN_TIME bounced",
        "tags <- TAGS",
        "created_at <- OPTIN_TIME",
        "consent_at <- CONFIRM_TIME",
    ]
    return BoundMapping(out.header, _describe(c, lines, out), convert)


# --- Substack -----------------------------------------------------------------------------


def _substack(header: Sequence[str], path: Path) -> BoundMapping:
    """Substack's subscriber export (email_list.*.csv). ``email_disabled`` says whether
    Substack mails the reader; ``active_subscription`` whether a paid plan is active."""
    c = _Columns(header, path, "Substack subscriber")
    email = c.require("email", why="the address column")
    disabled = c.require("email_disabled", why="it says whether Substack mails the reader")
    paid = c.find("active_subscription")
    name = c.find("name")
    created = c.find("created_at")
    c.drop("expiry", "plan", "first_payment_at", "stripe_customer_id", "type", "prefer_digests")
    out = _Output(c, c.rest())

    def convert(row: Sequence[str]) -> list[str]:
        address = c.cell(row, email)
        if address.lower().endswith("@deletion-request.substack.com"):
            raise RowProblem("a deletion request, not an address: not imported")
        status = Status.UNSUBSCRIBED if _flag(c.cell(row, disabled), "email_disabled") else None
        paying = paid is not None and _flag(c.cell(row, paid), "active_subscription")
        return out.row(
            row,
            email=address,
            name=c.cell(row, name),
            status=status or Status.ACTIVE,
            tags=[PAID_TAG] if paying else [],
            created_at=_date(c.cell(row, created), "created_at"),
        )

    lines = [
        "email <- email",
        *(["name <- name"] if name is not None else []),
        "status <- email_disabled: true is unsubscribed (Substack does not mail them),"
        " false is active",
        *(
            [f"tags <- active_subscription: true adds the tag {PAID_TAG} (a paid plan)"]
            if paid is not None
            else []
        ),
        *(["created_at <- created_at"] if created is not None else []),
        "an address at deletion-request.substack.com is a bad row",
    ]
    return BoundMapping(out.header, _describe(c, lines, out), convert)


# --- Buttondown ---------------------------------------------------------------------------

# subscriber_type (API: type) -> ours. Anything else is a bad row: never guessed active.
_BUTTONDOWN_TYPES: dict[str, tuple[Status, bool]] = {
    "regular": (Status.ACTIVE, False),
    "unpaid": (Status.ACTIVE, False),
    "premium": (Status.ACTIVE, True),
    "trialed": (Status.ACTIVE, True),
    "gifted": (Status.ACTIVE, True),
    "churning": (Status.ACTIVE, True),
    "paused": (Status.ACTIVE, True),
    "past_due": (Status.ACTIVE, True),
    "unactivated": (Status.PENDING, False),
    "unsubscribed": (Status.UNSUBSCRIBED, False),
    "removed": (Status.UNSUBSCRIBED, False),
    "spammy": (Status.UNSUBSCRIBED, False),
    "undeliverable": (Status.BOUNCED, False),
    "complained": (Status.COMPLAINED, False),
}


def _buttondown(header: Sequence[str], path: Path) -> BoundMapping:
    """Buttondown's subscriber export: ``subscriber_type`` says who is mailed."""
    c = _Columns(header, path, "Buttondown subscriber")
    email = c.require("email", "email_address", why="the address column")
    kind = c.require(
        "subscriber_type", "type", why="it says whether Buttondown mails the subscriber"
    )
    tags = c.find("tags")
    created = c.find("creation_date", "created_date", "subscriber_since")
    c.drop("id", "secondary_id", "referrer_url", "source", "notes", "metadata", "utm_source")
    c.drop("utm_medium", "utm_campaign", "ip_address", "gift_subscription_message")
    out = _Output(c, c.rest())

    def convert(row: Sequence[str]) -> list[str]:
        word = c.cell(row, kind).lower()
        if word not in _BUTTONDOWN_TYPES:
            raise RowProblem(
                f"subscriber type {c.cell(row, kind)!r} is unknown (known: "
                f"{', '.join(sorted(_BUTTONDOWN_TYPES))})"
            )
        status, paying = _BUTTONDOWN_TYPES[word]
        cell = c.cell(row, tags).strip("[]")
        found = _tags(cell.replace("'", '"'), "tags")
        return out.row(
            row,
            email=c.cell(row, email),
            status=status,
            tags=[*found, *([PAID_TAG] if paying else [])],
            created_at=_date(c.cell(row, created), "creation_date"),
        )

    active = sorted(k for k, (s, _) in _BUTTONDOWN_TYPES.items() if s == Status.ACTIVE)
    lines = [
        f"email <- {c.header[email]}",
        f"status <- {c.header[kind]}: active for {', '.join(active)}; unactivated is"
        " pending; unsubscribed, removed and spammy unsubscribed; undeliverable bounced;"
        " complained complained; anything else is a bad row",
        *([f"tags <- tags (and {PAID_TAG} for a premium kind)"] if tags is not None else []),
        *([f"created_at <- {c.header[created]}"] if created is not None else []),
    ]
    return BoundMapping(out.header, _describe(c, lines, out), convert)


# --- listmonk -----------------------------------------------------------------------------

_LISTMONK_STATUS = {
    "enabled": Status.ACTIVE,
    "disabled": Status.UNSUBSCRIBED,
    "blocklisted": Status.UNSUBSCRIBED,
}


def _listmonk(header: Sequence[str], path: Path) -> BoundMapping:
    """listmonk's subscriber export: uuid, email, name, attributes (JSON), status,
    created_at, updated_at. Each top-level attribute becomes a field."""
    c = _Columns(header, path, "listmonk subscriber")
    email = c.require("email", why="the address column")
    state = c.require("status", why="it says whether listmonk mails the subscriber")
    name = c.find("name")
    attributes = c.find("attributes", "attribs")
    created = c.find("created_at")
    c.drop("uuid", "updated_at")
    out = _Output(c, c.rest())

    def convert(row: Sequence[str]) -> list[str]:
        word = c.cell(row, state).lower()
        if word not in _LISTMONK_STATUS:
            raise RowProblem(
                f"status {c.cell(row, state)!r} is unknown (known: enabled, disabled, blocklisted)"
            )
        extra: dict[str, str] = {}
        raw = c.cell(row, attributes)
        if raw:
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                raise RowProblem("attributes is not JSON") from None
            if not isinstance(parsed, dict):
                raise RowProblem("attributes is not a JSON object")
            for key, value in parsed.items():
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                if text:
                    extra[_field_name(str(key))] = text
        return out.row(
            row,
            email=c.cell(row, email),
            name=c.cell(row, name),
            status=_LISTMONK_STATUS[word],
            created_at=_date(c.cell(row, created), "created_at"),
            extra=extra,
        )

    lines = [
        "email <- email",
        *(["name <- name"] if name is not None else []),
        "status <- status: enabled is active; disabled and blocklisted unsubscribed;"
        " anything else is a bad row",
        *(["created_at <- created_at"] if created is not None else []),
        *(["attributes -> one field per top-level key"] if attributes is not None else []),
    ]
    # Fields known only per row (the attributes) ride in a last cell, a JSON object.
    header = (*out.header, EXTRA_FIELDS)
    return BoundMapping(header, _describe(c, lines, out), convert)


# --- Ghost --------------------------------------------------------------------------------


def _ghost(header: Sequence[str], path: Path) -> BoundMapping:
    """Ghost's members export: ``subscribed_to_emails`` says who is mailed; a member
    deleted (``deleted_at``) or whose email Ghost disabled (``email_disabled``) is not."""
    c = _Columns(header, path, "Ghost members")
    email = c.require("email", why="the address column")
    subscribed = c.require("subscribed_to_emails", why="it says whether Ghost mails the member")
    name = c.find("name")
    labels = c.find("labels")
    created = c.find("created_at")
    deleted = c.find("deleted_at")
    disabled = c.find("email_disabled")
    comped = c.find("complimentary_plan")
    c.drop("id", "note", "stripe_customer_id", "tiers", "gift_id", "uuid")
    out = _Output(c, c.rest())

    def convert(row: Sequence[str]) -> list[str]:
        status = Status.ACTIVE
        if not _flag(c.cell(row, subscribed), "subscribed_to_emails") or c.cell(row, deleted):
            status = Status.UNSUBSCRIBED
        if disabled is not None and _flag(c.cell(row, disabled), "email_disabled"):
            status = Status.BOUNCED
        tags = _tags(c.cell(row, labels), "labels")
        if comped is not None and _flag(c.cell(row, comped), "complimentary_plan"):
            tags.append("complimentary")
        return out.row(
            row,
            email=c.cell(row, email),
            name=c.cell(row, name),
            status=status,
            tags=tags,
            created_at=_date(c.cell(row, created), "created_at"),
        )

    lines = [
        "email <- email",
        *(["name <- name"] if name is not None else []),
        "status <- subscribed_to_emails: true is active, false unsubscribed; deleted_at set"
        " is unsubscribed; email_disabled true is bounced",
        *(["tags <- labels"] if labels is not None else []),
        *(["tags <- complimentary_plan: true adds complimentary"] if comped is not None else []),
        *(["created_at <- created_at"] if created is not None else []),
    ]
    return BoundMapping(out.header, _describe(c, lines, out), convert)


_BINDERS: dict[str, Callable[[Sequence[str], Path], BoundMapping]] = {
    "mailchimp": _mailchimp,
    "substack": _substack,
    "buttondown": _buttondown,
    "listmonk": _listmonk,
    "ghost": _ghost,
}


# Columns only that tool's export has together, which a plain import would misread.
_SIGNATURES = (
    ("mailchimp", "Mailchimp", ("email address",)),
    ("mailchimp", "Mailchimp", ("optin_time", "leid")),
    ("substack", "Substack", ("email_disabled",)),
    ("substack", "Substack", ("active_subscription",)),
    ("ghost", "Ghost", ("subscribed_to_emails",)),
    ("buttondown", "Buttondown", ("subscriber_type",)),
    ("listmonk", "listmonk", ("uuid", "attributes")),
)


def recognise(header: Sequence[str]) -> tuple[str, str, str] | None:
    """(preset, tool, column) when ``header`` is another tool's export, else None."""
    lowered = {cell.strip().lower(): cell.strip() for cell in header}
    for name, tool, columns in _SIGNATURES:
        if all(column in lowered for column in columns):
            return name, tool, lowered[columns[-1]]
    return None


def preset(name: str) -> ColumnMapping:
    """The mapping for another tool's export, by name (see :data:`PRESETS`)."""
    if name not in _BINDERS:
        raise StoreError(
            f"no import preset {name!r}", hint=f"use one of: {', '.join(PRESETS)}, or --map"
        )
    return ColumnMapping(name, _BINDERS[name])


# --- --map ----------------------------------------------------------------------------------

_STATUS_WORDS = {s.value: s for s in Status} | {
    "subscribed": Status.ACTIVE,
    "cleaned": Status.BOUNCED,
}


def parse_map(text: str) -> ColumnMapping:
    """``email=Email Address,name=First Name+Last Name,tags=Groups``: our column = theirs.

    Our columns: email (required), name, status, tags, created_at, consent_at. A name may
    join several columns with ``+``. Every column not named becomes a field, as in a
    plain import. StoreError for a pair that cannot be read.
    """
    pairs: dict[str, list[str]] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        ours, sep, theirs = item.partition("=")
        ours = ours.strip().lower()
        sources = [part.strip() for part in theirs.split("+") if part.strip()]
        if not sep or not sources:
            raise StoreError(
                f"--map: {item.strip()!r} is not OURS=THEIRS",
                hint='write e.g. --map "email=Email Address,name=First Name"',
            )
        if ours not in CANONICAL:
            raise StoreError(
                f"--map: {ours!r} is not one of our columns",
                hint=f"use {', '.join(CANONICAL)}",
            )
        if ours in pairs:
            raise StoreError(f"--map: {ours} is named twice", hint="name it once")
        if len(sources) > 1 and ours != "name":
            raise StoreError("--map: only name may join columns with +", hint=f"fix {ours}")
        pairs[ours] = sources
    if "email" not in pairs:
        raise StoreError(
            "--map does not say which column holds the address",
            hint='add email=..., e.g. --map "email=E-mail"',
        )

    def bind(header: Sequence[str], path: Path) -> BoundMapping:
        c = _Columns(header, path, "--map")
        where: dict[str, list[int]] = {}
        for ours, sources in pairs.items():
            found = []
            for source in sources:
                i = c.find(source)
                if i is None:
                    raise StoreError(
                        f"--map {ours}={source}: the file has no column {source!r}"
                        f" (columns: {', '.join(c.header) or 'none'})",
                        where=f"{path}:1",
                        hint="copy the column name from the file's first line",
                    )
                found.append(i)
            where[ours] = found
        # Our own column names left unmapped are read as in a plain import.
        for ours in CANONICAL:
            if ours not in where and (i := c.find(ours)) is not None:
                where[ours] = [i]
        out = _Output(c, c.rest())

        def one(row: Sequence[str], ours: str) -> str:
            return " ".join(value for i in where.get(ours, []) if (value := c.cell(row, i)))

        def convert(row: Sequence[str]) -> list[str]:
            word = one(row, "status").lower()
            if word and word not in _STATUS_WORDS:
                raise RowProblem(
                    f"unknown status {one(row, 'status')!r}"
                    f" (use one of: {', '.join(sorted(_STATUS_WORDS))})"
                )
            return out.row(
                row,
                email=one(row, "email"),
                name=one(row, "name"),
                status=_STATUS_WORDS.get(word, Status.ACTIVE),
                tags=_tags(one(row, "tags"), "tags"),
                created_at=_date(one(row, "created_at"), "created_at"),
                consent_at=_date(one(row, "consent_at"), "consent_at"),
            )

        lines = [
            f"{ours} <- {' + '.join(c.header[i] for i in indexes)}"
            for ours, indexes in where.items()
        ]
        if "status" not in where:
            lines.append("status <- active (no status column)")
        return BoundMapping(out.header, _describe(c, lines, out), convert)

    return ColumnMapping("map", bind)
