"""The subscription service: unsubscribes, double opt-in confirmations, pruning
requests nobody confirmed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ..addresses import normalize_email, suppression_hash
from ..errors import StoreError
from ..models import ConfirmationRequest, Status, Subscriber
from .base import StoreBase, _dt, _hash_key, _iso, _now, _record_consent, _record_event

# The reasons request_confirmation records when it creates a pending subscriber: only
# such rows are pruned when unconfirmed (an imported pending row is the editor's data).
FORM_REASONS = ("subscribe", "subscribe-form")


class ServiceMixin(StoreBase):
    """Unsubscribes and double opt-in."""

    def unsubscribe(
        self, email_or_id: str | int, reason: str, detail: str = ""
    ) -> Subscriber | None:
        """Unsubscribe (from active, pending or bounced); None when there is no such subscriber.

        Idempotent: an unsubscribed or complained subscriber is left as is, with no new event.
        Rows of a running send are cancelled when claimed (see :meth:`claim_batch`).
        """
        with self._transaction() as conn:
            try:
                subscriber_id = self._subscriber_id(conn, email_or_id)
            except StoreError:
                return None
            self._change_status(
                conn,
                subscriber_id,
                Status.UNSUBSCRIBED,
                reason,
                detail,
                _now(),
                only_from=(Status.ACTIVE, Status.PENDING, Status.BOUNCED),
            )
            return self._get(conn, subscriber_id)

    def request_confirmation(
        self,
        email: str,
        name: str = "",
        *,
        resend_after: timedelta,
        reason: str = "subscribe",
        now: datetime | None = None,
        page: str = "",
    ) -> ConfirmationRequest:
        """Record a subscribe request and reserve a confirmation email if one is due.

        A new address is added as ``pending``. Anyone not active (pending, unsubscribed,
        bounced, complained) keeps their status until they confirm; their confirmation is
        due when none was sent in the last ``resend_after``. Active subscribers get none.
        The reservation is committed before the email goes out, so two requests at once
        send one email; :meth:`release_confirmation` undoes it when sending fails.

        The request is recorded as consent (source ``form``, the ``page`` it came from,
        its time) until the confirming click completes it; requests while one is open
        add nothing.
        """
        normalized = normalize_email(email)
        moment = now or datetime.now(UTC)
        stamp = _iso(moment)
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id, status FROM subscribers WHERE email_key = ?", (normalized.lower(),)
            ).fetchone()
            created = row is None
            if row is None:
                subscriber_id = int(
                    conn.execute(
                        "INSERT INTO subscribers (email, email_key, name, fields, status,"
                        " created_at, updated_at, status_changed_at)"
                        " VALUES (?, ?, ?, '{}', 'pending', ?, ?, ?) RETURNING id",
                        (normalized, normalized.lower(), name.strip(), stamp, stamp, stamp),
                    ).fetchone()[0]
                )
                _record_event(conn, subscriber_id, None, Status.PENDING.value, reason, "", stamp)
            else:
                subscriber_id = int(row[0])
                if row[1] == Status.ACTIVE:
                    return ConfirmationRequest(self._get(conn, subscriber_id), False, False, None)
                if row[1] == Status.PENDING and name.strip():
                    conn.execute(
                        "UPDATE subscribers SET name = ?, updated_at = ? WHERE id = ?",
                        (name.strip(), stamp, subscriber_id),
                    )
            if not conn.execute(
                "SELECT 1 FROM consents WHERE subscriber_id = ? AND source = 'form'"
                " AND confirmed_at IS NULL",
                (subscriber_id,),
            ).fetchone():
                _record_consent(conn, subscriber_id, "form", page, stamp)
            sent = conn.execute(
                "SELECT sent_at FROM confirmations WHERE subscriber_id = ?", (subscriber_id,)
            ).fetchone()
            previous = None if sent is None else _dt(sent[0])
            due = previous is None or moment - previous >= resend_after
            if due:
                conn.execute(
                    "INSERT INTO confirmations (subscriber_id, requested_at, sent_at)"
                    " VALUES (?1, ?2, ?2) ON CONFLICT (subscriber_id) DO UPDATE SET"
                    " sent_at = excluded.sent_at, sends = confirmations.sends + 1",
                    (subscriber_id, stamp),
                )
            return ConfirmationRequest(self._get(conn, subscriber_id), due, created, previous)

    def release_confirmation(self, request: ConfirmationRequest) -> None:
        """Undo the reservation of ``request`` (its email could not be sent)."""
        if not request.send:
            return
        with self._transaction() as conn:
            if request.previous_sent_at is None:
                conn.execute(
                    "DELETE FROM confirmations WHERE subscriber_id = ?", (request.subscriber.id,)
                )
            else:
                conn.execute(
                    "UPDATE confirmations SET sent_at = ?,"
                    " sends = CASE WHEN sends > 0 THEN sends - 1 ELSE 0 END"
                    " WHERE subscriber_id = ?",
                    (_iso(request.previous_sent_at), request.subscriber.id),
                )

    def confirmation_sent_at(self, email_or_id: str | int) -> datetime | None:
        """When the last confirmation email was reserved for this subscriber, or None."""
        with self._reading() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
        row = self._one(
            "SELECT sent_at FROM confirmations WHERE subscriber_id = ?", (subscriber_id,)
        )
        return None if row is None else _dt(row[0])

    def confirm_subscription(
        self, subscriber_id: int, *, issued_at: datetime, detail: str = ""
    ) -> Subscriber | None:
        """Make a subscriber active on a confirmation link issued at ``issued_at``.

        Only a link from the subscriber's open request counts (made at or after it
        started): after a confirmation the request is closed, so an old link can never
        undo a later unsubscribe. None when nothing changed for that reason or the
        subscriber is gone; confirming twice is harmless. Soft bounces start again at 0.

        This, the person's own double opt-in, is the one thing that lifts a suppression;
        the click's time completes their consent record.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT s.status, c.requested_at FROM subscribers s"
                " LEFT JOIN confirmations c ON c.subscriber_id = s.id WHERE s.id = ?",
                (subscriber_id,),
            ).fetchone()
            if row is None:
                return None
            if row[0] == Status.ACTIVE:
                return self._get(conn, subscriber_id)
            if row[1] is None or issued_at < _dt(row[1]).replace(microsecond=0):
                return None
            now = _now()
            self._change_status(conn, subscriber_id, Status.ACTIVE, "confirmed", detail, now)
            conn.execute("UPDATE subscribers SET soft_bounces = 0 WHERE id = ?", (subscriber_id,))
            conn.execute("DELETE FROM confirmations WHERE subscriber_id = ?", (subscriber_id,))
            conn.execute(
                "DELETE FROM suppressions WHERE address_hash = ?",
                (suppression_hash(_hash_key(conn), self._email_key(conn, subscriber_id)),),
            )
            completed = conn.execute(
                "UPDATE consents SET confirmed_at = ? WHERE id = (SELECT max(id) FROM consents"
                " WHERE subscriber_id = ? AND source = 'form' AND confirmed_at IS NULL)",
                (now, subscriber_id),
            ).rowcount
            if not completed:  # a request from before consent was recorded
                consent = _record_consent(conn, subscriber_id, "form", "", row[1])
                conn.execute("UPDATE consents SET confirmed_at = ? WHERE id = ?", (now, consent))
            return self._get(conn, subscriber_id)

    def prune_pending(self, ttl: timedelta, *, now: datetime | None = None) -> int:
        """Delete subscribers who asked through the form and never confirmed in time.

        A row goes when it is still ``pending`` from its creation by
        :meth:`request_confirmation` (no other status change, no delivery) and neither
        it nor its last confirmation email is younger than ``ttl``: every link it was
        sent has expired. Returns how many were deleted.
        """
        cutoff = _iso((now or datetime.now(UTC)) - ttl)
        reasons = ", ".join("?" * len(FORM_REASONS))
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM subscribers WHERE id IN (SELECT s.id FROM subscribers s"
                " WHERE s.status = 'pending' AND s.status_changed_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM confirmations c"
                "  WHERE c.subscriber_id = s.id AND c.sent_at >= ?)"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.subscriber_id = s.id)"
                " AND NOT EXISTS (SELECT 1 FROM subscriber_events e WHERE e.subscriber_id = s.id"
                f"  AND (e.old_status IS NOT NULL OR e.reason NOT IN ({reasons}))))",
                (cutoff, cutoff, *FORM_REASONS),
            )
            return cursor.rowcount
