"""`db copy` speed: N subscribers with their history, SQLite -> PostgreSQL -> SQLite.

    PYTHONPATH=. python bench/dbcopy.py [N] [--batch B]

Builds a SQLite store of N imported subscribers (two fields, a tag each, their consent
rows) and one issue's ledger of N rows, then copies it into a new PostgreSQL database
(a temporary cluster of Debian's package, started here, fsync on: the defaults) and
back into a new SQLite file. Prints rows/s per direction (rows of every table, read,
written, read back and hashed on both sides) and the peak RSS, which must not grow with
N (the copy streams in batches). Asserts nothing but that both copies verified.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from newsletter import dbcopy  # noqa: E402
from newsletter.db import Database  # noqa: E402
from newsletter.store import Store  # noqa: E402
from tests.support.postgres import postgres_server  # noqa: E402


def build(path: Path, rows: int) -> None:
    csv = path.with_suffix(".csv")
    with csv.open("w", encoding="utf-8", newline="") as out:
        out.write("email,name,city,plan,tags,signup_date\r\n")
        for i in range(rows):
            out.write(
                f"reader.{i}@example.com,Réader {i},City {i % 97},plan-{i % 3},"
                f"topic-{i % 5},2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}\r\n"
            )
    with Store.open(path) as store:
        store.import_csv(csv)
        store.snapshot_recipients("2026-01-first-issue")


def report(label: str, result: dbcopy.CopyReport) -> None:
    assert result.ok, result.differing
    print(
        f"{label:<22} {result.rows:>10,} rows in {result.seconds:6.1f} s"
        f"  {result.rows / result.seconds:>9,.0f} rows/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("subscribers", nargs="?", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=dbcopy.BATCH, help="rows per batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, postgres_server(fsync=True) as server:
        source = Path(tmp) / "source.db"
        started = time.perf_counter()
        build(source, args.subscribers)
        print(f"built {args.subscribers:,} subscribers in {time.perf_counter() - started:.1f} s")
        there = server.new_database(migrated=False)
        report(
            "SQLite -> PostgreSQL",
            dbcopy.copy_database(Database.parse(source), there, batch=args.batch),
        )
        back = Database.parse(Path(tmp) / "back.db")
        report("PostgreSQL -> SQLite", dbcopy.copy_database(there, back, batch=args.batch))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
