"""The readers' way back: bounces, complaints and unsubscribes checked, then acted on once.

Feedback comes as mail (read by :func:`inbox.classify`) or as an email service's webhook
(verified by :mod:`webhooks`); both give :class:`Feedback` records, and this module is the
one place that decides what they do. Nothing in a report is believed until it refers to a
message we sent:

- a bounce or complaint changes a subscriber only through a valid VERP token (the
  signed ``bounces+TOKEN@domain`` envelope sender of their copy), the Message-ID of a
  copy the ledger says went to them, or a valid unsubscribe token of theirs in the
  returned message's List-Unsubscribe;
- a mailto unsubscribe needs a valid unsubscribe token in its subject or body, or comes
  from the subscriber's own address (asking to leave is always honoured);
- a webhook event is authentic (its signature was checked) but must name a subscriber we
  sent to: by address, and, when it gives a Message-ID the ledger knows, one sent to them.

Everything else is "unmatched" and changes nothing. Each mail or event is processed once:
a mail is keyed by its Message-ID *and* a digest of its body (a forger who reuses the
Message-ID of a real bounce that has not arrived yet cannot make us skip it; the same mail
kept by two tools, with other trace headers, is still one), an event by its source and id.
Each is applied in its own transaction, recorded in ``processed_messages`` with what it was.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from .addresses import email_key
from .errors import NewsletterError
from .feedback import Feedback, FeedbackKind
from .inbox import Inbound, InboundKind, classify
from .models import FeedbackAction, FeedbackItem, ReplayToken, Status, Subscriber
from .store import Store
from .tokens import UNSUBSCRIBE_PURPOSE, TokenSigner, address_fingerprint, verp_subscriber_id

__all__ = [
    "Decision",
    "FeedbackResult",
    "Matcher",
    "Outcome",
    "Reference",
    "apply_webhook",
    "mail_key",
    "process_mail",
]

_log = logging.getLogger(__name__)

# What each kind does, in the words the reports use.
ACTIONS = {
    FeedbackKind.HARD_BOUNCE: "mark bounced",
    FeedbackKind.SOFT_BOUNCE: "count a soft bounce",
    FeedbackKind.COMPLAINT: "mark complained",
    FeedbackKind.UNSUBSCRIBE: "unsubscribe",
}
_MAX_LOOKUPS = 10  # Message-IDs looked up per report


class Outcome(StrEnum):
    """What became of one mail or event."""

    APPLIED = "applied"  # at least one report referred to a message we sent: acted on
    UNMATCHED = "unmatched"  # reports that refer to nothing we sent: nothing changed
    NO_ACTION = "no action"  # delay warnings, successes: nothing to do
    IGNORED = "ignored"  # auto-replies, readers' replies, other mail
    UNREADABLE = "unreadable"  # could not be read (the reason says why)
    ALREADY_PROCESSED = "already processed"


@dataclass(frozen=True)
class Reference:
    """The message of ours a report refers to: whom it went to, which issue, how we know."""

    subscriber_id: int
    email: str  # the subscriber's address
    status: Status  # their status when the report was read
    issue_key: str = ""  # "" when the report does not say
    message_id: str = ""  # "" when it was not matched by Message-ID
    by: str = ""  # "VERP", "Message-ID", "unsubscribe token", "sender", "<source> webhook"

    def as_json(self) -> dict[str, Any]:
        return {
            "subscriber": self.email,
            "subscriber_status": self.status.value,
            "issue": self.issue_key or None,
            "message_id": self.message_id or None,
            "by": self.by,
        }


@dataclass(frozen=True)
class Decision:
    """One report (a :class:`Feedback`) and what it does, or why it does nothing."""

    feedback: Feedback
    reference: Reference | None = None
    action: str = ""  # one of ACTIONS' values, or "" for none
    why_not: str = ""  # when there is no action
    effect: str = ""  # what applying it did ("" in a dry run)

    def as_json(self) -> dict[str, Any]:
        item = self.feedback
        bounce = {FeedbackKind.HARD_BOUNCE: "hard", FeedbackKind.SOFT_BOUNCE: "soft"}
        return {
            "kind": item.kind.value,
            "recipient": item.recipient,
            "status": item.status,
            "bounce": bounce.get(item.kind),
            "refers_to": None if self.reference is None else self.reference.as_json(),
            "action": self.action or None,
            "why_not": self.why_not or None,
            "effect": self.effect or None,
        }


@dataclass(frozen=True)
class FeedbackResult:
    """One mail (or webhook event batch): what it was and what it did."""

    key: str  # processed_messages.message_key ("" when it could not be read at all)
    outcome: Outcome
    reason: str  # why this outcome
    decisions: tuple[Decision, ...] = ()
    kind: str = ""  # inbox.InboundKind for a mail, the source for a webhook
    event_id: str = ""
    subject: str = ""
    sender: str = ""
    name: str = ""  # where it was read from (mailbox:key, imap folder:uid)
    dry_run: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "message": self.name or None,
            "event_id": self.event_id or None,
            "kind": self.kind,
            "from": self.sender or None,
            "subject": self.subject or None,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "dry_run": self.dry_run,
            "reports": [decision.as_json() for decision in self.decisions],
        }

    @property
    def acted(self) -> tuple[Decision, ...]:
        """The decisions with an action (to be taken, or taken)."""
        return tuple(d for d in self.decisions if d.action)


# --- matching a report to a message we sent -----------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """Finds the message of ours a report refers to, against the store and our key."""

    store: Store
    signer: TokenSigner

    def decide(self, item: Feedback, *, alone: bool) -> Decision:
        """What ``item`` does. ``alone``: it is the only report of its mail, so a bounce
        for another address (where the subscriber forwards to) may still be theirs."""
        if item.source == "mail":
            if item.kind == FeedbackKind.UNSUBSCRIBE:
                reference, why = self._mailto(item)
            else:
                reference, why = self._returned(item, alone=alone)
        else:
            reference, why = self._webhook(item)
        if reference is None:
            return Decision(item, why_not=why)
        if item.kind == FeedbackKind.DELAY:
            return Decision(
                item, reference, why_not="a delay warning (still trying): never counted"
            )
        return Decision(item, reference, action=ACTIONS[item.kind])

    # -- mail: a report about a message we sent

    def _returned(self, item: Feedback, *, alone: bool) -> tuple[Reference | None, str]:
        found = self._by_verp(item.verp_token)
        if found is None:
            found = self._by_message_id(item.message_ids, item.recipient)
        if found is None:
            found = self._by_unsubscribe_token(item.unsubscribe_token)
        if found is None:
            return None, self._unmatched_reason(item)
        if item.recipient and email_key(item.recipient) != email_key(found.email) and not alone:
            return None, (
                f"names {item.recipient}, but the message it refers to (by {found.by}) went to"
                " another subscriber"
            )
        return found, ""

    def _unmatched_reason(self, item: Feedback) -> str:
        tried = []
        if item.verp_token:
            tried.append("a VERP address that is not ours")
        if item.message_ids:
            tried.append(f"{len(item.message_ids)} Message-ID(s) the ledger does not know")
        if item.unsubscribe_token:
            tried.append("an unsubscribe token that is not valid")
        if not tried:
            return "refers to no message we sent (no VERP address, Message-ID or token)"
        return "refers to no message we sent (" + "; ".join(tried) + ")"

    def _by_verp(self, token: str | None) -> Reference | None:
        if not token:
            return None
        subscriber_id = verp_subscriber_id(token)
        if subscriber_id is None:
            return None
        subscriber = self.store.get_subscriber(subscriber_id)
        if subscriber is None:
            return None
        for issue_key, message_id in self.store.sent_messages(subscriber.id):
            if self.signer.verp_matches(token, subscriber.id, subscriber.email, issue_key):
                return _reference(subscriber, issue_key, message_id, "VERP")
        return None

    def _by_message_id(self, message_ids: Sequence[str], recipient: str | None) -> Reference | None:
        found: list[Reference] = []
        for message_id in message_ids[:_MAX_LOOKUPS]:
            delivery = self.store.delivery_for_message_id(message_id)
            if delivery is None:
                continue
            subscriber = self.store.get_subscriber(delivery[1])
            if subscriber is not None:
                found.append(_reference(subscriber, delivery[0], message_id, "Message-ID"))
        if recipient:
            # A report quoting several of our messages: the one sent to the address it names.
            for reference in found:
                if email_key(reference.email) == email_key(recipient):
                    return reference
        return found[0] if found else None

    def _by_unsubscribe_token(self, token: str | None) -> Reference | None:
        if not token:
            return None
        data = self.signer.verify(token, UNSUBSCRIBE_PURPOSE)
        if data is None:
            return None
        # Read as the service's /u/TOKEN reads it: "<id>:<fingerprint>" (an address in
        # place of the id in tokens made without one; no fingerprint in the oldest).
        ref, _, fingerprint = data.subject.partition(":")
        if not ref or ref == "test":
            return None  # a proof copy's token names no subscriber
        subscriber = self.store.get_subscriber(int(ref) if ref.isdigit() else ref)
        # A token for a deleted row whose id now belongs to someone else does nothing.
        if subscriber is None or (
            fingerprint and fingerprint != address_fingerprint(subscriber.email)
        ):
            return None
        return _reference(subscriber, data.context, "", "unsubscribe token")

    # -- mail: someone asking to leave

    def _mailto(self, item: Feedback) -> tuple[Reference | None, str]:
        found = self._by_unsubscribe_token(item.unsubscribe_token)
        if found is not None:
            return found, ""
        if item.sender:
            subscriber = self.store.get_subscriber(item.sender)
            if subscriber is not None:
                return _reference(subscriber, "", "", "sender"), ""
        token = "an unsubscribe token that is not valid" if item.unsubscribe_token else "no token"
        who = f"the sender {item.sender} is" if item.sender else "no sender, and nobody"
        return None, f"{token}, and {who} not a subscriber"

    # -- webhooks: authentic, but about whom?

    def _webhook(self, item: Feedback) -> tuple[Reference | None, str]:
        if not item.recipient:
            return None, "names no address"
        subscriber = self.store.get_subscriber(item.recipient)
        if subscriber is None:
            return None, f"{item.recipient} is not a subscriber"
        by = f"{item.source} webhook"
        for message_id in item.message_ids[:_MAX_LOOKUPS]:
            delivery = self.store.delivery_for_message_id(message_id)
            if delivery is None:
                continue  # the provider's own id, or a message the ledger forgot
            if delivery[1] != subscriber.id:
                return None, f"the message it names was sent to another subscriber ({message_id})"
            return _reference(subscriber, delivery[0], message_id, f"{by}, Message-ID"), ""
        if not self.store.sent_messages(subscriber.id):
            return None, f"we never sent anything to {item.recipient}"
        return _reference(subscriber, "", "", by), ""


def _reference(subscriber: Subscriber, issue_key: str, message_id: str, by: str) -> Reference:
    return Reference(subscriber.id, subscriber.email, subscriber.status, issue_key, message_id, by)


def matcher_for(store: Store, secret_key: str | None) -> Matcher:
    """A :class:`Matcher` with our key. Without it (a ConfigError) nothing is read: VERP
    addresses and unsubscribe tokens could not be checked, and an unsubscribe recorded
    as unmatched would be lost for good."""
    return Matcher(store, TokenSigner(secret_key))


# --- acting ---------------------------------------------------------------------------------


def _action(decision: Decision) -> FeedbackAction | None:
    reference = decision.reference
    if not decision.action or reference is None:
        return None
    item = decision.feedback
    if item.source == "mail":
        event = f"mail {item.event_id}"
        reason = {
            FeedbackKind.HARD_BOUNCE: "bounce-hard",
            FeedbackKind.SOFT_BOUNCE: "bounce-soft",
            FeedbackKind.COMPLAINT: "complaint",
            FeedbackKind.UNSUBSCRIBE: "mailto",
        }[item.kind]
    else:
        event = f"{item.source} event {item.event_id}"
        reason = {
            FeedbackKind.HARD_BOUNCE: "bounce-hard",
            FeedbackKind.SOFT_BOUNCE: "bounce-soft",
            FeedbackKind.COMPLAINT: "complaint",
            FeedbackKind.UNSUBSCRIBE: f"{item.source}-unsubscribe",
        }[item.kind]
    detail = f"matched by {reference.by}; {event}"
    if item.kind == FeedbackKind.UNSUBSCRIBE and item.source == "mail" and item.sender:
        detail += f" from {item.sender}"
    return FeedbackAction(
        kind=item.kind,
        subscriber_id=reference.subscriber_id,
        email=item.recipient or reference.email,
        issue_key=reference.issue_key,
        reason=reason,
        detail=detail,
        status=item.status or ("5.0.0" if item.kind == FeedbackKind.HARD_BOUNCE else ""),
        diagnostic=item.diagnostic,
        reported_at=item.reported_at,
    )


def _outcome(decisions: Sequence[Decision]) -> tuple[Outcome, str]:
    acted = [d for d in decisions if d.action]
    counted = [d for d in decisions if d.feedback.kind != FeedbackKind.DELAY]
    unmatched = [d for d in counted if d.reference is None]
    if acted:
        kinds = ", ".join(sorted({d.feedback.kind.value for d in acted}))
        ways = ", ".join(sorted({d.reference.by for d in acted if d.reference is not None}))
        others = f"; {len(unmatched)} unmatched" if unmatched else ""
        return Outcome.APPLIED, f"{len(acted)} report(s) ({kinds}) matched by {ways}{others}"
    if unmatched:
        return Outcome.UNMATCHED, f"{len(unmatched)} report(s): {unmatched[0].why_not}"
    if decisions and not counted:
        return Outcome.NO_ACTION, f"{len(decisions)} delay warning(s): never counted"
    return Outcome.NO_ACTION, decisions[0].why_not if decisions else "nothing to do"


def mail_key(inbound: Inbound, data: bytes) -> str:
    """The key a mail is processed once by: its Message-ID and a digest of what it says.

    The Message-ID alone can be chosen by anyone; with the body (and the VERP token of
    the address it came to, the one thing in its header that matters) it names this
    mail. The body is read with line ends and mbox ``>From`` quoting undone, so the same
    mail from an mbox, a Maildir or IMAP (each with trace headers of its own) has one key.
    """
    if inbound.event_id.startswith("sha256:"):
        return inbound.event_id  # a hash of all of it already
    text = data.replace(b"\r\n", b"\n")
    _head, separator, body = text.partition(b"\n\n")
    body = re.sub(rb"(?m)^>(>*From )", rb"\1", body if separator else text).rstrip()
    tokens = sorted({f.verp_token for f in inbound.feedback if f.verp_token})
    digest = hashlib.sha256(body + b"\0" + "\0".join(tokens).encode("utf-8", "replace"))
    return f"{inbound.event_id} body:{digest.hexdigest()[:32]}"


def process_mail(
    store: Store,
    data: bytes,
    *,
    matcher: Matcher,
    source: str,
    soft_limit: int,
    verp_prefix: str = "bounces",
    name: str = "",
    dry_run: bool = False,
) -> FeedbackResult:
    """Classify one mail, check its reports and (unless ``dry_run``) act on them, once.

    A mail that cannot be read is recorded as unreadable with the reason. Only a
    database error is raised; nothing about the mail itself is.
    """
    inbound = classify(data, verp_prefix=verp_prefix)
    key = mail_key(inbound, data)
    base = FeedbackResult(
        key=key,
        outcome=Outcome.IGNORED,
        reason=inbound.reason,
        kind=inbound.kind.value,
        event_id=inbound.event_id,
        subject=inbound.subject,
        sender=inbound.sender,
        name=name,
        dry_run=dry_run,
    )
    if store.is_processed(key):
        return replace(base, outcome=Outcome.ALREADY_PROCESSED, reason="processed before")
    try:
        result = _judge(inbound, base, matcher)
    except NewsletterError:
        raise
    except Exception as exc:  # a last guard: one mail must never stop a run
        _log.debug("an inbound mail could not be checked", exc_info=True)
        result = replace(
            base,
            outcome=Outcome.UNREADABLE,
            reason=f"could not be checked ({type(exc).__name__})",
            decisions=(),
        )
    if dry_run:
        return result
    actions = tuple(a for d in result.decisions if (a := _action(d)) is not None)
    item = FeedbackItem(key, source, f"{result.outcome.value}: {result.reason}", actions)
    applied = store.record_feedback([item], soft_limit=soft_limit)
    effects = applied[0] if applied else None
    if effects is None:
        return replace(base, outcome=Outcome.ALREADY_PROCESSED, reason="processed meanwhile")
    return _with_effects(result, effects)


def _judge(inbound: Inbound, base: FeedbackResult, matcher: Matcher) -> FeedbackResult:
    if inbound.kind == InboundKind.UNREADABLE:
        return replace(base, outcome=Outcome.UNREADABLE)
    if not inbound.feedback:
        # A report with nothing to act on (a success, no recipient) is no action; an
        # auto-reply, a reader's reply, a complaint of another type: ignored.
        quiet = inbound.kind == InboundKind.DSN
        return replace(base, outcome=Outcome.NO_ACTION if quiet else Outcome.IGNORED)
    # One report in the mail (delay warnings aside): a bounce for another address is where
    # the subscriber forwards to. Several: each must name the one its message went to.
    counted = [f for f in inbound.feedback if f.kind != FeedbackKind.DELAY]
    alone = len(counted) <= 1
    decisions = tuple(matcher.decide(item, alone=alone) for item in inbound.feedback)
    outcome, reason = _outcome(decisions)
    return replace(base, outcome=outcome, reason=reason, decisions=decisions)


def _with_effects(result: FeedbackResult, effects: Sequence[str]) -> FeedbackResult:
    it = iter(effects)
    decisions = tuple(
        replace(d, effect=next(it, "")) if _action(d) is not None else d for d in result.decisions
    )
    return replace(result, decisions=decisions)


# --- webhooks ---------------------------------------------------------------------------


def apply_webhook(
    store: Store,
    feedback: Sequence[Feedback],
    *,
    source: str,
    matcher: Matcher,
    soft_limit: int,
    replay_token: str | None = None,
    replay_ttl: timedelta = timedelta(hours=1),
    now: datetime,
) -> list[FeedbackResult] | None:
    """Check and apply the events of one authentic webhook request, in one transaction.

    Each event is processed once by (``source``, its event id). ``replay_token`` (Mailgun's
    single-use token) is recorded in the same transaction and kept for ``replay_ttl``;
    None is returned, and nothing changes, when it was recorded before.
    """
    results: list[FeedbackResult] = []
    items: list[FeedbackItem] = []
    for event in feedback:
        key = f"{source}:{event.event_id}"
        base = FeedbackResult(
            key=key,
            outcome=Outcome.IGNORED,
            reason="",
            kind=source,
            event_id=event.event_id,
            name=f"{source} webhook",
        )
        if store.is_processed(key):
            results.append(replace(base, outcome=Outcome.ALREADY_PROCESSED, reason="before"))
            continue
        decision = matcher.decide(event, alone=True)
        outcome, reason = _outcome([decision])
        result = replace(base, outcome=outcome, reason=reason, decisions=(decision,))
        results.append(result)
        action = _action(decision)
        items.append(
            FeedbackItem(key, source, f"{outcome.value}: {reason}", (action,) if action else ())
        )
    replay = (
        None
        if replay_token is None
        else ReplayToken(source, replay_token, now + max(replay_ttl, timedelta(minutes=10)))
    )
    if not items and replay is None:
        return results
    applied = store.record_feedback(items, soft_limit=soft_limit, replay=replay, now=now)
    if applied is None:
        return None
    effects = iter(applied)
    out: list[FeedbackResult] = []
    for result in results:
        if result.outcome == Outcome.ALREADY_PROCESSED:
            out.append(result)
            continue
        done = next(effects, None)
        if done is None:
            out.append(replace(result, outcome=Outcome.ALREADY_PROCESSED, reason="meanwhile"))
        else:
            out.append(_with_effects(result, done))
    return out
