"""SQLite store: subscribers, their status history, and the delivery ledger.

One file, the standard library's ``sqlite3``, WAL mode. The ledger is the truth
about who got what: a row is committed as ``sending`` (with a full fsync) before
its message goes to the server, and a row still ``sending`` when the next run
takes the issue's send lock belongs to a dead run, so it becomes ``uncertain``.

The send lock is an OS advisory lock (``flock``) on a file beside the database.
The kernel drops it when its process dies, even by ``kill -9``, so "rows in
``sending`` + nobody holds the lock" means exactly "crashed run".

The records it hands out live in ``models``, the address rules in ``addresses``
and the schema in ``migrations``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import itertools
import json
import os
import re
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from email_validator import EmailNotValidError

from .addresses import email_key, fast_normalize, full_normalize, normalize_email
from .dates import SignupDates
from .errors import DeliveryError, StoreError
from .feedback import FeedbackKind
from .migrations import MIGRATIONS, migrate
from .models import (
    INACTIVE,
    PROBLEM_STATES,
    BounceKind,
    BounceRecord,
    ClaimedRecipient,
    ConfirmationRequest,
    Consent,
    DeliveryResult,
    DeliveryState,
    Erasure,
    FeedbackAction,
    FeedbackItem,
    ImportReport,
    IssueSnapshot,
    LedgerEntry,
    PendingConfirmation,
    PersonRecord,
    ReplayToken,
    RowError,
    ScheduleEntry,
    ScheduleState,
    SendLock,
    Status,
    Subscriber,
    SubscriberEvent,
    Suppression,
)
from .presets import EXTRA_FIELDS, ColumnMapping, RowProblem, parse_moment, recognise
from .segments import PAUSED, Segment, TagError, join_tags, normalize_tag, split_tags

MEMORY = ":memory:"
BUSY_TIMEOUT_MS = 30_000  # a 1M-row import holds the write lock for a few seconds
IMPORT_CHUNK = 5_000
MAX_KEPT_ROW_ERRORS = 1_000  # ImportReport.errors keeps this many; on_error sees them all
MAX_IMPORTED_NAME = 200  # characters; a longer "name" is a mistake, e.g. a swallowed row
PAGE = 1_000  # rows per query when streaming subscribers

# Words other tools write in a `status` column (Mailchimp: subscribed, cleaned).
_STATUS_SYNONYMS = {"subscribed": "active", "cleaned": "bounced"}


# The reasons request_confirmation records when it creates a pending subscriber: only
# such rows are pruned when unconfirmed (an imported pending row is the editor's data).
FORM_REASONS = ("subscribe", "subscribe-form")

# --- helpers ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("use timezone-aware datetimes")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _opt_dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# Compact, like SQLite's json_patch output, so "unchanged" compares equal as text.
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _fields_json(fields: Mapping[str, str]) -> str:
    return _to_json(dict(fields))


_SUBSCRIBER_COLUMNS = (
    "s.id, s.email, s.name, s.fields, s.status, s.created_at, s.updated_at, "
    "s.status_changed_at, s.soft_bounces"
)


def _subscriber(row: Sequence[Any]) -> Subscriber:
    return Subscriber(
        id=row[0],
        email=row[1],
        name=row[2],
        fields=MappingProxyType(json.loads(row[3])),
        status=Status(row[4]),
        created_at=_dt(row[5]),
        updated_at=_dt(row[6]),
        status_changed_at=_dt(row[7]),
        soft_bounces=row[8],
    )


_EVENT_COLUMNS = "subscriber_events (subscriber_id, old_status, new_status, reason, detail, at)"


def _record_event(
    conn: sqlite3.Connection,
    subscriber_id: int,
    old_status: str | None,
    new_status: str,
    reason: str,
    detail: str,
    at: str,
) -> None:
    """Add one line to a subscriber's status history (``old_status`` None: just created)."""
    conn.execute(
        f"INSERT INTO {_EVENT_COLUMNS} VALUES (?, ?, ?, ?, ?, ?)",
        (subscriber_id, old_status, new_status, reason, detail, at),
    )


def _delivery_by_message_id(conn: sqlite3.Connection, message_id: str) -> tuple[str, int] | None:
    """(issue_key, subscriber_id) of the ledger row that sent ``message_id``, or None.

    The ledger keeps the Message-ID as the header had it; a reply or report may quote
    it with or without its angle brackets, so both forms are looked up.
    """
    bare = message_id.strip().strip("<>").strip()
    if not bare:
        return None
    row = conn.execute(
        "SELECT issue_key, subscriber_id FROM deliveries INDEXED BY deliveries_message_id"
        " WHERE message_id IN (?, ?) AND message_id <> '' LIMIT 1",
        (f"<{bare}>", bare),
    ).fetchone()
    return None if row is None else (row[0], int(row[1]))


# --- suppression and consent ----------------------------------------------------------------

# The database's own suppression key, as an SQL expression (a constant within a statement).
_HASH_KEY = "(SELECT key FROM suppression_key)"
# How a status that stops mail becomes a suppression reason (the same word).
_SUPPRESSING = frozenset(s.value for s in INACTIVE)


def _suppress(conn: sqlite3.Connection, subscriber_id: int, reason: str, at: str) -> None:
    """Leave a suppression entry for this subscriber's address (an existing one stays)."""
    conn.execute(
        "INSERT INTO suppressions (address_hash, reason, at)"
        f" SELECT suppression_hash({_HASH_KEY}, email_key), ?, ? FROM subscribers WHERE id = ?"
        " ON CONFLICT (address_hash) DO NOTHING",
        (reason, at, subscriber_id),
    )


def _suppression(conn: sqlite3.Connection, key: str) -> Suppression | None:
    """The suppression entry of the address whose :func:`email_key` is ``key``, or None."""
    row = conn.execute(
        "SELECT reason, at FROM suppressions"
        f" WHERE address_hash = suppression_hash({_HASH_KEY}, ?)",
        (key,),
    ).fetchone()
    return None if row is None else Suppression(row[0], _dt(row[1]))


def _suppressed_error(address: str, found: Suppression, where: str) -> StoreError:
    return StoreError(
        f"{address} is suppressed ({found.reason} on {found.at:%Y-%m-%d})",
        where=where,
        hint="only they can subscribe again, through the subscribe form (double opt-in)",
    )


def _record_consent(
    conn: sqlite3.Connection,
    subscriber_id: int,
    source: str,
    origin: str,
    at: str,
    signed_up: str = "",
) -> None:
    conn.execute(
        "INSERT INTO consents (subscriber_id, source, origin, recorded_at, signed_up)"
        " VALUES (?, ?, ?, ?, ?)",
        (subscriber_id, source, origin, at, signed_up),
    )


def _unsuppressed(conn: sqlite3.Connection) -> str:
    """`` AND ...`` leaving out import rows (``i``) whose address is suppressed; "" while
    nothing is (then no hash is computed at all)."""
    if conn.execute("SELECT 1 FROM suppressions LIMIT 1").fetchone() is None:
        return ""
    return (
        " AND NOT EXISTS (SELECT 1 FROM suppressions p WHERE p.address_hash ="
        f" suppression_hash({_HASH_KEY}, i.email_key))"
    )


def _forget(conn: sqlite3.Connection, subscriber_id: int) -> None:
    """Delete a subscriber with their history, consent and ledger rows, keeping the counts.

    Their ledger rows become counts per issue and state (``erased_deliveries``), so an
    old issue's totals still add up; their bounce records lose the address and the
    server's text (which quotes it) but keep kind, status and issue for the same reason.
    """
    conn.execute(
        "INSERT INTO erased_deliveries (issue_key, state, count)"
        " SELECT issue_key, state, count(*) FROM deliveries WHERE subscriber_id = ?"
        " GROUP BY issue_key, state"
        " ON CONFLICT (issue_key, state) DO UPDATE SET count = count + excluded.count",
        (subscriber_id,),
    )
    conn.execute(
        "UPDATE bounces SET subscriber_id = NULL, email = '', diagnostic = ''"
        " WHERE subscriber_id = ?",
        (subscriber_id,),
    )
    conn.execute("DELETE FROM deliveries WHERE subscriber_id = ?", (subscriber_id,))
    conn.execute("DELETE FROM subscribers WHERE id = ?", (subscriber_id,))


# Columns that carry the original sign-up date, first found first (lower case, spaces and
# hyphens as underscores: Mailchimp's "Date Added" is date_added). Not kept as fields.
SIGNUP_DATE_COLUMNS = (
    "signup_date",
    "sign_up_date",
    "subscribed_at",
    "optin_time",
    "opt_in_time",
    "confirm_time",
    "date_added",
    "created_at",
)


def _column_key(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


# A cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection
# list): the export puts an apostrophe in front, which spreadsheets show as text.
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


def _neutralise(cell: str) -> str:
    """A cell a spreadsheet shows as text; apostrophes already there get one more."""
    return "'" + cell if _FORMULA_START.match(cell) else cell


def _restore(cell: str) -> str:
    """The value ``_neutralise`` wrote ``cell`` for: one leading apostrophe comes off."""
    return cell[1:] if cell[:1] == "'" and _FORMULA_START.match(cell, 1) else cell


def _first_bad_utf8_line(path: Path) -> int:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


@contextlib.contextmanager
def _setup_lock(db: Path | None) -> Iterator[None]:
    """Serialise switching to WAL and migrating between processes opening one database.

    SQLite may answer "database is locked" to a journal-mode change at once, without
    waiting on the busy timeout, when another process is setting up the same file.
    """
    if db is None:
        yield
        return
    fd = os.open(
        db.with_name(f"{db.name}.setup.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _domain_filter(domains: Sequence[str]) -> tuple[str, list[str]]:
    """SQL (on ``s.email_key``) that leaves out addresses at these domains or under them."""
    if not domains:
        return "", []
    domain = "substr(s.email_key, instr(s.email_key, '@') + 1)"
    params: list[str] = []
    tests = []
    for name in domains:
        escaped = name.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        tests.append(f"{domain} = ? OR {domain} LIKE ? ESCAPE '\\'")
        params += [name.lower(), f"%.{escaped}"]
    return f" AND NOT ({' OR '.join(tests)})", params


def _audience_filter(
    status: Status | None, tag: str | None, segment: Segment | None
) -> tuple[str, list[Any]]:
    """`` AND ...`` conditions on ``s`` for a status, a tag and a segment (bound values)."""
    where = ""
    params: list[Any] = []
    if status is not None:
        where += " AND s.status = ?"
        params.append(Status(status).value)
    if tag is not None:
        try:
            normalized = normalize_tag(tag)
        except TagError as exc:
            raise StoreError(exc.message, hint=exc.hint) from None
        where += " AND s.id IN (SELECT t.subscriber_id FROM subscriber_tags t WHERE t.tag = ?)"
        params.append(normalized)
    if segment is not None:
        sql, values = segment.sql()
        where += f" AND ({sql})"
        params.extend(values)
    return where, params


# A send goes to active subscribers who have not paused (the `paused` tag).
_NOT_PAUSED = "s.id NOT IN (SELECT t.subscriber_id FROM subscriber_tags t WHERE t.tag = ?)"


def _recipient_filter(segment: Segment | None) -> tuple[str, list[Any]]:
    """The condition on ``s`` for whom a send goes to: active, not paused, in ``segment``."""
    where = f"s.status = 'active' AND {_NOT_PAUSED}"
    params: list[Any] = [PAUSED]
    if segment is not None:
        sql, values = segment.sql()
        where += f" AND ({sql})"
        params.extend(values)
    return where, params


def _not_sent(status: str, paused: bool) -> str:
    """The ledger's reply for a row a send cancels: the reader left, or paused."""
    return f"not sent: subscriber is {PAUSED if paused and status == 'active' else status}"


def _lock_name(issue_key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", issue_key):
        return issue_key
    return hashlib.sha256(issue_key.encode()).hexdigest()[:16]


# --- the store ----------------------------------------------------------------------------


def _staged_matches(conn: sqlite3.Connection, inactive: str) -> tuple[int, int, int]:
    """(distinct rows, rows of inactive subscribers, rows of other known subscribers) in
    temp.import_rows: what both an import and its dry run count first."""
    distinct = conn.execute("SELECT count(*) FROM import_rows").fetchone()[0]
    skipped = conn.execute(
        "SELECT count(*) FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
        f" WHERE s.status IN ({inactive})"
    ).fetchone()[0]
    matched = conn.execute(
        "SELECT count(*) FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
        f" WHERE s.status NOT IN ({inactive})"
    ).fetchone()[0]
    return int(distinct), int(skipped), int(matched)


class Store:
    """One connection to the database; safe to share between threads (calls are serialised)."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path | None, *, durable_claims: bool = True
    ) -> None:
        self._conn = conn
        self.path = path
        self.durable_claims = durable_claims
        self._lock = threading.RLock()
        self._held: dict[str, str] = {}  # issue_key -> run_id of send locks held by this store

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, *, durable_claims: bool = True) -> Store:
        """Open (creating folders and schema as needed) the database at ``path``.

        ``":memory:"`` gives a private in-memory database, for tests. Every commit
        survives a crash of the process (WAL, synchronous=NORMAL). ``durable_claims``
        also fsyncs each claim, so that even a power loss cannot turn a row that was
        handed to the server back into ``queued`` (which would send it twice).
        """
        # Resolved, so that every path to one file (a symlink, a relative --db) shares one
        # send lock: the lock file is named after the database.
        db: Path | None = None if str(path) == MEMORY else Path(path).resolve()
        where = MEMORY if db is None else str(db)
        try:
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                MEMORY if db is None else db,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the database: {exc}", where=where, hint="check the path (--db)"
            ) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Deleted and overwritten content is zeroed, so that an erased person leaves
            # no copy in free space (Debian's SQLite does this by default; not all do).
            conn.execute("PRAGMA secure_delete = ON")
            # Commits are durable against process crashes; claims add a full fsync
            # (see claim_batch) so they also survive power loss.
            conn.execute("PRAGMA synchronous = NORMAL")
            with _setup_lock(db):
                if db is not None:
                    conn.execute("PRAGMA journal_mode = WAL")
                migrate(conn, MIGRATIONS, where=where)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"cannot use the database: {exc}",
                where=where,
                hint="is this a newsletter database? Point --db elsewhere",
            ) from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, db, durable_claims=durable_claims)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._one("PRAGMA user_version")[0])

    # -- plumbing --------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return MEMORY if self.path is None else str(self.path)

    def _db_error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(
            f"database error: {exc}",
            where=self._where,
            hint="check the disk and that no other program holds the database",
        )

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: waits for other writers, never deadlocks)."""
        with self._lock:
            conn = self._conn
            try:
                if durable:
                    conn.execute("PRAGMA synchronous = FULL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                finally:
                    if durable:
                        conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _subscriber_id(self, conn: sqlite3.Connection, email_or_id: str | int) -> int:
        if isinstance(email_or_id, int):
            row = conn.execute("SELECT id FROM subscribers WHERE id = ?", (email_or_id,)).fetchone()
        else:
            row = conn.execute(
                "SELECT id FROM subscribers WHERE email_key = ?", (email_key(email_or_id),)
            ).fetchone()
        if row is None:
            raise StoreError(
                f"no subscriber {email_or_id!r}",
                where=self._where,
                hint="see `newsletter subscribers list`",
            )
        return int(row[0])

    def _get(self, conn: sqlite3.Connection, subscriber_id: int) -> Subscriber:
        row = conn.execute(
            f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id = ?", (subscriber_id,)
        ).fetchone()
        return _subscriber(row)

    @staticmethod
    def _change_status(
        conn: sqlite3.Connection,
        subscriber_id: int,
        status: Status,
        reason: str,
        detail: str,
        now: str,
        *,
        only_from: Sequence[Status] | None = None,
    ) -> bool:
        row = conn.execute(
            "SELECT status FROM subscribers WHERE id = ?", (subscriber_id,)
        ).fetchone()
        old = row[0]
        if old == status or (only_from is not None and old not in only_from):
            return False
        conn.execute(
            "UPDATE subscribers SET status = ?, status_changed_at = ?, updated_at = ? WHERE id = ?",
            (status.value, now, now, subscriber_id),
        )
        _record_event(conn, subscriber_id, old, status.value, reason, detail, now)
        if status.value in _SUPPRESSING:
            _suppress(conn, subscriber_id, status.value, now)
        return True

    # -- subscribers -----------------------------------------------------------------------

    def add_subscriber(
        self,
        email: str,
        name: str = "",
        fields: Mapping[str, str] | None = None,
        *,
        status: Status = Status.ACTIVE,
        reason: str = "added",
    ) -> Subscriber:
        """Add a new subscriber; an address already in the list (any status) or suppressed
        (see :meth:`suppression`) is refused."""
        normalized = normalize_email(email)
        now = _now()
        with self._transaction() as conn:
            existing = conn.execute(
                "SELECT status FROM subscribers WHERE email_key = ?", (normalized.lower(),)
            ).fetchone()
            if existing is not None:
                raise StoreError(
                    f"{normalized} is already in the list ({existing[0]})",
                    where=self._where,
                    hint="an address that unsubscribed or bounced is never re-added silently",
                )
            suppressed = _suppression(conn, normalized.lower())
            if suppressed is not None:
                raise _suppressed_error(normalized, suppressed, self._where)
            cursor = conn.execute(
                "INSERT INTO subscribers (email, email_key, name, fields, status, created_at,"
                " updated_at, status_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    normalized,
                    normalized.lower(),
                    name.strip(),
                    _fields_json(fields or {}),
                    Status(status).value,
                    now,
                    now,
                    now,
                ),
            )
            subscriber_id = int(cursor.lastrowid or 0)
            _record_event(conn, subscriber_id, None, Status(status).value, reason, "", now)
            _record_consent(conn, subscriber_id, "added", "", now)
            if Status(status).value in _SUPPRESSING:
                _suppress(conn, subscriber_id, Status(status).value, now)
            return self._get(conn, subscriber_id)

    def get_subscriber(self, email_or_id: str | int) -> Subscriber | None:
        """The subscriber with this address (any case) or id, or None."""
        param: str | int
        if isinstance(email_or_id, int):
            where, param = "s.id = ?", email_or_id
        else:
            where, param = "s.email_key = ?", email_key(email_or_id)
        row = self._one(f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE {where}", (param,))
        return None if row is None else _subscriber(row)

    def set_status(
        self, email_or_id: str | int, status: Status, reason: str, detail: str = ""
    ) -> Subscriber:
        """Change a subscriber's status and record why (no event when it is unchanged).

        Making a suppressed address active is refused: only the person's own
        confirmation (:meth:`confirm_subscription`) lifts a suppression.
        """
        status = Status(status)
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
            if status == Status.ACTIVE:
                current = self._get(conn, subscriber_id)
                found = _suppression(conn, current.email.lower())
                if current.status != Status.ACTIVE and found is not None:
                    raise _suppressed_error(current.email, found, self._where)
            self._change_status(conn, subscriber_id, status, reason, detail, _now())
            return self._get(conn, subscriber_id)

    def subscriber_events(self, email_or_id: str | int) -> list[SubscriberEvent]:
        """A subscriber's status history, oldest first."""
        with self._lock:
            try:
                subscriber_id = self._subscriber_id(self._conn, email_or_id)
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None
        rows = self._all(
            "SELECT subscriber_id, old_status, new_status, reason, detail, at"
            " FROM subscriber_events WHERE subscriber_id = ? ORDER BY id",
            (subscriber_id,),
        )
        return [
            SubscriberEvent(
                r[0], None if r[1] is None else Status(r[1]), Status(r[2]), r[3], r[4], _dt(r[5])
            )
            for r in rows
        ]

    def list_subscribers(
        self,
        status: Status | None = None,
        *,
        tag: str | None = None,
        segment: Segment | None = None,
    ) -> Iterator[Subscriber]:
        """All subscribers (or those with ``status``, ``tag`` and in ``segment``) by id,
        fetched a page at a time."""
        where, params = _audience_filter(status, tag, segment)
        return self._pages(where, params)

    def count(
        self,
        status: Status | None = None,
        *,
        tag: str | None = None,
        segment: Segment | None = None,
    ) -> int:
        """How many subscribers (with ``status``, ``tag`` and in ``segment``, or all)."""
        where, params = _audience_filter(status, tag, segment)
        return int(self._one(f"SELECT count(*) FROM subscribers s WHERE 1{where}", params)[0])

    def count_recipients(self, segment: Segment | None = None) -> int:
        """Who a send would go to now: active, not paused, in ``segment`` (when given)."""
        where, params = _recipient_filter(segment)
        return int(self._one(f"SELECT count(*) FROM subscribers s WHERE {where}", params)[0])

    def list_recipients(self, segment: Segment | None = None) -> Iterator[Subscriber]:
        """The subscribers :meth:`count_recipients` counts, by id (a dry run builds theirs)."""
        where, params = _recipient_filter(segment)
        return self._pages(f" AND {where}", params)

    def _pages(self, where: str, params: Sequence[Any]) -> Iterator[Subscriber]:
        """Subscribers matching `` AND ...`` conditions on ``s``, by id, a page at a time."""
        last = 0
        while True:
            rows = self._all(
                f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id > ?{where}"
                f" ORDER BY s.id LIMIT {PAGE}",
                (last, *params),
            )
            for row in rows:
                yield _subscriber(row)
            if len(rows) < PAGE:
                return
            last = rows[-1][0]

    # -- tags ------------------------------------------------------------------------------

    def tags_of(self, email_or_id: str | int) -> list[str]:
        """A subscriber's tags, in alphabetical order."""
        with self._lock:
            try:
                subscriber_id = self._subscriber_id(self._conn, email_or_id)
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None
        rows = self._all(
            "SELECT tag FROM subscriber_tags WHERE subscriber_id = ? ORDER BY tag",
            (subscriber_id,),
        )
        return [row[0] for row in rows]

    def change_tags(
        self,
        email_or_id: str | int,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
        *,
        reason: str = "tag",
        detail: str = "",
    ) -> tuple[list[str], list[str]]:
        """Add and remove tags in one transaction; returns (added, removed), only what changed.

        Each change is one line in the subscriber's history (``+europe -paused``), with
        ``reason`` (``tag``, ``preferences``...). A bad tag is a StoreError, nothing changed.
        """
        try:
            wanted = list(dict.fromkeys(normalize_tag(tag) for tag in add))
            unwanted = list(dict.fromkeys(normalize_tag(tag) for tag in remove))
        except TagError as exc:
            raise StoreError(exc.message, where=self._where, hint=exc.hint) from None
        now = _now()
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
            added: list[str] = []
            removed: list[str] = []
            for tag in (t for t in wanted if t not in unwanted):
                if conn.execute(
                    "INSERT INTO subscriber_tags (subscriber_id, tag, added_at)"
                    " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (subscriber_id, tag, now),
                ).rowcount:
                    added.append(tag)
            for tag in unwanted:
                if conn.execute(
                    "DELETE FROM subscriber_tags WHERE subscriber_id = ? AND tag = ?",
                    (subscriber_id, tag),
                ).rowcount:
                    removed.append(tag)
            if added or removed:
                status = conn.execute(
                    "SELECT status FROM subscribers WHERE id = ?", (subscriber_id,)
                ).fetchone()[0]
                change = " ".join([*(f"+{t}" for t in added), *(f"-{t}" for t in removed)])
                conn.execute(
                    "UPDATE subscribers SET updated_at = ? WHERE id = ?", (now, subscriber_id)
                )
                _record_event(
                    conn,
                    subscriber_id,
                    status,
                    status,
                    reason,
                    f"{detail}: {change}" if detail else change,
                    now,
                )
            return added, removed

    def tag_counts(self) -> dict[str, int]:
        """Subscribers per tag (any status), by tag."""
        return dict(
            self._all("SELECT tag, count(*) FROM subscriber_tags GROUP BY tag ORDER BY tag")
        )

    def count_by_status(self) -> dict[Status, int]:
        """Subscribers per status, every status present (zero when none)."""
        counts = dict.fromkeys(Status, 0)
        for status, number in self._all("SELECT status, count(*) FROM subscribers GROUP BY status"):
            counts[Status(status)] = number
        return counts

    def remove_subscriber(self, email_or_id: str | int, *, force: bool = False) -> None:
        """Delete a subscriber and their history, for good; their address stays suppressed.

        Refused when the ledger records deliveries to them, unless ``force`` (their
        ledger rows go too, kept as counts). To stop mail, unsubscribe instead: that keeps
        the record. A suppression entry (reason ``removed`` unless they had left before)
        keeps any later import from adding them back.
        """
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
            deliveries = conn.execute(
                "SELECT count(*) FROM deliveries WHERE subscriber_id = ?", (subscriber_id,)
            ).fetchone()[0]
            if deliveries and not force:
                raise StoreError(
                    f"{email_or_id} has {deliveries} delivery record(s)",
                    where=self._where,
                    hint="unsubscribe them instead, or use --force to delete those records too",
                )
            _suppress(conn, subscriber_id, "removed", _now())
            _forget(conn, subscriber_id)

    def field_names(self) -> set[str]:
        """The names of the free fields (lower-cased) that any subscriber has."""
        return {
            str(row[0]).lower()
            for row in self._all("SELECT DISTINCT j.key FROM subscribers s, json_each(s.fields) j")
        }

    def export_csv(self, out: TextIO, status: Status | None = None) -> int:
        """Write subscribers as CSV (email, name, status, created_at, tags, then fields);
        returns rows.

        ``import_csv`` reads this back: ``status`` suppresses new rows, ``created_at`` is the
        sign-up date of new rows, ``tags`` are separated by ``;``. A cell a spreadsheet would
        run (``=``, ``+``, ``-``, ``@``, tab, CR first) gets a leading apostrophe, which the
        import takes off again.
        """
        where = "" if status is None else " WHERE s.status = ?"
        params: tuple[Any, ...] = () if status is None else (Status(status).value,)
        keys = [
            row[0]
            for row in self._all(
                "SELECT DISTINCT j.key FROM subscribers s, json_each(s.fields) j"
                f"{where} ORDER BY 1",
                params,
            )
        ]
        writer = csv.writer(out)
        writer.writerow(["email", "name", "status", "created_at", "tags", *map(_neutralise, keys)])
        count = 0
        for sub, tags in self._with_tags(self.list_subscribers(status)):
            writer.writerow(
                [
                    _neutralise(sub.email),
                    _neutralise(sub.name),
                    sub.status.value,
                    sub.created_at.isoformat(),
                    _neutralise(join_tags(tags)),
                    *(_neutralise(sub.fields.get(key, "")) for key in keys),
                ]
            )
            count += 1
        return count

    def _with_tags(
        self, subscribers: Iterable[Subscriber]
    ) -> Iterator[tuple[Subscriber, list[str]]]:
        """Each subscriber with their tags, looked up a page at a time."""
        source = iter(subscribers)
        while page := list(itertools.islice(source, PAGE)):
            ids = [sub.id for sub in page]
            found: dict[int, list[str]] = {}
            for subscriber_id, tag in self._all(
                "SELECT subscriber_id, tag FROM subscriber_tags WHERE subscriber_id IN"
                f" ({', '.join('?' * len(ids))}) ORDER BY subscriber_id, tag",
                ids,
            ):
                found.setdefault(subscriber_id, []).append(tag)
            for sub in page:
                yield sub, found.get(sub.id, [])

    # -- import ----------------------------------------------------------------------------

    def import_csv(
        self,
        path: Path,
        *,
        on_error: Callable[[RowError], None] | None = None,
        mapping: ColumnMapping | None = None,
        dry_run: bool = False,
    ) -> ImportReport:
        """Import subscribers from a CSV file; all good rows land in one transaction.

        Columns: ``email`` (required), ``name``, ``status`` (active or subscribed, pending,
        unsubscribed, bounced or cleaned, complained; honoured only for new rows, so an
        exported list keeps its unsubscribes), ``tags`` (separated by ``;`` or ``,``; added,
        never removed), a sign-up date (``signup_date``, ``created_at``, ``optin_time``... see
        SIGNUP_DATE_COLUMNS: recorded with the consent, with the file and line),
        ``consent_at`` (when the address confirmed: the consent's confirmation),
        ``updated_at``/``status_changed_at`` (ignored); any other column becomes a field.
        UTF-8 (with or without Excel's BOM), separated by ``,`` ``;`` or tabs. Duplicates
        merge (later non-empty cells win); existing subscribers get new names/fields/tags but
        never a new status, so an import never reactivates anyone, and a suppressed address
        is never added back (``ImportReport.suppressed``). Each bad row goes to ``on_error``.

        ``mapping`` (:mod:`.presets`) first turns another tool's columns into these.
        ``dry_run`` reads and checks everything, counts what would happen, writes nothing.
        """
        path = Path(path)
        try:
            handle = path.open(encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise StoreError(
                f"cannot read the file: {exc.strerror}", where=str(path), hint="check the path"
            ) from None
        with handle, self._lock:
            conn = self._conn
            try:
                conn.execute("DROP TABLE IF EXISTS temp.import_rows")
                conn.execute(
                    "CREATE TEMP TABLE import_rows (line INTEGER PRIMARY KEY,"
                    " email_key TEXT NOT NULL UNIQUE, email TEXT NOT NULL, name TEXT NOT NULL,"
                    " fields TEXT NOT NULL, status TEXT NOT NULL,"
                    " tags TEXT NOT NULL DEFAULT '[]', signed_up TEXT, consent_at TEXT)"
                )
                # Staging writes only the temp database: other writers are not blocked.
                conn.execute("BEGIN")
                try:
                    staged = self._stage(conn, handle, path, on_error, mapping)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                if dry_run:
                    counts = self._count_staged(conn)
                else:
                    with self._transaction() as tx:
                        counts = self._merge_staged(tx, path.name)
            except UnicodeDecodeError:
                raise StoreError(
                    "not UTF-8 text",
                    where=f"{path}:{_first_bad_utf8_line(path)}",
                    hint="save the file as UTF-8 (in Excel: 'CSV UTF-8')",
                ) from None
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("DROP TABLE IF EXISTS temp.import_rows")
        rows, good, errors, error_count, description = staged
        added, updated, matched, skipped, distinct, suppressed, new_by_status = counts
        return ImportReport(
            path=path,
            rows=rows,
            added=added,
            updated=updated,
            unchanged=matched - updated,
            skipped_inactive=skipped,
            duplicates=good - distinct,
            error_count=error_count,
            errors=tuple(errors),
            suppressed=suppressed,
            new_by_status=MappingProxyType(new_by_status),
            mapping=description,
            dry_run=dry_run,
        )

    def _stage(
        self,
        conn: sqlite3.Connection,
        handle: TextIO,
        path: Path,
        on_error: Callable[[RowError], None] | None,
        mapping: ColumnMapping | None = None,
    ) -> tuple[int, int, list[RowError], int, tuple[str, ...]]:
        """Stream the CSV into temp.import_rows; returns (rows, good rows, errors, error
        count, the mapping's description)."""
        first = handle.readline()
        if not first.strip():
            raise StoreError(
                "the file is empty",
                where=f"{path}:1",
                hint="the first line must name the columns, e.g. email,name",
            )
        delimiter = max((",", ";", "\t"), key=first.count)
        reader = csv.reader(itertools.chain([first], handle), delimiter=delimiter)
        try:
            header = [_restore(cell.strip()) for cell in next(reader)]
            lowered = [cell.lower() for cell in header]
            named = [cell for cell in lowered if cell]
            if len(set(named)) != len(named):
                duplicate = next(cell for cell in named if named.count(cell) > 1)
                raise StoreError(
                    f"the column {duplicate!r} appears twice",
                    where=f"{path}:1",
                    hint="rename or remove one of them",
                )
            convert: Callable[[Sequence[str]], list[str]] | None = None
            description: tuple[str, ...] = ()
            if mapping is not None:
                bound = mapping.bind(header, path)
                convert, description = bound.convert, bound.description
                header = list(bound.header)
                lowered = [cell.lower() for cell in header]
            else:
                known = recognise(header)
                if known is not None:
                    # Its own status flags would be read as fields: readers that tool does
                    # not mail would become active.
                    preset_name, tool, column = known
                    raise StoreError(
                        f"this is a {tool} export (it has {column!r})",
                        where=f"{path}:1",
                        hint=f"import it with --from {preset_name}, which reads its columns"
                        " and statuses (add --dry-run to see how)",
                    )
            if "email" not in lowered:
                raise StoreError(
                    f"no 'email' column (columns: {', '.join(header) or 'none'})",
                    where=f"{path}:1",
                    hint="the first line must name the columns; call the address column 'email'",
                )
            email_i = lowered.index("email")
            name_i = lowered.index("name") if "name" in lowered else None
            status_i = lowered.index("status") if "status" in lowered else None
            keyed = [_column_key(cell) for cell in header]
            date_cols = sorted(
                (i for i, key in enumerate(keyed) if key in SIGNUP_DATE_COLUMNS),
                key=lambda i: SIGNUP_DATE_COLUMNS.index(keyed[i]),
            )
            tags_i = lowered.index("tags") if "tags" in lowered else None
            consent_i = lowered.index("consent_at") if "consent_at" in lowered else None
            extra_i = header.index(EXTRA_FIELDS) if EXTRA_FIELDS in header else None
            ignored = {
                "email",
                "name",
                "status",
                "tags",
                "consent_at",
                "updated_at",
                "status_changed_at",
                EXTRA_FIELDS,
            }
            field_cols = [
                (i, header[i])
                for i, key in enumerate(lowered)
                if key and key not in ignored and i not in date_cols
            ]
            width = len(header)
            signup_dates = SignupDates()
            statuses = {s.value: s.value for s in Status} | _STATUS_SYNONYMS

            errors: list[RowError] = []
            error_count = rows = good = 0

            def bad(line: int, message: str) -> None:
                nonlocal error_count
                error_count += 1
                error = RowError(line, message)
                if len(errors) < MAX_KEPT_ROW_ERRORS:
                    errors.append(error)
                if on_error is not None:
                    on_error(error)

            def cell(row: Sequence[str], i: int | None) -> str:
                return _restore(row[i].strip()) if i is not None and i < len(row) else ""

            # Only the columns this file needs are bound: each one costs 0.2 µs a row.
            columns = ["line", "email_key", "email", "name", "fields", "status"]
            columns += ["tags"] if tags_i is not None else []
            columns += ["signed_up"] if date_cols else []
            columns += ["consent_at"] if consent_i is not None else []
            insert = (
                f"INSERT INTO import_rows ({', '.join(columns)})"
                f" VALUES ({', '.join('?' * len(columns))}) ON CONFLICT (email_key) DO UPDATE SET"
                " name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE name END,"
                " fields = CASE WHEN excluded.fields = '{}' THEN fields"
                " ELSE json_patch(fields, excluded.fields) END,"
                " status = CASE WHEN status = 'active' THEN excluded.status ELSE status END,"
                " tags = CASE WHEN excluded.tags = '[]' THEN tags WHEN tags = '[]'"
                " THEN excluded.tags ELSE (SELECT json_group_array(value) FROM"
                " (SELECT value FROM json_each(tags) UNION SELECT value"
                " FROM json_each(excluded.tags))) END,"
                " signed_up = coalesce(signed_up, excluded.signed_up),"
                " consent_at = coalesce(consent_at, excluded.consent_at)"
            )
            batch: list[tuple[Any, ...]] = []
            fast = fast_normalize
            dumps = _to_json
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num
                if end != line:
                    # A quote that never closes reads every later row into one value: the
                    # file cannot be split into rows we can trust, so none of it is imported.
                    raise StoreError(
                        f"a double quote opens a value that runs on to line {end} (a stray quote?)",
                        where=f"{path}:{line}",
                        hint="a value cannot span lines: close or remove that quote;"
                        " nothing was imported",
                    )
                if not row:
                    continue
                if convert is not None and any(value.strip() for value in row):
                    try:
                        row = convert(row)
                    except RowProblem as exc:
                        rows += 1
                        bad(line, str(exc))
                        continue
                email = _restore(row[email_i].strip()) if email_i < len(row) else ""
                if not email:
                    if any(value.strip() for value in row):
                        rows += 1
                        bad(line, "no email address")
                    continue
                rows += 1
                if len(row) > width and any(value.strip() for value in row[width:]):
                    bad(line, f"{len(row)} cells but the header names {width} columns")
                    continue
                normalized = fast(email)
                if normalized is None:
                    try:
                        normalized = full_normalize(email)
                    except EmailNotValidError as exc:
                        bad(line, f"invalid email address {email!r}: {exc}")
                        continue
                status = "active"
                if status_i is not None and status_i < len(row):
                    given = row[status_i].strip().lower()
                    if given and given not in statuses:
                        bad(
                            line,
                            f"unknown status {row[status_i].strip()!r}"
                            f" (use one of: {', '.join(sorted(statuses))})",
                        )
                        continue
                    status = statuses.get(given, "active")
                name = (
                    _restore(row[name_i].strip())
                    if name_i is not None and name_i < len(row)
                    else ""
                )
                if len(name) > MAX_IMPORTED_NAME:
                    bad(line, f"the name has {len(name)} characters (at most {MAX_IMPORTED_NAME})")
                    continue
                tags_json = "[]"
                if tags_i is not None and (tags_cell := cell(row, tags_i)):
                    try:
                        tags_json = dumps(split_tags(tags_cell))
                    except TagError as exc:
                        bad(line, f"tags: {exc.message}")
                        continue
                signed_up: str | None = None
                if date_cols:
                    given_date, date_i = next(
                        ((row[i].strip(), i) for i in date_cols if i < len(row) and row[i].strip()),
                        ("", -1),
                    )
                    if given_date:
                        try:
                            signed_up = signup_dates.read(given_date)
                        except ValueError as exc:
                            bad(
                                line,
                                f"unreadable date {given_date!r} in column {header[date_i]!r}:"
                                f" {exc}; write it as YYYY-MM-DD (ISO 8601)",
                            )
                            continue
                consent_at: str | None = None
                if consent_i is not None and (consent_cell := cell(row, consent_i)):
                    try:
                        consent_at = parse_moment(consent_cell)
                    except ValueError:
                        bad(
                            line, f"consent_at {consent_cell!r} is not a date (use e.g. 2026-01-31)"
                        )
                        continue
                fields_json = "{}"
                if field_cols or extra_i is not None:
                    values = {
                        key: _restore(value)
                        for i, key in field_cols
                        if i < len(row) and (value := row[i].strip())
                    }
                    if extra_i is not None and (extra := cell(row, extra_i)):
                        values.update(json.loads(extra))
                    if values:
                        fields_json = dumps(values)
                key = normalized.lower()
                staged: tuple[Any, ...] = (line, key, normalized, name, fields_json, status)
                if tags_i is not None:
                    staged += (tags_json,)
                if date_cols:
                    staged += (signed_up,)
                if consent_i is not None:
                    staged += (consent_at,)
                batch.append(staged)
                good += 1
                if len(batch) >= IMPORT_CHUNK:
                    conn.executemany(insert, batch)
                    batch.clear()
            if batch:
                conn.executemany(insert, batch)
        except csv.Error as exc:
            raise StoreError(
                f"unreadable CSV: {exc}",
                where=f"{path}:{reader.line_num}",
                hint="check the quoting on that line",
            ) from None
        return rows, good, errors, error_count, description

    @staticmethod
    def _count_staged(
        conn: sqlite3.Connection,
    ) -> tuple[int, int, int, int, int, int, dict[str, int]]:
        """What merging temp.import_rows would do, without doing it (a dry run)."""
        inactive = ", ".join(f"'{s.value}'" for s in INACTIVE)
        distinct, skipped, matched = _staged_matches(conn, inactive)
        updated = conn.execute(
            "SELECT count(*) FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f" WHERE s.status NOT IN ({inactive}) AND ("
            " (i.name <> '' AND i.name IS NOT s.name)"
            " OR (i.fields <> '{}' AND json_patch(s.fields, i.fields) IS NOT s.fields)"
            " OR EXISTS (SELECT 1 FROM json_each(i.tags) j WHERE NOT EXISTS"
            "  (SELECT 1 FROM subscriber_tags t WHERE t.subscriber_id = s.id AND t.tag = j.value)))"
        ).fetchone()[0]
        new_by_status = dict(
            conn.execute(
                "SELECT i.status, count(*) FROM import_rows i WHERE NOT EXISTS"
                " (SELECT 1 FROM subscribers s WHERE s.email_key = i.email_key)"
                f"{_unsuppressed(conn)} GROUP BY i.status ORDER BY i.status"
            ).fetchall()
        )
        added = sum(new_by_status.values())
        suppressed = distinct - skipped - matched - added
        return added, updated, matched, skipped, distinct, suppressed, new_by_status

    @staticmethod
    def _merge_staged(
        conn: sqlite3.Connection, file_name: str
    ) -> tuple[int, int, int, int, int, int, dict[str, int]]:
        """Merge temp.import_rows into subscribers; (added, updated, matched, skipped,
        distinct, suppressed, added per status)."""
        now = _now()
        detail = f"file {file_name}"
        inactive = ", ".join(f"'{s.value}'" for s in INACTIVE)
        distinct, skipped, matched = _staged_matches(conn, inactive)
        # A subscriber gaining a tag counts as updated too.
        new_tags = (
            "EXISTS (SELECT 1 FROM json_each(new.tags) j WHERE NOT EXISTS"
            " (SELECT 1 FROM subscriber_tags t WHERE t.subscriber_id = subscribers.id"
            "  AND t.tag = j.value))"
        )
        updated = conn.execute(
            "UPDATE subscribers SET name = new.name, fields = new.fields, updated_at = ?"
            " FROM (SELECT s.id AS id,"
            "   CASE WHEN i.name <> '' THEN i.name ELSE s.name END AS name,"
            "   CASE WHEN i.fields = '{}' THEN s.fields ELSE json_patch(s.fields, i.fields) END"
            "     AS fields, i.tags AS tags"
            "   FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f"  WHERE s.status NOT IN ({inactive})) AS new"
            " WHERE subscribers.id = new.id"
            " AND (subscribers.name IS NOT new.name OR subscribers.fields IS NOT new.fields"
            f"  OR (new.tags <> '[]' AND {new_tags}))",
            (now,),
        ).rowcount
        before = conn.execute("SELECT coalesce(max(id), 0) FROM subscribers").fetchone()[0]
        # A new row whose address is suppressed is left out. The hash is computed in SQL,
        # for the rows new to the list only (a re-import hashes nothing), and not at all
        # while nothing is suppressed.
        unsuppressed = _unsuppressed(conn)
        import_id = conn.execute(
            "INSERT INTO imports (file, imported_at) VALUES (?, ?)", (file_name, now)
        ).lastrowid
        tagged = bool(
            conn.execute("SELECT 1 FROM import_rows WHERE tags <> '[]' LIMIT 1").fetchone()
        )
        # Tags new to subscribers already in the list: one history line each.
        if tagged:
            conn.execute(
                f"INSERT INTO {_EVENT_COLUMNS}"
                " SELECT s.id, s.status, s.status, 'tag',"
                " ? || ': +' || group_concat(j.value, ' +'), ?"
                " FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key,"
                " json_each(i.tags) j"
                f" WHERE i.tags <> '[]' AND s.status NOT IN ({inactive}) AND NOT EXISTS"
                " (SELECT 1 FROM subscriber_tags t"
                "  WHERE t.subscriber_id = s.id AND t.tag = j.value)"
                " GROUP BY s.id ORDER BY s.id",
                (detail, now),
            )
        # The consent of each row added (the file, its line, a sign-up date, a
        # confirmation time) is written with it.
        added = conn.execute(
            "INSERT INTO subscribers (email, email_key, name, fields, status, created_at,"
            " updated_at, status_changed_at, import_id, import_line, signed_up,"
            " import_confirmed_at)"
            " SELECT i.email, i.email_key, i.name, i.fields, i.status, ?1, ?1, ?1, ?2, i.line,"
            " i.signed_up, i.consent_at FROM import_rows i"
            " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email_key = i.email_key)"
            f"{unsuppressed} ORDER BY i.line",
            (now, import_id),
        ).rowcount
        suppressed = distinct - skipped - matched - added
        if tagged:
            conn.execute(
                "INSERT INTO subscriber_tags (subscriber_id, tag, added_at)"
                " SELECT s.id, j.value, ? FROM import_rows i"
                " JOIN subscribers s ON s.email_key = i.email_key, json_each(i.tags) j"
                f" WHERE i.tags <> '[]' AND (s.id > ? OR s.status NOT IN ({inactive}))"
                " ON CONFLICT DO NOTHING",
                (now, before),
            )
        # New ids are all above the old maximum: we hold the write lock.
        # One statement for all the subscribers the import added (it may be a million).
        conn.execute(
            f"INSERT INTO {_EVENT_COLUMNS}"
            " SELECT id, NULL, status, 'import', ?, ? FROM subscribers WHERE id > ?",
            (detail, now, before),
        )
        conn.execute(
            "INSERT INTO suppressions (address_hash, reason, at)"
            f" SELECT suppression_hash({_HASH_KEY}, email_key), status, ?1 FROM subscribers"
            f" WHERE id > ?2 AND status IN ({inactive})"
            " ON CONFLICT (address_hash) DO NOTHING",
            (now, before),
        )
        new_by_status = dict(
            conn.execute(
                "SELECT status, count(*) FROM subscribers WHERE id > ?"
                " GROUP BY status ORDER BY status",
                (before,),
            ).fetchall()
        )
        return added, updated, matched, skipped, distinct, suppressed, new_by_status

    # -- the delivery ledger ---------------------------------------------------------------

    def lock_path(self, issue_key: str) -> Path | None:
        """The file whose flock marks a running send of ``issue_key`` (None in memory)."""
        if self.path is None:
            return None
        return self.path.with_name(f"{self.path.name}.send-{_lock_name(issue_key)}.lock")

    @contextlib.contextmanager
    def acquire_send_lock(self, issue_key: str) -> Iterator[SendLock]:
        """Hold the send lock of ``issue_key`` for one run; DeliveryError if another holds it.

        On entry, rows left ``sending`` by a dead run become ``uncertain`` (counted in
        ``SendLock.uncertain``), and deferred rows parked for "the next run" become due.
        """
        run_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        lock_path = self.lock_path(issue_key)
        fd: int | None = None
        busy = f"another send of issue {issue_key} is running"
        hint = "wait for it to finish or stop it (a stopped send releases the lock at once)"
        with self._lock:
            if issue_key in self._held:
                raise DeliveryError(f"{busy} (in this process)", where=self._where, hint=hint)
            if lock_path is not None:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    detail = f" ({holder})" if holder else ""
                    raise DeliveryError(f"{busy}{detail}", where=self._where, hint=hint) from None
                except BaseException:
                    os.close(fd)
                    raise
                os.ftruncate(fd, 0)
                holder = f"pid {os.getpid()} on {socket.gethostname()}, run {run_id}\n"
                os.pwrite(fd, holder.encode(), 0)
            self._held[issue_key] = run_id
        try:
            uncertain = self.mark_crashed_as_uncertain(issue_key)
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE deliveries SET retry_at = ? WHERE issue_key = ? AND state = 'deferred'"
                    " AND retry_at IS NULL",
                    (_now(), issue_key),
                )
            yield SendLock(issue_key, run_id, uncertain)
        finally:
            with self._lock:
                self._held.pop(issue_key, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                    os.close(fd)  # releases the flock

    def mark_crashed_as_uncertain(self, issue_key: str) -> int:
        """Rows left ``sending`` become ``uncertain``; call only while holding the send lock.

        With the lock held no other run is alive on this issue, so every ``sending`` row
        was claimed by a run that died before recording the result.
        """
        if issue_key not in self._held:
            raise RuntimeError(f"mark_crashed_as_uncertain({issue_key!r}) needs the send lock")
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET state = 'uncertain', updated_at = ?,"
                " last_reply = 'interrupted while sending (run ' || claimed_by || ')'"
                " WHERE issue_key = ? AND state = 'sending'",
                (_now(), issue_key),
            ).rowcount

    def snapshot_recipients(
        self, issue_key: str, *, include_new: bool = False, segment: Segment | None = None
    ) -> int:
        """Fix the recipients of ``issue_key``; returns how many ledger rows were added.

        The first call queues every active subscriber who has not paused (and, with a
        ``segment``, is in it), and records the time and the segment. Later calls add
        nobody, unless ``include_new``: then such subscribers without a row are queued,
        within the same segment. A segment other than the recorded one is a DeliveryError
        naming it. With nobody to send to, the first call records nothing.
        """
        now = _now()
        where, params = _recipient_filter(segment)
        with self._transaction() as conn:
            known = conn.execute(
                "SELECT segment FROM issue_sends WHERE issue_key = ?", (issue_key,)
            ).fetchone()
            if known is not None:
                self._check_segment(issue_key, known[0], segment)
                if not include_new:
                    return 0
            else:
                if not conn.execute(
                    f"SELECT 1 FROM subscribers s WHERE {where} LIMIT 1", params
                ).fetchone():
                    return 0
                conn.execute(
                    "INSERT INTO issue_sends (issue_key, snapshot_at, segment, segment_filter)"
                    " VALUES (?, ?, ?, ?)",
                    (
                        issue_key,
                        now,
                        "" if segment is None else segment.name,
                        "" if segment is None else segment.expression,
                    ),
                )
            return conn.execute(
                "INSERT INTO deliveries (issue_key, subscriber_id, state, updated_at)"
                f" SELECT ?, s.id, 'queued', ? FROM subscribers s WHERE {where}"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d"
                "   WHERE d.issue_key = ? AND d.subscriber_id = s.id)"
                " ORDER BY s.id",
                (issue_key, now, *params, issue_key),
            ).rowcount

    def _check_segment(self, issue_key: str, recorded: str, segment: Segment | None) -> None:
        given = "" if segment is None else segment.name
        if given == recorded:
            return
        first = f"segment {recorded}" if recorded else "every active subscriber (no segment)"
        raise DeliveryError(
            f"issue {issue_key} went to {first} at its first send;"
            f" {'segment ' + given if given else 'a send without a segment'} cannot change that",
            where=self._where,
            hint=f"send it with --segment {recorded}"
            if recorded
            else "send it without --segment (and no segment: in issue.md)",
        )

    def issue_segment(self, issue_key: str) -> str | None:
        """The segment ``issue_key`` went to ("" for everyone), or None if never sent."""
        row = self._one("SELECT segment FROM issue_sends WHERE issue_key = ?", (issue_key,))
        return None if row is None else str(row[0])

    def check_issue_segment(self, issue_key: str, segment: Segment | None) -> None:
        """DeliveryError when ``issue_key`` was first sent to another segment than this."""
        recorded = self.issue_segment(issue_key)
        if recorded is not None:
            self._check_segment(issue_key, recorded, segment)

    def issue_snapshot(self, issue_key: str) -> IssueSnapshot | None:
        """When the recipients of ``issue_key`` were fixed, or None if never sent."""
        row = self._one(
            "SELECT i.issue_key, i.snapshot_at,"
            " (SELECT count(*) FROM deliveries d WHERE d.issue_key = i.issue_key)"
            " FROM issue_sends i WHERE i.issue_key = ?",
            (issue_key,),
        )
        return None if row is None else IssueSnapshot(row[0], _dt(row[1]), row[2])

    def issues_with_deliveries(self) -> list[IssueSnapshot]:
        """Every issue with a ledger, oldest snapshot first."""
        rows = self._all(
            "SELECT i.issue_key, i.snapshot_at,"
            " (SELECT count(*) FROM deliveries d WHERE d.issue_key = i.issue_key)"
            " FROM issue_sends i ORDER BY i.snapshot_at, i.issue_key"
        )
        return [IssueSnapshot(r[0], _dt(r[1]), r[2]) for r in rows]

    def claim_batch(
        self, issue_key: str, worker_id: str, n: int, *, skip_domains: Sequence[str] = ()
    ) -> list[ClaimedRecipient]:
        """Move up to ``n`` due rows (queued, then deferred whose retry time has come) to
        ``sending``, durably committed before returning; send only what this returns.

        Rows whose subscriber is no longer active become ``cancelled`` instead, so an
        unsubscribe during a send is honoured for everyone not yet claimed. An empty
        list means nothing is due now (see :meth:`next_retry_at`). Rows of recipients at
        ``skip_domains`` (or under them) are left for later (a domain's pacing).
        """
        if n <= 0:
            return []
        now = _now()
        skip_sql, skip_params = _domain_filter(skip_domains)
        # The last column: whether the reader paused (a `paused` tag) since the snapshot.
        columns = (
            f"d.attempts, {_SUBSCRIBER_COLUMNS}, EXISTS (SELECT 1 FROM subscriber_tags t"
            " WHERE t.subscriber_id = s.id AND t.tag = ?)"
        )
        # The planner, without statistics, would walk the primary key (every row of the
        # issue) to get subscriber_id order; the state index gives it too, per state.
        joined = (
            "FROM deliveries d INDEXED BY deliveries_state"
            " JOIN subscribers s ON s.id = d.subscriber_id"
        )
        claimed: list[ClaimedRecipient] = []
        with self._transaction(durable=self.durable_claims) as conn:
            while len(claimed) < n:
                want = n - len(claimed)
                rows = conn.execute(
                    f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'queued'"
                    f"{skip_sql} ORDER BY d.subscriber_id LIMIT ?",
                    (PAUSED, issue_key, *skip_params, want),
                ).fetchall()
                if len(rows) < want:
                    rows += conn.execute(
                        f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'deferred'"
                        f" AND d.retry_at <= ?{skip_sql} ORDER BY d.subscriber_id LIMIT ?",
                        (PAUSED, issue_key, now, *skip_params, want - len(rows)),
                    ).fetchall()
                if not rows:
                    break
                active = [r for r in rows if r[5] == Status.ACTIVE and not r[-1]]
                gone = [r for r in rows if r[5] != Status.ACTIVE or r[-1]]
                conn.executemany(
                    "UPDATE deliveries SET state = 'sending', attempts = attempts + 1,"
                    " claimed_by = ?, updated_at = ? WHERE issue_key = ? AND subscriber_id = ?",
                    [(worker_id, now, issue_key, r[1]) for r in active],
                )
                conn.executemany(
                    "UPDATE deliveries SET state = 'cancelled', retry_at = NULL, updated_at = ?,"
                    " last_reply = ? WHERE issue_key = ? AND subscriber_id = ?",
                    [(now, _not_sent(r[5], bool(r[-1])), issue_key, r[1]) for r in gone],
                )
                claimed.extend(
                    ClaimedRecipient(issue_key, _subscriber(r[1:-1]), r[0] + 1) for r in active
                )
        return claimed

    def record_results(self, results: Iterable[DeliveryResult]) -> int:
        """Record outcomes of claimed rows in one transaction; returns rows updated.

        Only rows in ``sending`` change, so a result recorded twice is a no-op. A FAILED
        result with ``bounce`` also marks an active subscriber bounced (with the reply).
        """
        now = _now()
        params = []
        bounces = []
        for result in results:
            sent = result.state == DeliveryState.SENT
            retry = (
                _iso(result.retry_at)
                if result.state == DeliveryState.DEFERRED and result.retry_at is not None
                else None
            )
            params.append(
                (
                    result.state.value,
                    result.reply,
                    result.message_id,
                    retry,
                    now,
                    now if sent else None,
                    result.issue_key,
                    result.subscriber_id,
                )
            )
            if result.bounce and result.state == DeliveryState.FAILED:
                bounces.append(result)
        if not params:
            return 0
        with self._transaction() as conn:
            updated = conn.executemany(
                "UPDATE deliveries SET state = ?, last_reply = ?,"
                " message_id = coalesce(nullif(?, ''), message_id), retry_at = ?,"
                " updated_at = ?, sent_at = coalesce(?, sent_at)"
                " WHERE issue_key = ? AND subscriber_id = ? AND state = 'sending'",
                params,
            ).rowcount
            for result in bounces:
                self._change_status(
                    conn,
                    result.subscriber_id,
                    Status.BOUNCED,
                    "smtp-5xx",
                    f"issue {result.issue_key}: {result.reply}",
                    now,
                    only_from=(Status.ACTIVE, Status.PENDING),
                )
        return updated

    def next_retry_at(self, issue_key: str) -> datetime | None:
        """When the earliest deferred row of this run becomes due, or None."""
        row = self._one(
            "SELECT min(retry_at) FROM deliveries INDEXED BY deliveries_state"
            " WHERE issue_key = ? AND state = 'deferred'",
            (issue_key,),
        )
        return _opt_dt(row[0])

    def resend_uncertain(self, issue_key: str) -> int:
        """Queue ``uncertain`` rows again (the user accepts possible duplicates)."""
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET state = 'queued', updated_at = ?"
                " WHERE issue_key = ? AND state = 'uncertain'",
                (_now(), issue_key),
            ).rowcount

    def ledger_counts(self, issue_key: str) -> dict[DeliveryState, int]:
        """Rows per state for ``issue_key``, every state present (zero when none)."""
        counts = dict.fromkeys(DeliveryState, 0)
        for state, number in self._all(
            "SELECT state, count(*) FROM deliveries WHERE issue_key = ? GROUP BY state",
            (issue_key,),
        ):
            counts[DeliveryState(state)] = number
        return counts

    def count_new_subscribers(self, issue_key: str, segment: Segment | None = None) -> int:
        """Recipients (active, not paused, in ``segment``) with no ledger row for
        ``issue_key``: all of them before its first send; afterwards, those a send adds
        only with ``include_new``."""
        where, params = _recipient_filter(segment)
        row = self._one(
            f"SELECT count(*) FROM subscribers s WHERE {where} AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.issue_key = ? AND d.subscriber_id = s.id)",
            (*params, issue_key),
        )
        return int(row[0])

    def ledger_problems(self, issue_key: str, limit: int | None = None) -> list[LedgerEntry]:
        """Failed, uncertain and deferred rows with address and server reply."""
        states = ", ".join(f"'{s.value}'" for s in PROBLEM_STATES)
        return self._entries(
            f"d.issue_key = ? AND d.state IN ({states}) ORDER BY d.state, s.email_key"
            + ("" if limit is None else f" LIMIT {int(limit)}"),
            (issue_key,),
        )

    def ledger_entry(self, issue_key: str, email_or_id: str | int) -> LedgerEntry | None:
        """The ledger row of one subscriber for ``issue_key``, or None."""
        param: str | int
        if isinstance(email_or_id, int):
            where, param = "d.subscriber_id = ?", email_or_id
        else:
            where, param = "s.email_key = ?", email_key(email_or_id)
        entries = self._entries(f"d.issue_key = ? AND {where}", (issue_key, param))
        return entries[0] if entries else None

    def _entries(self, where: str, params: Sequence[Any]) -> list[LedgerEntry]:
        rows = self._all(
            "SELECT d.issue_key, d.subscriber_id, s.email, s.name, d.state, d.attempts,"
            " d.last_reply, d.message_id, d.updated_at, d.sent_at, d.retry_at"
            " FROM deliveries d JOIN subscribers s ON s.id = d.subscriber_id"
            f" WHERE {where}",
            params,
        )
        return [
            LedgerEntry(
                r[0],
                r[1],
                r[2],
                r[3],
                DeliveryState(r[4]),
                r[5],
                r[6],
                r[7],
                _dt(r[8]),
                _opt_dt(r[9]),
                _opt_dt(r[10]),
            )
            for r in rows
        ]

    # -- subscription service and bounces ---------------------------------------------------

    def unsubscribe(
        self, email_or_id: str | int, reason: str, detail: str = ""
    ) -> Subscriber | None:
        """Unsubscribe (from active, pending or bounced); None when there is no such subscriber.

        Idempotent: an unsubscribed or complained subscriber is left as is, with no new event.
        Rows of a running send are cancelled when claimed (see :meth:`claim_batch`).
        """
        with self._transaction() as conn:
            try:
                subscriber_id = self._subscriber_id(conn, email_or_id)
            except StoreError:
                return None
            self._change_status(
                conn,
                subscriber_id,
                Status.UNSUBSCRIBED,
                reason,
                detail,
                _now(),
                only_from=(Status.ACTIVE, Status.PENDING, Status.BOUNCED),
            )
            return self._get(conn, subscriber_id)

    def request_confirmation(
        self,
        email: str,
        name: str = "",
        *,
        resend_after: timedelta,
        reason: str = "subscribe",
        now: datetime | None = None,
        page: str = "",
    ) -> ConfirmationRequest:
        """Record a subscribe request and reserve a confirmation email if one is due.

        A new address is added as ``pending``. Anyone not active (pending, unsubscribed,
        bounced, complained) keeps their status until they confirm; their confirmation is
        due when none was sent in the last ``resend_after``. Active subscribers get none.
        The reservation is committed before the email goes out, so two requests at once
        send one email; :meth:`release_confirmation` undoes it when sending fails.

        The request is recorded as consent (source ``form``, the ``page`` it came from,
        its time) until the confirming click completes it; requests while one is open
        add nothing.
        """
        normalized = normalize_email(email)
        moment = now or datetime.now(UTC)
        stamp = _iso(moment)
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id, status FROM subscribers WHERE email_key = ?", (normalized.lower(),)
            ).fetchone()
            created = row is None
            if row is None:
                cursor = conn.execute(
                    "INSERT INTO subscribers (email, email_key, name, fields, status, created_at,"
                    " updated_at, status_changed_at) VALUES (?, ?, ?, '{}', 'pending', ?, ?, ?)",
                    (normalized, normalized.lower(), name.strip(), stamp, stamp, stamp),
                )
                subscriber_id = int(cursor.lastrowid or 0)
                _record_event(conn, subscriber_id, None, Status.PENDING.value, reason, "", stamp)
            else:
                subscriber_id = int(row[0])
                if row[1] == Status.ACTIVE:
                    return ConfirmationRequest(self._get(conn, subscriber_id), False, False, None)
                if row[1] == Status.PENDING and name.strip():
                    conn.execute(
                        "UPDATE subscribers SET name = ?, updated_at = ? WHERE id = ?",
                        (name.strip(), stamp, subscriber_id),
                    )
            if not conn.execute(
                "SELECT 1 FROM consents WHERE subscriber_id = ? AND source = 'form'"
                " AND confirmed_at IS NULL",
                (subscriber_id,),
            ).fetchone():
                _record_consent(conn, subscriber_id, "form", page, stamp)
            sent = conn.execute(
                "SELECT sent_at FROM confirmations WHERE subscriber_id = ?", (subscriber_id,)
            ).fetchone()
            previous = None if sent is None else _dt(sent[0])
            due = previous is None or moment - previous >= resend_after
            if due:
                conn.execute(
                    "INSERT INTO confirmations (subscriber_id, requested_at, sent_at)"
                    " VALUES (?1, ?2, ?2) ON CONFLICT (subscriber_id) DO UPDATE SET"
                    " sent_at = excluded.sent_at, sends = sends + 1",
                    (subscriber_id, stamp),
                )
            return ConfirmationRequest(self._get(conn, subscriber_id), due, created, previous)

    def release_confirmation(self, request: ConfirmationRequest) -> None:
        """Undo the reservation of ``request`` (its email could not be sent)."""
        if not request.send:
            return
        with self._transaction() as conn:
            if request.previous_sent_at is None:
                conn.execute(
                    "DELETE FROM confirmations WHERE subscriber_id = ?", (request.subscriber.id,)
                )
            else:
                conn.execute(
                    "UPDATE confirmations SET sent_at = ?, sends = max(sends - 1, 0)"
                    " WHERE subscriber_id = ?",
                    (_iso(request.previous_sent_at), request.subscriber.id),
                )

    def confirmation_sent_at(self, email_or_id: str | int) -> datetime | None:
        """When the last confirmation email was reserved for this subscriber, or None."""
        with self._lock:
            try:
                subscriber_id = self._subscriber_id(self._conn, email_or_id)
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None
        row = self._one(
            "SELECT sent_at FROM confirmations WHERE subscriber_id = ?", (subscriber_id,)
        )
        return None if row is None else _dt(row[0])

    def confirm_subscription(
        self, subscriber_id: int, *, issued_at: datetime, detail: str = ""
    ) -> Subscriber | None:
        """Make a subscriber active on a confirmation link issued at ``issued_at``.

        Only a link from the subscriber's open request counts (made at or after it
        started): after a confirmation the request is closed, so an old link can never
        undo a later unsubscribe. None when nothing changed for that reason or the
        subscriber is gone; confirming twice is harmless. Soft bounces start again at 0.

        This, the person's own double opt-in, is the one thing that lifts a suppression;
        the click's time completes their consent record.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT s.status, c.requested_at FROM subscribers s"
                " LEFT JOIN confirmations c ON c.subscriber_id = s.id WHERE s.id = ?",
                (subscriber_id,),
            ).fetchone()
            if row is None:
                return None
            if row[0] == Status.ACTIVE:
                return self._get(conn, subscriber_id)
            if row[1] is None or issued_at < _dt(row[1]).replace(microsecond=0):
                return None
            now = _now()
            self._change_status(conn, subscriber_id, Status.ACTIVE, "confirmed", detail, now)
            conn.execute("UPDATE subscribers SET soft_bounces = 0 WHERE id = ?", (subscriber_id,))
            conn.execute("DELETE FROM confirmations WHERE subscriber_id = ?", (subscriber_id,))
            conn.execute(
                "DELETE FROM suppressions WHERE address_hash ="
                f" (SELECT suppression_hash({_HASH_KEY}, email_key) FROM subscribers WHERE id = ?)",
                (subscriber_id,),
            )
            completed = conn.execute(
                "UPDATE consents SET confirmed_at = ? WHERE id = (SELECT max(id) FROM consents"
                " WHERE subscriber_id = ? AND source = 'form' AND confirmed_at IS NULL)",
                (now, subscriber_id),
            ).rowcount
            if not completed:  # a request from before consent was recorded
                _record_consent(conn, subscriber_id, "form", "", row[1])
                conn.execute(
                    "UPDATE consents SET confirmed_at = ? WHERE id = last_insert_rowid()", (now,)
                )
            return self._get(conn, subscriber_id)

    def prune_pending(self, ttl: timedelta, *, now: datetime | None = None) -> int:
        """Delete subscribers who asked through the form and never confirmed in time.

        A row goes when it is still ``pending`` from its creation by
        :meth:`request_confirmation` (no other status change, no delivery) and neither
        it nor its last confirmation email is younger than ``ttl``: every link it was
        sent has expired. Returns how many were deleted.
        """
        cutoff = _iso((now or datetime.now(UTC)) - ttl)
        reasons = ", ".join("?" * len(FORM_REASONS))
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM subscribers WHERE id IN (SELECT s.id FROM subscribers s"
                " WHERE s.status = 'pending' AND s.status_changed_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM confirmations c"
                "  WHERE c.subscriber_id = s.id AND c.sent_at >= ?)"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.subscriber_id = s.id)"
                " AND NOT EXISTS (SELECT 1 FROM subscriber_events e WHERE e.subscriber_id = s.id"
                f"  AND (e.old_status IS NOT NULL OR e.reason NOT IN ({reasons}))))",
                (cutoff, cutoff, *FORM_REASONS),
            )
            return cursor.rowcount

    def sent_issue_keys(self) -> list[str]:
        """Issues that at least one subscriber was sent, oldest snapshot first (the archive)."""
        rows = self._all(
            "SELECT i.issue_key FROM issue_sends i WHERE EXISTS (SELECT 1 FROM deliveries d"
            " INDEXED BY deliveries_state WHERE d.issue_key = i.issue_key AND d.state = 'sent')"
            " ORDER BY i.snapshot_at, i.issue_key"
        )
        return [row[0] for row in rows]

    # -- publications ----------------------------------------------------------------------

    def set_publication(self, issue_key: str, state: str) -> None:
        """Record whether an issue's page is on the web: ``published`` (and listed),
        ``unlisted`` (answers at its address, for proofs) or ``withdrawn``."""
        if state not in ("published", "unlisted", "withdrawn"):
            raise ValueError(f"unknown publication state {state!r}")
        now = _now()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO publications (issue_key, state, published_at, changed_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (issue_key) DO UPDATE"
                " SET state = excluded.state, changed_at = excluded.changed_at",
                (issue_key, state, now, now),
            )

    def publication_states(self) -> dict[str, str]:
        """issue_key -> 'published', 'unlisted' or 'withdrawn', for every issue ever published."""
        return dict(self._all("SELECT issue_key, state FROM publications"))

    def delivery_for_message_id(self, message_id: str) -> tuple[str, int] | None:
        """(issue_key, subscriber_id) of the ledger row that sent ``message_id``, or None."""
        with self._lock:
            try:
                return _delivery_by_message_id(self._conn, message_id)
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None

    def is_processed(self, message_key: str) -> bool:
        """True when a mail or event with this key (see :meth:`record_feedback`) was
        processed before."""
        return (
            self._one("SELECT 1 FROM processed_messages WHERE message_key = ?", (message_key,))
            is not None
        )

    def _count_soft_bounce(
        self,
        conn: sqlite3.Connection,
        subscriber_id: int,
        issue_key: str,
        about: str,
        context: str,
        when: str,
        soft_limit: int,
        now: str,
    ) -> tuple[bool, str]:
        if (
            issue_key
            and conn.execute(
                "SELECT 1 FROM bounces WHERE subscriber_id = ? AND issue_key = ? AND counted = 1",
                (subscriber_id, issue_key),
            ).fetchone()
        ):
            return False, "soft bounce already counted for this issue"
        if issue_key and self._run_broken(conn, subscriber_id, issue_key):
            conn.execute("UPDATE subscribers SET soft_bounces = 0 WHERE id = ?", (subscriber_id,))
        conn.execute(
            "UPDATE subscribers SET soft_bounces = soft_bounces + 1, updated_at = ? WHERE id = ?",
            (now, subscriber_id),
        )
        count, status = conn.execute(
            "SELECT soft_bounces, status FROM subscribers WHERE id = ?", (subscriber_id,)
        ).fetchone()
        if count < soft_limit:
            return True, f"soft bounce {count} of {soft_limit}"
        changed = self._change_status(
            conn,
            subscriber_id,
            Status.BOUNCED,
            "bounce-soft",
            f"{count} soft bounces in a row, the last {about} ({context}reported {when})",
            now,
            only_from=(Status.ACTIVE, Status.PENDING),
        )
        if changed:
            return True, f"marked bounced after {count} soft bounces"
        return True, f"soft bounce {count} of {soft_limit} (subscriber is {status})"

    @staticmethod
    def _run_broken(conn: sqlite3.Connection, subscriber_id: int, issue_key: str) -> bool:
        """True when an issue sent between the last counted soft bounce and this one got
        through without a bounce: the soft bounces are then no longer "in a row"."""
        row = conn.execute(
            "SELECT max(i.snapshot_at) FROM bounces b JOIN issue_sends i"
            " ON i.issue_key = b.issue_key WHERE b.subscriber_id = ? AND b.kind = 'soft'"
            " AND b.counted = 1",
            (subscriber_id,),
        ).fetchone()
        this = conn.execute(
            "SELECT snapshot_at FROM issue_sends WHERE issue_key = ?", (issue_key,)
        ).fetchone()
        if row[0] is None or this is None:
            return False
        return (
            conn.execute(
                "SELECT 1 FROM deliveries d JOIN issue_sends i ON i.issue_key = d.issue_key"
                " WHERE d.subscriber_id = ?1 AND d.state = 'sent'"
                " AND i.snapshot_at > ?2 AND i.snapshot_at < ?3"
                " AND NOT EXISTS (SELECT 1 FROM bounces b WHERE b.subscriber_id = ?1"
                "   AND b.issue_key = d.issue_key) LIMIT 1",
                (subscriber_id, row[0], this[0]),
            ).fetchone()
            is not None
        )

    _BOUNCE_COLUMNS = (
        "id, message_key, subscriber_id, email, issue_key, kind, status, diagnostic, counted,"
        " effect, reported_at, recorded_at"
    )

    @staticmethod
    def _to_bounce_record(row: Sequence[Any]) -> BounceRecord:
        return BounceRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            BounceKind(row[5]),
            row[6],
            row[7],
            bool(row[8]),
            row[9],
            _opt_dt(row[10]),
            _dt(row[11]),
        )

    def _bounce_record(self, conn: sqlite3.Connection, bounce_id: int) -> BounceRecord:
        row = conn.execute(
            f"SELECT {self._BOUNCE_COLUMNS} FROM bounces WHERE id = ?", (bounce_id,)
        ).fetchone()
        return self._to_bounce_record(row)

    def bounces_for_issue(self, issue_key: str) -> list[BounceRecord]:
        """The bounces matched to ``issue_key``, in the order they were recorded."""
        rows = self._all(
            f"SELECT {self._BOUNCE_COLUMNS} FROM bounces WHERE issue_key = ? ORDER BY id",
            (issue_key,),
        )
        return [self._to_bounce_record(row) for row in rows]

    def list_bounces(self, limit: int | None = None) -> list[BounceRecord]:
        """Every recorded bounce, newest first."""
        rows = self._all(
            f"SELECT {self._BOUNCE_COLUMNS} FROM bounces ORDER BY id DESC"
            + ("" if limit is None else f" LIMIT {int(limit)}")
        )
        return [self._to_bounce_record(row) for row in rows]

    # -- readers' feedback: inbound mail and webhooks ----------------------------------------

    def sent_messages(self, subscriber_id: int) -> list[tuple[str, str]]:
        """(issue_key, message_id) of each copy handed to a server for this subscriber
        (at least one attempt), newest issue first; message_id is "" when none was recorded."""
        rows = self._all(
            "SELECT d.issue_key, d.message_id FROM deliveries d INDEXED BY deliveries_subscriber"
            " JOIN issue_sends i ON i.issue_key = d.issue_key"
            " WHERE d.subscriber_id = ? AND d.attempts > 0 ORDER BY i.snapshot_at DESC",
            (subscriber_id,),
        )
        return [(row[0], row[1]) for row in rows]

    def webhook_token_seen(self, source: str, token: str, *, now: datetime | None = None) -> bool:
        """True when this single-use webhook token was recorded and has not expired
        (at ``now``: the time the request's signature was checked against)."""
        row = self._one(
            "SELECT 1 FROM webhook_tokens WHERE source = ? AND token = ? AND expires_at >= ?",
            (source, token, _iso(now) if now is not None else _now()),
        )
        return row is not None

    def record_feedback(
        self,
        items: Sequence[FeedbackItem],
        *,
        soft_limit: int,
        replay: ReplayToken | None = None,
        now: datetime | None = None,
    ) -> list[tuple[str, ...] | None] | None:
        """Apply checked feedback, each item once, all in one transaction.

        Each item's key goes into processed_messages with its outcome; an item whose key
        is there already changes nothing (None in its place). Otherwise each action's
        effect is returned: a hard bounce marks an active or pending subscriber bounced,
        a soft bounce is counted once per issue (``soft_limit`` in a row: bounced), a
        complaint marks them complained and an unsubscribe unsubscribes them, each with a
        history event; bounces are also kept in the bounces table. ``replay``, a webhook's
        single-use token, is recorded first: if it is there already the request is a
        replay, nothing changes and the result is None. ``now`` is the clock replay
        tokens expire by (the one the request was checked with).
        """
        now_text = _now()
        with self._transaction() as conn:
            if replay is not None:
                conn.execute(
                    "DELETE FROM webhook_tokens WHERE expires_at < ?",
                    (_iso(now) if now is not None else now_text,),
                )
                if not conn.execute(
                    "INSERT OR IGNORE INTO webhook_tokens (source, token, expires_at)"
                    " VALUES (?, ?, ?)",
                    (replay.source, replay.token, _iso(replay.expires_at)),
                ).rowcount:
                    return None
            results: list[tuple[str, ...] | None] = []
            for item in items:
                if not conn.execute(
                    "INSERT OR IGNORE INTO processed_messages"
                    " (message_key, source, outcome, processed_at) VALUES (?, ?, ?, ?)",
                    (item.key, item.source, item.outcome[:500], now_text),
                ).rowcount:
                    results.append(None)
                    continue
                results.append(
                    tuple(
                        self._apply_feedback(conn, item.key, action, soft_limit, now_text)
                        for action in item.actions
                    )
                )
            return results

    def _apply_feedback(
        self,
        conn: sqlite3.Connection,
        key: str,
        action: FeedbackAction,
        soft_limit: int,
        now: str,
    ) -> str:
        """One checked action; returns what it did (the ``effect``)."""
        row = conn.execute(
            "SELECT status FROM subscribers WHERE id = ?", (action.subscriber_id,)
        ).fetchone()
        if row is None:
            return "no change (the subscriber was deleted meanwhile)"
        subscriber_id = action.subscriber_id
        when = (
            (action.reported_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        )
        context = f"issue {action.issue_key}, " if action.issue_key else ""
        about = f"{action.status or '?'} {action.diagnostic}".strip()
        # The history's detail ends with how the report was matched and its id.
        when_and_how = f"{when}; {action.detail}" if action.detail else when
        kind = action.kind
        if kind in (FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE):
            counted = False
            if kind == FeedbackKind.HARD_BOUNCE:
                changed = self._change_status(
                    conn,
                    subscriber_id,
                    Status.BOUNCED,
                    action.reason,
                    f"{about} ({context}reported {when_and_how})",
                    now,
                    only_from=(Status.ACTIVE, Status.PENDING),
                )
                effect = "marked bounced" if changed else f"no change (subscriber is {row[0]})"
            else:
                counted, effect = self._count_soft_bounce(
                    conn, subscriber_id, action.issue_key, about, context, when_and_how,
                    soft_limit, now,
                )  # fmt: skip
            conn.execute(
                "INSERT INTO bounces (message_key, subscriber_id, email, issue_key, kind, status,"
                " diagnostic, counted, effect, reported_at, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    subscriber_id,
                    action.email,
                    action.issue_key,
                    (
                        BounceKind.HARD if kind == FeedbackKind.HARD_BOUNCE else BounceKind.SOFT
                    ).value,
                    action.status,
                    action.diagnostic,
                    int(counted),
                    effect,
                    None if action.reported_at is None else _iso(action.reported_at),
                    now,
                ),
            )
            return effect
        detail = f"{action.diagnostic or kind.value} ({context}reported {when_and_how})"
        if kind == FeedbackKind.COMPLAINT:
            changed = self._change_status(
                conn,
                subscriber_id,
                Status.COMPLAINED,
                action.reason,
                detail,
                now,
                only_from=(Status.ACTIVE, Status.PENDING, Status.BOUNCED, Status.UNSUBSCRIBED),
            )
            return "marked complained" if changed else f"no change (subscriber is {row[0]})"
        if kind == FeedbackKind.UNSUBSCRIBE:
            changed = self._change_status(
                conn,
                subscriber_id,
                Status.UNSUBSCRIBED,
                action.reason,
                detail,
                now,
                only_from=(Status.ACTIVE, Status.PENDING, Status.BOUNCED),
            )
            return "unsubscribed" if changed else f"no change (subscriber is {row[0]})"
        return f"no change ({kind.value} is never acted on)"

    # -- schedules and the worker -------------------------------------------------------------

    _SCHEDULE_COLUMNS = (
        "issue_key, send_at, zone, source, state, last_error, not_before, updated_at"
    )

    @staticmethod
    def _to_schedule(row: Sequence[Any]) -> ScheduleEntry:
        return ScheduleEntry(
            row[0],
            _dt(row[1]),
            row[2],
            row[3],
            ScheduleState(row[4]),
            row[5],
            _opt_dt(row[6]),
            _dt(row[7]),
        )

    def set_schedule(
        self, issue_key: str, send_at: datetime, *, zone: str = "", source: str = "command"
    ) -> ScheduleEntry:
        """Schedule (or move) the send of ``issue_key``; refused while the worker sends it."""
        now = _now()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT state FROM schedules WHERE issue_key = ?", (issue_key,)
            ).fetchone()
            if row is not None and row[0] == ScheduleState.SENDING:
                raise DeliveryError(
                    f"issue {issue_key} is being sent by the worker",
                    where=self._where,
                    hint="let it finish; `newsletter status` shows how far it got",
                )
            conn.execute(
                "INSERT INTO schedules (issue_key, send_at, zone, source, state, last_error,"
                " not_before, created_at, updated_at) VALUES (?, ?, ?, ?, 'scheduled', '', NULL,"
                " ?, ?) ON CONFLICT (issue_key) DO UPDATE SET send_at = excluded.send_at,"
                " zone = excluded.zone, source = excluded.source, state = 'scheduled',"
                " last_error = '', not_before = NULL, updated_at = excluded.updated_at",
                (issue_key, _iso(send_at), zone, source, now, now),
            )
            row = conn.execute(
                f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE issue_key = ?",
                (issue_key,),
            ).fetchone()
        return self._to_schedule(row)

    def get_schedule(self, issue_key: str) -> ScheduleEntry | None:
        row = self._one(
            f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE issue_key = ?", (issue_key,)
        )
        return None if row is None else self._to_schedule(row)

    def list_schedules(self) -> list[ScheduleEntry]:
        """Every schedule, the soonest first."""
        rows = self._all(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules ORDER BY send_at")
        return [self._to_schedule(row) for row in rows]

    def due_schedules(self, now: datetime) -> list[ScheduleEntry]:
        """Schedules whose time has come and that are not finished: ``scheduled``, and
        ``sending`` ones a stopped or killed worker left (they resume from the ledger)."""
        stamp = _iso(now)
        rows = self._all(
            f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE state IN"
            " ('scheduled', 'sending') AND send_at <= ? AND (not_before IS NULL"
            " OR not_before <= ?) ORDER BY send_at, issue_key",
            (stamp, stamp),
        )
        return [self._to_schedule(row) for row in rows]

    def next_schedule_at(self) -> datetime | None:
        """When the next unfinished schedule becomes due, or None."""
        row = self._one(
            "SELECT min(max(send_at, coalesce(not_before, send_at))) FROM schedules"
            " WHERE state IN ('scheduled', 'sending')"
        )
        return _opt_dt(row[0])

    def update_schedule(
        self,
        issue_key: str,
        state: ScheduleState,
        *,
        error: str = "",
        not_before: datetime | None = None,
        only_from: Sequence[ScheduleState] | None = None,
    ) -> bool:
        """Move a schedule to ``state`` (with the error that did it); False when it is not
        there, or not in one of ``only_from``."""
        where = ""
        params: list[Any] = [
            ScheduleState(state).value,
            error,
            None if not_before is None else _iso(not_before),
            _now(),
            issue_key,
        ]
        if only_from is not None:
            where = f" AND state IN ({', '.join('?' * len(only_from))})"
            params += [ScheduleState(s).value for s in only_from]
        with self._transaction() as conn:
            return (
                conn.execute(
                    "UPDATE schedules SET state = ?, last_error = ?, not_before = ?,"
                    f" updated_at = ? WHERE issue_key = ?{where}",
                    params,
                ).rowcount
                > 0
            )

    def deferred_due(
        self, now: datetime, parked_before: datetime, max_attempts: int | None = None
    ) -> list[str]:
        """Issues with deferred rows to retry now: a retry time that has come (a run did not
        reach it), or parked for "the next run" (no retry time) since before ``parked_before``;
        rows tried ``max_attempts`` times already do not count.
        """
        rows = self._all(
            "SELECT i.issue_key FROM issue_sends i WHERE EXISTS (SELECT 1 FROM deliveries d"
            " INDEXED BY deliveries_state WHERE d.issue_key = i.issue_key"
            " AND d.state = 'deferred' AND d.attempts < ?"
            " AND ((d.retry_at IS NOT NULL AND d.retry_at <= ?)"
            " OR (d.retry_at IS NULL AND d.updated_at <= ?))) ORDER BY i.issue_key",
            (max_attempts or 2**62, _iso(now), _iso(parked_before)),
        )
        return [row[0] for row in rows]

    def sent_since(self, moment: datetime) -> int:
        """Messages the ledger records as sent at or after ``moment`` (warm-up caps)."""
        row = self._one(
            "SELECT count(*) FROM deliveries WHERE state = 'sent' AND sent_at >= ?",
            (_iso(moment),),
        )
        return int(row[0])

    def metric_counts(self) -> dict[str, list[tuple[str, ...]]]:
        """Counts for ``GET /metrics``, computed now so that every process agrees: rows
        of labels and a count, never an address or a name."""
        queries = {
            "subscribers": "SELECT status, count(*) FROM subscribers GROUP BY status",
            "ledger": "SELECT issue_key, state, count(*) FROM deliveries GROUP BY issue_key, state",
            "events": "SELECT new_status, coalesce(old_status, ''), count(*)"
            " FROM subscriber_events GROUP BY new_status, old_status",
            # outcome is "applied: …", "unmatched: …" (readers.Outcome, then the reason).
            "inbound": "SELECT source, substr(outcome, 1, instr(outcome || ':', ':') - 1),"
            " count(*) FROM processed_messages GROUP BY 1, 2",
            "bounces": "SELECT kind, count(*) FROM bounces GROUP BY kind",
            "schedules": "SELECT state, count(*) FROM schedules GROUP BY state",
        }
        return {
            name: [tuple(str(cell) for cell in row) for row in self._all(sql)]
            for name, sql in queries.items()
        }

    # -- suppression, consent, and one person's data -----------------------------------------

    def suppression(self, address: str) -> Suppression | None:
        """Why and since when ``address`` is suppressed (see migration 6), or None."""
        with self._lock:
            try:
                return _suppression(self._conn, email_key(address))
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None

    def count_suppressions(self) -> int:
        """How many addresses are suppressed."""
        return int(self._one("SELECT count(*) FROM suppressions")[0])

    def erased_counts(self, issue_key: str) -> dict[DeliveryState, int]:
        """Ledger rows of ``issue_key`` whose subscriber was erased or removed, per state
        (only these counts are kept); states without any are left out."""
        return {
            DeliveryState(state): number
            for state, number in self._all(
                "SELECT state, count FROM erased_deliveries WHERE issue_key = ? AND count > 0",
                (issue_key,),
            )
        }

    def person(self, address: str) -> PersonRecord | None:
        """Everything held about ``address``: the subscriber row, consent, history, ledger
        rows, bounces (also those recorded for the address without a subscriber), an open
        confirmation and the suppression entry. None when nothing at all is held."""
        key = email_key(address)
        with self._transaction() as conn:  # one consistent view
            row = conn.execute(
                f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.email_key = ?", (key,)
            ).fetchone()
            subscriber = None if row is None else _subscriber(row)
            sid = -1 if subscriber is None else subscriber.id
            consents = tuple(
                Consent(r[0], r[1], _dt(r[2]), r[3], _opt_dt(r[4]))
                for r in conn.execute(
                    "SELECT * FROM (SELECT 'import', m.file || ':' || s.import_line,"
                    "   m.imported_at, coalesce(s.signed_up, ''), s.import_confirmed_at, 0"
                    "   FROM subscribers s JOIN imports m ON m.id = s.import_id WHERE s.id = ?1"
                    " UNION ALL SELECT source, origin, recorded_at, signed_up, confirmed_at, id"
                    "   FROM consents WHERE subscriber_id = ?1)"
                    " ORDER BY 3, 6",
                    (sid,),
                )
            )
            events = tuple(
                SubscriberEvent(
                    r[0],
                    None if r[1] is None else Status(r[1]),
                    Status(r[2]),
                    r[3],
                    r[4],
                    _dt(r[5]),
                )
                for r in conn.execute(
                    "SELECT subscriber_id, old_status, new_status, reason, detail, at"
                    " FROM subscriber_events WHERE subscriber_id = ? ORDER BY id",
                    (sid,),
                )
            )
            bounce_rows = conn.execute(
                f"SELECT {self._BOUNCE_COLUMNS} FROM bounces WHERE subscriber_id = ?"
                " OR (subscriber_id IS NULL AND email <> '' AND lower(trim(email)) = ?)"
                " ORDER BY id",
                (sid, key),
            ).fetchall()
            pending = conn.execute(
                "SELECT requested_at, sent_at, sends FROM confirmations WHERE subscriber_id = ?",
                (sid,),
            ).fetchone()
            suppressed = _suppression(conn, key)
        deliveries = tuple(
            self._entries(
                "d.subscriber_id = ? ORDER BY coalesce(d.sent_at, d.updated_at), d.issue_key",
                (sid,),
            )
        )
        bounces = tuple(self._to_bounce_record(r) for r in bounce_rows)
        if subscriber is None and suppressed is None and not bounces:
            return None
        return PersonRecord(
            address=subscriber.email if subscriber else key,
            subscriber=subscriber,
            suppression=suppressed,
            consents=consents,
            events=events,
            deliveries=deliveries,
            bounces=bounces,
            confirmation=(
                None
                if pending is None
                else PendingConfirmation(_dt(pending[0]), _dt(pending[1]), pending[2])
            ),
        )

    def erase_person(self, address: str) -> Erasure:
        """Delete everything held about ``address`` (an erasure request), keep it suppressed.

        The subscriber row, their history, consent, open confirmation and ledger rows go
        (the ledger rows leave counts per issue and state, see :meth:`erased_counts`);
        bounce records, theirs and any recorded for the address alone, lose the address and
        the server's text but stay counted. The suppression entry, a keyed hash, stays (or
        is made, reason ``erased``) so that no import adds them back. Deleted content is
        overwritten (secure_delete) and the write-ahead log emptied, so no copy of it stays
        in the database files (unless another process, e.g. `serve`, is reading it: then
        ``Erasure.copies_cleared`` is False and the log is emptied at a later checkpoint).
        """
        key = email_key(address)
        now = _now()
        with self._lock:
            try:
                with self._transaction() as conn:
                    row = conn.execute(
                        "SELECT id FROM subscribers WHERE email_key = ?", (key,)
                    ).fetchone()
                    events = deliveries = consents = 0
                    bounces = conn.execute(
                        "UPDATE bounces SET email = '', diagnostic = '' WHERE subscriber_id IS NULL"
                        " AND email <> '' AND lower(trim(email)) = ?",
                        (key,),
                    ).rowcount
                    if row is not None:
                        sid = int(row[0])
                        (events,) = conn.execute(
                            "SELECT count(*) FROM subscriber_events WHERE subscriber_id = ?", (sid,)
                        ).fetchone()
                        (deliveries,) = conn.execute(
                            "SELECT count(*) FROM deliveries WHERE subscriber_id = ?", (sid,)
                        ).fetchone()
                        (consents,) = conn.execute(
                            "SELECT count(*) + (SELECT import_id IS NOT NULL FROM subscribers"
                            " WHERE id = ?1) FROM consents WHERE subscriber_id = ?1",
                            (sid,),
                        ).fetchone()
                        (theirs,) = conn.execute(
                            "SELECT count(*) FROM bounces WHERE subscriber_id = ?", (sid,)
                        ).fetchone()
                        bounces += theirs
                        _suppress(conn, sid, "erased", now)
                        _forget(conn, sid)
                    else:
                        conn.execute(
                            "INSERT INTO suppressions (address_hash, reason, at) VALUES"
                            f" (suppression_hash({_HASH_KEY}, ?), 'erased', ?)"
                            " ON CONFLICT (address_hash) DO NOTHING",
                            (key, now),
                        )
                    suppressed = _suppression(conn, key)
                    assert suppressed is not None
                # Old versions of the pages live on in the write-ahead log until it is
                # emptied: a checkpoint copies the new ones back and truncates it.
                busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.OperationalError as exc:
                raise self._db_error(exc) from None
        return Erasure(
            address=key,
            subscriber=row is not None,
            events=events,
            deliveries=deliveries,
            bounces=bounces,
            consents=consents,
            suppression=suppressed,
            copies_cleared=not busy,
        )
