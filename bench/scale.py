"""A large list on PostgreSQL and on SQLite: import, send with 1-4 senders, claim cost, RSS.

    PYTHONPATH=. python bench/scale.py [--subscribers 1000000] [--messages 40000]
                                       [--senders 1 2 4] [--rss-lists 100000 1000000]

What it does, on one machine (the sink, the database server and the senders share it):
- starts a temporary PostgreSQL cluster with the server's defaults (fsync on), the same
  way the tests do (Debian's package; see tests/support/postgres.py);
- imports N generated subscribers (example.com/.org/.net) into PostgreSQL and into a
  SQLite file: rows/s;
- claim cost: in one process, claims batches of 100 and records them sent, on a ledger
  of N rows, without any SMTP: microseconds per message for the claim and the record;
- sends: K `newsletter send` processes on one issue of the N-row ledger, each with
  `--limit messages/K`, against `newsletter smtp-sink --count-only`: messages/s over the
  span the senders table records (first registration to last finish), each one's share
  and peak RSS (VmHWM); SQLite runs the 1-process case (its send lock admits one sender);
- peak RSS of one sender as the list grows (the `--rss-lists` sizes), on PostgreSQL.
Prints one line per figure; docs/scaling.md reads them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

from send import Sink, make_workspace  # noqa: E402

from newsletter.db import Database  # noqa: E402
from newsletter.models import DeliveryResult, DeliveryState  # noqa: E402
from newsletter.store import Store  # noqa: E402
from tests.support.postgres import postgres_server  # noqa: E402

SECRET = "bench-secret-key-0123456789abcdef"
ISSUE = "1"
DOMAINS = ("example.com", "example.org", "example.net")


def write_list(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        out.write("email,name,city\n")
        out.writelines(
            f"reader{i}@{DOMAINS[i % 3]},Reader {i},Port Example\n" for i in range(count)
        )
    return path


def timed_import(database: Database, csv: Path) -> float:
    start = time.perf_counter()
    with Store.open(database) as store:
        report = store.import_csv(csv)
    elapsed = time.perf_counter() - start
    return report.rows / elapsed


def claim_cost(database: Database, count: int) -> tuple[float, float, float]:
    """(µs per message claimed, µs per message recorded) over ``count`` messages, and the
    seconds the first send's snapshot of the whole list took (one ledger row each)."""
    key = "claim-bench"
    with Store.open(database) as store, store.acquire_send_lock(key):
        start = time.perf_counter()
        store.snapshot_recipients(key)
        snapshot = time.perf_counter() - start
        claiming = recording = 0.0
        done = 0
        while done < count:
            start = time.perf_counter()
            batch = store.claim_batch(key, "bench", 100)
            claiming += time.perf_counter() - start
            if not batch:
                break
            start = time.perf_counter()
            store.record_results(
                DeliveryResult(key, row.subscriber.id, DeliveryState.SENT, "250 ok", "<m@x>")
                for row in batch
            )
            recording += time.perf_counter() - start
            done += len(batch)
    return claiming / done * 1e6, recording / done * 1e6, snapshot


def reset_ledger(database: Database) -> None:
    """Forget every send, so the next run starts a fresh issue of the whole list."""
    with Store.open(database) as store, store._transaction() as conn:
        for table in ("deliveries", "issue_sends", "erased_deliveries", "senders"):
            conn.execute(f"DELETE FROM {table}")


def size_mib(database: Database) -> float:
    """The database's size on disk (PostgreSQL: pg_database_size; SQLite: file + WAL)."""
    if database.path is not None:
        files = (database.path, database.path.with_name(database.path.name + "-wal"))
        return sum(f.stat().st_size for f in files if f.exists()) / 2**20
    with Store.open(database) as store:
        return float(store._one("SELECT pg_database_size(current_database())")[0]) / 2**20


def peak_rss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def send_run(ws: Path, database: Database, senders: int, messages: int) -> str:
    """K send processes with --limit: msgs/s over the span the senders table records (first
    registration to last finish, so Python's start and the rendering are not counted),
    each process's share and peak RSS (VmHWM, read while it runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEWSLETTER_SECRET_KEY": SECRET}
    env["NEWSLETTER_DB"] = str(database)
    share = messages // senders
    wal_before = _wal_position(database)
    command = [sys.executable, "-m", "newsletter", "-C", str(ws), "send", ISSUE, "--yes"]
    procs = [
        subprocess.Popen(
            [*command, "--limit", str(share)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(senders)
    ]
    rss = dict.fromkeys((proc.pid for proc in procs), 0.0)
    while any(proc.poll() is None for proc in procs):
        for proc in procs:
            rss[proc.pid] = max(rss[proc.pid], peak_rss_mib(proc.pid))
        time.sleep(0.2)  # sampling, not synchronising
    for proc in procs:
        if proc.returncode != 0:
            assert proc.stderr is not None
            raise SystemExit(f"a sender failed ({proc.returncode}): {proc.stderr.read()[-500:]}")
    with Store.open(database) as store:
        (key,) = _issue_keys(store)
        runs = store.senders(key, finished=True)
    sent = sum(run.sent for run in runs)
    ends = [run.finished_at or run.heartbeat_at for run in runs]
    span = (max(ends) - min(run.started_at for run in runs)).total_seconds()
    shares = ", ".join(f"{run.sent:,}" for run in runs)
    wal = ""
    if wal_before is not None:
        with Store.open(database) as store:
            written = store._one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), ?)", (wal_before,))
        wal = f"; WAL {float(written[0]) / sent:,.0f} bytes/msg (snapshot included)"
    return (
        f"{sent:,} sent in {span:.1f} s = {sent / span:,.0f} msgs/s (shares {shares});"
        f" sender peak RSS {', '.join(f'{r:.0f}' for r in rss.values())} MiB{wal}"
    )


def _wal_position(database: Database) -> str | None:
    """PostgreSQL's WAL position now (None on SQLite), to measure what a send writes."""
    if not database.is_postgres:
        return None
    with Store.open(database) as store:
        return str(store._one("SELECT pg_current_wal_lsn()::text")[0])


def _issue_keys(store: Store) -> list[str]:
    return [snapshot.issue_key for snapshot in store.issues_with_deliveries()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=40_000, help="sent per send run")
    parser.add_argument("--claims", type=int, default=20_000, help="messages in the claim test")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rss-lists", type=int, nargs="*", default=[100_000])
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="newsletter-scale-"))
    try:
        csv = write_list(folder / "list.csv", args.subscribers)
        print(f"list: {args.subscribers:,} subscribers; {os.cpu_count()} CPUs shared by all")
        with postgres_server(fsync=True) as server:
            pg = server.new_database()
            lite = Database.parse(folder / "scale.db")
            print(f"import, PostgreSQL: {timed_import(pg, csv):,.0f} rows/s")
            print(f"import, SQLite:     {timed_import(lite, csv):,.0f} rows/s")
            for name, database in (("PostgreSQL", pg), ("SQLite", lite)):
                print(f"size with the list, {name}: {size_mib(database):,.0f} MiB")
                claim, record, snapshot = claim_cost(database, args.claims)
                print(
                    f"claim cost, {name}: {claim:.0f} µs/msg claimed, {record:.0f} µs recorded;"
                    f" snapshot of the list {snapshot:.1f} s;"
                    f" size with one issue's ledger {size_mib(database):,.0f} MiB"
                )
                reset_ledger(database)
            sink = Sink(folder)
            try:
                ws = make_workspace(folder / "ws", sink.port)
                for count in args.senders:
                    result = send_run(ws, pg, count, args.messages)
                    print(f"send, PostgreSQL, {count} sender(s): {result}")
                    reset_ledger(pg)
                result = send_run(ws, lite, 1, args.messages)
                print(f"send, SQLite, 1 sender: {result}")
                for size in args.rss_lists:
                    small = server.new_database()
                    timed_import(small, write_list(folder / f"list-{size}.csv", size))
                    result = send_run(ws, small, 1, args.messages)
                    print(f"send, PostgreSQL, {size:,}-row list, 1 sender: {result}")
            finally:
                received, _ = sink.stop()
                print(f"sink: received {received:,} messages")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
