"""Inbound classification speed: prints msgs/s and the slowest messages, asserts nothing.

    PYTHONPATH=. python bench/inbox.py [N]

Builds an mbox of N (10,000) messages in a temporary folder: the corpus of tests/inbound
over and over (each copy with its own Message-ID), plus one of each pathological mail
(100,000 parts, 3,000 levels of nesting, 30,000 delivery-status blocks, 10 MB, the most
lines and nesting the limits let through, a 7 MB bounce with an attachment, text that
would make flufl.bounce's patterns backtrack). Then reads it back and times
``inbox.classify`` on every message, one at a time; then the whole pipeline,
``newsletter inbox import`` (classify, match against the ledger, apply: one transaction per
message) into a fresh database whose ledger knows the corpus's Message-IDs, and the same
import again (every message already processed).
"""

from __future__ import annotations

import base64
import mailbox
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from newsletter.config import Config, Secrets
from newsletter.inbox import DEFAULT_LIMITS, classify
from newsletter.mailboxes import import_path
from newsletter.models import DeliveryResult, DeliveryState
from newsletter.store import Store

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "inbound"


def head(extra: str = "") -> bytes:
    return f"From: x@example.com\nSubject: hostile\nMessage-ID: <h@example.com>\n{extra}".encode()


def pathological() -> dict[str, bytes]:
    limits = DEFAULT_LIMITS
    depth = limits.max_depth - 1
    nest = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (n, n) for n in range(depth)
    )
    room = limits.max_lines - 200
    attachment = base64.encodebytes(bytes(range(256)) * 20_000)  # 6.9 MB, 90,000 lines
    bounce = (CORPUS / "postfix-hard-user-unknown.eml").read_bytes()
    boundary = b"--4Zk2xL0b8Pz9vYs.1772442847/mail.example.org--"
    attached = bounce.replace(
        boundary,
        b"--4Zk2xL0b8Pz9vYs.1772442847/mail.example.org\nContent-Type: application/pdf\n"
        b"Content-Transfer-Encoding: base64\n\n" + attachment + b"\n" + boundary,
    )
    return {
        "100,000 parts": head('Content-Type: multipart/mixed; boundary="b"\n\n')
        + b"--b\n\nx\n" * 100_000
        + b"--b--\n",
        "3,000 nested message/rfc822": head()
        + b"Content-Type: message/rfc822\n\nFrom: x@example.com\n" * 3000
        + b"\nhello\n",
        "30,000 delivery-status blocks": head(
            'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        )
        + b"--b\nContent-Type: message/delivery-status\n\n"
        + b"Final-Recipient: rfc822; a@example.com\nAction: failed\n\n" * 30_000
        + b"--b--\n",
        "10 MB in one line": head("\n") + b"x" * (limits.max_bytes - 100),
        f"{room:,} lines {depth} deep": head() + nest + b"\n" + b"x\n" * room,
        f"{limits.max_parts - 2} parts of text": head(
            'Content-Type: multipart/mixed; boundary="b"\n\n'
        )
        + b"--b\nContent-Type: text/plain\n\nfailed addresses follow:\n<a@example.com>\n"
        * (limits.max_parts - 2)
        + b"--b--\n",
        "7 MB bounce with an attachment": attached,
        "backtracking bait for the detectors": head("Content-Type: text/plain\n\n")
        + b"failed addresses follow:\n"
        + (b"x" * 100_000 + b"\n") * 90
        + b"message text follows:\n",
    }


def build(path: Path, count: int) -> list[str]:
    """Write the mbox; return each message's label, in order."""
    names = sorted(p.name for p in CORPUS.glob("*.eml"))
    corpus = {name: (CORPUS / name).read_bytes() for name in names}
    labels: list[str] = []
    box = mailbox.mbox(path)
    extra = pathological()
    for label, data in extra.items():
        box.add(data)
        labels.append(label)
    for n in range(count - len(extra)):
        name = names[n % len(names)]
        data = re.sub(
            rb"(?im)^(Message-ID:\s*<)",
            b"\\1bench" + str(n).encode() + b".",
            corpus[name],
            count=1,
        )
        box.add(data)
        labels.append(name)
    box.flush()
    box.close()
    return labels


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inbound.mbox"
        start = time.perf_counter()
        labels = build(path, count)
        print(
            f"built {len(labels):,} messages ({path.stat().st_size / 1e6:.1f} MB mbox) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        box = mailbox.mbox(path, create=False)
        timings: list[tuple[float, str, str]] = []
        kinds: Counter[str] = Counter()
        total = 0.0
        for key, label in zip(box.iterkeys(), labels, strict=True):
            data = box.get_bytes(key)
            start = time.perf_counter()
            inbound = classify(data)
            elapsed = time.perf_counter() - start
            total += elapsed
            kinds[inbound.kind] += 1
            timings.append((elapsed, label, f"{inbound.kind}: {inbound.reason}"))
        box.close()
        report(timings, kinds, total)
        pipeline(path, Path(tmp))


def report(timings: list[tuple[float, str, str]], kinds: Counter[str], total: float) -> None:
    ordinary = [t for t, label, _ in timings if label.endswith(".eml")]
    print(
        f"classify: {len(timings):,} messages in {total:.2f} s = {len(timings) / total:,.0f} msgs/s"
    )
    print(
        f"  corpus copies only: {len(ordinary) / sum(ordinary):,.0f} msgs/s, "
        f"median {statistics.median(ordinary) * 1000:.2f} ms, "
        f"p99 {sorted(ordinary)[int(len(ordinary) * 0.99)] * 1000:.2f} ms"
    )
    print("  kinds: " + ", ".join(f"{kind} {n:,}" for kind, n in kinds.most_common()))
    print("pathological messages:")
    for elapsed, label, what in timings:
        if not label.endswith(".eml"):
            print(f"  {elapsed * 1000:8.1f} ms  {label:<40} {what[:70]}")
    print("slowest single messages:")
    for elapsed, label, what in sorted(timings, reverse=True)[:5]:
        print(f"  {elapsed * 1000:8.1f} ms  {label:<40} {what[:70]}")


def ledger(store: Store) -> int:
    """Subscribers and a sent issue for every recipient the corpus reports, with the
    Message-ID it quotes: the corpus's reports then refer to messages we sent."""
    sent: dict[str, str] = {}
    for path in sorted(CORPUS.glob("*.eml")):
        for item in classify(path.read_bytes()).feedback:
            if item.recipient and item.message_ids and item.recipient.lower() not in sent:
                sent[item.recipient.lower()] = item.message_ids[0]
    for address in sent:
        store.add_subscriber(address)
    store.snapshot_recipients("001-bench")
    with store.acquire_send_lock("001-bench"):
        claimed = store.claim_batch("001-bench", "bench", len(sent))
        store.record_results(
            DeliveryResult(
                "001-bench", c.subscriber.id, DeliveryState.SENT, "250", sent[c.subscriber.email]
            )
            for c in claimed
        )
    return len(sent)


def pipeline(path: Path, folder: Path) -> None:
    cfg = Config(root=folder, secrets=Secrets(secret_key="bench-secret-key-0123456789abcdef"))
    with Store.open(folder / "bench.db") as store:
        known = ledger(store)
        for run in ("inbox import", "  again"):
            start = time.perf_counter()
            summary = import_path(store, cfg, path)
            elapsed = time.perf_counter() - start
            outcomes = ", ".join(f"{n:,} {o}" for o, n in summary.outcomes.most_common())
            print(
                f"{run}: {summary.messages:,} messages in {elapsed:.2f} s = "
                f"{summary.messages / elapsed:,.0f} msgs/s ({outcomes})"
            )
            if summary.acted:
                acted = ", ".join(f"{n:,} {k}" for k, n in summary.acted.most_common())
                print(f"  acted on ({known} subscribers in the ledger): {acted}")


if __name__ == "__main__":
    main()
