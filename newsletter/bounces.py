"""Bounce processing: read bounce mail, find who bounced and how, update the list.

``inbox.classify`` reads each mail (standard DSNs field by field, the others through
flufl.bounce's detectors); this module keeps its bounces and applies them.

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
import imaplib
import mailbox
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .errors import BounceError, ConfigError, TransportError
from .feedback import FeedbackKind
from .inbox import classify
from .models import Bounce, BounceKind, BounceRecord
from .store import Store

__all__ = [
    "BounceSummary",
    "Detected",
    "bounces_for_issue",
    "detect",
    "fetch_imap",
    "import_path",
    "process_message",
]


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


def detect(data: bytes) -> Detected:
    """Who bounced, how (hard or soft, status code, diagnostic) and for which message.

    The reading is ``inbox.classify``'s; this keeps only the bounces and delay warnings.
    """
    inbound = classify(data)
    bounces = tuple(
        Bounce(
            email=item.recipient,
            kind=BounceKind.SOFT if item.kind == FeedbackKind.SOFT_BOUNCE else BounceKind.HARD,
            status=item.status or "5.0.0",
            diagnostic=item.diagnostic,
            original_message_id=item.message_ids[0] if item.message_ids else "",
            reported_at=item.reported_at,
        )
        for item in inbound.feedback
        if item.recipient and item.kind in (FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE)
    )
    delayed = tuple(
        item.recipient
        for item in inbound.feedback
        if item.recipient and item.kind == FeedbackKind.DELAY
    )
    return Detected(
        message_key=inbound.event_id, bounces=bounces, delayed=delayed, subject=inbound.subject
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
