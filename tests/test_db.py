"""The engine layer: where a database is, the SQL both engines run, one schema on both."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from newsletter.cli import main
from newsletter.db import (
    Connection,
    Database,
    IntegrityError,
    _postgres_sql,
    connect,
    postgres_options,
)
from newsletter.errors import StoreError
from newsletter.migrations import (
    POSTGRES_MIGRATIONS,
    migrate_database,
    schema_target,
    schema_version,
)
from newsletter.store import Store
from tests.support import postgres as pg
from tests.support.postgres import PostgresServer


@pytest.mark.parametrize(
    ("text", "engine", "shown"),
    [
        ("lists/news.db", "sqlite", "lists/news.db"),
        ("sqlite:///srv/news.db", "sqlite", "/srv/news.db"),
        (":memory:", "sqlite", ":memory:"),
        ("postgresql://news@db.example.org:5432/news", "postgresql", None),
        ("postgres://news@db.example.org/news", "postgresql", None),
    ],
)
def test_parse_tells_the_engine(text: str, engine: str, shown: str | None) -> None:
    database = Database.parse(text)
    assert database.engine == engine
    assert str(database) == (shown or text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("postgresql://news:hunter2@db.example.org/news", "holds a password"),
        # libpq also reads a password from the query (its keys may be percent-encoded)
        ("postgresql://news@db.example.org/news?password=hunter2", "holds a password"),
        ("postgresql://news@db.example.org/news?sslmode=require&pass%77ord=hunter2", "password"),
        ("postgresql://news@db.example.org/news?sslpassword=hunter2", "holds a password"),
        ("postgresql://news@db.example.org:99999/news?password=hunter2", "holds a password"),
        ("mysql://news@db.example.org/news", "unknown database scheme"),
        ("postgresql://news@db.example.org:99999/news", "bad port"),
        ("postgresql://news@db.example.org", "no database name"),
    ],
)
def test_parse_refuses_with_the_next_step(text: str, fragment: str) -> None:
    with pytest.raises(StoreError) as caught:
        Database.parse(text, where="NEWSLETTER_DB")
    assert fragment in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert caught.value.where == "NEWSLETTER_DB"


def test_the_password_comes_from_the_environment_only() -> None:
    assert postgres_options({"NEWSLETTER_DB_PASSWORD": "s3cret"})["password"] == "s3cret"
    assert "password" not in postgres_options({})


def test_postgres_sql_rewrites_parameters_outside_literals() -> None:
    text, order = _postgres_sql(
        "SELECT a FROM t INDEXED BY t_a WHERE a = ? AND b LIKE '%?%' AND c = ?"
    )
    assert text == "SELECT a FROM t WHERE a = %s AND b LIKE '%%?%%' AND c = %s"
    assert order is None
    text, order = _postgres_sql("UPDATE t SET a = ?2, b = ?1 WHERE c = ?2")
    assert text == "UPDATE t SET a = %s, b = %s WHERE c = %s"
    assert order == (1, 0, 1)


def test_an_unreachable_server_is_one_line_naming_it() -> None:
    with pytest.raises(StoreError) as caught:
        connect(Database.parse("postgresql://news@127.0.0.1:1/news"))
    assert caught.value.where == "127.0.0.1:1"
    assert "cannot connect to PostgreSQL" in str(caught.value)


def _columns(database: Database) -> dict[str, list[str]]:
    conn = connect(database)
    try:
        if database.is_postgres:
            rows = conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name <> 'schema_version'"
                " ORDER BY table_name, ordinal_position"
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT m.name, p.name FROM sqlite_schema m, pragma_table_info(m.name) p"
                " WHERE m.type = 'table' ORDER BY m.name, p.cid"
            ).fetchall()
    finally:
        conn.close()
    tables: dict[str, list[str]] = {}
    for table, column in rows:
        tables.setdefault(table, []).append(column)
    return tables


def test_both_engines_have_one_schema(tmp_path: Path, postgres_server: PostgresServer) -> None:
    lite = Database.parse(tmp_path / "n.db")
    conn = connect(lite)
    migrate_database(conn)
    conn.close()
    server = postgres_server.new_database()
    assert _columns(lite) == _columns(server)
    conn = connect(server)
    assert schema_version(conn) == schema_target()
    conn.close()


def test_two_processes_migrating_a_new_postgres_database_apply_it_once(
    postgres_server: PostgresServer,
) -> None:
    database = postgres_server.new_database(migrated=False)
    barrier = threading.Barrier(4)
    results: list[int | BaseException] = []

    def run() -> None:
        conn = connect(database)
        try:
            barrier.wait()
            results.append(migrate_database(conn))
        except BaseException as exc:
            results.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [schema_target()] * 4
    conn = connect(database)
    versions = conn.execute("SELECT count(*) FROM schema_version").fetchone()[0]
    assert versions == len(POSTGRES_MIGRATIONS)  # each version once
    assert conn.execute("SELECT count(*) FROM suppression_key").fetchone()[0] == 1
    conn.close()


def test_constraint_errors_are_one_class_on_both_engines(database: Database) -> None:
    conn = connect(database)
    migrate_database(conn)
    row = ("a@example.org", "a@example.org", "active", "t", "t", "t")
    sql = (
        "INSERT INTO subscribers (email, email_key, status, created_at, updated_at,"
        " status_changed_at) VALUES (?, ?, ?, ?, ?, ?)"
    )
    conn.execute(sql, row)
    with pytest.raises(IntegrityError):
        conn.execute(sql, row)
    conn.close()


# No NUL: PostgreSQL text cannot hold one (the store refuses it on input).
_field = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8
)
_fields = st.dictionaries(_field, _field, max_size=4)


@pytest.fixture(scope="module")
def pg_connection(postgres_server: PostgresServer) -> Iterator[Connection]:
    conn = connect(postgres_server.new_database())
    yield conn
    conn.close()


@settings(max_examples=60, deadline=None)
@given(target=_fields, patch=_fields)
def test_postgres_json_patch_writes_what_sqlite_writes(
    pg_connection: Connection, target: dict[str, str], patch: dict[str, str]
) -> None:
    """Subscriber fields are compared as text ("unchanged" = equal text), so the merge
    must produce SQLite's bytes: its key order, compact, the same escapes."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    lite = sqlite3.connect(":memory:")
    expected = lite.execute("SELECT json_patch(?, ?)", (encode(target), encode(patch)))
    wanted = expected.fetchone()[0]
    got = pg_connection.execute("SELECT nl_json_patch(?, ?)", (encode(target), encode(patch)))
    assert got.fetchone()[0] == wanted
    assert json.loads(wanted) == {**target, **patch}


def test_a_postgres_writer_waits_for_another_as_long_as_sqlite_would(
    postgres_server: PostgresServer,
) -> None:
    """SQLite gives up after its busy timeout; PostgreSQL's lock_timeout matches it, so a
    stuck writer elsewhere gives an error line instead of a command that hangs forever."""
    conn = connect(postgres_server.new_database())
    assert conn.execute("SHOW lock_timeout").fetchone()[0] == "30s"
    conn.close()


def test_postgres_text_sorts_as_sqlite_does(database: Database) -> None:
    """Byte order on both engines whatever the server's locale (tags, exports, times)."""
    conn = connect(database)
    migrate_database(conn)
    for tag in ("b", "B", "a", "_x", "Z"):
        conn.execute("INSERT INTO imports (file, imported_at) VALUES (?, ?)", (tag, "2026-12-01"))
    rows = conn.execute("SELECT file FROM imports ORDER BY file").fetchall()
    assert [r[0] for r in rows] == ["B", "Z", "_x", "a", "b"]
    conn.close()


def test_load_rows_appends_every_value_as_given(database: Database) -> None:
    """SQLite inserts, PostgreSQL streams a COPY: what COPY's text format escapes (tabs,
    newlines, backslashes, a literal \\N) and NULL and bytes come back unchanged."""
    conn = connect(database)
    blob = "BYTEA" if database.is_postgres else "BLOB"
    conn.execute(f"CREATE TEMP TABLE loaded (n BIGINT, t TEXT, b {blob}, d TEXT DEFAULT 'x')")
    rows = [
        (1, "plain", b"\x00\x01\xff"),
        (2, "tab\there\nnew line\r\\back\\slash", None),
        (3, "\\N", b""),
        (4, None, b"\\x00"),
        (5, "Chloé 🎉 ''quoted'' \"double\", comma", bytes(range(256))),
    ]
    conn.begin(exclusive=False)
    assert conn.load_rows("loaded", ["n", "t", "b"], iter(rows)) == len(rows)
    conn.commit()
    got = [
        (n, t, None if b is None else bytes(b), d)
        for n, t, b, d in conn.execute("SELECT n, t, b, d FROM loaded ORDER BY n").fetchall()
    ]
    assert got == [(*row, "x") for row in rows]
    assert conn.load_rows("loaded", ["n"], []) == 0
    with pytest.raises(ValueError, match="not a plain SQL name"):
        conn.load_rows("loaded; DROP TABLE loaded", ["n"], [(1,)])
    conn.close()


def test_a_sorted_concatenation_is_the_same_text_on_both_engines(database: Database) -> None:
    """Byte order on both, whatever the column's collation (a language's collation, as a
    production server's default may be, puts 'B' after 'a')."""
    conn = connect(database)
    # Debian's PostgreSQL is built with ICU: "und-x-icu" is its root collation.
    collation = ' COLLATE "und-x-icu"' if database.is_postgres else ""
    conn.execute(f"CREATE TEMP TABLE words (g INTEGER, w TEXT{collation})")
    words = ["zeta", "B", "a", "émile", "a-b", "ab", "Z"]
    conn.executemany("INSERT INTO words VALUES (?, ?)", [(1, w) for w in words])
    concat = conn.dialect.group_concat_sorted("x.w", "' '")
    row = conn.execute(
        f"SELECT {concat} FROM (SELECT g, w FROM words ORDER BY w) AS x GROUP BY x.g"
    ).fetchone()
    assert row[0] == " ".join(sorted(words))
    conn.close()


def test_a_percent_sign_means_modulo_with_and_without_parameters(database: Database) -> None:
    """The PostgreSQL rewrite doubles every % for psycopg's placeholders: psycopg must then
    read the SQL as a template even when no parameter is passed."""
    conn = connect(database)
    assert conn.execute("SELECT 7 % 3, '100%'").fetchone() == (1, "100%")
    assert conn.execute("SELECT ? % 3, '100%'", (8,)).fetchone() == (2, "100%")
    conn.close()


# --- what an operator sees when the server says no -------------------------------------------


def _cli_error(runner: CliRunner, workspace: Path, url: str, *args: str) -> str:
    """The one error line of a CLI run on ``url`` that must fail (exit 1, no traceback)."""
    result = runner.invoke(main, ["-C", str(workspace), "--db", url, *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _role(server: PostgresServer, database: Database, name: str) -> str:
    """A login role that may connect to ``database`` and do nothing else; its URL."""
    with server.admin() as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN")
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {name}")
    return database.url.replace(f"{pg.SUPERUSER}@", f"{name}@", 1)


def test_a_role_without_privileges_on_the_tables_is_one_line_saying_so(
    runner: CliRunner, workspace: Path, postgres_server: PostgresServer
) -> None:
    database = postgres_server.new_database()
    url = _role(postgres_server, database, "nl_reader")
    assert "GRANT" in _cli_error(runner, workspace, url, "db", "status")
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("GRANT SELECT ON schema_version TO nl_reader")
    for args in (["subscribers", "list"], ["subscribers", "add", "a@example.org"]):
        line = _cli_error(runner, workspace, url, *args)
        assert "permission denied" in line
        assert "127.0.0.1" in line and "GRANT" in line  # where, and the next step


def test_a_role_without_create_on_a_new_database_is_one_line_saying_so(
    runner: CliRunner, workspace: Path, postgres_server: PostgresServer
) -> None:
    database = postgres_server.new_database(migrated=False)
    url = _role(postgres_server, database, "nl_nocreate")
    line = _cli_error(runner, workspace, url, "subscribers", "list")
    assert "permission denied for schema public" in line
    assert "GRANT" in line and "is this a newsletter database" not in line
    assert "LINE 1" not in line and "CREATE TABLE" not in line  # not the statement


def test_a_server_that_goes_away_mid_command_is_one_line_naming_it(
    runner: CliRunner, workspace: Path, postgres_server: PostgresServer
) -> None:
    database = postgres_server.new_database()
    store = Store.open(database)
    try:
        with postgres_server.admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database.url.rsplit("/", 1)[1],),
            )
        with pytest.raises(StoreError) as caught:
            store.count()
        assert "127.0.0.1" in caught.value.where
        assert "\n" not in str(caught.value)
    finally:
        store.close()
