"""Pacing for the receiving side: per-domain rates, slowing down on a rate-limit reply,
the warm-up plan's daily cap; the send loop against a real SMTP server and database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from pathlib import Path

import psycopg
import pytest

from newsletter import config, delivery
from newsletter.config import Config
from newsletter.errors import ConfigError, DeliveryError
from newsletter.models import DeliveryState
from newsletter.pacing import (
    MIN_RATE,
    RECOVER_SECONDS,
    SLOW_DOWN_GUARD,
    DomainPacer,
    is_rate_limited,
    warmup_cap,
)
from newsletter.render import render_issue
from newsletter.store import Store
from tests.support import copy_example, example_issue, load_config
from tests.support.delivery import copies, for_server, nonzero
from tests.support.postgres import PostgresServer
from tests.support.smtp_server import Faults, Received, ServerFactory, SmtpTestServer

S = DeliveryState
KEY = "001-trams-ferries-benches"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_domain_counts_against_the_longest_configured_domain_it_is_under() -> None:
    pacer = DomainPacer((("gmail.example.com", 20.0), ("example.com", 100.0)))
    assert pacer.key("gmail.example.com") == "gmail.example.com"
    assert pacer.key("eu.gmail.example.com") == "gmail.example.com"
    assert pacer.key("notgmail.example.com") == "example.com"
    assert pacer.key("example.org") == "example.org"
    assert pacer.rate("gmail.example.com") == 20.0
    assert pacer.rate("example.org") is None  # no default: no limit of its own


def test_senders_sharing_a_domain_limit_each_take_their_part_of_it() -> None:
    clock = FakeClock()
    pacer = DomainPacer((("gmail.example.com", 20.0),), 4.0, clock=clock)
    pacer.share = 2  # two senders alive on the database
    assert pacer.rate("gmail.example.com") == 10.0 and pacer.rate("example.org") == 2.0
    assert pacer.take("gmail.example.com")
    assert pacer.wait("gmail.example.com") == pytest.approx(0.1)
    assert pacer.hold("gmail.example.com") == 2


def test_sends_to_a_limited_domain_are_spaced_and_others_are_not() -> None:
    clock = FakeClock()
    pacer = DomainPacer((("gmail.example.com", 20.0),), clock=clock)
    assert pacer.take("gmail.example.com")
    assert not pacer.take("gmail.example.com")  # the next slot is 50 ms away
    assert pacer.wait("gmail.example.com") == pytest.approx(0.05)
    assert all(pacer.take("example.org") for _ in range(100))
    clock.now += 0.05
    assert pacer.take("gmail.example.com") and not pacer.take("gmail.example.com")
    # A slot missed is not saved up for a burst.
    clock.now += 10
    assert pacer.take("gmail.example.com") and not pacer.take("gmail.example.com")


def test_a_rate_limit_reply_halves_that_domain_only_and_it_recovers() -> None:
    clock = FakeClock()
    pacer = DomainPacer((("gmail.example.com", 20.0),), default=0.0, clock=clock)
    assert pacer.slow_down("gmail.example.com") == 10.0
    assert pacer.rate("gmail.example.com") == 10.0
    assert pacer.rate("example.org") is None
    clock.now += RECOVER_SECONDS
    assert pacer.rate("gmail.example.com") == 15.0
    clock.now += RECOVER_SECONDS
    assert pacer.rate("gmail.example.com") == 20.0  # its own limit again, not more
    # A domain without a limit is slowed to half of what it was sending at.
    for _ in range(40):
        pacer.take("example.net")
    assert pacer.slow_down("example.net") == pytest.approx(10.0)  # 40 in the 2 s window
    assert pacer.throttled("example.net")
    clock.now += RECOVER_SECONDS * 2
    assert not pacer.throttled("example.net")  # back to no limit once it recovered
    # The replies to the messages already in flight do not halve it again and again.
    pacer.slow_down("gmail.example.com")
    assert pacer.slow_down("gmail.example.com") == pacer.rate("gmail.example.com") == 10.0
    for _ in range(5):
        clock.now += SLOW_DOWN_GUARD
        pacer.slow_down("example.org")
    assert pacer.rate("example.org") == MIN_RATE


@pytest.mark.parametrize(
    ("code", "reply", "limited"),
    [
        (421, "4.3.2 Service shutting down", True),
        (450, "4.2.1 The user is receiving mail at a rate that prevents more", True),
        (421, "4.7.28 unusual rate of unsolicited mail", True),
        (451, "4.7.500 Server busy. Please try again later", True),
        (451, "Too many messages from your IP", True),
        (452, "4.2.2 Mailbox full", False),
        (451, "4.3.0 Temporary lookup failure", False),
        (550, "5.7.1 rate limited", False),
        (None, "connection lost", False),
    ],
)
def test_which_replies_mean_slow_down(code: int | None, reply: str, limited: bool) -> None:
    assert is_rate_limited(code, reply) is limited


def test_domain_rates_in_the_config(tmp_path: Path) -> None:
    ws = copy_example(
        tmp_path / "ws",
        extra='[delivery]\ndomain_rate = 50\n\n[delivery.domains]\n"Gmail.com" = 20\n',
    )
    cfg = load_config(ws)
    assert cfg.delivery.domains == (("gmail.com", 20.0),)
    assert cfg.delivery.domain_rate == 50.0
    bad = copy_example(tmp_path / "bad", extra='[delivery.domains]\n"gmail.com" = 0\n')
    with pytest.raises(ConfigError) as caught:
        config.load(bad)
    assert "[delivery.domains] gmail.com: the rate must be a number above 0" in str(caught.value)


def test_a_claim_skips_the_domains_it_is_told_to(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as store:
        for email in (
            "a@gmail.example.com",
            "b@eu.gmail.example.com",
            "c@notgmail.example.com",
            "d@example.org",
        ):
            store.add_subscriber(email)
        store.snapshot_recipients(KEY)
        with store.acquire_send_lock(KEY) as lock:
            got = store.claim_batch(KEY, lock.run_id, 10, skip_domains=["gmail.example.com"])
            assert [c.subscriber.email for c in got] == ["c@notgmail.example.com", "d@example.org"]
            rest = store.claim_batch(KEY, lock.run_id, 10)
            assert len(rest) == 2


# --- the send loop ------------------------------------------------------------------------


def _site(
    cfg: Config, tmp_path: Path, server: SmtpTestServer, emails: list[str], **settings: object
) -> tuple[Config, Store]:
    db = tmp_path / "news.db"
    wired = for_server(cfg, server, db, **settings)
    store = Store.open(db)
    csv = tmp_path / "list.csv"
    csv.write_text("email\n" + "".join(f"{e}\n" for e in emails), encoding="utf-8")
    store.import_csv(csv)
    return wired, store


@pytest.mark.server
def test_a_limited_domain_keeps_its_rate_while_the_others_go_ahead(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server()
    arrived: list[tuple[float, str]] = []

    def on_message(message: Received) -> None:
        arrived.append((time.monotonic(), message.recipients[0]))

    server.handler.on_message = on_message
    throttled = [f"g{i}@gmail.example.com" for i in range(40)]
    others = [f"r{i}@example.{('org', 'com', 'net')[i % 3]}" for i in range(160)]
    # The throttled domain first in the list: a plain claim order would stall on it.
    wired, store = _site(
        cfg, tmp_path, server, throttled + others, domains=(("gmail.example.com", 20.0),)
    )
    with store:
        report = delivery.prepare_send(
            wired, render_issue(example_issue(wired), wired), store
        ).run()
    assert report.ok and report.sent == 200
    assert copies(server.messages) == dict.fromkeys(throttled + others, 1)
    gmail = [t for t, rcpt in arrived if rcpt.endswith("@gmail.example.com")]
    rest = [t for t, rcpt in arrived if not rcpt.endswith("@gmail.example.com")]
    # 40 messages at 20/s: 39 gaps of at least 50 ms between their releases.
    assert (len(gmail) - 1) / (gmail[-1] - gmail[0]) <= 20 * 1.05
    # The other 160 did not wait for them: all in before half of the throttled ones.
    assert sum(1 for t in gmail if t < rest[-1]) <= len(gmail) // 2


@pytest.mark.server
def test_a_rate_limit_reply_from_one_domain_slows_that_domain_only(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    first = "g0@gmail.example.com"
    server = smtp_server(
        Faults(
            rcpt={first: "450 4.2.1 receiving mail at a rate that prevents more"},
            rcpt_times={first: 1},
        )
    )
    emails = [f"g{i}@gmail.example.com" for i in range(20)] + [
        f"r{i}@example.org" for i in range(60)
    ]
    wired, store = _site(cfg, tmp_path, server, emails, domains=(("gmail.example.com", 40.0),))
    with store:
        report = delivery.prepare_send(
            wired, render_issue(example_issue(wired), wired), store
        ).run()
        assert report.slowed == 1 and report.retried == 1
        assert nonzero(store.ledger_counts(KEY)) == {"sent": 80}
    assert copies(server.messages) == dict.fromkeys(emails, 1)


@pytest.mark.server
def test_the_warm_up_plan_caps_a_day_and_leaves_the_rest_queued(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server()
    emails = [f"r{i}@example.org" for i in range(10)]
    today = dt.datetime.now(dt.UTC).date()
    wired, store = _site(cfg, tmp_path, server, emails)
    wired = dataclasses.replace(
        wired,
        delivery=dataclasses.replace(
            wired.delivery,
            warmup_start=(today - dt.timedelta(days=1)).isoformat(),
            warmup_days=5,
            warmup_initial=2,
            warmup_growth=2.0,
        ),
    )
    assert warmup_cap(wired, today) == 4  # day 2: 2, then 4
    assert warmup_cap(wired, today + dt.timedelta(days=4)) is None  # the plan is over
    with store:
        prepared = delivery.prepare_send(wired, render_issue(example_issue(wired), wired), store)
        assert prepared.plan().recipients == 4 and prepared.plan().warmup_left == 4
        report = prepared.run()
        assert report.sent == 4 and report.warmup_left == 4
        assert nonzero(store.ledger_counts(KEY)) == {"sent": 4, "queued": 6}
        again = prepared.run()
        assert again.sent == 0 and again.warmup_left == 0
    assert len(server.messages) == 4


@pytest.mark.server
def test_senders_on_postgresql_share_the_warm_up_cap(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory, postgres_server: PostgresServer
) -> None:
    """Two sends of one issue at once on PostgreSQL send the day's cap between them, not
    each the whole of it (one send on SQLite cannot exceed it either)."""
    server = smtp_server()
    database = postgres_server.new_database()
    today = dt.datetime.now(dt.UTC).date()
    wired = for_server(
        cfg,
        server,
        database,
        warmup_start=(today - dt.timedelta(days=1)).isoformat(),
        warmup_days=5,
        warmup_initial=2,
        warmup_growth=2.0,  # today: 4
    )
    csv = tmp_path / "list.csv"
    csv.write_text("email\n" + "".join(f"r{i}@example.org\n" for i in range(20)), "utf-8")
    stores = [Store.open(database) for _ in range(2)]
    stores[0].import_csv(csv)
    gate = threading.Event()

    def hold_the_first(message: Received) -> None:
        if len(server.messages) == 1:  # until both senders have registered
            assert gate.wait(30)

    server.handler.on_message = hold_the_first
    issue = render_issue(example_issue(wired), wired)
    reports: list[delivery.DeliveryReport] = []
    threads = [
        threading.Thread(
            target=lambda s=store: reports.append(delivery.prepare_send(wired, issue, s).run())
        )
        for store in stores
    ]
    try:
        for thread in threads:
            thread.start()
        while len(stores[0].senders(KEY)) < 2 and any(t.is_alive() for t in threads):
            gate.wait(0.01)
        gate.set()
        for thread in threads:
            thread.join(60)
        assert len(reports) == 2
        assert len(server.messages) == 4
        assert nonzero(stores[0].ledger_counts(KEY)) == {"sent": 4, "queued": 16}
    finally:
        gate.set()
        for store in stores:
            store.close()


@pytest.mark.server
def test_a_sender_that_lost_its_lease_stops_sending_the_rows_it_still_holds(
    cfg: Config, tmp_path: Path, smtp_server: ServerFactory, postgres_server: PostgresServer
) -> None:
    """Once another sender has taken its rows as uncertain (its lease ran out while the
    database was out of reach), a run sends none of them: a resend of the uncertain
    would send those twice."""
    server = smtp_server()
    database = postgres_server.new_database()
    wired = for_server(cfg, server, database, connections=1, lease_seconds=1.5)
    csv = tmp_path / "list.csv"
    csv.write_text("email\n" + "".join(f"r{i}@example.org\n" for i in range(60)), "utf-8")
    store = Store.open(database)
    store.import_csv(csv)

    def expire_at_the_fifth(message: Received) -> None:
        if len(server.messages) != 5:
            return
        # What another sender does to a run whose lease ran out (store.ledger._expire_runs).
        with psycopg.connect(database.url, autocommit=True) as conn:
            conn.execute("UPDATE senders SET state = 'expired' WHERE state = 'running'")
            conn.execute("UPDATE deliveries SET state = 'uncertain' WHERE state = 'sending'")
        deadline = time.monotonic() + 10  # the heartbeat's next renewal finds it out
        while not store.lease_lost(KEY) and time.monotonic() < deadline:
            threading.Event().wait(0.01)

    server.handler.on_message = expire_at_the_fifth
    try:
        issue = render_issue(example_issue(wired), wired)
        with pytest.raises(DeliveryError, match="lost its lease"):
            delivery.prepare_send(wired, issue, store).run(delivery.SendOptions(batch_size=40))
        # The fifth's reply was on its way; at most the one after it had been handed over.
        assert len(server.messages) <= 6, len(server.messages)
        assert store.ledger_counts(KEY)[S.SENT] == 0  # its results came too late to count
    finally:
        store.close()
