"""`send --segment`: the ledger fixes the segment with the recipients; paused readers are out.

The store's tests take ``store`` and run on both engines (tests/test_store.py); the
command line's use a SQLite file, which is what its --db takes for now.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from newsletter import cli, config
from newsletter.cli import main
from newsletter.errors import DeliveryError
from newsletter.models import DeliveryResult, DeliveryState, Status
from newsletter.segments import Segment, make_segment
from newsletter.store import Store
from tests.support import EXAMPLE_SLUG, TEST_SECRET_KEY, copy_example
from tests.support.delivery import copies, nonzero
from tests.support.smtp_server import ServerFactory, SmtpTestServer

EUROPE = make_segment("europe", "tag:europe")
HARBOURS = make_segment("harbours", "tag:harbours")


def fill(store: Store) -> None:
    for i in range(6):
        store.add_subscriber(f"r{i}@example.org")
    for i in (0, 1, 2):
        store.change_tags(f"r{i}@example.org", add=["europe"])
    store.change_tags("r2@example.org", add=["paused"])
    store.change_tags("r3@example.org", add=["harbours"])


def queued(store: Store, key: str = "issue") -> set[str]:
    return {s.email for s in store.list_subscribers() if store.ledger_entry(key, s.id) is not None}


def test_the_first_send_fixes_segment_and_recipients_and_leaves_paused_readers_out(
    store: Store,
) -> None:
    fill(store)
    assert store.count_recipients(EUROPE) == 2  # r2 paused
    assert store.snapshot_recipients("issue", segment=EUROPE) == 2
    assert queued(store) == {"r0@example.org", "r1@example.org"}
    assert store.issue_segment("issue") == "europe"
    assert store.issue_segment("other") is None
    # A later subscriber joins the segment: only --include-new adds them, within it.
    store.add_subscriber("late@example.org")
    store.change_tags("late@example.org", add=["europe"])
    store.add_subscriber("late-elsewhere@example.org")
    assert store.count_new_subscribers("issue", EUROPE) == 1
    assert store.snapshot_recipients("issue", segment=EUROPE) == 0
    assert store.snapshot_recipients("issue", segment=EUROPE, include_new=True) == 1
    assert "late@example.org" in queued(store)
    assert "late-elsewhere@example.org" not in queued(store)


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (
            EUROPE,
            HARBOURS,
            "issue issue went to segment europe at its first send; segment harbours",
        ),
        (EUROPE, None, "went to segment europe at its first send; a send without a segment"),
        (None, EUROPE, "went to every active subscriber (no segment) at its first send"),
    ],
)
def test_a_different_segment_later_is_an_error_naming_the_recorded_one(
    store: Store, first: Segment | None, then: Segment | None, message: str
) -> None:
    fill(store)
    store.snapshot_recipients("issue", segment=first)
    before = nonzero(store.ledger_counts("issue"))
    for include_new in (False, True):
        with pytest.raises(DeliveryError, match=re.escape(message)):
            store.snapshot_recipients("issue", segment=then, include_new=include_new)
        with pytest.raises(DeliveryError, match=re.escape(message)):
            store.check_issue_segment("issue", then)
    assert nonzero(store.ledger_counts("issue")) == before


def test_a_reader_who_pauses_during_a_send_is_cancelled_like_one_who_leaves(
    store: Store,
) -> None:
    fill(store)
    store.snapshot_recipients("issue")
    store.change_tags("r0@example.org", add=["paused"])
    store.set_status("r1@example.org", Status.UNSUBSCRIBED, "test")
    with store.acquire_send_lock("issue"):
        claimed = store.claim_batch("issue", "w", 10)
        store.record_results(
            DeliveryResult("issue", c.subscriber.id, DeliveryState.SENT, "250 ok") for c in claimed
        )
    assert {c.subscriber.email for c in claimed} == {
        "r3@example.org",
        "r4@example.org",
        "r5@example.org",
    }
    r0 = store.ledger_entry("issue", "r0@example.org")
    assert r0 is not None and r0.state == DeliveryState.CANCELLED
    assert r0.last_reply == "not sent: subscriber is paused"
    r1 = store.ledger_entry("issue", "r1@example.org")
    assert r1 is not None and r1.last_reply == "not sent: subscriber is unsubscribed"


# --- the command line, through a real SMTP server -------------------------------------------


SEGMENTS = '[segments]\neurope = "tag:europe"\nharbours = "tag:harbours and not tag:europe"\n'


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    for name in (config.ENV_SMTP_PASSWORD, config.ENV_DB, config.ENV_DKIM_KEY_FILE):
        monkeypatch.delenv(name, raising=False)


class Site:
    def __init__(self, tmp_path: Path, server: SmtpTestServer) -> None:
        self.server = server
        self.ws = copy_example(
            tmp_path / "ws", smtp={"port": server.port, "timeout": 5.0}, extra=SEGMENTS
        )
        self.db = tmp_path / "state" / "newsletter.db"
        with Store.open(self.db) as store:
            fill(store)

    def run(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(
            main, ["-C", str(self.ws), "--db", str(self.db), *args], input=input
        )


pytestmark = pytest.mark.server


@pytest.fixture
def site(tmp_path: Path, smtp_server: ServerFactory) -> Site:
    return Site(tmp_path, smtp_server())


def test_send_segment_shows_its_count_sends_to_it_and_records_it(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    dry = site.run("send", "1", "--segment", "europe", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "Segment:    europe (tag:europe; active subscribers who have not paused)" in dry.stdout
    assert "built 2 messages" in dry.stdout
    monkeypatch.setattr(cli, "stdin_is_terminal", lambda: True)
    asked = site.run("send", "1", "--segment", "europe", input="n\n")
    assert "Segment:    europe" in asked.stdout and "Recipients: 2\n" in asked.stdout
    assert site.server.messages == []
    sent = site.run("send", "1", "--segment", "europe", "--yes")
    assert sent.exit_code == 0, sent.output
    assert set(copies(site.server.messages)) == {"r0@example.org", "r1@example.org"}
    status = site.run("status", "1")
    assert "2 recipients in segment europe" in status.stdout
    other = site.run("send", "1", "--segment", "harbours", "--yes")
    assert other.exit_code == 1
    assert other.stderr.splitlines() == [
        f"Error: {site.db}: issue {EXAMPLE_SLUG} went to segment europe at its first send;"
        " segment harbours cannot change that; send it with --segment europe"
    ]
    assert len(site.server.messages) == 2


def test_segment_in_issue_md_and_disagreements(site: Site) -> None:
    unknown = site.run("send", "1", "--segment", "asia", "--yes")
    assert unknown.exit_code == 1
    assert unknown.stderr == (
        "Error: no segment 'asia' in [segments]; define it there, or use one of: europe, harbours\n"
    )
    issue_md = site.ws / "issues" / EXAMPLE_SLUG / "issue.md"
    text = issue_md.read_text(encoding="utf-8")
    issue_md.write_text(text.replace("number: 1\n", "number: 1\nsegment: harbours\n", 1))
    assert "segment: harbours" in issue_md.read_text(encoding="utf-8")
    clash = site.run("send", "1", "--segment", "europe", "--yes")
    assert clash.exit_code == 1
    assert "says segment: harbours; --segment europe disagrees" in clash.stderr
    sent = site.run("send", "1", "--yes")
    assert sent.exit_code == 0, sent.output
    assert set(copies(site.server.messages)) == {"r3@example.org"}
