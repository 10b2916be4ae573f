"""The subscription service and bounce processing: how fast, and how they share the database.

    PYTHONPATH=. python bench/service.py [--subscribers N] [--clients K] [--bounces M]

Prints, all on 127.0.0.1 with waitress (8 threads) and a real SQLite file:
- one-click unsubscribes per second and their latency (p50/p99), alone and while a send
  claims and records batches on the same database (durable claims, as `send` does);
- subscribe requests per second, each sending its confirmation to an aiosmtpd sink;
- the archive page, first render and then cached;
- bounce processing (detect + record) per second over an mbox of M messages.
"""

from __future__ import annotations

import argparse
import email
import http.client
import logging
import mailbox
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

from newsletter import bounces, config
from newsletter.server import create_app, start_server
from newsletter.sink import start_sink
from newsletter.store import DeliveryResult, DeliveryState, Store
from newsletter.tokens import TokenSigner

KEY = "bench-secret-key-0123456789abcdef"
ISSUE = "001-bench"
CORPUS = Path(__file__).parents[1] / "tests" / "bounces"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def workspace(root: Path, smtp_port: int) -> config.Config:
    folder = root / "issues" / ISSUE
    (folder / "articles").mkdir(parents=True)
    (root / "newsletter.toml").write_text(
        '[newsletter]\nname = "Bench"\nsender = "Bench <editor@example.org>"\n'
        'base_url = "https://example.org/b"\n'
        f"[smtp]\nport = {smtp_port}\n"
        "[server]\nresend_interval_minutes = 0\n",
        encoding="utf-8",
    )
    (folder / "issue.md").write_text(
        "---\nnumber: 1\ndate: 2026-03-02\ntitle: Bench\npreheader: p\narticles:\n"
        "  - a.md\n---\nIntro.\n",
        encoding="utf-8",
    )
    (folder / "articles" / "a.md").write_text(
        "---\ntitle: An article\n---\n" + "Some words here. " * 400, encoding="utf-8"
    )
    return config.load(root, environ={"NEWSLETTER_SECRET_KEY": KEY})


def hammer(
    port: int, requests: list[tuple[str, str, bytes | None]], clients: int
) -> tuple[float, list[float], int]:
    """Send ``requests`` from ``clients`` keep-alive connections; (seconds, latencies, errors)."""
    chunks = [requests[i::clients] for i in range(clients)]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def run(chunk: list[tuple[str, str, bytes | None]]) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        bad = 0
        for method, path, body in chunk:
            start = time.perf_counter()
            conn.request(method, path, body=body, headers=FORM if body else {})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            bad += response.status >= 400
        conn.close()
        with lock:
            latencies.extend(mine)
            errors += bad

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, chunks))
    return time.perf_counter() - start, latencies, errors


def report(label: str, count: int, elapsed: float, latencies: list[float], errors: int) -> None:
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"{label}: {count:,} in {elapsed:.2f} s = {count / elapsed:,.0f}/s, "
        f"p50 {quantiles[49] * 1000:.1f} ms, p99 {quantiles[98] * 1000:.1f} ms, "
        f"{errors} errors"
    )


def sending(db_path: Path, stop: threading.Event) -> Callable[[], int]:
    """A send in a thread: claim + record batches of 50 until stopped; returns a join()."""
    done = [0]

    def run() -> None:
        with Store.open(db_path) as store, store.acquire_send_lock(ISSUE):
            while not stop.is_set():
                batch = store.claim_batch(ISSUE, "bench", 50)
                if not batch:
                    return
                store.record_results(
                    DeliveryResult(
                        ISSUE,
                        c.subscriber.id,
                        DeliveryState.SENT,
                        "250 ok",
                        f"<{c.subscriber.id}@b>",
                    )
                    for c in batch
                )
                done[0] += len(batch)

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> int:
        stop.set()
        thread.join()
        return done[0]

    return join


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--unsubscribes", type=int, default=2_000)
    parser.add_argument("--subscribes", type=int, default=300)
    parser.add_argument("--bounces", type=int, default=3_000)
    args = parser.parse_args()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" notes
    signer = TokenSigner(KEY)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        sink = start_sink(None)  # counts only
        cfg = workspace(root, sink.port)
        csv = Path(tmp) / "list.csv"
        csv.write_text(
            "email,name\n" + "".join(f"r{i}@example.com,R {i}\n" for i in range(args.subscribers)),
            encoding="utf-8",
        )
        with Store.open(cfg.db_path) as store:
            store.import_csv(csv)
            ids = [s.id for s in store.list_subscribers()]
            store.snapshot_recipients(ISSUE)
        service = start_server(create_app(cfg), threads=8)
        half = args.unsubscribes // 2

        def one_click(chunk: list[int]) -> list[tuple[str, str, bytes | None]]:
            return [
                (
                    "POST",
                    f"/u/{signer.make('unsubscribe', str(i), ISSUE)}",
                    b"List-Unsubscribe=One-Click",
                )
                for i in chunk
            ]

        elapsed, latencies, errors = hammer(service.port, one_click(ids[-half:]), args.clients)
        report("one-click unsubscribe, alone", half, elapsed, latencies, errors)

        stop = threading.Event()
        join = sending(cfg.db_path, stop)
        elapsed, latencies, errors = hammer(
            service.port, one_click(ids[-2 * half : -half]), args.clients
        )
        sent = join()
        report("one-click unsubscribe, during a send", half, elapsed, latencies, errors)
        print(f"  the send claimed and recorded {sent:,} rows meanwhile ({sent / elapsed:,.0f}/s)")

        subscribes = [
            ("POST", "/subscribe", urlencode({"email": f"new{i}@example.org"}).encode())
            for i in range(args.subscribes)
        ]
        elapsed, latencies, errors = hammer(service.port, subscribes, args.clients)
        report("subscribe + confirmation email", args.subscribes, elapsed, latencies, errors)
        print(f"  the sink received {sink.count:,} confirmation emails")

        with Store.open(cfg.db_path) as store, store.acquire_send_lock(ISSUE):
            for batch in iter(lambda: store.claim_batch(ISSUE, "b", 500), []):
                store.record_results(
                    DeliveryResult(ISSUE, c.subscriber.id, DeliveryState.SENT, "250") for c in batch
                )
        first, _, _ = hammer(service.port, [("GET", f"/{ISSUE}/", None)], 1)
        print(f"archive page, first request (renders the issue): {first * 1000:.0f} ms")
        pages = [("GET", f"/{ISSUE}/", None)] * 500
        elapsed, latencies, errors = hammer(service.port, pages, args.clients)
        report("archive page, cached", len(pages), elapsed, latencies, errors)
        service.stop()
        sink.stop()

        names = sorted(p.name for p in CORPUS.glob("*.eml"))
        mbox_path = Path(tmp) / "bounces.mbox"
        box = mailbox.mbox(mbox_path)
        for n in range(args.bounces):
            message = email.message_from_bytes((CORPUS / names[n % len(names)]).read_bytes())
            del message["Message-ID"]
            message["Message-ID"] = f"<bounce{n}@bench.example.org>"  # each one is new
            box.add(message)
        box.flush()
        box.close()
        with Store.open(cfg.db_path) as store:
            start = time.perf_counter()
            summary = bounces.import_path(store, mbox_path, soft_limit=3)
            elapsed = time.perf_counter() - start
        print(
            f"bounce import: {summary.messages:,} messages in {elapsed:.2f} s = "
            f"{summary.messages / elapsed:,.0f}/s ({summary.hard:,} hard, {summary.soft:,} soft, "
            f"{summary.already_processed:,} duplicates skipped)"
        )


if __name__ == "__main__":
    main()
