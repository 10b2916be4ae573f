"""The send loop against real aiosmtpd servers on 127.0.0.1 and real SQLite ledgers.

Every test sends the example issue and checks two truths against each other: what
the server received (recipient, Message-ID) and what the ledger says.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import content, delivery, render
from newsletter.config import Config, DkimSettings
from newsletter.db import Database
from newsletter.delivery import Outbound, Progress, RateLimiter, SendOptions, prepare_send
from newsletter.errors import DeliveryError, TransportError
from newsletter.message import Recipient, prepare
from newsletter.models import DeliveryState, Status
from newsletter.render import RenderedIssue
from newsletter.segments import Segment
from newsletter.store import Store
from newsletter.transport import (
    MemoryTransport,
    SendResult,
    WireReady,
    smtp_data_bytes,
)
from tests.support import EXAMPLE_SLUG, copy_example, load_config
from tests.support.deliverability import write_key
from tests.support.delivery import (
    EXAMPLE_ACTIVE,
    copies,
    fill,
    for_server,
    message_id,
    nonzero,
    states,
    with_state,
)
from tests.support.smtp_server import (
    ALWAYS,
    PASSWORD,
    USERNAME,
    Faults,
    Received,
    ServerFactory,
    SmtpTestServer,
)

S = DeliveryState


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, RenderedIssue]:
    """The example workspace's config and its issue rendered once (the slow part)."""
    cfg = load_config(copy_example(tmp_path_factory.mktemp("example") / "ws"))
    issue = content.read_issue(content.find_issue(cfg.issues_dir, "1"))
    return cfg, render.render_issue(issue, cfg)


@pytest.fixture
def store(database: Database) -> Iterator[Store]:
    """The ledger on each engine in turn: the send loop behaves the same on both."""
    with Store.open(database) as opened:
        yield opened


class Sender:
    """Sends for one test: the example issue, one server, one ledger."""

    def __init__(
        self, example: tuple[Config, RenderedIssue], server: SmtpTestServer, store: Store
    ) -> None:
        self.base, self.rendered = example
        self.server = server
        self.store = store
        self.settings: dict[str, object] = {}
        self.timeout = 5.0

    @property
    def config(self) -> Config:
        return for_server(
            self.base, self.server, self.store.database, timeout=self.timeout, **self.settings
        )

    def send(self, **options: object) -> delivery.DeliveryReport:
        cfg = self.config
        progress = options.pop("progress", None)
        stop = options.pop("stop", None)
        return prepare_send(cfg, self.rendered, self.store).run(
            SendOptions(**options),  # type: ignore[arg-type]
            progress=progress,  # type: ignore[arg-type]
            stop=stop,  # type: ignore[arg-type]
        )


@pytest.fixture
def sender(
    example: tuple[Config, RenderedIssue], smtp_server: ServerFactory, store: Store
) -> Sender:
    return Sender(example, smtp_server(), store)


def pause_at(server: SmtpTestServer, count: int) -> tuple[threading.Event, threading.Event]:
    """Make the server block (its whole event loop) when message ``count`` arrives.

    Returns (paused, release): wait for ``paused``, then set ``release``.
    """
    paused, release = threading.Event(), threading.Event()

    def on_message(message: Received) -> None:
        if len(server.messages) == count:
            paused.set()
            release.wait(30)

    server.handler.on_message = on_message
    return paused, release


# --- everyone once, nobody else ----------------------------------------------------------


@pytest.mark.server
def test_every_active_subscriber_gets_exactly_one_copy(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=40)
    assert len(active) == EXAMPLE_ACTIVE + 40

    report = sender.send(connections=3)

    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert "ines.moreau@example.net" not in got  # unsubscribed in the example list
    assert "bounced@example.org" not in got
    assert (report.sent, report.failed, report.deferred, report.uncertain) == (len(active), 0, 0, 0)
    assert report.ok and report.error is None and report.stopped_by == ""
    assert nonzero(report.counts) == {"sent": len(active)}
    # The ledger's Message-ID is the one each recipient received.
    received = {m.recipients[0]: message_id(m.data) for m in sender.server.messages}
    for email in active:
        entry = store.ledger_entry(EXAMPLE_SLUG, email)
        assert entry is not None and entry.state == S.SENT
        assert entry.message_id == received[email] and entry.attempts == 1
        assert entry.last_reply.startswith("250")
    assert 1 < sender.server.connections_used <= 3


@pytest.mark.server
def test_a_second_run_sends_nothing_and_later_subscribers_need_include_new(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path)
    sender.send()
    assert len(sender.server.messages) == len(active)

    again = sender.send()
    assert (again.attempts, again.sent) == (0, 0)
    assert len(sender.server.messages) == len(active)

    store.add_subscriber("late.comer@example.com", "Late Comer")
    plan = prepare_send(sender.config, sender.rendered, store).plan()
    assert (plan.recipients, plan.new_subscribers, plan.already_sent) == (0, 1, len(active))
    still = sender.send()
    assert still.sent == 0 and "late.comer@example.com" not in copies(sender.server.messages)
    assert store.ledger_entry(EXAMPLE_SLUG, "late.comer@example.com") is None

    plan = prepare_send(sender.config, sender.rendered, store).plan(SendOptions(include_new=True))
    assert plan.recipients == 1
    added = sender.send(include_new=True)
    assert added.sent == 1
    got = copies(sender.server.messages)
    assert got["late.comer@example.com"] == 1 and set(got.values()) == {1}


def boundary(data: bytes) -> bytes:
    """The MIME boundary a message (or the template's literal bytes) uses."""
    found = set(re.findall(rb"^--(=+nl[0-9a-f]+==)\r$", data, re.M))
    assert len(found) == 1, found
    return found.pop()


def test_one_prepared_send_plans_and_sends_the_same_signed_message(
    sender: Sender, store: Store, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The plan's size is a real signed copy's (DKIM-Signature included), and the run
    sends the very message the plan measured (one template: one MIME boundary)."""
    active = fill(store, tmp_path)
    key = write_key(tmp_path / "keys" / "nl.key", rsa_key)
    dkim_on = DkimSettings(selector="nl2026", domain="example.org", key_file=str(key))
    cfg = dataclasses.replace(sender.config, dkim=dkim_on)
    prepared = prepare_send(cfg, sender.rendered, store)
    assert prepared.outbound.sign is not None
    plan = prepared.plan()

    report = prepared.run()

    assert report.sent == plan.recipients == len(active)
    sizes = [len(m.data) for m in sender.server.messages]
    assert all(m.data.startswith(b"DKIM-Signature:") for m in sender.server.messages)
    assert sender.server.messages[0].data.index(b"\r\nFrom:") > 400  # the header's length
    # Copies differ only by the reader's values (address, name, token): a few dozen bytes.
    assert max(abs(size - plan.message_size) for size in sizes) < 100
    literal = b"".join(part for part in prepared.template.segments if isinstance(part, bytes))
    assert {boundary(m.data) for m in sender.server.messages} == {boundary(literal)}


@pytest.mark.server
def test_a_subscriber_who_unsubscribes_before_a_resumed_run_is_not_sent_to(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=20)
    first = sender.send(limit=5)
    assert first.sent == 5
    later = sorted(with_state(store, S.QUEUED))[0]
    store.set_status(later, Status.UNSUBSCRIBED, "test")
    sender.send()
    got = copies(sender.server.messages)
    assert later not in got and set(got) == active - {later}
    assert states(store)[later] == S.CANCELLED


# --- replies and faults ------------------------------------------------------------------


@pytest.mark.server
def test_421_mid_run_reconnects_and_delivers_everyone_once(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=30)
    sender.server.handler.faults = Faults(close_421_after=7, close_421_times=3)

    report = sender.send(connections=2)

    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert report.sent == len(active) and report.ok
    assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {"sent": len(active)}
    assert sender.server.faults.close_421_times == 0  # all three fired
    assert sender.server.connections_used >= 3


@pytest.mark.server
def test_451_and_452_are_retried_with_backoff_and_sent_when_the_fault_clears(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=10)
    greylisted, full = "reader0001@example.org", "reader0005@example.net"
    sender.server.handler.faults = Faults(
        rcpt={greylisted: "451 4.7.1 greylisted, try again", full: "452 4.2.2 mailbox full"},
        rcpt_times={greylisted: 2, full: 1},
    )
    sender.settings = {"retries": 3, "retry_backoff": 0.01}
    seen: list[Progress] = []

    report = sender.send(connections=2, progress=seen.append)

    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert (report.sent, report.retried, report.deferred, report.attempts) == (
        len(active),
        3,
        0,
        len(active) + 3,
    )
    entry = store.ledger_entry(EXAMPLE_SLUG, greylisted)
    assert entry is not None and (entry.state, entry.attempts) == (S.SENT, 3)
    entry = store.ledger_entry(EXAMPLE_SLUG, full)
    assert entry is not None and (entry.state, entry.attempts) == (S.SENT, 2)
    assert seen[-1].done == seen[-1].total == len(active)


@pytest.mark.server
def test_a_4xx_that_persists_is_left_deferred_and_sent_by_the_next_run(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path)
    stuck = "chloe.ng@example.net"
    sender.server.handler.faults = Faults(rcpt={stuck: "451 4.3.0 temporary failure"})
    sender.settings = {"retries": 2, "retry_backoff": 0.01}

    report = sender.send()

    assert (report.sent, report.deferred, report.retried) == (len(active) - 1, 1, 2)
    assert report.ok  # deferred is not failed
    entry = store.ledger_entry(EXAMPLE_SLUG, stuck)
    assert entry is not None
    assert (entry.state, entry.attempts, entry.retry_at) == (S.DEFERRED, 3, None)
    assert entry.last_reply == "451 4.3.0 temporary failure"
    assert stuck not in copies(sender.server.messages)
    problems = [(p.email, p.state) for p in report.problems]
    assert problems == [(stuck, S.DEFERRED)]

    sender.server.faults.rcpt.clear()
    again = sender.send()
    assert (again.sent, again.attempts) == (1, 1)
    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {"sent": len(active)}


@pytest.mark.server
@pytest.mark.parametrize("bounce", [True, False])
def test_550_fails_with_the_reply_and_bounce_on_5xx_marks_the_subscriber_bounced(
    sender: Sender, store: Store, tmp_path: Path, bounce: bool
) -> None:
    active = fill(store, tmp_path)
    unknown, refused = "gus@example.org", "jun.takeda@example.org"
    sender.server.handler.faults = Faults(
        rcpt={unknown: "550 5.1.1 no such user here"},
        data_reply={refused: "554 5.7.1 message refused as spam"},
    )
    sender.settings = {"bounce_on_5xx": bounce}

    report = sender.send()

    assert (report.sent, report.failed) == (len(active) - 2, 2)
    assert not report.ok
    for email, reply in (
        (unknown, "550 5.1.1 no such user here"),
        (refused, "554 5.7.1 message refused as spam"),
    ):
        entry = store.ledger_entry(EXAMPLE_SLUG, email)
        assert entry is not None and entry.state == S.FAILED and entry.last_reply == reply
        subscriber = store.get_subscriber(email)
        assert subscriber is not None
        assert subscriber.status == (Status.BOUNCED if bounce else Status.ACTIVE)
    assert {p.email for p in report.problems} == {unknown, refused}
    assert set(copies(sender.server.messages)) == active - {unknown, refused}
    # A failed row is never retried by a later run.
    assert sender.send().attempts == 0


@pytest.mark.server
def test_a_connection_dropped_at_data_is_resent_on_a_new_connection(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path)
    sender.server.handler.faults = Faults(drop_at_data=2)

    report = sender.send(connections=1)

    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert report.sent == len(active) and report.uncertain == 0
    assert sender.server.faults.drop_at_data == 0


@pytest.mark.server
def test_a_connection_dropped_after_the_message_went_out_is_uncertain_not_resent(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path)
    sender.server.handler.faults = Faults(drop_after_data=1)

    report = sender.send(connections=1)

    lost = sender.server.messages[0].recipients[0]  # the server has it; the client cannot know
    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert (report.sent, report.uncertain) == (len(active) - 1, 1)
    assert with_state(store, S.UNCERTAIN) == {lost}
    entry = store.ledger_entry(EXAMPLE_SLUG, lost)
    assert entry is not None and "connection lost after the whole message" in entry.last_reply
    assert entry.message_id == message_id(sender.server.messages[0].data)
    # Re-running leaves it alone; only --resend-uncertain sends another copy.
    assert sender.send().attempts == 0
    resent = sender.send(resend_uncertain=True)
    assert (resent.attempts, resent.sent) == (1, 1)
    got = copies(sender.server.messages)
    assert got[lost] == 2 and all(n == 1 for email, n in got.items() if email != lost)
    assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {"sent": len(active)}


@pytest.mark.server
def test_a_server_that_stalls_after_the_message_times_out_to_uncertain(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path)
    sender.timeout = 0.5
    sender.server.handler.faults = Faults(stall={"END": 1})

    report = sender.send(connections=1)

    stalled = sender.server.messages[0].recipients[0]
    assert (report.sent, report.uncertain, report.deferred) == (len(active) - 1, 1, 0)
    assert with_state(store, S.UNCERTAIN) == {stalled}
    assert with_state(store, S.SENT) == active - {stalled}
    entry = store.ledger_entry(EXAMPLE_SLUG, stalled)
    assert entry is not None and "timed out" in entry.last_reply
    assert set(copies(sender.server.messages).values()) == {1}


@pytest.mark.server
def test_a_server_that_stalls_before_the_message_leaves_it_deferred(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path)
    sender.timeout = 0.5
    sender.settings = {"retries": 0}
    # The first transaction stalls at MAIL, and so does its one reconnect-and-retry.
    sender.server.handler.faults = Faults(stall={"MAIL": 2})

    report = sender.send(connections=1)

    deferred = with_state(store, S.DEFERRED)
    assert len(deferred) == 1 and (report.sent, report.deferred) == (len(active) - 1, 1)
    (stalled,) = deferred
    entry = store.ledger_entry(EXAMPLE_SLUG, stalled)
    assert entry is not None and entry.retry_at is None and "timed out" in entry.last_reply
    assert stalled not in copies(sender.server.messages)

    assert sender.send().sent == 1
    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}


@pytest.mark.server
def test_a_server_that_is_down_at_the_start_is_one_error_and_changes_nothing(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    fill(store, tmp_path)
    port = sender.server.port
    sender.server.stop()

    with pytest.raises(TransportError) as caught:
        sender.send()

    assert caught.value.where == f"127.0.0.1:{port}"
    assert "connection refused" in str(caught.value)
    assert store.issue_snapshot(EXAMPLE_SLUG) is None  # the recipients are not even fixed
    assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {}


@pytest.mark.server
def test_a_server_lost_mid_run_stops_the_run_and_hands_unsent_rows_back(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=30)
    sender.timeout = 0.5
    server = sender.server

    def go_away(message: Received) -> None:
        if len(server.messages) == 5:
            # From now on: 421 to the next MAIL, and no greeting on any new connection.
            server.faults.close_421_after, server.faults.close_421_times = 0, ALWAYS
            server.faults.stall["greeting"] = ALWAYS

    server.handler.on_message = go_away

    report = sender.send(connections=1, batch_size=4)

    assert isinstance(report.error, TransportError) and "no answer within" in str(report.error)
    assert report.stopped_by == str(report.error) and not report.ok
    counts = store.ledger_counts(EXAMPLE_SLUG)
    assert counts[S.SENT] == report.sent == 5
    assert counts[S.SENDING] == counts[S.UNCERTAIN] == counts[S.FAILED] == 0
    assert counts[S.DEFERRED] == report.deferred >= 1
    assert counts[S.DEFERRED] + counts[S.QUEUED] == len(active) - 5
    for email in with_state(store, S.DEFERRED):
        entry = store.ledger_entry(EXAMPLE_SLUG, email)
        assert entry is not None and entry.retry_at is None
        assert entry.last_reply.startswith("not sent:")
    assert set(copies(server.messages).values()) == {1}

    server.handler.faults = Faults()
    server.handler.on_message = None
    again = sender.send(connections=2)
    assert again.ok and again.sent == len(active) - 5
    got = copies(server.messages)
    assert set(got) == active and set(got.values()) == {1}


# --- concurrency -------------------------------------------------------------------------


@pytest.mark.server
def test_a_second_send_of_the_same_issue_is_refused_on_sqlite_and_joins_on_postgresql(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=20)
    paused, release = pause_at(sender.server, 3)
    results: list[delivery.DeliveryReport] = []
    first = threading.Thread(target=lambda: results.append(sender.send(connections=2)))
    first.start()
    second: threading.Thread | None = None
    try:
        assert paused.wait(30)
        with Store.open(store.database) as other:
            run = prepare_send(sender.config, sender.rendered, other).run
            if not store.is_postgres:
                with pytest.raises(DeliveryError) as caught:
                    run()
                assert f"another send of issue {EXAMPLE_SLUG} is running" in str(caught.value)
            else:
                # It registers and connects (the server answers once released), then
                # shares the issue with the first run.
                second = threading.Thread(target=lambda: results.append(run()))
                second.start()
                while len(store.senders(EXAMPLE_SLUG)) < 2:
                    assert second.is_alive()
                    second.join(0.01)
                release.set()
                second.join(30)
    finally:
        release.set()
        first.join(30)
    assert all(report.ok for report in results)
    assert sum(report.sent for report in results) == len(active)
    assert len(results) == (2 if store.is_postgres else 1)
    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}
    runs = store.senders(EXAMPLE_SLUG, finished=True)
    assert {r.state for r in runs} == {"finished"}
    assert sorted(r.sent for r in runs) == sorted(report.sent for report in results)


@pytest.mark.server
def test_an_unsubscribe_during_the_send_is_honoured_for_everyone_not_yet_sent(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=30)
    leaving = sorted(active)[-6:]  # sorted by address ~ last by id: far from the first claims
    db = store.database
    done = threading.Event()

    def unsubscribe(message: Received) -> None:
        if len(sender.server.messages) == 3:
            with Store.open(db) as other:
                for email in leaving:
                    other.set_status(email, Status.UNSUBSCRIBED, "link")
            done.set()

    sender.server.handler.on_message = unsubscribe
    report = sender.send(connections=1, batch_size=2)

    assert done.is_set()
    got = copies(sender.server.messages)
    assert set(got).isdisjoint(leaving)
    assert set(got) == active - set(leaving) and set(got.values()) == {1}
    assert report.sent == len(active) - len(leaving)
    assert {email: states(store)[email] for email in leaving} == dict.fromkeys(leaving, S.CANCELLED)


# --- options -----------------------------------------------------------------------------


@pytest.mark.server
def test_limit_sends_at_most_n_and_the_next_run_sends_the_rest(
    sender: Sender, store: Store, tmp_path: Path
) -> None:
    active = fill(store, tmp_path, generated=10)
    report = sender.send(limit=7, connections=2)
    assert report.sent == 7 and len(sender.server.messages) == 7
    assert nonzero(store.ledger_counts(EXAMPLE_SLUG)) == {"sent": 7, "queued": len(active) - 7}
    sender.send()
    got = copies(sender.server.messages)
    assert set(got) == active and set(got.values()) == {1}


@pytest.mark.server
def test_progress_reports_monotonically_increasing_done_counts(
    sender: Sender, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "PROGRESS_INTERVAL", 0.0)
    active = fill(store, tmp_path, generated=40)
    seen: list[Progress] = []
    sender.send(connections=3, progress=seen.append)
    done = [p.done for p in seen]
    assert len(done) >= 2 and done == sorted(done)
    assert all(p.total == len(active) for p in seen)
    assert seen[-1].done == seen[-1].sent == len(active)
    elapsed = [p.elapsed for p in seen]
    assert elapsed == sorted(elapsed)


@pytest.mark.server
def test_a_rate_limit_still_sends_everyone(sender: Sender, store: Store, tmp_path: Path) -> None:
    active = fill(store, tmp_path)
    report = sender.send(rate=500.0, connections=2)
    assert report.sent == len(active)


def test_the_rate_limiter_spaces_sends_across_workers() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> bool:
        slept.append(round(seconds, 9))
        return False

    limiter = RateLimiter(4.0, threading.Event(), clock=lambda: now[0], sleep=sleep)
    assert all(limiter.acquire() for _ in range(5))  # five sends asked for at the same instant
    assert slept == [0.25, 0.5, 0.75, 1.0]  # the first goes at once, then one per 1/4 s
    now[0] += 10.0  # after a pause no burst is owed: the next send goes at once, then spacing
    slept.clear()
    limiter.acquire()
    limiter.acquire()
    assert slept == [0.25]


def test_senders_sharing_the_rate_each_space_their_sends_by_their_part() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> bool:
        slept.append(round(seconds, 9))
        return False

    limiter = RateLimiter(4.0, threading.Event(), clock=lambda: now[0], sleep=sleep)
    limiter.share(2)  # two senders alive: 2 msgs/s each, 4 in all
    assert all(limiter.acquire() for _ in range(3))
    assert slept == [0.5, 1.0]
    limiter.share(1)  # the other one finished
    now[0] += 1.5  # the third send's slot
    assert limiter.acquire() and limiter.acquire()
    assert slept[2:] == [0.25]


def test_the_plan_counts_rows_a_live_run_is_sending_as_in_flight_not_uncertain(
    example: tuple[Config, RenderedIssue], store: Store, tmp_path: Path
) -> None:
    cfg, rendered = example
    fill(store, tmp_path, generated=5)
    store.snapshot_recipients(EXAMPLE_SLUG)

    def plan() -> delivery.SendPlan:
        with Store.open(store.database) as other:
            return prepare_send(cfg, rendered, other, outbound=Outbound(MemoryTransport)).plan()

    with store.acquire_send_lock(EXAMPLE_SLUG) as lock:
        store.claim_batch(EXAMPLE_SLUG, lock.run_id, 3)
        assert plan().uncertain == 0  # another run's, alive: not ours, and not uncertain
    assert plan().uncertain == 3  # its run ended without recording them


def test_a_plan_made_while_another_sender_fixes_the_recipients_still_counts_them(
    example: tuple[Config, RenderedIssue], store: Store, tmp_path: Path
) -> None:
    cfg, rendered = example
    active = fill(store, tmp_path)

    class Racing(Store):
        """Another sender fixes the recipients just as this one's plan counts them."""

        def count_new_subscribers(self, issue_key: str, segment: Segment | None = None) -> int:
            with Store.open(self.database) as other:
                other.snapshot_recipients(issue_key)
            return super().count_new_subscribers(issue_key, segment)

    with Racing.open(store.database) as racing:
        plan = prepare_send(cfg, rendered, racing, outbound=Outbound(MemoryTransport)).plan()
    assert (plan.recipients, plan.snapshot_fixed, plan.new_subscribers) == (len(active), True, 0)


def test_a_stopped_rate_limiter_says_so() -> None:
    stop = threading.Event()
    stop.set()
    limiter = RateLimiter(1.0, stop)
    assert limiter.acquire()  # the first slot is free
    assert not limiter.acquire()  # the second would wait, but the run is stopped


def test_a_rate_limit_claims_little_ahead() -> None:
    assert delivery._batch_size(SendOptions(), 4, 0.0) == 8
    assert delivery._batch_size(SendOptions(), 16, 0.0) == 32
    assert delivery._batch_size(SendOptions(), 4, 2.0) == 1
    assert delivery._batch_size(SendOptions(batch_size=5), 4, 2.0) == 5


# --- robustness --------------------------------------------------------------------------


class _BrokenAfter(MemoryTransport):
    """A transport with a bug: it raises something that is not a TransportError."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        if len(self.messages) >= self.good:
            raise RuntimeError("boom")
        return super().send(envelope_from, recipient, message)


def test_a_bug_in_a_transport_stops_the_run_and_marks_that_row_uncertain(
    example: tuple[Config, RenderedIssue], store: Store, tmp_path: Path
) -> None:
    cfg, rendered = example
    active = fill(store, tmp_path, generated=10)
    transport = _BrokenAfter(good=4)

    report = prepare_send(cfg, rendered, store, outbound=Outbound(lambda: transport)).run(
        SendOptions(connections=1)
    )

    assert isinstance(report.error, DeliveryError) and "boom" in str(report.error)
    counts = store.ledger_counts(EXAMPLE_SLUG)
    assert (counts[S.SENT], counts[S.UNCERTAIN], counts[S.SENDING]) == (4, 1, 0)
    assert counts[S.DEFERRED] + counts[S.QUEUED] == len(active) - 5
    assert not report.ok


def test_the_bytes_handed_to_the_transport_need_no_line_end_or_dot_fixes(
    example: tuple[Config, RenderedIssue],
) -> None:
    cfg, rendered = example
    template = prepare(rendered, cfg)
    for name in (".Dotty", "Ann $x {y} Ünïcødé", "a" * 200):
        data = template.personalise(
            Recipient("reader@example.org", name, {"city": ".Port\n.Example"}, subscriber_id=7)
        ).data
        assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
        assert b"\r\n." not in data and not data.startswith(b".")
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        # So the fast path of smtp_data_bytes gives exactly what the careful path gives.
        assert smtp_data_bytes(WireReady(data)) == smtp_data_bytes(data) == data + b".\r\n"


@pytest.mark.server
def test_a_leading_dot_survives_the_wire(sender: Sender, store: Store, tmp_path: Path) -> None:
    store.add_subscriber("dot@example.org", ".Dotty Reader")
    sender.send()
    (message,) = sender.server.messages
    import email
    import email.policy

    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    assert parsed["To"].addresses[0].display_name == ".Dotty Reader"
    html = parsed.get_body(("html",))
    assert html is not None
    assert "Hello .Dotty," in html.get_content()  # first_name at the start of a QP line
    # Every line of the HTML arrives as rendered (its first characters included).
    received = html.get_content().replace("\r\n", "\n")
    for line in sender.rendered.html.splitlines():
        if "%%nl:" not in line:
            assert line in received


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nothing_due_means_no_connection_at_all(
    example: tuple[Config, RenderedIssue], store: Store, tmp_path: Path
) -> None:
    cfg, rendered = example
    fill(store, tmp_path)
    memory = MemoryTransport()
    prepare_send(cfg, rendered, store, outbound=Outbound(lambda: memory)).run()
    assert memory.opened == 1
    down = dataclasses.replace(cfg, smtp=dataclasses.replace(cfg.smtp, port=_free_port()))
    report = prepare_send(down, rendered, store).run()
    assert (report.attempts, report.ok) == (0, True)  # nothing to send: the server is not needed


@pytest.mark.server
def test_sends_through_starttls_with_a_login(
    example: tuple[Config, RenderedIssue],
    smtp_server: ServerFactory,
    store: Store,
    tmp_path: Path,
) -> None:
    server = smtp_server(tls="starttls", auth=True)
    active = fill(store, tmp_path)
    cfg = for_server(example[0], server, store.database)
    cfg = dataclasses.replace(cfg, secrets=cfg.secrets.replace(smtp_password=PASSWORD))
    report = prepare_send(cfg, example[1], store).run(SendOptions(connections=2))
    assert report.sent == len(active)
    got = copies(server.messages)
    assert set(got) == active and set(got.values()) == {1}
    assert server.handler.logins and set(server.handler.logins) == {USERNAME}


def test_a_signer_that_breaks_stops_the_run_without_failing_anyone_or_hanging(
    example: tuple[Config, RenderedIssue], store: Store, tmp_path: Path
) -> None:
    """A per-issue problem (here the signer) must not mark the whole list failed."""
    cfg, rendered = example
    active = fill(store, tmp_path, generated=10)
    transport = MemoryTransport()
    calls = 0

    def sign(data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls >= 3:
            raise RuntimeError("key went away")
        return data

    outbound = Outbound(lambda: transport, sign)
    report = prepare_send(cfg, rendered, store, outbound=outbound).run(SendOptions(connections=2))

    assert isinstance(report.error, DeliveryError) and "key went away" in str(report.error)
    counts = store.ledger_counts(EXAMPLE_SLUG)
    assert counts[S.FAILED] == 0 and counts[S.SENDING] == 0
    # Two copies were signed; a worker that sees the stop first hands its copy back.
    assert counts[S.SENT] == len(transport.messages) in (1, 2)
    assert counts[S.DEFERRED] + counts[S.QUEUED] == len(active) - counts[S.SENT]


def test_a_transport_that_cannot_be_made_hands_rows_back_instead_of_uncertain(
    example: tuple[Config, RenderedIssue], store: Store, tmp_path: Path
) -> None:
    cfg, rendered = example
    active = fill(store, tmp_path, generated=10)
    made: list[MemoryTransport] = []
    second_asked = threading.Event()

    class FirstConnection(MemoryTransport):
        def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
            # Hold the first message until the second connection has been asked for:
            # otherwise one fast worker may take every row and the factory never fails.
            second_asked.wait(10)
            return super().send(envelope_from, recipient, message)

    def factory() -> MemoryTransport:
        if made:
            second_asked.set()
            raise RuntimeError("no more sockets")
        made.append(FirstConnection())
        return made[0]

    report = prepare_send(cfg, rendered, store, outbound=Outbound(factory)).run(
        SendOptions(connections=2)
    )

    assert isinstance(report.error, DeliveryError) and "no more sockets" in str(report.error)
    counts = store.ledger_counts(EXAMPLE_SLUG)
    assert (counts[S.UNCERTAIN], counts[S.SENDING], counts[S.FAILED]) == (0, 0, 0)
    assert counts[S.SENT] == len(made[0].messages)
    assert counts[S.SENT] + counts[S.DEFERRED] + counts[S.QUEUED] == len(active)
