"""One person's data: `subscribers show`, `export-person`, `erase`, and the consent record.

The CLI's tests (click's runner) use SQLite files, which the CLI opens; one of them
reads the files byte by byte: nothing of the person may be left in them. The store's
tests at the end take the ``store`` fixture and so run on both engines (the store's
contract, see tests/test_store.py).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from newsletter.cli import main
from newsletter.dates import parse_signup_date
from newsletter.migrations import MIGRATIONS, migrate
from newsletter.models import BounceKind, DeliveryResult, DeliveryState, Status
from newsletter.privacy import describe_erasure
from newsletter.store import Store
from tests.support.database import dump
from tests.support.delivery import record_bounce

ISSUE = "001-first"
LATER = "002-second"
ADDRESS = "Ann.Lee@example.com"
NAME = "Annabel Leighton-Quist"
CITY = "Tromsøya-Nord"

CONFIG = '[newsletter]\nname = "T"\n'


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "newsletter.toml").write_text(CONFIG, encoding="utf-8")
    issues = root / "issues"
    for number, key in ((1, ISSUE), (2, LATER)):
        folder = issues / key
        (folder / "articles").mkdir(parents=True)
        (folder / "issue.md").write_text(
            f"---\nnumber: {number}\ndate: 2026-03-0{number}\ntitle: T{number}\n"
            "articles: []\n---\nIntro.\n",
            encoding="utf-8",
        )
    return root


def db(workspace: Path) -> Store:
    return Store.open(workspace / ".newsletter" / "newsletter.db")


def cli(workspace: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["-C", str(workspace), *args], input=stdin)


def send(store: Store, issue: str) -> None:
    store.snapshot_recipients(issue)
    with store.acquire_send_lock(issue):
        claimed = store.claim_batch(issue, "test", 1000)
        store.record_results(
            DeliveryResult(
                issue,
                c.subscriber.id,
                DeliveryState.SENT,
                "250 ok",
                f"<{issue}.{c.subscriber.id}@x>",
            )
            for c in claimed
        )


def populate(workspace: Path) -> Path:
    """Ann imported with a sign-up date and fields, sent two issues, bounced softly once,
    then unsubscribed; Bob alongside, untouched."""
    csv_file = workspace / "members.csv"
    csv_file.write_text(
        "email,name,city,Date Added\n"
        f"bob@example.com,Bob,Oslo,2018-01-02\n{ADDRESS},{NAME},{CITY},03/14/2019 09:30\n",
        encoding="utf-8",
    )
    assert cli(workspace, "subscribers", "import", str(csv_file)).exit_code == 0
    with db(workspace) as store:
        ann_history(store)
    return csv_file


def ann_history(store: Store) -> None:
    """Ann's history in both populations: sent two issues, bounced softly once between
    them, then unsubscribed by the one-click link of the second."""
    send(store, ISSUE)
    record_bounce(
        store,
        ADDRESS,
        BounceKind.SOFT,
        "4.2.2",
        f"smtp; 452 4.2.2 <{ADDRESS}>: mailbox full",
        key="<dsn-1@mx.example.net>",
        issue_key=ISSUE,
    )
    send(store, LATER)
    store.unsubscribe(ADDRESS, "one-click", f"issue {LATER}")


# --- show -----------------------------------------------------------------------------------


def test_show_prints_status_fields_consent_history_deliveries_and_bounces(
    workspace: Path,
) -> None:
    populate(workspace)
    shown = cli(workspace, "subscribers", "show", "ann.lee@EXAMPLE.com")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0] == ADDRESS
    text = shown.stdout
    assert "  Status:      unsubscribed since " in text
    assert f"  Name:        {NAME}" in lines
    assert f"  Fields:      city={CITY}" in lines
    assert "  Consent:     imported from members.csv:3 on " in text
    assert "signed up 2019-03-14T09:30:00 (from the file)" in text
    assert "  Suppressed:  since " in text and "(unsubscribed)" in text
    history = lines[lines.index("History (2):") + 1 :][:2]
    assert "new -> active" in history[0] and "import  file members.csv" in history[0]
    assert "active -> unsubscribed" in history[1] and f"one-click  issue {LATER}" in history[1]
    deliveries = lines[lines.index("Deliveries (2):") + 1 :][:2]
    assert deliveries[0].startswith(f"  {ISSUE}  sent ")
    assert deliveries[0].endswith(f"<{ISSUE}.2@x>")
    assert deliveries[1].startswith(f"  {LATER}  sent ")
    (bounce_line,) = lines[lines.index("Bounces (1):") + 1 :]
    assert f"soft 4.2.2  issue {ISSUE}  soft bounce 1 of 3" in bounce_line


def test_show_json_is_the_export_document(workspace: Path) -> None:
    populate(workspace)
    shown = cli(workspace, "subscribers", "show", ADDRESS, "--json")
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert document["subscriber"]["status"] == "unsubscribed"
    assert document["subscriber"]["fields"] == {"city": CITY}
    assert [d["issue"] for d in document["deliveries"]] == [ISSUE, LATER]
    assert document["suppression"]["reason"] == "unsubscribed"


def test_show_someone_no_longer_on_the_list_or_unknown(workspace: Path) -> None:
    populate(workspace)
    assert cli(workspace, "subscribers", "remove", "--force", ADDRESS).exit_code == 0
    shown = cli(workspace, "subscribers", "show", ADDRESS)
    assert shown.exit_code == 0, shown.output
    assert "  Status:      not on the list" in shown.stdout
    assert "(unsubscribed): never added back" in shown.stdout  # the earlier reason stays
    unknown = cli(workspace, "subscribers", "show", "nobody@example.com")
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("Error: nothing is held about nobody@example.com")


# --- export-person ------------------------------------------------------------------------


def test_export_person_is_everything_held(workspace: Path) -> None:
    populate(workspace)
    with db(workspace) as store:  # and an open request through the form
        store.request_confirmation(ADDRESS, resend_after=timedelta(minutes=10), page="/join")
    out = workspace / "requests" / "ann.json"
    missing = cli(workspace, "subscribers", "export-person", ADDRESS, "--out", str(out))
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    out.parent.mkdir()
    written = cli(workspace, "subscribers", "export-person", ADDRESS, "--out", str(out))
    assert written.exit_code == 0, written.output
    assert written.stdout == "" and f"to {out}" in written.stderr
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["format"] == "newsletter-person/1"
    assert document["address"] == ADDRESS and document["on_the_list"] is True
    subscriber = document["subscriber"]
    assert (subscriber["email"], subscriber["name"]) == (ADDRESS, NAME)
    assert subscriber["fields"] == {"city": CITY}
    assert [c["source"] for c in document["consent"]] == ["import", "form"]
    imported, form = document["consent"]
    assert imported["origin"] == "members.csv:3"
    assert imported["signed_up"] == "2019-03-14T09:30:00"
    assert form["origin"] == "/join" and form["confirmed_at"] is None
    assert [(h["from"], h["to"], h["reason"]) for h in document["history"]] == [
        (None, "active", "import"),
        ("active", "unsubscribed", "one-click"),
    ]
    assert [(d["issue"], d["state"], d["message_id"]) for d in document["deliveries"]] == [
        (ISSUE, "sent", f"<{ISSUE}.2@x>"),
        (LATER, "sent", f"<{LATER}.2@x>"),
    ]
    (bounce,) = document["bounces"]
    assert bounce["kind"] == "soft" and bounce["issue"] == ISSUE and ADDRESS in bounce["diagnostic"]
    assert document["confirmation"]["emails_sent"] == 1
    assert document["suppression"]["reason"] == "unsubscribed"
    for moment in (document["exported_at"], document["history"][0]["at"]):
        assert datetime.fromisoformat(moment).tzinfo is not None
    # Bob's data is not in Ann's answer.
    assert "bob" not in out.read_text(encoding="utf-8").lower()
    to_stdout = cli(workspace, "subscribers", "export-person", ADDRESS)
    assert json.loads(to_stdout.stdout)["subscriber"] == subscriber


# --- erase ----------------------------------------------------------------------------------


def database_bytes(workspace: Path) -> bytes:
    folder = workspace / ".newsletter"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("newsletter.db*")) if p.is_file())


def test_erase_asks_and_refuses_without_a_terminal(workspace: Path) -> None:
    populate(workspace)
    refused = cli(workspace, "subscribers", "erase", ADDRESS, stdin="y\n")
    assert refused.exit_code == 1
    assert refused.stderr.splitlines() == [
        "Error: not erasing: there is no terminal to confirm with (input is piped or absent);"
        " run it in a terminal, or add --yes to erase without asking"
    ]
    with db(workspace) as store:
        assert store.get_subscriber(ADDRESS) is not None


def test_erase_asks_on_a_terminal(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(workspace)
    monkeypatch.setattr("newsletter.cli.stdin_is_terminal", lambda: True)
    kept = cli(workspace, "subscribers", "erase", ADDRESS, stdin="n\n")
    assert kept.exit_code == 1 and "Nothing erased." in kept.stdout
    assert f"Erase everything held about {ADDRESS}?" in kept.stdout
    with db(workspace) as store:
        assert store.get_subscriber(ADDRESS) is not None
    erased = cli(workspace, "subscribers", "erase", ADDRESS, stdin="y\n")
    assert erased.exit_code == 0, erased.output
    with db(workspace) as store:
        assert store.get_subscriber(ADDRESS) is None


def test_erase_leaves_only_the_hash_and_counts(workspace: Path) -> None:
    csv_file = populate(workspace)
    with db(workspace) as store:
        # A report that names her address in other letters (a forward, a relay's case).
        record_bounce(
            store, ADDRESS.upper(), BounceKind.HARD, "5.1.1", f"550 <{ADDRESS}> unknown",
            key="<dsn-2@mx.example.net>",
        )  # fmt: skip
    before = cli(workspace, "status", "1")
    assert before.exit_code == 0, before.output

    erased = cli(workspace, "subscribers", "erase", ADDRESS, "--yes")
    assert erased.exit_code == 0, erased.output
    assert erased.stdout.startswith(
        f"Erased {ADDRESS.lower()}: the subscriber row, 2 history entries, 1 consent records,"
        " 2 ledger rows (kept as counts per issue); 2 bounce records kept without the address."
    )

    # Nothing of hers in the database files: not the address, the name, a field, a
    # Message-ID of a copy sent to her, the server's text quoting her.
    raw = database_bytes(workspace).lower()
    for trace in (ADDRESS, "ann.lee", NAME, CITY, f"{ISSUE}.2@x", "mailbox full"):
        assert trace.lower().encode() not in raw, trace
    assert b"bob@example.com" in raw  # the others are still there

    with db(workspace) as store:
        assert store.get_subscriber(ADDRESS) is None
        suppressed = store.suppression(ADDRESS)
        assert suppressed is not None and suppressed.reason == "unsubscribed"
        assert [(b.kind, b.email) for b in store.bounces_for_issue(ISSUE)] == [
            (BounceKind.SOFT, "")
        ]
        assert store.erased_counts(ISSUE) == {DeliveryState.SENT: 1}
        assert store.ledger_counts(ISSUE)[DeliveryState.SENT] == 1  # Bob's
    # The issue's totals still add up, and say what was erased.
    after = cli(workspace, "status", "1")
    assert after.exit_code == 0, after.output
    assert after.stdout.splitlines()[0] == before.stdout.splitlines()[0]
    assert "  sent             2" in after.stdout.splitlines()
    assert "(1 of these were erased or removed since: only their counts are kept)" in after.stdout
    assert "bounce soft 4.2.2   (erased)  soft bounce 1 of 3" in after.stdout
    # An old file does not bring her back; `show` says only that she is suppressed.
    again = cli(workspace, "subscribers", "import", str(csv_file))
    assert "0 added" in again.stdout and "1 suppressed" in again.stdout
    shown = cli(workspace, "subscribers", "show", ADDRESS, "--json")
    document = json.loads(shown.stdout)
    assert document["subscriber"] is None and document["bounces"] == []
    assert document["suppression"]["reason"] == "unsubscribed"


def test_erase_of_an_address_nothing_is_held_about_says_so(workspace: Path) -> None:
    """Unmatched reports are never stored against an address (issue 11), so an address
    that was never on the list has nothing to erase: one error line, nothing written."""
    erased = cli(workspace, "subscribers", "erase", "stranger@example.net", "--yes")
    assert erased.exit_code == 1
    assert "nothing is held about stranger@example.net" in erased.output
    with db(workspace) as store:
        assert store.suppression("stranger@example.net") is None


# --- consent ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-03-04", "2019-03-04"),
        ("20190304", "2019-03-04"),
        ("2019-03-04T12:34:56Z", "2019-03-04T12:34:56+00:00"),
        ("2019-03-04T12:34:56.789+02:00", "2019-03-04T10:34:56+00:00"),
        ("2019-03-04 12:34:56", "2019-03-04T12:34:56"),  # Mailchimp: no zone, none invented
        ("2019-03-04 12:34:56 UTC", "2019-03-04T12:34:56+00:00"),  # ConvertKit
        ("2019/03/04", "2019-03-04"),
        ("Mon, 04 Mar 2019 12:34:56 +0100", "2019-03-04T11:34:56+00:00"),
        ("03/14/2019", "2019-03-14"),
        ("14/03/2019", "2019-03-14"),
        ("4/4/2019 3:05 PM", "2019-04-04T15:05:00"),
        ("04.03.2019", "2019-03-04"),
        ("March 4, 2019", "2019-03-04"),
        ("4 Mar 2019", "2019-03-04"),
        ("04-Mar-2019 08:00", "2019-03-04T08:00:00"),
        ("1551702896", "2019-03-04T12:34:56+00:00"),
        ("  2019-03-04  ", "2019-03-04"),
    ],
)
def test_sign_up_dates_in_common_formats(text: str, expected: str) -> None:
    assert parse_signup_date(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("03/04/2019", "day/month or month/day"),
        ("yesterday", "not a date"),
        ("2019-02-30", "not a date"),
        ("1899-12-30", "not a plausible sign-up date"),
        ("2999-01-01", "not a plausible sign-up date"),
        ("13/13/2019", "not a date"),
    ],
)
def test_unreadable_sign_up_dates_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_signup_date(text, now=datetime(2026, 1, 1, tzinfo=UTC))


def test_import_consent_file_line_and_date_column(store: Store, tmp_path: Path) -> None:
    csv_file = tmp_path / "mailchimp.csv"
    csv_file.write_text(
        "Email Address,First Name,OPTIN_TIME,CONFIRM_TIME\n".replace("Email Address", "email")
        + "a@example.com,A,2019-03-04 12:34:56,2019-03-04 12:40:00\n"
        + "b@example.com,B,,2019-05-06 07:08:09\n"
        + "c@example.com,C,03/04/2019,\n"
        + "d@example.com,D,,\n",
        encoding="utf-8",
    )
    report = store.import_csv(csv_file)
    assert report.added == 3 and report.error_count == 1
    (error,) = report.errors
    assert error.line == 4
    assert error.message == (
        "unreadable date '03/04/2019' in column 'OPTIN_TIME': it could be day/month or"
        " month/day; write it as YYYY-MM-DD (ISO 8601)"
    )
    signed = {}
    for address in ("a", "b", "d"):
        record = store.person(f"{address}@example.com")
        assert record is not None and record.subscriber is not None
        assert dict(record.subscriber.fields) == {"First Name": address.upper()}
        (consent,) = record.consents
        assert consent.source == "import" and consent.confirmed_at is None
        signed[address] = (consent.origin, consent.signed_up)
    assert signed == {
        "a": ("mailchimp.csv:2", "2019-03-04T12:34:56"),  # OPTIN_TIME before CONFIRM_TIME
        "b": ("mailchimp.csv:3", "2019-05-06T07:08:09"),  # the next column when it is empty
        "d": ("mailchimp.csv:5", ""),
    }


def test_the_editors_add_is_recorded_as_such(store: Store) -> None:
    store.add_subscriber("e@example.com")
    record = store.person("e@example.com")
    assert record is not None
    (consent,) = record.consents
    assert (consent.source, consent.origin, consent.signed_up) == ("added", "", "")


def test_form_consent_is_completed_by_the_click(store: Store) -> None:
    asked = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    first = store.request_confirmation(
        "f@example.com", resend_after=timedelta(0), now=asked, page="/about"
    )
    # A second request while the first is open adds nothing.
    store.request_confirmation(
        "f@example.com", resend_after=timedelta(0), now=asked + timedelta(hours=1), page="/x"
    )
    store.confirm_subscription(first.subscriber.id, issued_at=asked)
    record = store.person("f@example.com")
    assert record is not None
    (consent,) = record.consents
    assert (consent.source, consent.origin, consent.recorded_at) == ("form", "/about", asked)
    assert consent.confirmed_at is not None and consent.confirmed_at > asked
    assert record.confirmation is None


def test_consent_of_subscribers_from_before_is_taken_from_their_history(tmp_path: Path) -> None:
    """SQLite only: a SQLite file from before consent was recorded (PostgreSQL databases
    start at the schema that has it)."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:5], where="old")
    rows = [
        (1, "i@example.com", "import", "file list.csv", None),
        (2, "f@example.com", "subscribe-form", "", "2023-01-02T03:05:00+00:00"),
    ]
    for sid, address, reason, detail, confirmed in rows:
        conn.execute(
            "INSERT INTO subscribers (id, email, email_key, status, created_at, updated_at,"
            " status_changed_at) VALUES (?1, ?2, ?2, 'active', ?3, ?3, ?3)",
            (sid, address, "2023-01-02T03:04:00+00:00"),
        )
        conn.execute(
            "INSERT INTO subscriber_events (subscriber_id, old_status, new_status, reason,"
            " detail, at) VALUES (?, NULL, 'pending', ?, ?, '2023-01-02T03:04:00+00:00')",
            (sid, reason, detail),
        )
        if confirmed:
            conn.execute(
                "INSERT INTO subscriber_events (subscriber_id, old_status, new_status, reason,"
                " detail, at) VALUES (?, 'pending', 'active', 'confirmed', '', ?)",
                (sid, confirmed),
            )
    conn.close()
    with Store.open(path) as store:
        imported = store.person("i@example.com")
        form = store.person("f@example.com")
    assert imported is not None and form is not None
    assert [(c.source, c.origin, c.confirmed_at) for c in imported.consents] == [
        ("import", "list.csv", None)
    ]
    assert [(c.source, c.confirmed_at) for c in form.consents] == [
        ("form", datetime(2023, 1, 2, 3, 5, tzinfo=UTC))
    ]


def test_person_is_none_when_nothing_is_held(store: Store) -> None:
    assert store.person("ghost@example.com") is None
    store.add_subscriber("g@example.com")
    store.set_status("g@example.com", Status.BOUNCED, "bounce-hard")
    record = store.person("G@example.com")
    assert record is not None and record.suppression is not None


def populate_store(store: Store) -> None:
    """populate() through the store alone: Ann added with a field, sent two issues,
    bounced softly once, unsubscribed, then asked again through the form; Bob alongside;
    a hard bounce that names her address in other letters."""
    store.add_subscriber("bob@example.com", "Bob", {"city": "Oslo"})
    store.add_subscriber(ADDRESS, NAME, {"city": CITY})
    ann_history(store)
    store.request_confirmation(ADDRESS, resend_after=timedelta(0), page="/join")  # open
    record_bounce(
        store, ADDRESS.upper(), BounceKind.HARD, "5.1.1", f"550 <{ADDRESS}> unknown",
        key="<dsn-2@mx.example.net>",
    )  # fmt: skip


def test_erase_leaves_only_the_hash_and_counts_in_the_rows(store: Store) -> None:
    """Every row of every table, on both engines: what a query can still find. What the
    engine's files may still hold is the next test's (SQLite only)."""
    populate_store(store)
    before = dump(store).lower()
    for trace in ("ann.lee", NAME, CITY, f"{ISSUE}.2@x", "mailbox full", "/join"):
        assert trace.lower() in before, trace  # the dump would show each
    erased = store.erase_person(ADDRESS)
    assert (erased.subscriber, erased.events, erased.deliveries) == (True, 2, 2)
    assert (erased.bounces, erased.consents) == (2, 2)
    assert erased.suppression.reason == "unsubscribed"
    # SQLite overwrites deleted content and empties its log; a PostgreSQL server keeps
    # old row versions until VACUUM and its log until recycled, and the erasure says so.
    assert erased.copies_cleared is not store.is_postgres
    assert erased.server_keeps_copies is store.is_postgres
    assert ("until VACUUM" in describe_erasure(erased)) is store.is_postgres
    after = dump(store).lower()
    for trace in ("ann.lee", NAME, CITY, f"{ISSUE}.2@x", "mailbox full", "/join"):
        assert trace.lower() not in after, trace
    assert "bob@example.com" in after
    assert store.get_subscriber(ADDRESS) is None and store.person(ADDRESS) is not None
    assert store.erased_counts(ISSUE) == store.erased_counts(LATER) == {DeliveryState.SENT: 1}
    assert store.ledger_counts(ISSUE)[DeliveryState.SENT] == 1  # Bob's
    assert [(b.kind, b.email, b.diagnostic) for b in store.bounces_for_issue(ISSUE)] == [
        (BounceKind.SOFT, "", "")
    ]
    again = store.erase_person(ADDRESS)  # nothing more to find: only the entry stays
    assert (again.subscriber, again.bounces) == (False, 0)
    assert again.suppression == erased.suppression


def test_erase_leaves_no_earlier_version_of_the_row_either(tmp_path: Path) -> None:
    """A row rewritten by updates leaves its old versions in free space and in the
    write-ahead log; erasing must not leave those behind.

    SQLite only: its files are the whole database and the store can clear them
    (secure_delete, a checkpoint). A PostgreSQL server keeps old row versions until
    VACUUM and its write-ahead log until recycled, outside the store's reach; there
    ``Erasure.server_keeps_copies`` says so (see the test above)."""
    path = tmp_path / "n.db"
    names = [f"Version{i} " + "Q" * (i * 7) for i in range(6)]
    with Store.open(path) as store:
        # As an SQLite built without secure_delete would write them (Debian's has it on).
        store._conn.execute("PRAGMA secure_delete = OFF")
        for i in range(300):
            store.add_subscriber(f"other{i}@example.com", f"Other {i}")
        for i, name in enumerate(names):
            csv_file = tmp_path / f"v{i}.csv"
            csv_file.write_text(
                f"email,name,note\nzed@example.com,{name},note{i}{'z' * (i * 11)}\n",
                encoding="utf-8",
            )
            store.import_csv(csv_file)
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("n.db*") if p.is_file())
        assert any(name.encode() in raw for name in names[:-1])  # old versions are there
        store._conn.execute("PRAGMA secure_delete = ON")  # as Store.open sets it
        erased = store.erase_person("zed@example.com")
        assert erased.copies_cleared
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("n.db*") if p.is_file())
        for i, name in enumerate(names):
            assert name.encode() not in raw and f"note{i}".encode() not in raw, name
        assert b"zed@example.com" not in raw
        assert store.count() == 300
