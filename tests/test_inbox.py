"""Inbound mail classification, on a corpus of real-world-shaped messages and hostile input.

tests/inbound/*.eml are written after the formats the servers and providers send:
delivery reports from Postfix, Exim, qmail, Sendmail, old Exchange, Office 365, Gmail,
Yahoo and Amazon SES; feedback-loop complaints (RFC 5965, Yahoo-, AOL- and
Microsoft-JMRP-style); auto-replies; mailto unsubscribes; broken mail. The table below
says what each one is. Pathological mail (100,000 parts, 3,000 levels of nesting, too
big, too many lines) is built here rather than stored.
"""

from __future__ import annotations

import email
import email.policy
import logging
import random
import re
from dataclasses import dataclass, fields
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter import inbox, message, render
from newsletter.config import Config
from newsletter.feedback import Feedback, FeedbackKind
from newsletter.inbox import Inbound, InboundKind, Limits, classify
from newsletter.message import Recipient
from newsletter.tokens import TokenSigner
from tests.support import TEST_SECRET_KEY, example_issue

CORPUS = Path(__file__).parent / "inbound"

# Signed tokens the corpus carries (unsubscribe tokens as newsletter.tokens makes them,
# and VERP tokens in a bounces+TOKEN@example.org envelope address).
U1 = (
    "dW5zdWJzY3JpYmUfMjE6YWIxMmNkMzQfMDAxLXRpZGVzLWFuZC1"
    "0aW1ldGFibGVzHzE3NzI0NDI4NDU.0THMHCKYWD2HTvwYMIKtvA"
)
U2 = (
    "dW5zdWJzY3JpYmUfMjI6ZWY1NmFiNzgfMDAxLXRpZGVzLWFuZC1"
    "0aW1ldGFibGVzHzE3NzI0NDI4NDU.8YihX3rrFlpthVmXypA9Cw"
)
U3 = (
    "dW5zdWJzY3JpYmUfMjM6MGExYjJjM2QfMDAxLXRpZGVzLWFuZC1"
    "0aW1ldGFibGVzHzE3NzI0NDI4NDU.IW7VzTp5ctQMR_sSmn3BSg"
)
U4 = (
    "dW5zdWJzY3JpYmUfMjQ6OTk4ODc3NjYfMDAxLXRpZGVzLWFuZC1"
    "0aW1ldGFibGVzHzE3NzI0NDI4NDU.PA5MzBX4ApfXDMShjJn6Jw"
)
V1 = "Ym91bmNlHzI1HzAwMS10aWRlcy1hbmQtdGltZXRhYmxlcx8xNzcyNDQyODQ1.3wZByIY2U94JG0oEzk8Z0Q"
V2 = "Ym91bmNlHzI2HzAwMS10aWRlcy1hbmQtdGltZXRhYmxlcx8xNzcyNDQyODQ1.SV_T5BVsRQ9wUYRC8bJxyQ"

HARD, SOFT, DELAY = FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE, FeedbackKind.DELAY
COMPLAINT, UNSUBSCRIBE = FeedbackKind.COMPLAINT, FeedbackKind.UNSUBSCRIBE


def sent(n: int) -> str:
    """The Message-ID the corpus's n-th copy of issue 1 went out with."""
    return f"<1772442845{n:02d}.1001.{n}@example.org>"


@dataclass(frozen=True)
class Case:
    kind: InboundKind
    # (kind, recipient, status) of each Feedback, in order
    feedback: tuple[tuple[FeedbackKind, str | None, str | None], ...] = ()
    message_ids: tuple[str, ...] = ()  # every Feedback's message_ids
    verp: str | None = None
    token: str | None = None  # every Feedback's unsubscribe_token
    sender: str | None = None  # every Feedback's sender (mailto unsubscribes)
    reason: str = ""  # a part of Inbound.reason


SES_ID = (
    "<0100018e0a1b2c3d-5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9-000000@email.amazonses.example.com>"
)
DSN, ARF, AUTO = InboundKind.DSN, InboundKind.COMPLAINT, InboundKind.AUTO_REPLY
UNSUB, OTHER, UNREADABLE = InboundKind.UNSUBSCRIBE, InboundKind.OTHER, InboundKind.UNREADABLE

EXPECTED: dict[str, Case] = {
    # Delivery status notifications, one MTA or provider after another.
    "postfix-hard-user-unknown.eml": Case(DSN, ((HARD, "alice@example.com", "5.1.1"),), (sent(1),)),
    "postfix-soft-gave-up.eml": Case(DSN, ((SOFT, "bob@example.net", "4.4.1"),), (sent(2),)),
    "postfix-delayed-warning.eml": Case(DSN, ((DELAY, "bob@example.net", "4.4.1"),), (sent(2),)),
    "postfix-hard-verp.eml": Case(
        DSN, ((HARD, "peggy@example.org", "5.1.1"),), (sent(14),), verp=V1
    ),
    "postfix-success-delivered.eml": Case(DSN, reason="no failure (relayed)"),
    "exim-hard.eml": Case(DSN, ((HARD, "carol@example.org", "5.1.1"),), (sent(3),)),
    "exim-soft-retry-timeout.eml": Case(DSN, ((SOFT, "dave@example.net", "4.2.2"),), (sent(4),)),
    "gmail-hard-no-such-account.eml": Case(DSN, ((HARD, "erin@example.com", "5.1.1"),), (sent(5),)),
    "gmail-soft-gave-up.eml": Case(DSN, ((SOFT, "frank@example.com", "4.4.1"),), (sent(6),)),
    "outlook-hard-recipient-not-found.eml": Case(
        DSN, ((HARD, "grace@example.com", "5.1.10"),), (sent(7),)
    ),
    "exchange-legacy-hard.eml": Case(DSN, ((HARD, "heidi@corp.example.com", "5.1.1"),), (sent(8),)),
    "qmail-hard-no-mailbox.eml": Case(DSN, ((HARD, "ivan@example.net", "5.1.1"),), (sent(9),)),
    "qmail-soft-mailbox-full.eml": Case(DSN, ((SOFT, "judy@example.net", "4.2.2"),), (sent(10),)),
    "sendmail-hard-user-unknown.eml": Case(
        DSN, ((HARD, "mike@example.net", "5.1.1"),), (sent(12),)
    ),
    # "554: delivery error": a reply code with no status; a failure is hard.
    "yahoo-hard-mailbox-disabled.eml": Case(
        DSN, ((HARD, "nina@example.com", "5.0.0"),), (sent(13),)
    ),
    # SES puts its own Message-ID on what it relays; the List-Unsubscribe token is ours.
    "ses-hard-mailbox-does-not-exist.eml": Case(
        DSN, ((HARD, "oscar@example.com", "5.1.1"),), (SES_ID,), token=U4
    ),
    "malformed-truncated-dsn.eml": Case(DSN, ((HARD, "alice@example.com", "5.1.1"),)),
    # Feedback-loop complaints.
    "arf-standard-abuse.eml": Case(
        ARF, ((COMPLAINT, "quentin@example.com", None),), (sent(16),), verp=V2, token=U1
    ),
    "arf-yahoo-no-rcpt-to.eml": Case(ARF, ((COMPLAINT, "rita@example.net", None),), (sent(17),)),
    "arf-microsoft-jmrp.eml": Case(ARF, ((COMPLAINT, "sam@example.com", None),), (sent(18),)),
    "arf-aol-redacted.eml": Case(
        ARF, ((COMPLAINT, None, None),), (sent(19),), token=U2, reason="redacted"
    ),
    "arf-auth-failure-report.eml": Case(OTHER, reason="'auth-failure', not a complaint"),
    # Automatic replies: never feedback.
    "autoreply-rfc3834-vacation.eml": Case(AUTO, reason="Auto-Submitted: auto-replied"),
    "autoreply-outlook-automatic-reply.eml": Case(AUTO, reason="out-of-office subject"),
    "autoreply-x-autoreply.eml": Case(AUTO, reason="x-autoreply"),
    "autoreply-precedence-german.eml": Case(AUTO, reason="Precedence: auto_reply"),
    "malformed-8bit-headers.eml": Case(AUTO, reason="out-of-office subject"),
    # Mailto unsubscribes (RFC 2369), with and without the token our mailto carries.
    "unsubscribe-mailto-token.eml": Case(
        UNSUB, ((UNSUBSCRIBE, None, None),), token=U1, sender="tina@example.com"
    ),
    "unsubscribe-url-encoded-subject.eml": Case(
        UNSUB, ((UNSUBSCRIBE, None, None),), token=U3, sender="ursula@example.net"
    ),
    "unsubscribe-body-token.eml": Case(
        UNSUB, ((UNSUBSCRIBE, None, None),), token=U2, sender="vera@example.com"
    ),
    "unsubscribe-plain-subject.eml": Case(
        UNSUB, ((UNSUBSCRIBE, None, None),), sender="walter@example.org", reason="without a token"
    ),
    # Readers' replies: nothing to do, even when they quote our unsubscribe link.
    "not-a-bounce-reply.eml": Case(OTHER),
    "reply-quoting-the-issue.eml": Case(OTHER),
    # Broken mail.
    "malformed-empty.eml": Case(UNREADABLE, reason="empty"),
    "malformed-binary.eml": Case(UNREADABLE, reason="not a mail"),
    "malformed-not-a-mail.eml": Case(UNREADABLE, reason="not a mail"),
    "malformed-no-from.eml": Case(UNREADABLE, reason="no From header"),
}


def test_the_table_covers_the_corpus() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.eml")) == sorted(EXPECTED)
    senders = {n.split("-")[0] for n, c in EXPECTED.items() if c.kind == DSN and c.feedback}
    # Postfix, Exim, Gmail, Office 365, old Exchange, qmail, Sendmail, Yahoo, SES.
    assert len(senders - {"malformed"}) >= 8


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_corpus_mail_is_classified(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    case = EXPECTED[name]
    inbound = classify(data)
    assert inbound.kind == case.kind, inbound.reason
    assert [(f.kind, f.recipient, f.status) for f in inbound.feedback] == list(case.feedback)
    assert case.reason in inbound.reason
    for item in inbound.feedback:
        assert item.source == "mail" and item.event_id == inbound.event_id
        assert item.message_ids == case.message_ids
        assert (item.verp_token, item.unsubscribe_token, item.sender) == (
            case.verp,
            case.token,
            case.sender,
        )
    assert_clean(inbound)


def assert_clean(inbound: Inbound) -> None:
    """Every string is printable UTF-8 on one line: safe to store, print and put in JSON."""
    texts = [inbound.event_id, inbound.reason, inbound.subject, inbound.sender]
    for item in inbound.feedback:
        for f in fields(Feedback):
            value = getattr(item, f.name)
            texts += list(value) if isinstance(value, tuple) else [value]
    for text in texts:
        if isinstance(text, str):
            text.encode("utf-8")  # no lone surrogates from 8-bit bytes
            assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", text), repr(text)
    assert re.fullmatch(r"mid:[\x21-\x7e]{1,500}|sha256:[0-9a-f]{64}", inbound.event_id)
    assert inbound.reason


def test_event_id_is_the_message_id_else_a_hash_of_the_bytes() -> None:
    data = (CORPUS / "exim-hard.eml").read_bytes()
    assert classify(data).event_id == "mid:<E1vA2bC-0001xY-2Z@relay.example.org>"
    without = data.replace(b"Message-Id: <E1vA2bC-0001xY-2Z@relay.example.org>\n", b"")
    assert classify(without).event_id.startswith("sha256:")
    assert classify(without).event_id == classify(without).event_id
    assert classify(without + b"\n").event_id != classify(without).event_id
    # An unreadable mail keeps its Message-ID when its header can be read.
    huge = data + b"x\n" * 150_000
    assert classify(huge).kind == UNREADABLE
    assert classify(huge).event_id == "mid:<E1vA2bC-0001xY-2Z@relay.example.org>"


def test_dates_are_when_the_server_gave_up_else_the_report_date() -> None:
    postfix = classify((CORPUS / "postfix-soft-gave-up.eml").read_bytes()).feedback[0]
    assert postfix.reported_at is not None and postfix.reported_at.isoformat().startswith(
        "2026-03-07T09:20:11"
    )
    gmail = classify((CORPUS / "gmail-soft-gave-up.eml").read_bytes()).feedback[0]
    assert gmail.reported_at is not None
    assert gmail.reported_at.isoformat() == "2026-03-07T01:20:31-08:00"  # Last-Attempt-Date
    complaint = classify((CORPUS / "arf-standard-abuse.eml").read_bytes()).feedback[0]
    assert complaint.reported_at is not None and complaint.reported_at.day == 2  # Arrival-Date


def test_the_verp_prefix_is_a_parameter() -> None:
    data = (CORPUS / "postfix-hard-verp.eml").read_bytes()
    assert classify(data, verp_prefix="return").feedback[0].verp_token is None
    renamed = data.replace(b"bounces+", b"Return+")
    assert classify(renamed, verp_prefix="return").feedback[0].verp_token == V1
    assert classify(renamed).feedback[0].verp_token is None
    # "xbounces+..." is another local part, not ours.
    assert classify(data.replace(b"bounces+", b"xbounces+")).feedback[0].verp_token is None


def test_a_report_naming_many_recipients_is_cut_at_the_limit() -> None:
    blocks = "".join(
        f"Final-Recipient: rfc822; r{n}@example.com\nAction: failed\nStatus: 5.1.1\n\n"
        for n in range(30)
    )
    data = dsn_with(blocks)
    full = classify(data)
    assert len(full.feedback) == 30 and full.reason == "30 hard bounces"
    cut = classify(data, limits=Limits(max_recipients=10))
    assert [f.recipient for f in cut.feedback] == [f"r{n}@example.com" for n in range(10)]
    assert cut.reason == "10 hard bounces (and 20 more recipients not read)"


def dsn_with(status_blocks: str, *, head: str = "") -> bytes:
    return (
        "From: MAILER-DAEMON@mail.example.org\nTo: editor@example.org\n"
        "Subject: Undelivered Mail Returned to Sender\nMessage-ID: <built@mail.example.org>\n"
        + head
        + "MIME-Version: 1.0\n"
        + 'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
        "--b\nContent-Type: text/plain\n\nThe mail system\n\n"
        "--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mail.example.org\n\n"
        + status_blocks
        + "--b--\n"
    ).encode()


def test_status_classes_and_actions() -> None:
    blocks = (
        "Final-Recipient: rfc822; a@example.com\nAction: failed\nStatus: 5.2.1\n\n"
        "Final-Recipient: rfc822; b@example.com\nAction: failed\nStatus: 4.4.7\n\n"
        "Final-Recipient: rfc822; c@example.com\nAction: delayed\nStatus: 4.4.1\n\n"
        "Final-Recipient: rfc822; d@example.com\nAction: delivered\nStatus: 2.0.0\n\n"
        "Final-Recipient: rfc822; e@example.com\nAction: failed\n"
        "Diagnostic-Code: smtp; 550 mailbox unavailable\n\n"
        "Final-Recipient: x400; /C=ZZ/O=nobody\nAction: failed\nStatus: 5.1.1\n\n"
        "Original-Recipient: rfc822; f@example.com\nFinal-Recipient: rfc822; f2@example.net\n"
        "Action: error\nStatus: 5.1.1\n\n"
    )
    found = [(f.kind, f.recipient, f.status) for f in classify(dsn_with(blocks)).feedback]
    assert found == [
        (HARD, "a@example.com", "5.2.1"),
        (SOFT, "b@example.com", "4.4.7"),
        (DELAY, "c@example.com", "4.4.1"),
        (HARD, "e@example.com", "5.0.0"),  # from the reply code
        (HARD, "f@example.com", "5.1.1"),  # the Original-Recipient we sent to
    ]


def mail_with(subject: str, body: str = "Hello.\n", extra: str = "") -> bytes:
    return (
        f"From: Reader <reader@example.com>\nTo: editor@example.org\nSubject: {subject}\n"
        f"Message-ID: <m@example.com>\n{extra}\n{body}"
    ).encode()


@pytest.mark.parametrize(
    ("subject", "kind"),
    [
        ("Unsubscribe", UNSUB),
        ("Re: unsubscribe me please", UNSUB),
        ("Please unsubscribe me from The Test Gazette.", UNSUB),
        ("Your unsubscribe link is broken", OTHER),
        ("Re: Unsubscribe? How?", OTHER),
        ("unsubscribe not-a-token", UNSUB),  # a plain unsubscribe, without a token
        (f"Re: unsubscribe {U1}", UNSUB),
        ("Automatic reply: Tides", AUTO),
        ("Out of Office: Tides", AUTO),
        ("Absence of tide tables in this issue", OTHER),
        ("Re: Tides and Timetables", OTHER),
    ],
)
def test_subjects(subject: str, kind: InboundKind) -> None:
    assert classify(mail_with(subject)).kind == kind


def test_auto_submitted_no_is_not_an_auto_reply() -> None:
    assert classify(mail_with("Re: Tides", extra="Auto-Submitted: no\n")).kind == OTHER
    assert classify(mail_with("Re: Tides", extra="Auto-Submitted: auto-generated\n")).kind == AUTO


def test_a_bounce_that_names_nobody_is_still_a_delivery_report() -> None:
    data = (
        b"From: Mail Delivery System <MAILER-DAEMON@mail.example.org>\nTo: editor@example.org\n"
        b"Subject: Undelivered Mail Returned to Sender\nMessage-ID: <n@mail.example.org>\n\n"
        b"Something went wrong, but we will not say what.\n"
    )
    inbound = classify(data)
    assert (inbound.kind, inbound.feedback) == (DSN, ())
    assert "names no recipient" in inbound.reason


def test_a_delivery_report_returning_a_microsoft_message_is_not_a_complaint() -> None:
    blocks = "Final-Recipient: rfc822; sam@example.com\nAction: failed\nStatus: 5.2.2\n\n"
    data = dsn_with(blocks).replace(
        b"--b--\n",
        b"--b\nContent-Type: text/rfc822-headers\n\nX-HmXmrOriginalRecipient: <sam@example.com>\n"
        b"Message-ID: <177244284518.1001.18@example.org>\n\n--b--\n",
    )
    inbound = classify(data)
    assert inbound.kind == DSN
    assert [(f.kind, f.recipient) for f in inbound.feedback] == [(HARD, "sam@example.com")]


# --- the real message we send, coming back ------------------------------------------------


@pytest.fixture
def sent_message(cfg: Config) -> tuple[bytes, str]:
    """One copy of the example issue as `send` makes it, with a mailto unsubscribe only."""
    from dataclasses import replace

    cfg = replace(cfg, unsubscribe=replace(cfg.unsubscribe, url=""))
    template = message.prepare(render.render_issue(example_issue(cfg), cfg), cfg)
    out = template.personalise(Recipient(email="ann@example.org", name="Ann", subscriber_id=42))
    return out.data, out.message_id


def test_a_reader_unsubscribing_through_our_mailto_is_read_with_a_token_that_verifies(
    sent_message: tuple[bytes, str],
) -> None:
    data, _ = sent_message
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    mailto = re.search(r"<(mailto:[^>]+)>", str(parsed["List-Unsubscribe"]))
    assert mailto is not None
    # What a mail client does with the link: To from the path, Subject from ?subject=.
    url = urlsplit(mailto.group(1))
    reply = EmailMessage()
    reply["From"] = "Ann <ann@example.org>"
    reply["To"] = unquote(url.path)
    reply["Subject"] = parse_qs(url.query)["subject"][0]
    reply["Date"] = format_datetime(parsed["Date"].datetime)
    reply["Message-ID"] = "<unsub.ann@example.org>"
    reply.set_content("This message was sent by the mail client.")
    inbound = classify(reply.as_bytes())
    assert inbound.kind == UNSUB and inbound.sender == "ann@example.org"
    (item,) = inbound.feedback
    assert item.kind == UNSUBSCRIBE and item.sender == "ann@example.org"
    assert item.unsubscribe_token is not None
    verified = TokenSigner(TEST_SECRET_KEY).verify(
        item.unsubscribe_token, message.UNSUBSCRIBE_PURPOSE
    )
    assert verified is not None and verified.subject.startswith("42:")


def returned_in(kind: str, data: bytes) -> bytes:
    """A report of ``kind`` that returns the whole of ``data`` as message/rfc822."""
    if kind == "dsn":
        report = (
            b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.com\r\n"
            b"\r\nFinal-Recipient: rfc822; ann@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        )
        top = b"report-type=delivery-status"
    else:
        report = (
            b"Content-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            b"User-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n"
        )
        top = b"report-type=feedback-report"
    return (
        b"From: MAILER-DAEMON@mx.example.com\r\nTo: editor@example.org\r\n"
        b"Subject: Report\r\nMessage-ID: <report@mx.example.com>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; boundary="r"; ' + top + b"\r\n\r\n"
        b"--r\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n\r\n--r\r\n" + report + b"\r\n"
        b"--r\r\nContent-Type: message/rfc822\r\n\r\n" + data + b"\r\n--r--\r\n"
    )


@pytest.mark.parametrize("kind", ["dsn", "arf"])
def test_a_report_returning_our_message_names_its_message_id_and_token(
    sent_message: tuple[bytes, str], kind: str
) -> None:
    data, message_id = sent_message
    inbound = classify(returned_in(kind, data))
    assert inbound.kind == (DSN if kind == "dsn" else ARF)
    (item,) = inbound.feedback
    assert item.recipient == "ann@example.org"
    assert item.message_ids == (message_id,)
    assert item.unsubscribe_token is not None
    assert TokenSigner(TEST_SECRET_KEY).verify(item.unsubscribe_token, message.UNSUBSCRIBE_PURPOSE)


def test_a_reply_quoting_our_whole_message_is_not_an_unsubscribe(
    sent_message: tuple[bytes, str],
) -> None:
    data, _ = sent_message
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    text = parsed.get_body(("plain",))
    assert text is not None
    quoted = str(text.get_content())
    assert "subject=unsubscribe%20" in quoted
    reply = EmailMessage()
    reply["From"] = "Ann <ann@example.org>"
    reply["To"] = "editor@example.org"
    reply["Subject"] = "Fwd: " + str(parsed["Subject"])
    reply["Message-ID"] = "<fwd.ann@example.org>"
    reply.set_content(
        "Have a look at this one.\n\n---------- Forwarded message ----------\n" + quoted
    )
    assert classify(reply.as_bytes()).kind == OTHER


# --- hostile input: bounded, never a traceback --------------------------------------------


def head(extra: str = "") -> bytes:
    return f"From: x@example.com\nSubject: hostile\nMessage-ID: <h@example.com>\n{extra}".encode()


def test_a_100000_part_mail_is_unreadable() -> None:
    parts = b"".join(b"--b\n\nx\n" for _ in range(100_000))
    data = head('Content-Type: multipart/mixed; boundary="b"\n\n') + parts + b"--b--\n"
    inbound = classify(data)
    assert inbound.kind == UNREADABLE and inbound.event_id == "mid:<h@example.com>"
    assert inbound.reason.startswith("more than 100,000 lines")
    # Under the line limit, the part limit stops the parser itself.
    few = head('Content-Type: multipart/mixed; boundary="b"\n\n') + parts[: 7 * 600] + b"--b--\n"
    assert classify(few).reason == "more than 500 MIME parts"
    assert classify(few, limits=Limits(max_parts=1000)).kind == OTHER


def test_3000_nested_messages_are_unreadable_without_recursion_error() -> None:
    nested = b"".join(
        b"Content-Type: message/rfc822\n\nFrom: x@example.com\nSubject: level\n"
        for _ in range(3000)
    )
    inbound = classify(head() + nested + b"\nhello\n")
    assert inbound.kind == UNREADABLE
    assert inbound.reason == "MIME parts nested more than 20 deep"
    multipart = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (n, n) for n in range(3000)
    )
    assert classify(head() + multipart + b"\nx\n").reason == "MIME parts nested more than 20 deep"
    shallow = b"".join(
        b"Content-Type: message/rfc822\n\nFrom: x@example.com\nSubject: level\n" for _ in range(5)
    )
    assert classify(head() + shallow + b"\nhello\n").kind == OTHER


def test_a_delivery_status_part_of_100000_blocks_is_unreadable() -> None:
    blocks = "Final-Recipient: rfc822; a@example.com\nAction: failed\n\n" * 30_000
    assert classify(dsn_with(blocks)).reason == "more than 500 MIME parts"


def test_size_and_line_limits() -> None:
    big = head("\n") + b"x" * 10_000_001
    assert classify(big).reason.startswith("larger than 10,000,000 bytes")
    lines = head("\n") + b"\r" * 100_001  # old Mac line ends count as lines too
    assert classify(lines).reason.startswith("more than 100,000 lines")
    small = Limits(max_bytes=100)
    assert classify((CORPUS / "exim-hard.eml").read_bytes(), limits=small).kind == UNREADABLE


def test_the_text_the_detectors_read_is_bounded() -> None:
    # A line after flufl.bounce's "failed addresses follow:" that would make its address
    # pattern backtrack for a very long time, were the lines not cut.
    bomb = "failed addresses follow:\n" + ("x" * 100_000 + "\n") * 50 + "message text follows:\n"
    data = head("Content-Type: text/plain\n\n") + bomb.encode()
    assert classify(data).kind == OTHER


def test_hostile_headers_are_read_without_harm() -> None:
    # Deeply nested comments make the stdlib's address parser recurse; 8-bit bytes,
    # controls and bidi overrides must not come out; encoded words decode.
    data = (
        b"From: " + b"(" * 5000 + b"x@example.com\n"
        b"To: " + b"(" * 5000 + b"\n"
        b"Subject: =?utf-8?q?caf=C3=A9?= \xff\xfe \x1b[31m\xe2\x80\xae red\n"
        b"Message-ID: <h@example.com>\n\nbody\n"
    )
    inbound = classify(data)
    assert inbound.kind == OTHER
    assert inbound.subject.startswith("café ") and "\x1b" not in inbound.subject
    assert "\u202e" not in inbound.subject
    assert_clean(inbound)


def test_8bit_fields_do_not_trip_the_detectors(caplog: pytest.LogCaptureFixture) -> None:
    # flufl.bounce calls .lower() on fields, which raw 8-bit bytes would make Header objects.
    blocks = "Final-Recipient: rfc822; a@example.com\nAction: f\xe4iled\nStatus: 5.1.1\n\n"
    data = dsn_with(blocks).replace(b"f\xc3\xa4iled", b"f\xe4iled")
    data = data.replace(b"From: MAILER-DAEMON@", b"From: \xff MAILER-DAEMON@")
    with caplog.at_level(logging.DEBUG):
        inbound = classify(data)
    assert inbound.kind == DSN and inbound.feedback == ()
    assert not [r for r in caplog.records if r.name.startswith(("newsletter", "flufl"))]


def test_the_last_guard_turns_any_failure_into_unreadable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(data: bytes, limits: Limits, verp_prefix: str) -> Inbound:
        raise RecursionError("a bug in classification")

    monkeypatch.setattr(inbox, "_classify", broken)
    inbound = classify(b"From: x@example.com\n\nhello\n")
    assert inbound.kind == UNREADABLE
    assert inbound.reason == "could not be read (RecursionError)"
    assert inbound.event_id.startswith("sha256:")


# Property tests run the classification without its last guard: any exception is a bug.
CORPUS_MAILS = [(CORPUS / name).read_bytes() for name in sorted(EXPECTED)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(data: bytes) -> None:
    inbound = inbox._classify(data, inbox.DEFAULT_LIMITS, "bounces")
    assert_clean(inbound)


@st.composite
def mutated_mail(draw: st.DrawFn) -> bytes:
    """A corpus mail with a few random cuts, insertions, duplications and byte flips."""
    data = bytearray(draw(st.sampled_from(CORPUS_MAILS)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        size = draw(st.integers(1, 200))
        what = draw(st.sampled_from(["cut", "insert", "dup", "flip", "nested", "line"]))
        if what == "cut":
            del data[at : at + size]
        elif what == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=size))
        elif what == "dup":
            data[at:at] = data[at : at + size] * draw(st.integers(2, 50))
        elif what == "flip":
            data[at] = draw(st.integers(0, 255))
        elif what == "nested":
            data[at:at] = b"\nContent-Type: message/rfc822\n\n" * draw(st.integers(1, 40))
        else:
            data[at:at] = draw(
                st.sampled_from(
                    [
                        b"\n--",
                        b"\nContent-Type: multipart/mixed; boundary=x\n\n--x\n",
                        b"\nContent-Transfer-Encoding: base64\n",
                        b"\nContent-Type: text/plain; charset=x-unknown\n",
                        b"\nContent-Type: text/plain; charset*=utf-8''%ff\n",
                        b"=?utf-8?b?////?=",
                        b"\nFinal-Recipient: rfc822; (((((a@b\n",
                        b"\r",
                        b"\x00",
                    ]
                )
            )
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_mail())
def test_mutated_corpus_mails_never_raise(data: bytes) -> None:
    inbound = inbox._classify(data, inbox.DEFAULT_LIMITS, "bounces")
    assert_clean(inbound)


def test_a_seeded_mix_of_every_corpus_mail_never_raises() -> None:
    """A fixed sample of byte-level damage to every file (the same on every run)."""
    rng = random.Random(20260302)
    for data in CORPUS_MAILS:
        for _ in range(20):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                if damaged:
                    at = rng.randrange(len(damaged))
                    damaged[at : at + rng.randint(0, 50)] = rng.randbytes(rng.randint(0, 20))
            assert_clean(inbox._classify(bytes(damaged), inbox.DEFAULT_LIMITS, "bounces"))
