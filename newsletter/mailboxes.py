"""The bounce mailbox: every mail in it read, checked and acted on, once each.

``newsletter inbox import PATH`` reads an mbox file or a Maildir folder (never changing
it), ``newsletter inbox fetch`` the ``[bounces]`` IMAP folder; ``bounces import`` and
``bounces fetch`` are the same commands under their old names. Each message goes through
:func:`readers.process_mail` on its own: classified (:mod:`inbox`), its reports matched to
a message we sent, then applied in its own transaction. A message that cannot be read is
recorded as unreadable with the reason, and the run goes on; only the mailbox itself
(missing, not a mailbox, the IMAP server) or the database can stop it. IMAP messages are
flagged ``\\Seen`` once processed (not in a dry run).
"""

from __future__ import annotations

import contextlib
import imaplib
import mailbox
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .errors import BounceError, ConfigError, TransportError
from .feedback import FeedbackKind
from .models import BounceRecord
from .readers import FeedbackResult, Matcher, Outcome, matcher_for, process_mail
from .store import Store

__all__ = [
    "InboxSummary",
    "bounces_for_issue",
    "fetch_imap",
    "import_path",
]


@dataclass
class InboxSummary:
    """What an import or a fetch did (or, in a dry run, would do), for the command's report."""

    messages: int = 0
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    # Reports acted on, by kind (hard-bounce, soft-bounce, complaint, unsubscribe).
    acted: Counter[FeedbackKind] = field(default_factory=Counter)
    marked_bounced: int = 0
    marked_complained: int = 0
    unsubscribed: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    dry_run: bool = False

    def add(self, result: FeedbackResult) -> None:
        self.messages += 1
        self.outcomes[result.outcome] += 1
        if result.outcome == Outcome.UNREADABLE:
            self.unreadable.append((result.name, result.reason))
        for decision in result.acted:
            self.acted[decision.feedback.kind] += 1
            effect = decision.effect
            if effect.startswith("marked bounced"):
                self.marked_bounced += 1
            elif effect == "marked complained":
                self.marked_complained += 1
            elif effect == "unsubscribed":
                self.unsubscribed += 1

    def missing(self, name: str, why: str) -> None:
        """A message the mailbox lists but that could not be read from it."""
        self.messages += 1
        self.outcomes[Outcome.UNREADABLE] += 1
        self.unreadable.append((name, why))


@dataclass(frozen=True)
class _Run:
    """What every message of one run is processed with."""

    store: Store
    matcher: Matcher
    source: str
    soft_limit: int
    verp_prefix: str
    dry_run: bool
    summary: InboxSummary
    on_message: Callable[[FeedbackResult], None] | None

    def process(self, name: str, data: bytes) -> FeedbackResult:
        result = process_mail(
            self.store,
            data,
            matcher=self.matcher,
            source=self.source,
            soft_limit=self.soft_limit,
            verp_prefix=self.verp_prefix,
            name=name,
            dry_run=self.dry_run,
        )
        self.summary.add(result)
        if self.on_message is not None:
            self.on_message(result)
        return result


def _run(
    store: Store,
    config: Config,
    source: str,
    *,
    dry_run: bool,
    on_message: Callable[[FeedbackResult], None] | None,
) -> _Run:
    matcher = matcher_for(store, config.secrets.secret_key)  # the key first: a clear error
    return _Run(
        store=store,
        matcher=matcher,
        source=source,
        soft_limit=config.bounces.soft_limit,
        verp_prefix=config.bounces.verp_prefix,
        dry_run=dry_run,
        summary=InboxSummary(dry_run=dry_run),
        on_message=on_message,
    )


# --- mbox files and Maildir folders --------------------------------------------------------


def _mailbox_messages(path: Path) -> Iterator[tuple[str, bytes | OSError]]:
    """(name, bytes) of every message in an mbox file or a Maildir folder; a message that
    cannot be read comes as (name, the OSError) so the others are still read."""
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
            try:
                data: bytes | OSError = box.get_bytes(key)
            except OSError as exc:  # a Maildir file that went away or cannot be read
                data = exc
            yield f"{path.name}:{key}", data
    finally:
        box.close()


def import_path(
    store: Store,
    config: Config,
    path: Path,
    *,
    dry_run: bool = False,
    on_message: Callable[[FeedbackResult], None] | None = None,
) -> InboxSummary:
    """Process every message of an mbox file or Maildir folder (read only, never changed).

    ``dry_run`` changes nothing and says what each message would do; ``on_message`` sees
    each message's :class:`FeedbackResult` as it is done.
    """
    path = Path(path)
    run = _run(store, config, f"file {path.name}", dry_run=dry_run, on_message=on_message)
    try:
        for name, data in _mailbox_messages(path):
            if isinstance(data, OSError):
                run.summary.missing(name, f"cannot be read: {data.strerror or data}")
                continue
            run.process(name, data)
    except OSError as exc:
        raise BounceError(
            f"cannot read it: {exc.strerror or exc}", where=str(path), hint="check the path"
        ) from None
    return run.summary


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
    dry_run: bool = False,
    connect: Callable[[Config], imaplib.IMAP4] = _imap_connect,
    on_message: Callable[[FeedbackResult], None] | None = None,
) -> InboxSummary:
    """Process the unread messages of the [bounces] IMAP folder, then flag them ``\\Seen``.

    The store remembers every processed mail too, so a message read in a mail client
    (already \\Seen) is processed with ``include_seen``, and a crash between recording
    and flagging never counts a bounce twice. A dry run reads (without marking anything
    read) and changes nothing.
    """
    settings = config.bounces
    where = f"{settings.imap_host}:{settings.imap_port}/{settings.imap_folder}"
    run = _run(
        store, config, f"imap {settings.imap_folder}", dry_run=dry_run, on_message=on_message
    )
    conn = connect(config)
    try:
        _check(conn.select(_quote(settings.imap_folder), readonly=dry_run), "SELECT", where)
        criteria = "ALL" if include_seen else "UNSEEN"
        found = _check(conn.uid("SEARCH", None, criteria), "SEARCH", where)  # type: ignore[arg-type]
        uids = [uid for chunk in found if isinstance(chunk, bytes) for uid in chunk.split()]
        for uid in uids:
            number = uid.decode("ascii", "replace")
            name = f"{settings.imap_folder}:{number}"
            data = _fetched_bytes(
                _check(conn.uid("FETCH", number, "(BODY.PEEK[])"), "FETCH", where)
            )
            if data is None:
                run.summary.missing(name, "the server sent no message for this UID")
                continue
            run.process(name, data)
            if not dry_run:
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
    return run.summary


def _quote(folder: str) -> str:
    """A mailbox name as an IMAP quoted string (folders may have spaces)."""
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bounces_for_issue(store: Store, issue_key: str) -> list[BounceRecord]:
    """The bounces matched to one issue, oldest first (for `newsletter status ISSUE`)."""
    return store.bounces_for_issue(issue_key)
