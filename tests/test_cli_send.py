"""`newsletter send` and `status`: through click's CliRunner, and as real processes (kill -9)."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import cli, config
from newsletter.cli import main
from newsletter.models import DeliveryResult, DeliveryState
from newsletter.store import Store
from tests.support import EXAMPLE_SLUG, REPO, TEST_SECRET_KEY, copy_example
from tests.support.deliverability import write_key
from tests.support.delivery import (
    EXAMPLE_ACTIVE,
    copies,
    fill,
    message_id,
    nonzero,
    states,
    with_state,
)
from tests.support.smtp_server import Faults, Received, ServerFactory, SmtpTestServer

pytestmark = pytest.mark.server  # every test sends to a real SMTP server

S = DeliveryState


@dataclass
class Site:
    """A workspace wired to a test server, with a filled subscriber list."""

    server: SmtpTestServer
    ws: Path
    db: Path
    active: set[str]

    def run(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(
            main, ["-C", str(self.ws), "--db", str(self.db), *args], input=input
        )

    def store(self) -> Store:
        return Store.open(self.db)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "newsletter", "-C", str(self.ws), "--db", str(self.db), *args]


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    for name in (config.ENV_SMTP_PASSWORD, config.ENV_DB, config.ENV_DKIM_KEY_FILE):
        monkeypatch.delenv(name, raising=False)


def make_site(tmp_path: Path, server: SmtpTestServer, generated: int = 0, **smtp: object) -> Site:
    ws = copy_example(
        tmp_path / "ws",
        smtp={"port": server.port, "timeout": 5.0, **smtp},
        extra="[delivery]\nretry_backoff = 0.01\nretries = 1\n",
    )
    db = tmp_path / "state" / "newsletter.db"
    with Store.open(db) as store:
        active = fill(store, tmp_path, generated)
    return Site(server, ws, db, active)


@pytest.fixture
def site(tmp_path: Path, smtp_server: ServerFactory) -> Site:
    return make_site(tmp_path, smtp_server())


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


# --- the happy path and its questions ------------------------------------------------------


def test_send_yes_sends_everyone_once_and_a_second_run_nothing(site: Site) -> None:
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert f"Recipients: {EXAMPLE_ACTIVE}" in result.stdout
    assert f"Sent {EXAMPLE_ACTIVE}, failed 0, deferred 0, uncertain 0" in result.stdout
    got = copies(site.server.messages)
    assert set(got) == site.active and set(got.values()) == {1}

    again = site.run("send", "1", "--yes")
    assert again.exit_code == 0, again.output
    assert "Nothing to send." in again.stdout
    assert len(site.server.messages) == EXAMPLE_ACTIVE

    status = site.run("status", "1")
    assert status.exit_code == 0
    assert f"{EXAMPLE_ACTIVE} recipients" in status.stdout
    assert any(line.split() == ["sent", str(EXAMPLE_ACTIVE)] for line in status.stdout.splitlines())


@pytest.mark.parametrize("answer", [None, "", "n\n"])
def test_without_yes_it_asks_and_sends_nothing_unless_told(
    site: Site, answer: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "stdin_is_terminal", lambda: True)
    result = site.run("send", "1", input=answer)
    assert "Send now? [y/N]" in result.stdout
    assert "Not sent." in result.stdout
    assert result.exit_code == 1
    assert site.server.messages == []
    with site.store() as store:
        assert store.issue_snapshot(EXAMPLE_SLUG) is None


@pytest.mark.parametrize("answer", ["y\n", None])
def test_without_a_terminal_it_never_sends_even_when_y_is_piped(
    site: Site, answer: str | None
) -> None:
    result = site.run("send", "1", input=answer)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: not sending: there is no terminal to confirm with (input is piped or absent); "
        "run it in a terminal, or add --yes to send without asking"
    ]
    assert site.server.messages == []
    with site.store() as store:
        assert store.issue_snapshot(EXAMPLE_SLUG) is None


def test_yes_at_the_prompt_sends(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "stdin_is_terminal", lambda: True)
    result = site.run("send", "1", input="y\n")
    assert result.exit_code == 0, result.output
    assert len(site.server.messages) == EXAMPLE_ACTIVE


def test_dry_run_builds_every_message_and_records_nothing(site: Site) -> None:
    result = site.run("send", "1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"built {EXAMPLE_ACTIVE} messages" in result.stdout
    assert "Nothing was sent or recorded." in result.stdout
    assert site.server.messages == []
    with site.store() as store:
        assert store.issue_snapshot(EXAMPLE_SLUG) is None
        assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {}


def test_the_size_shown_before_sending_is_the_size_of_a_signed_copy(
    site: Site, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DKIM on, the plan's size includes the DKIM-Signature header (~0.6 KB)."""
    key = write_key(tmp_path / "keys" / "nl.key", rsa_key)
    monkeypatch.setenv(config.ENV_DKIM_KEY_FILE, str(key))
    with (site.ws / config.CONFIG_NAME).open("a", encoding="utf-8") as toml:
        toml.write('\n[dkim]\nselector = "nl2026"\ndomain = "example.org"\n')
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 0, result.output
    match = re.search(r"^Size: +([\d.]+) KB per message$", result.stdout, re.M)
    assert match is not None, result.stdout
    shown = float(match.group(1))
    assert len(site.server.messages) == EXAMPLE_ACTIVE
    for message in site.server.messages:
        assert message.data.startswith(b"DKIM-Signature:")
        # Shown to 0.1 KB; copies differ by the reader's own values (a few dozen bytes).
        assert abs(len(message.data) / 1024 - shown) <= 0.15, (len(message.data), shown)


def test_test_copies_say_test_and_leave_the_ledger_empty(site: Site) -> None:
    result = site.run("send", "1", "--test", "proof@example.org", "--test", "editor@example.net")
    assert result.exit_code == 0, result.output
    assert [m.recipients for m in site.server.messages] == [
        ("proof@example.org",),
        ("editor@example.net",),
    ]
    for message in site.server.messages:
        parsed = email.message_from_bytes(message.data, policy=email.policy.default)
        assert str(parsed["Subject"]).startswith("[TEST] ")
    with site.store() as store:
        assert store.issue_snapshot(EXAMPLE_SLUG) is None
        assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {}


def test_limit_sends_only_that_many(site: Site) -> None:
    result = site.run("send", "1", "--yes", "--limit", "4")
    assert result.exit_code == 0, result.output
    assert len(site.server.messages) == 4
    with site.store() as store:
        assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {
            "sent": 4,
            "queued": EXAMPLE_ACTIVE - 4,
        }
    rest = site.run("send", "1", "--yes")
    assert rest.exit_code == 0, rest.output
    got = copies(site.server.messages)
    assert set(got) == site.active and set(got.values()) == {1}


def test_rate_and_connections_still_send_everyone(site: Site) -> None:
    result = site.run("send", "1", "--yes", "--rate", "1000", "--connections", "2")
    assert result.exit_code == 0, result.output
    assert set(copies(site.server.messages)) == site.active


# --- failures and how they are shown -----------------------------------------------------


def test_a_failed_recipient_exits_1_and_status_lists_each_problem_with_the_reply(
    site: Site,
) -> None:
    site.server.handler.faults = Faults(
        rcpt={"gus@example.org": "550 5.1.1 <gus@example.org>: no such user"},
        drop_after_data=1,
    )
    result = site.run("send", "1", "--yes", "--connections", "1")
    assert result.exit_code == 1, result.output
    assert "failed    gus@example.org  550 5.1.1 <gus@example.org>: no such user" in result.stdout
    lost = site.server.messages[0].recipients[0]
    assert f"uncertain {lost}  connection lost after the whole message was sent" in result.stdout
    assert "--resend-uncertain" in result.stdout

    status = site.run("status", "1")
    assert status.exit_code == 0, status.output
    lines = status.stdout.splitlines()
    assert (
        "failed    gus@example.org  attempts 1  550 5.1.1 <gus@example.org>: no such user" in lines
    )
    assert any(
        line.startswith(f"uncertain {lost}  attempts 1  connection lost after the whole message")
        for line in lines
    )
    counts = {parts[0]: int(parts[1]) for parts in (line.split() for line in lines[1:8])}
    assert counts == {
        "queued": 0,
        "sending": 0,
        "sent": EXAMPLE_ACTIVE - 2,
        "failed": 1,
        "deferred": 0,
        "uncertain": 1,
        "cancelled": 0,
    }


def test_status_shows_the_processes_sending_with_their_heartbeat_and_rate(site: Site) -> None:
    with site.store() as store:
        store.snapshot_recipients(EXAMPLE_SLUG)
        assert "Sending now" not in site.run("status", "1").stdout
        with store.acquire_send_lock(EXAMPLE_SLUG) as lock:
            claimed = store.claim_batch(EXAMPLE_SLUG, lock.run_id, 3)
            store.record_results(
                [DeliveryResult(EXAMPLE_SLUG, c.subscriber.id, S.SENT) for c in claimed],
                run_id=lock.run_id,
            )
            status = site.run("status", "1")
            data = json.loads(site.run("status", "1", "--json").stdout)
        after = json.loads(site.run("status", "1", "--json").stdout)
    assert status.exit_code == 0, status.output
    lines = status.stdout.splitlines()
    at = lines.index("Sending now: 1 process")
    line = lines[at + 1]
    assert line.startswith(f"  {socket.gethostname()} pid {os.getpid()} (run {lock.run_id}), since")
    assert re.search(r", heartbeat \d+ s ago: sent 3, [\d,.]+ msgs/s over the last minute$", line)
    [sender] = data["senders"]
    assert (sender["run"], sender["pid"], sender["sent"], sender["claimed"]) == (
        lock.run_id,
        os.getpid(),
        3,
        3,
    )
    assert sender["responding"] is True and sender["rate"] > 0
    assert after["senders"] == []  # the run ended


def test_recipients_left_deferred_exit_75(site: Site) -> None:
    site.server.handler.faults = Faults(rcpt={"eamon@example.com": "451 4.3.0 try later"})
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 75, result.output
    # The summary says DKIM is off: Gmail and Yahoo require it of bulk senders.
    assert "DKIM:       off! Gmail and Yahoo require DKIM of bulk senders" in result.stdout
    assert f"1 deferred: `newsletter send {EXAMPLE_SLUG}` again later sends them." in result.stdout
    status = site.run("status", "1")
    assert "deferred  eamon@example.com  attempts 2  451 4.3.0 try later" in status.stdout


def test_a_server_that_is_down_is_one_error_line_naming_host_and_port(
    site: Site,
) -> None:
    port = site.server.port
    site.server.stop()
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: 127.0.0.1:{port}: connection refused; is the mail server running? check "
        "[smtp] host and port; to try things locally run `newsletter smtp-sink`"
    ]
    assert "Traceback" not in result.output
    with site.store() as store:
        assert store.issue_snapshot(EXAMPLE_SLUG) is None
        assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {}


def test_a_bad_csv_is_one_line_and_exit_1(site: Site, tmp_path: Path) -> None:
    bad = tmp_path / "list.csv"
    bad.write_text("mail,name\nann@example.com,Ann\n", encoding="utf-8")
    result = site.run("subscribers", "import", str(bad))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {bad}:1: no 'email' column (columns: mail, name); the first line must name "
        "the columns; call the address column 'email'"
    ]


def test_a_bad_config_is_one_line_and_exit_1(site: Site) -> None:
    path = site.ws / "newsletter.toml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('security = "none"', 'security = "tls"'), encoding="utf-8")
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {path}:")
    assert "[smtp] security 'tls' is not valid; use starttls, ssl or none" in line
    assert site.server.messages == []


def test_a_missing_password_is_one_line_and_exit_1(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server(auth=True)
    site = make_site(tmp_path, server, username="tester")
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: 127.0.0.1:{server.port}: [smtp] username is set but NEWSLETTER_SMTP_PASSWORD "
        "is not; export NEWSLETTER_SMTP_PASSWORD in the environment (never in newsletter.toml)"
    ]
    assert server.messages == []
    with site.store() as store:
        assert store.issue_snapshot(EXAMPLE_SLUG) is None


# --- real processes ----------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (config.ENV_SMTP_PASSWORD, config.ENV_DB, config.ENV_DKIM_KEY_FILE)
    }
    env["PYTHONPATH"] = str(REPO)
    env[config.ENV_SECRET_KEY] = TEST_SECRET_KEY
    return env


def pause_at(server: SmtpTestServer, count: int) -> tuple[threading.Event, threading.Event]:
    """Block the server (its whole event loop) when message ``count`` arrives, unanswered."""
    paused, release = threading.Event(), threading.Event()

    def on_message(message: Received) -> None:
        if len(server.messages) == count:
            paused.set()
            release.wait(60)

    server.handler.on_message = on_message
    return paused, release


def test_kill_9_mid_run_then_resume_nobody_twice_but_uncertain_nobody_skipped(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server()
    # A long timeout: the client must still be waiting for the reply when it is killed.
    site = make_site(tmp_path, server, generated=190, timeout=60.0)
    pause = 25
    paused, release = pause_at(server, pause)
    first = subprocess.Popen(
        site.command("send", "1", "--yes", "--connections", "2"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert paused.wait(60), "the send never reached the pause"
        # Meanwhile a second send of the same issue is refused, clearly.
        second = subprocess.run(
            site.command("send", "1", "--yes"),
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and f"another send of issue {EXAMPLE_SLUG} is running" in errors[0]
        assert f"pid {first.pid}" in errors[0]
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    finally:
        release.set()
        if first.poll() is None:
            first.kill()
        first.communicate()
    server.handler.on_message = None
    unanswered = server.messages[pause - 1].recipients[0]  # received, the reply never went out

    with site.store() as store:
        left = nonzero(store.ledger_counts(EXAMPLE_SLUG))
    assert left.get("sending", 0) >= 1 and left.get("queued", 0) >= 1, left

    resumed = subprocess.run(
        site.command("send", "1", "--yes", "--connections", "2"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    with site.store() as store:
        uncertain = with_state(store, S.UNCERTAIN)
        sent = with_state(store, S.SENT)
        assert set(states(store).values()) <= {S.SENT, S.UNCERTAIN}
        ids = {e: store.ledger_entry(EXAMPLE_SLUG, e) for e in sent}
    assert f"Found {len(uncertain)} recipients left uncertain by a crashed run." in resumed.stdout
    assert unanswered in uncertain
    assert sent | uncertain == site.active and not sent & uncertain

    got = copies(server.messages)
    # Never twice (nobody was re-sent yet), never skipped (everyone sent or reported uncertain).
    assert max(got.values()) == 1
    assert all(got[e] >= 1 or e in uncertain for e in site.active)
    assert set(got) <= site.active
    # Every `sent` row's Message-ID is the one that recipient received.
    received = {(m.recipients[0], message_id(m.data)) for m in server.messages}
    assert all((e, entry.message_id) in received for e, entry in ids.items() if entry)

    before = copies(server.messages)
    again = subprocess.run(
        site.command("send", "1", "--yes", "--resend-uncertain"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    after = copies(server.messages)
    assert all(after[e] == before[e] + 1 for e in uncertain)  # each uncertain got one more
    assert all(after[e] == before[e] for e in site.active - uncertain)
    assert all(after[e] >= 1 for e in site.active)
    assert {e for e, n in after.items() if n > 1} <= uncertain
    with site.store() as store:
        assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {"sent": len(site.active)}


def test_ctrl_c_mid_run_finishes_what_is_in_flight_and_leaves_nothing_uncertain(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server()
    site = make_site(tmp_path, server, generated=120, timeout=60.0)
    paused, release = pause_at(server, 25)
    first = subprocess.Popen(
        site.command("send", "1", "--yes", "--connections", "2"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert paused.wait(60), "the send never reached the pause"
        first.send_signal(signal.SIGINT)
        release.set()  # the message in flight gets its reply after the Ctrl-C
        _, stderr = first.communicate(timeout=60)
    finally:
        release.set()
        if first.poll() is None:
            first.kill()
    server.handler.on_message = None
    assert first.returncode == 1
    assert "Traceback" not in stderr
    assert "the send stopped early" in stderr
    with site.store() as store:
        left = nonzero(store.ledger_counts(EXAMPLE_SLUG))
    assert "sending" not in left and "uncertain" not in left, left
    assert left["sent"] == len(server.messages)

    resumed = subprocess.run(
        site.command("send", "1", "--yes"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    got = copies(server.messages)
    assert set(got) == site.active and max(got.values()) == 1
