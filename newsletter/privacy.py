"""What the list holds about one person: shown, exported, erased.

``subscribers show`` prints :func:`describe`; ``subscribers export-person`` writes
:func:`person_document` (the answer to an access request); ``subscribers erase``
reports an :class:`~newsletter.models.Erasure` through :func:`describe_erasure`.
The records come from :meth:`newsletter.store.Store.person`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .models import Consent, Erasure, PersonRecord

FORMAT = "newsletter-person/1"  # the export's "format": bumped if a field changes meaning


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _short(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def person_document(record: PersonRecord, *, now: datetime | None = None) -> dict[str, Any]:
    """Everything in ``record`` as JSON-ready data, times in ISO 8601 UTC."""
    sub = record.subscriber
    return {
        "format": FORMAT,
        "address": record.address,
        "exported_at": _when(now or datetime.now(UTC)),
        "on_the_list": sub is not None,
        "subscriber": None
        if sub is None
        else {
            "id": sub.id,
            "email": sub.email,
            "name": sub.name,
            "status": sub.status.value,
            "fields": dict(sub.fields),
            "created_at": _when(sub.created_at),
            "updated_at": _when(sub.updated_at),
            "status_changed_at": _when(sub.status_changed_at),
            "soft_bounces": sub.soft_bounces,
        },
        "consent": [
            {
                "source": c.source,
                "origin": c.origin,
                "recorded_at": _when(c.recorded_at),
                "signed_up": c.signed_up or None,
                "confirmed_at": _when(c.confirmed_at),
            }
            for c in record.consents
        ],
        "history": [
            {
                "at": _when(e.at),
                "from": None if e.old_status is None else e.old_status.value,
                "to": e.new_status.value,
                "reason": e.reason,
                "detail": e.detail,
            }
            for e in record.events
        ],
        "deliveries": [
            {
                "issue": d.issue_key,
                "state": d.state.value,
                "attempts": d.attempts,
                "sent_at": _when(d.sent_at),
                "updated_at": _when(d.updated_at),
                "message_id": d.message_id,
                "server_reply": d.last_reply,
            }
            for d in record.deliveries
        ],
        "bounces": [
            {
                "recorded_at": _when(b.recorded_at),
                "reported_at": _when(b.reported_at),
                "email": b.email,
                "kind": b.kind.value,
                "status": b.status,
                "diagnostic": b.diagnostic,
                "issue": b.issue_key or None,
                "effect": b.effect,
            }
            for b in record.bounces
        ],
        "confirmation": None
        if record.confirmation is None
        else {
            "requested_at": _when(record.confirmation.requested_at),
            "sent_at": _when(record.confirmation.sent_at),
            "emails_sent": record.confirmation.sends,
        },
        "suppression": None
        if record.suppression is None
        else {"reason": record.suppression.reason, "since": _when(record.suppression.at)},
    }


def describe_consent(consent: Consent) -> str:
    """One line: where the consent came from and when."""
    if consent.source == "form":
        text = f"subscribe form {consent.origin or '?'}, asked {_short(consent.recorded_at)}"
        if consent.confirmed_at is not None:
            return f"{text}, confirmed {_short(consent.confirmed_at)}"
        return f"{text}, not confirmed"
    if consent.source == "import":
        text = f"imported from {consent.origin} on {_short(consent.recorded_at)}"
        if consent.signed_up:
            return f"{text}, signed up {consent.signed_up} (from the file)"
        return f"{text}, no sign-up date in the file"
    if consent.source == "added":
        return f"added by the editor on {_short(consent.recorded_at)}"
    origin = f" {consent.origin}" if consent.origin else ""
    return f"{consent.source}{origin} on {_short(consent.recorded_at)}"


def describe(record: PersonRecord) -> list[str]:
    """`subscribers show`: the person's record as lines of text."""
    sub = record.subscriber
    lines = [record.address]
    if sub is None:
        lines.append("  Status:      not on the list")
    else:
        lines += [
            f"  Status:      {sub.status.value} since {_short(sub.status_changed_at)}"
            f" (subscriber {sub.id})",
            f"  Name:        {sub.name or '-'}",
            "  Fields:      "
            + (", ".join(f"{k}={v}" for k, v in sorted(sub.fields.items())) or "-"),
            f"  Added:       {_short(sub.created_at)}",
        ]
        if sub.soft_bounces:
            lines.append(f"  Soft bounces in a row: {sub.soft_bounces}")
    suppressed = record.suppression
    lines.append(
        "  Suppressed:  "
        + (
            "no"
            if suppressed is None
            else f"since {_short(suppressed.at)} ({suppressed.reason}): never added back"
            " by an import or by hand, only by their own confirmation"
        )
    )
    consents = [describe_consent(c) for c in record.consents] or ["none recorded"]
    lines.append(f"  Consent:     {consents[0]}")
    lines += [f"               {text}" for text in consents[1:]]
    if record.confirmation is not None:
        pending = record.confirmation
        lines.append(
            f"  Confirmation: asked {_short(pending.requested_at)}, last email"
            f" {_short(pending.sent_at)} ({pending.sends} sent), not clicked yet"
        )
    lines.append(f"History ({len(record.events)}):")
    for event in record.events:
        change = f"{event.old_status.value if event.old_status else 'new'} -> {event.new_status}"
        detail = f"  {event.detail}" if event.detail else ""
        lines.append(f"  {_short(event.at)}  {change:<27} {event.reason}{detail}")
    lines.append(f"Deliveries ({len(record.deliveries)}):")
    for entry in record.deliveries:
        when = _short(entry.sent_at or entry.updated_at)
        lines.append(f"  {entry.issue_key}  {entry.state:<9} {when}  {entry.message_id}".rstrip())
    lines.append(f"Bounces ({len(record.bounces)}):")
    for bounce in record.bounces:
        issue = f"issue {bounce.issue_key}" if bounce.issue_key else "no issue matched"
        lines.append(
            f"  {_short(bounce.recorded_at)}  {bounce.kind} {bounce.status or '?'}  {issue}"
            f"  {bounce.effect}"
        )
    return lines


def describe_erasure(erased: Erasure) -> str:
    """`subscribers erase`: what went and what stays."""
    if erased.subscriber:
        gone = (
            f"the subscriber row, {erased.events} history entries, {erased.consents} consent"
            f" records, {erased.deliveries} ledger rows (kept as counts per issue)"
        )
    else:
        gone = "no subscriber row (not on the list)"
    text = (
        f"Erased {erased.address}: {gone}; {erased.bounces} bounce records kept without the"
        f" address. Kept: a suppression entry (a keyed hash, {erased.suppression.reason}"
        f" since {_short(erased.suppression.at)}), so no import adds them back."
    )
    if erased.server_keeps_copies:
        text += (
            " Note: PostgreSQL keeps older versions of the deleted rows in its files until"
            " VACUUM reuses their space, and in its write-ahead log and any archive or backup"
            " until those are recycled; the server's retention decides when they are gone."
        )
    elif not erased.copies_cleared:
        text += (
            " Note: another process (`serve`?) is reading the database, so older copies"
            " stay in its write-ahead log until the next checkpoint; run erase again when"
            " it is stopped to be sure."
        )
    return text
