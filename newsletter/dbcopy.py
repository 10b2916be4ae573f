"""A database as a whole: its schema version (``db migrate``, ``db status``) and a
verified copy of everything in it to another database, on either engine (``db copy``).

The copy moves a list and its whole history from SQLite to PostgreSQL and back (or
between two databases of one engine). Both are migrated to the same version first;
then every table the schema has (found in the catalog, not listed here) is copied in
primary-key order, ids kept, in batches, inside one transaction on the target, which
takes every other writer's turn: a failure anywhere leaves the target as it was. The
source is read in one snapshot (SQLite: one read transaction; PostgreSQL: REPEATABLE
READ), so writers may go on meanwhile; what they write after it is not copied.

Each table is verified before the commit: its row count and a SHA-256 over its rows in
primary-key order, as one JSON array of rows (bytes as ``{"hex": ...}``), computed on
the rows read from the source and again on the rows the target holds. Text keys sort
by their bytes on both engines (PostgreSQL: ``COLLATE "C"``), so the orders agree. A
difference rolls the copy back. PostgreSQL's identity sequences are moved past the
largest id copied, so new rows get new ids.

``rate_limits`` and ``webhook_tokens`` are copied too: the subscribe limits keep
counting where they were, and a webhook request already used cannot be replayed
against the new database.
"""

from __future__ import annotations

import contextlib
import graphlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .db import (
    Connection,
    Database,
    DatabaseError,
    PostgresConnection,
    PrivilegeError,
    SqliteConnection,
    connect,
    first_line,
)
from .errors import StoreError
from .migrations import schema_target, schema_version
from .store import BUSY_TIMEOUT_MS, Store

BATCH = 5_000  # rows read, written and hashed at a time
SHOWN_CHECKSUM = 12  # hex digits of a checksum printed
# PostgreSQL's record of applied migrations: each database keeps its own.
BOOKKEEPING = frozenset({"schema_version"})
# Written by the migrations themselves (the suppression key): not the target's "data",
# and replaced by the source's, so suppression hashes still match after the copy.
SCHEMA_ROWS = frozenset({"suppression_key"})
SHOWN_TABLES = 4  # in the "already holds" error

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class CopyError(StoreError):
    """A database that cannot be copied (or into which a copy cannot go)."""


# --- what a database holds ---------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """One table as the catalog describes it."""

    name: str
    columns: tuple[str, ...]
    kinds: tuple[str, ...]  # integer, real, text or blob, per column
    key: tuple[str, ...]  # the primary key's columns (every column when it has none)
    parents: frozenset[str]  # the tables its foreign keys point to
    identity: str | None = None  # PostgreSQL: the column an identity sequence fills

    def kind(self, column: str) -> str:
        return self.kinds[self.columns.index(column)]


def _kind(declared: str) -> str:
    """The storage class of a declared type, on either engine (SQLite's affinity rules)."""
    text = declared.lower()
    if "int" in text:
        return "integer"
    if "char" in text or "clob" in text or "text" in text:
        return "text"
    if "blob" in text or text == "bytea" or not text:
        return "blob"
    if "real" in text or "floa" in text or "doub" in text:
        return "real"
    return text


def _sqlite_tables(conn: Connection) -> dict[str, Table]:
    names = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite!_%' ESCAPE '!' ORDER BY name"
        ).fetchall()
    ]
    tables = {}
    for name in names:
        info = conn.execute(
            "SELECT name, type, pk FROM pragma_table_info(?) ORDER BY cid", (name,)
        ).fetchall()
        parents = conn.execute('SELECT "table" FROM pragma_foreign_key_list(?)', (name,))
        key = tuple(row[0] for row in sorted((r for r in info if r[2]), key=lambda r: r[2]))
        columns = tuple(row[0] for row in info)
        tables[name] = Table(
            name,
            columns,
            tuple(_kind(row[1]) for row in info),
            key or columns,
            frozenset(row[0] for row in parents.fetchall()),
        )
    return tables


def _postgres_tables(conn: Connection) -> dict[str, Table]:
    names = [
        row[0]
        for row in conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            " ORDER BY table_name"
        ).fetchall()
    ]
    tables = {}
    for name in names:
        if name in BOOKKEEPING:
            continue
        info = conn.execute(
            "SELECT column_name, data_type, is_identity FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (name,),
        ).fetchall()
        relation = "CAST(quote_ident(CAST(? AS text)) AS regclass)"
        key = conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
            f" WHERE i.indrelid = {relation} AND i.indisprimary"
            " ORDER BY array_position(CAST(i.indkey AS int2[]), a.attnum)",
            (name,),
        ).fetchall()
        parents = conn.execute(
            "SELECT DISTINCT c.relname FROM pg_constraint f JOIN pg_class c ON c.oid = f.confrelid"
            f" WHERE f.conrelid = {relation} AND f.contype = 'f'",
            (name,),
        ).fetchall()
        columns = tuple(row[0] for row in info)
        identity = [row[0] for row in info if row[2] == "YES"]
        tables[name] = Table(
            name,
            columns,
            tuple(_kind(row[1]) for row in info),
            tuple(row[0] for row in key) or columns,
            frozenset(row[0] for row in parents),
            identity[0] if identity else None,
        )
    return tables


def describe(conn: Connection) -> dict[str, Table]:
    """The tables of the database, by name (PostgreSQL's migration record left out)."""
    if isinstance(conn, SqliteConnection):
        return _sqlite_tables(conn)
    return _postgres_tables(conn)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ordered_select(conn: Connection, table: Table, columns: Sequence[str]) -> str:
    """Every row of ``table`` in primary-key order, the same order on both engines:
    text sorts by its UTF-8 bytes (SQLite's BINARY collation; PostgreSQL's "C")."""
    postgres = not isinstance(conn, SqliteConnection)
    order = ", ".join(
        _quote(column) + (' COLLATE "C"' if postgres and table.kind(column) == "text" else "")
        for column in table.key
    )
    return f"SELECT {', '.join(map(_quote, columns))} FROM {_quote(table.name)} ORDER BY {order}"


def _batches(conn: Connection, sql: str, size: int) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of ``sql`` a batch at a time, never all in memory (PostgreSQL: a
    server-side cursor, which needs the transaction the caller holds)."""
    if isinstance(conn, PostgresConnection):
        with conn.raw.cursor(name="newsletter_copy") as cursor:
            cursor.itersize = size
            cursor.execute(sql)  # type: ignore[arg-type]
            while rows := cursor.fetchmany(size):
                yield rows
        return
    assert isinstance(conn, SqliteConnection)
    lite = conn.raw.execute(sql)
    while rows := lite.fetchmany(size):
        yield rows


# --- checksums ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A value as JSON can hold it, the same whichever engine it came from."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"hex": bytes(value).hex()}
    return value


class Checksum:
    """SHA-256 over rows, as the JSON array of them all (each row an array of its
    values) without its outer brackets, fed a batch at a time; and how many rows.

    Each batch is encoded in one call and its brackets dropped, so the text hashed is
    the same however the rows are batched: ``[a,b],[c,d]`` then ``,[e,f]``.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.rows = 0

    def add(self, rows: Sequence[Sequence[Any]]) -> str:
        """Count and hash ``rows``; their JSON text, for checks on it."""
        if not rows:
            return ""
        try:
            text = _encode(rows)[1:-1]
        except TypeError:  # bytes (a hash, a key): as hex
            text = _encode([[_plain(value) for value in row] for row in rows])[1:-1]
        self._sha.update(("," + text if self.rows else text).encode())
        self.rows += len(rows)
        return text

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def table_checksum(conn: Connection, table: Table, columns: Sequence[str]) -> Checksum:
    """The checksum of every row of ``table`` (its ``columns``), in primary-key order."""
    checksum = Checksum()
    for rows in _batches(conn, _ordered_select(conn, table, columns), BATCH):
        checksum.add(rows)
    return checksum


# --- the copy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableCopy:
    """One table copied: rows and checksum read from the source and from the target."""

    name: str
    rows: int
    checksum: str
    copied_rows: int
    copied_checksum: str

    @property
    def ok(self) -> bool:
        return self.rows == self.copied_rows and self.checksum == self.copied_checksum


@dataclass(frozen=True)
class CopyReport:
    """What ``copy_database`` did; with ``ok`` False nothing was written to the target."""

    source: Database
    target: Database
    version: int
    tables: tuple[TableCopy, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(table.ok for table in self.tables)

    @property
    def rows(self) -> int:
        return sum(table.rows for table in self.tables)

    @property
    def differing(self) -> list[str]:
        return [table.name for table in self.tables if not table.ok]


def _same_database(one: Database, other: Database) -> bool:
    if one.engine != other.engine:
        return False
    if one.is_postgres:

        def place(database: Database) -> tuple[str, int, str]:
            parts = urlsplit(database.url)
            host = (parts.hostname or "localhost").lower()
            return host, parts.port or 5432, parts.path.strip("/")

        return place(one) == place(other)
    if one.path is None or other.path is None:
        return False
    if one.path.exists() and other.path.exists():
        return os.path.samefile(one.path, other.path)
    return one.path.resolve() == other.path.resolve()


def _open(database: Database, role: str) -> Connection:
    """Migrate ``database`` (the store's own opening: folders, WAL, the schema), then
    connect to it for the copy."""
    if role == "SRC" and not database.exists:
        raise CopyError("no database here", where=str(database), hint="check the path of SRC")
    Store.open(database).close()
    conn = connect(database, busy_timeout_ms=BUSY_TIMEOUT_MS)
    if isinstance(conn, SqliteConnection):
        conn.execute("PRAGMA foreign_keys = ON")
    version = schema_version(conn)
    if version != schema_target():  # migrating raised already, unless the code is wrong
        conn.close()
        raise CopyError(
            f"schema version {version}, not {schema_target()}",
            where=str(database),
            hint="run `newsletter db migrate` on it",
        )
    return conn


def _match(source: dict[str, Table], target: dict[str, Table], where: str) -> None:
    """The target must have the source's tables and columns, of the same kinds."""
    if source.keys() != target.keys():
        extra = sorted(source.keys() ^ target.keys())
        raise CopyError(
            f"the two databases have different tables ({', '.join(extra)})",
            where=where,
            hint="both must be newsletter databases of one schema version",
        )
    for name, table in source.items():
        other = target[name]
        if sorted(zip(table.columns, table.kinds, strict=True)) != sorted(
            zip(other.columns, other.kinds, strict=True)
        ):
            raise CopyError(
                f"table {name} has other columns here than in SRC",
                where=where,
                hint="both must be newsletter databases of one schema version",
            )


def _counts(conn: Connection, tables: Sequence[str]) -> dict[str, int]:
    return {
        name: int(conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0])
        for name in tables
    }


def _parents_first(tables: dict[str, Table]) -> list[str]:
    """The tables in an order where each comes after those its foreign keys point to."""
    graph = {name: sorted(tables[name].parents & tables.keys()) for name in sorted(tables)}
    return list(graphlib.TopologicalSorter(graph).static_order())


def _refuse_data(conn: Connection, order: Sequence[str], where: str) -> None:
    held = {name: n for name, n in _counts(conn, order).items() if n and name not in SCHEMA_ROWS}
    if held:
        shown = ", ".join(f"{name}: {n}" for name, n in sorted(held.items())[:SHOWN_TABLES])
        more = ", ..." if len(held) > SHOWN_TABLES else ""
        raise CopyError(
            f"DST already holds data ({shown}{more})",
            where=where,
            hint="copy into a new, empty database, or add --replace to delete what it holds",
        )


def _empty(conn: Connection, order: Sequence[str]) -> None:
    """Delete every row of the target's tables (in its open transaction)."""
    if isinstance(conn, SqliteConnection):
        # Foreign keys are checked at the commit: the deletes may go in any order.
        conn.execute("PRAGMA defer_foreign_keys = ON")
        for name in reversed(order):
            conn.execute(f"DELETE FROM {_quote(name)}")
    else:
        conn.execute(f"TRUNCATE {', '.join(_quote(name) for name in order)}")


def _write(conn: Connection, table: Table, columns: Sequence[str], rows: list[Any]) -> None:
    names = ", ".join(map(_quote, columns))
    if isinstance(conn, PostgresConnection):
        statement = f"COPY {_quote(table.name)} ({names}) FROM STDIN"
        with conn.raw.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[arg-type]
            for row in rows:
                copy.write_row(row)
        return
    assert isinstance(conn, SqliteConnection)
    marks = ", ".join("?" * len(columns))
    conn.raw.executemany(f"INSERT INTO {_quote(table.name)} ({names}) VALUES ({marks})", rows)


def _check_text(
    table: Table, columns: Sequence[str], rows: Sequence[Any], text: str, where: str
) -> None:
    """PostgreSQL's text cannot hold NUL (SQLite's can): name the first row that has one.
    ``text``, the rows' JSON, has ``\\u0000`` for a NUL (and, rarely, for other text)."""
    if "\\u0000" not in text:
        return
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            if isinstance(value, str) and "\x00" in value:
                key = ", ".join(f"{k} {row[columns.index(k)]!r}" for k in table.key)
                raise CopyError(
                    f"table {table.name}, row {key}: {column} holds a NUL character, which"
                    " PostgreSQL cannot store",
                    where=where,
                    hint="remove it there and copy again; nothing was written to DST",
                )


def _copy_table(
    source: Connection, target: Connection, table: Table, columns: Sequence[str], batch: int
) -> TableCopy:
    read = Checksum()
    to_postgres = isinstance(target, PostgresConnection)
    for rows in _batches(source, _ordered_select(source, table, columns), batch):
        text = read.add(rows)
        if to_postgres:
            _check_text(table, columns, rows, text, str(source.database))
        _write(target, table, columns, rows)
    written = table_checksum(target, table, columns)
    return TableCopy(table.name, read.rows, read.hexdigest(), written.rows, written.hexdigest())


def _move_sequences(conn: Connection, tables: Sequence[Table]) -> None:
    """PostgreSQL: each identity sequence past the largest id copied (new rows get new ids)."""
    for table in tables:
        if table.identity is None:
            continue
        conn.execute(
            "SELECT setval(pg_get_serial_sequence(?, ?),"
            f" (SELECT coalesce(max({_quote(table.identity)}), 0) + 1"
            f" FROM {_quote(table.name)}), false)",
            (_quote(table.name), table.identity),
        )


def copy_database(
    source: Database,
    target: Database,
    *,
    replace: bool = False,
    batch: int = BATCH,
    on_table: Callable[[TableCopy], None] | None = None,
) -> CopyReport:
    """Copy every table of ``source`` into ``target``, verified; see the module's text.

    ``target`` must hold no subscribers, ledger or other rows, unless ``replace``: then
    what it holds is deleted in the same transaction. ``on_table`` hears of each table
    once it is copied and verified (a later failure still rolls everything back). A
    difference leaves the target as it was and returns a report whose ``ok`` is False.
    """
    if _same_database(source, target):
        raise CopyError(
            "SRC and DST are the same database",
            where=str(target),
            hint="give DST another database (a new file, or an empty PostgreSQL database)",
        )
    started = time.perf_counter()
    # A SQLite file made for the copy goes again if the copy does not happen.
    new_file = target.path if not target.exists and target.path is not None else None
    src = _open(source, "SRC")
    report = None
    try:
        dst = _open(target, "DST")
        try:
            copied = _copy(src, dst, replace, batch, on_table)
            report = CopyReport(
                source, target, schema_version(dst), copied, time.perf_counter() - started
            )
        finally:
            dst.close()
    finally:
        src.close()
        if new_file is not None and (report is None or not report.ok):
            _remove_sqlite(new_file)
    return report


def _remove_sqlite(path: Path) -> None:
    """Delete a SQLite database and the files SQLite and the store keep beside it."""
    for suffix in ("", "-wal", "-shm", "-journal", ".setup.lock"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def _copy(
    src: Connection,
    dst: Connection,
    replace: bool,
    batch: int,
    on_table: Callable[[TableCopy], None] | None,
) -> tuple[TableCopy, ...]:
    import psycopg

    where = f"{src.database} -> {dst.database}"
    doing = "the schema"
    copied: list[TableCopy] = []
    # One snapshot of the source for every table.
    if isinstance(src, SqliteConnection):
        src.execute("BEGIN")
    else:
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    try:
        tables = describe(src)
        target_tables = describe(dst)
        _match(tables, target_tables, str(dst.database))
        order = _parents_first(tables)
        dst.begin(exclusive=True)  # every other writer of the target waits
        try:
            if not replace:
                _refuse_data(dst, order, str(dst.database))
            _empty(dst, order)
            for name in order:
                doing = f"table {name}"
                done = _copy_table(src, dst, tables[name], tables[name].columns, batch)
                copied.append(done)
                if on_table is not None:
                    on_table(done)
            doing = "the transaction"
            if all(table.ok for table in copied):
                if isinstance(dst, PostgresConnection):
                    _move_sequences(dst, [target_tables[name] for name in order])
                dst.commit()
            else:
                dst.rollback()
        except BaseException:
            with contextlib.suppress(DatabaseError):  # a lost connection rolled it back
                dst.rollback()
            raise
    except (DatabaseError, sqlite3.Error, psycopg.Error) as exc:
        raise CopyError(
            f"cannot copy {doing}: {first_line(exc)}",
            where=where,
            hint="nothing was written to DST",
        ) from None
    finally:
        with contextlib.suppress(DatabaseError):  # read only; a lost connection ended it
            src.rollback()
    return tuple(copied)


# --- the schema version ------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaChange:
    """What ``db migrate`` did: the schema version before (0: empty) and after."""

    database: Database
    before: int
    after: int

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _version_now(database: Database) -> int:
    """The schema version of ``database`` as it is (0: no file, or an empty database)."""
    if not database.exists:
        return 0
    conn = connect(database, busy_timeout_ms=BUSY_TIMEOUT_MS)
    try:
        return schema_version(conn)
    except DatabaseError as exc:
        raise StoreError(
            f"cannot read the schema version: {first_line(exc)}",
            where=str(database),
            hint=exc.hint()
            if isinstance(exc, PrivilegeError)
            else "is this a newsletter database? Point --db elsewhere",
        ) from None
    finally:
        conn.close()


def migrate(database: Database) -> SchemaChange:
    """Apply the migrations ``database`` lacks (every command does on opening it; this
    is for operators who want it done, and seen, before starting services)."""
    before = _version_now(database)
    with Store.open(database) as store:
        after = store.schema_version
    return SchemaChange(database, before, after)


@dataclass(frozen=True)
class DatabaseStatus:
    """``db status``: the schema version, the one this code writes, rows per table."""

    database: Database
    version: int
    target: int
    rows: tuple[tuple[str, int], ...]


def status(database: Database) -> DatabaseStatus:
    """Look at ``database`` without changing it (no migration)."""
    version = _version_now(database)
    rows: tuple[tuple[str, int], ...] = ()
    if version:
        conn = connect(database, busy_timeout_ms=BUSY_TIMEOUT_MS)
        try:
            rows = tuple(_counts(conn, sorted(describe(conn))).items())
        except DatabaseError as exc:
            raise StoreError(
                f"cannot read the tables: {first_line(exc)}", where=str(database)
            ) from None
        finally:
            conn.close()
    return DatabaseStatus(database, version, schema_target(), rows)
