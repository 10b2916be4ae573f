"""Per-domain pacing measured: one throttled domain among many, through a local sink.

    PYTHONPATH=. python bench/pacing.py [--subscribers 5000] [--throttled 1000] [--rate 20]

The example issue goes to N generated subscribers, of whom M are at gmail.example.com
(standing in for gmail.com; mail goes only to example domains and loopback), the rest
spread over example.org/.com/.net, interleaved by id. The config says
[delivery.domains] "gmail.example.com" = RATE. The sink (in this process, on 127.0.0.1)
notes when each message arrives. Printed: the throttled domain's mean rate and its
busiest 1-second window, and how fast and how soon the other domains were done.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from pathlib import Path

from newsletter import config, content, delivery
from newsletter.config import SmtpSettings
from newsletter.db import Database
from newsletter.render import render_issue
from newsletter.sink import SinkMessage, start_sink
from newsletter.store import Store

REPO = Path(__file__).resolve().parents[1]
THROTTLED = "gmail.example.com"


def busiest_second(times: list[float]) -> int:
    best, start = 0, 0
    for end, moment in enumerate(times):
        while times[start] <= moment - 1.0:  # the second before this one, half-open
            start += 1
        best = max(best, end - start + 1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=5000)
    parser.add_argument("--throttled", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()

    arrived: list[tuple[float, str]] = []
    lock = threading.Lock()

    def note(message: SinkMessage) -> None:
        with lock:
            arrived.append((time.monotonic(), message.recipients[0]))

    every = max(1, args.subscribers // max(args.throttled, 1))
    with tempfile.TemporaryDirectory() as tmp, start_sink(on_message=note) as sink:
        cfg = config.load(REPO, environ={config.ENV_SECRET_KEY: "bench-secret-key-0123456789ab"})
        cfg = dataclasses.replace(
            cfg,
            smtp=SmtpSettings(host="127.0.0.1", port=sink.port),
            delivery=dataclasses.replace(
                cfg.delivery,
                connections=args.connections,
                domains=((THROTTLED, args.rate),),
            ),
            db_override=Database("sqlite", Path(tmp) / "bench.db"),
        )
        csv = Path(tmp) / "list.csv"
        with csv.open("w", encoding="utf-8") as out:
            out.write("email,name\n")
            throttled = 0
            for i in range(args.subscribers):
                if i % every == 0 and throttled < args.throttled:
                    out.write(f"reader{i}@{THROTTLED},Reader {i}\n")
                    throttled += 1
                else:
                    out.write(f"reader{i}@example.{('org', 'com', 'net')[i % 3]},Reader {i}\n")
        issue = content.read_issue(content.find_issue(cfg.issues_dir, "1"))
        with Store.open(cfg.database) as store:
            store.import_csv(csv)
            prepared = delivery.prepare_send(cfg, render_issue(issue, cfg), store)
            started = time.monotonic()
            report = prepared.run()
            elapsed = time.monotonic() - started
    gmail = [t for t, rcpt in arrived if rcpt.endswith("@" + THROTTLED)]
    rest = [t for t, rcpt in arrived if not rcpt.endswith("@" + THROTTLED)]
    print(
        f"{report.sent:,} sent to {args.subscribers:,} subscribers in {elapsed:.1f} s "
        f"({args.connections} connections); {THROTTLED} limited to {args.rate:g} msgs/s"
    )
    if len(gmail) > 1:
        span = gmail[-1] - gmail[0]
        print(
            f"  {THROTTLED}: {len(gmail):,} messages in {span:.1f} s = "
            f"{(len(gmail) - 1) / span:.2f} msgs/s mean, busiest 1 s window "
            f"{busiest_second(gmail)} messages"
        )
    if len(rest) > 1:
        span = rest[-1] - rest[0]
        before = sum(1 for t in gmail if t <= rest[-1])
        print(
            f"  other domains: {len(rest):,} messages in {span:.2f} s = "
            f"{len(rest) / span:,.0f} msgs/s; all done {rest[-1] - started:.2f} s after the start, "
            f"when {before} of the {len(gmail):,} throttled ones had gone"
        )


if __name__ == "__main__":
    main()
