"""What readers send back, whatever the channel: one record per reported recipient.

Inbound mail (delivery status notifications, ARF complaints, mailto unsubscribes) and
the email services' webhooks both produce ``Feedback``; one function acts on it, and only
after checking that it refers to a message we sent to that subscriber.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["Feedback", "FeedbackKind"]


class FeedbackKind(StrEnum):
    HARD_BOUNCE = "hard-bounce"  # 5.x.x: the address does not work
    SOFT_BOUNCE = "soft-bounce"  # 4.x.x from a server that gave up: counted, N in a row bounce
    DELAY = "delay"  # "still trying": never counted
    COMPLAINT = "complaint"  # a feedback-loop spam report (RFC 5965) or a provider's complaint
    UNSUBSCRIBE = "unsubscribe"  # a mailto unsubscribe (RFC 2369) or a provider's unsubscribe


@dataclass(frozen=True)
class Feedback:
    """One recipient reported in one inbound mail or webhook event.

    Nothing here is trusted yet: ``message_ids``, ``verp_token`` and ``unsubscribe_token``
    are what the report claims, to be matched against the ledger or verified.
    """

    kind: FeedbackKind
    recipient: str | None  # the address the report names (None when only a token names it)
    source: str  # "mail", "ses", "postmark", "mailgun", "sendgrid"
    event_id: str  # the mail's Message-ID (or a hash of it) or the webhook event's id
    status: str | None = None  # an RFC 3463 status such as "5.1.1"
    diagnostic: str = ""  # the server's or provider's words, cut short
    message_ids: tuple[str, ...] = ()  # Message-IDs of the message(s) it says we sent
    verp_token: str | None = None  # from a bounces+TOKEN@domain envelope address
    unsubscribe_token: str | None = None  # from a mailto unsubscribe's subject or body
    sender: str | None = None  # the From address of a mailto unsubscribe
    reported_at: datetime | None = None  # when it happened, as the report says (else None)
