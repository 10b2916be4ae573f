"""Test databases on either engine: making new ones, and reading one as text."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from newsletter.db import Database
from newsletter.store import Store

ENGINES = ("sqlite", "postgresql")


@contextlib.contextmanager
def new_database(engine: str, file: Path, request: pytest.FixtureRequest) -> Iterator[Database]:
    """A new, migrated database: the SQLite ``file`` (migrated when the store opens it),
    or one on the session's PostgreSQL server (the ``postgres_server`` fixture), dropped
    afterwards."""
    if engine == "sqlite":
        yield Database.parse(file)
        return
    server = request.getfixturevalue("postgres_server")
    database = server.new_database()
    try:
        yield database
    finally:
        server.drop_database(database)


def dump(store: Store) -> str:
    """Every row the database holds, as text: SQLite's SQL dump, or each row of every
    PostgreSQL table. What is left in free space or logs is not here (see test_person)."""
    if store.is_postgres:
        with psycopg.connect(store.database.url) as conn:
            tables = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchall()
            return "\n".join(
                str(row[0])
                for (table,) in tables
                for row in conn.execute(f'SELECT CAST(t AS TEXT) FROM "{table}" t')
            )
    assert store.path is not None
    conn = sqlite3.connect(store.path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()
