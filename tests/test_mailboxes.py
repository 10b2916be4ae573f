"""The bounce mailbox read whole: mbox files, Maildir folders and IMAP, each mail once.

The bounces here are the corpus's (tests/inbound/, where test_inbox.py checks every file's
classification): Postfix, Exim, Gmail, Outlook/Office 365, old Exchange and qmail shapes.
Each quotes the Message-ID of the message that bounced, which the ledger here knows, so
each refers to a message we sent and is acted on; test_readers.py has the forgeries.
The tests that take ``store`` run on both engines (the store's contract, see
tests/test_store.py).
"""

from __future__ import annotations

import imaplib
import json
import mailbox
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import config, mailboxes
from newsletter.cli import main
from newsletter.config import Config
from newsletter.errors import BounceError, ConfigError
from newsletter.feedback import FeedbackKind
from newsletter.mailboxes import fetch_imap, import_path
from newsletter.models import BounceKind, DeliveryResult, DeliveryState, Status
from newsletter.readers import Outcome
from newsletter.store import Store
from tests.support import TEST_SECRET_KEY
from tests.support.inbound import dsn, write_mbox

CORPUS = Path(__file__).parent / "inbound"
ISSUE = "001-tides-and-timetables"

# file -> (address, kind, status) that must be detected; None for no bounce.
EXPECTED: dict[str, tuple[str, BounceKind, str] | None] = {
    "postfix-hard-user-unknown.eml": ("alice@example.com", BounceKind.HARD, "5.1.1"),
    "postfix-soft-gave-up.eml": ("bob@example.net", BounceKind.SOFT, "4.4.1"),
    "postfix-delayed-warning.eml": None,
    "exim-hard.eml": ("carol@example.org", BounceKind.HARD, "5.1.1"),
    "exim-soft-retry-timeout.eml": ("dave@example.net", BounceKind.SOFT, "4.2.2"),
    "gmail-hard-no-such-account.eml": ("erin@example.com", BounceKind.HARD, "5.1.1"),
    "gmail-soft-gave-up.eml": ("frank@example.com", BounceKind.SOFT, "4.4.1"),
    "outlook-hard-recipient-not-found.eml": ("grace@example.com", BounceKind.HARD, "5.1.10"),
    "exchange-legacy-hard.eml": ("heidi@corp.example.com", BounceKind.HARD, "5.1.1"),
    "qmail-hard-no-mailbox.eml": ("ivan@example.net", BounceKind.HARD, "5.1.1"),
    "qmail-soft-mailbox-full.eml": ("judy@example.net", BounceKind.SOFT, "4.2.2"),
    "not-a-bounce-reply.eml": None,
}
# The Message-ID each bounce quotes, as the ledger recorded it for ISSUE.
MESSAGE_IDS = {
    "alice@example.com": "<177244284501.1001.1@example.org>",
    "bob@example.net": "<177244284502.1001.2@example.org>",
    "carol@example.org": "<177244284503.1001.3@example.org>",
    "dave@example.net": "<177244284504.1001.4@example.org>",
    "erin@example.com": "<177244284505.1001.5@example.org>",
    "frank@example.com": "<177244284506.1001.6@example.org>",
    "grace@example.com": "<177244284507.1001.7@example.org>",
    "heidi@corp.example.com": "<177244284508.1001.8@example.org>",
    "ivan@example.net": "<177244284509.1001.9@example.org>",
    "judy@example.net": "<177244284510.1001.10@example.org>",
}


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads the key from the environment, as a real run does."""
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    monkeypatch.delenv(config.ENV_DB, raising=False)


def test_the_bounces_used_here_are_in_the_corpus() -> None:
    assert set(EXPECTED) <= {p.name for p in CORPUS.glob("*.eml")}


# --- processing against a real database ---------------------------------------------------


def sent_issue(store: Store, issue_key: str, message_ids: dict[str, str]) -> None:
    """Ledger rows for ``issue_key``: every address in ``message_ids`` sent that Message-ID."""
    store.snapshot_recipients(issue_key, include_new=True)
    with store.acquire_send_lock(issue_key):
        claimed = store.claim_batch(issue_key, "test", 10_000)
        store.record_results(
            DeliveryResult(
                issue_key,
                c.subscriber.id,
                DeliveryState.SENT,
                "250 2.0.0 Ok",
                message_ids.get(c.subscriber.email, f"<{issue_key}.{c.subscriber.id}@example.org>"),
            )
            for c in claimed
        )


@pytest.fixture
def store(store: Store) -> Store:
    """The store on each engine (tests/conftest.py) with the corpus's recipients."""
    for address in MESSAGE_IDS:
        store.add_subscriber(address, address.split("@")[0].title())
    return store


def corpus_mbox(path: Path, names: list[str] | None = None) -> Path:
    return write_mbox(path, ((CORPUS / name).read_bytes() for name in names or sorted(EXPECTED)))


def workspace(tmp_path: Path, extra: str = "") -> Path:
    root = tmp_path / "ws"
    (root / "issues" / ISSUE).mkdir(parents=True)
    (root / "newsletter.toml").write_text(
        '[newsletter]\nname = "The Test Gazette"\nsender = "Gazette <editor@example.org>"\n'
        + extra,
        encoding="utf-8",
    )
    (root / "issues" / ISSUE / "issue.md").write_text(
        "---\nnumber: 1\ndate: 2026-03-02\ntitle: Tides\narticles: []\n---\n", encoding="utf-8"
    )
    return root


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config.load(workspace(tmp_path), environ={config.ENV_SECRET_KEY: TEST_SECRET_KEY})


def test_import_mbox_marks_hard_bounces_and_counts_soft_ones_matched_to_the_issue(
    store: Store, cfg: Config, tmp_path: Path
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    summary = import_path(store, cfg, corpus_mbox(tmp_path / "bounces.mbox"))
    assert summary.messages == len(EXPECTED)
    assert summary.acted == {FeedbackKind.HARD_BOUNCE: 6, FeedbackKind.SOFT_BOUNCE: 4}
    assert summary.marked_bounced == 6
    assert summary.outcomes == {Outcome.APPLIED: 10, Outcome.IGNORED: 1, Outcome.NO_ACTION: 1}
    for name, expected in EXPECTED.items():
        if expected is None:
            continue
        address, kind, status = expected
        subscriber = store.get_subscriber(address)
        assert subscriber is not None
        if kind == BounceKind.HARD:
            assert subscriber.status == Status.BOUNCED, name
            event = store.subscriber_events(address)[-1]
            assert (event.new_status, event.reason) == (Status.BOUNCED, "bounce-hard")
            # The change records the DSN status, the issue, the date, how it was matched
            # and the mail's id.
            assert status in event.detail and ISSUE in event.detail and "2026-03-0" in event.detail
            assert "matched by Message-ID; mail mid:<" in event.detail
        else:
            assert subscriber.status == Status.ACTIVE, name
            assert subscriber.soft_bounces == 1, name
    records = mailboxes.bounces_for_issue(store, ISSUE)
    assert sorted(r.email for r in records) == sorted(
        e[0] for e in EXPECTED.values() if e is not None
    )
    by_address = {r.email: r for r in records}
    assert by_address["bob@example.net"].effect == "soft bounce 1 of 3"
    assert by_address["alice@example.com"].effect == "marked bounced"
    assert by_address["alice@example.com"].status == "5.1.1"


def test_a_message_is_never_counted_twice_across_imports_and_formats(
    store: Store, cfg: Config, tmp_path: Path
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    mbox = corpus_mbox(tmp_path / "a.mbox", ["qmail-soft-mailbox-full.eml"])
    first = import_path(store, cfg, mbox)
    again = import_path(store, cfg, mbox)
    # The same mail in a Maildir (as IMAP or another tool would keep it), with CRLF.
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    maildir.add((CORPUS / "qmail-soft-mailbox-full.eml").read_bytes().replace(b"\n", b"\r\n"))
    maildir.close()
    third = import_path(store, cfg, tmp_path / "Maildir")
    assert first.acted[FeedbackKind.SOFT_BOUNCE] == 1
    assert again.outcomes[Outcome.ALREADY_PROCESSED] == 1
    assert third.outcomes[Outcome.ALREADY_PROCESSED] == 1
    judy = store.get_subscriber("judy@example.net")
    assert judy is not None and judy.soft_bounces == 1
    assert len(store.bounces_for_issue(ISSUE)) == 1


def test_a_subscriber_who_left_stays_as_they_are_and_a_stranger_changes_nobody(
    store: Store, cfg: Config, tmp_path: Path
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    store.set_status("alice@example.com", Status.UNSUBSCRIBED, "test")
    data = (CORPUS / "postfix-hard-user-unknown.eml").read_bytes()
    # The same report, for an address we never sent to and about no message of ours.
    stranger = (
        data.replace(b"alice@example.com", b"nobody@example.com")
        .replace(MESSAGE_IDS["alice@example.com"].encode(), b"<other@example.net>")
        .replace(b"Message-Id: <2026", b"Message-Id: <x2026")
    )
    lines: list[str] = []
    summary = import_path(
        store,
        cfg,
        write_mbox(tmp_path / "b.mbox", [data, stranger]),
        on_message=lambda r: lines.append(json.dumps(r.as_json())),
    )
    assert summary.outcomes == {Outcome.APPLIED: 1, Outcome.UNMATCHED: 1}
    assert store.list_bounces()[0].effect == "no change (subscriber is unsubscribed)"
    alice = store.get_subscriber("alice@example.com")
    assert alice is not None and alice.status == Status.UNSUBSCRIBED
    assert len(store.list_bounces()) == 1  # the unmatched one is only in processed_messages
    assert json.loads(lines[1])["reports"][0]["why_not"].startswith("refers to no message")


def test_one_broken_mail_never_stops_the_run(store: Store, cfg: Config, tmp_path: Path) -> None:
    """Mail without a From, empty, garbage and binary between two real bounces: every one
    is read, the broken ones are recorded as unreadable with the reason, and the run goes on.
    """
    sent_issue(store, ISSUE, MESSAGE_IDS)
    broken = [
        (CORPUS / "malformed-no-from.eml").read_bytes(),
        b"",
        b"\x00\x01\x02 not a mail at all \xff\xfe" * 100,
        (CORPUS / "malformed-binary.eml").read_bytes(),
        b"Subject: x\nContent-Type: multipart/mixed; boundary=b\n\n" + b"--b\n\nx\n" * 100_000,
    ]
    first = (CORPUS / "exim-hard.eml").read_bytes()
    last = (CORPUS / "gmail-hard-no-such-account.eml").read_bytes()
    mbox = write_mbox(tmp_path / "broken.mbox", [first, *broken, last])
    result = CliRunner().invoke(
        main, ["-C", str(cfg.root), "--db", str(store.database), "bounces", "import", str(mbox)]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.output.count("unreadable  broken.mbox:") == len(broken)
    assert "no From header" in result.output and "empty" in result.output
    for address in ("carol@example.org", "erin@example.com"):
        subscriber = store.get_subscriber(address)
        assert subscriber is not None and subscriber.status == Status.BOUNCED
    again = import_path(store, cfg, mbox)
    assert again.outcomes == {Outcome.ALREADY_PROCESSED: len(broken) + 2}


def test_a_maildir_file_that_cannot_be_read_is_reported_and_the_others_are_read(
    store: Store, cfg: Config, tmp_path: Path
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    box = mailbox.Maildir(tmp_path / "Maildir")
    box.add((CORPUS / "exim-hard.eml").read_bytes())
    box.close()
    # A message file that went away between the listing and the reading.
    (tmp_path / "Maildir" / "new" / "1772442999.M1P1.gone").symlink_to(tmp_path / "nowhere")
    summary = import_path(store, cfg, tmp_path / "Maildir")
    assert summary.outcomes == {Outcome.APPLIED: 1, Outcome.UNREADABLE: 1}
    assert summary.unreadable[0][1].startswith("cannot be read")


def test_import_refuses_what_is_not_a_mailbox(store: Store, cfg: Config, tmp_path: Path) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("hello\n")
    with pytest.raises(BounceError, match="not an mbox"):
        import_path(store, cfg, note)
    (tmp_path / "folder").mkdir()
    with pytest.raises(BounceError, match="not a Maildir"):
        import_path(store, cfg, tmp_path / "folder")
    with pytest.raises(BounceError, match="no such file"):
        import_path(store, cfg, tmp_path / "missing")


# --- the CLI ------------------------------------------------------------------------------


def test_cli_import_and_list(tmp_path: Path) -> None:
    root = workspace(tmp_path)
    with Store.open(root / ".newsletter" / "newsletter.db") as db:
        for address in MESSAGE_IDS:
            db.add_subscriber(address)
        sent_issue(db, ISSUE, MESSAGE_IDS)
    mbox = corpus_mbox(tmp_path / "b.mbox")
    runner = CliRunner()
    result = runner.invoke(main, ["-C", str(root), "bounces", "import", str(mbox)])
    assert result.exit_code == 0, result.output
    assert (
        "12 messages: 6 hard and 4 soft bounces, 0 complaints and 0 unsubscribes acted on;"
        " 0 unmatched, 1 with nothing to do, 1 ignored, 0 unreadable, 0 already processed."
    ) in result.output
    assert "Subscribers changed: 6 bounced, 0 complained, 0 unsubscribed." in result.output
    assert (
        "hard-bounce  5.1.1   alice@example.com -> alice@example.com"
        " issue 001-tides-and-timetables (by Message-ID): marked bounced"
    ) in result.output
    again = runner.invoke(main, ["-C", str(root), "inbox", "import", str(mbox)])
    assert "12 already processed" in again.output
    listed = runner.invoke(main, ["-C", str(root), "bounces", "list", "1"])
    assert listed.exit_code == 0, listed.output
    assert len(listed.output.splitlines()) == 10
    assert "soft  4.2.2" in listed.output and "judy@example.net" in listed.output
    missing = runner.invoke(main, ["-C", str(root), "inbox", "import", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: ")


def test_without_the_secret_key_nothing_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VERP addresses and unsubscribe tokens cannot be checked without it: an unsubscribe
    would be recorded as unmatched and lost, so nothing is read at all."""
    monkeypatch.delenv(config.ENV_SECRET_KEY)
    root = workspace(tmp_path)
    mbox = corpus_mbox(tmp_path / "b.mbox", ["unsubscribe-mailto-token.eml"])
    result = CliRunner().invoke(main, ["-C", str(root), "inbox", "import", str(mbox)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: environment: NEWSLETTER_SECRET_KEY is not set")
    with Store.open(root / ".newsletter" / "newsletter.db") as db:
        assert not db.is_processed("anything") and db.list_bounces() == []


def test_cli_dry_run_json_is_one_line_per_message_and_changes_nothing(tmp_path: Path) -> None:
    root = workspace(tmp_path)
    with Store.open(root / ".newsletter" / "newsletter.db") as db:
        for address in MESSAGE_IDS:
            db.add_subscriber(address)
        sent_issue(db, ISSUE, MESSAGE_IDS)
    forged = dsn([("bob@example.net", "5.1.1"), ("carol@example.org", "5.1.1")])
    mbox = write_mbox(
        tmp_path / "b.mbox",
        [(CORPUS / "postfix-hard-user-unknown.eml").read_bytes(), forged, b""],
    )
    result = CliRunner().invoke(
        main, ["-C", str(root), "inbox", "import", str(mbox), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["outcome"] for line in lines] == ["applied", "unmatched", "unreadable"]
    (report,) = lines[0]["reports"]
    assert report == {
        "kind": "hard-bounce",
        "recipient": "alice@example.com",
        "status": "5.1.1",
        "bounce": "hard",
        "refers_to": {
            "subscriber": "alice@example.com",
            "subscriber_status": "active",
            "issue": ISSUE,
            "message_id": MESSAGE_IDS["alice@example.com"],
            "by": "Message-ID",
        },
        "action": "mark bounced",
        "why_not": None,
        "effect": None,
    }
    assert [r["action"] for r in lines[1]["reports"]] == [None, None]
    assert lines[1]["reports"][0]["why_not"].startswith("refers to no message we sent")
    assert lines[2]["reason"] == "empty" and lines[0]["dry_run"] is True
    assert "Dry run: nothing was changed." in result.stderr
    with Store.open(root / ".newsletter" / "newsletter.db") as db:
        assert all(s.status == Status.ACTIVE for s in db.list_subscribers())
        assert db.list_bounces() == []
    # Then for real: the same messages, once.
    real = CliRunner().invoke(main, ["-C", str(root), "inbox", "import", str(mbox)])
    assert "1 unmatched" in real.output and "1 unreadable" in real.output
    assert "Subscribers changed: 1 bounced" in real.output


# --- IMAP, against a real IMAP server (pymap) on loopback ----------------------------------

PYMAP = shutil.which("pymap", path=str(Path(sys.executable).parent))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def imap_server() -> Iterator[int]:
    """pymap's in-memory IMAP server (user demouser / demopass) on a loopback port."""
    assert PYMAP is not None, "pymap is a dev dependency (pip install -e '.[dev]')"
    port = free_port()
    proc = subprocess.Popen(
        [PYMAP, "--host", "127.0.0.1", "--port", str(port), "--no-tls", "dict", "--demo-data"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"pymap did not start: {proc.stderr.read()!r}") from None
            time.sleep(0.05)  # polling for the port, with a deadline
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


HARD, SOFT = FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE


def imap_config(tmp_path: Path, port: int, password: str | None = "demopass") -> config.Config:
    root = workspace(
        tmp_path,
        f'[bounces]\nimap_host = "127.0.0.1"\nimap_port = {port}\nimap_username = "demouser"\n'
        'imap_folder = "Bounces"\nimap_security = "none"\nsoft_limit = 3\n',
    )
    env = {"NEWSLETTER_IMAP_PASSWORD": password} if password else {}
    return config.load(root, environ={config.ENV_SECRET_KEY: TEST_SECRET_KEY, **env})


@pytest.mark.server
def test_fetch_over_imap_processes_new_messages_once_and_flags_them(
    imap_server: int, tmp_path: Path, store: Store
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    client = imaplib.IMAP4("127.0.0.1", imap_server)
    client.login("demouser", "demopass")
    client.create("Bounces")
    for name in ("gmail-hard-no-such-account.eml", "exim-soft-retry-timeout.eml"):
        client.append("Bounces", None, None, (CORPUS / name).read_bytes())
    cfg = imap_config(tmp_path, imap_server)
    dry = fetch_imap(store, cfg, dry_run=True)
    assert (dry.messages, dict(dry.acted)) == (2, {HARD: 1, SOFT: 1})
    client.select("Bounces")
    assert len(client.uid("SEARCH", None, "UNSEEN")[1][0].split()) == 2  # type: ignore[arg-type]
    summary = fetch_imap(store, cfg)
    assert (summary.messages, dict(summary.acted)) == (2, {HARD: 1, SOFT: 1})
    erin = store.get_subscriber("erin@example.com")
    assert erin is not None and erin.status == Status.BOUNCED
    client.select("Bounces")
    assert client.uid("SEARCH", None, "UNSEEN") == ("OK", [b""])  # type: ignore[arg-type]
    # Nothing new: nothing read. A new message: only it. --all: the old ones are known.
    assert fetch_imap(store, cfg).messages == 0
    client.append(
        "Bounces", None, None, (CORPUS / "outlook-hard-recipient-not-found.eml").read_bytes()
    )
    assert fetch_imap(store, cfg).acted == {HARD: 1}
    everything = fetch_imap(store, cfg, include_seen=True)
    assert (everything.messages, everything.outcomes[Outcome.ALREADY_PROCESSED]) == (3, 3)
    dave = store.get_subscriber("dave@example.net")
    assert dave is not None and dave.soft_bounces == 1
    client.logout()


@pytest.mark.server
def test_fetch_needs_the_password_and_refuses_clear_text_off_loopback(
    imap_server: int, tmp_path: Path, store: Store
) -> None:
    cfg = imap_config(tmp_path, imap_server, password=None)
    with pytest.raises(ConfigError, match="NEWSLETTER_IMAP_PASSWORD"):
        fetch_imap(store, cfg)
    remote = replace(
        cfg,
        bounces=replace(cfg.bounces, imap_host="imap.example.org"),
        secrets=cfg.secrets.replace(imap_password="x"),
    )
    with pytest.raises(ConfigError, match="in clear"):
        fetch_imap(store, remote)
    result = CliRunner().invoke(
        main,
        ["-C", str(cfg.root), "bounces", "fetch"],
        env={"NEWSLETTER_IMAP_PASSWORD": "wrong-password"},
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: 127.0.0.1:") and "refused" in result.output


def test_config_refuses_a_bad_imap_security_or_soft_limit(tmp_path: Path) -> None:
    root = workspace(tmp_path, '[bounces]\nimap_security = "tls"\n')
    with pytest.raises(ConfigError, match=r"newsletter.toml:5: \[bounces\] imap_security 'tls'"):
        config.load(root, environ={})
    (root / "newsletter.toml").write_text("[bounces]\nsoft_limit = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="soft_limit must be at least 1"):
        config.load(root, environ={})


@pytest.mark.parametrize("value", ["bounces+x@example.org", "bounces", "a b@example.org", "x@y"])
def test_config_refuses_a_return_path_that_is_not_a_plain_address(
    tmp_path: Path, value: str
) -> None:
    root = workspace(tmp_path, f'[bounces]\nreturn_path = "{value}"\n')
    with pytest.raises(ConfigError, match=r"newsletter.toml:5: \[bounces\] return_path"):
        config.load(root, environ={})


def test_the_return_paths_local_part_is_the_verp_prefix(tmp_path: Path) -> None:
    root = workspace(tmp_path, '[bounces]\nreturn_path = "returns@mail.example.org"\n')
    assert config.load(root, environ={}).bounces.verp_prefix == "returns"
    assert config.BounceSettings().verp_prefix == "bounces"
