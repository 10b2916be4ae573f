"""Send speed with several `newsletter send` processes on one issue: PostgreSQL with 1 and
more senders, and SQLite's one sender, side by side.

    PYTHONPATH=. python bench/senders.py [--subscribers 20000] [--senders 1 3]

The sink is `newsletter smtp-sink --count-only` in its own process (bench/send.py's).
PostgreSQL is a temporary cluster with the server's defaults (fsync on; tests/support/
postgres.py). For each engine and number of senders: a fresh copy of a database with N
generated subscribers (filled once per engine with add_subscriber, not timed), then that
many `newsletter send 1 --yes` processes at once. The rate is the messages sent over the
span from the first sender's registration to the last one's end (the senders table), so
the processes' start-up (Python, rendering the issue) is not counted. Each sender uses
[delivery] connections = 4. It also prints each process's share, and the rows not sent
(must be 0: nobody was killed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from send import SECRET, Sink, make_workspace  # noqa: E402

from newsletter import config  # noqa: E402
from newsletter.db import Database  # noqa: E402
from newsletter.models import DeliveryState  # noqa: E402
from newsletter.store import Store  # noqa: E402
from tests.support import postgres  # noqa: E402

SLUG = "001-trams-ferries-benches"


def fill(database: Database, count: int) -> None:
    with Store.open(database) as store:
        for i in range(count):
            store.add_subscriber(f"reader{i}@example.com", f"Reader {i}")


def run(ws: Path, database: Database, senders: int) -> dict[str, float]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "PYTHONPATH": str(REPO),
        config.ENV_SECRET_KEY: SECRET,
        config.ENV_DB: str(database),
    }
    command = [sys.executable, "-m", "newsletter", "-C", str(ws), "send", "1", "--yes", "--json"]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(senders)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a sender failed ({proc.returncode}):\n{err[-2000:]}")
        reports.append(json.loads(out))
    with Store.open(database) as store:
        runs = store.senders(SLUG, finished=True)
        counts = store.ledger_counts(SLUG)
    start = min(r.started_at for r in runs)
    end = max(r.finished_at or r.heartbeat_at for r in runs)
    span = (end - start).total_seconds()
    sent = counts[DeliveryState.SENT]
    return {
        "sent": sent,
        "span": span,
        "rate": sent / span,
        "shares": [r["sent"] for r in reports],  # type: ignore[dict-item]
        "problems": sum(n for s, n in counts.items() if s != DeliveryState.SENT),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    print(
        f"bench/senders.py on {os.cpu_count()} cores: N={args.subscribers:,}, "
        "[delivery] connections = 4 per sender"
    )
    with tempfile.TemporaryDirectory() as tmp, postgres.postgres_server(fsync=True) as server:
        folder = Path(tmp)
        sink = Sink(folder)
        expected = 0
        try:
            ws = make_workspace(folder / "ws", sink.port)
            started = time.perf_counter()
            sqlite_list = Database.parse(folder / "list.db")
            fill(sqlite_list, args.subscribers)
            postgres_list = server.new_database()
            fill(postgres_list, args.subscribers)
            print(f"(filled both lists in {time.perf_counter() - started:.1f} s, not timed)")
            runs: list[tuple[str, int]] = [("sqlite", 1)] + [
                ("postgresql", k) for k in args.senders
            ]
            for n, (engine, senders) in enumerate(runs):
                if engine == "sqlite":
                    assert sqlite_list.path is not None
                    database = Database.parse(shutil.copy(sqlite_list.path, folder / f"{n}.db"))
                else:
                    database = server.clone(postgres_list)
                result = run(ws, database, senders)
                expected += args.subscribers
                print(
                    f"{engine:<10} senders={senders}: {result['sent']:>7,.0f} sent in"
                    f" {result['span']:6.2f} s = {result['rate']:6,.0f} msgs/s;"
                    f" shares {result['shares']}; not sent: {result['problems']:.0f}"
                )
        finally:
            received, sink_cpu = sink.stop()
        print(f"sink: received {received:,} messages (expected {expected:,}), CPU {sink_cpu:.1f} s")


if __name__ == "__main__":
    main()
