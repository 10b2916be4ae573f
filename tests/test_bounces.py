"""Bounce detection and processing, on a corpus of real-world-shaped bounce messages.

These use the bounces of the inbound corpus (tests/inbound/, where test_inbox.py checks
every file's classification): Postfix, Exim, Gmail, Outlook/Office 365, old Exchange and
qmail shapes. Each quotes the Message-ID of the message that bounced, which the ledger here
knows, so the issue is found.
"""

from __future__ import annotations

import imaplib
import mailbox
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import bounces, config
from newsletter.bounces import detect, fetch_imap, import_path
from newsletter.cli import main
from newsletter.errors import BounceError, ConfigError
from newsletter.models import BounceKind, DeliveryResult, DeliveryState, Status
from newsletter.store import Store

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


def test_the_bounces_used_here_are_in_the_corpus() -> None:
    assert set(EXPECTED) <= {p.name for p in CORPUS.glob("*.eml")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_bounce_is_detected_with_kind_status_and_original_message(name: str) -> None:
    detected = detect((CORPUS / name).read_bytes())
    expected = EXPECTED[name]
    if expected is None:
        assert detected.bounces == ()
        return
    address, kind, status = expected
    assert [(b.email, b.kind, b.status) for b in detected.bounces] == [(address, kind, status)]
    bounce = detected.bounces[0]
    assert bounce.original_message_id == MESSAGE_IDS[address]
    assert bounce.reported_at is not None and bounce.reported_at.tzinfo is not None
    assert bounce.reported_at.year == 2026 and bounce.reported_at.month == 3
    assert status in bounce.diagnostic or name.startswith(("postfix-soft", "gmail-soft"))


def test_a_delay_warning_is_not_a_bounce_but_is_reported() -> None:
    detected = detect((CORPUS / "postfix-delayed-warning.eml").read_bytes())
    assert detected.bounces == ()
    assert detected.delayed == ("bob@example.net",)


def test_dsn_parts_win_over_the_heuristics_and_dates_are_when_the_server_gave_up() -> None:
    detected = detect((CORPUS / "postfix-soft-gave-up.eml").read_bytes())
    # Arrival-Date is 2 March (the original message); the report itself is of 7 March.
    assert detected.bounces[0].reported_at == datetime(2026, 3, 7, 9, 20, 11, tzinfo=UTC)
    gmail = detect((CORPUS / "gmail-soft-gave-up.eml").read_bytes()).bounces[0]
    assert gmail.reported_at is not None
    assert gmail.reported_at.astimezone(UTC) == datetime(2026, 3, 7, 9, 20, 31, tzinfo=UTC)


def test_message_key_is_the_message_id_else_a_hash() -> None:
    data = (CORPUS / "exim-hard.eml").read_bytes()
    assert detect(data).message_key == "mid:<E1vA2bC-0001xY-2Z@relay.example.org>"
    without = data.replace(b"Message-Id: <E1vA2bC-0001xY-2Z@relay.example.org>\n", b"")
    key = detect(without).message_key
    assert key.startswith("sha256:") and key == detect(without).message_key


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
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "db" / "newsletter.db") as db:
        for address in MESSAGE_IDS:
            db.add_subscriber(address, address.split("@")[0].title())
        yield db


def corpus_mbox(path: Path, names: list[str] | None = None) -> Path:
    box = mailbox.mbox(path)
    for name in names or sorted(EXPECTED):
        box.add((CORPUS / name).read_bytes())
    box.flush()
    box.close()
    return path


def test_import_mbox_marks_hard_bounces_and_counts_soft_ones_matched_to_the_issue(
    store: Store, tmp_path: Path
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    summary = import_path(store, corpus_mbox(tmp_path / "bounces.mbox"), soft_limit=3)
    assert summary.messages == len(EXPECTED)
    assert (summary.hard, summary.soft, summary.marked_bounced) == (6, 4, 6)
    assert (summary.not_bounces, summary.warnings_only, summary.already_processed) == (1, 1, 0)
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
            # The change records the DSN status, the issue and the date.
            assert status in event.detail and ISSUE in event.detail and "2026-03-0" in event.detail
        else:
            assert subscriber.status == Status.ACTIVE, name
            assert subscriber.soft_bounces == 1, name
    records = bounces.bounces_for_issue(store, ISSUE)
    assert sorted(r.email for r in records) == sorted(
        e[0] for e in EXPECTED.values() if e is not None
    )
    by_address = {r.email: r for r in records}
    assert by_address["bob@example.net"].effect == "soft bounce 1 of 3"
    assert by_address["alice@example.com"].effect == "marked bounced"
    assert by_address["alice@example.com"].status == "5.1.1"


def test_a_message_is_never_counted_twice_across_imports_and_formats(
    store: Store, tmp_path: Path
) -> None:
    sent_issue(store, ISSUE, MESSAGE_IDS)
    mbox = corpus_mbox(tmp_path / "a.mbox", ["qmail-soft-mailbox-full.eml"])
    first = import_path(store, mbox, soft_limit=3)
    again = import_path(store, mbox, soft_limit=3)
    # The same mail in a Maildir (as IMAP or another tool would keep it).
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    maildir.add((CORPUS / "qmail-soft-mailbox-full.eml").read_bytes())
    maildir.close()
    third = import_path(store, tmp_path / "Maildir", soft_limit=3)
    assert (first.soft, again.already_processed, third.already_processed) == (1, 1, 1)
    judy = store.get_subscriber("judy@example.net")
    assert judy is not None and judy.soft_bounces == 1
    assert len(store.bounces_for_issue(ISSUE)) == 1


def soft_dsn(address: str, message_id: str, day: int, ident: str) -> bytes:
    """A Postfix DSN that gave up after days of 4.2.2 answers."""
    template = (CORPUS / "postfix-soft-gave-up.eml").read_text()
    return (
        template.replace("bob@example.net", address)
        .replace("<177244284502.1001.2@example.org>", message_id)
        .replace("20260307092011.7Qm3yT1c9Rz2wAb@mail.example.org", f"{ident}@mail.example.org")
        .replace("Sat,  7 Mar 2026", f"Sat,  {day} Mar 2026")
        .replace("Status: 4.4.1", "Status: 4.2.2")
        .encode()
    )


def test_soft_bounces_in_a_row_mark_the_subscriber_bounced(store: Store) -> None:
    address = "bob@example.net"
    for number in (1, 2, 3):
        sent_issue(store, f"00{number}-issue", {address: f"<issue{number}.bob@example.org>"})
    results = []
    for number in (1, 2, 3):
        data = soft_dsn(address, f"<issue{number}.bob@example.org>", number + 5, f"b{number}")
        _, records = bounces.process_message(store, data, source="test", soft_limit=3)
        assert records is not None
        results.append(records[0].effect)
    assert results == [
        "soft bounce 1 of 3",
        "soft bounce 2 of 3",
        "marked bounced after 3 soft bounces",
    ]
    bob = store.get_subscriber(address)
    assert bob is not None and bob.status == Status.BOUNCED and bob.soft_bounces == 3
    event = store.subscriber_events(address)[-1]
    assert event.reason == "bounce-soft"
    assert "3 soft bounces in a row" in event.detail and "4.2.2" in event.detail
    assert "003-issue" in event.detail and "2026-03-08" in event.detail


def test_soft_bounces_count_once_per_issue_and_a_clean_issue_breaks_the_run(
    store: Store,
) -> None:
    address = "dave@example.net"
    for number in (1, 2, 3):
        sent_issue(store, f"00{number}-issue", {address: f"<issue{number}.dave@example.org>"})
    effects = []
    # Two reports for issue 1 (two relays gave up): one count.
    for ident in ("d1", "d1b"):
        _, records = bounces.process_message(
            store,
            soft_dsn(address, "<issue1.dave@example.org>", 6, ident),
            source="t",
            soft_limit=2,
        )
        assert records is not None
        effects.append(records[0].effect)
    # Issue 2 got through (no bounce); issue 3 bounces softly: the run starts again.
    _, records = bounces.process_message(
        store, soft_dsn(address, "<issue3.dave@example.org>", 9, "d3"), source="t", soft_limit=2
    )
    assert records is not None
    effects.append(records[0].effect)
    assert effects == [
        "soft bounce 1 of 2",
        "soft bounce already counted for this issue",
        "soft bounce 1 of 2",
    ]
    dave = store.get_subscriber(address)
    assert dave is not None and dave.status == Status.ACTIVE and dave.soft_bounces == 1


def test_a_forwarded_address_is_found_through_the_message_id(store: Store) -> None:
    sent_issue(store, ISSUE, {"carol@example.org": "<fwd.carol@example.org>"})
    data = (
        (CORPUS / "exim-hard.eml")
        .read_bytes()
        .replace(b"carol@example.org", b"carol.new@example.net")
        .replace(b"<177244284503.1001.3@example.org>", b"<fwd.carol@example.org>")
    )
    _, records = bounces.process_message(store, data, source="t", soft_limit=3)
    assert records is not None and records[0].issue_key == ISSUE
    carol = store.get_subscriber("carol@example.org")
    assert carol is not None and carol.status == Status.BOUNCED


def test_unknown_addresses_and_unsubscribed_subscribers_are_recorded_but_unchanged(
    store: Store,
) -> None:
    store.set_status("alice@example.com", Status.UNSUBSCRIBED, "test")
    data = (CORPUS / "postfix-hard-user-unknown.eml").read_bytes()
    _, records = bounces.process_message(store, data, source="t", soft_limit=3)
    assert records is not None and records[0].effect == "no change (subscriber is unsubscribed)"
    alice = store.get_subscriber("alice@example.com")
    assert alice is not None and alice.status == Status.UNSUBSCRIBED
    stranger = data.replace(b"alice@example.com", b"nobody@example.com").replace(
        b"Message-Id: <2026", b"Message-Id: <x2026"
    )
    _, records = bounces.process_message(store, stranger, source="t", soft_limit=3)
    assert records is not None and records[0].subscriber_id is None
    assert records[0].effect == "no subscriber with this address"


def test_import_refuses_what_is_not_a_mailbox(store: Store, tmp_path: Path) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("hello\n")
    with pytest.raises(BounceError, match="not an mbox"):
        import_path(store, note, soft_limit=3)
    (tmp_path / "folder").mkdir()
    with pytest.raises(BounceError, match="not a Maildir"):
        import_path(store, tmp_path / "folder", soft_limit=3)
    with pytest.raises(BounceError, match="no such file"):
        import_path(store, tmp_path / "missing", soft_limit=3)


# --- the CLI ------------------------------------------------------------------------------


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
    assert "12 messages: 6 hard and 4 soft bounces, 6 subscribers marked bounced" in result.output
    assert "hard  5.1.1   alice@example.com issue 001-tides-and-timetables: marked bounced" in (
        result.output
    )
    again = runner.invoke(main, ["-C", str(root), "bounces", "import", str(mbox)])
    assert "12 already processed" in again.output
    listed = runner.invoke(main, ["-C", str(root), "bounces", "list", "1"])
    assert listed.exit_code == 0, listed.output
    assert len(listed.output.splitlines()) == 10
    assert "soft  4.2.2" in listed.output and "judy@example.net" in listed.output
    missing = runner.invoke(main, ["-C", str(root), "bounces", "import", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: ")


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


def imap_config(tmp_path: Path, port: int, password: str | None = "demopass") -> config.Config:
    root = workspace(
        tmp_path,
        f'[bounces]\nimap_host = "127.0.0.1"\nimap_port = {port}\nimap_username = "demouser"\n'
        'imap_folder = "Bounces"\nimap_security = "none"\nsoft_limit = 3\n',
    )
    env = {"NEWSLETTER_IMAP_PASSWORD": password} if password else {}
    return config.load(root, environ=env)


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
    summary = fetch_imap(store, cfg)
    assert (summary.messages, summary.hard, summary.soft) == (2, 1, 1)
    erin = store.get_subscriber("erin@example.com")
    assert erin is not None and erin.status == Status.BOUNCED
    client.select("Bounces")
    assert client.uid("SEARCH", None, "UNSEEN") == ("OK", [b""])  # type: ignore[arg-type]
    # Nothing new: nothing read. A new message: only it. --all: the old ones are known.
    assert fetch_imap(store, cfg).messages == 0
    client.append(
        "Bounces", None, None, (CORPUS / "outlook-hard-recipient-not-found.eml").read_bytes()
    )
    assert fetch_imap(store, cfg).hard == 1
    everything = fetch_imap(store, cfg, include_seen=True)
    assert (everything.messages, everything.already_processed) == (3, 3)
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
