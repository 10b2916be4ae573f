"""Import presets: other tools' exports (samples in tests/presets/), --map and --dry-run.

The samples are anonymised, shaped as each tool's documentation and its own
migration tools describe the export. The rule under test everywhere: a subscriber
the old tool would not mail is never imported as active.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import Result

from newsletter.db import Database
from newsletter.errors import StoreError
from newsletter.models import Consent, ImportReport, Status
from newsletter.presets import parse_map, parse_moment, preset
from newsletter.store import Store
from tests.support.cli import minimal_workspace, subscribers_cli

SAMPLES = Path(__file__).parent / "presets"


@pytest.fixture
def store(database: Database) -> Iterator[Store]:
    """The store on each engine in turn: an import does the same on both."""
    with Store.open(database) as db:
        yield db


def statuses(store: Store) -> dict[str, Status]:
    return {s.email: s.status for s in store.list_subscribers()}


def bad_lines(report: ImportReport) -> dict[int, str]:
    return {error.line: error.message for error in report.errors}


def import_consent(store: Store, email: str) -> Consent:
    record = store.person(email)
    assert record is not None
    (consent,) = record.consents
    assert consent.source == "import"
    return consent


def signed_up(store: Store, email: str) -> str:
    """The sign-up date the import kept with the consent (what a segment's joined reads)."""
    return import_consent(store, email).signed_up


def test_mailchimp_subscribed_unsubscribed_and_cleaned_exports(store: Store) -> None:
    report = store.import_csv(
        SAMPLES / "mailchimp_subscribed_members_export_8a1c.csv", mapping=preset("mailchimp")
    )
    assert (report.added, report.error_count) == (3, 2)
    assert bad_lines(report) == {
        5: "invalid email address 'not-an-address': An email address must have an @-sign.",
        6: "OPTIN_TIME 'yesterday' is not a date",
    }
    for name in ("unsubscribed", "cleaned"):
        store.import_csv(
            SAMPLES / f"mailchimp_{name}_members_export_8a1c.csv", mapping=preset("mailchimp")
        )
    assert statuses(store) == {
        "ada.fenwick@example.org": Status.ACTIVE,
        "bruno@example.com": Status.ACTIVE,
        "chloe.ng@example.net": Status.ACTIVE,
        "eamon@example.com": Status.UNSUBSCRIBED,
        "freya@example.net": Status.UNSUBSCRIBED,  # in the unsubscribed export, UNSUB_TIME blank
        "gus@example.org": Status.BOUNCED,
    }
    ada = store.get_subscriber("ada.fenwick@example.org")
    assert ada is not None and ada.name == "Ada Fenwick"
    assert dict(ada.fields) == {"company": "Quay Works", "zip_code": "EX1 2PL"}  # no IPs, ratings
    assert store.tags_of("ada.fenwick@example.org") == ["europe", "harbours"]
    assert store.tags_of("chloe.ng@example.net") == ["lorem editors"]
    assert signed_up(store, "ada.fenwick@example.org") == "2023-04-21T11:16:57+00:00"
    consent = import_consent(store, "ada.fenwick@example.org")
    assert consent.origin == "mailchimp_subscribed_members_export_8a1c.csv:2"
    assert consent.confirmed_at == datetime(2023, 4, 21, 11, 17, 40, tzinfo=UTC)  # CONFIRM_TIME
    bruno = store.get_subscriber("bruno@example.com")
    assert bruno is not None and bruno.name == "Bruno Castellane"


def test_a_renamed_unsubscribed_file_is_still_unsubscribed_by_its_columns(
    store: Store, tmp_path: Path
) -> None:
    renamed = shutil.copy(
        SAMPLES / "mailchimp_unsubscribed_members_export_8a1c.csv", tmp_path / "members.csv"
    )
    store.import_csv(Path(renamed), mapping=preset("mailchimp"))
    assert set(statuses(store).values()) == {Status.UNSUBSCRIBED}


def test_substack_mails_by_email_disabled_and_tags_paid_plans(store: Store) -> None:
    report = store.import_csv(
        SAMPLES / "substack_email_list.harbour-ledger.csv", mapping=preset("substack")
    )
    assert statuses(store) == {
        "harriet.pole@example.com": Status.ACTIVE,  # a free reader
        "ines.moreau@example.net": Status.ACTIVE,
        "jonas@example.org": Status.UNSUBSCRIBED,  # email_disabled
        "kofi@example.com": Status.UNSUBSCRIBED,  # paid, but email_disabled
    }
    assert bad_lines(report) == {
        6: "a deletion request, not an address: not imported",
        7: "email_disabled is 'maybe', not true or false",
    }
    assert store.tags_of("ines.moreau@example.net") == ["paid"]
    assert store.tags_of("harriet.pole@example.com") == []
    assert signed_up(store, "harriet.pole@example.com") == "2022-03-13T13:36:31+00:00"
    ines = store.get_subscriber("ines.moreau@example.net")
    assert ines is not None and dict(ines.fields) == {}  # plan, expiry, payments left out


def test_buttondown_subscriber_types(store: Store) -> None:
    report = store.import_csv(SAMPLES / "buttondown_subscribers.csv", mapping=preset("buttondown"))
    assert statuses(store) == {
        "mara@example.org": Status.ACTIVE,
        "nils@example.com": Status.ACTIVE,
        "olga@example.net": Status.PENDING,
        "piet@example.org": Status.UNSUBSCRIBED,
        "quinn@example.com": Status.BOUNCED,
        "rosa@example.net": Status.COMPLAINED,
        "sam@example.org": Status.UNSUBSCRIBED,
        "tove@example.com": Status.UNSUBSCRIBED,
    }
    assert list(bad_lines(report)) == [10]
    assert "subscriber type 'mystery' is unknown" in bad_lines(report)[10]
    assert store.tags_of("mara@example.org") == ["europe", "harbours"]
    assert store.tags_of("nils@example.com") == ["paid"]
    assert signed_up(store, "mara@example.org") == "2024-01-15T10:00:00+00:00"


def test_listmonk_statuses_attributes_and_go_times(store: Store) -> None:
    report = store.import_csv(SAMPLES / "listmonk_subscribers.csv", mapping=preset("listmonk"))
    assert statuses(store) == {
        "vera@example.org": Status.ACTIVE,
        "wim@example.com": Status.UNSUBSCRIBED,
        "xena@example.net": Status.UNSUBSCRIBED,
    }
    assert bad_lines(report) == {
        5: "attributes is not JSON",
        6: "status 'unconfirmed' is unknown (known: enabled, disabled, blocklisted)",
    }
    vera = store.get_subscriber("vera@example.org")
    assert vera is not None and vera.name == "Vera Lind"
    assert dict(vera.fields) == {"city": "Lisbon", "plan": '{"tier": 2}'}
    assert signed_up(store, "vera@example.org") == "2021-03-04T05:06:07+00:00"


def test_listmonk_attributes_with_a_nul_or_half_a_surrogate_are_a_bad_row(
    store: Store, tmp_path: Path
) -> None:
    """JSON escapes can spell what no text column holds (PostgreSQL refuses a NUL, no
    engine stores a lone surrogate): that row is bad, on both engines, not a crash."""
    csv_file = tmp_path / "listmonk.csv"
    csv_file.write_text(
        "uuid,email,name,attributes,status,created_at,updated_at\n"
        'u1,ann@example.org,Ann,"{""city"": ""Os\\u0000lo""}",enabled,,\n'
        'u2,bob@example.org,Bob,"{""a\\u0000b"": ""x""}",enabled,,\n'
        'u3,cy@example.org,Cy,"{""city"": ""\\ud800""}",enabled,,\n'
        'u4,dee@example.org,Dee,"{""city"": ""Oslo \\\\u0000 \\u00e9""}",enabled,,\n',
        encoding="utf-8",
    )
    report = store.import_csv(csv_file, mapping=preset("listmonk"))
    message = "the attributes hold a NUL character or broken text"
    assert bad_lines(report) == {2: message, 4: message}
    bob = store.get_subscriber("bob@example.org")  # a name is made of letters and digits
    assert bob is not None and dict(bob.fields) == {"a_b": "x"}
    dee = store.get_subscriber("dee@example.org")
    assert dee is not None and dict(dee.fields) == {"city": "Oslo \\u0000 é"}
    assert set(statuses(store)) == {"bob@example.org", "dee@example.org"}


def test_ghost_members(store: Store) -> None:
    report = store.import_csv(
        SAMPLES / "ghost_member-export-2026-01-10.csv", mapping=preset("ghost")
    )
    assert statuses(store) == {
        "aino@example.org": Status.ACTIVE,
        "bea@example.com": Status.UNSUBSCRIBED,
        "cai@example.net": Status.ACTIVE,
        "dora@example.org": Status.UNSUBSCRIBED,  # deleted
    }
    assert bad_lines(report) == {6: "subscribed_to_emails is 'perhaps', not true or false"}
    assert store.tags_of("aino@example.org") == ["europe", "harbours"]
    assert store.tags_of("cai@example.net") == ["complimentary"]
    aino = store.get_subscriber("aino@example.org")
    assert aino is not None and aino.name == "Aino Virtanen" and dict(aino.fields) == {}


@pytest.mark.parametrize(
    ("tool", "sample", "missing"),
    [
        ("substack", "ghost_member-export-2026-01-10.csv", "email_disabled"),
        ("ghost", "substack_email_list.harbour-ledger.csv", "subscribed_to_emails"),
        ("buttondown", "listmonk_subscribers.csv", "subscriber_type"),
        ("listmonk", "buttondown_subscribers.csv", "status"),
        ("mailchimp", "ghost_member-export-2026-01-10.csv", "Email Address"),
    ],
)
def test_a_file_without_the_column_that_says_who_is_mailed_is_refused(
    store: Store, tool: str, sample: str, missing: str
) -> None:
    with pytest.raises(StoreError, match=f"no {missing!r} column") as info:
        store.import_csv(SAMPLES / sample, mapping=preset(tool))
    assert str(info.value).startswith(f"{SAMPLES / sample}:1: not a ")
    assert store.count() == 0


@pytest.mark.parametrize(
    ("sample", "tool"),
    [
        ("mailchimp_subscribed_members_export_8a1c.csv", "mailchimp"),
        ("substack_email_list.harbour-ledger.csv", "substack"),
        ("buttondown_subscribers.csv", "buttondown"),
        ("listmonk_subscribers.csv", "listmonk"),
        ("ghost_member-export-2026-01-10.csv", "ghost"),
    ],
)
def test_a_plain_import_of_another_tools_export_is_refused_with_the_preset_to_use(
    store: Store, sample: str, tool: str
) -> None:
    """Read as a plain CSV, their status flags would be fields and everyone active."""
    with pytest.raises(StoreError, match=f"import it with --from {tool}"):
        store.import_csv(SAMPLES / sample)
    assert store.count() == 0


def test_map_names_the_columns_of_any_csv(store: Store, tmp_path: Path) -> None:
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(
        "E-mail;Vorname;Nachname;Stand;Gruppen;Seit;Stadt\n"
        "anna@example.org;Anna;Berg;subscribed;Europe,Harbours;2024-05-01;Lisbon\n"
        "bert@example.com;Bert;;unsubscribed;;2024-05-02;Porto\n"
        "carl@example.net;Carl;;asleep;;;\n",
        encoding="utf-8",
    )
    mapping = parse_map(
        "email=E-mail, name=Vorname+Nachname, status=Stand, tags=Gruppen, created_at=Seit"
    )
    report = store.import_csv(csv_file, mapping=mapping)
    assert statuses(store) == {
        "anna@example.org": Status.ACTIVE,
        "bert@example.com": Status.UNSUBSCRIBED,
    }
    assert "unknown status 'asleep'" in bad_lines(report)[4]
    anna = store.get_subscriber("anna@example.org")
    assert (
        anna is not None and anna.name == "Anna Berg" and dict(anna.fields) == {"stadt": "Lisbon"}
    )
    assert store.tags_of("anna@example.org") == ["europe", "harbours"]
    assert signed_up(store, "anna@example.org") == "2024-05-01T00:00:00+00:00"
    assert report.mapping[:2] == ("email <- E-mail", "name <- Vorname + Nachname")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name=Name", "which column holds the address"),
        ("email", "'email' is not OURS=THEIRS"),
        ("mail=Email", "'mail' is not one of our columns"),
        ("email=A,email=B", "email is named twice"),
        ("email=A+B", "only name may join columns"),
    ],
)
def test_a_bad_map_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        parse_map(text)


def test_a_map_naming_a_missing_column_says_which(store: Store, tmp_path: Path) -> None:
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("Mail,Name\na@example.org,A\n", encoding="utf-8")
    with pytest.raises(StoreError) as info:
        store.import_csv(csv_file, mapping=parse_map("email=Email"))
    assert str(info.value).startswith(
        f"{csv_file}:1: --map email=Email: the file has no column 'Email' (columns: Mail, Name)"
    )


def test_moments_from_every_tool() -> None:
    assert parse_moment("2026-01-31") == "2026-01-31T00:00:00.000000+00:00"
    assert parse_moment("2018-02-12 10:54:27") == "2018-02-12T10:54:27.000000+00:00"
    assert parse_moment("2018-12-25T20:43:22.178Z") == "2018-12-25T20:43:22.178000+00:00"
    assert parse_moment("2024-01-15T10:00:00+02:00") == "2024-01-15T08:00:00.000000+00:00"
    assert parse_moment("2021-03-04 05:06:07.5 +0100 CET") == "2021-03-04T04:06:07.500000+00:00"
    with pytest.raises(ValueError):
        parse_moment("last Tuesday")


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return minimal_workspace(tmp_path)


def run(workspace: Path, *args: str) -> Result:
    return subscribers_cli(workspace, *args)


def test_dry_run_prints_mapping_counts_and_bad_lines_and_writes_nothing(workspace: Path) -> None:
    sample = SAMPLES / "buttondown_subscribers.csv"
    result = run(workspace, "import", str(sample), "--from", "buttondown", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("Mapping (buttondown):\n  email <- email\n  status <- subscriber_type:")
    assert "  left out: id, notes, metadata, secondary_id, source, referrer_url\n" in out
    assert (
        f"{sample}: would add 8 (2 active, 1 bounced, 1 complained, 1 pending, 3 unsubscribed),"
        " update 0, leave 0 unchanged and 0 alone (unsubscribed, bounced or complained);"
        " 0 duplicate rows, 1 bad rows.\n"
    ) in out
    assert f"{sample}:10: subscriber type 'mystery' is unknown" in out
    assert out.endswith("Dry run: nothing was written.\n")
    assert not (workspace / ".newsletter" / "newsletter.db").exists() or _count(workspace) == 0
    # The real import then does what the dry run said.
    real = run(workspace, "import", str(sample), "--from", "buttondown")
    assert real.exit_code == 0
    assert "8 added (2 active, 1 bounced, 1 complained, 1 pending, 3 unsubscribed)" in real.stdout
    assert f"{sample}:10: subscriber type 'mystery' is unknown" in real.stderr


def _count(workspace: Path) -> int:
    with Store.open(workspace / ".newsletter" / "newsletter.db") as store:
        return store.count()


def test_dry_run_counts_updates_against_the_list(workspace: Path, tmp_path: Path) -> None:
    assert run(workspace, "add", "mara@example.org").exit_code == 0
    assert run(workspace, "add", "piet@example.org").exit_code == 0
    assert run(workspace, "unsubscribe", "piet@example.org").exit_code == 0
    sample = SAMPLES / "buttondown_subscribers.csv"
    result = run(workspace, "import", str(sample), "--from", "buttondown", "--dry-run")
    assert "would add 6 (1 active," in result.stdout
    assert "update 1, leave 0 unchanged and 1 alone" in result.stdout
    with Store.open(workspace / ".newsletter" / "newsletter.db") as store:
        assert store.count() == 2 and store.tags_of("mara@example.org") == []


def test_cli_usage_errors(workspace: Path) -> None:
    sample = str(SAMPLES / "ghost_member-export-2026-01-10.csv")
    both = run(workspace, "import", sample, "--from", "ghost", "--map", "email=email")
    assert both.exit_code == 2 and "use --from or --map, not both" in both.stderr
    unknown = run(workspace, "import", sample, "--from", "tinyletter")
    assert unknown.exit_code == 2
    plain = run(workspace, "import", sample)
    assert plain.exit_code == 1
    assert plain.stderr == (
        f"Error: {sample}:1: this is a Ghost export (it has 'subscribed_to_emails'); import it"
        " with --from ghost, which reads its columns and statuses (add --dry-run to see how)\n"
    )
