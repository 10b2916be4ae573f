"""End to end: send an issue through a real SMTP server with VERP, then read back a mailbox of
replies, bounces and forgeries. Exactly the subscribers whose reports refer to a message we
sent change; the run reads every message; reading the mailbox again changes nothing.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner, Result

from newsletter import config
from newsletter.cli import main
from newsletter.models import Status
from newsletter.store import Store
from tests.support import TEST_SECRET_KEY, copy_example
from tests.support.delivery import fill
from tests.support.inbound import (
    arf,
    auto_reply,
    dsn,
    mailto_unsubscribe,
    returned_headers,
    write_mbox,
)
from tests.support.smtp_server import Received, ServerFactory

VERP = re.compile(r"bounces\+([0-9a-z]+-[a-z2-7]{16})@example\.org")


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    for name in (config.ENV_SMTP_PASSWORD, config.ENV_DB, config.ENV_DKIM_KEY_FILE):
        monkeypatch.delenv(name, raising=False)


def header(data: bytes, name: str) -> str:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return str(message[name])


@pytest.mark.server
def test_send_with_verp_then_read_back_bounces_complaints_unsubscribes_and_forgeries(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = smtp_server()
    ws = copy_example(
        tmp_path / "ws",
        smtp={"port": server.port, "timeout": 5.0},
        extra='[bounces]\nreturn_path = "bounces@example.org"\nsoft_limit = 3\n',
    )
    db = tmp_path / "state" / "newsletter.db"
    with Store.open(db) as store:
        active = sorted(fill(store, tmp_path, generated=55))

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["-C", str(ws), "--db", str(db), *args])

    sent = run("send", "1", "--yes")
    assert sent.exit_code == 0, sent.output
    copies: dict[str, Received] = {m.recipients[0]: m for m in server.messages}
    assert sorted(copies) == active
    # Each copy's envelope sender is its own signed VERP address; the bytes carry no token.
    tokens = {address: VERP.fullmatch(m.mail_from) for address, m in copies.items()}
    assert all(tokens.values()) and len({m.mail_from for m in copies.values()}) == len(active)
    assert all(b"bounces+" not in m.data for m in copies.values())
    assert all(len(m.mail_from.split("@")[0]) <= 64 for m in copies.values())

    a, b, c, d, e, f, *others = active
    message_id = {address: header(m.data, "Message-ID") for address, m in copies.items()}
    list_unsubscribe = header(copies[e].data, "List-Unsubscribe")
    mailto = re.search(r"<mailto:[^>?]+\?subject=([^>]+)>", list_unsubscribe)
    assert mailto is not None
    messages = [
        # A: a bounce to the VERP address of A's copy (no Message-ID quoted).
        dsn([(a, "5.1.1")], to=copies[a].mail_from),
        # B: a bounce to the plain address, quoting the Message-ID of B's copy.
        dsn([(b, "5.2.1")], returned=returned_headers(b, message_id=message_id[b])),
        # A forged report naming 50 subscribers, to a VERP address that is not ours.
        dsn([(x, "5.1.1") for x in others[:50]], to="bounces+1-aaaaaaaaaaaaaaaa@example.org"),
        # Three forged "gave up" reports for C, referring to nothing we sent.
        *(dsn([(c, "4.2.2")], day=day) for day in (3, 4, 5)),
        # D: a feedback-loop complaint returning D's copy (the recipient redacted).
        arf(None, returned=returned_headers("redacted@example.com", message_id=message_id[d])),
        # E: the mail E's client sends for the List-Unsubscribe mailto, with E's token.
        mailto_unsubscribe("not.e@example.net", unquote(mailto.group(1))),
        # F: an out-of-office reply to F's copy.
        auto_reply(f, message_id[f]),
        # Broken: empty, and no From.
        b"",
        b"Subject: a note\nMessage-ID: <nofrom@example.net>\n\nno sender here\n",
    ]
    mbox = write_mbox(tmp_path / "returns.mbox", messages)

    with Store.open(db) as store:
        before = {s.email: s.status for s in store.list_subscribers()}
    first = run("inbox", "import", str(mbox))
    assert first.exit_code == 0, first.output
    assert "Traceback" not in first.output
    assert (
        f"{len(messages)} messages: 2 hard and 0 soft bounces, 1 complaints and 1 unsubscribes"
        " acted on; 4 unmatched, 0 with nothing to do, 1 ignored, 2 unreadable,"
        " 0 already processed."
    ) in first.output
    assert "Subscribers changed: 2 bounced, 1 complained, 1 unsubscribed." in first.output

    with Store.open(db) as store:
        after = {s.email: s.status for s in store.list_subscribers()}
        changed = {address: s for address, s in after.items() if before[address] != s}
        assert changed == {
            a: Status.BOUNCED,
            b: Status.BOUNCED,
            d: Status.COMPLAINED,
            e: Status.UNSUBSCRIBED,
        }
        reader_c = store.get_subscriber(c)
        assert reader_c is not None and reader_c.soft_bounces == 0
        how = {x: store.subscriber_events(x)[-1] for x in (a, b, d, e)}
        assert "matched by VERP" in how[a].detail and "matched by Message-ID" in how[b].detail
        assert how[d].reason == "complaint" and how[e].reason == "mailto"
        assert "issue 001-trams-ferries-benches" in how[e].detail
        assert all("mail mid:<" in event.detail for event in how.values())

    again = run("inbox", "import", str(mbox))
    assert again.exit_code == 0, again.output
    assert f"{len(messages)} already processed" in again.output
    assert "Subscribers changed: 0 bounced, 0 complained, 0 unsubscribed." in again.output
    with Store.open(db) as store:
        assert {s.email: s.status for s in store.list_subscribers()} == after
