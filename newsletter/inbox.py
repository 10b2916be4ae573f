"""What one inbound mail is: a bounce, a complaint, an unsubscribe, an auto-reply, or not ours.

``classify`` turns the bytes of one message into an ``Inbound``: its kind and the
``Feedback`` records it carries (who bounced or complained or asked to leave, and the
Message-IDs, VERP token and unsubscribe token that say which message of ours it is
about). It is pure (no database, no network) and never raises: the bounce mailbox is
written to by anyone, so whatever arrives is read within fixed bounds or reported as
unreadable with the reason, and the next message is read.

Delivery status notifications are read two ways. Standard ones (RFC 3464: a
``message/delivery-status`` part, which Postfix, Sendmail, Gmail, Office 365, Amazon SES
and most modern servers send) are parsed field by field. The others (Exim, qmail, old
Exchange, Yahoo...) go through flufl.bounce's detectors, and the status is read from the
text near the address. Feedback-loop complaints are RFC 5965 reports (and Microsoft's
older JMRP layout). Nothing found here is trusted yet: it is matched against the ledger
before it changes anyone.
"""

from __future__ import annotations

import email.errors
import email.message
import email.policy
import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import decode_header
from email.parser import BytesFeedParser, HeaderParser
from email.utils import collapse_rfc2231_value, getaddresses, parseaddr, parsedate_to_datetime
from enum import StrEnum
from urllib.parse import unquote

from flufl.bounce import all_failures

from .feedback import Feedback, FeedbackKind

__all__ = ["DEFAULT_LIMITS", "Inbound", "InboundKind", "Limits", "classify"]

Message = email.message.Message


class InboundKind(StrEnum):
    DSN = "dsn"  # a delivery status notification (a bounce, a delay warning, a success)
    COMPLAINT = "complaint"  # a feedback-loop spam report (RFC 5965 ARF, Microsoft JMRP)
    UNSUBSCRIBE = "unsubscribe"  # a mailto unsubscribe (RFC 2369)
    AUTO_REPLY = "auto-reply"  # an out-of-office or other automatic reply (RFC 3834)
    UNREADABLE = "unreadable"  # empty, not a mail, binary, no From, over the limits
    OTHER = "other"  # anything else (a reader's reply, a report that is not a complaint)


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one hostile message to well under a second and a few MB of memory.

    The stdlib parser costs about a microsecond per line per level of nesting, so lines
    and depth are capped before and while parsing. (The heuristic detectors, some 30
    microseconds a line and quadratic in a line's length, see a fixed, smaller budget.)
    """

    max_bytes: int = 10_000_000
    max_lines: int = 100_000  # a 7 MB base64 attachment; our returned message is far less
    max_parts: int = 500  # MIME parts, delivery-status blocks included
    max_depth: int = 20  # nesting of multipart and message/* parts
    max_text: int = 256_000  # decoded text characters read from the body
    max_recipients: int = 100  # Feedback records from one message


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Inbound:
    """What one message is, and the feedback it carries (empty when it asks for nothing)."""

    kind: InboundKind
    event_id: str  # "mid:<Message-ID>", or "sha256:<hex of the bytes>" without a usable one
    feedback: tuple[Feedback, ...] = ()
    reason: str = ""  # why it is this kind, why unreadable, or why nothing is to be done
    subject: str = ""
    sender: str = ""  # the From address ("" when there is none)


class _Unreadable(Exception):
    """Raised inside classification: the message is unreadable for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_log = logging.getLogger(__name__)
# flufl.bounce logs a traceback for a detector that fails; classify() catches it and goes on.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

# An RFC 3463 status code, not part of a longer dotted number (an IP address, a version).
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An SMTP reply code at the start of a reply ("550 ", "550-", "550 5.1.1").
_REPLY = re.compile(r"(?<!\d)([245])\d\d(?=[ -])")
_QUOTED_ID = re.compile(
    r"^[ \t>]*Message-ID:[ \t]*(<[^<>\s]{1,250}>)", re.IGNORECASE | re.MULTILINE
)
_ANGLE_ID = re.compile(r"<[^<>\s]{1,250}>")
_NEAR = 800  # characters after an address that may hold its status
# What flufl.bounce's detectors read: the start of the text, where a bounce says who failed.
_DETECTOR_LINES = 2_000
_DETECTOR_LINE = 200
_DETECTOR_TEXT = 64_000
_ADDRESS = re.compile(
    r"[^@\s<>()\[\],;:\"\x00-\x1f\x7f]{1,200}@[^@\s<>()\[\],;:\"\x00-\x1f\x7f]{1,255}"
)
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,200}[ \t]*:")
_COMMENT = re.compile(r"\([^()]*\)")
# Controls (C0, C1), line separators and bidi overrides: never in text we hand on.
_CONTROL = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_HEAD_SCAN = 65_536
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,500}")
_BINARY = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")
_HEADER_CHARS = 4_000  # characters of one header field value that are read
_DIAGNOSTIC_CHARS = 500
_MAX_IDS = 10
# Our unsubscribe tokens (newsletter.tokens): base64url payload "." base64url signature.
_TOKEN = r"[A-Za-z0-9_-]{8,1000}\.[A-Za-z0-9_-]{8,200}"
_SUBJECT_TOKEN = re.compile(rf"\bunsubscribe(?:\s+|:\s*|%20|\+)({_TOKEN})(?![\w.-])", re.I)
_BODY_TOKEN = re.compile(rf"\bunsubscribe\s+({_TOKEN})(?![\w.-])", re.I)
_MAILTO_TOKEN = re.compile(rf"subject=unsubscribe(?:%20|\+|\s)({_TOKEN})(?![\w.-])", re.I)
_URL_TOKEN = re.compile(rf"https?://[^\s<>]*/({_TOKEN})(?:[?#][^\s<>]*)?(?=>|$|\s|,)", re.I)
_PLAIN_UNSUBSCRIBE = re.compile(
    # "unsubscribe", "please unsubscribe me from ...", or one word that may be a broken token
    r"(?:please\s+)?unsubscribe(?:\s+(?:me|please))*(?:\s+from\b[^?]*|\s+[\w.%+=-]{8,200})?[.!]*",
    re.I,
)
_SUBJECT_PREFIX = re.compile(r"^\s*(?:(?:re|fwd?|aw|wg|sv|tr)\s*:\s*)+", re.I)
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[ _-]?(?:reply|response|answer|antwort)|autoreply|auto\s*:"
    r"|out[ -]of[ -](?:the[ -])?office|ooo\b|abwesenheit|automatische antwort"
    r"|r[ée]ponse automatique|absente? du bureau|respuesta autom[áa]tica|fuera de la oficina"
    r"|risposta automatica|away from (?:the )?office|on vacation|vacation reply)",
    re.I,
)
_AUTO_FIELDS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-autogenerated")
_DAEMONS = ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon")
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (?:status|failure|failed|has failed|notification)"
    r"|returned mail|failure notice|mail delivery failed|non[- ]?delivery|could not be delivered",
    re.I,
)
_COMPLAINT_TYPES = ("abuse", "fraud", "virus", "other")
_YAHOO_START = re.compile(r"unable to deliver (?:your )?message to the following address", re.I)
_ANGLE_ADDRESS_LINE = re.compile(r"^\s*<([^<>\s@]{1,200}@[^<>\s@]{1,255})>:?\s*$")


# --- the entry point ----------------------------------------------------------------------


def classify(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, verp_prefix: str = "bounces"
) -> Inbound:
    """What ``data`` (one whole message) is, and the feedback it carries. Never raises.

    ``verp_prefix`` is the local part of the bounce address before ``+TOKEN`` (VERP).
    """
    try:
        return _classify(bytes(data), limits, verp_prefix)
    except Exception as exc:  # a last guard: one message must never stop a run
        _log.debug("inbound message could not be read", exc_info=True)
        return Inbound(
            kind=InboundKind.UNREADABLE,
            event_id=_hash_id(bytes(data)),
            reason=f"could not be read ({type(exc).__name__})",
        )


def _classify(data: bytes, limits: Limits, verp_prefix: str) -> Inbound:
    """``classify`` without the last guard (the property tests call this one)."""
    try:
        _precheck(data, limits)
        msg = _parse(data, limits)
    except _Unreadable as problem:
        head = _head_fields(data)
        return Inbound(
            kind=InboundKind.UNREADABLE,
            event_id=_event_id(head, data),
            reason=problem.reason,
            subject=head.text("subject"),
            sender=head.address("from"),
        )
    mail = _Mail(msg, data, limits, verp_prefix)
    if not mail.fields.text("from"):
        return mail.result(InboundKind.UNREADABLE, "no From header")
    for step in (_complaint, _delivery_report, _token_unsubscribe, _auto_reply, _unsubscribe):
        found = step(mail)
        if found is not None:
            return found
    return mail.result(
        InboundKind.OTHER, "not a delivery report, complaint, unsubscribe or auto-reply"
    )


# --- reading the bytes within bounds ------------------------------------------------------


def _precheck(data: bytes, limits: Limits) -> None:
    """Refuse, cheaply and before parsing, what is empty, too big or not a mail at all."""
    if not data.strip():
        raise _Unreadable("empty")
    if len(data) > limits.max_bytes:
        raise _Unreadable(f"larger than {limits.max_bytes:,} bytes ({len(data):,})")
    lines = max(data.count(b"\n"), data.count(b"\r"))
    if lines > limits.max_lines:
        raise _Unreadable(f"more than {limits.max_lines:,} lines ({lines:,})")
    head = data[:_HEAD_SCAN]
    if head.startswith(b"From "):  # an mbox "From " line left in front
        head = head.partition(b"\n")[2]
    if not _HEADER_LINE.match(head):
        raise _Unreadable("not a mail (it does not start with a header field)")
    block = re.split(rb"\r?\n\r?\n|\r\r", head, maxsplit=1)[0]
    # A NUL, or controls that no text has (ESC is in raw ISO-2022-JP headers).
    controls = len(_BINARY.findall(block))
    if b"\x00" in block or controls > len(block) // 20:
        raise _Unreadable("binary data in the header")


class _Part(Message):
    """A parsed part that knows its depth, and refuses a child nested too deep."""

    depth = 0
    max_depth = DEFAULT_LIMITS.max_depth

    def attach(self, payload: Message | str) -> None:
        if isinstance(payload, _Part):
            payload.depth = self.depth + 1
            if payload.depth > self.max_depth:
                raise _Unreadable(f"MIME parts nested more than {self.max_depth} deep")
        super().attach(payload)


def _parse(data: bytes, limits: Limits) -> Message:
    """The parsed message, refusing (mid-parse) too many parts or too deep a nesting.

    The stdlib's parser makes every part through the factory and attaches it to its
    parent, so counting there stops a 100,000-part or 3,000-deep message early, before
    its cost (a check per line per level of nesting) or a RecursionError can build up.
    """
    made = 0

    def factory(policy: email.policy.Policy = email.policy.compat32) -> Message:
        nonlocal made
        made += 1
        if made > limits.max_parts:
            raise _Unreadable(f"more than {limits.max_parts} MIME parts")
        part = _Part(policy)
        part.max_depth = limits.max_depth
        return part

    parser = BytesFeedParser(_factory=factory, policy=email.policy.compat32)
    made = 0  # the parser made one message to try the factory
    parser.feed(data)
    return parser.close()


def _head_fields(data: bytes) -> _Fields:
    """The header fields at the start of ``data`` (for a message that is not parsed)."""
    head = data[:_HEAD_SCAN]
    if not _HEADER_LINE.match(head.partition(b"\n")[2] if head.startswith(b"From ") else head):
        return _Fields(Message())
    block = re.split(rb"\r?\n\r?\n|\r\r", head, maxsplit=1)[0]
    text = block.decode("ascii", "surrogateescape")
    return _Fields(HeaderParser(policy=email.policy.compat32).parsestr(text, headersonly=True))


def _hash_id(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _event_id(fields: _Fields, data: bytes) -> str:
    """Its Message-ID ("mid:<...>", as bounces.py has always keyed mails), else its hash."""
    message_id = fields.text("message-id")
    if _PRINTABLE_ID.fullmatch(message_id):
        return f"mid:{message_id}"
    return _hash_id(data)  # none, or one that is no identifier (spaces, 8-bit bytes)


# --- text helpers -------------------------------------------------------------------------


def _clean(text: str, limit: int = _HEADER_CHARS) -> str:
    """Printable, one-line text: 8-bit bytes read, controls and runs of space gone."""
    return " ".join(_CONTROL.sub(" ", _unescape(text[: limit * 2])).split())[:limit]


def _unescape(text: str) -> str:
    """Text with the parser's escaped 8-bit bytes read as UTF-8, else as Windows-1252."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return _bytes_text(raw)


def _bytes_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def _decoded_words(text: str) -> str:
    """``text`` with its RFC 2047 encoded words decoded (as it was, when they are broken)."""
    if "=?" not in text:
        return text
    try:
        chunks = decode_header(text)
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None or charset == "unknown-8bit":
            out.append(chunk.decode("raw-unicode-escape", "replace"))  # the text around them
        else:
            try:
                out.append(chunk.decode(charset, "replace"))
            except (LookupError, UnicodeError, ValueError, TypeError):
                out.append(_bytes_text(chunk))
    return "".join(out)


def _uncomment(text: str) -> str:
    """``text`` without (comments): the stdlib's address parser recurses into each one."""
    for _ in range(20):
        text, count = _COMMENT.subn(" ", text)
        if not count:
            break
    return text.replace("(", " ").replace(")", " ")


def _address_of(value: str) -> str:
    """The address in a field value ("Name <a@b>", "rfc822; a@b", "<a@b>"), or ""."""
    text = _uncomment(_clean(value, 1000))
    kind, sep, rest = text.partition(";")
    if sep and kind.strip().lower() in ("rfc822", "utf-8", ""):
        text = rest
    elif sep and "@" not in kind:
        return ""  # another address type (x400...)
    address = parseaddr(text.strip())[1].strip().strip("<>")
    return address if _ADDRESS.fullmatch(address) else ""


def _date(value: str) -> datetime | None:
    text = _clean(value, 200)
    if not text:
        return None
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # "-0000" means UTC with no claim about local time (RFC 5322 3.3).
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _status_of(*texts: str) -> str:
    """The first status code in ``texts``, or one made from an SMTP reply code ("5.0.0")."""
    for text in texts:
        match = _STATUS.search(text)
        if match:
            return ".".join(match.groups())
    for text in texts:
        match = _REPLY.search(text)
        if match:
            return f"{match.group(1)}.0.0"
    return ""


def _bounce_kind(status: str) -> FeedbackKind:
    return FeedbackKind.SOFT_BOUNCE if status.startswith("4") else FeedbackKind.HARD_BOUNCE


def _decoded_text(part: Message) -> str:
    """A text part's content as text, whatever its transfer encoding and charset."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset()
    if not charset:
        return _bytes_text(payload)
    try:
        return payload.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return _bytes_text(payload)


class _Fields:
    """One part's header fields, read once: lower-case name -> raw values, in order."""

    def __init__(self, msg: Message) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in msg.raw_items():
            self._values.setdefault(str(name).strip().lower(), []).append(str(value))

    def raw(self, name: str) -> list[str]:
        return [value[:_HEADER_CHARS] for value in self._values.get(name, [])]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def text(self, name: str) -> str:
        """The first value, unfolded, printable, encoded words decoded."""
        values = self._values.get(name)
        return _clean(_decoded_words(_clean(values[0], 1000))) if values else ""

    def texts(self, name: str) -> list[str]:
        return [_clean(_decoded_words(_clean(v, 1000))) for v in self.raw(name)]

    def address(self, name: str) -> str:
        values = self._values.get(name)
        return _address_of(values[0]) if values else ""

    def addresses(self, name: str) -> list[str]:
        found = []
        values = [_uncomment(_clean(v, 2000)) for v in self.raw(name)]
        for _name, address in getaddresses(values):
            address = address.strip().strip("<>")
            if _ADDRESS.fullmatch(address):
                found.append(address)
        return found


def _returned_headers(part: Message) -> _Fields | None:
    """The headers of the returned message a report part carries, if it is one."""
    kind = part.get_content_type()
    if kind in ("message/rfc822", "message/global", "message/rfc822-headers"):
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        return _Fields(inner) if isinstance(inner, Message) else None
    if kind in ("text/rfc822-headers", "text/global-headers"):
        text = _decoded_text(part)[:_HEAD_SCAN]
        return _Fields(HeaderParser(policy=email.policy.compat32).parsestr(text, headersonly=True))
    return None


# --- one message, read once ---------------------------------------------------------------


@dataclass(frozen=True)
class _Refs:
    """What names the message we sent: Message-IDs, a VERP token, an unsubscribe token."""

    message_ids: tuple[str, ...] = ()
    verp_token: str | None = None
    unsubscribe_token: str | None = None


@dataclass
class _Mail:
    """The parsed message and what every step reads from it."""

    msg: Message
    data: bytes
    limits: Limits
    verp_prefix: str
    fields: _Fields = field(init=False)
    event_id: str = field(init=False)
    subject: str = field(init=False)
    sender: str = field(init=False)
    date: datetime | None = field(init=False)
    parts: list[Message] = field(init=False)
    texts: list[tuple[Message, str]] = field(init=False)
    returned: list[_Fields] = field(init=False)

    def __post_init__(self) -> None:
        self.fields = _Fields(self.msg)
        self.event_id = _event_id(self.fields, self.data)
        self.subject = self.fields.text("subject")
        self.sender = self.fields.address("from")
        self.date = _date(self.fields.text("date"))
        self.parts = list(self.msg.walk())
        self.texts = []
        budget = self.limits.max_text
        for part in self.parts:
            if part.is_multipart() or part.get_content_maintype() != "text" or budget <= 0:
                continue
            text = _decoded_text(part)[:budget]
            budget -= len(text)
            self.texts.append((part, text))
        self.returned = [
            found for part in self.parts[1:] if (found := _returned_headers(part)) is not None
        ]

    @property
    def body(self) -> str:
        """All the text a person would read in the message (and any quoted headers)."""
        return "\n".join(text for _part, text in self.texts)

    def result(self, kind: InboundKind, reason: str, feedback: Iterable[Feedback] = ()) -> Inbound:
        return Inbound(
            kind=kind,
            event_id=self.event_id,
            feedback=tuple(feedback),
            reason=reason,
            subject=self.subject,
            sender=self.sender,
        )

    def feedback(
        self,
        kind: FeedbackKind,
        recipient: str | None,
        refs: _Refs,
        *,
        status: str | None = None,
        diagnostic: str = "",
        reported_at: datetime | None = None,
        sender: str | None = None,
    ) -> Feedback:
        return Feedback(
            kind=kind,
            recipient=recipient,
            source="mail",
            event_id=self.event_id,
            status=status,
            diagnostic=_clean(diagnostic, _DIAGNOSTIC_CHARS),
            message_ids=refs.message_ids,
            verp_token=refs.verp_token,
            unsubscribe_token=refs.unsubscribe_token,
            sender=sender,
            reported_at=reported_at,
        )

    def refs(self, *, extra_ids: Iterable[str] = (), envelope: Iterable[str] = ()) -> _Refs:
        """What in a report names the message it is about."""
        return _Refs(
            self.message_ids(*extra_ids), self.verp_token(*envelope), self.unsubscribe_token()
        )

    # What identifies the message we sent, in the report's returned copy or around it.

    def message_ids(self, *extra: str) -> tuple[str, ...]:
        """Every Message-ID the report quotes for the message it is about, best first."""
        own = self.fields.text("message-id")
        found: list[str] = []
        candidates: list[str] = []
        for fields in self.returned:
            candidates += fields.texts("message-id")
        candidates += extra
        candidates += [m.group(1) for m in _QUOTED_ID.finditer(self.body)]
        candidates += self.fields.texts("in-reply-to") + self.fields.texts("references")
        for value in candidates:
            for message_id in _ANGLE_ID.findall(_clean(value)):
                if message_id != own and message_id not in found:
                    found.append(message_id)
        return tuple(found[:_MAX_IDS])

    def verp_token(self, *extra: str) -> str | None:
        """The TOKEN of a ``PREFIX+TOKEN@domain`` envelope address the report was sent to."""
        if not self.verp_prefix:
            return None
        pattern = re.compile(
            rf"(?<![\w.%+-]){re.escape(self.verp_prefix)}\+([^@\s<>\"(),;:\\\[\]]{{1,300}})@",
            re.I,
        )
        candidates: list[str] = []
        for name in ("delivered-to", "x-original-to", "envelope-to", "to", "return-path"):
            candidates += self.fields.raw(name)
        candidates += extra
        for fields in self.returned:
            candidates += fields.raw("return-path")
        for value in candidates:
            match = pattern.search(_clean(value, 1000))
            if match:
                return match.group(1)
        return None

    def unsubscribe_token(self) -> str | None:
        """The unsubscribe token of the returned message's List-Unsubscribe header."""
        for fields in self.returned:
            for value in fields.raw("list-unsubscribe"):
                token = _list_unsubscribe_token(value)
                if token:
                    return token
        return None


def _list_unsubscribe_token(value: str) -> str | None:
    text = _clean(value, 2000)
    for pattern in (_MAILTO_TOKEN, _URL_TOKEN):
        match = pattern.search(text)
        if match:
            return unquote(match.group(1))
    return None


# --- feedback-loop complaints (RFC 5965 ARF, Microsoft JMRP) ------------------------------


def _complaint(mail: _Mail) -> Inbound | None:
    report: _Fields | None = None
    for part in mail.parts:
        if part.get_content_type() == "message/feedback-report":
            report = _feedback_report_fields(part)
            break
    # Microsoft's JMRP: no report part, only the returned message with this field (which a
    # delivery report returning a message received at Microsoft can also carry).
    jmrp = any("x-hmxmroriginalrecipient" in fields for fields in mail.returned) and not any(
        part.get_content_type() == "message/delivery-status" for part in mail.parts
    )
    declared = "feedback-report" in _param(mail.msg, "report-type").lower()
    if report is None and not (jmrp or declared):
        return None
    report = report or _Fields(Message())  # JMRP and the like: read what they return
    feedback_type = report.text("feedback-type").lower().split(";")[0].strip() or "abuse"
    if feedback_type not in _COMPLAINT_TYPES:
        return mail.result(
            InboundKind.OTHER, f"a feedback report of type {feedback_type!r}, not a complaint"
        )
    recipients = [
        a for a in (_address_of(v) for v in report.raw("original-rcpt-to")) if _not_redacted(a)
    ]
    if not recipients:
        for fields in mail.returned:
            recipients = [
                a
                for a in (_address_of(v) for v in fields.raw("x-hmxmroriginalrecipient"))
                if _not_redacted(a)
            ]
            recipients = recipients or [a for a in fields.addresses("to") if _not_redacted(a)]
            if recipients:
                break
    recipients = list(dict.fromkeys(recipients))
    refs = mail.refs(envelope=report.raw("original-mail-from"))
    reported_at = (
        _date(report.text("arrival-date")) or _date(report.text("received-date")) or mail.date
    )
    agent = report.text("user-agent")
    diagnostic = f"feedback-type {feedback_type}" + (f" from {agent}" if agent else "")
    names: list[str | None] = list(recipients[: mail.limits.max_recipients])
    if not names and (refs.message_ids or refs.verp_token or refs.unsubscribe_token):
        names = [None]  # no address, but something that names the message we sent
    feedback = [
        mail.feedback(
            FeedbackKind.COMPLAINT, name, refs, diagnostic=diagnostic, reported_at=reported_at
        )
        for name in names
    ]
    if not feedback:
        return mail.result(
            InboundKind.COMPLAINT,
            f"a {feedback_type} report that names no recipient and no message of ours",
        )
    who = ", ".join(r for r in recipients[:3]) or "a redacted recipient"
    return mail.result(InboundKind.COMPLAINT, f"{feedback_type} report for {who}", feedback)


def _feedback_report_fields(part: Message) -> _Fields:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return _Fields(payload[0])
    text = _decoded_text(part)[:_HEAD_SCAN].lstrip("\r\n")
    return _Fields(HeaderParser(policy=email.policy.compat32).parsestr(text, headersonly=True))


def _param(part: Message, name: str) -> str:
    value = part.get_param(name)
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    return _clean(str(value)) if value else ""


def _not_redacted(address: str) -> bool:
    return bool(address) and "redacted" not in address.split("@")[0].lower()


# --- delivery status notifications --------------------------------------------------------


@dataclass
class _Found:
    """What the DSN parts and the detectors found: one entry per address, first one wins."""

    feedback: list[Feedback] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    actions: list[str] = field(default_factory=list)  # every Action value read
    more: int = 0  # addresses past max_recipients

    def add(self, mail: _Mail, item: Feedback) -> None:
        key = (item.recipient or "").lower()
        if key in self.seen:
            return
        self.seen.add(key)
        if len(self.feedback) >= mail.limits.max_recipients:
            self.more += 1
            return
        self.feedback.append(item)


def _delivery_report(mail: _Mail) -> Inbound | None:
    found = _Found()
    extra_ids: list[str] = []
    envelope: list[str] = []
    status_parts = [p for p in mail.parts if p.get_content_type() == "message/delivery-status"]
    for part in status_parts:
        blocks = part.get_payload()
        if isinstance(blocks, list) and blocks and isinstance(blocks[0], Message):
            head = _Fields(blocks[0])
            extra_ids += head.texts("x-original-message-id")
            envelope += head.raw("x-postfix-sender") + head.raw("original-envelope-id")
    refs = mail.refs(extra_ids=extra_ids, envelope=envelope)
    for part in status_parts:
        _read_status_part(mail, part, found, refs)
    _read_heuristics(mail, found, refs)
    if found.feedback:
        return mail.result(InboundKind.DSN, _dsn_reason(found), found.feedback)
    if status_parts:
        actions = ", ".join(sorted(set(found.actions))) or "no recipient"
        return mail.result(InboundKind.DSN, f"a delivery report with no failure ({actions})")
    local = (mail.sender or mail.fields.text("from")).split("@")[0].lower()
    if any(name in local for name in _DAEMONS) and _BOUNCE_SUBJECT.search(mail.subject):
        return mail.result(
            InboundKind.DSN, "a delivery report that names no recipient we could read"
        )
    return None


def _dsn_reason(found: _Found) -> str:
    counts: dict[FeedbackKind, int] = {}
    for item in found.feedback:
        counts[item.kind] = counts.get(item.kind, 0) + 1
    words = {
        FeedbackKind.HARD_BOUNCE: "hard bounce",
        FeedbackKind.SOFT_BOUNCE: "soft bounce",
        FeedbackKind.DELAY: "delay warning",
    }
    parts = [f"{n} {words[k]}{'s' if n != 1 else ''}" for k, n in counts.items() if k in words]
    text = ", ".join(parts)
    if found.more:
        text += f" (and {found.more} more recipients not read)"
    return text


def _read_status_part(mail: _Mail, part: Message, found: _Found, refs: _Refs) -> None:
    """Each recipient block of one ``message/delivery-status`` part (RFC 3464 2.3)."""
    blocks = part.get_payload()
    if not isinstance(blocks, list) or not blocks:
        return
    per_message = blocks[0] if isinstance(blocks[0], Message) else None
    arrival = _date(_Fields(per_message).text("arrival-date")) if per_message else None
    for block in blocks[1:] if len(blocks) > 1 else blocks:
        if not isinstance(block, Message):
            continue
        fields = _Fields(block)
        address = fields.address("original-recipient") or fields.address("final-recipient")
        action = fields.text("action").lower()
        if action:
            found.actions.append(action.split()[0].strip("();,"))
        if not address:
            continue
        diagnostic = fields.text("diagnostic-code")
        status = _status_of(fields.text("status"), diagnostic)
        if action.startswith("delayed"):
            kind = FeedbackKind.DELAY
        elif action.startswith(("failed", "error")):
            status = status or "5.0.0"
            kind = _bounce_kind(status)
        else:
            continue  # delivered, relayed, expanded: not a failure
        found.add(
            mail,
            mail.feedback(
                kind,
                address,
                refs,
                status=status or None,
                diagnostic=diagnostic,
                # When the server gave up: its last attempt, else the report's date.
                reported_at=_date(fields.text("last-attempt-date")) or mail.date or arrival,
            ),
        )


def _read_heuristics(mail: _Mail, found: _Found, refs: _Refs) -> None:
    """Failures flufl.bounce finds that the DSN parts did not name, and its warnings.

    flufl.bounce's "temporary" failures are "still trying" warnings (DSN ``delayed``
    and warning texts). A failure it calls permanent is a bounce whose class comes from
    the status in the text: a server that gave up after days of 4.x.x answers sends a
    soft bounce. The detectors read a trimmed copy of the text (``_DETECTOR_LINES`` lines
    of at most ``_DETECTOR_LINE`` characters, ``_DETECTOR_TEXT`` in all), which bounds
    their time and their regular expressions' backtracking.
    """
    body = mail.body
    lowered = body.lower()
    _trim_for_detectors(mail)
    try:
        temporary, permanent = all_failures(mail.msg)
    except Exception:  # third-party heuristics on hostile input: their failure is no bounce
        _log.debug("flufl.bounce failed on a message", exc_info=True)
        temporary, permanent = frozenset(), frozenset()
    addresses = [_detected(raw) for raw in sorted(permanent)]
    if not permanent and not temporary and not found.feedback:
        addresses = _yahoo_style(body)
    for address in addresses:
        if not address or address.lower() in found.seen:
            continue
        window = _near(body, lowered, address)
        status = _status_of(window) or "5.0.0"
        lines = [s.strip() for s in window.splitlines()[1:] if s.strip()]
        line = next((s for s in lines if status in s), lines[0] if lines else "")
        found.add(
            mail,
            mail.feedback(
                _bounce_kind(status),
                address,
                refs,
                status=status,
                diagnostic=line[:300],
                reported_at=mail.date,
            ),
        )
    for raw in sorted(temporary):
        address = _detected(raw)
        if address and address.lower() not in found.seen:
            window = _near(body, lowered, address)
            found.add(
                mail,
                mail.feedback(
                    FeedbackKind.DELAY,
                    address,
                    refs,
                    status=_status_of(window) or None,
                    reported_at=mail.date,
                ),
            )


def _detected(raw: bytes) -> str:
    address = _clean(raw.decode("ascii", "replace"), 500).strip("<>")
    return address if _ADDRESS.fullmatch(address) else ""


def _near(text: str, lowered: str, address: str) -> str:
    """The text after the first mention of ``address`` (where its reason usually is)."""
    at = lowered.find(address.lower())
    return "" if at < 0 else text[at : at + len(address) + _NEAR]


def _trim_for_detectors(mail: _Mail) -> None:
    """Give the detectors decoded text within bounds, and nothing of the binary parts."""
    texts = {id(part): text for part, text in mail.texts}
    lines_left, chars_left = _DETECTOR_LINES, _DETECTOR_TEXT
    for part in mail.parts:
        _plain_fields(part)
        if part.is_multipart():
            continue
        kept = []
        for line in texts.get(id(part), "").splitlines()[:lines_left]:
            if chars_left <= 0:
                break
            kept.append(line[: min(_DETECTOR_LINE, chars_left)])
            chars_left -= len(kept[-1]) + 1
        lines_left -= len(kept)
        part.set_payload("".join(line + "\n" for line in kept))
        if "content-transfer-encoding" in part:
            part.replace_header("Content-Transfer-Encoding", "8bit")
    # The fields the detectors read, as plain text: raw 8-bit bytes make Header objects
    # they cannot .lower(), and nested comments make the stdlib's address parser recurse.
    for name in ("From", "Subject", "X-Failed-Recipients", "X-Mailer"):
        values = mail.fields.raw(name.lower())
        if values:
            del mail.msg[name]
            for value in values:
                mail.msg[name] = _uncomment(_clean(value))


def _plain_fields(part: Message) -> None:
    """A part's fields with 8-bit bytes read as text (else the stdlib hands out Headers)."""
    items = [(str(name), str(value)) for name, value in part.raw_items()]
    if all(value.isascii() for _name, value in items):
        return
    for name, _value in items:
        del part[name]
    for name, value in items:
        part[name] = _clean(value)


def _yahoo_style(body: str) -> list[str]:
    """Yahoo's (qmail-derived) "Sorry, we were unable to deliver..." from any host.

    flufl.bounce knows this layout only from a sender ``mailer-daemon@yahoo...``.
    """
    found: list[str] = []
    started = False
    for line in body.splitlines():
        if not started:
            started = bool(_YAHOO_START.search(line[:300]))
            continue
        if line.startswith("---"):
            break
        match = _ANGLE_ADDRESS_LINE.match(line[:500])
        if match and _ADDRESS.fullmatch(match.group(1)):
            found.append(match.group(1))
    return found


# --- mailto unsubscribes (RFC 2369) and auto-replies (RFC 3834) ---------------------------


def _token_unsubscribe(mail: _Mail) -> Inbound | None:
    """A mail whose subject is "unsubscribe TOKEN", as our List-Unsubscribe mailto asks."""
    subject = mail.subject
    match = _SUBJECT_TOKEN.search(subject) or _SUBJECT_TOKEN.search(unquote(subject))
    if match is None:
        return None
    return _unsubscribe_result(mail, match.group(1), "an unsubscribe with a token in its subject")


def _unsubscribe(mail: _Mail) -> Inbound | None:
    """An "unsubscribe TOKEN" line in the body, or a subject that only says unsubscribe."""
    own_text = _first_own_text(mail)
    match = _BODY_TOKEN.search(own_text)
    if match is not None:
        return _unsubscribe_result(mail, match.group(1), "an unsubscribe with a token in its body")
    subject = _SUBJECT_PREFIX.sub("", mail.subject).strip()
    if _PLAIN_UNSUBSCRIBE.fullmatch(subject):
        return _unsubscribe_result(
            mail, None, "an unsubscribe without a token (honoured only for its sender)"
        )
    return None


def _first_own_text(mail: _Mail) -> str:
    """The start of the first text/plain part, without quoted lines or a quoted original."""
    for part, text in mail.texts:
        if part.get_content_type() != "text/plain":
            continue
        lines = []
        for line in text[:4000].splitlines():
            if re.match(r"\s*-{2,}\s*(?:original message|forwarded message)", line, re.I):
                break
            if re.match(r"\s*On .{0,200} wrote:\s*$", line):
                break
            if not line.lstrip().startswith(">"):
                lines.append(line)
        return "\n".join(lines)
    return ""


def _unsubscribe_result(mail: _Mail, token: str | None, reason: str) -> Inbound:
    item = mail.feedback(
        FeedbackKind.UNSUBSCRIBE,
        None,
        _Refs(unsubscribe_token=token),
        sender=mail.sender or None,
        reported_at=mail.date,
    )
    return mail.result(InboundKind.UNSUBSCRIBE, reason, [item])


def _auto_reply(mail: _Mail) -> Inbound | None:
    """An automatic reply: Auto-Submitted other than "no", the autoresponders' own fields,
    ``Precedence: auto_reply``, or an out-of-office subject."""
    submitted = mail.fields.text("auto-submitted").lower().split(";")[0].strip()
    if submitted and submitted != "no":
        return mail.result(InboundKind.AUTO_REPLY, f"Auto-Submitted: {submitted}")
    for name in _AUTO_FIELDS:
        if name in mail.fields:
            return mail.result(InboundKind.AUTO_REPLY, f"an autoresponder's {name} field")
    precedence = mail.fields.text("precedence").lower()
    if precedence in ("auto_reply", "auto-reply"):
        return mail.result(InboundKind.AUTO_REPLY, f"Precedence: {precedence}")
    if _AUTO_SUBJECT.match(_SUBJECT_PREFIX.sub("", mail.subject)):
        return mail.result(InboundKind.AUTO_REPLY, "an out-of-office subject")
    return None
