"""Fixtures shared by every test file: a temporary workspace, its config, a CLI runner, a key.

Shared constants and helpers live in tests/support/ (the SMTP server fixtures are
re-exported here from tests/support/smtp_server.py); keep this file small.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import config
from newsletter.config import Config
from newsletter.db import Database
from newsletter.store import Store
from tests.support import CHROMIUM, TEST_SECRET_KEY, copy_example, load_config
from tests.support import postgres as pg
from tests.support.database import ENGINES, new_database
from tests.support.smtp_server import smtp_server, tls_files

__all__ = ["smtp_server", "tls_files"]


# marker -> (the program it needs, the Debian package that has it)
NEEDS = {"browser": (CHROMIUM, "chromium"), "spamassassin": ("spamassassin", "spamassassin")}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``browser`` or ``spamassassin`` is skipped, with the reason, where the
    program is missing; CI (CI=true) installs both with `make deps`, so there it fails."""
    for marker, (program, package) in NEEDS.items():
        if item.get_closest_marker(marker) is None or shutil.which(program) is not None:
            continue
        reason = f"{program} is not installed (`make deps` installs the Debian package {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have it: {reason}", pytrace=False)
        pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the ``browser`` fixture must say so with the marker."""
    unmarked = [
        item.nodeid
        for item in items
        if "browser" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("browser")
    ]
    if unmarked:
        raise pytest.UsageError(f"mark these @pytest.mark.browser: {', '.join(unmarked)}")


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
    return copy_example(tmp_path / "ws")


@pytest.fixture
def cfg(workspace: Path) -> Config:
    """The workspace's config, with a test secret key and nothing from the real environment."""
    return load_config(workspace)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner; invoke with ``["-C", str(workspace), ...]``. It has the test secret key
    and no database or DKIM key file from the real environment."""
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    monkeypatch.delenv(config.ENV_DB, raising=False)
    monkeypatch.delenv(config.ENV_DKIM_KEY_FILE, raising=False)
    return CliRunner()


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """One 2048-bit key for the whole run (making keys is the slow part)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg.PostgresServer]:
    """One temporary PostgreSQL cluster for the session (skipped where none is installed,
    with the reason; CI installs the package with `make deps`, so there it fails)."""
    reason = pg.missing_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have it: {reason}", pytrace=False)
        pytest.skip(reason)
    with pg.postgres_server() as server:
        yield server


@pytest.fixture(params=ENGINES)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A new, migrated database on each engine in turn: the store's contract tests take
    this fixture, so every one of them runs on SQLite and on PostgreSQL."""
    with new_database(request.param, tmp_path / "newsletter.db", request) as database:
        yield database


@pytest.fixture
def other_database(
    database: Database, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Database]:
    """A second new, migrated database on the engine of ``database``."""
    with new_database(database.engine, tmp_path / "other.db", request) as other:
        yield other


@pytest.fixture
def store(database: Database) -> Iterator[Store]:
    """The store on each engine in turn (see ``database``): a test that takes it is part
    of the store's contract, which SQLite and PostgreSQL must both keep."""
    with Store.open(database) as db:
        yield db
