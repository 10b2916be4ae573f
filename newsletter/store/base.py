"""What every topic of the store shares: opening the database, transactions, and the
row helpers that several topics use (the topics are mixins on :class:`StoreBase`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self

from ..addresses import email_key, suppression_hash
from ..db import (
    Connection,
    Database,
    DatabaseError,
    Dialect,
    OperationalError,
    PooledConnection,
    PrivilegeError,
    SqliteConnection,
    connect,
    connect_sqlite,
    first_line,
)
from ..errors import StoreError
from ..migrations import migrate_database, schema_version
from ..models import (
    INACTIVE,
    BounceKind,
    BounceRecord,
    DeliveryState,
    LedgerEntry,
    Status,
    Subscriber,
    Suppression,
)
from ..segments import PAUSED, Segment

BUSY_TIMEOUT_MS = 30_000  # a 1M-row import holds the write lock for a few seconds


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


def _refuse_nul(texts: Mapping[str, str], where: str) -> None:
    """Refuse text holding a NUL character, on both engines alike: PostgreSQL cannot store
    one in text (nor ``\\u0000`` in JSON), and no name or field needs one.
    ``texts`` maps what each value is (``name``, ``field 'city'``) to the value."""
    for what, text in texts.items():
        if "\x00" in text:
            raise StoreError(
                f"the {what} holds a NUL character (0x00)",
                where=where,
                hint="remove it: it is not text a subscriber's data can hold",
            )


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
    conn: Connection,
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


# --- suppression and consent ----------------------------------------------------------------

# How a status that stops mail becomes a suppression reason (the same word).
_SUPPRESSING = frozenset(s.value for s in INACTIVE)


def _hash_key(conn: Connection) -> bytes:
    """The database's own suppression key (random per database; see migrations 8)."""
    return bytes(conn.execute("SELECT key FROM suppression_key").fetchone()[0])


def _suppress(conn: Connection, subscriber_id: int, reason: str, at: str) -> None:
    """Leave a suppression entry for this subscriber's address (an existing one stays).

    The hash is computed here, not in SQL, so both engines store the same bytes."""
    row = conn.execute("SELECT email_key FROM subscribers WHERE id = ?", (subscriber_id,))
    found = row.fetchone()
    if found is None:
        return
    conn.execute(
        "INSERT INTO suppressions (address_hash, reason, at) VALUES (?, ?, ?)"
        " ON CONFLICT (address_hash) DO NOTHING",
        (suppression_hash(_hash_key(conn), found[0]), reason, at),
    )


def _suppression(conn: Connection, key: str) -> Suppression | None:
    """The suppression entry of the address whose :func:`email_key` is ``key``, or None."""
    row = conn.execute(
        "SELECT reason, at FROM suppressions WHERE address_hash = ?",
        (suppression_hash(_hash_key(conn), key),),
    ).fetchone()
    return None if row is None else Suppression(row[0], _dt(row[1]))


def _record_consent(
    conn: Connection,
    subscriber_id: int,
    source: str,
    origin: str,
    at: str,
    signed_up: str = "",
) -> int:
    """Record how a subscriber's consent was given; the new consent's id."""
    row = conn.execute(
        "INSERT INTO consents (subscriber_id, source, origin, recorded_at, signed_up)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (subscriber_id, source, origin, at, signed_up),
    ).fetchone()
    return int(row[0])


def _forget(conn: Connection, subscriber_id: int) -> None:
    """Delete a subscriber with their history, consent and ledger rows, keeping the counts.

    Their ledger rows become counts per issue and state (``erased_deliveries``), so an
    old issue's totals still add up; their bounce records lose the address and the
    server's text (which quotes it) but keep kind, status and issue for the same reason.
    """
    conn.execute(
        "INSERT INTO erased_deliveries (issue_key, state, count)"
        " SELECT issue_key, state, count(*) FROM deliveries WHERE subscriber_id = ?"
        " GROUP BY issue_key, state"
        " ON CONFLICT (issue_key, state)"
        " DO UPDATE SET count = erased_deliveries.count + excluded.count",
        (subscriber_id,),
    )
    conn.execute(
        "UPDATE bounces SET subscriber_id = NULL, email = '', diagnostic = ''"
        " WHERE subscriber_id = ?",
        (subscriber_id,),
    )
    conn.execute("DELETE FROM deliveries WHERE subscriber_id = ?", (subscriber_id,))
    conn.execute("DELETE FROM subscribers WHERE id = ?", (subscriber_id,))


# A cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection
# list): the export puts an apostrophe in front, which spreadsheets show as text.
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


def _neutralise(cell: str) -> str:
    """A cell a spreadsheet shows as text; apostrophes already there get one more."""
    return "'" + cell if _FORMULA_START.match(cell) else cell


def _restore(cell: str) -> str:
    """The value ``_neutralise`` wrote ``cell`` for: one leading apostrophe comes off."""
    return cell[1:] if cell[:1] == "'" and _FORMULA_START.match(cell, 1) else cell


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


# A send goes to active subscribers who have not paused (the `paused` tag).
_NOT_PAUSED = "s.id NOT IN (SELECT t.subscriber_id FROM subscriber_tags t WHERE t.tag = ?)"


def _recipient_filter(segment: Segment | None, dialect: Dialect) -> tuple[str, list[Any]]:
    """The condition on ``s`` for whom a send goes to: active, not paused, in ``segment``."""
    where = f"s.status = 'active' AND {_NOT_PAUSED}"
    params: list[Any] = [PAUSED]
    if segment is not None:
        sql, values = segment.sql(dialect)
        where += f" AND ({sql})"
        params.extend(values)
    return where, params


class StoreBase:
    """The connection and its plumbing, which every topic's mixin builds on."""

    def __init__(self, conn: Connection, *, durable_claims: bool = True) -> None:
        self._conn = conn
        self.database: Database = conn.database
        # The SQLite file (None: in memory or on PostgreSQL); send locks live beside it.
        self.path: Path | None = conn.database.path
        self.durable_claims = durable_claims
        self._lock = threading.RLock()
        # issue_key -> the run this store sends it with (store.ledger._Lease)
        self._held: dict[str, Any] = {}
        # issue_key -> the subscriber id the last claim reached (PostgreSQL; see claim_batch)
        self._claim_from: dict[str, int] = {}

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, where: Database | Path | str, *, durable_claims: bool = True) -> Self:
        """Open the database (creating folders and schema as needed): a path, a
        ``sqlite:///`` or ``postgresql://`` URL (see :class:`newsletter.db.Database`).

        ``":memory:"`` gives a private in-memory database, for tests. Every commit
        survives a crash of the process (SQLite: WAL, synchronous=NORMAL; PostgreSQL:
        its WAL). ``durable_claims`` also fsyncs each SQLite claim, so that even a power
        loss cannot turn a row that was handed to the server back into ``queued``
        (which would send it twice); PostgreSQL commits are durable by default.
        """
        database = where if isinstance(where, Database) else Database.parse(where)
        if database.is_postgres:
            conn = connect(database)
            try:
                migrate_database(conn)
            except DatabaseError as exc:
                conn.close()
                raise StoreError(
                    f"cannot use the database: {first_line(exc)}",
                    where=str(database),
                    hint=exc.hint(creating=True)
                    if isinstance(exc, PrivilegeError)
                    else "is this a newsletter database? Point --db elsewhere",
                ) from None
            except BaseException:
                conn.close()
                raise
            return cls(conn, durable_claims=durable_claims)
        return cls(_open_sqlite(database), durable_claims=durable_claims)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._reading() as conn:
            return schema_version(conn)

    @property
    def is_postgres(self) -> bool:
        return self.database.is_postgres

    # -- plumbing --------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return str(self.database)

    def _db_error(self, exc: DatabaseError) -> StoreError:
        return StoreError(
            f"database error: {first_line(exc)}",
            where=self._where,
            hint=exc.hint()
            if isinstance(exc, PrivilegeError)
            else "check the disk and that no other program holds the database"
            if not self.is_postgres
            else "check that the PostgreSQL server runs and accepts this user",
        )

    @contextlib.contextmanager
    def _transaction(
        self, *, durable: bool = False, exclusive: bool = True
    ) -> Iterator[Connection]:
        """A write transaction. ``exclusive`` (the default) waits for every other writer
        (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so read-then-write logic
        never interleaves; the send's hot path passes False and relies on row locks."""
        with self._turn():
            conn = self._conn
            sqlite_durable = durable and isinstance(conn, SqliteConnection)
            try:
                if sqlite_durable:
                    conn.execute("PRAGMA synchronous = FULL")
                conn.begin(exclusive=exclusive)
                try:
                    yield conn
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                finally:
                    if sqlite_durable:
                        conn.execute("PRAGMA synchronous = NORMAL")
            except OperationalError as exc:
                raise self._db_error(exc) from None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        """The connection for reads outside a transaction (each statement on its own)."""
        with self._turn():
            try:
                yield self._conn
            except OperationalError as exc:
                raise self._db_error(exc) from None

    def _turn(self) -> contextlib.AbstractContextManager[object]:
        """Threads take turns on the store's one connection; a pool (``serve`` on
        PostgreSQL) lends each thread a connection of its own, so they need not."""
        if isinstance(self._conn, PooledConnection):
            return contextlib.nullcontext()
        return self._lock

    def _clear_old_copies(self) -> bool:
        """Try to remove old copies of changed rows from the engine's files; True if some
        may remain. SQLite: old pages live on in the write-ahead log until it is emptied,
        so a checkpoint copies the new ones back and truncates it. PostgreSQL keeps old row
        versions until VACUUM and its WAL until recycled (the operator's retention), so
        this says so."""
        if not isinstance(self._conn, SqliteConnection):
            return True
        return bool(self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reading() as conn:
            return conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _subscriber_id(self, conn: Connection, email_or_id: str | int) -> int:
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

    @staticmethod
    def _email_key(conn: Connection, subscriber_id: int) -> str:
        return str(
            conn.execute(
                "SELECT email_key FROM subscribers WHERE id = ?", (subscriber_id,)
            ).fetchone()[0]
        )

    def _get(self, conn: Connection, subscriber_id: int) -> Subscriber:
        row = conn.execute(
            f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id = ?", (subscriber_id,)
        ).fetchone()
        return _subscriber(row)

    @staticmethod
    def _change_status(
        conn: Connection,
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


def _open_sqlite(database: Database) -> SqliteConnection:
    """Open (creating the folder and schema as needed) a SQLite database."""
    # Resolved, so that every path to one file (a symlink, a relative --db) shares one
    # send lock: the lock file is named after the database.
    db = None if database.path is None else database.path.resolve()
    database = Database("sqlite", db)
    where = str(database)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        conn = connect_sqlite(database, busy_timeout_ms=BUSY_TIMEOUT_MS)
    except (OSError, DatabaseError, sqlite3.Error) as exc:
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
            migrate_database(conn)
    except DatabaseError as exc:
        conn.close()
        raise StoreError(
            f"cannot use the database: {first_line(exc)}",
            where=where,
            hint="is this a newsletter database? Point --db elsewhere",
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn
