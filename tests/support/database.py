"""Reading a store's database as text, on either engine, for tests that look for traces."""

from __future__ import annotations

import sqlite3

import psycopg

from newsletter.store import Store


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
