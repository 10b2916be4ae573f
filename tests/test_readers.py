"""Readers' feedback checked before it acts: VERP, Message-ID, tokens; forgeries change nothing.

Real databases on both engines (the store's contract, see tests/test_store.py), real
signed tokens, mail shaped as servers write it (tests/support/inbound.py
and the corpus in tests/inbound). Each test names what a forger would try and shows that
it changes nobody, beside the authentic report that does.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from newsletter.db import Database
from newsletter.errors import StoreError
from newsletter.feedback import Feedback, FeedbackKind
from newsletter.inbox import classify
from newsletter.models import DeliveryResult, DeliveryState, Status
from newsletter.readers import (
    FeedbackResult,
    Matcher,
    Outcome,
    apply_webhook,
    mail_key,
    process_mail,
)
from newsletter.store import Store
from newsletter.store import base as store_base
from newsletter.tokens import UNSUBSCRIBE_PURPOSE, TokenSigner, address_fingerprint
from tests.support import SQLITE_ONLY, TEST_SECRET_KEY
from tests.support.inbound import arf, auto_reply, dsn, mailto_unsubscribe, returned_headers

ISSUE = "001-trams-ferries-benches"
SIGNER = TokenSigner(TEST_SECRET_KEY)
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def mid(address: str, issue: str = ISSUE) -> str:
    return f"<{issue}.{address.split('@')[0]}@example.org>"


def sent_issue(store: Store, issue_key: str = ISSUE, only: set[str] | None = None) -> None:
    """A ledger for ``issue_key``: every active subscriber (or ``only``) was sent a copy
    whose Message-ID is ``mid(address, issue_key)``."""
    store.snapshot_recipients(issue_key, include_new=True)
    with store.acquire_send_lock(issue_key):
        claimed = store.claim_batch(issue_key, "test", 10_000)
        store.record_results(
            DeliveryResult(
                issue_key,
                c.subscriber.id,
                DeliveryState.SENT,
                "250 2.0.0 Ok",
                mid(c.subscriber.email, issue_key),
            )
            for c in claimed
            if only is None or c.subscriber.email in only
        )


@pytest.fixture
def store(store: Store) -> Store:
    """The store on each engine (tests/conftest.py): 60 readers, all sent the issue."""
    for n in range(60):
        store.add_subscriber(f"reader{n:02d}@example.com", f"Reader {n}")
    sent_issue(store)
    return store


def process(
    store: Store, data: bytes, *, dry_run: bool = False, soft_limit: int = 3
) -> FeedbackResult:
    return process_mail(
        store,
        data,
        matcher=Matcher(store, SIGNER),
        source="test",
        soft_limit=soft_limit,
        dry_run=dry_run,
    )


def status(store: Store, address: str) -> Status:
    subscriber = store.get_subscriber(address)
    assert subscriber is not None
    return subscriber.status


def verp(store: Store, address: str, issue: str = ISSUE) -> str:
    subscriber = store.get_subscriber(address)
    assert subscriber is not None
    return f"bounces+{SIGNER.verp(subscriber.id, subscriber.email, issue)}@example.org"


def unsubscribe_token(store: Store, address: str, issue: str = ISSUE) -> str:
    subscriber = store.get_subscriber(address)
    assert subscriber is not None
    subject = f"{subscriber.id}:{address_fingerprint(subscriber.email)}"
    return SIGNER.make(UNSUBSCRIBE_PURPOSE, subject, issue)


def statuses(store: Store) -> dict[str, Status]:
    return {s.email: s.status for s in store.list_subscribers()}


# --- the issue's reproductions ---------------------------------------------------------------


def test_a_forged_report_naming_50_subscribers_bounces_nobody(store: Store) -> None:
    before = statuses(store)
    named = [(f"reader{n:02d}@example.com", "5.1.1") for n in range(50)]
    result = process(store, dsn(named, sender="anyone@example.net"))
    assert result.outcome == Outcome.UNMATCHED
    assert len(result.decisions) == 50 and not result.acted
    assert "refers to no message we sent" in result.reason
    assert statuses(store) == before
    assert store.list_bounces() == []


def test_three_forged_soft_reports_do_not_bounce_a_fourth_time(store: Store) -> None:
    for day in (3, 4, 5):
        process(store, dsn([("reader07@example.com", "4.2.2")], day=day))
    reader = store.get_subscriber("reader07@example.com")
    assert reader is not None and reader.status == Status.ACTIVE and reader.soft_bounces == 0


def test_a_forged_report_with_one_real_message_id_acts_only_on_that_subscriber(
    store: Store,
) -> None:
    """Someone who saw reader03's copy (its Message-ID) can at most bounce reader03."""
    named = [(f"reader{n:02d}@example.com", "5.1.1") for n in range(10)]
    data = dsn(
        named, returned=returned_headers("x@example.net", message_id=mid("reader03@example.com"))
    )
    result = process(store, data)
    assert [d.reference.email for d in result.acted if d.reference] == ["reader03@example.com"]
    assert result.reason.endswith("matched by Message-ID; 9 unmatched")
    changed = {a for a, s in statuses(store).items() if s != Status.ACTIVE}
    assert changed == {"reader03@example.com"}


# --- the three ways a report refers to a message we sent ---------------------------------


def test_a_bounce_to_the_verp_address_of_a_copy_bounces_that_subscriber(store: Store) -> None:
    address = "reader11@example.com"
    data = dsn([(address, "5.1.1")], to=verp(store, address))
    result = process(store, data)
    assert result.outcome == Outcome.APPLIED
    (decision,) = result.acted
    assert decision.reference is not None
    assert (decision.reference.by, decision.reference.issue_key) == ("VERP", ISSUE)
    assert decision.effect == "marked bounced"
    assert status(store, address) == Status.BOUNCED
    event = store.subscriber_events(address)[-1]
    assert event.reason == "bounce-hard"
    assert "5.1.1" in event.detail and ISSUE in event.detail
    assert "matched by VERP" in event.detail and result.event_id in event.detail


def test_a_verp_token_also_counts_in_the_returned_return_path(store: Store) -> None:
    address = "reader12@example.com"
    returned = returned_headers(address, return_path=verp(store, address))
    assert process(store, dsn([(address, "5.1.1")], returned=returned)).acted
    assert status(store, address) == Status.BOUNCED


@pytest.mark.parametrize(
    "token",
    [
        "c-aaaaaaaaaaaaaaaa",  # well formed, wrong signature
        "zz-" + "b" * 16,  # no such subscriber
        "not-a-token",
    ],
)
def test_a_verp_address_that_is_not_ours_matches_nothing(store: Store, token: str) -> None:
    address = "reader12@example.com"
    result = process(store, dsn([(address, "5.1.1")], to=f"bounces+{token}@example.org"))
    assert result.outcome == Outcome.UNMATCHED
    assert "a VERP address that is not ours" in result.reason
    assert status(store, address) == Status.ACTIVE


def test_a_verp_token_for_an_issue_the_subscriber_was_not_sent_matches_nothing(
    store: Store,
) -> None:
    address = "reader13@example.com"
    data = dsn([(address, "5.1.1")], to=verp(store, address, "002-never-sent"))
    assert process(store, data).outcome == Outcome.UNMATCHED
    assert status(store, address) == Status.ACTIVE


def test_a_verp_token_survives_a_server_that_changes_the_case(store: Store) -> None:
    address = "reader14@example.com"
    data = dsn(
        [(address, "5.1.1")], to=verp(store, address).upper().replace("BOUNCES+", "bounces+")
    )
    assert process(store, data).acted
    assert status(store, address) == Status.BOUNCED


def test_a_bounce_quoting_a_message_id_of_the_ledger_bounces_its_recipient(store: Store) -> None:
    address = "reader15@example.com"
    returned = returned_headers(address, message_id=mid(address))
    result = process(store, dsn([(address, "5.1.1")], returned=returned))
    (decision,) = result.acted
    assert decision.reference is not None and decision.reference.by == "Message-ID"
    assert decision.reference.message_id == mid(address)
    assert status(store, address) == Status.BOUNCED


def test_the_unsubscribe_token_of_the_returned_message_refers_to_it(store: Store) -> None:
    address = "reader16@example.com"
    token = unsubscribe_token(store, address)
    returned = returned_headers(
        address,
        list_unsubscribe=f"<https://example.org/newsletter/u/{token}>",
    )
    result = process(store, dsn([(address, "5.1.1")], returned=returned))
    (decision,) = result.acted
    assert decision.reference is not None and decision.reference.by == "unsubscribe token"
    assert status(store, address) == Status.BOUNCED


def test_a_forwarded_address_is_the_subscriber_the_message_went_to(store: Store) -> None:
    returned = returned_headers("new.home@example.net", message_id=mid("reader17@example.com"))
    result = process(store, dsn([("new.home@example.net", "5.1.1")], returned=returned))
    assert result.acted
    assert status(store, "reader17@example.com") == Status.BOUNCED


# --- soft bounces, delays ------------------------------------------------------------------


def test_authentic_soft_bounces_count_once_per_issue_and_three_in_a_row_bounce(
    store: Store,
) -> None:
    address = "reader20@example.com"
    issues = [ISSUE, "002-second", "003-third"]
    for issue in issues[1:]:
        sent_issue(store, issue)
    effects = []
    for day, issue in enumerate([ISSUE, ISSUE, *issues[1:]], start=3):
        data = dsn([(address, "4.2.2")], to=verp(store, address, issue), day=day)
        effects += [d.effect for d in process(store, data).acted]
    assert effects == [
        "soft bounce 1 of 3",
        "soft bounce already counted for this issue",
        "soft bounce 2 of 3",
        "marked bounced after 3 soft bounces",
    ]
    event = store.subscriber_events(address)[-1]
    assert event.reason == "bounce-soft" and "3 soft bounces in a row" in event.detail
    assert "matched by VERP" in event.detail


def test_a_delay_warning_is_never_counted(store: Store) -> None:
    address = "reader21@example.com"
    data = dsn([(address, "4.4.7")], to=verp(store, address)).replace(
        b"Action: failed", b"Action: delayed"
    )
    result = process(store, data)
    assert result.outcome == Outcome.NO_ACTION and not result.acted
    assert result.decisions[0].reference is not None  # it is ours, and still not counted
    reader = store.get_subscriber(address)
    assert reader is not None and reader.soft_bounces == 0


# --- complaints ----------------------------------------------------------------------------


def test_a_complaint_about_a_message_we_sent_marks_the_subscriber_complained(
    store: Store, tmp_path: Path
) -> None:
    address = "reader30@example.com"
    result = process(
        store, arf(None, returned=returned_headers("redacted@example.com", message_id=mid(address)))
    )
    assert result.outcome == Outcome.APPLIED
    assert [d.effect for d in result.acted] == ["marked complained"]
    assert status(store, address) == Status.COMPLAINED
    event = store.subscriber_events(address)[-1]
    assert event.reason == "complaint" and "matched by Message-ID" in event.detail
    # An import never makes them active again.
    csv = tmp_path / "list.csv"
    csv.write_text(f"email,status\n{address},active\n", encoding="utf-8")
    store.import_csv(csv)
    assert status(store, address) == Status.COMPLAINED


def test_a_complaint_that_refers_to_nothing_we_sent_changes_nothing(store: Store) -> None:
    address = "reader31@example.com"
    result = process(
        store, arf(address, returned=returned_headers(address, message_id="<x@y.example>"))
    )
    assert result.outcome == Outcome.UNMATCHED
    assert status(store, address) == Status.ACTIVE


# --- mailto unsubscribes -------------------------------------------------------------------


def test_a_mailto_unsubscribe_with_a_valid_token_unsubscribes_and_says_how_and_which_issue(
    store: Store,
) -> None:
    address = "reader40@example.com"
    token = unsubscribe_token(store, address)
    result = process(store, mailto_unsubscribe("someone.else@example.net", f"unsubscribe {token}"))
    assert [d.effect for d in result.acted] == ["unsubscribed"]
    assert status(store, address) == Status.UNSUBSCRIBED
    event = store.subscriber_events(address)[-1]
    assert event.reason == "mailto"
    assert f"issue {ISSUE}" in event.detail and "unsubscribe token" in event.detail
    assert result.event_id in event.detail


def test_a_plain_unsubscribe_from_the_subscribers_own_address_is_honoured(store: Store) -> None:
    result = process(store, mailto_unsubscribe("Reader41@Example.com", "unsubscribe"))
    assert result.acted and result.acted[0].reference is not None
    assert result.acted[0].reference.by == "sender"
    assert status(store, "reader41@example.com") == Status.UNSUBSCRIBED


@pytest.mark.parametrize(
    "subject",
    ["unsubscribe", "unsubscribe dW5zdWJzY3JpYmUfMjE6YWIxMmNk.0THMHCKYWD2HTvwYMIKtvA"],
)
def test_an_unsubscribe_from_a_stranger_without_a_valid_token_changes_nothing(
    store: Store, subject: str
) -> None:
    before = statuses(store)
    result = process(store, mailto_unsubscribe("stranger@example.net", subject))
    assert result.outcome == Outcome.UNMATCHED
    assert statuses(store) == before


def test_a_token_for_a_deleted_subscriber_does_nothing_to_whoever_has_the_id_now(
    database: Database,
) -> None:
    with Store.open(database) as db:
        first = db.add_subscriber("first@example.com")
        token = SIGNER.make(
            UNSUBSCRIBE_PURPOSE, f"{first.id}:{address_fingerprint(first.email)}", ISSUE
        )
        db.remove_subscriber(first.id)
        if db.is_postgres:  # an identity never hands out an id twice, unless reset like this
            db._conn.execute(f"ALTER TABLE subscribers ALTER COLUMN id RESTART WITH {first.id}")
        second = db.add_subscriber("second@example.com")
        assert second.id == first.id  # SQLite reuses the highest id
        result = process(db, mailto_unsubscribe("x@example.net", f"unsubscribe {token}"))
        assert result.outcome == Outcome.UNMATCHED
        assert status(db, "second@example.com") == Status.ACTIVE


# --- what is never acted on ----------------------------------------------------------------


def test_an_auto_reply_is_ignored_even_when_it_quotes_our_message(store: Store) -> None:
    address = "reader50@example.com"
    result = process(store, auto_reply(address, mid(address)))
    assert result.outcome == Outcome.IGNORED and result.kind == "auto-reply"
    assert status(store, address) == Status.ACTIVE


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01garbage\xff" * 50, b"Subject: no sender\n\nhello\n", b"just text\n"],
)
def test_unreadable_mail_is_recorded_with_the_reason_and_processed_once(
    store: Store, data: bytes
) -> None:
    result = process(store, data)
    assert result.outcome == Outcome.UNREADABLE and result.reason
    assert store.is_processed(result.key)
    assert process(store, data).outcome == Outcome.ALREADY_PROCESSED


# --- processed once; dry runs --------------------------------------------------------------


def test_a_mail_is_keyed_by_its_message_id_and_body_not_its_trace_headers(store: Store) -> None:
    address = "reader51@example.com"
    data = dsn([(address, "5.1.1")], to=verp(store, address), ident="same")
    key = mail_key(classify(data), data)
    relayed = b"Received: from relay.example.org\nX-Original-To: x@example.org\n" + data
    crlf = data.replace(b"\n", b"\r\n")
    assert mail_key(classify(relayed), relayed) == key == mail_key(classify(crlf), crlf)
    # A forger who sends first, with the Message-ID a real bounce will have, blocks nothing.
    forged = dsn([(address, "5.1.1")], ident="same")
    assert mail_key(classify(forged), forged) != key
    assert process(store, forged).outcome == Outcome.UNMATCHED
    assert process(store, data).outcome == Outcome.APPLIED
    assert process(store, relayed).outcome == Outcome.ALREADY_PROCESSED


def test_a_dry_run_says_what_it_would_do_and_changes_nothing(store: Store) -> None:
    address = "reader52@example.com"
    data = dsn([(address, "5.1.1")], to=verp(store, address))
    result = process(store, data, dry_run=True)
    assert result.outcome == Outcome.APPLIED and result.dry_run
    line = result.as_json()
    (report,) = line["reports"]
    assert report["action"] == "mark bounced" and report["effect"] is None
    assert report["bounce"] == "hard" and report["status"] == "5.1.1"
    assert report["refers_to"] == {
        "subscriber": address,
        "subscriber_status": "active",
        "issue": ISSUE,
        "message_id": mid(address),
        "by": "VERP",
    }
    assert status(store, address) == Status.ACTIVE
    assert not store.is_processed(result.key)


@SQLITE_ONLY  # SQLite's file lock and busy timeout (see below)
def test_a_database_that_refuses_the_write_is_one_error_and_commits_nothing_of_the_mail(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each mail is its own transaction: a locked database stops the run with a
    StoreError, after every mail before it was committed and with nothing of this one.

    SQLite only: another process's lock on the file makes the write fail after the
    busy timeout; a PostgreSQL writer waits for the lock it needs instead."""
    first = dsn([("reader53@example.com", "5.1.1")], to=verp(store, "reader53@example.com"))
    process(store, first)
    assert store.path is not None
    monkeypatch.setattr(store_base, "BUSY_TIMEOUT_MS", 50)
    second = dsn([("reader54@example.com", "5.1.1")], to=verp(store, "reader54@example.com"))
    with Store.open(store.path) as impatient, sqlite3.connect(store.path) as other:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match="database is locked"):
            process(impatient, second)
        other.rollback()
    assert status(store, "reader53@example.com") == Status.BOUNCED
    assert status(store, "reader54@example.com") == Status.ACTIVE
    assert process(store, second).outcome == Outcome.APPLIED  # not recorded as processed


# --- webhook feedback ------------------------------------------------------------------------


def event(kind: FeedbackKind, recipient: str, event_id: str, *ids: str) -> Feedback:
    return Feedback(
        kind=kind,
        recipient=recipient,
        source="sendgrid",
        event_id=event_id,
        status="5.1.1" if kind == FeedbackKind.HARD_BOUNCE else None,
        message_ids=ids,
    )


def test_webhook_events_act_only_on_subscribers_we_sent_to(store: Store) -> None:
    store.add_subscriber("never.sent@example.com")
    matcher = Matcher(store, SIGNER)
    results = apply_webhook(
        store,
        [
            event(FeedbackKind.HARD_BOUNCE, "reader60@example.com", "e1"),  # no id: by address
            event(FeedbackKind.HARD_BOUNCE, "never.sent@example.com", "e2"),
            event(FeedbackKind.HARD_BOUNCE, "stranger@example.com", "e3"),
            # A Message-ID of someone else's copy: not this subscriber's message.
            event(
                FeedbackKind.COMPLAINT, "reader01@example.com", "e4", mid("reader02@example.com")
            ),
            event(
                FeedbackKind.UNSUBSCRIBE, "reader05@example.com", "e5", mid("reader05@example.com")
            ),
            event(FeedbackKind.HARD_BOUNCE, "reader06@example.com", "e6", "<sg-own-id@sendgrid>"),
        ],
        source="sendgrid",
        matcher=matcher,
        soft_limit=3,
        now=NOW,
    )
    assert results is not None
    assert [r.outcome for r in results] == [
        Outcome.UNMATCHED,  # reader60 does not exist (60 readers: 00-59)
        Outcome.UNMATCHED,
        Outcome.UNMATCHED,
        Outcome.UNMATCHED,
        Outcome.APPLIED,
        Outcome.APPLIED,
    ]
    assert "never sent" in results[1].reason and "another subscriber" in results[3].reason
    assert status(store, "never.sent@example.com") == Status.ACTIVE
    assert status(store, "reader01@example.com") == Status.ACTIVE
    assert status(store, "reader05@example.com") == Status.UNSUBSCRIBED
    assert store.subscriber_events("reader05@example.com")[-1].reason == "sendgrid-unsubscribe"
    assert status(store, "reader06@example.com") == Status.BOUNCED
    again = apply_webhook(
        store,
        [event(FeedbackKind.HARD_BOUNCE, "reader07@example.com", "e6")],
        source="sendgrid",
        matcher=matcher,
        soft_limit=3,
        now=NOW,
    )
    assert again is not None and again[0].outcome == Outcome.ALREADY_PROCESSED
    assert status(store, "reader07@example.com") == Status.ACTIVE


def test_a_replay_token_is_recorded_with_the_feedback_and_refused_after(store: Store) -> None:
    matcher = Matcher(store, SIGNER)

    def apply(token: str, event_id: str) -> object:
        return apply_webhook(
            store,
            [event(FeedbackKind.HARD_BOUNCE, "reader08@example.com", event_id)],
            source="mailgun",
            matcher=matcher,
            soft_limit=3,
            replay_token=token,
            replay_ttl=timedelta(minutes=20),
            now=NOW,
        )

    assert apply("tok-1", "m1") is not None
    assert store.webhook_token_seen("mailgun", "tok-1", now=NOW)
    assert not store.webhook_token_seen("mailgun", "tok-1", now=NOW + timedelta(minutes=21))
    assert apply("tok-1", "m2") is None  # the same token with another event: refused whole
    assert not store.is_processed("mailgun:m2")
