"""`newsletter db copy`, `db migrate` and `db status`, on real SQLite files and a real
PostgreSQL server (the `postgres_server` fixture).

The round trip SQLite -> PostgreSQL -> SQLite of a store that has a row in every table
gives the same checksums on all three, and the copies behave as the original does.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from newsletter import dbcopy
from newsletter.cli import main
from newsletter.db import Database, connect
from newsletter.errors import StoreError
from newsletter.feedback import FeedbackKind
from newsletter.migrations import MIGRATIONS, migrate, schema_target
from newsletter.models import (
    BounceKind,
    DeliveryResult,
    DeliveryState,
    FeedbackAction,
    FeedbackItem,
    ReplayToken,
)
from newsletter.ratelimit import DatabaseStorage
from newsletter.store import Store
from tests.support.delivery import record_bounce
from tests.support.postgres import PostgresServer

# Keys whose byte order ("Z" < "a" < "ä") differs from a language's ("a" < "ä" < "Z"):
# both engines must read them in one order for the checksums to agree.
ISSUES = ("2026-01-Zebra", "2026-02-apple", "2026-03-äpfel")
SUPPRESSED = {
    "left@example.org": "unsubscribed",
    "bounced@example.org": "bounced",
    "removed@example.org": "removed",
    "erased@example.org": "erased",
}
CSV = """\
email,name,city,tags,signup_date
imported.one@example.org,Ïmported Öne,Zürich,europe;Harbours,2024-05-01
imported.two@example.org,"Two, Imported","🙂 ""quoted"" \\ back",europe,2024-06-01
"""


def populate(store: Store, tmp: Path) -> None:
    """A row in every table: subscribers with fields and tags, an import, consents,
    confirmations, a ledger in every state, bounces, every kind of suppression,
    schedules, publications, rate limits, a webhook token, processed messages."""
    (tmp / "list.csv").write_text(CSV, encoding="utf-8")
    store.import_csv(tmp / "list.csv")
    readers = [
        store.add_subscriber(f"reader{n}@example.org", f"Rëader {n}", {"n": str(n), "x": "ÿ"})
        for n in range(10)
    ]
    gone = {address: store.add_subscriber(address, "Soon Gone") for address in SUPPRESSED}
    store.change_tags(readers[0].id, ["Topic-B", "topic-a", "Ärger"])
    store.request_confirmation(
        "pending@example.org", "Pen Ding", resend_after=timedelta(0), page="/subscribe"
    )
    for key in ISSUES:  # the later two stay queued
        store.snapshot_recipients(key)
        store.set_publication(key, "published")
        store.set_schedule(key, datetime(2030, 1, 1, 9, tzinfo=UTC), zone="Europe/Berlin")
    key = ISSUES[0]
    store.unsubscribe(gone["left@example.org"].id, "one-click")
    later = datetime(2030, 1, 1, tzinfo=UTC)
    outcomes = (DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.DEFERRED)
    outcomes += (DeliveryState.UNCERTAIN, None)  # None: left `sending`
    with store.acquire_send_lock(key):
        claimed = store.claim_batch(key, "test-run", 100)  # `left@` is cancelled on the way
        store.record_results(
            DeliveryResult(
                key,
                c.subscriber.id,
                state,
                f"{n} reply",
                f"<{n}@example.org>",
                later if state == DeliveryState.DEFERRED else None,
            )
            for n, c in enumerate(claimed)
            if (state := outcomes[n % len(outcomes)]) is not None
        )
    record_bounce(
        store,
        "bounced@example.org",
        BounceKind.HARD,
        "5.1.1",
        "550 no such user",
        key="bounce-1",
        issue_key=key,
    )
    record_bounce(store, "reader1@example.org", BounceKind.SOFT, "4.2.2", "mailbox full", key="b2")
    unsubscribe = FeedbackAction(
        FeedbackKind.UNSUBSCRIBE, readers[2].id, "reader2@example.org", key, "mailto", "test"
    )
    store.record_feedback(
        [FeedbackItem("hook-1", "mailgun", "applied", (unsubscribe,))],
        soft_limit=3,
        replay=ReplayToken("mailgun", "token-1", datetime.now(UTC) + timedelta(hours=1)),
    )
    store.remove_subscriber("removed@example.org", force=True)
    store.erase_person("erased@example.org")
    limits = DatabaseStorage(store.database)
    limits.incr("client/127.0.0.1", 3600)
    limits.close()


@pytest.fixture
def original(tmp_path: Path) -> Database:
    database = Database.parse(tmp_path / "original.db")
    with Store.open(database) as store:
        populate(store, tmp_path)
    return database


@pytest.fixture
def icu_database(postgres_server: PostgresServer) -> Iterator[Database]:
    """An empty PostgreSQL database whose text sorts by a language (ICU en-US), not bytes."""
    name = "copy_icu"
    with postgres_server.admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING UTF8'
            " LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        )
    database = Database.parse(postgres_server.url(name))
    yield database
    postgres_server.drop_database(database)


def checksums(report: dbcopy.CopyReport) -> dict[str, tuple[int, str]]:
    return {table.name: (table.rows, table.checksum) for table in report.tables}


def counts(database: Database) -> dict[str, int]:
    return dict(dbcopy.status(database).rows)


def table_sums(database: Database) -> dict[str, str]:
    """Each table's checksum, its columns in name order, read apart from any copy."""
    conn = connect(database)
    try:
        conn.begin(exclusive=False)
        return {
            name: dbcopy.table_checksum(conn, table, sorted(table.columns)).hexdigest()
            for name, table in dbcopy.describe(conn).items()
        }
    finally:
        conn.rollback()
        conn.close()


def looks(store: Store, address: str) -> tuple[object, ...]:
    """What the store tells about an address."""
    return (
        store.get_subscriber(address),
        store.subscriber_events(address),
        store.confirmation_sent_at(address),
        store.sent_messages(store.get_subscriber(address).id),  # type: ignore[union-attr]
    )


def ledger(store: Store) -> dict[DeliveryState, int]:
    total: dict[DeliveryState, int] = {}
    for key in ISSUES:
        for state, n in store.ledger_counts(key).items():
            total[state] = total.get(state, 0) + n
    return total


def test_a_round_trip_to_postgresql_and_back_keeps_every_row(
    original: Database, icu_database: Database, tmp_path: Path
) -> None:
    back = Database.parse(tmp_path / "back.db")
    there = dbcopy.copy_database(original, icu_database)
    again = dbcopy.copy_database(icu_database, back)
    assert there.ok and again.ok
    assert checksums(there) == checksums(again)
    # Every table of the schema went, and the store above had a row in each.
    assert set(checksums(there)) == set(counts(original))
    assert all(rows for rows, _ in checksums(there).values()), checksums(there)
    # Checked apart from the copy's own verification, on the three databases.
    assert counts(original) == counts(icu_database) == counts(back)
    assert table_sums(original) == table_sums(icu_database) == table_sums(back)


def test_the_copies_behave_as_the_original(
    original: Database, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    there = postgres_server.new_database()
    back = Database.parse(tmp_path / "back.db")
    assert dbcopy.copy_database(original, there).ok
    assert dbcopy.copy_database(there, back).ok
    with Store.open(original) as first:
        states = ledger(first)
        assert set(states) == set(DeliveryState), states
        people = {a: looks(first, a) for a in ("reader0@example.org", "pending@example.org")}
        bounces = first.list_bounces()
        tags = first.tags_of("reader0@example.org")
        top = first._one("SELECT max(id) FROM subscribers")[0]
    for database in (there, back):
        with Store.open(database) as copy:
            assert ledger(copy) == states
            assert copy.tags_of("reader0@example.org") == tags
            for address, record in people.items():
                assert looks(copy, address) == record
            assert copy.list_bounces() == bounces
            # Suppressed addresses still match: the hash key came along with the hashes.
            for address, reason in SUPPRESSED.items():
                found = copy.suppression(address)
                assert found is not None and found.reason == reason
            with pytest.raises(StoreError, match="suppress"):
                copy.add_subscriber("Removed@Example.org")
            # New rows get new ids (PostgreSQL's sequences were moved past the copied ids).
            assert copy.add_subscriber("brand.new@example.org").id == top + 1


def test_a_failure_midway_leaves_a_postgresql_target_as_it_was(
    original: Database, postgres_server: PostgresServer
) -> None:
    target = postgres_server.new_database()
    before = counts(target)
    with psycopg.connect(target.url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'no space left on device (test)'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON deliveries FOR EACH ROW"
            " EXECUTE FUNCTION refuse()"
        )
        key = conn.execute("SELECT key FROM suppression_key").fetchone()
    with pytest.raises(dbcopy.CopyError) as caught:
        dbcopy.copy_database(original, target)
    message = str(caught.value)
    assert "cannot copy table deliveries: no space left on device (test)" in message
    assert message.endswith("nothing was written to DST")
    assert counts(target) == before  # subscribers and the rest, copied first, are gone
    with psycopg.connect(target.url) as conn:
        assert conn.execute("SELECT key FROM suppression_key").fetchone() == key


def test_a_failure_midway_leaves_a_sqlite_target_as_it_was(
    original: Database, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    source = postgres_server.new_database()
    dbcopy.copy_database(original, source)
    target = Database.parse(tmp_path / "target.db")
    Store.open(target).close()
    with sqlite3.connect(tmp_path / "target.db") as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON deliveries"
            " BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END"
        )
    before = counts(target)
    with pytest.raises(dbcopy.CopyError, match="cannot copy table deliveries: disk I/O error"):
        dbcopy.copy_database(source, target)
    assert counts(target) == before


def test_a_nul_that_postgresql_cannot_store_is_named_and_nothing_is_written(
    original: Database, postgres_server: PostgresServer
) -> None:
    assert original.path is not None
    with sqlite3.connect(original.path) as conn:
        conn.execute("UPDATE subscriber_events SET detail = 'a' || char(0) || 'b' WHERE id = 3")
    target = postgres_server.new_database()
    with pytest.raises(dbcopy.CopyError) as caught:
        dbcopy.copy_database(original, target)
    assert str(caught.value) == (
        f"{original}: table subscriber_events, row id 3: detail holds a NUL character, which"
        " PostgreSQL cannot store; remove it there and copy again; nothing was written to DST"
    )
    assert counts(target)["subscribers"] == 0


@pytest.fixture
def source(original: Database, postgres_server: PostgresServer) -> Database:
    """The original's copy on PostgreSQL."""
    database = postgres_server.new_database()
    assert dbcopy.copy_database(original, database).ok
    return database


@pytest.mark.server
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_copy_killed_midway_leaves_the_target_as_it_was(
    source: Database, postgres_server: PostgresServer, tmp_path: Path, engine: str
) -> None:
    if engine == "sqlite":
        target = Database.parse(tmp_path / "target.db")
        Store.open(target).close()
    else:
        target = postgres_server.new_database()
    before = counts(target)
    # The copy cannot get past the ledger (the last table) while this transaction lives.
    with psycopg.connect(source.url) as lock:
        lock.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        copy = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "db", "copy", source.url, str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert copy.stdout is not None
        assert copy.stdout.readline().startswith("Copying ")
        assert copy.stdout.readline().split()[0] == "subscribers"  # written, not committed
        copy.kill()
        copy.wait()
        copy.stdout.close()
        assert copy.stderr is not None
        copy.stderr.close()
    assert counts(target) == before


def test_a_new_sqlite_target_goes_again_when_the_copy_fails(
    source: Database, tmp_path: Path
) -> None:
    target = Database.parse(tmp_path / "new.db")
    started = threading.Event()
    failed: list[BaseException] = []

    def run_copy() -> None:
        try:
            dbcopy.copy_database(source, target, on_table=lambda _: started.set())
        except BaseException as exc:  # handed to the test
            failed.append(exc)

    with psycopg.connect(source.url) as lock:
        lock.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(target=run_copy)
        thread.start()
        assert started.wait(30)
        # The server drops the copy's connection to the source (a restart, a failover).
        lock.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        thread.join(30)
    (error,) = failed
    assert isinstance(error, dbcopy.CopyError)
    assert re.search(r": cannot copy table \w+: .*; nothing was written to DST$", str(error))
    assert not any(tmp_path.glob("new.db*"))


# --- the command ----------------------------------------------------------------------------


def run(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(main, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def test_the_command_prints_a_line_per_table_and_refuses_a_full_target(
    runner: CliRunner, original: Database, postgres_server: PostgresServer
) -> None:
    target = postgres_server.new_database()
    code, out, err = run(runner, "db", "copy", str(original), target.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"Copying {original} -> {target}"
    tables = lines[1:-1]
    assert len(tables) == len(counts(original))
    subscribers = next(line for line in tables if line.split()[0] == "subscribers")
    assert subscribers.split()[1:3] == [str(counts(original)["subscribers"]), "rows"]
    assert all(line.endswith("  ok") and " sha256 " in line for line in tables)
    assert lines[-1].startswith("Copied ") and "every table verified" in lines[-1]
    # Again: DST now holds a list.
    code, out, err = run(runner, "db", "copy", str(original), target.url)
    assert code == 1
    held = [f"{name}: {n}" for name, n in counts(target).items() if name != "suppression_key"]
    assert err.splitlines() == [
        f"Error: {target}: DST already holds data ({', '.join(held[:4])}, ...); copy into a"
        " new, empty database, or add --replace to delete what it holds"
    ]
    code, out, err = run(runner, "db", "copy", "--replace", str(original), target.url)
    assert code == 0, err


def test_a_difference_after_the_copy_is_exit_1_and_the_target_stays_empty(
    runner: CliRunner, original: Database, tmp_path: Path
) -> None:
    target = tmp_path / "target.db"
    Store.open(target).close()
    with sqlite3.connect(target) as conn:  # something on DST changes what it is given
        conn.execute(
            "CREATE TRIGGER change AFTER INSERT ON publications BEGIN"
            " UPDATE publications SET state = 'withdrawn' WHERE issue_key = new.issue_key; END"
        )
    code, out, err = run(runner, "db", "copy", str(original), str(target))
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.split()[:1] == ["publications"]]
    assert "DIFFERS: DST has 3 rows, sha256 " in line
    assert err.splitlines() == [
        f"Error: {target}: 1 tables differ from SRC after the copy (publications);"
        " it was rolled back, DST is as it was"
    ]
    assert counts(Database.parse(target))["subscribers"] == 0


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("missing.db", "new.db", "missing.db: no database here; check the path of SRC"),
        ("same.db", "./same.db", "same.db: SRC and DST are the same database"),
        ("same.db", "mysql://db.example.org/x", "DST: unknown database scheme 'mysql'"),
        (
            "postgresql://a@DB.example.org/news",
            "postgres://b@db.example.org:5432/news",
            "postgres://b@db.example.org:5432/news: SRC and DST are the same database",
        ),
    ],
)
def test_bad_arguments_are_one_error_line(
    runner: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    target: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    Store.open(tmp_path / "same.db").close()
    code, _, err = run(runner, "db", "copy", source, target)
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"Error: {message}")
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_db_migrate_says_from_which_version_to_which(
    runner: CliRunner, workspace: Path, tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    if engine == "sqlite":
        database = Database.parse(tmp_path / "old.db")
        conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
        migrate(conn, MIGRATIONS[:5], where="old.db")  # as an older newsletter left it
        conn.close()
        before = 5
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        database = server.new_database(migrated=False)
        before = 0
    where = str(database)
    status = run(runner, "-C", str(workspace), "--db", where, "db", "status")
    assert status[0] == 0 and f"Schema version: {before} (this newsletter writes" in status[1]
    code, out, err = run(runner, "-C", str(workspace), "--db", where, "db", "migrate")
    assert code == 0, err
    assert out == f"{database}: schema version {before} -> {schema_target()}.\n"
    code, out, _ = run(runner, "-C", str(workspace), "--db", where, "db", "migrate")
    assert out == f"{database}: schema version {schema_target()}, up to date.\n"
    code, out, _ = run(runner, "-C", str(workspace), "--db", where, "db", "status")
    assert f"Schema version: {schema_target()} (up to date)" in out
    assert "suppression_key" in out
