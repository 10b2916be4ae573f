"""Helpers for the DKIM and check tests: the rendered example, keys, signature fields."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import config, render
from newsletter.config import Config
from newsletter.render import RenderedIssue
from tests.support import example_issue


def append_config(root: Path, text: str) -> None:
    path = root / config.CONFIG_NAME
    path.write_text(path.read_text(encoding="utf-8") + "\n" + text, encoding="utf-8")


def render_example(cfg: Config) -> RenderedIssue:
    return render.render_issue(example_issue(cfg), cfg)


def write_key(path: Path, key: rsa.RSAPrivateKey) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def signature_tags(data: bytes) -> dict[str, str]:
    """The DKIM-Signature header's tags, unfolded, from a signed message."""
    assert data.startswith(b"DKIM-Signature:")
    header = re.match(rb"DKIM-Signature:(.*?\r\n)(?![ \t])", data, re.S)
    assert header is not None
    value = re.sub(r"\s+", "", header.group(1).decode("ascii"))
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)
