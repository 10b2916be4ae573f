"""Bounce processing: read bounce mail, find who bounced and how, update the list.

Detection is two-layered. Standard delivery status notifications (RFC 3464:
a ``multipart/report`` with a ``message/delivery-status`` part, which Postfix,
Gmail, Outlook/Exchange and most modern servers send) are parsed here, field by
field: ``Action``, ``Status``, ``Original-Recipient``/``Final-Recipient``,
``Diagnostic-Code``, dates. Everything else (Exim's and qmail's plain-text
bounces, old sendmail...) goes through flufl.bounce's heuristic detectors, and
the status code is then read from the text near the address.

A 5.x.x status is a hard bounce, 4.x.x a soft one; ``delayed`` warnings are not
bounces (the server is still trying). The bounce is matched to the issue (and,
for a forwarded address, to the subscriber) through the Message-ID of the
message that bounced, which the ledger keeps for every delivery.

Every mail is processed once: its Message-ID (or, without one, a hash of its
bytes) goes into the store in the same transaction as its effects. IMAP
messages are also flagged ``\\Seen`` once processed.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import hashlib
import imaplib
import mailbox
import re
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any

from flufl.bounce import all_failures

from .config import Config
from .errors import BounceError, ConfigError, TransportError
from .models import Bounce, BounceKind, BounceRecord
from .store import Store

__all__ = [
    "BounceSummary",
    "Detected",
    "bounces_for_issue",
    "detect",
    "fetch_imap",
    "import_path",
    "message_key",
    "process_message",
]

# An RFC 3463 status code, not part of a longer dotted number (an IP address, a version).
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# An SMTP reply code at the start of a reply ("550 ", "550-", "550 5.1.1").
_REPLY = re.compile(r"(?<!\d)([245])\d\d(?=[ -])")
_MESSAGE_ID = re.compile(r"^Message-ID:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_NEAR = 800  # characters after an address that may hold its status


@dataclass(frozen=True)
class Detected:
    """What one mail says: the bounces in it (empty when it is not a bounce)."""

    message_key: str
    bounces: tuple[Bounce, ...]
    delayed: tuple[str, ...] = ()  # addresses with only a "still trying" warning
    subject: str = ""


@dataclass
class BounceSummary:
    """What an import or a fetch did, for the command's report."""

    messages: int = 0
    already_processed: int = 0
    not_bounces: int = 0
    warnings_only: int = 0
    hard: int = 0
    soft: int = 0
    marked_bounced: int = 0
    unknown_addresses: int = 0
    records: list[BounceRecord] = field(default_factory=list)

    def add(self, detected: Detected, records: list[BounceRecord] | None) -> None:
        self.messages += 1
        if records is None:
            self.already_processed += 1
            return
        if not detected.bounces:
            if detected.delayed:
                self.warnings_only += 1
            else:
                self.not_bounces += 1
        for record in records:
            self.records.append(record)
            if record.kind == BounceKind.HARD:
                self.hard += 1
            else:
                self.soft += 1
            if record.effect.startswith("marked bounced"):
                self.marked_bounced += 1
            if record.subscriber_id is None:
                self.unknown_addresses += 1


# --- detection ----------------------------------------------------------------------------


def parse(data: bytes) -> email.message.Message:
    """The mail as the classic ``Message`` API that flufl.bounce and DSN parts need."""
    return email.message_from_bytes(data, policy=email.policy.compat32)


def message_key(msg: email.message.Message, data: bytes) -> str:
    """What identifies a mail across imports and fetches: its Message-ID, else its hash."""
    message_id = str(msg.get("Message-ID", "") or "").strip()
    if message_id:
        return f"mid:{message_id}"
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _text(value: object) -> str:
    return " ".join(str(value or "").split())


def _date(value: object) -> datetime | None:
    text = _text(value)
    if not text:
        return None
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
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


def _address(value: object) -> str:
    """The address of an ``Original-Recipient``/``Final-Recipient`` field ("rfc822; a@b")."""
    text = _text(value)
    kind, sep, address = text.partition(";")
    if not sep:
        address = kind
    elif kind.strip().lower() not in ("rfc822", ""):
        return ""
    return parseaddr(address.strip())[1].strip()


def _original_message_id(msg: email.message.Message) -> str:
    """The Message-ID of the message that bounced, from the returned copy or its headers."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, email.message.Message) and inner.get("Message-ID"):
                return _text(inner["Message-ID"])
        elif kind in ("text/rfc822-headers", "text/global-headers"):
            found = _MESSAGE_ID.search(_decoded(part))
            if found:
                return found.group(1)
    own = _text(msg.get("Message-ID", ""))
    for found in _MESSAGE_ID.finditer(_body_text(msg)):
        if found.group(1) != own:
            return found.group(1)
    return ""


def _decoded(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        charset = part.get_content_charset() or "utf-8"
        try:
            return payload.decode(charset, "replace")
        except LookupError:
            return payload.decode("utf-8", "replace")
    raw = part.get_payload()
    return raw if isinstance(raw, str) else ""


def _body_text(msg: email.message.Message) -> str:
    """All the text a person would read in the bounce (and any quoted headers)."""
    pieces = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        if part.get_content_maintype() == "text":
            pieces.append(_decoded(part))
    return "\n".join(pieces)


def _dsn_bounces(
    msg: email.message.Message, original_id: str, fallback_date: datetime | None
) -> tuple[list[Bounce], list[str]]:
    """Bounces and delayed addresses from every ``message/delivery-status`` part."""
    bounces: list[Bounce] = []
    delayed: list[str] = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        if not isinstance(blocks, list) or not blocks:
            continue
        per_message = blocks[0]
        arrival = None
        if isinstance(per_message, email.message.Message):
            arrival = _date(per_message.get("Arrival-Date"))
        for block in blocks[1:] if len(blocks) > 1 else blocks:
            if not isinstance(block, email.message.Message):
                continue
            address = _address(block.get("Original-Recipient")) or _address(
                block.get("Final-Recipient")
            )
            action = _text(block.get("Action")).lower()
            if not address or "@" not in address:
                continue
            if action.startswith("delayed"):
                delayed.append(address)
                continue
            if not action.startswith(("failed", "error")):
                continue  # delivered, relayed, expanded: not a failure
            diagnostic = _text(block.get("Diagnostic-Code"))
            status = _status_of(_text(block.get("Status")), diagnostic)
            kind = BounceKind.SOFT if status.startswith("4") else BounceKind.HARD
            bounces.append(
                Bounce(
                    email=address,
                    kind=kind,
                    status=status or "5.0.0",
                    diagnostic=diagnostic,
                    original_message_id=original_id,
                    # When the server gave up: its last attempt, else the report's date.
                    reported_at=_date(block.get("Last-Attempt-Date")) or fallback_date or arrival,
                )
            )
    return bounces, delayed


def _near(text: str, address: str) -> str:
    """The text after the first mention of ``address`` (where its reason usually is)."""
    at = text.lower().find(address.lower())
    return "" if at < 0 else text[at : at + len(address) + _NEAR]


def _heuristic_bounces(
    msg: email.message.Message, original_id: str, date: datetime | None, known: set[str]
) -> tuple[list[Bounce], list[str]]:
    """Failures flufl.bounce finds that the DSN parts did not name, and its warnings.

    flufl.bounce's "temporary" failures are "still trying" warnings (DSN ``delayed``
    and warning texts), so they are not bounces. A failure it calls permanent is a
    bounce whose class comes from the status in the text: a server that gave up after
    days of 4.x.x answers sends a soft bounce.
    """
    temporary, permanent = all_failures(msg)
    text = _body_text(msg)
    found: list[Bounce] = []
    for raw in sorted(permanent):
        address = raw.decode("ascii", "replace").strip()
        if "@" not in address or address.lower() in known:
            continue
        known.add(address.lower())
        window = _near(text, address)
        status = _status_of(window) or "5.0.0"
        lines = [s.strip() for s in window.splitlines()[1:] if s.strip()]
        line = next((s for s in lines if status in s), lines[0] if lines else "")
        found.append(
            Bounce(
                email=address,
                kind=BounceKind.SOFT if status.startswith("4") else BounceKind.HARD,
                status=status,
                diagnostic=line[:300],
                original_message_id=original_id,
                reported_at=date,
            )
        )
    warnings = [
        address
        for raw in sorted(temporary)
        if "@" in (address := raw.decode("ascii", "replace").strip())
        and address.lower() not in known
    ]
    return found, warnings


def detect(data: bytes) -> Detected:
    """Who bounced, how (hard or soft, status code, diagnostic) and for which message."""
    msg = parse(data)
    date = _date(msg.get("Date"))
    original_id = _original_message_id(msg)
    bounces, delayed = _dsn_bounces(msg, original_id, date)
    known = {b.email.lower() for b in bounces} | {a.lower() for a in delayed}
    more, warnings = _heuristic_bounces(msg, original_id, date, known)
    return Detected(
        message_key=message_key(msg, data),
        bounces=tuple(bounces + more),
        delayed=tuple(delayed + warnings),
        subject=_text(msg.get("Subject")),
    )


# --- processing ---------------------------------------------------------------------------


def process_message(
    store: Store, data: bytes, *, source: str, soft_limit: int
) -> tuple[Detected, list[BounceRecord] | None]:
    """Detect and apply one mail's bounces; records is None when it was processed before."""
    detected = detect(data)
    if store.is_processed(detected.message_key):
        return detected, None
    records = store.record_bounces(
        detected.message_key, detected.bounces, source=source, soft_limit=soft_limit
    )
    return detected, records


def _mailbox_messages(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every message in an mbox file or a Maildir folder."""
    if path.is_dir():
        if not all((path / sub).is_dir() for sub in ("cur", "new")):
            raise BounceError(
                "not a Maildir (no cur/ and new/ folders)",
                where=str(path),
                hint="give an mbox file or a Maildir folder",
            )
        box: mailbox.Mailbox[mailbox.Message] = mailbox.Maildir(path, factory=None, create=False)
    elif path.is_file():
        with path.open("rb") as handle:
            start = handle.read(5)
        if start and start != b"From ":
            raise BounceError(
                "not an mbox file (it does not start with 'From ')",
                where=str(path),
                hint="give an mbox file or a Maildir folder",
            )
        box = mailbox.mbox(path, create=False)
    else:
        raise BounceError("no such file or folder", where=str(path), hint="check the path")
    try:
        for key in box.iterkeys():
            yield f"{path}:{key}", box.get_bytes(key)
    finally:
        box.close()


def import_path(
    store: Store,
    path: Path,
    *,
    soft_limit: int,
    on_message: Callable[[Detected, list[BounceRecord] | None], None] | None = None,
) -> BounceSummary:
    """Process every message of an mbox file or Maildir folder (read only, never changed)."""
    summary = BounceSummary()
    try:
        for _name, data in _mailbox_messages(Path(path)):
            detected, records = process_message(
                store, data, source=f"file {Path(path).name}", soft_limit=soft_limit
            )
            summary.add(detected, records)
            if on_message is not None:
                on_message(detected, records)
    except OSError as exc:
        raise BounceError(
            f"cannot read it: {exc.strerror or exc}", where=str(path), hint="check the path"
        ) from None
    return summary


# --- IMAP ---------------------------------------------------------------------------------


def _imap_connect(config: Config) -> imaplib.IMAP4:
    """An IMAP connection as [bounces] says (TLS unless the host is loopback), logged in."""
    from .transport import is_loopback

    settings = config.bounces
    where = f"{settings.imap_host}:{settings.imap_port}"
    if not settings.imap_host:
        raise ConfigError(
            "[bounces] imap_host is not set",
            where=str(config.path),
            hint="set imap_host, imap_username (and imap_port, imap_folder) in [bounces]",
        )
    password = config.secrets.imap_password
    if not password:
        raise ConfigError(
            "NEWSLETTER_IMAP_PASSWORD is not set",
            where="environment",
            hint="export NEWSLETTER_IMAP_PASSWORD with the bounce mailbox's password",
        )
    if settings.imap_security == "none" and not is_loopback(settings.imap_host, resolve=False):
        raise ConfigError(
            "[bounces] imap_security = none would send the password in clear",
            where=str(config.path),
            hint="use ssl or starttls (none is only for a server on this machine)",
        )
    context = ssl.create_default_context()
    try:
        conn: imaplib.IMAP4
        if settings.imap_security == "ssl":
            conn = imaplib.IMAP4_SSL(
                settings.imap_host, settings.imap_port, ssl_context=context, timeout=30
            )
        else:
            conn = imaplib.IMAP4(settings.imap_host, settings.imap_port, timeout=30)
            if settings.imap_security == "starttls":
                conn.starttls(context)
        conn.login(settings.imap_username, password)
    except imaplib.IMAP4.error as exc:
        raise TransportError(
            f"the IMAP server refused us: {_imap_text(exc)}",
            where=where,
            hint="check [bounces] imap_username and NEWSLETTER_IMAP_PASSWORD",
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(
            f"cannot reach the IMAP server: {exc}",
            where=where,
            hint="check [bounces] imap_host, imap_port and imap_security",
        ) from None
    return conn


def _imap_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return " ".join(_imap_text(v) for v in value)
    return str(value)


def _check(result: tuple[str, Sequence[Any]], what: str, where: str) -> Sequence[Any]:
    kind, data = result
    if kind != "OK":
        raise BounceError(
            f"IMAP {what} failed: {_imap_text(data)}",
            where=where,
            hint="check [bounces] imap_folder",
        )
    return data


def _fetched_bytes(data: Iterable[object]) -> bytes | None:
    for item in data:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
            return item[1]
    return None


def fetch_imap(
    store: Store,
    config: Config,
    *,
    include_seen: bool = False,
    connect: Callable[[Config], imaplib.IMAP4] = _imap_connect,
    on_message: Callable[[Detected, list[BounceRecord] | None], None] | None = None,
) -> BounceSummary:
    """Process the unread messages of the [bounces] IMAP folder, then flag them ``\\Seen``.

    The store remembers every processed mail too, so a message read in a mail client
    (already \\Seen) is processed with ``include_seen``, and a crash between recording
    and flagging never counts a bounce twice.
    """
    settings = config.bounces
    where = f"{settings.imap_host}:{settings.imap_port}/{settings.imap_folder}"
    summary = BounceSummary()
    conn = connect(config)
    try:
        _check(conn.select(_quote(settings.imap_folder)), "SELECT", where)
        criteria = "ALL" if include_seen else "UNSEEN"
        found = _check(conn.uid("SEARCH", None, criteria), "SEARCH", where)  # type: ignore[arg-type]
        uids = [uid for chunk in found if isinstance(chunk, bytes) for uid in chunk.split()]
        for uid in uids:
            number = uid.decode("ascii")
            data = _fetched_bytes(
                _check(conn.uid("FETCH", number, "(BODY.PEEK[])"), "FETCH", where)
            )
            if data is None:
                continue
            detected, records = process_message(
                store, data, source=f"imap {settings.imap_folder}", soft_limit=settings.soft_limit
            )
            summary.add(detected, records)
            if on_message is not None:
                on_message(detected, records)
            _check(conn.uid("STORE", number, "+FLAGS", "(\\Seen)"), "STORE", where)
    except imaplib.IMAP4.error as exc:
        raise TransportError(
            f"IMAP error: {_imap_text(exc)}", where=where, hint="try again; check the folder"
        ) from None
    except OSError as exc:
        raise TransportError(
            f"the IMAP connection failed: {exc}", where=where, hint="try again later"
        ) from None
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()
    return summary


def _quote(folder: str) -> str:
    """A mailbox name as an IMAP quoted string (folders may have spaces)."""
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bounces_for_issue(store: Store, issue_key: str) -> list[BounceRecord]:
    """The bounces matched to one issue, oldest first (for `newsletter status ISSUE`)."""
    return store.bounces_for_issue(issue_key)
