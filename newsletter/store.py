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
from .errors import DeliveryError, StoreError
from .migrations import MIGRATIONS, migrate
from .models import (
    INACTIVE,
    PROBLEM_STATES,
    Bounce,
    BounceKind,
    BounceRecord,
    ClaimedRecipient,
    ConfirmationRequest,
    DeliveryResult,
    DeliveryState,
    ImportReport,
    IssueSnapshot,
    LedgerEntry,
    RowError,
    SendLock,
    Status,
    Subscriber,
    SubscriberEvent,
)

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


def _lock_name(issue_key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", issue_key):
        return issue_key
    return hashlib.sha256(issue_key.encode()).hexdigest()[:16]


# --- the store ----------------------------------------------------------------------------


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
        """Add a new subscriber; an address already in the list (any status) is refused."""
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
        """Change a subscriber's status and record why (no event when it is unchanged)."""
        status = Status(status)
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
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

    def list_subscribers(self, status: Status | None = None) -> Iterator[Subscriber]:
        """All subscribers (or those with ``status``) by id, fetched a page at a time."""
        last = 0
        where = "" if status is None else " AND s.status = ?"
        extra: tuple[Any, ...] = () if status is None else (Status(status).value,)
        while True:
            rows = self._all(
                f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id > ?{where}"
                f" ORDER BY s.id LIMIT {PAGE}",
                (last, *extra),
            )
            for row in rows:
                yield _subscriber(row)
            if len(rows) < PAGE:
                return
            last = rows[-1][0]

    def count(self, status: Status | None = None) -> int:
        """How many subscribers (with ``status``, or all)."""
        if status is None:
            return int(self._one("SELECT count(*) FROM subscribers")[0])
        row = self._one(
            "SELECT count(*) FROM subscribers WHERE status = ?", (Status(status).value,)
        )
        return int(row[0])

    def count_by_status(self) -> dict[Status, int]:
        """Subscribers per status, every status present (zero when none)."""
        counts = dict.fromkeys(Status, 0)
        for status, number in self._all("SELECT status, count(*) FROM subscribers GROUP BY status"):
            counts[Status(status)] = number
        return counts

    def remove_subscriber(self, email_or_id: str | int, *, force: bool = False) -> None:
        """Delete a subscriber and their history, for good.

        Refused when the ledger records deliveries to them, unless ``force`` (their
        ledger rows go too). To stop mail, unsubscribe instead: that keeps the record.
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
            conn.execute("DELETE FROM deliveries WHERE subscriber_id = ?", (subscriber_id,))
            conn.execute("DELETE FROM subscribers WHERE id = ?", (subscriber_id,))

    def field_names(self) -> set[str]:
        """The names of the free fields (lower-cased) that any subscriber has."""
        return {
            str(row[0]).lower()
            for row in self._all("SELECT DISTINCT j.key FROM subscribers s, json_each(s.fields) j")
        }

    def export_csv(self, out: TextIO, status: Status | None = None) -> int:
        """Write subscribers as CSV (email, name, status, created_at, then fields); returns rows.

        ``import_csv`` reads this back: ``status`` suppresses new rows, ``created_at`` is ignored.
        A cell a spreadsheet would run (``=``, ``+``, ``-``, ``@``, tab, CR first) gets a
        leading apostrophe, which the import takes off again.
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
        writer.writerow(["email", "name", "status", "created_at", *map(_neutralise, keys)])
        count = 0
        for sub in self.list_subscribers(status):
            writer.writerow(
                [
                    _neutralise(sub.email),
                    _neutralise(sub.name),
                    sub.status.value,
                    sub.created_at.isoformat(),
                    *(_neutralise(sub.fields.get(key, "")) for key in keys),
                ]
            )
            count += 1
        return count

    # -- import ----------------------------------------------------------------------------

    def import_csv(
        self, path: Path, *, on_error: Callable[[RowError], None] | None = None
    ) -> ImportReport:
        """Import subscribers from a CSV file; all good rows land in one transaction.

        Columns: ``email`` (required), ``name``, ``status`` (active or subscribed, pending,
        unsubscribed, bounced or cleaned, complained; honoured only for new rows, so an
        exported list keeps its unsubscribes), ``created_at``/``updated_at``/
        ``status_changed_at`` (ignored); any other column becomes a field. UTF-8 (with or
        without Excel's BOM), separated by ``,`` ``;`` or tabs. Duplicates merge (later
        non-empty cells win); existing subscribers get new names/fields but never a new
        status, so an import never reactivates anyone. Each bad row goes to ``on_error``.
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
                    " fields TEXT NOT NULL, status TEXT NOT NULL)"
                )
                # Staging writes only the temp database: other writers are not blocked.
                conn.execute("BEGIN")
                try:
                    rows, good, errors, error_count = self._stage(conn, handle, path, on_error)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                with self._transaction() as tx:
                    counts = self._merge_staged(tx, f"file {path.name}")
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
        added, updated, matched, skipped, distinct = counts
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
        )

    def _stage(
        self,
        conn: sqlite3.Connection,
        handle: TextIO,
        path: Path,
        on_error: Callable[[RowError], None] | None,
    ) -> tuple[int, int, list[RowError], int]:
        """Stream the CSV into temp.import_rows; returns (rows, good rows, errors, error count)."""
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
            if "email" not in lowered:
                raise StoreError(
                    f"no 'email' column (columns: {', '.join(header) or 'none'})",
                    where=f"{path}:1",
                    hint="the first line must name the columns; call the address column 'email'",
                )
            email_i = lowered.index("email")
            name_i = lowered.index("name") if "name" in lowered else None
            status_i = lowered.index("status") if "status" in lowered else None
            ignored = {"email", "name", "status", "created_at", "updated_at", "status_changed_at"}
            field_cols = [
                (i, header[i]) for i, key in enumerate(lowered) if key and key not in ignored
            ]
            width = len(header)
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

            insert = (
                "INSERT INTO import_rows (line, email_key, email, name, fields, status)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (email_key) DO UPDATE SET"
                " name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE name END,"
                " fields = CASE WHEN excluded.fields = '{}' THEN fields"
                " ELSE json_patch(fields, excluded.fields) END,"
                " status = CASE WHEN status = 'active' THEN excluded.status ELSE status END"
            )
            batch: list[tuple[int, str, str, str, str, str]] = []
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
                email = _restore(row[email_i].strip()) if email_i < len(row) else ""
                if not email:
                    if any(cell.strip() for cell in row):
                        rows += 1
                        bad(line, "no email address")
                    continue
                rows += 1
                if len(row) > width and any(cell.strip() for cell in row[width:]):
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
                fields_json = "{}"
                if field_cols:
                    values = {
                        key: _restore(value)
                        for i, key in field_cols
                        if i < len(row) and (value := row[i].strip())
                    }
                    if values:
                        fields_json = dumps(values)
                batch.append((line, normalized.lower(), normalized, name, fields_json, status))
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
        return rows, good, errors, error_count

    @staticmethod
    def _merge_staged(conn: sqlite3.Connection, detail: str) -> tuple[int, int, int, int, int]:
        """Merge temp.import_rows into subscribers; (added, updated, matched, skipped, distinct)."""
        now = _now()
        inactive = ", ".join(f"'{s.value}'" for s in INACTIVE)
        distinct = conn.execute("SELECT count(*) FROM import_rows").fetchone()[0]
        skipped = conn.execute(
            "SELECT count(*) FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f" WHERE s.status IN ({inactive})"
        ).fetchone()[0]
        matched = conn.execute(
            "SELECT count(*) FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f" WHERE s.status NOT IN ({inactive})"
        ).fetchone()[0]
        updated = conn.execute(
            "UPDATE subscribers SET name = new.name, fields = new.fields, updated_at = ?"
            " FROM (SELECT s.id AS id,"
            "   CASE WHEN i.name <> '' THEN i.name ELSE s.name END AS name,"
            "   CASE WHEN i.fields = '{}' THEN s.fields ELSE json_patch(s.fields, i.fields) END"
            "     AS fields"
            "   FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f"  WHERE s.status NOT IN ({inactive})) AS new"
            " WHERE subscribers.id = new.id"
            " AND (subscribers.name IS NOT new.name OR subscribers.fields IS NOT new.fields)",
            (now,),
        ).rowcount
        before = conn.execute("SELECT coalesce(max(id), 0) FROM subscribers").fetchone()[0]
        added = conn.execute(
            "INSERT INTO subscribers (email, email_key, name, fields, status, created_at,"
            " updated_at, status_changed_at)"
            " SELECT i.email, i.email_key, i.name, i.fields, i.status, ?1, ?1, ?1"
            " FROM import_rows i"
            " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email_key = i.email_key)"
            " ORDER BY i.line",
            (now,),
        ).rowcount
        # New ids are all above the old maximum: we hold the write lock.
        # One statement for all the subscribers the import added (it may be a million).
        conn.execute(
            f"INSERT INTO {_EVENT_COLUMNS}"
            " SELECT id, NULL, status, 'import', ?, ? FROM subscribers WHERE id > ?",
            (detail, now, before),
        )
        return added, updated, matched, skipped, distinct

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

    def snapshot_recipients(self, issue_key: str, *, include_new: bool = False) -> int:
        """Fix the recipients of ``issue_key``; returns how many ledger rows were added.

        The first call queues every active subscriber and records the time. Later calls
        add nobody, unless ``include_new``: then active subscribers without a row are
        queued. With no active subscriber the first call records nothing.
        """
        now = _now()
        with self._transaction() as conn:
            known = conn.execute(
                "SELECT 1 FROM issue_sends WHERE issue_key = ?", (issue_key,)
            ).fetchone()
            if known and not include_new:
                return 0
            if not known:
                if not conn.execute(
                    "SELECT 1 FROM subscribers WHERE status = 'active' LIMIT 1"
                ).fetchone():
                    return 0
                conn.execute(
                    "INSERT INTO issue_sends (issue_key, snapshot_at) VALUES (?, ?)",
                    (issue_key, now),
                )
            return conn.execute(
                "INSERT INTO deliveries (issue_key, subscriber_id, state, updated_at)"
                " SELECT ?1, s.id, 'queued', ?2 FROM subscribers s WHERE s.status = 'active'"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d"
                "   WHERE d.issue_key = ?1 AND d.subscriber_id = s.id)"
                " ORDER BY s.id",
                (issue_key, now),
            ).rowcount

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

    def claim_batch(self, issue_key: str, worker_id: str, n: int) -> list[ClaimedRecipient]:
        """Move up to ``n`` due rows (queued, then deferred whose retry time has come) to
        ``sending``, durably committed before returning; send only what this returns.

        Rows whose subscriber is no longer active become ``cancelled`` instead, so an
        unsubscribe during a send is honoured for everyone not yet claimed. An empty
        list means nothing is due now (see :meth:`next_retry_at`).
        """
        if n <= 0:
            return []
        now = _now()
        columns = f"d.attempts, {_SUBSCRIBER_COLUMNS}"
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
                    " ORDER BY d.subscriber_id LIMIT ?",
                    (issue_key, want),
                ).fetchall()
                if len(rows) < want:
                    rows += conn.execute(
                        f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'deferred'"
                        " AND d.retry_at <= ? ORDER BY d.subscriber_id LIMIT ?",
                        (issue_key, now, want - len(rows)),
                    ).fetchall()
                if not rows:
                    break
                active = [r for r in rows if r[5] == Status.ACTIVE]
                gone = [r for r in rows if r[5] != Status.ACTIVE]
                conn.executemany(
                    "UPDATE deliveries SET state = 'sending', attempts = attempts + 1,"
                    " claimed_by = ?, updated_at = ? WHERE issue_key = ? AND subscriber_id = ?",
                    [(worker_id, now, issue_key, r[1]) for r in active],
                )
                conn.executemany(
                    "UPDATE deliveries SET state = 'cancelled', retry_at = NULL, updated_at = ?,"
                    " last_reply = ? WHERE issue_key = ? AND subscriber_id = ?",
                    [(now, f"not sent: subscriber is {r[5]}", issue_key, r[1]) for r in gone],
                )
                claimed.extend(
                    ClaimedRecipient(issue_key, _subscriber(r[1:]), r[0] + 1) for r in active
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

    def count_new_subscribers(self, issue_key: str) -> int:
        """Active subscribers with no ledger row for ``issue_key`` (all of them before
        its first send; afterwards, those a send adds only with ``include_new``)."""
        row = self._one(
            "SELECT count(*) FROM subscribers s WHERE s.status = 'active' AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.issue_key = ? AND d.subscriber_id = s.id)",
            (issue_key,),
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
    ) -> ConfirmationRequest:
        """Record a subscribe request and reserve a confirmation email if one is due.

        A new address is added as ``pending``. Anyone not active (pending, unsubscribed,
        bounced, complained) keeps their status until they confirm; their confirmation is
        due when none was sent in the last ``resend_after``. Active subscribers get none.
        The reservation is committed before the email goes out, so two requests at once
        send one email; :meth:`release_confirmation` undoes it when sending fails.
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
        """True when a mail with this key (see :meth:`record_bounces`) was processed before."""
        return (
            self._one("SELECT 1 FROM processed_messages WHERE message_key = ?", (message_key,))
            is not None
        )

    def record_bounces(
        self,
        message_key: str,
        bounces: Sequence[Bounce],
        *,
        source: str,
        soft_limit: int,
    ) -> list[BounceRecord] | None:
        """Apply the bounces one mail reports, once: None if ``message_key`` was seen before.

        The mail is marked processed in the same transaction, so a crash cannot count it
        twice. Each bounce is matched to an issue (and, if the address is unknown, to a
        subscriber) through the ledger's Message-ID. A hard bounce marks an active or
        pending subscriber bounced; soft bounces are counted once per issue, and
        ``soft_limit`` of them in a row (no issue delivered without a bounce between
        them) mark the subscriber bounced. Status changes are subscriber events whose
        detail has the DSN status, the issue and the date.
        """
        now = _now()
        outcome = f"{len(bounces)} bounce(s)" if bounces else "not a bounce"
        with self._transaction() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO processed_messages"
                " (message_key, source, outcome, processed_at) VALUES (?, ?, ?, ?)",
                (message_key, source, outcome, now),
            ).rowcount
            if not inserted:
                return None
            ids = [
                self._record_bounce(conn, message_key, bounce, len(bounces), soft_limit, now)
                for bounce in bounces
            ]
            return [self._bounce_record(conn, bounce_id) for bounce_id in ids]

    def _record_bounce(
        self,
        conn: sqlite3.Connection,
        message_key: str,
        bounce: Bounce,
        in_message: int,
        soft_limit: int,
        now: str,
    ) -> int:
        issue_key = ""
        subscriber_id: int | None = None
        row = conn.execute(
            "SELECT id FROM subscribers WHERE email_key = ?", (email_key(bounce.email),)
        ).fetchone()
        if row is not None:
            subscriber_id = int(row[0])
        found = _delivery_by_message_id(conn, bounce.original_message_id)
        if found is not None:
            issue_key = found[0]
            # One message went to one subscriber: a forwarded address still finds them.
            if subscriber_id is None and in_message == 1:
                subscriber_id = found[1]
        reported = _iso(bounce.reported_at) if bounce.reported_at is not None else None
        when = (
            (bounce.reported_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        )
        about = f"{bounce.status or '?'} {bounce.diagnostic}".strip()
        context = f"issue {issue_key}, " if issue_key else ""
        counted = False
        if subscriber_id is None:
            effect = "no subscriber with this address"
        elif bounce.kind == BounceKind.HARD:
            changed = self._change_status(
                conn,
                subscriber_id,
                Status.BOUNCED,
                "bounce-hard",
                f"{about} ({context}reported {when})",
                now,
                only_from=(Status.ACTIVE, Status.PENDING),
            )
            status = conn.execute(
                "SELECT status FROM subscribers WHERE id = ?", (subscriber_id,)
            ).fetchone()[0]
            effect = "marked bounced" if changed else f"no change (subscriber is {status})"
        else:
            counted, effect = self._count_soft_bounce(
                conn, subscriber_id, issue_key, about, context, when, soft_limit, now
            )
        cursor = conn.execute(
            "INSERT INTO bounces (message_key, subscriber_id, email, issue_key, kind, status,"
            " diagnostic, counted, effect, reported_at, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message_key,
                subscriber_id,
                bounce.email,
                issue_key,
                bounce.kind.value,
                bounce.status,
                bounce.diagnostic,
                int(counted),
                effect,
                reported,
                now,
            ),
        )
        return int(cursor.lastrowid or 0)

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
