"""A real PostgreSQL server the tests start themselves: Debian's package, a temporary cluster.

One cluster per test session (``initdb`` + ``pg_ctl``, on 127.0.0.1 and a free port,
socket in its own folder); each test gets a fresh database cloned from a template the
store's migrations already ran on, so a test costs one ``CREATE DATABASE``.

``initdb`` refuses to run as root: as root the cluster belongs to the ``postgres``
user (``runuser``). fsync is off: the tests check behaviour, not durability after a
power loss; ``bench/scale.py`` runs a cluster with the defaults.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from newsletter.db import Database, connect
from newsletter.migrations import migrate_database

PACKAGE = "postgresql"
SUPERUSER = "newsletter"
TEMPLATE = "newsletter_template"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing_reason() -> str | None:
    """Why no test server can start here, or None."""
    if bin_dir() is None:
        return f"PostgreSQL is not installed (`make deps` installs the Debian package {PACKAGE})"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running temporary cluster; :meth:`new_database` hands out empty migrated databases."""

    root: Path
    port: int
    bin: Path
    as_postgres: bool
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def new_database(self, *, migrated: bool = True) -> Database:
        """A new database of its own: migrated (cloned from the template) or empty."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            if migrated:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')
            else:
                conn.execute(f'CREATE DATABASE "{name}"')
        if migrated:
            # A clone has the template's suppression key; a migrated database has its own.
            with psycopg.connect(self.url(name), autocommit=True) as conn:
                conn.execute("UPDATE suppression_key SET key = %s", (secrets.token_bytes(32),))
        return Database.parse(self.url(name))

    def clone(self, database: Database) -> Database:
        """A new database with ``database``'s schema and rows (nobody may be connected to
        it meanwhile): a filled list set up once, then one copy per trial."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        source = database.url.rsplit("/", 1)[1]
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        return Database.parse(self.url(name))

    def drop_database(self, database: Database) -> None:
        name = database.url.rsplit("/", 1)[1]
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"
            )
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(*, fsync: bool = False) -> Iterator[PostgresServer]:
    """Start a temporary cluster, with a migrated template database; stop and delete it."""
    reason = missing_reason()
    if reason is not None:
        raise RuntimeError(reason)
    binaries = bin_dir()
    assert binaries is not None
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="newsletter-pg-"))
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(root, _free_port(), binaries, as_postgres)
    try:
        data, sockets = root / "data", root / "sockets"
        server._run(
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        server._run("mkdir", str(sockets))
        settings = [
            f"-p {server.port}",
            "-c listen_addresses=127.0.0.1",
            f"-k {sockets}",
            "-c max_connections=200",
        ]
        if not fsync:
            settings += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        server._run(
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-o",
            " ".join(settings),
            "-w",
            "start",
        )
        with server.admin() as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        template = connect(Database.parse(server.url(TEMPLATE)))
        try:
            migrate_database(template)
        finally:
            template.close()
        yield server
    finally:
        server.stop()
