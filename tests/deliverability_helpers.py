"""Helpers for the DKIM and check tests: an example workspace, keys, signature fields."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import config, content, render
from newsletter.config import Config
from newsletter.content import Issue
from newsletter.render import RenderedIssue

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-secret-key-0123456789abcdef"
EXAMPLE_SLUG = "001-trams-ferries-benches"


def copy_example(root: Path) -> Path:
    """The repository's example workspace (config and issues) at ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / config.CONFIG_NAME, root / config.CONFIG_NAME)
    shutil.copytree(REPO / "issues", root / "issues")
    (root / "templates").mkdir()
    return root


def load(root: Path, **env: str) -> Config:
    """The workspace's config with a test secret key and only the given environment."""
    return config.load(root, environ={config.ENV_SECRET_KEY: SECRET, **env})


def append_config(root: Path, text: str) -> None:
    path = root / config.CONFIG_NAME
    path.write_text(path.read_text(encoding="utf-8") + "\n" + text, encoding="utf-8")


def example_issue(cfg: Config) -> Issue:
    return content.read_issue(cfg.issues_dir / EXAMPLE_SLUG)


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


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """One 2048-bit key for the whole run (making keys is the slow part)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def example_ws(tmp_path: Path) -> Path:
    return copy_example(tmp_path / "ws")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner with a test secret key and no DKIM key file from the real environment."""
    monkeypatch.setenv(config.ENV_SECRET_KEY, SECRET)
    monkeypatch.delenv(config.ENV_DKIM_KEY_FILE, raising=False)
    monkeypatch.delenv(config.ENV_DB, raising=False)
    return CliRunner()
