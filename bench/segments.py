"""Counting segments over a large list: the filter runs in SQLite, not in Python.

    PYTHONPATH=. python bench/segments.py [N]

Fills a database with N subscribers (1,000,000 by default) straight from SQL (a
recursive CTE: 90% active, tags europe 30%, harbours 20%, paused 2%, a city field,
sign-up dates over two years), then times `count_recipients` (what `send --segment`
and its confirmation prompt count) for a few segments, best of three runs each.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from newsletter.segments import make_segment
from newsletter.store import Store

SEGMENTS = {
    "everyone (no segment)": None,
    "europe": "tag:europe",
    "europe, not harbours": "tag:europe and not tag:harbours",
    "harbours or new": "tag:harbours or joined >= 2026-01-01",
    "lisbon (a field)": 'field:city = "Lisbon"',
    "nested": "(tag:europe or tag:harbours) and not (status:pending or joined < 2025-03-01)",
}


def populate(db: Path, rows: int) -> float:
    """N subscribers and their tags, in one transaction; returns the seconds it took."""
    started = time.perf_counter()
    conn = sqlite3.connect(db)
    conn.executescript(
        f"""
        PRAGMA synchronous = OFF;
        BEGIN;
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
        INSERT INTO subscribers (id, email, email_key, name, fields, status, created_at,
                                 updated_at, status_changed_at)
        SELECT i, 'reader' || i || '@example.org', 'reader' || i || '@example.org',
               'Reader ' || i,
               json_object('city', CASE i % 4 WHEN 0 THEN 'Lisbon' WHEN 1 THEN 'Oslo'
                                  WHEN 2 THEN 'Porto' ELSE 'Bergen' END),
               CASE WHEN i % 10 = 0 THEN 'unsubscribed' WHEN i % 50 = 1 THEN 'pending'
                    ELSE 'active' END,
               strftime('%Y-%m-%dT%H:%M:%S.000000+00:00', '2024-06-01',
                        '+' || (i % 730) || ' days'),
               '2026-01-01T00:00:00.000000+00:00', '2026-01-01T00:00:00.000000+00:00'
        FROM n;
        INSERT INTO subscriber_tags (subscriber_id, tag, added_at)
        SELECT id, 'europe', '2026-01-01' FROM subscribers WHERE id % 10 < 3;
        INSERT INTO subscriber_tags (subscriber_id, tag, added_at)
        SELECT id, 'harbours', '2026-01-01' FROM subscribers WHERE id % 5 = 2;
        INSERT INTO subscriber_tags (subscriber_id, tag, added_at)
        SELECT id, 'paused', '2026-01-01' FROM subscribers WHERE id % 50 = 7;
        COMMIT;
        """
    )
    conn.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", nargs="?", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        Store.open(db).close()  # the schema
        print(f"populated {args.rows:,} subscribers in {populate(db, args.rows):.1f} s")
        with Store.open(db) as store:
            for label, expression in SEGMENTS.items():
                segment = None if expression is None else make_segment("bench", expression)
                times = []
                for _ in range(3):
                    started = time.perf_counter()
                    count = store.count_recipients(segment)
                    times.append(time.perf_counter() - started)
                print(
                    f"{label:<24} {count:>9,} recipients counted in {min(times) * 1000:6.0f} ms"
                    f" (best of 3; {expression or 'active, not paused'})"
                )


if __name__ == "__main__":
    main()
