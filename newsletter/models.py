"""The records every stage shares: subscribers, their history, the ledger, bounces.

Frozen dataclasses and enums only, so that any module can import them without
importing the database (``store``) or anything above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from .feedback import FeedbackKind


class Status(StrEnum):
    """A subscriber's status. Only ``active`` subscribers are sent to."""

    ACTIVE = "active"
    PENDING = "pending"  # waiting for a double opt-in confirmation
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


INACTIVE = (Status.UNSUBSCRIBED, Status.BOUNCED, Status.COMPLAINED)


class DeliveryState(StrEnum):
    """The state of one (issue, subscriber) row of the ledger."""

    QUEUED = "queued"
    SENDING = "sending"  # claimed and committed; the message may be on its way
    SENT = "sent"
    FAILED = "failed"  # permanent (5xx); not retried
    DEFERRED = "deferred"  # temporary (4xx); retried when due, or by the next run
    UNCERTAIN = "uncertain"  # was `sending` when its run died; resent only on request
    CANCELLED = "cancelled"  # subscriber stopped being active before it was sent


# UNCERTAIN as a result: the whole message went out but the server's answer was lost.
_RESULT_STATES = (
    DeliveryState.SENT,
    DeliveryState.FAILED,
    DeliveryState.DEFERRED,
    DeliveryState.UNCERTAIN,
)
PROBLEM_STATES = (DeliveryState.FAILED, DeliveryState.UNCERTAIN, DeliveryState.DEFERRED)


@dataclass(frozen=True)
class Subscriber:
    """One subscriber. ``fields`` is read-only and left out of the hash."""

    id: int
    email: str
    name: str
    fields: Mapping[str, str] = field(hash=False)
    status: Status
    created_at: datetime
    updated_at: datetime
    status_changed_at: datetime
    soft_bounces: int


@dataclass(frozen=True)
class SubscriberEvent:
    """One status change (``old_status`` is None when the subscriber was created)."""

    subscriber_id: int
    old_status: Status | None
    new_status: Status
    reason: str
    detail: str
    at: datetime


@dataclass(frozen=True)
class RowError:
    """A CSV row that was not imported, and why."""

    line: int
    message: str


@dataclass(frozen=True)
class ImportReport:
    """What an import did. ``rows`` = added + updated + unchanged + skipped_inactive
    + suppressed + duplicates + error_count."""

    path: Path
    rows: int
    added: int
    updated: int
    unchanged: int
    skipped_inactive: int  # unsubscribed/bounced/complained: left untouched
    duplicates: int  # rows merged into an earlier row of the same file
    error_count: int
    errors: tuple[RowError, ...]  # the first store.MAX_KEPT_ROW_ERRORS of them
    suppressed: int = 0  # new to the list but suppressed (they left before): not added
    # The new subscribers per status ("active": 120, "unsubscribed": 4, ...).
    new_by_status: Mapping[str, int] = field(default_factory=dict)
    mapping: tuple[str, ...] = ()  # how another tool's columns were read (--from, --map)
    dry_run: bool = False  # nothing was written: the counts say what an import would do

    @property
    def imported(self) -> int:
        """Addresses now in the database from this file (new or already there)."""
        return self.added + self.updated + self.unchanged


@dataclass(frozen=True)
class SendLock:
    """One run sending an issue (on SQLite it holds the issue's lock; on PostgreSQL others
    may send it too). ``uncertain`` = rows found left by dead runs when it started."""

    issue_key: str
    run_id: str
    uncertain: int


@dataclass(frozen=True)
class SenderRun:
    """One run that sends (or sent) an issue, as the ``senders`` table has it.

    ``responding``: its lease had not run out when this was read (its heartbeat comes
    every third of the lease); a ``running`` run that is not responding has died or
    lost the database, and its ``sending`` rows become uncertain when a sender notices.
    ``rate``: messages sent per second over the minute before its last heartbeat.
    """

    run_id: str
    issue_key: str
    host: str
    pid: int
    state: str  # running, finished, expired
    started_at: datetime
    heartbeat_at: datetime
    lease_until: datetime
    finished_at: datetime | None
    claimed: int
    sent: int
    failed: int
    deferred: int  # 4xx results recorded (a row retried within the run counts each time)
    uncertain: int
    rate: float
    responding: bool
    heartbeat_age: float  # seconds from its last heartbeat to when this was read


@dataclass(frozen=True)
class ClaimedRecipient:
    """A ledger row now committed as ``sending``: send to ``subscriber`` then record it."""

    issue_key: str
    subscriber: Subscriber
    attempts: int  # including this one, over all runs


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of handing one claimed message to the server."""

    issue_key: str
    subscriber_id: int
    state: DeliveryState  # SENT, FAILED, DEFERRED or UNCERTAIN
    reply: str = ""  # the server's reply, e.g. "250 2.0.0 Ok" or "550 5.1.1 no such user"
    message_id: str = ""
    retry_at: datetime | None = None  # DEFERRED: due again at; None = left for the next run
    bounce: bool = False  # FAILED: also mark the subscriber bounced ([delivery] bounce_on_5xx)

    def __post_init__(self) -> None:
        if self.state not in _RESULT_STATES:
            raise ValueError(
                f"a delivery result is sent, failed, deferred or uncertain, not {self.state}"
            )


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger row with the subscriber's address, for `status` and reports."""

    issue_key: str
    subscriber_id: int
    email: str
    name: str
    state: DeliveryState
    attempts: int
    last_reply: str
    message_id: str
    updated_at: datetime
    sent_at: datetime | None
    retry_at: datetime | None


@dataclass(frozen=True)
class IssueSnapshot:
    """When an issue's recipients were fixed, and how many rows its ledger has."""

    issue_key: str
    snapshot_at: datetime
    recipients: int


class BounceKind(StrEnum):
    """Hard (5.x.x: the address does not work) or soft (4.x.x: try again later)."""

    HARD = "hard"
    SOFT = "soft"


@dataclass(frozen=True)
class BounceRecord:
    """A bounce as recorded, with what it did to the subscriber (``effect``)."""

    id: int
    message_key: str
    subscriber_id: int | None
    email: str
    issue_key: str  # "" when the bounce could not be matched to an issue
    kind: BounceKind
    status: str
    diagnostic: str
    counted: bool  # a soft bounce that counts towards [bounces] soft_limit
    effect: str
    reported_at: datetime | None
    recorded_at: datetime


@dataclass(frozen=True)
class ConfirmationRequest:
    """What a subscribe request found: send a confirmation now, or say nothing new."""

    subscriber: Subscriber
    send: bool  # a confirmation email is due now (reserved: release it if sending fails)
    created: bool  # the address was new to the list
    previous_sent_at: datetime | None  # the reservation this request replaced


@dataclass(frozen=True)
class FeedbackAction:
    """A checked bounce, complaint or unsubscribe: what to do to which subscriber.

    Made only for feedback that refers to a message we sent to ``subscriber_id``
    (see :mod:`newsletter.readers`); the store applies it.
    """

    kind: FeedbackKind  # HARD_BOUNCE, SOFT_BOUNCE, COMPLAINT or UNSUBSCRIBE
    subscriber_id: int
    email: str  # the address the report named (the subscriber's, or where they forward to)
    issue_key: str  # "" when the report does not say which issue
    reason: str  # the history's reason: bounce-hard, bounce-soft, complaint, mailto...
    detail: str  # how it was matched and the mail's or event's id, for the history
    status: str = ""  # RFC 3463 status, e.g. "5.1.1"
    diagnostic: str = ""
    reported_at: datetime | None = None


@dataclass(frozen=True)
class FeedbackItem:
    """One inbound mail or webhook event, processed once by ``key``, with its actions."""

    key: str  # processed_messages.message_key
    source: str  # "file bounces.mbox", "imap INBOX", "ses"...
    outcome: str  # what it was, as processed_messages records it
    actions: tuple[FeedbackAction, ...] = ()


@dataclass(frozen=True)
class ReplayToken:
    """A webhook's single-use token (Mailgun), kept until ``expires_at``."""

    source: str
    token: str
    expires_at: datetime


class ScheduleState(StrEnum):
    """Where a scheduled send stands."""

    SCHEDULED = "scheduled"  # waiting for its time
    SENDING = "sending"  # the worker took it; a restart resumes it from the ledger
    SENT = "sent"  # its run finished (deferred recipients are retried by the worker)
    FAILED = "failed"  # the checks failed at send time: nothing was sent
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ScheduleEntry:
    """One issue's scheduled send. ``send_at`` is aware (UTC); ``zone`` is the time zone
    it was given in (an IANA name, or "" for a fixed offset), for showing it back."""

    issue_key: str
    send_at: datetime
    zone: str
    source: str  # "command" (newsletter schedule) or "issue.md" (its send_at)
    state: ScheduleState
    last_error: str
    not_before: datetime | None  # after a failed attempt, not tried again before this
    updated_at: datetime


# --- suppression, consent, and what we hold about one person --------------------------------


@dataclass(frozen=True)
class Suppression:
    """An address that must never be added back but by its owner's own double opt-in.

    Stored as a keyed hash of the address, so it outlives the subscriber's deletion
    without keeping the address itself.
    """

    reason: str  # unsubscribed, bounced, complained, removed or erased
    at: datetime


@dataclass(frozen=True)
class Consent:
    """How a subscriber came to be on the list: the evidence of their consent."""

    source: str  # "form" (double opt-in), "import", "added" (by the editor)
    origin: str  # form: the page it was on; import: "FILE:LINE" (the file's name); else ""
    recorded_at: datetime  # form: the request; import and add: when it was recorded
    signed_up: str  # import: the original sign-up date from the file (ISO 8601), else ""
    confirmed_at: datetime | None  # form: the confirming click


@dataclass(frozen=True)
class PendingConfirmation:
    """An open double opt-in request: a confirmation email is out."""

    requested_at: datetime
    sent_at: datetime
    sends: int


@dataclass(frozen=True)
class PersonRecord:
    """Everything the database holds about one address (an access request's answer)."""

    address: str  # the normalised address asked about
    subscriber: Subscriber | None  # None: not (or no longer) on the list
    suppression: Suppression | None
    consents: tuple[Consent, ...]
    events: tuple[SubscriberEvent, ...]
    deliveries: tuple[LedgerEntry, ...]
    bounces: tuple[BounceRecord, ...]
    confirmation: PendingConfirmation | None


@dataclass(frozen=True)
class Erasure:
    """What `subscribers erase` deleted; only the suppression entry and counts are kept."""

    address: str
    subscriber: bool  # a subscriber row was deleted
    events: int
    deliveries: int  # ledger rows deleted (their counts kept per issue and state)
    bounces: int  # bounce records stripped of the address and diagnostic (counts kept)
    consents: int
    suppression: Suppression
    copies_cleared: bool  # the write-ahead log was emptied (False: another process reads)
    # PostgreSQL: old row versions stay until VACUUM reuses their space, and the server's
    # write-ahead log (and any archive) until it is recycled; copies_cleared is False.
    server_keeps_copies: bool = False
