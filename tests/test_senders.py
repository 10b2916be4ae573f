"""Several `newsletter send` processes on one issue in PostgreSQL, against one SMTP server.

Real processes, a real PostgreSQL server (tests/support/postgres.py) and a real aiosmtpd
server: three senders share the issue and everyone gets one copy; then trials kill one of
the three with SIGKILL after a random number of messages have arrived, and the two left
finish: nobody gets two copies, nobody is skipped, and every reader the dead one may have
sent to is reported uncertain. Nothing waits on time: the server's message count, the
senders table and the processes' exits say when to act.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from newsletter import config
from newsletter.db import Database
from newsletter.models import DeliveryState
from newsletter.store import Store
from tests.support import EXAMPLE_SLUG, REPO, TEST_SECRET_KEY, copy_example
from tests.support.delivery import copies, nonzero, states
from tests.support.postgres import PostgresServer
from tests.support.smtp_server import Received, ServerFactory, SmtpTestServer

pytestmark = pytest.mark.server

SENDERS = 3
LIST = 5_000  # the cooperation run
KILL_LIST = 1_000  # each kill trial (smaller, so that ten trials take about a minute)
TRIALS = 10
LEASE = 2.0  # seconds: a dead sender's rows are taken as uncertain this soon
CONNECTIONS = 4
BATCH = max(8, CONNECTIONS * 2)  # rows per claim with these settings (delivery._batch_size)


def fill(database: Database, count: int) -> set[str]:
    """``count`` generated readers over example.com/.org/.net; their addresses."""
    domains = ("example.com", "example.org", "example.net")
    addresses = {f"reader{i:05d}@{domains[i % 3]}" for i in range(count)}
    with Store.open(database) as store:
        for address in sorted(addresses):
            store.add_subscriber(address, "Reader")
    return addresses


@pytest.fixture(scope="module")
def lists(postgres_server: PostgresServer) -> Iterator[dict[int, tuple[Database, set[str]]]]:
    """A filled database per list size, filled once: each test sends from a copy."""
    filled = {}
    for size in (LIST, KILL_LIST):
        database = postgres_server.new_database()
        filled[size] = (database, fill(database, size))
    yield filled
    for database, _ in filled.values():
        postgres_server.drop_database(database)


class Run:
    """Three `newsletter send 1 --yes` processes on a copy of a list, one SMTP server."""

    def __init__(
        self,
        tmp_path: Path,
        server: SmtpTestServer,
        postgres: PostgresServer,
        filled: tuple[Database, set[str]],
    ) -> None:
        self.server = server
        self.database = postgres.clone(filled[0])
        self.readers = filled[1]
        self.ws = copy_example(
            tmp_path / "ws",
            smtp={"port": server.port, "timeout": 30.0},
            extra=(
                f"[delivery]\nconnections = {CONNECTIONS}\nretries = 0\nlease_seconds = {LEASE}\n"
            ),
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
            "PYTHONPATH": str(REPO),
            config.ENV_SECRET_KEY: TEST_SECRET_KEY,
            config.ENV_DB: self.database.url,
        }
        self.procs: list[subprocess.Popen[str]] = []
        self.gate = threading.Event()
        self.kill_at: tuple[int, int] | None = None  # (message count, sender index)
        server.handler.on_message = self.on_message

    def on_message(self, message: Received) -> None:
        """On the server's thread: hold the first message until every sender has
        registered (so that all three share the work), and kill one when told."""
        count = len(self.server.messages)
        if count == 1:
            assert self.gate.wait(60), "the senders never all registered"
        if self.kill_at is not None and count == self.kill_at[0]:
            os.kill(self.procs[self.kill_at[1]].pid, signal.SIGKILL)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "newsletter", "-C", str(self.ws), *args]

    def send(self) -> list[tuple[int, dict[str, object] | None]]:
        """Start the senders, open the gate once all have registered, wait for their exits;
        each one's exit code and JSON report (None when it was killed)."""
        self.procs = [
            subprocess.Popen(
                self.command("send", "1", "--yes", "--json"),
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(SENDERS)
        ]
        try:
            with Store.open(self.database) as store:
                while len(store.senders(EXAMPLE_SLUG)) < SENDERS:
                    for proc in self.procs:
                        if proc.poll() is not None:
                            _, err = proc.communicate()
                            raise AssertionError(f"a sender exited before the others: {err}")
                    threading.Event().wait(0.02)  # look again at the senders table
            self.gate.set()
            outputs = [proc.communicate(timeout=240) for proc in self.procs]
        finally:
            self.gate.set()
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        out = []
        for proc, (stdout, stderr) in zip(self.procs, outputs, strict=True):
            if proc.returncode == -signal.SIGKILL:
                out.append((proc.returncode, None))
                continue
            assert proc.returncode == 0, stderr
            out.append((proc.returncode, json.loads(stdout)))
        return out

    def status(self) -> dict[str, object]:
        done = subprocess.run(
            self.command("status", "1", "--json"),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


@pytest.fixture
def make_run(
    tmp_path: Path,
    smtp_server: ServerFactory,
    postgres_server: PostgresServer,
    lists: dict[int, tuple[Database, set[str]]],
) -> Iterator[Callable[[int, str], Run]]:
    runs: list[Run] = []

    def make(size: int, name: str) -> Run:
        run = Run(tmp_path / name, smtp_server(), postgres_server, lists[size])
        runs.append(run)
        return run

    yield make
    for run in runs:
        postgres_server.drop_database(run.database)


def test_three_senders_share_an_issue_of_5000_and_each_reader_gets_one_copy(
    make_run: Callable[[int, str], Run],
) -> None:
    run = make_run(LIST, "all")
    reports = run.send()

    got = copies(run.server.messages)
    assert len(got) == LIST and set(got) == run.readers
    assert set(got.values()) == {1}
    sent = [report["sent"] for _, report in reports if report is not None]
    assert len(sent) == SENDERS and all(n > 0 for n in sent), sent  # all three took part
    assert sum(sent) == LIST
    with Store.open(run.database) as store:
        assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {"sent": LIST}
        runs = store.senders(EXAMPLE_SLUG, finished=True)
    assert sorted(r.sent for r in runs) == sorted(sent)
    assert {r.state for r in runs} == {"finished"}
    assert {r.pid for r in runs} == {proc.pid for proc in run.procs}
    status = run.status()
    assert status["senders"] == [] and status["counts"]["sent"] == LIST  # type: ignore[index]


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_of_one_sender_of_three_nobody_twice_nobody_skipped(
    make_run: Callable[[int, str], Run], trial: int
) -> None:
    rng = random.Random(f"senders-{trial}")  # the same moments on every run of the suite
    run = make_run(KILL_LIST, f"trial{trial}")
    at, victim = rng.randint(2, KILL_LIST * 9 // 10), rng.randrange(SENDERS)
    run.kill_at = (at, victim)
    reports = run.send()

    assert [code for code, _ in reports].count(-signal.SIGKILL) == 1
    assert reports[victim][1] is None, f"sender {victim} was to be killed at message {at}"
    with Store.open(run.database) as store:
        ledger = states(store)
        dead = [r for r in store.senders(EXAMPLE_SLUG, finished=True) if r.state == "expired"]
        problems = store.ledger_problems(EXAMPLE_SLUG)
    uncertain = {email for email, state in ledger.items() if state == DeliveryState.UNCERTAIN}
    sent = {email for email, state in ledger.items() if state == DeliveryState.SENT}
    got = copies(run.server.messages)

    # Nobody skipped: everyone was sent to or is reported uncertain.
    assert set(ledger) == run.readers and sent | uncertain == run.readers
    assert not sent & uncertain
    # Nobody twice: uncertain rows are never re-sent unless asked, so at most one copy each.
    assert set(got) <= run.readers and max(got.values()) == 1
    assert all(got[email] == 1 for email in sent)
    # Only the dead sender's unrecorded rows are uncertain, a few batches at most, and the
    # two that finished reported every one of them.
    [killed] = dead
    assert killed.pid == run.procs[victim].pid
    assert all(f"(run {killed.run_id})" in p.last_reply for p in problems)
    assert len(uncertain) <= 3 * BATCH
    found = [report["found_uncertain"] for _, report in reports if report is not None]
    assert sum(found) == len(uncertain)  # type: ignore[arg-type]
    assert run.status()["senders"] == []
