"""Fixtures shared by every test file: a temporary workspace, its config, a CLI runner.

Bigger shared helpers live in their own modules (e.g. tests/smtp_server.py) and are
re-exported here; keep this file small.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import config
from newsletter.config import Config
from tests.smtp_server import smtp_server, tls_files

__all__ = ["smtp_server", "tls_files"]

REPO = Path(__file__).resolve().parents[1]
TEST_SECRET_KEY = "test-secret-key-0123456789abcdef"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/* from the current output (review the diff before committing)",
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the repository's example workspace, with an empty templates/ folder."""
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy2(REPO / config.CONFIG_NAME, root / config.CONFIG_NAME)
    shutil.copytree(REPO / "issues", root / "issues")
    (root / "templates").mkdir()
    return root


@pytest.fixture
def cfg(workspace: Path) -> Config:
    """The workspace's config, with a test secret key and nothing from the real environment."""
    return config.load(workspace, environ={config.ENV_SECRET_KEY: TEST_SECRET_KEY})


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner; invoke with ``["-C", str(workspace), ...]``."""
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    monkeypatch.delenv(config.ENV_DB, raising=False)
    return CliRunner()
