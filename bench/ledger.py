"""Ledger overhead of a send: snapshot, then claim + record in batches, no network.

    PYTHONPATH=. python bench/ledger.py [N] [--batch B]

Prints the snapshot time and the claim/record rate, i.e. the ceiling the ledger puts
on `newsletter send` (the issue's target is 1,500 msgs/s with the ledger on).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from newsletter.models import DeliveryResult, DeliveryState
from newsletter.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", nargs="?", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--no-fsync", action="store_true", help="durable_claims=False")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "list.csv"
        with csv_path.open("w", encoding="utf-8") as out:
            out.write("email,name\n")
            out.writelines(f"reader{i}@example.com,Reader {i}\n" for i in range(args.rows))
        durable = not args.no_fsync
        with Store.open(Path(tmp) / "bench.db", durable_claims=durable) as store:
            store.import_csv(csv_path)
            start = time.perf_counter()
            queued = store.snapshot_recipients("bench")
            print(f"snapshot of {queued:,} recipients: {time.perf_counter() - start:.2f} s")
            start = time.perf_counter()
            done = 0
            with store.acquire_send_lock("bench"):
                while batch := store.claim_batch("bench", "w1", args.batch):
                    store.record_results(
                        DeliveryResult("bench", c.subscriber.id, DeliveryState.SENT, "250 Ok")
                        for c in batch
                    )
                    done += len(batch)
            elapsed = time.perf_counter() - start
            assert store.ledger_counts("bench")[DeliveryState.SENT] == args.rows
        print(
            f"claim+record {done:,} rows in batches of {args.batch}: {elapsed:.2f} s = "
            f"{done / elapsed:,.0f} rows/s (durable_claims={durable})"
        )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS: {rss:.1f} MiB")


if __name__ == "__main__":
    main()
