"""Scheduled sends and `newsletter worker`, against a real SMTP server and a real database."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import imaplib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import config, content, inbox, readers, schedule, worker
from newsletter.cli import main
from newsletter.config import BounceSettings, Config, WorkerSettings
from newsletter.errors import DeliveryError, ScheduleError
from newsletter.models import DeliveryState, ScheduleState
from newsletter.segments import make_segment
from newsletter.store import Store
from tests.support import EXAMPLE_SLUG, REPO, TEST_SECRET_KEY, copy_example
from tests.support.delivery import copies, fill, for_server, nonzero, with_state
from tests.support.smtp_server import Faults, Received, ServerFactory, SmtpTestServer
from tests.test_mailboxes import CORPUS, imap_server

__all__ = ["imap_server"]  # the fixture, shared with the bounce tests

pytestmark = pytest.mark.server

S = DeliveryState
UTC = dt.UTC


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``condition`` holds (observable state, checked often), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def fast_worker(cfg: Config, **changes: float) -> Config:
    settings = WorkerSettings(poll_seconds=0.2, progress_seconds=0.5)
    return dataclasses.replace(cfg, worker=dataclasses.replace(settings, **changes))


@dataclasses.dataclass
class Site:
    cfg: Config
    store: Store
    server: SmtpTestServer
    active: set[str]


def make_site(cfg: Config, tmp_path: Path, server: SmtpTestServer, **delivery: object) -> Site:
    db = tmp_path / "state" / "newsletter.db"
    db.parent.mkdir(exist_ok=True)
    wired = fast_worker(for_server(cfg, server, db, **delivery))
    store = Store.open(db)
    return Site(wired, store, server, fill(store, tmp_path))


@pytest.fixture
def site(cfg: Config, tmp_path: Path, smtp_server: ServerFactory) -> Iterator[Site]:
    made = make_site(cfg, tmp_path, smtp_server())
    yield made
    made.store.close()


def issue_one(cfg: Config) -> content.Issue:
    return content.read_issue(content.find_issue(cfg.issues_dir, "1"))


@contextlib.contextmanager
def running_worker(cfg: Config, store: Store) -> Iterator[threading.Event]:
    """The worker's loop in a thread, stopped (and joined) when the block ends."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def target() -> None:
        try:
            worker.run(cfg, store, stop=stop)
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    thread = threading.Thread(target=target, name="worker")
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the worker did not stop"
    assert not failures, failures


# --- the send time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "utc", "zone"),
    [
        ("2026-12-04 07:00 Europe/Berlin", "2026-12-04T06:00:00+00:00", "Europe/Berlin"),
        ("2026-07-04 07:00 Europe/Berlin", "2026-07-04T05:00:00+00:00", "Europe/Berlin"),
        ("2026-12-04T07:00+01:00", "2026-12-04T06:00:00+00:00", ""),
        ("2026-12-04 07:00 +01:00", "2026-12-04T06:00:00+00:00", ""),
        ("2026-12-04T06:00:00Z", "2026-12-04T06:00:00+00:00", ""),
        ("2026-12-04 06:00 UTC", "2026-12-04T06:00:00+00:00", "UTC"),
    ],
)
def test_a_send_time_needs_its_zone_and_is_kept_in_utc(text: str, utc: str, zone: str) -> None:
    when = schedule.parse_when(text)
    assert when.at.isoformat() == utc and when.zone == zone


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-12-04 07:00", "'2026-12-04 07:00' has no time zone"),
        ("2026-12-04T07:00", "'2026-12-04T07:00' has no time zone"),
        ("next friday", "'next friday' is not a time with a zone"),
        ("2026-12-04 07:00 Europe/Atlantis", "unknown time zone 'Europe/Atlantis'"),
        ("2026-03-29 02:30 Europe/Berlin", "does not exist in Europe/Berlin"),
    ],
)
def test_a_send_time_without_a_usable_zone_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        schedule.parse_when(text, where="--at")
    assert message in str(caught.value)
    assert str(caught.value).startswith("--at: ")


def test_schedule_and_cancel_from_the_command_line(
    workspace: Path, runner: CliRunner, tmp_path: Path
) -> None:
    db = tmp_path / "news.db"
    base = ["-C", str(workspace), "--db", str(db)]
    result = runner.invoke(main, [*base, "schedule", "1", "--at", "2026-12-04 07:00"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: --at: '2026-12-04 07:00' has no time zone; write it as "
        '"2026-12-04 07:00 Europe/Berlin" or ISO 8601 with an offset, e.g. 2026-12-04T07:00+01:00'
    ]
    future = dt.datetime.now(UTC).year + 1
    at = f"{future}-12-04 07:00 Europe/Berlin"
    result = runner.invoke(main, [*base, "schedule", "1", "--at", at])
    assert result.exit_code == 0, result.output
    assert f"for {future}-12-04 07:00 CET ({future}-12-04 06:00 UTC)" in result.stdout
    listed = runner.invoke(main, [*base, "issue", "list"])
    assert f"[scheduled {future}-12-04 07:00 CET]" in listed.stdout
    status = runner.invoke(main, [*base, "status", "1"])
    assert f"Schedule: scheduled for {future}-12-04 07:00 CET (by command)" in status.stdout

    cancelled = runner.invoke(main, [*base, "schedule", "1", "--cancel"])
    assert cancelled.exit_code == 0 and "Cancelled" in cancelled.stdout
    assert "scheduled" not in runner.invoke(main, [*base, "issue", "list"]).stdout
    again = runner.invoke(main, [*base, "schedule", "1", "--cancel"])
    assert again.exit_code == 1 and "issue 1 is not scheduled" in again.stderr

    past = runner.invoke(main, [*base, "schedule", "1", "--at", "2020-01-01 07:00 UTC"])
    assert past.exit_code == 1 and "2020-01-01 07:00 UTC is in the past" in past.stderr


def test_send_at_in_issue_md_is_shown_and_scheduled(
    workspace: Path, runner: CliRunner, tmp_path: Path
) -> None:
    db = tmp_path / "news.db"
    base = ["-C", str(workspace), "--db", str(db)]
    issue_md = workspace / "issues" / EXAMPLE_SLUG / "issue.md"
    future = dt.datetime.now(UTC).year + 1
    text = issue_md.read_text(encoding="utf-8")
    issue_md.write_text(
        text.replace("date: ", f"send_at: {future}-12-04T07:00:00+01:00\ndate: ", 1),
        encoding="utf-8",
    )
    listed = runner.invoke(main, [*base, "issue", "list"])
    assert f"[send_at {future}-12-04T07:00:00+01:00: not scheduled yet]" in listed.stdout
    result = runner.invoke(main, [*base, "schedule", "1"])
    assert result.exit_code == 0, result.output
    with Store.open(db) as store:
        entry = store.get_schedule(EXAMPLE_SLUG)
    assert entry is not None and entry.source == "issue.md"
    assert entry.send_at == dt.datetime(future, 12, 4, 6, 0, tzinfo=UTC)

    issue_md.write_text(
        text.replace("date: ", "send_at: 2026-12-04 07:00\ndate: ", 1), encoding="utf-8"
    )
    result = runner.invoke(main, [*base, "schedule", "1"])
    assert result.exit_code == 1
    assert f"{issue_md}:3: '2026-12-04 07:00' has no time zone" in result.stderr


def test_scheduling_refuses_an_issue_a_send_would_refuse(site: Site) -> None:
    broken = dataclasses.replace(
        site.cfg, dkim=dataclasses.replace(site.cfg.dkim, selector="s1", domain="example.org")
    )
    future = dt.datetime.now(UTC) + dt.timedelta(days=1)
    with pytest.raises(ScheduleError) as caught:
        schedule.schedule_issue(broken, site.store, issue_one(broken), schedule.When(future))
    assert "issue 1 would not be sent: " in str(caught.value)
    assert "[dkim] is on but no private key file is given" in str(caught.value)
    assert site.store.get_schedule(EXAMPLE_SLUG) is None


# --- the worker ---------------------------------------------------------------------------


def test_the_worker_sends_a_scheduled_issue_on_time_to_everyone_once(site: Site) -> None:
    arrived: dict[str, float] = {}

    def on_message(message: Received) -> None:
        for rcpt in message.recipients:
            arrived.setdefault(rcpt, time.time())

    site.server.handler.on_message = on_message
    at = (dt.datetime.now(UTC) + dt.timedelta(seconds=3)).replace(microsecond=0)
    schedule.schedule_issue(site.cfg, site.store, issue_one(site.cfg), schedule.When(at))
    with running_worker(site.cfg, site.store):
        wait_for(lambda: set(arrived) >= site.active, 15, "every subscriber's copy")
        wait_for(
            lambda: (
                (e := site.store.get_schedule(EXAMPLE_SLUG)) is not None
                and e.state == ScheduleState.SENT
            ),
            10,
            "the schedule to say sent",
        )
    assert copies(site.server.messages) == dict.fromkeys(site.active, 1)
    first, last = min(arrived.values()), max(arrived.values())
    assert first >= at.timestamp(), "sent before its time"
    assert last - at.timestamp() < 5, f"the last copy came {last - at.timestamp():.1f} s late"
    assert nonzero(site.store.ledger_counts(EXAMPLE_SLUG)) == {"sent": len(site.active)}


def test_a_deferred_recipient_is_retried_by_the_worker_alone(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    slow = "eamon@example.com"
    server = smtp_server(Faults(rcpt={slow: "451 4.2.1 try later"}, rcpt_times={slow: 2}))
    site = make_site(cfg, tmp_path, server, retries=0)
    site.cfg = fast_worker(site.cfg, retry_minutes=0.01)  # parked 0.6 s, then retried
    assert slow in site.active
    with site.store:
        site.store.snapshot_recipients(EXAMPLE_SLUG)  # an issue sent before: two deferred
        at = dt.datetime.now(UTC) - dt.timedelta(seconds=1)
        site.store.set_schedule(EXAMPLE_SLUG, at)
        with running_worker(site.cfg, site.store):
            wait_for(
                lambda: site.store.ledger_counts(EXAMPLE_SLUG)[S.SENT] == len(site.active),
                20,
                "the deferred recipient to be sent",
            )
        entry = site.store.ledger_entry(EXAMPLE_SLUG, slow)
    assert entry is not None and entry.attempts == 3  # deferred twice, then sent
    assert copies(server.messages) == dict.fromkeys(site.active, 1)


def with_segment(site: Site, name: str, expression: str) -> content.Issue:
    """Issue 1 with ``segment: NAME`` in its issue.md, and that [segments] entry."""
    site.cfg = dataclasses.replace(site.cfg, segments={name: make_segment(name, expression)})
    path = site.cfg.issues_dir / EXAMPLE_SLUG / content.ISSUE_FILE
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("---\n", f"---\nsegment: {name}\n", 1), encoding="utf-8")
    return issue_one(site.cfg)


def test_the_worker_sends_and_retries_within_the_segment_of_issue_md(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    slow = "eamon@example.com"
    server = smtp_server(Faults(rcpt={slow: "451 4.2.1 try later"}, rcpt_times={slow: 2}))
    site = make_site(cfg, tmp_path, server, retries=0)
    site.cfg = fast_worker(site.cfg, retry_minutes=0.01)  # parked 0.6 s, then retried
    members = {slow, sorted(site.active - {slow})[0]}
    for address in members:
        site.store.change_tags(address, add=["europe"])
    assert with_segment(site, "europe", "tag:europe").segment == "europe"
    with site.store:
        site.store.set_schedule(EXAMPLE_SLUG, dt.datetime.now(UTC) - dt.timedelta(seconds=1))
        with running_worker(site.cfg, site.store):
            wait_for(
                lambda: site.store.ledger_counts(EXAMPLE_SLUG)[S.SENT] == len(members),
                20,
                "the segment's deferred recipient to be sent",
            )
        assert site.store.issue_segment(EXAMPLE_SLUG) == "europe"
        entry = site.store.ledger_entry(EXAMPLE_SLUG, slow)
    assert entry is not None and entry.attempts == 3  # deferred twice, then sent
    assert copies(server.messages) == dict.fromkeys(members, 1)


def test_scheduling_refuses_a_segment_that_is_not_in_the_config(site: Site) -> None:
    issue = with_segment(site, "europe", "tag:europe")
    site.cfg = dataclasses.replace(site.cfg, segments={})
    future = dt.datetime.now(UTC) + dt.timedelta(days=1)
    with pytest.raises(ScheduleError, match="no segment 'europe' in \\[segments\\]"):
        schedule.schedule_issue(site.cfg, site.store, issue, schedule.When(future))
    assert site.store.get_schedule(EXAMPLE_SLUG) is None


def test_an_issue_that_fails_the_checks_at_send_time_is_not_sent(
    site: Site, workspace: Path, tmp_path: Path
) -> None:
    future = dt.datetime.now(UTC) + dt.timedelta(hours=1)
    schedule.schedule_issue(site.cfg, site.store, issue_one(site.cfg), schedule.When(future))
    # Meanwhile an image loses its alt text.
    article = next((site.cfg.issues_dir / EXAMPLE_SLUG / "articles").glob("01-*.md"))
    text = article.read_text(encoding="utf-8")
    article.write_text(text + "\n![](../images/bench.png)\n", encoding="utf-8")
    later = future + dt.timedelta(seconds=1)
    report = worker.Worker(site.cfg, site.store, clock=lambda: later).run_pass()
    assert not report.ok
    (job,) = [j for j in report.jobs if j.kind == "send"]
    assert "alt text" in job.detail
    entry = site.store.get_schedule(EXAMPLE_SLUG)
    assert entry is not None and entry.state == ScheduleState.FAILED
    assert "alt text" in entry.last_error
    assert site.server.messages == [] and site.store.issue_snapshot(EXAMPLE_SLUG) is None
    # `status` says so, with exit 1, and a second pass does not try again.
    result = CliRunner().invoke(
        main,
        ["-C", str(workspace), "--db", str(site.store.path), "status", "1"],
        env={config.ENV_SECRET_KEY: TEST_SECRET_KEY},
    )
    assert result.exit_code == 1
    assert "Schedule: failed" in result.stdout and "Last error: " in result.stdout
    assert worker.Worker(site.cfg, site.store, clock=lambda: later).run_pass().ok


def test_a_second_worker_on_the_same_database_is_refused(site: Site) -> None:
    with worker.worker_lock(site.store), pytest.raises(DeliveryError) as caught:
        worker.run(site.cfg, site.store, once=True)
    assert "another worker is running on this database" in str(caught.value)
    assert f"pid {os.getpid()}" in str(caught.value)
    assert worker.run(site.cfg, site.store, once=True).ok  # free again


def test_the_worker_schedules_send_at_from_issue_md(site: Site) -> None:
    issue_md = site.cfg.issues_dir / EXAMPLE_SLUG / "issue.md"
    at = dt.datetime.now(UTC) + dt.timedelta(hours=2)
    text = issue_md.read_text(encoding="utf-8")
    issue_md.write_text(
        text.replace("date: ", f"send_at: {at.isoformat()}\ndate: ", 1), encoding="utf-8"
    )
    report = worker.Worker(site.cfg, site.store).run_pass()
    assert [j.kind for j in report.jobs if j.kind == "register"] == ["register"]
    entry = site.store.get_schedule(EXAMPLE_SLUG)
    assert entry is not None and entry.source == "issue.md"
    assert entry.send_at == at
    assert site.server.messages == []


def test_the_worker_prunes_unconfirmed_sign_ups(site: Site) -> None:
    old = dt.datetime.now(UTC) - dt.timedelta(days=10)
    site.store.request_confirmation(
        "late@example.org", resend_after=dt.timedelta(minutes=1), now=old
    )
    assert site.store.get_subscriber("late@example.org") is not None
    report = worker.Worker(site.cfg, site.store).run_pass()
    assert "pruned 1" in [j.detail for j in report.jobs if j.kind == "prune"]
    assert site.store.get_subscriber("late@example.org") is None


# --- as a process: SIGTERM ----------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (config.ENV_SMTP_PASSWORD, config.ENV_DB, config.ENV_DKIM_KEY_FILE)
    }
    env["PYTHONPATH"] = str(REPO)
    env[config.ENV_SECRET_KEY] = TEST_SECRET_KEY
    return env


def test_sigterm_mid_send_finishes_what_is_in_flight_and_a_restart_completes(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server()
    ws = copy_example(
        tmp_path / "ws",
        smtp={"port": server.port, "timeout": 30.0},
        extra="[delivery]\nretries = 0\nconnections = 2\n\n[worker]\npoll_seconds = 0.2\n",
    )
    db = tmp_path / "state" / "newsletter.db"
    with Store.open(db) as store:
        active = fill(store, tmp_path, generated=120)
        store.set_schedule(EXAMPLE_SLUG, dt.datetime.now(UTC) - dt.timedelta(seconds=1))
    paused, release = threading.Event(), threading.Event()

    def on_message(message: Received) -> None:
        if len(server.messages) == 30:
            paused.set()
            release.wait(60)

    server.handler.on_message = on_message
    command = [sys.executable, "-m", "newsletter", "-C", str(ws), "--db", str(db), "worker"]
    proc = subprocess.Popen(
        command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    stopping = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("Stopping after the messages in flight"):
                stopping.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert paused.wait(60), "the worker never reached the pause"
        proc.send_signal(signal.SIGTERM)
        # The message in flight is answered only once the worker knows it must stop.
        assert stopping.wait(30), "".join(lines)
        release.set()
        assert proc.wait(60) == 0, "".join(lines)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
        reader.join(30)
    assert any("worker stopped" in line for line in lines), "".join(lines)
    with Store.open(db) as store:
        left = nonzero(store.ledger_counts(EXAMPLE_SLUG))
        assert "sending" not in left and "uncertain" not in left, left
        entry = store.get_schedule(EXAMPLE_SLUG)
        assert entry is not None and entry.state == ScheduleState.SENDING
    assert max(copies(server.messages).values()) == 1
    server.handler.on_message = None

    again = subprocess.run([*command, "--once"], env=child_env(), capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr
    with Store.open(db) as store:
        assert with_state(store, S.SENT) == active
        entry = store.get_schedule(EXAMPLE_SLUG)
        assert entry is not None and entry.state == ScheduleState.SENT
    assert copies(server.messages) == dict.fromkeys(active, 1)


# --- the inbound mailbox ------------------------------------------------------------------


def test_the_worker_reads_the_bounce_mailbox_every_n_minutes(site: Site, imap_server: int) -> None:
    for address in ("erin@example.com", "grace@example.com"):
        site.store.add_subscriber(address)
    client = imaplib.IMAP4("127.0.0.1", imap_server)
    client.login("demouser", "demopass")
    client.create("Bounces")
    client.append("Bounces", None, None, (CORPUS / "gmail-hard-no-such-account.eml").read_bytes())
    cfg = dataclasses.replace(
        fast_worker(site.cfg, inbox_interval_minutes=5),
        bounces=BounceSettings(
            imap_host="127.0.0.1",
            imap_port=imap_server,
            imap_username="demouser",
            imap_folder="Bounces",
            imap_security="none",
        ),
        secrets=site.cfg.secrets.replace(imap_password="demopass"),
    )
    now = [dt.datetime.now(UTC)]
    passes = worker.Worker(cfg, site.store, clock=lambda: now[0])

    def status(address: str) -> str:
        found = site.store.get_subscriber(address)
        assert found is not None
        return found.status.value

    (job,) = [j for j in passes.run_pass().jobs if j.kind == "inbox"]
    assert job.ok and job.detail.startswith("1 messages: 0 marked bounced"), job.detail
    # Read and recorded, but it refers to no message we sent: it changes nobody.
    assert status("erin@example.com") == "active"
    data = (CORPUS / "gmail-hard-no-such-account.eml").read_bytes()
    assert site.store.is_processed(readers.mail_key(inbox.classify(data), data))
    client.append(
        "Bounces", None, None, (CORPUS / "outlook-hard-recipient-not-found.eml").read_bytes()
    )
    now[0] += dt.timedelta(minutes=2)
    assert [j for j in passes.run_pass().jobs if j.kind == "inbox"] == []  # not yet
    assert status("grace@example.com") == "active"
    now[0] += dt.timedelta(minutes=4)
    (job,) = [j for j in passes.run_pass().jobs if j.kind == "inbox"]
    assert job.ok and job.detail.startswith("1 messages:"), job.detail
    client.logout()
