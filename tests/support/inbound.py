"""Inbound mail as real servers write it, made to order: DSNs, ARF complaints, unsubscribes.

The shapes follow RFC 3464 (a Postfix-style multipart/report with a delivery-status part
and the returned message's headers), RFC 5965 (a feedback report with the returned
message) and RFC 2369 (the mail a client sends for a mailto List-Unsubscribe). The corpus
in tests/inbound has the other servers' shapes; these are for tests that need many
messages, each naming the subscribers and messages they choose.
"""

from __future__ import annotations

import itertools
import mailbox
from collections.abc import Iterable, Sequence
from pathlib import Path

_serial = itertools.count(1)

BOUNCE_ADDRESS = "bounces@example.org"


def returned_headers(
    recipient: str,
    *,
    message_id: str | None = None,
    return_path: str | None = None,
    list_unsubscribe: str | None = None,
) -> str:
    """The headers of a message of ours, as a report returns them."""
    lines = []
    if return_path is not None:
        lines.append(f"Return-Path: <{return_path}>")
    lines += [
        "From: The Example Newsletter <newsletter@example.org>",
        f"To: <{recipient}>",
        "Subject: Trams, Ferries and Benches",
        "Date: Mon, 02 Mar 2026 09:14:05 +0000",
    ]
    if message_id is not None:
        lines.append(f"Message-ID: {message_id}")
    if list_unsubscribe is not None:
        lines.append(f"List-Unsubscribe: {list_unsubscribe}")
    lines.append("MIME-Version: 1.0")
    return "\n".join(lines) + "\n"


def dsn(
    failures: Sequence[tuple[str, str]],
    *,
    returned: str = "",
    to: str = BOUNCE_ADDRESS,
    sender: str = "MAILER-DAEMON@mx.example.net",
    ident: str | None = None,
    day: int = 2,
) -> bytes:
    """A delivery status notification: one recipient block per (address, status) pair.

    A 4.x.x status is written as a server that gave up (Action: failed); ``returned`` is
    the returned message's header block (``returned_headers``), or none.
    """
    ident = ident or f"dsn{next(_serial)}"
    boundary = f"{ident}.1772442847/mx.example.net"
    blocks = "\n".join(
        f"Final-Recipient: rfc822; {address}\n"
        f"Original-Recipient: rfc822;{address}\n"
        "Action: failed\n"
        f"Status: {status}\n"
        "Remote-MTA: dns; mx.example.com\n"
        f"Diagnostic-Code: smtp; {status[0]}50 {status} <{address}>: "
        + ("Recipient address rejected: User unknown" if status[0] == "5" else "Mailbox full")
        + "\n"
        for address, status in failures
    )
    listed = "\n".join(
        f"<{address}>: host mx.example.com said: {status}" for address, status in failures
    )
    text = f"""Return-Path: <>
Delivered-To: {to}
Received: by mx.example.net (Postfix) id {ident}; Mon,  {day} Mar 2026 09:14:07 +0000 (UTC)
Date: Mon,  {day} Mar 2026 09:14:07 +0000 (UTC)
From: {sender} (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {to}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
	boundary="{boundary}"
Message-Id: <{ident}@mx.example.net>

This is a MIME-encapsulated message.

--{boundary}
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

{listed}

--{boundary}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
Arrival-Date: Mon,  {day} Mar 2026 09:14:06 +0000 (UTC)

{blocks}
"""
    if returned:
        text += f"""--{boundary}
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

{returned}
"""
    text += f"--{boundary}--\n"
    return text.encode("ascii")


def arf(recipient: str | None, *, returned: str, ident: str | None = None) -> bytes:
    """An RFC 5965 abuse report from a mailbox provider's feedback loop."""
    ident = ident or f"fbl{next(_serial)}"
    rcpt = f"Original-Rcpt-To: <{recipient}>\n" if recipient else ""
    return f"""Return-Path: <fbl@feedback.example.net>
From: Feedback Loop <fbl@feedback.example.net>
To: abuse@example.org
Subject: FW: Trams, Ferries and Benches
Date: Tue, 3 Mar 2026 08:00:12 +0000
Message-ID: <{ident}@feedback.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
	boundary="{ident}_boundary"

--{ident}_boundary
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report for an email message received from IP
198.51.100.7 on Mon, 02 Mar 2026 09:14:07 +0000.

--{ident}_boundary
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
{rcpt}Arrival-Date: Mon, 02 Mar 2026 09:14:07 +0000
Reported-Domain: example.org

--{ident}_boundary
Content-Type: message/rfc822
Content-Disposition: inline

{returned}
Hello, here is this week's issue.

--{ident}_boundary--
""".encode("ascii")


def mailto_unsubscribe(sender: str, subject: str, *, ident: str | None = None) -> bytes:
    """What a mail client sends for ``mailto:unsubscribe@example.org?subject=...``."""
    ident = ident or f"unsub{next(_serial)}"
    return f"""Return-Path: <{sender}>
Delivered-To: unsubscribe@example.org
Date: Mon, 2 Mar 2026 12:01:44 +0000
Message-ID: <{ident}@mail.example.com>
Subject: {subject}
From: <{sender}>
To: unsubscribe@example.org
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"

This message was automatically generated by the mail client to unsubscribe.
""".encode("ascii")


def auto_reply(sender: str, in_reply_to: str) -> bytes:
    """An RFC 3834 vacation reply to one of our messages."""
    return f"""Return-Path: <>
Date: Mon, 2 Mar 2026 09:14:30 +0000
From: <{sender}>
To: newsletter@example.org
Subject: Auto: Trams, Ferries and Benches
Message-ID: <vacation{next(_serial)}@mail.example.com>
In-Reply-To: {in_reply_to}
Auto-Submitted: auto-replied (vacation)
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

I am away until 16 March with no access to email.
""".encode("ascii")


def write_mbox(path: Path, messages: Iterable[bytes]) -> Path:
    box = mailbox.mbox(path)
    try:
        for data in messages:
            box.add(data)
        box.flush()
    finally:
        box.close()
    return path
