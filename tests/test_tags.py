"""Tags: on subscribers, in the history, in the CSV import and export, on the command line.

The store's tests take ``store`` and run on both engines (tests/test_store.py).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result

from newsletter.errors import StoreError
from newsletter.models import Status
from newsletter.segments import TagError, make_segment, normalize_tag, split_tags
from newsletter.store import Store
from tests.support.cli import minimal_workspace, subscribers_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tags_are_normalised_and_bad_ones_refused() -> None:
    assert normalize_tag("  Lorem   Editors ") == "lorem editors"
    assert split_tags('"Lorem Editors","Europe"; harbours,europe') == [
        "lorem editors",
        "europe",
        "harbours",
    ]
    for bad in ("", "  ", "a,b", "a;b", 'say "x"', "bell\x07", "x" * 65):
        with pytest.raises(TagError):
            normalize_tag(bad)
    assert len(split_tags(";".join(f"t{i}" for i in range(100)))) == 100
    with pytest.raises(TagError, match="more than 100 tags"):
        split_tags(";".join(f"t{i}" for i in range(101)))


def test_tag_and_untag_change_only_what_differs_and_record_history(store: Store) -> None:
    store.add_subscriber("ann@example.com", "Ann")
    assert store.change_tags("ann@example.com", add=["Europe", "harbours"]) == (
        ["europe", "harbours"],
        [],
    )
    assert store.change_tags("ann@example.com", add=["europe"]) == ([], [])
    assert store.change_tags("ANN@example.com", remove=["harbours", "nothing"]) == (
        [],
        ["harbours"],
    )
    assert store.tags_of("ann@example.com") == ["europe"]
    events = [(e.reason, e.detail) for e in store.subscriber_events("ann@example.com")]
    assert events == [("added", ""), ("tag", "+europe +harbours"), ("tag", "-harbours")]
    assert store.get_subscriber("ann@example.com").status == Status.ACTIVE  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="comma"):
        store.change_tags("ann@example.com", add=["a,b"])
    with pytest.raises(StoreError, match="no subscriber"):
        store.change_tags("nobody@example.com", add=["x"])


def test_list_and_count_by_tag(store: Store) -> None:
    for i in range(5):
        store.add_subscriber(f"r{i}@example.com")
    for i in (1, 3):
        store.change_tags(f"r{i}@example.com", add=["europe"])
    assert [s.email for s in store.list_subscribers(tag="Europe")] == [
        "r1@example.com",
        "r3@example.com",
    ]
    assert store.count(tag="europe") == 2
    assert store.tag_counts() == {"europe": 2}


def test_import_reads_tags_merges_duplicates_and_never_removes(
    store: Store, tmp_path: Path
) -> None:
    store.add_subscriber("old@example.com", "Old")
    store.change_tags("old@example.com", add=["kept"])
    store.add_subscriber("gone@example.com", "Gone", status=Status.UNSUBSCRIBED)
    csv_file = write(
        tmp_path / "list.csv",
        "email,name,tags\n"
        "new@example.com,New,europe;harbours\n"
        'old@example.com,,"Europe, Lisbon"\n'
        "new@example.com,,ferries\n"
        "gone@example.com,,europe\n"
        "bad@example.com,,a\x01b\n",
    )
    report = store.import_csv(csv_file)
    assert (report.added, report.updated, report.skipped_inactive) == (1, 1, 1)
    assert report.error_count == 1 and "tags:" in report.errors[0].message
    assert report.errors[0].line == 6
    assert store.tags_of("new@example.com") == ["europe", "ferries", "harbours"]
    assert store.tags_of("old@example.com") == ["europe", "kept", "lisbon"]
    assert store.tags_of("gone@example.com") == []  # an inactive row is left alone
    old_events = [(e.reason, e.detail) for e in store.subscriber_events("old@example.com")]
    assert old_events[-1] == ("tag", "file list.csv: +europe +lisbon")
    # Importing the same file again changes nothing.
    again = store.import_csv(csv_file)
    assert (again.added, again.updated) == (0, 0)


def test_export_writes_tags_and_import_reads_them_back(store: Store, tmp_path: Path) -> None:
    store.add_subscriber("a@example.com", "A", {"city": "Oslo"})
    store.change_tags("a@example.com", add=["europe", "harbours"])
    store.add_subscriber("b@example.com", "B")
    out = io.StringIO()
    store.export_csv(out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "email,name,status,created_at,tags,city"
    assert lines[1].endswith(",europe;harbours,Oslo")
    with Store.open(":memory:") as fresh:
        fresh.import_csv(write(tmp_path / "export.csv", out.getvalue()))
        assert fresh.tags_of("a@example.com") == ["europe", "harbours"]
        assert fresh.tags_of("b@example.com") == []
        # The export's created_at is the sign-up date of the new rows (to the second).
        signed = []
        for sub in fresh.list_subscribers():
            record = fresh.person(sub.email)
            assert record is not None
            signed.append(record.consents[0].signed_up)
        assert signed == [
            s.created_at.replace(microsecond=0).isoformat() for s in store.list_subscribers()
        ]


def test_import_honours_sign_up_and_consent_dates(store: Store, tmp_path: Path) -> None:
    csv_file = write(
        tmp_path / "list.csv",
        "email,created_at,consent_at\n"
        "a@example.com,2024-03-01,2024-03-02 10:00:00\n"
        "b@example.com,not a date,\n"
        "c@example.com,,\n",
    )
    report = store.import_csv(csv_file)
    assert report.added == 2 and report.errors[0].line == 3
    assert "unreadable date 'not a date' in column 'created_at'" in report.errors[0].message
    a = store.person("a@example.com")
    assert a is not None
    (consent,) = a.consents
    assert (consent.origin, consent.signed_up) == ("list.csv:2", "2024-03-01")
    assert consent.confirmed_at == datetime(2024, 3, 2, 10, 0, tzinfo=UTC)
    # The file's sign-up date is what a segment's joined reads.
    assert [
        s.email for s in store.list_subscribers(segment=make_segment("s", "joined = 2024-03-01"))
    ] == ["a@example.com"]
    c = store.person("c@example.com")
    # No date: the time of the import.
    assert c is not None and c.subscriber is not None and c.consents[0].signed_up == ""
    assert abs(datetime.now(UTC) - c.subscriber.created_at) < timedelta(minutes=5)
    assert [
        s.email for s in store.list_subscribers(segment=make_segment("s", "joined > 2024-03-01"))
    ] == ["c@example.com"]


# --- the command line -------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return minimal_workspace(tmp_path)


def run(workspace: Path, *args: str) -> Result:
    return subscribers_cli(workspace, *args)


def test_cli_tag_untag_list_and_tags(workspace: Path) -> None:
    assert run(workspace, "add", "ann@example.com").exit_code == 0
    assert run(workspace, "add", "bob@example.com").exit_code == 0
    tagged = run(workspace, "tag", "ann@example.com", "Europe", "harbours")
    assert tagged.exit_code == 0 and tagged.stdout == "Tagged ann@example.com: europe, harbours.\n"
    assert run(workspace, "tag", "ann@example.com", "europe").stdout == (
        "ann@example.com had those tags.\n"
    )
    listed = run(workspace, "list", "--tag", "europe")
    assert listed.stdout == "ann@example.com\tactive\t\n"
    assert run(workspace, "tags").stdout == "europe\t1\nharbours\t1\n"
    untagged = run(workspace, "untag", "ann@example.com", "harbours")
    assert untagged.stdout == "Untagged ann@example.com: harbours.\n"
    bad = run(workspace, "tag", "ann@example.com", "a;b")
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: ") and "Traceback" not in bad.output
    missing = run(workspace, "tag", "nobody@example.com", "x")
    assert missing.exit_code == 1 and "no subscriber" in missing.stderr
    usage = run(workspace, "tag", "ann@example.com")
    assert usage.exit_code == 2
