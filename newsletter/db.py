"""The two database engines under the store: SQLite (a file) and PostgreSQL (a server).

SQLite is the default: nothing to install, right for one editor on one machine.
PostgreSQL is the shared ledger of a team or a large list: every ``send``, ``worker``
and ``serve`` process, on any machine, works on the one database.

The store writes its SQL once, in the subset both engines accept (``?`` parameters,
``ON CONFLICT``, ``RETURNING``, ``IS DISTINCT FROM``). :class:`Connection` runs it on
either engine (for PostgreSQL it rewrites the parameters and drops SQLite's index
hints) and raises the errors below, whichever driver failed; :class:`Dialect` names
the few fragments that differ (JSON, string aggregation).

Where a database is: ``--db`` / ``NEWSLETTER_DB`` holds a path (or ``sqlite:///path``)
or a ``postgresql://user@host:port/name`` URL. A password never goes in the URL (it
would show in argv, the environment of every process and the logs): libpq reads
``PGPASSWORD`` and ``~/.pgpass``, and ``NEWSLETTER_DB_PASSWORD`` is passed to it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import StoreError

if TYPE_CHECKING:
    import psycopg

MEMORY = ":memory:"
ENV_PASSWORD = "NEWSLETTER_DB_PASSWORD"
POSTGRES_SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT_MS = 30_000
_SECRET_KEYS = frozenset({"password", "sslpassword"})  # libpq URL keys that hold secrets

Engine = Literal["sqlite", "postgresql"]


class DatabaseError(Exception):
    """Any engine's database error (the driver's own class differs per engine)."""


class OperationalError(DatabaseError):
    """The database could not do it now: locked, busy, gone, out of space."""


class PrivilegeError(OperationalError):
    """The database's role may not do it (PostgreSQL: a GRANT is missing)."""

    def hint(self, *, creating: bool = False) -> str:
        """What an operator does about it: ``creating`` when the schema was being made."""
        if creating:
            return (
                "GRANT this role CREATE on schema public, or run `newsletter db migrate`"
                " as a role that may"
            )
        return (
            "GRANT this role SELECT, INSERT, UPDATE, DELETE on the newsletter tables (and"
            " USAGE on their sequences), or connect as their owner"
        )


class IntegrityError(DatabaseError):
    """A constraint refused the change (a unique key, a foreign key, a check)."""


# --- where the database is --------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """Where a database is: a SQLite file (``path``; None: in memory) or a PostgreSQL URL.

    ``str()`` is safe to print: the URL never holds a password (``parse`` refuses one).
    """

    engine: Engine
    path: Path | None = None
    url: str = ""

    @classmethod
    def parse(cls, text: str | os.PathLike[str], *, where: str = "--db") -> Database:
        """A path, ``sqlite:///path``, ``:memory:`` or ``postgresql://user@host:port/name``."""
        raw = os.fspath(text)
        if raw == MEMORY:
            return cls("sqlite")
        scheme, sep, _ = raw.partition("://")
        if not sep or len(scheme) < 2 or "/" in scheme:  # a path (C:/x has a 1-letter scheme)
            return cls("sqlite", Path(raw))
        scheme = scheme.lower()
        if scheme == "sqlite":
            path = unquote(urlsplit(raw).path)
            if not path:
                raise StoreError(
                    f"no file in {raw!r}", where=where, hint="write sqlite:///path/to/file.db"
                )
            return cls("sqlite") if path == f"/{MEMORY}" else cls("sqlite", Path(path))
        if scheme not in POSTGRES_SCHEMES:
            raise StoreError(
                f"unknown database scheme {scheme!r}",
                where=where,
                hint="give a file path, sqlite:///path or postgresql://user@host:5432/name",
            )
        parts = urlsplit(raw)
        # libpq takes a password from the URL's query too (``?password=``, its keys
        # percent-decoded), and ``sslpassword`` unlocks the client's key: secrets both.
        query_keys = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
        if parts.password is not None or query_keys & _SECRET_KEYS:
            raise StoreError(
                "the database URL holds a password, which would show in process lists and logs",
                where=where,
                hint=f"remove it from the URL; set {ENV_PASSWORD} or PGPASSWORD, or use ~/.pgpass",
            )
        try:
            parts.port  # noqa: B018 (validates the port)
        except ValueError:
            raise StoreError(
                f"bad port in {raw!r}", where=where, hint="write postgresql://user@host:5432/name"
            ) from None
        if not parts.path.strip("/"):
            raise StoreError(
                f"no database name in {raw!r}",
                where=where,
                hint="write postgresql://user@host:5432/name",
            )
        return cls("postgresql", url=raw)

    @property
    def is_postgres(self) -> bool:
        return self.engine == "postgresql"

    @property
    def exists(self) -> bool:
        """Whether there may be data to read: a SQLite file that exists, or any server
        database (the store migrates an empty one; it never creates a database)."""
        return self.is_postgres or (self.path is not None and self.path.is_file())

    def __str__(self) -> str:
        if self.is_postgres:
            return self.url
        return MEMORY if self.path is None else str(self.path)


# --- what differs between the engines ----------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """SQL fragments that differ between the engines (everything else is written once)."""

    engine: Engine

    def group_concat(self, expr: str, sep: str) -> str:
        """An aggregate joining ``expr`` with the SQL string literal ``sep``."""
        if self.engine == "postgresql":
            return f"string_agg({expr}, {sep})"
        return f"group_concat({expr}, {sep})"

    def group_concat_sorted(self, expr: str, sep: str) -> str:
        """:meth:`group_concat` in the byte order of ``expr`` (the same text on both
        engines). SQLite before 3.44 cannot order inside an aggregate: it joins rows in the
        order they arrive, so the caller feeds it a subquery ordered by ``expr``."""
        if self.engine == "postgresql":
            return f'string_agg({expr}, {sep} ORDER BY {expr} COLLATE "C")'
        return f"group_concat({expr}, {sep})"

    def position(self, needle: str, haystack: str) -> str:
        """1-based position of ``needle`` in ``haystack`` (0: absent)."""
        if self.engine == "postgresql":
            return f"strpos({haystack}, {needle})"
        return f"instr({haystack}, {needle})"

    def json_patch(self, target: str, patch: str) -> str:
        """``target`` (a JSON object as text) with ``patch``'s keys set, as compact text."""
        if self.engine == "postgresql":
            return f"nl_json_patch({target}, {patch})"
        return f"json_patch({target}, {patch})"

    def json_array_values(self, column: str, alias: str) -> str:
        """A FROM item: one row per element (column ``value``) of a JSON array."""
        if self.engine == "postgresql":
            return f"jsonb_array_elements_text(({column})::jsonb) AS {alias}(value)"
        return f"json_each({column}) AS {alias}"

    def json_object_keys(self, column: str, alias: str) -> str:
        """A FROM item: one row per key (column ``key``) of a JSON object."""
        if self.engine == "postgresql":
            return f"jsonb_object_keys(({column})::jsonb) AS {alias}(key)"
        return f"json_each({column}) AS {alias}"

    def json_object_items(self, column: str, alias: str) -> str:
        """A FROM item: one row per key (column ``key``) of a JSON object whose values are
        strings, with the value as text (column ``value``)."""
        if self.engine == "postgresql":
            return f"jsonb_each_text(({column})::jsonb) AS {alias}(key, value)"
        return f"json_each({column}) AS {alias}"

    def ascii_lower(self, expr: str) -> str:
        """``expr`` with its ASCII letters lower-cased and every other character kept, as
        SQLite's lower() does; PostgreSQL's follows the locale, unless told the C one."""
        if self.engine == "postgresql":
            return f'lower(({expr}) COLLATE "C")'
        return f"lower({expr})"

    def nocase_equals_param(self, expr: str) -> str:
        """``expr`` equals the next ``?`` parameter (text) ignoring the case of ASCII
        letters, as SQLite's NOCASE compares."""
        if self.engine == "postgresql":
            return f"{self.ascii_lower(expr)} = {self.ascii_lower('CAST(? AS TEXT)')}"
        return f"{expr} = ? COLLATE NOCASE"

    def json_array_agg(self, expr: str) -> str:
        """An aggregate: the values of ``expr`` as a JSON array (text)."""
        if self.engine == "postgresql":
            return f"coalesce(jsonb_agg({expr})::text, '[]')"
        return f"json_group_array({expr})"


SQLITE = Dialect("sqlite")
POSTGRES = Dialect("postgresql")


# --- connections -------------------------------------------------------------------------


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """One connection to either engine, running the store's SQL (``?`` parameters)."""

    database: Database
    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run ``sql`` once per row; how many rows changed in all."""
        ...

    def load_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Append ``rows`` (values in the order of ``columns``) to ``table`` the fastest way
        the engine has: SQLite inserts them one by one in C, PostgreSQL streams them in one
        COPY (an INSERT per row costs a round trip each). How many rows went in."""
        ...

    def begin(self, *, exclusive: bool = True) -> None:
        """Start a transaction; ``exclusive`` waits for every other writer (SQLite's
        BEGIN IMMEDIATE; on PostgreSQL a transaction-scoped advisory lock), so that a
        read-then-write never interleaves with another one."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


class SqliteConnection:
    """A ``sqlite3`` connection in autocommit mode (transactions are explicit)."""

    dialect = SQLITE

    def __init__(self, raw: sqlite3.Connection, database: Database) -> None:
        self.raw = raw
        self.database = database

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            return self.raw.execute(sql, params)
        except sqlite3.Error as exc:
            raise _sqlite_error(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        try:
            return self.raw.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise _sqlite_error(exc) from exc

    def load_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        names = ", ".join(_identifier(name) for name in columns)
        marks = ", ".join("?" * len(columns))
        return self.executemany(
            f"INSERT INTO {_identifier(table)} ({names}) VALUES ({marks})", rows
        )

    def begin(self, *, exclusive: bool = True) -> None:
        self.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self.raw.in_transaction:
            self.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def close(self) -> None:
        self.raw.close()


def _sqlite_error(exc: sqlite3.Error) -> DatabaseError:
    if isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(str(exc))
    if isinstance(exc, sqlite3.OperationalError):
        return OperationalError(str(exc))
    return DatabaseError(str(exc))


# The lock every exclusive PostgreSQL transaction takes: writers that read, decide and
# write (a confirmation, an import's merge, a status change) then run one at a time, as
# they do on SQLite. The send's hot path (claims, results) takes row locks instead.
WRITER_LOCK = 0x6E6C_7772  # "nlwr"


class PostgresConnection:
    """A psycopg 3 connection in autocommit mode running the store's ``?`` SQL."""

    dialect = POSTGRES

    def __init__(self, raw: psycopg.Connection[Any], database: Database) -> None:
        self.raw = raw
        self.database = database

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        import psycopg

        text, order = _postgres_sql(sql)
        args = [params[i] for i in order] if order is not None else params
        try:
            return self.raw.execute(text, args)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _postgres_error(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        import psycopg

        text, order = _postgres_sql(sql)
        if order is not None:
            rows = ([row[i] for i in order] for row in rows)
        try:
            with self.raw.cursor() as cursor:
                cursor.executemany(text, rows)  # type: ignore[arg-type]
                return cursor.rowcount
        except psycopg.Error as exc:
            raise _postgres_error(exc) from exc

    def load_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        import psycopg

        names = ", ".join(_identifier(name) for name in columns)
        count = 0
        try:
            with (
                self.raw.cursor() as cursor,
                cursor.copy(f"COPY {_identifier(table)} ({names}) FROM STDIN") as copy,  # type: ignore[arg-type]
            ):
                for row in rows:
                    copy.write_row(row)
                    count += 1
        except psycopg.Error as exc:
            raise _postgres_error(exc) from exc
        return count

    def begin(self, *, exclusive: bool = True) -> None:
        self.execute("BEGIN")
        if exclusive:
            self.execute("SELECT pg_advisory_xact_lock(?)", (WRITER_LOCK,))

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


def _postgres_error(exc: Exception) -> DatabaseError:
    import psycopg

    if isinstance(exc, psycopg.errors.IntegrityError):
        return IntegrityError(str(exc).strip())
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return PrivilegeError(str(exc).strip())
    if isinstance(exc, psycopg.OperationalError):
        return OperationalError(str(exc).strip())
    return DatabaseError(str(exc).strip())


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier; only plain names (the store's own) are taken."""
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain SQL name: {name!r}")
    return f'"{name}"'


_INDEX_HINT = re.compile(r"\s+INDEXED\s+BY\s+\w+", re.IGNORECASE)
_PARAM = re.compile(r"'(?:[^']|'')*'|\?(\d*)|%")


@functools.lru_cache(maxsize=1024)
def _postgres_sql(sql: str) -> tuple[str, tuple[int, ...] | None]:
    """The store's SQL for psycopg: ``?``/``?N`` become ``%s``, ``%`` is escaped, and
    SQLite's ``INDEXED BY`` hints go (the planner picks). With ``?N`` parameters the
    second item maps each ``%s`` to its index in the caller's parameters."""
    sql = _INDEX_HINT.sub("", sql)
    order: list[int] = []
    numbered = False
    position = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal numbered, position
        token = match.group(0)
        if token.startswith("'"):
            return token.replace("%", "%%")
        if token == "%":
            return "%%"
        if match.group(1):
            numbered = True
            order.append(int(match.group(1)) - 1)
        else:
            order.append(position)
            position += 1
        return "%s"

    text = _PARAM.sub(replace, sql)
    return text, (tuple(order) if numbered else None)


# --- opening -----------------------------------------------------------------------------


def connect_sqlite(database: Database, *, busy_timeout_ms: int) -> SqliteConnection:
    """Open the SQLite file (or memory) in autocommit mode; sharable between threads."""
    raw = sqlite3.connect(
        MEMORY if database.path is None else database.path,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,
        timeout=busy_timeout_ms / 1000,
    )
    return SqliteConnection(raw, database)


def postgres_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What psycopg gets besides the URL: the password from the environment, if set."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "autocommit": True,
        # A writer waits for another at most this long, as SQLite's busy timeout does,
        # then fails with one error line instead of hanging.
        "options": f"-c lock_timeout={LOCK_TIMEOUT_MS}",
    }
    password = env.get(ENV_PASSWORD)
    if password:
        options["password"] = password
    return options


def connect_postgres(database: Database) -> PostgresConnection:
    """Connect to the PostgreSQL server (autocommit; transactions are explicit)."""
    import psycopg

    try:
        raw = psycopg.connect(database.url, **postgres_options())
    except psycopg.Error as exc:
        raise StoreError(
            f"cannot connect to PostgreSQL: {first_line(exc)}",
            where=_server_of(database),
            hint=f"check that the server runs and the URL (--db); the password comes from "
            f"{ENV_PASSWORD}, PGPASSWORD or ~/.pgpass",
        ) from None
    return PostgresConnection(raw, database)


def connect(database: Database, *, busy_timeout_ms: int = 30_000) -> Connection:
    if database.is_postgres:
        return connect_postgres(database)
    return connect_sqlite(database, busy_timeout_ms=busy_timeout_ms)


def first_line(exc: BaseException) -> str:
    """An error's first line: PostgreSQL's own add the statement (``LINE 1: ...``) and
    the values that clashed (``DETAIL: Key ...``), which an error line must not show."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _server_of(database: Database) -> str:
    """``host:port`` of a PostgreSQL URL, for error lines (never the password)."""
    parts = urlsplit(database.url)
    host = parts.hostname or "localhost"
    if host.startswith("/") or "%2f" in (parts.netloc or "").lower():
        return unquote(host)
    return f"{host}:{parts.port or 5432}"


# --- a pool, for a multi-threaded server ---------------------------------------------------


class _Rows:
    """A statement's result read in full, so that its connection can go back to the pool."""

    def __init__(self, cursor: Any) -> None:
        self.rowcount: int = cursor.rowcount
        rows: list[Any] = cursor.fetchall() if cursor.description is not None else []
        self._rows = iter(rows)

    def fetchone(self) -> Any:
        return next(self._rows, None)

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return self._rows


class PooledConnection:
    """PostgreSQL connections lent by a pool (psycopg_pool), for the threads of a server.

    A :class:`Connection` that many threads use at once, each on a connection of its own:
    a transaction keeps one from :meth:`begin` to :meth:`commit` or :meth:`rollback`
    (a statement the same thread runs meanwhile goes there too, and sees its writes); a
    statement outside a transaction borrows one for itself and reads its rows in full.
    At most ``size`` connections are open; a thread waits ``timeout`` seconds for one.
    """

    dialect = POSTGRES

    def __init__(self, database: Database, *, size: int, timeout: float = 30.0) -> None:
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.database = database
        self._held = threading.local()
        self.pool: ConnectionPool[Any] = ConnectionPool(
            database.url,
            kwargs=postgres_options(),
            min_size=1,
            max_size=max(1, size),
            timeout=timeout,
            name="newsletter",
            open=False,
        )
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout:
            self.pool.close()
            raise StoreError(
                "cannot connect to PostgreSQL",
                where=_server_of(database),
                hint=f"check that the server runs and the URL (--db); the password comes from "
                f"{ENV_PASSWORD}, PGPASSWORD or ~/.pgpass",
            ) from None

    def _current(self) -> PostgresConnection | None:
        conn: PostgresConnection | None = getattr(self._held, "conn", None)
        return conn

    def _getconn(self) -> PostgresConnection:
        import psycopg

        try:
            raw = self.pool.getconn()
        except psycopg.Error as exc:  # PoolTimeout too: every connection is busy
            raise _postgres_error(exc) from exc
        return PostgresConnection(raw, self.database)

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[PostgresConnection]:
        """This thread's connection in a transaction, else one from the pool for now."""
        held = self._current()
        if held is not None:
            yield held
            return
        conn = self._getconn()
        try:
            yield conn
        finally:
            self.pool.putconn(conn.raw)  # rolls back what is left open, drops a broken one

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        held = self._current()
        if held is not None:
            return held.execute(sql, params)
        with self._borrowed() as conn:
            return _Rows(conn.execute(sql, params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        with self._borrowed() as conn:
            return conn.executemany(sql, rows)

    def load_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        with self._borrowed() as conn:
            return conn.load_rows(table, columns, rows)

    def begin(self, *, exclusive: bool = True) -> None:
        if self._current() is not None:
            raise DatabaseError("this thread is in a transaction already")
        conn = self._held.conn = self._getconn()
        try:
            conn.begin(exclusive=exclusive)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        conn = self._current()
        self._held.conn = None
        if conn is not None:
            self.pool.putconn(conn.raw)

    def commit(self) -> None:
        conn = self._current()
        if conn is None:
            raise DatabaseError("no transaction to commit")
        try:
            conn.commit()
        finally:
            self._release()

    def rollback(self) -> None:
        conn = self._current()
        if conn is None:
            return
        try:
            conn.rollback()
        finally:
            self._release()

    @property
    def in_transaction(self) -> bool:
        return self._current() is not None

    def close(self) -> None:
        self.pool.close()
