"""Suppression: an address that left (unsubscribed, bounced, complained, removed) stays out.

Real databases on both engines (the store's contract, see tests/test_store.py) and the
real CLI. Every way a subscriber can leave is followed by a
deletion and a re-import of an old CSV: nobody comes back but through their own
double opt-in.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from newsletter.cli import main
from newsletter.db import Database
from newsletter.errors import StoreError
from newsletter.migrations import MIGRATIONS, migrate
from newsletter.models import BounceKind, DeliveryResult, DeliveryState, Status
from newsletter.store import Store
from tests.support.database import dump
from tests.support.delivery import record_bounce

ISSUE = "2024-05"
ADDRESS = "Ann.Lee@Example.COM"
KEY = "ann.lee@example.com"


def old_csv(tmp_path: Path) -> Path:
    path = tmp_path / "old-list.csv"
    path.write_text(f"email,name\n{ADDRESS},Ann\nbob@example.com,Bob\n", encoding="utf-8")
    return path


def send(store: Store, issue: str = ISSUE) -> None:
    """Ledger rows for ``issue``: every active subscriber was sent it."""
    store.snapshot_recipients(issue)
    with store.acquire_send_lock(issue):
        claimed = store.claim_batch(issue, "test", 1000)
        store.record_results(
            DeliveryResult(issue, c.subscriber.id, DeliveryState.SENT, "250 ok", f"<{i}@x>")
            for i, c in enumerate(claimed)
        )


# --- every way of leaving ------------------------------------------------------------------


def _unsubscribe(store: Store) -> None:
    store.unsubscribe(KEY, "one-click", "issue 2024-05")


def _cli_unsubscribe(store: Store) -> None:
    store.set_status(KEY, Status.UNSUBSCRIBED, "cli")


def _complaint(store: Store) -> None:
    store.set_status(KEY, Status.COMPLAINED, "complaint", "ARF abuse report")


def _hard_bounce(store: Store) -> None:
    record_bounce(store, KEY, BounceKind.HARD, "5.1.1", "user unknown", key="<b1@mx>")


def _soft_bounces(store: Store) -> None:
    record_bounce(store, KEY, BounceKind.SOFT, "4.2.2", "mailbox full", key="<s1@mx>", soft_limit=1)


def _smtp_5xx(store: Store) -> None:
    store.snapshot_recipients(ISSUE)
    with store.acquire_send_lock(ISSUE):
        claimed = store.claim_batch(ISSUE, "test", 10)
        store.record_results(
            DeliveryResult(
                ISSUE,
                c.subscriber.id,
                DeliveryState.FAILED,
                "550 5.1.1 no such user",
                bounce=c.subscriber.email.lower() == KEY,
            )
            for c in claimed
        )


def _removed(store: Store) -> None:
    store.remove_subscriber(KEY)


def _removed_by_force(store: Store) -> None:
    send(store)
    with pytest.raises(StoreError, match="delivery record"):
        store.remove_subscriber(KEY)
    store.remove_subscriber(KEY, force=True)


LEAVING: dict[str, tuple[Callable[[Store], None], str]] = {
    "unsubscribe link": (_unsubscribe, "unsubscribed"),
    "cli unsubscribe": (_cli_unsubscribe, "unsubscribed"),
    "complaint": (_complaint, "complained"),
    "hard bounce": (_hard_bounce, "bounced"),
    "soft bounces": (_soft_bounces, "bounced"),
    "smtp 5xx": (_smtp_5xx, "bounced"),
    "removed": (_removed, "removed"),
    "removed --force": (_removed_by_force, "removed"),
}


@pytest.mark.parametrize("way", list(LEAVING))
def test_every_way_of_leaving_survives_deletion_and_an_old_import(
    store: Store, tmp_path: Path, way: str
) -> None:
    leave, reason = LEAVING[way]
    store.import_csv(old_csv(tmp_path))
    assert store.suppression(ADDRESS) is None
    leave(store)
    suppressed = store.suppression(ADDRESS)
    assert suppressed is not None and suppressed.reason == reason
    assert abs(suppressed.at - datetime.now(UTC)) < timedelta(minutes=1)
    if store.get_subscriber(KEY) is not None:
        store.remove_subscriber(KEY, force=True)
    assert store.suppression(KEY.upper()) == suppressed  # the reason and date stay
    report = store.import_csv(old_csv(tmp_path))
    assert (report.added, report.suppressed, report.unchanged) == (0, 1, 1)
    assert store.get_subscriber(KEY) is None
    bob = store.get_subscriber("bob@example.com")
    assert bob is not None and bob.status == Status.ACTIVE


def test_an_import_of_inactive_new_rows_suppresses_them(store: Store, tmp_path: Path) -> None:
    csv_file = tmp_path / "export.csv"
    csv_file.write_text(
        "email,status\ngone@example.com,unsubscribed\nspam@example.com,complained\n"
        "dead@example.com,cleaned\nhere@example.com,subscribed\n",
        encoding="utf-8",
    )
    store.import_csv(csv_file)
    reasons = {
        a: s.reason
        for a in ("gone", "spam", "dead", "here")
        if (s := store.suppression(f"{a}@example.com"))
    }
    assert reasons == {"gone": "unsubscribed", "spam": "complained", "dead": "bounced"}


def test_import_counts_add_up_with_suppressed_rows(store: Store, tmp_path: Path) -> None:
    for address in ("gone@example.com", "left@example.com"):
        store.add_subscriber(address)
        store.remove_subscriber(address)
    store.add_subscriber("quit@example.com")
    store.unsubscribe("quit@example.com", "link")
    store.add_subscriber("stay@example.com", "Stay")
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(
        "email,name\nGONE@example.com,G\nleft@example.com,L\ngone@example.com,again\n"
        "quit@example.com,Q\nstay@example.com,Stay\nnew@example.com,N\nbroken,X\n",
        encoding="utf-8",
    )
    report = store.import_csv(csv_file)
    assert (report.added, report.unchanged, report.skipped_inactive) == (1, 1, 1)
    assert (report.suppressed, report.duplicates, report.error_count) == (2, 1, 1)
    assert (
        report.rows
        == 7
        == (
            report.added
            + report.updated
            + report.unchanged
            + report.skipped_inactive
            + report.suppressed
            + report.duplicates
            + report.error_count
        )
    )


# --- what is kept -------------------------------------------------------------------------


def test_the_entry_holds_no_plain_address_and_its_hash_is_keyed_per_database(
    database: Database, other_database: Database
) -> None:
    hashes = []
    for where in (database, other_database):
        with Store.open(where) as db:
            db.add_subscriber(ADDRESS, "Ann Lee", {"city": "Oslo"})
            assert "ann.lee" in dump(db).lower()  # the dump would show it
            db.remove_subscriber(ADDRESS)
            assert db.suppression(ADDRESS) is not None and db.count_suppressions() == 1
            text = dump(db)
            assert "ann.lee" not in text.lower() and "Oslo" not in text
            hashes.append(bytes(db._one("SELECT address_hash FROM suppressions")[0]))
    # Not a plain hash anyone can recompute, and not the same in two databases.
    assert hashes[0] != hashes[1]
    for plain in (hashlib.sha256(KEY.encode()).digest(), hashlib.md5(KEY.encode()).digest()):
        assert plain[: len(hashes[0])] != hashes[0]


def test_adding_a_suppressed_address_is_refused(store: Store) -> None:
    store.add_subscriber(ADDRESS)
    store.set_status(ADDRESS, Status.BOUNCED, "bounce-hard", "5.1.1")
    store.remove_subscriber(ADDRESS)
    with pytest.raises(StoreError, match=r"suppressed \(bounced on \d{4}-\d\d-\d\d\)") as caught:
        store.add_subscriber(KEY)
    assert "subscribe form" in str(caught.value)
    assert store.get_subscriber(KEY) is None


def test_only_the_persons_own_confirmation_lifts_it(store: Store, tmp_path: Path) -> None:
    store.add_subscriber(ADDRESS, "Ann")
    store.unsubscribe(ADDRESS, "link")
    # The editor cannot make them active again.
    with pytest.raises(StoreError, match="suppressed"):
        store.set_status(ADDRESS, Status.ACTIVE, "cli")
    store.remove_subscriber(ADDRESS)
    # They ask again through the form: pending, still suppressed until they click.
    request = store.request_confirmation(KEY, resend_after=timedelta(minutes=10))
    assert request.created and request.subscriber.status == Status.PENDING
    assert store.suppression(KEY) is not None
    report = store.import_csv(old_csv(tmp_path))  # an import finds them pending, as they are
    pending = store.get_subscriber(KEY)
    assert pending is not None and pending.status == Status.PENDING
    assert (report.added, report.suppressed) == (1, 0)
    confirmed = store.confirm_subscription(pending.id, issued_at=datetime.now(UTC))
    assert confirmed is not None and confirmed.status == Status.ACTIVE
    assert store.suppression(KEY) is None
    # Leaving again suppresses again.
    store.unsubscribe(KEY, "link")
    again = store.suppression(KEY)
    assert again is not None and again.reason == "unsubscribed"


def test_a_database_from_before_suppression_gets_entries_for_who_left(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:5], where="old")
    for address, status in (
        ("gone@example.com", "unsubscribed"),
        ("dead@example.com", "bounced"),
        ("here@example.com", "active"),
    ):
        conn.execute(
            "INSERT INTO subscribers (email, email_key, status, created_at, updated_at,"
            " status_changed_at) VALUES (?1, ?1, ?2, 't', 't', '2023-01-02T03:04:05+00:00')",
            (address, status),
        )
    conn.close()
    with Store.open(path) as db:
        gone, dead = db.suppression("gone@example.com"), db.suppression("dead@example.com")
        assert gone is not None and gone.reason == "unsubscribed"
        assert dead is not None and dead.at == datetime(2023, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert db.suppression("here@example.com") is None
        assert db.count_suppressions() == 2


# --- the issue's report, through the CLI ----------------------------------------------------


def cli(workspace: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["-C", str(workspace), *args])


def test_removed_hard_bounce_is_not_reactivated_by_an_old_csv(tmp_path: Path) -> None:
    """Issue 11: `subscribers remove --force` on a hard-bounced address, then re-importing
    an old CSV, made them active again."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "newsletter.toml").write_text('[newsletter]\nname = "T"\n', encoding="utf-8")
    csv_file = old_csv(tmp_path)
    assert cli(workspace, "subscribers", "import", str(csv_file)).exit_code == 0
    with Store.open(workspace / ".newsletter" / "newsletter.db") as db:
        send(db)
        _hard_bounce(db)
    removed = cli(workspace, "subscribers", "remove", "--force", KEY)
    assert removed.exit_code == 0, removed.output
    again = cli(workspace, "subscribers", "import", str(csv_file))
    assert again.exit_code == 0, again.output
    assert "0 added" in again.stdout and "1 suppressed" in again.stdout
    listed = cli(workspace, "subscribers", "list")
    assert listed.stdout.splitlines() == ["bob@example.com\tactive\tBob"]
    add = cli(workspace, "subscribers", "add", KEY)
    assert add.exit_code == 1
    assert add.stderr.startswith("Error: ")
    assert f"{KEY} is suppressed (bounced on " in add.stderr
    assert len(add.stderr.splitlines()) == 1
