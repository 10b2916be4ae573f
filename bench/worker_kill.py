"""kill -9 trials of `newsletter worker` in mid-send: nobody twice beyond the reported
uncertain, nobody skipped.

    PYTHONPATH=. python bench/worker_kill.py [--trials 10] [--subscribers 1000]

Each trial: a fresh workspace and database with N generated subscribers (example.com/
.org/.net), the example issue scheduled a second ago, an in-process counting SMTP sink on
127.0.0.1. The worker runs as a real process; after a random number of messages have
arrived it gets SIGKILL. A second worker (`worker --once`) then resumes from the ledger.
Per trial it prints the copies each address got, the rows the restart found uncertain,
and checks: nobody got two copies (uncertain rows are never re-sent by the worker),
everyone got a copy or is reported uncertain, every `sent` row was received.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from newsletter.models import DeliveryState, Status  # noqa: E402
from newsletter.sink import SinkMessage, start_sink  # noqa: E402
from newsletter.store import Store  # noqa: E402

SECRET = "bench-secret-key-0123456789abcdef"
SLUG = "001-trams-ferries-benches"


def workspace(root: Path, port: int) -> Path:
    root.mkdir(parents=True)
    text = (REPO / "newsletter.toml").read_text(encoding="utf-8")
    text = text.replace("port = 8025", f"port = {port}")
    text += "\n[delivery]\nconnections = 4\nretries = 0\n\n[worker]\npoll_seconds = 0.2\n"
    (root / "newsletter.toml").write_text(text, encoding="utf-8")
    shutil.copytree(REPO / "issues", root / "issues")
    return root


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    out["PYTHONPATH"] = str(REPO)
    out["NEWSLETTER_SECRET_KEY"] = SECRET
    return out


def trial(number: int, subscribers: int, rng: random.Random) -> dict[str, int]:
    got: Counter[str] = Counter()
    lock = threading.Lock()

    def count(message: SinkMessage) -> None:
        with lock:
            got.update(message.recipients)

    with tempfile.TemporaryDirectory() as tmp, start_sink(on_message=count) as sink:
        ws = workspace(Path(tmp) / "ws", sink.port)
        db = Path(tmp) / "news.db"
        csv = Path(tmp) / "list.csv"
        domains = ("example.com", "example.org", "example.net")
        csv.write_text(
            "email,name\n"
            + "".join(f"r{i}@{domains[i % 3]},Reader {i}\n" for i in range(subscribers)),
            encoding="utf-8",
        )
        with Store.open(db) as store:
            store.import_csv(csv)
            active = {s.email for s in store.list_subscribers(Status.ACTIVE)}
            store.set_schedule(SLUG, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        command = [sys.executable, "-m", "newsletter", "-C", str(ws), "--db", str(db), "worker"]
        kill_at = rng.randint(10, subscribers - 100)
        proc = subprocess.Popen(
            command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            if not sink.wait_for(kill_at, timeout=120):
                raise SystemExit(f"trial {number}: the worker never reached {kill_at} messages")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        at_kill = sink.count
        with Store.open(db) as store:
            left = store.ledger_counts(SLUG)
        mid_send = left[DeliveryState.QUEUED] + left[DeliveryState.SENDING] > 0
        started = time.monotonic()
        again = subprocess.run([*command, "--once"], env=env(), capture_output=True, timeout=300)
        resume = time.monotonic() - started
        if again.returncode != 0:
            raise SystemExit(f"trial {number}: the restart failed: {again.stderr.decode()[-500:]}")
        with Store.open(db) as store:
            counts = store.ledger_counts(SLUG)
            by_state: dict[DeliveryState, set[str]] = {}
            for subscriber in store.list_subscribers():
                entry = store.ledger_entry(SLUG, subscriber.id)
                if entry is not None:
                    by_state.setdefault(entry.state, set()).add(subscriber.email)
        with lock:
            copies = dict(got)
    uncertain = by_state.get(DeliveryState.UNCERTAIN, set())
    sent = by_state.get(DeliveryState.SENT, set())
    twice = {e for e, n in copies.items() if n > 1}
    skipped = {e for e in active if copies.get(e, 0) == 0 and e not in uncertain}
    sent_not_received = {e for e in sent if copies.get(e, 0) == 0}
    result = {
        "killed_after": at_kill,
        "mid_send": int(mid_send),
        "uncertain": len(uncertain),
        "uncertain_received": sum(1 for e in uncertain if copies.get(e, 0)),
        "twice": len(twice),
        "twice_not_uncertain": len(twice - uncertain),
        "skipped": len(skipped),
        "sent_not_received": len(sent_not_received),
        "sent": counts[DeliveryState.SENT],
        "resume_s": round(resume, 2),
    }
    print(f"trial {number:>2}: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = [trial(n, args.subscribers, rng) for n in range(1, args.trials + 1)]
    total = {key: sum(r[key] for r in results) for key in results[0] if key != "resume_s"}
    print(
        f"{args.trials} trials, {args.subscribers} subscribers each: "
        f"{total['mid_send']} killed mid-send; uncertain {total['uncertain']} "
        f"({total['uncertain_received']} of them received), twice {total['twice']}, "
        f"skipped {total['skipped']}, sent-but-not-received {total['sent_not_received']}"
    )
    bad = total["twice_not_uncertain"] + total["skipped"] + total["sent_not_received"]
    if bad or total["twice"]:
        raise SystemExit("FAILED: a copy was duplicated or lost")
    print("OK: nobody twice, nobody skipped; the uncertain rows are reported, not re-sent")


if __name__ == "__main__":
    main()
