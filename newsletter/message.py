"""The MIME message: serialised once per issue, then filled in per recipient.

``prepare`` builds the headers and both quoted-printable parts once, split into
byte segments around the placeholders. ``MessageTemplate.personalise`` only
joins those segments with each recipient's encoded values: no Jinja, MJML,
premailer or EmailMessage work happens per recipient.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import email.policy
import email.quoprimime
import html
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime, make_msgid, parseaddr
from types import MappingProxyType
from urllib.parse import quote

from .config import Config
from .errors import ConfigError
from .render import (
    RenderedIssue,
    fill_placeholders,
    find_placeholders,
    greeting_fallback,
    split_on_placeholders,
)
from .tokens import PREFERENCES_PURPOSE, UNSUBSCRIBE_PURPOSE, TokenSigner, address_fingerprint

_POLICY = email.policy.SMTP
_CRLF = b"\r\n"
# Per-recipient parts of the header block get their own markers (never in editor text).
_TO, _DATE, _MESSAGE_ID, _LIST_UNSUB = "to", "date", "message_id", "list_unsubscribe"


@dataclass(frozen=True)
class Recipient:
    """Who one copy is for: the values placeholders are filled with."""

    email: str
    name: str = ""
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    subscriber_id: int | str = ""

    @property
    def first_name(self) -> str:
        """What the greeting calls the reader ("" when unknown: the greeting's fallback)."""
        return first_name_of(self.name, self.fields)


# Words before a name that are not the name ("Dr. Ada Lovelace" is greeted as Ada).
_TITLES = frozenset(
    {"dr", "mr", "mrs", "ms", "mx", "prof", "sir", "dame", "herr", "frau", "m", "mme", "mlle"}
    | {"monsieur", "madame"}
)
_FIRST_NAME_KEYS = frozenset({"firstname", "givenname", "prenom", "prénom", "vorname"})


def first_name_of(name: str, fields: Mapping[str, str] | None = None) -> str:
    """The name to greet someone by: a ``first_name`` field (from the CSV import) if there
    is one, else the name's first word, where "Lovelace, Ada" is Ada; "" when unknown."""
    for key, value in (fields or {}).items():
        if re.sub(r"[\s_-]", "", key.casefold()) in _FIRST_NAME_KEYS and value.strip():
            return " ".join(value.split())
    last, comma, rest = name.partition(",")
    words = (rest if comma and rest.strip() and last.strip() else name).split()
    while len(words) > 1 and words[0].casefold().rstrip(".") in _TITLES:
        words = words[1:]
    return words[0] if words else ""


@dataclass(frozen=True)
class OutgoingMessage:
    """One personalised message, ready for the transport."""

    recipient: str
    message_id: str
    data: bytes
    envelope_from: str = ""  # the MAIL FROM for this copy (VERP: bounces+TOKEN@domain)


# A segment is literal bytes, or a (part, key) pair that is filled per recipient.
Segment = bytes | tuple[str, str]


@dataclass(frozen=True)
class MessageTemplate:
    """An issue's message as bytes with holes, made once; ``personalise`` fills the holes."""

    segments: tuple[Segment, ...]
    envelope_from: str
    subject: str
    sender_domain: str
    unsubscribe_url: str
    unsubscribe_mailto: str
    issue_key: str
    signer: TokenSigner | None = field(default=None, repr=False)
    # One timestamp for every token of this send: a recipient's link is the same
    # wherever it appears, and tests can recompute it.
    issued_at: int = field(default_factory=lambda: int(time.time()))
    sign: Callable[[bytes], bytes] | None = field(default=None, repr=False)
    # [bounces] return_path: each subscriber's copy goes out from PREFIX+TOKEN@domain.
    return_path: str = ""
    preferences_url: str = ""  # base_url/p when `serve` answers there; "" leaves the link out
    # Who the greeting addresses when a reader's first name is unknown ("Hello there,").
    greeting_fallback: str = "there"

    @property
    def size(self) -> int:
        """Approximate size of one message (the holes count as empty)."""
        return sum(len(s) for s in self.segments if isinstance(s, bytes))

    def unsubscribe_link(self, recipient: Recipient) -> str:
        """The link a reader clicks to leave: https with a signed token, else the mailto."""
        token = self._token(recipient)
        if self.unsubscribe_url:
            return f"{self.unsubscribe_url.rstrip('/')}/{token}"
        return f"mailto:{self.unsubscribe_mailto}?subject={quote('unsubscribe ' + token)}"

    def preferences_link(self, recipient: Recipient) -> str:
        """The reader's preferences page (topics, pause), or "" when no service answers it."""
        if not self.preferences_url:
            return ""
        return f"{self.preferences_url.rstrip('/')}/{self._token(recipient, PREFERENCES_PURPOSE)}"

    def _token(self, recipient: Recipient, purpose: str = UNSUBSCRIBE_PURPOSE) -> str:
        if self.signer is None:
            return "preview"
        subject = (
            f"{recipient.subscriber_id or recipient.email}:{address_fingerprint(recipient.email)}"
        )
        return self.signer.make(purpose, subject, self.issue_key, issued_at=self.issued_at)

    def envelope_sender(self, recipient: Recipient) -> str:
        """The envelope sender (MAIL FROM) of ``recipient``'s copy, where bounces go.

        With ``return_path`` set, a subscriber's copy gets ``PREFIX+TOKEN@domain`` (VERP):
        the token, signed, names the subscriber and the issue, so a bounce to it refers to
        exactly one message we sent. The message's bytes do not change (the receiving
        server writes the address as ``Return-Path``); this is one HMAC per recipient.
        Proofs and samples (no subscriber id) go out from ``return_path`` itself.
        """
        if not self.return_path:
            return self.envelope_from
        subscriber_id = recipient.subscriber_id
        if self.signer is None or not isinstance(subscriber_id, int):
            return self.return_path
        local, _, domain = self.return_path.rpartition("@")
        token = self.signer.verp(subscriber_id, recipient.email, self.issue_key)
        return f"{local}+{token}@{domain}"

    def personalise(self, recipient: Recipient, *, to: str | None = None) -> OutgoingMessage:
        """The finished message for one recipient: substitution, then signing if configured.

        ``to`` puts another address in the To header (a proof that shows one reader's
        copy but goes to the editor); the body still shows ``recipient``'s values.
        """
        for address in (recipient.email, to or recipient.email):
            if _breaks_header(address) or not address.isascii():
                raise RecipientError(f"address {address!r} cannot go in a header without SMTPUTF8")
        recipient = dataclasses.replace(recipient, name=header_safe_name(recipient.name))
        message_id = make_msgid(domain=self.sender_domain)
        unsubscribe = self.unsubscribe_link(recipient)
        values = _values(
            recipient, unsubscribe, self.preferences_link(recipient), self.greeting_fallback
        )
        out: list[bytes] = []
        for segment in self.segments:
            if isinstance(segment, bytes):
                out.append(segment)
                continue
            part, key = segment
            if part == "header":
                out.append(self._header_value(key, recipient, message_id, unsubscribe, to))
            else:
                value = values.get(key, "")
                if part == "html":
                    value = html.escape(value, quote=True)
                # Soft breaks around every hole keep each literal's lines as encoded
                # (<= 76), whatever the value's length, even when it is empty.
                out.append(b"=\r\n" + _qp(value) + b"=\r\n")
        data = b"".join(out)
        if self.sign is not None:
            data = self.sign(data)
        return OutgoingMessage(
            recipient=recipient.email,
            message_id=message_id,
            data=data,
            envelope_from=self.envelope_sender(recipient),
        )

    def _header_value(
        self,
        key: str,
        recipient: Recipient,
        message_id: str,
        unsubscribe: str,
        to: str | None = None,
    ) -> bytes:
        if key == _TO:
            return to_field(recipient.name, to or recipient.email)
        if key == _MESSAGE_ID:
            return message_id.encode("ascii")
        if key == _DATE:
            # Stamped per recipient: a send that runs for hours (rate limits, a resumed
            # crash) would otherwise trip SpamAssassin's DATE_IN_PAST_* rules (1-2.6 points).
            return rfc5322_date().encode("ascii")
        links = []
        if self.unsubscribe_url:
            links.append(f"<{unsubscribe}>")
        if self.unsubscribe_mailto:
            token = self._token(recipient)
            links.append(
                f"<mailto:{self.unsubscribe_mailto}?subject={quote('unsubscribe ' + token)}>"
            )
        return ",\r\n ".join(links).encode("ascii")


class RecipientError(ValueError):
    """One recipient's data cannot make a valid message (the others can)."""


# Characters str.splitlines() breaks on (the email package folds with it), and controls.
_HEADER_BREAKERS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
MAX_NAME_IN_HEADER = 200


def _breaks_header(value: str) -> bool:
    return bool(_HEADER_BREAKERS.search(value))


def header_safe_name(name: str) -> str:
    """A display name that cannot break or overlong a header: controls become spaces."""
    cleaned = " ".join(_HEADER_BREAKERS.sub(" ", name).split())
    return cleaned[:MAX_NAME_IN_HEADER].rstrip()


_HEADER_END = re.compile(rb"\r\n(?![ \t])")  # the end of a header field, folds included


def with_to_line(data: bytes, name: str, address: str) -> bytes:
    """``data`` (a message whose first header is From) with a To line after From, written
    by :func:`to_field`: the email package's folder can split a quoted name at its commas,
    and a stranger may type this name (the subscribe form)."""
    after_from = _HEADER_END.search(data)
    if after_from is None:
        raise ValueError("a message without a header line")
    end = after_from.end()
    return b"".join((data[:end], b"To:", to_field(name, address), b"\r\n", data[end:]))


# A display name of plain words (RFC 5322 atoms) needs no quoting or encoding.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_FOLD_AT = 78  # RFC 5322's recommended line length
_ENCODED_CHUNK = 45  # UTF-8 bytes per encoded-word: "=?utf-8?b?" + 60 base64 + "?=" = 72


def to_field(name: str, address: str) -> bytes:
    """What follows ``To:`` on the wire for one reader: one address, whatever the name.

    The email package's folder can split a quoted name at a comma, leaving a To that
    parses as two addresses ("Dr. Jane Q. Public, Head of ..."), or lets a name typed into
    the public form add a recipient. So the name is written here: plain words as they are,
    other short ASCII as one quoted-string that is never folded, anything else (unicode,
    long, looks like an encoded-word) as RFC 2047 encoded-words, which fold between
    themselves. Lines stay within 78 unless the address alone is longer. ``address`` must
    be a checked ASCII addr-spec.
    """
    name = header_safe_name(name)
    longest = _FOLD_AT - len("To: ")
    words: list[str] = []
    if name and "=?" not in name and name.isascii():
        if _ATOMS.fullmatch(name):
            words = name.split(" ")
        else:
            words = ['"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"']
        if max(len(word) for word in words) > longest:
            words = []
    if name and not words:
        words = _encoded_words(name)
    words.append(f"<{address}>" if words else address)
    out: list[str] = []
    column = len("To:")
    for word in words:
        if out and column + 1 + len(word) > _FOLD_AT:
            out.append("\r\n")
            column = 0
        out.append(" " + word)
        column += 1 + len(word)
    return "".join(out).encode("ascii")


def _encoded_words(text: str) -> list[str]:
    """``text`` as base64 encoded-words, each cut at a character boundary."""
    data = text.encode("utf-8", "replace")
    words = []
    start = 0
    while start < len(data):
        end = min(start + _ENCODED_CHUNK, len(data))
        while end < len(data) and 0x80 <= data[end] < 0xC0:  # inside a character
            end -= 1
        words.append(f"=?utf-8?b?{base64.b64encode(data[start:end]).decode('ascii')}?=")
        start = end
    return words


def _values(
    recipient: Recipient, unsubscribe_url: str, preferences_url: str, fallback: str
) -> dict[str, str]:
    values = {
        "name": recipient.name,
        "first_name": recipient.first_name or fallback,
        "email": recipient.email,
        "unsubscribe_url": unsubscribe_url,
        "preferences_url": preferences_url,
    }
    for key, value in recipient.fields.items():
        values[f"field.{key.lower()}"] = value
    return values


def _qp(text: str) -> bytes:
    """Quoted-printable for UTF-8 text with CRLF line ends and lines of at most 76.

    No line starts with ".": such a line (CSS in a style block, say) would need SMTP
    dot-stuffing, a copy of the whole message per recipient on both ends of the
    connection. ``=2E`` is the same character; encoding two columns shorter first
    keeps those lines within 76.
    """
    latin = text.encode("utf-8").decode("latin-1")
    # 75, not 76: a hole's soft break "=" may follow the last line.
    encoded = email.quoprimime.body_encode(latin, maxlinelen=75, eol="\r\n").encode("ascii")
    if encoded.startswith(b".") or b"\r\n." in encoded:
        encoded = email.quoprimime.body_encode(latin, maxlinelen=73, eol="\r\n").encode("ascii")
        if encoded.startswith(b"."):
            encoded = b"=2E" + encoded[1:]
        encoded = encoded.replace(b"\r\n.", b"\r\n=2E")
    return encoded


def _check_header(name: str, value: str) -> str:
    if _breaks_header(value):
        raise ConfigError(
            f"{name} header value contains a line break",
            where=name,
            hint="put the value on one line",
        )
    return value


def rfc5322_date(moment: datetime.datetime | None = None) -> str:
    """A Date header value in UTC with a numeric zone, "Fri, 04 Dec 2026 06:00:00 +0000"
    (RFC 5322 3.3; "GMT" is the obsolete form)."""
    return format_datetime(moment or datetime.datetime.fromtimestamp(time.time(), datetime.UTC))


def _header(name: str, value: str) -> bytes:
    value = _check_header(name, value)
    if value.isascii():
        return _POLICY.fold_binary(name, value)
    # fold_binary leaves a non-ASCII value that fits on one line as raw UTF-8, then fails
    # to encode it ("Subject: Café"); the header registry always applies RFC 2047.
    folded: str = _POLICY.header_factory(name, value).fold(policy=_POLICY)
    return folded.encode("ascii")


def _part_segments(part: str, text: str, placeholders: Mapping[str, str]) -> list[Segment]:
    """Split a body on its placeholders and QP-encode each literal piece once.

    Only this issue's own tokens are holes: text that merely looks like a token
    (an editor writing about the tool, say) stays as it is.
    """
    segments: list[Segment] = []
    literal = ""
    for index, piece in enumerate(split_on_placeholders(text)):
        key = placeholders.get(piece) if index % 2 else None
        if key is None:
            literal += piece
            continue
        if literal:
            segments.append(_qp(literal))
            literal = ""
        segments.append((part, key))
    if literal:
        segments.append(_qp(literal))
    return segments


def prepare(
    rendered: RenderedIssue,
    config: Config,
    *,
    subject_prefix: str = "",
    sign: Callable[[bytes], bytes] | None = None,
    require_unsubscribe: bool = True,
) -> MessageTemplate:
    """Serialise the issue's message once, with holes for per-recipient values."""
    news = config.newsletter
    unsub = config.unsubscribe
    if require_unsubscribe and not (unsub.url or unsub.mailto):
        raise ConfigError(
            "no unsubscribe address is configured",
            where=str(config.path),
            hint="set [unsubscribe] url (https) and/or mailto before sending bulk mail",
        )
    if unsub.url and not unsub.url.startswith("https://"):
        raise ConfigError(
            f"[unsubscribe] url '{unsub.url}' is not https",
            where=str(config.path),
            hint="use an https URL (mail clients require it for one-click unsubscribe)",
        )
    return_path = config.bounces.return_path
    signer = (
        TokenSigner(config.secrets.secret_key)
        if (unsub.url or unsub.mailto or return_path)
        else None
    )
    subject = subject_prefix + rendered.subject
    boundary = f"===============nl{secrets.token_hex(12)}=="
    head: list[Segment] = [
        _header("From", news.sender),
        b"To:",
        ("header", _TO),
        _CRLF,
        _header("Subject", subject),
        b"Date: ",
        ("header", _DATE),
        _CRLF,
        b"Message-ID: ",
        ("header", _MESSAGE_ID),
        _CRLF,
    ]
    if news.reply_to:
        head.append(_header("Reply-To", news.reply_to))
    head.append(_header("List-Id", config.list_id))
    if news.feedback_id:
        # Gmail's feedback loop groups complaints by this (campaign:customer:type:sender).
        head.append(
            _header("Feedback-ID", news.feedback_id.replace("{issue}", rendered.issue.slug))
        )
    if unsub.url or unsub.mailto:
        head += [b"List-Unsubscribe: ", ("header", _LIST_UNSUB), _CRLF]
    if unsub.url:
        head.append(_header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    if news.precedence_bulk:
        head.append(_header("Precedence", "bulk"))
    head += [
        _header("X-Mailer", "newsletter"),
        _header("MIME-Version", "1.0"),
        _header("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
        _CRLF,
    ]
    body: list[Segment] = []
    for part, subtype, text in (("text", "plain", rendered.text), ("html", "html", rendered.html)):
        body.append(
            f"--{boundary}\r\n"
            f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode("ascii")
        )
        body += _part_segments(part, text, rendered.placeholders)
        body.append(_CRLF)
    body.append(f"--{boundary}--\r\n".encode("ascii"))
    return MessageTemplate(
        segments=_merge_bytes([*head, *body]),
        envelope_from=return_path or parseaddr(news.sender)[1],
        subject=subject,
        sender_domain=config.sender_domain,
        unsubscribe_url=unsub.url,
        unsubscribe_mailto=unsub.mailto,
        issue_key=rendered.issue.slug,
        signer=signer,
        sign=sign,
        return_path=return_path,
        preferences_url=config.public_urls.preferences if unsub.url else "",
        greeting_fallback=greeting_fallback(config),
    )


def _merge_bytes(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    """Join neighbouring literal segments so personalise does as few joins as possible."""
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] = merged[-1] + segment
        else:
            merged.append(segment)
    return tuple(merged)


def sample_recipient() -> Recipient:
    """An example subscriber for previews and `check`."""
    return Recipient(email="reader@example.org", name="Sam Example", subscriber_id="sample")


def sample_message(
    rendered: RenderedIssue, config: Config, *, sign: Callable[[bytes], bytes] | None = None
) -> bytes:
    """One complete message for an example subscriber (preview, check, spam score)."""
    if config.secrets.secret_key is None:
        config = _with_preview_key(config)
    template = prepare(rendered, config, require_unsubscribe=False, sign=sign)
    data = template.personalise(sample_recipient()).data
    left = set(find_placeholders(data.decode("ascii", "replace"))) & set(rendered.placeholders)
    assert not left, left
    return data


def sample_files(rendered: RenderedIssue, config: Config) -> dict[str, bytes]:
    """``sample.eml`` (the whole message an example reader gets) and ``sample.html`` (its
    HTML, filled in), to open beside the template that still has its placeholders."""
    if config.secrets.secret_key is None:
        config = _with_preview_key(config)
    template = prepare(rendered, config, require_unsubscribe=False)
    reader = sample_recipient()
    values = _values(
        reader,
        template.unsubscribe_link(reader),
        template.preferences_link(reader),
        template.greeting_fallback,
    )

    def fill(match: re.Match[str]) -> str:
        key = rendered.placeholders.get(match.group(0))
        return match.group(0) if key is None else html.escape(values.get(key, ""), quote=True)

    page = fill_placeholders(rendered.html, fill)
    return {
        "sample.html": page.encode("utf-8"),
        "sample.eml": template.personalise(reader).data,
    }


def _with_preview_key(config: Config) -> Config:
    return dataclasses.replace(
        config,
        secrets=config.secrets.replace(secret_key="preview-only-key-not-secret"),
    )
