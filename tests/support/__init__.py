"""What several test files share: the example workspace, its issue, the test secret key.

Fixtures live in tests/conftest.py; bigger helpers in this package's modules (an SMTP
server, a local HTTP server, web pages, send and deliverability helpers).
"""

from __future__ import annotations

import email
import email.policy
import shutil
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from newsletter import config, content
from newsletter.config import Config
from newsletter.content import Issue

REPO = Path(__file__).resolve().parents[2]
TEST_SECRET_KEY = "test-secret-key-0123456789abcdef"
EXAMPLE_SLUG = "001-trams-ferries-benches"  # the example issue's folder, and its ledger key

# The ``database`` fixture (tests/conftest.py), so ``store`` too, on SQLite alone: for a
# store test that needs the CSV import until the import runs on PostgreSQL (issue 16),
# or that checks what only SQLite has (its files, its locks). Each use says which.
SQLITE_ONLY = pytest.mark.parametrize("database", ["sqlite"], indirect=True)

# Debian's chromium, which the tests drive through Playwright (tests marked `browser`).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def copy_example(root: Path, *, smtp: dict[str, Any] | None = None, extra: str = "") -> Path:
    """The repository's example workspace (config and issues) at ``root``, with an empty
    templates/; ``smtp`` replaces [smtp] keys and ``extra`` is appended to the config."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / config.CONFIG_NAME).read_text(encoding="utf-8")
    if smtp:
        head, sep, rest = text.partition("[smtp]\n")
        assert sep, "the example config has an [smtp] section"
        section, _, tail = rest.partition("\n[")
        lines = [line for line in section.splitlines() if line.split("=")[0].strip() not in smtp]
        lines += [f"{key} = {_toml(value)}" for key, value in smtp.items()]
        text = head + sep + "\n".join(lines) + "\n\n[" + tail
    if extra:
        text += "\n" + extra
    (root / config.CONFIG_NAME).write_text(text, encoding="utf-8")
    shutil.copytree(REPO / "issues", root / "issues")
    (root / "templates").mkdir()
    return root


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def load_config(root: Path, **env: str) -> Config:
    """The workspace's config with the test secret key and only the given environment."""
    return config.load(root, environ={config.ENV_SECRET_KEY: TEST_SECRET_KEY, **env})


def example_issue(cfg: Config) -> Issue:
    return content.read_issue(cfg.issues_dir / EXAMPLE_SLUG)


def parse_message(data: bytes) -> tuple[EmailMessage, str, str]:
    """The message as the stdlib parses it, and its decoded text and HTML parts."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    text_part, html_part = message.iter_parts()
    assert isinstance(text_part, EmailMessage) and isinstance(html_part, EmailMessage)
    # Line ends are CRLF on the wire, and the stdlib keeps them in the decoded text.
    text, markup = (
        str(part.get_content()).replace("\r\n", "\n") for part in (text_part, html_part)
    )
    return message, text, markup


def write_template(cfg: Config, name: str, text: str) -> Path:
    """A workspace template that overrides the theme's file of the same name."""
    path = cfg.templates_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
