"""The subscription service and bounce processing: how fast, and how they share the database.

    PYTHONPATH=. python bench/service.py [--subscribers N] [--clients K] [--bounces M]

Prints, all on 127.0.0.1 with waitress (8 threads) and a real SQLite file:
- one-click unsubscribes per second and their latency (p50/p99), alone and while a send
  claims and records batches on the same database (durable claims, as `send` does);
- subscribe requests per second (the confirmation emails go out in the background to an
  aiosmtpd sink: how long until all arrived);
- subscribe timing by the address's status (active, pending, unsubscribed, unknown):
  median and p90 over many interleaved requests, which must not tell them apart;
- /healthz latency (p50/p99) with 200 idle and trickling sockets open;
- subscription bombing with the default limits: confirmation emails actually sent for 300
  addresses from one client, 50 +tag variants of one mailbox, and 400 addresses from 400
  clients behind a trusted proxy;
- the archive page, first render and then cached;
- bounce processing (classify, check against the ledger, apply) per second, over an mbox
  of M messages.
"""

from __future__ import annotations

import argparse
import email
import http.client
import logging
import mailbox
import multiprocessing
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlencode

from newsletter import config, mailboxes
from newsletter.db import Database
from newsletter.models import DeliveryResult, DeliveryState
from newsletter.server import create_app, mail_queue, start_server
from newsletter.sink import RunningSink, start_sink
from newsletter.store import Store
from newsletter.tokens import UNSUBSCRIBE_PURPOSE, TokenSigner

KEY = "bench-secret-key-0123456789abcdef"
ISSUE = "001-bench"
CORPUS = Path(__file__).parents[1] / "tests" / "inbound"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# No limits: the throughput and timing scenarios measure the service, not the limiter.
UNLIMITED = "client_limit_per_hour = 0\nmailbox_limit_per_hour = 0\ntotal_limit_per_hour = 0\n"


def _is_bounce(name: str) -> bool:
    """The corpus's delivery reports (not its complaints, replies and broken mail)."""
    return not name.startswith(("arf-", "autoreply-", "unsubscribe-", "malformed-", "not-a-"))


def workspace(
    root: Path, smtp_port: int, server: str = "resend_interval_minutes = 0\n" + UNLIMITED
) -> config.Config:
    folder = root / "issues" / ISSUE
    (folder / "articles").mkdir(parents=True)
    (root / "newsletter.toml").write_text(
        '[newsletter]\nname = "Bench"\nsender = "Bench <editor@example.org>"\n'
        'base_url = "https://example.org/b"\n'
        f"[smtp]\nport = {smtp_port}\n"
        f"[server]\n{server}",
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


def post(port: int, path: str, fields: dict[str, str], headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, urlencode(fields), {**FORM, **headers})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def _serve_for_timing(root: str, pipe: Connection) -> None:
    """The service in a process of its own, so that the bench's client shares no GIL with
    the emails being sent (a real client is on another machine)."""
    logging.getLogger("newsletter.server").setLevel(logging.ERROR)
    cfg = config.load(Path(root), environ={"NEWSLETTER_SECRET_KEY": KEY})
    service = start_server(create_app(cfg), threads=8)
    pipe.send(service.port)
    pipe.recv()  # until the bench is done
    service.stop()


def subscribe_timing(tmp: Path, sink: RunningSink, rounds: int) -> None:
    """POST /subscribe for an active, a pending, an unsubscribed and an unknown address,
    interleaved in random order on one keep-alive connection from another process than
    the service's; median and p90 of each. Once spaced out (the email of the previous
    request long sent: what one probe sees), once back to back."""
    cfg = workspace(tmp / "timing", sink.port, UNLIMITED)
    states = ("active", "pending", "unsubscribed", "unknown")
    with Store.open(cfg.database) as store:
        for i in range(2 * rounds):
            store.add_subscriber(f"active{i}@example.org")
            store.request_confirmation(f"pending{i}@example.org", resend_after=timedelta(0))
            gone = store.add_subscriber(f"unsubscribed{i}@example.org")
            store.unsubscribe(gone.id, "one-click")
    here, there = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=_serve_for_timing, args=(str(cfg.root), there)
    )
    child.start()
    port = here.recv()
    origin = f"http://127.0.0.1:{port}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    before = sink.count
    for label, first, gap in (("spaced 20 ms", 0, 0.02), ("back to back", rounds, 0.0)):
        times: dict[str, list[float]] = {state: [] for state in states}
        order = [(state, first + i) for i in range(rounds) for state in states]
        random.Random(12).shuffle(order)
        for state, i in order:
            if gap:
                time.sleep(gap)  # pacing, as a careful prober would
            body = urlencode({"email": f"{state}{i}@example.org"})
            start = time.perf_counter()
            conn.request("POST", "/subscribe", body, {**FORM, "Origin": origin})
            response = conn.getresponse()
            response.read()
            times[state].append(time.perf_counter() - start)
            assert response.status == 200, response.status
        print(f"subscribe timing by status, {label} ({rounds:,} each, interleaved):")
        for state in states:
            deciles = statistics.quantiles(times[state], n=10)
            print(
                f"  {state:<12} median {statistics.median(times[state]) * 1000:.3f} ms,"
                f" p90 {deciles[8] * 1000:.3f} ms"
            )
    conn.close()
    sink.wait_for(before + 4 * rounds, timeout=60)  # unknown and unsubscribed, both rounds
    here.send("stop")
    child.join(30)
    print(f"  confirmation emails sent meanwhile: {sink.count - before:,}")


def slow_clients(tmp: Path, sink: RunningSink, samples: int) -> None:
    """/healthz latency from fresh connections, alone and with 200 idle + trickling sockets."""
    cfg = workspace(tmp / "slow", sink.port)
    service = start_server(create_app(cfg), threads=8)

    def healthz() -> list[float]:
        latencies = []
        for _ in range(samples):
            start = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            conn.close()
            latencies.append(time.perf_counter() - start)
            assert response.status == 200
        return latencies

    def show(label: str, latencies: list[float]) -> None:
        q = statistics.quantiles(latencies, n=100)
        print(
            f"healthz, {label}: p50 {q[49] * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms,"
            f" max {max(latencies) * 1000:.2f} ms ({samples} requests)"
        )

    show("alone", healthz())
    address = ("127.0.0.1", service.port)
    idle = [socket.create_connection(address) for _ in range(150)]
    trickling = [socket.create_connection(address) for _ in range(50)]
    for sock in trickling:
        sock.sendall(b"POST /subscribe HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            for sock in trickling:
                try:
                    sock.sendall(b"a")
                except OSError:
                    return

    thread = threading.Thread(target=trickle)
    thread.start()
    show("150 idle + 50 trickling sockets open", healthz())
    stop.set()
    thread.join()
    for sock in idle + trickling:
        sock.close()
    service.stop()


def bombing(tmp: Path) -> None:
    """The default limits against one client, one mailbox, and many clients. The bench is
    its own trusted proxy (127.0.0.1): a request without X-Forwarded-For is one client,
    and each X-Forwarded-For value another."""

    def run(label: str, asks: list[tuple[str, str]]) -> None:
        sink = start_sink(None)
        folder = tmp / f"bomb{len(list(tmp.glob('bomb*')))}"
        cfg = workspace(folder, sink.port, 'trusted_proxies = ["127.0.0.1"]\n')
        app = create_app(cfg)
        service = start_server(app, threads=8)
        answers: dict[int, int] = {}
        start = time.perf_counter()
        for address, client in asks:
            headers = {"Origin": service.url}
            if client:
                headers["X-Forwarded-For"] = client
            status = post(service.port, "/subscribe", {"email": address}, headers)
            answers[status] = answers.get(status, 0) + 1
        elapsed = time.perf_counter() - start
        mail_queue(app).wait_idle(120)
        service.stop()
        shown = ", ".join(f"{n} x {status}" for status, n in sorted(answers.items()))
        print(
            f"bombing, {label}: {len(asks)} requests in {elapsed:.2f} s ({shown});"
            f" confirmation emails sent: {sink.count}"
        )
        sink.stop()

    def client(i: int) -> str:
        return f"198.51.{i // 250}.{i % 250 + 1}"

    run("300 addresses from one client", [(f"victim{i}@example.com", "") for i in range(300)])
    run("50 +tag variants from one client", [(f"jane+{i}@example.com", "") for i in range(50)])
    run(
        "50 +tag variants from 50 clients",
        [(f"jane+{i}@example.com", client(i)) for i in range(50)],
    )
    run(
        "400 addresses from 400 clients",
        [(f"reader{i}@example.com", client(i)) for i in range(400)],
    )


def sending(database: Database, stop: threading.Event) -> Callable[[], int]:
    """A send in a thread: claim + record batches of 50 until stopped; returns a join()."""
    done = [0]

    def run() -> None:
        with Store.open(database) as store, store.acquire_send_lock(ISSUE):
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
    parser.add_argument("--timing-rounds", type=int, default=1_000)
    parser.add_argument("--healthz-samples", type=int, default=300)
    args = parser.parse_args()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" notes
    logging.getLogger("newsletter.server").setLevel(logging.ERROR)  # "limit reached" notes
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
        with Store.open(cfg.database) as store:
            store.import_csv(csv)
            ids = [s.id for s in store.list_subscribers()]
            store.snapshot_recipients(ISSUE)
        service = start_server(create_app(cfg), threads=8)
        half = args.unsubscribes // 2

        def one_click(chunk: list[int]) -> list[tuple[str, str, bytes | None]]:
            return [
                (
                    "POST",
                    f"/u/{signer.make(UNSUBSCRIBE_PURPOSE, str(i), ISSUE)}",
                    b"List-Unsubscribe=One-Click",
                )
                for i in chunk
            ]

        elapsed, latencies, errors = hammer(service.port, one_click(ids[-half:]), args.clients)
        report("one-click unsubscribe, alone", half, elapsed, latencies, errors)

        stop = threading.Event()
        join = sending(cfg.database, stop)
        elapsed, latencies, errors = hammer(
            service.port, one_click(ids[-2 * half : -half]), args.clients
        )
        sent = join()
        report("one-click unsubscribe, during a send", half, elapsed, latencies, errors)
        print(f"  the send claimed and recorded {sent:,} rows meanwhile ({sent / elapsed:,.0f}/s)")

        start_subscribes = time.perf_counter()
        subscribes = [
            ("POST", "/subscribe", urlencode({"email": f"new{i}@example.org"}).encode())
            for i in range(args.subscribes)
        ]
        elapsed, latencies, errors = hammer(service.port, subscribes, args.clients)
        report("subscribe (the answer)", args.subscribes, elapsed, latencies, errors)
        mail_queue(service.app).wait_idle(300)
        print(
            f"  the sink received {sink.count:,} confirmation emails, all within"
            f" {time.perf_counter() - start_subscribes:.2f} s of the first request"
            f" ({mail_queue(service.app).rejected} dropped: queue full)"
        )

        with Store.open(cfg.database) as store, store.acquire_send_lock(ISSUE):
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
        subscribe_timing(Path(tmp), sink, args.timing_rounds)
        slow_clients(Path(tmp), sink, args.healthz_samples)
        sink.stop()
        bombing(Path(tmp))

        names = sorted(p.name for p in CORPUS.glob("*.eml") if _is_bounce(p.name))
        mbox_path = Path(tmp) / "bounces.mbox"
        box = mailbox.mbox(mbox_path)
        for n in range(args.bounces):
            message = email.message_from_bytes((CORPUS / names[n % len(names)]).read_bytes())
            del message["Message-ID"]
            message["Message-ID"] = f"<bounce{n}@bench.example.org>"  # each one is new
            box.add(message)
        box.flush()
        box.close()
        with Store.open(cfg.database) as store:
            start = time.perf_counter()
            summary = mailboxes.import_path(store, cfg, mbox_path)
            elapsed = time.perf_counter() - start
        print(
            f"bounce import: {summary.messages:,} messages in {elapsed:.2f} s = "
            f"{summary.messages / elapsed:,.0f}/s ("
            + ", ".join(f"{n:,} {outcome}" for outcome, n in summary.outcomes.items())
            + ")"
        )


if __name__ == "__main__":
    main()
