"""Per-recipient cost of DKIM signing on the example issue: prints msgs/s, asserts nothing.

    PYTHONPATH=. python bench/signing.py [N]

Compares personalise alone, personalise + newsletter.dkim's signer, and personalise +
dkimpy.sign() (the reference the signer replaces), all single-threaded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import config, content, message, render
from newsletter.dkim import DkimSigner, verify
from newsletter.message import Recipient

ROOT = Path(__file__).resolve().parents[1]


def rate(label: str, count: int, work: Callable[[int], bytes]) -> float:
    start = time.perf_counter()
    size = 0
    for index in range(count):
        size = len(work(index))
    elapsed = time.perf_counter() - start
    per_second = count / elapsed
    print(
        f"{label:<44} {per_second:>8.0f} msgs/s  "
        f"{elapsed / count * 1000:6.2f} ms/msg  ({size / 1024:.0f} KB)"
    )
    return per_second


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    cfg = config.load(ROOT, environ={config.ENV_SECRET_KEY: "bench-secret-0123456789abcdef"})
    issue = content.read_issue(content.find_issue(cfg.issues_dir, "1"))
    start = time.perf_counter()
    rendered = render.render_issue(issue, cfg)
    print(f"render (once per issue)                      {time.perf_counter() - start:8.3f} s")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = DkimSigner("bench", "example.org", key)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    start = time.perf_counter()
    plain = message.prepare(rendered, cfg)
    signed = message.prepare(rendered, cfg, sign=signer)
    print(f"prepare (once per issue, x2)                 {time.perf_counter() - start:8.3f} s")
    readers = [
        Recipient(email=f"reader{n}@example.org", name=f"Reader {n}", subscriber_id=n)
        for n in range(count)
    ]
    headers = [
        h.encode()
        for h in (
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "list-id",
            "list-unsubscribe",
            "list-unsubscribe-post",
            "from",
        )
    ]

    def dkimpy_sign(index: int) -> bytes:
        data = plain.personalise(readers[index]).data
        return (
            dkimpy.sign(
                data,
                b"bench",
                b"example.org",
                pem,
                include_headers=headers,
                canonicalize=(b"relaxed", b"relaxed"),
            )
            + data
        )

    print(f"{count} recipients, 2048-bit RSA, single thread:")
    rate("personalise (no signing)", count, lambda i: plain.personalise(readers[i]).data)
    rate(
        "personalise + sign (newsletter.dkim)", count, lambda i: signed.personalise(readers[i]).data
    )
    rate("personalise + dkimpy.sign (reference)", max(count // 5, 20), dkimpy_sign)
    sample = signed.personalise(readers[0]).data
    assert verify(sample, signer.record_value), "signature did not verify"
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
