"""Import speed and memory: N generated subscribers from a CSV into a fresh database.

    PYTHONPATH=. python bench/import.py [N] [--fields] [--reimport] [--suppressed M]
        [--dates] [--postgres | --db URL]

Prints rows/s for the import (and optionally a second import of the same file, which
updates nothing), and the process's peak RSS, which must not grow with N. With
--suppressed, M other addresses left before the import (so every new row of the file
is checked against the suppression list: the worst case); with --dates, every row
carries a sign-up date (kept with the consent). SQLite by default (a file in a temporary
folder); --postgres starts a temporary PostgreSQL cluster (Debian's package, fsync on, as
a server runs) and imports into a new database there; --db imports into an empty
database of yours (a postgresql:// URL or a path).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from newsletter.db import Database
from newsletter.store import Store


def generate(path: Path, rows: int, fields: bool, dates: bool = False) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        header = "email,name" + (",city,plan" if fields else "") + (",signup_date" if dates else "")
        out.write(header + "\r\n")
        for i in range(rows):
            extra = f",City {i % 97},plan-{i % 3}" if fields else ""
            if dates:
                extra += f",2019-{i % 12 + 1:02d}-{i % 28 + 1:02d} 12:{i % 60:02d}:00"
            out.write(f"Reader.{i}@Example.com,Reader {i}{extra}\r\n")


def suppress(store: Store, folder: Path, count: int) -> None:
    """``count`` addresses (not in the benchmark's file) that left before."""
    path = folder / "left.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,status\r\n")
        for i in range(count):
            out.write(f"gone.{i}@example.org,unsubscribed\r\n")
    store.import_csv(path)
    assert store.count_suppressions() == count


@contextlib.contextmanager
def database(args: argparse.Namespace, folder: Path) -> Iterator[Database]:
    """The database the benchmark imports into (see the options)."""
    if args.db:
        yield Database.parse(args.db)
    elif args.postgres:
        from tests.support.postgres import postgres_server

        with postgres_server(fsync=True) as server:
            yield server.new_database()
    else:
        yield Database.parse(folder / "bench.db")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--fields", action="store_true", help="add two field columns")
    parser.add_argument("--reimport", action="store_true", help="import the same file twice")
    parser.add_argument("--suppressed", type=int, default=0, help="addresses that left before")
    parser.add_argument("--dates", action="store_true", help="add a sign-up date column")
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument("--postgres", action="store_true", help="a temporary PostgreSQL cluster")
    engine.add_argument("--db", help="an empty database: a path or a postgresql:// URL")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "subscribers.csv"
        start = time.perf_counter()
        generate(csv_path, args.rows, args.fields, args.dates)
        size = csv_path.stat().st_size / 2**20
        elapsed = time.perf_counter() - start
        print(f"generated {args.rows:,} rows ({size:.1f} MiB) in {elapsed:.1f} s")
        print(f"peak RSS before import: {peak_rss_mib():.1f} MiB")
        with database(args, Path(tmp)) as where, Store.open(where) as store:
            print(f"engine: {where.engine}")
            if args.suppressed:
                suppress(store, Path(tmp), args.suppressed)
                print(f"{args.suppressed:,} addresses suppressed before the import")
            rounds = 2 if args.reimport else 1
            for round_ in range(rounds):
                start = time.perf_counter()
                report = store.import_csv(csv_path)
                elapsed = time.perf_counter() - start
                print(
                    f"import {round_ + 1}: {args.rows:,} rows in {elapsed:.2f} s = "
                    f"{args.rows / elapsed:,.0f} rows/s (added {report.added:,}, "
                    f"updated {report.updated:,}, unchanged {report.unchanged:,}, "
                    f"errors {report.error_count})"
                )
            assert store.count() == args.rows + args.suppressed
        print(f"peak RSS: {peak_rss_mib():.1f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
