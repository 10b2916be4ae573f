"""How many messages per second the SMTP sink takes, alone.

The sink runs in its own process (as `newsletter smtp-sink` would); client
processes push realistic ~20 kB messages at it through SmtpTransport, one
connection each. Compares aiosmtpd's stock line-by-line DATA with the sink's
single-readuntil FastSMTP, counting only and writing a Maildir.

    PYTHONPATH=. python bench/sink.py [--messages 6000] [--clients 2] [--size 20000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path

SENDER = "newsletter@example.org"


def make_message(size: int = 20_000) -> bytes:
    """Headers and a quoted-printable-looking body, lines ≤ 76, some ending in a period."""
    head = (
        b"From: Newsletter <newsletter@example.org>\r\nTo: Reader <reader@example.com>\r\n"
        b"Subject: Issue 12: the week in review\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
    )
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod=\r\n"
    body = bytearray()
    n = 0
    while len(body) < size:
        body += line if n % 7 else b"tempor incididunt ut labore et dolore magna aliqua.\r\n"
        n += 1
    return head + bytes(body)


def serve(kind: str, maildir: str | None, pipe: Connection) -> None:
    """Run one server until told to stop; report port, then CPU seconds used."""
    from aiosmtpd.smtp import SMTP

    from newsletter.sink import FastSMTP, LoopbackController, SinkHandler

    handler = SinkHandler(Path(maildir) if maildir else None)
    controller = LoopbackController(handler, smtp_class=FastSMTP if kind == "fast" else SMTP)
    controller.start()
    pipe.send(controller.port)
    pipe.recv()  # start measuring
    cpu0 = time.process_time()
    pipe.recv()  # stop
    pipe.send((time.process_time() - cpu0, handler.count))
    controller.stop()


def client(port: int, count: int, size: int, ready: Barrier) -> None:
    from newsletter.config import SmtpSettings
    from newsletter.transport import SmtpTransport

    message = make_message(size)
    smtp = SmtpTransport(SmtpSettings(port=port, timeout=30, max_per_connection=0))
    smtp.open()
    ready.wait()  # every client connected: the clock starts
    for i in range(count):
        result = smtp.send(SENDER, f"reader{i}@example.com", message)
        assert result.ok, result
    smtp.close()


def run(kind: str, store: bool, messages: int, clients: int, size: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = ctx.Pipe()
        server = ctx.Process(target=serve, args=(kind, tmp + "/md" if store else None, theirs))
        server.start()
        port = ours.recv()
        ready = ctx.Barrier(clients + 1)
        procs = [
            ctx.Process(target=client, args=(port, messages // clients, size, ready))
            for _ in range(clients)
        ]
        for proc in procs:
            proc.start()
        ours.send("go")
        ready.wait()
        t0 = time.perf_counter()
        for proc in procs:
            proc.join()
        elapsed = time.perf_counter() - t0
        ours.send("stop")
        cpu, count = ours.recv()
        server.join()
        assert count == messages // clients * clients, (count, messages)
        if store:
            assert len(list(Path(tmp, "md", "new").iterdir())) == count
    return count / elapsed, cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--size", type=int, default=20_000, help="message size in bytes")
    args = parser.parse_args()
    size = len(make_message(args.size))
    print(f"{args.messages} messages of {size / 1024:.1f} kB, {args.clients} client processes")
    for kind, store, label in (
        ("stock", False, "aiosmtpd stock DATA, count only"),
        ("fast", False, "sink FastSMTP, count only"),
        ("fast", True, "sink FastSMTP, Maildir"),
    ):
        rate, cpu_us = run(kind, store, args.messages, args.clients, args.size)
        print(f"  {label:34s} {rate:8.0f} msgs/s   server CPU {cpu_us:6.0f} µs/msg")


if __name__ == "__main__":
    main()
