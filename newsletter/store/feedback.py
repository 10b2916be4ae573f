"""Readers' feedback (inbound mail and webhooks): processed messages, bounces, replay tokens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ..db import Connection
from ..feedback import FeedbackKind
from ..models import BounceKind, BounceRecord, FeedbackAction, FeedbackItem, ReplayToken, Status
from .base import StoreBase, _iso, _now


def _delivery_by_message_id(conn: Connection, message_id: str) -> tuple[str, int] | None:
    """(issue_key, subscriber_id) of the ledger row that sent ``message_id``, or None.

    The ledger keeps the Message-ID as the header had it; a reply or report may quote
    it with or without its angle brackets, so both forms are looked up.
    """
    bare = message_id.strip().strip("<>").strip()
    if not bare:
        return None
    row = conn.execute(
        "SELECT issue_key, subscriber_id FROM deliveries INDEXED BY deliveries_message_id"
        " WHERE message_id IN (?, ?) AND message_id <> '' LIMIT 1",
        (f"<{bare}>", bare),
    ).fetchone()
    return None if row is None else (row[0], int(row[1]))


class FeedbackMixin(StoreBase):
    """Bounces, complaints and unsubscribes reported by mail or webhook."""

    def delivery_for_message_id(self, message_id: str) -> tuple[str, int] | None:
        """(issue_key, subscriber_id) of the ledger row that sent ``message_id``, or None."""
        with self._reading() as conn:
            return _delivery_by_message_id(conn, message_id)

    def is_processed(self, message_key: str) -> bool:
        """True when a mail or event with this key (see :meth:`record_feedback`) was
        processed before."""
        return (
            self._one("SELECT 1 FROM processed_messages WHERE message_key = ?", (message_key,))
            is not None
        )

    def _count_soft_bounce(
        self,
        conn: Connection,
        subscriber_id: int,
        issue_key: str,
        about: str,
        context: str,
        when: str,
        soft_limit: int,
        now: str,
    ) -> tuple[bool, str]:
        if (
            issue_key
            and conn.execute(
                "SELECT 1 FROM bounces WHERE subscriber_id = ? AND issue_key = ? AND counted = 1",
                (subscriber_id, issue_key),
            ).fetchone()
        ):
            return False, "soft bounce already counted for this issue"
        if issue_key and self._run_broken(conn, subscriber_id, issue_key):
            conn.execute("UPDATE subscribers SET soft_bounces = 0 WHERE id = ?", (subscriber_id,))
        conn.execute(
            "UPDATE subscribers SET soft_bounces = soft_bounces + 1, updated_at = ? WHERE id = ?",
            (now, subscriber_id),
        )
        count, status = conn.execute(
            "SELECT soft_bounces, status FROM subscribers WHERE id = ?", (subscriber_id,)
        ).fetchone()
        if count < soft_limit:
            return True, f"soft bounce {count} of {soft_limit}"
        changed = self._change_status(
            conn,
            subscriber_id,
            Status.BOUNCED,
            "bounce-soft",
            f"{count} soft bounces in a row, the last {about} ({context}reported {when})",
            now,
            only_from=(Status.ACTIVE, Status.PENDING),
        )
        if changed:
            return True, f"marked bounced after {count} soft bounces"
        return True, f"soft bounce {count} of {soft_limit} (subscriber is {status})"

    @staticmethod
    def _run_broken(conn: Connection, subscriber_id: int, issue_key: str) -> bool:
        """True when an issue sent between the last counted soft bounce and this one got
        through without a bounce: the soft bounces are then no longer "in a row"."""
        row = conn.execute(
            "SELECT max(i.snapshot_at) FROM bounces b JOIN issue_sends i"
            " ON i.issue_key = b.issue_key WHERE b.subscriber_id = ? AND b.kind = 'soft'"
            " AND b.counted = 1",
            (subscriber_id,),
        ).fetchone()
        this = conn.execute(
            "SELECT snapshot_at FROM issue_sends WHERE issue_key = ?", (issue_key,)
        ).fetchone()
        if row[0] is None or this is None:
            return False
        return (
            conn.execute(
                "SELECT 1 FROM deliveries d JOIN issue_sends i ON i.issue_key = d.issue_key"
                " WHERE d.subscriber_id = ?1 AND d.state = 'sent'"
                " AND i.snapshot_at > ?2 AND i.snapshot_at < ?3"
                " AND NOT EXISTS (SELECT 1 FROM bounces b WHERE b.subscriber_id = ?1"
                "   AND b.issue_key = d.issue_key) LIMIT 1",
                (subscriber_id, row[0], this[0]),
            ).fetchone()
            is not None
        )

    def bounces_for_issue(self, issue_key: str) -> list[BounceRecord]:
        """The bounces matched to ``issue_key``, in the order they were recorded."""
        rows = self._all(
            f"SELECT {self._BOUNCE_COLUMNS} FROM bounces WHERE issue_key = ? ORDER BY id",
            (issue_key,),
        )
        return [self._to_bounce_record(row) for row in rows]

    def list_bounces(self, limit: int | None = None) -> list[BounceRecord]:
        """Every recorded bounce, newest first."""
        rows = self._all(
            f"SELECT {self._BOUNCE_COLUMNS} FROM bounces ORDER BY id DESC"
            + ("" if limit is None else f" LIMIT {int(limit)}")
        )
        return [self._to_bounce_record(row) for row in rows]

    # -- readers' feedback: inbound mail and webhooks ----------------------------------------

    def sent_messages(self, subscriber_id: int) -> list[tuple[str, str]]:
        """(issue_key, message_id) of each copy handed to a server for this subscriber
        (at least one attempt), newest issue first; message_id is "" when none was recorded."""
        rows = self._all(
            "SELECT d.issue_key, d.message_id FROM deliveries d INDEXED BY deliveries_subscriber"
            " JOIN issue_sends i ON i.issue_key = d.issue_key"
            " WHERE d.subscriber_id = ? AND d.attempts > 0 ORDER BY i.snapshot_at DESC",
            (subscriber_id,),
        )
        return [(row[0], row[1]) for row in rows]

    def webhook_token_seen(self, source: str, token: str, *, now: datetime | None = None) -> bool:
        """True when this single-use webhook token was recorded and has not expired
        (at ``now``: the time the request's signature was checked against)."""
        row = self._one(
            "SELECT 1 FROM webhook_tokens WHERE source = ? AND token = ? AND expires_at >= ?",
            (source, token, _iso(now) if now is not None else _now()),
        )
        return row is not None

    def record_feedback(
        self,
        items: Sequence[FeedbackItem],
        *,
        soft_limit: int,
        replay: ReplayToken | None = None,
        now: datetime | None = None,
    ) -> list[tuple[str, ...] | None] | None:
        """Apply checked feedback, each item once, all in one transaction.

        Each item's key goes into processed_messages with its outcome; an item whose key
        is there already changes nothing (None in its place). Otherwise each action's
        effect is returned: a hard bounce marks an active or pending subscriber bounced,
        a soft bounce is counted once per issue (``soft_limit`` in a row: bounced), a
        complaint marks them complained and an unsubscribe unsubscribes them, each with a
        history event; bounces are also kept in the bounces table. ``replay``, a webhook's
        single-use token, is recorded first: if it is there already the request is a
        replay, nothing changes and the result is None. ``now`` is the clock replay
        tokens expire by (the one the request was checked with).
        """
        now_text = _now()
        with self._transaction() as conn:
            if replay is not None:
                conn.execute(
                    "DELETE FROM webhook_tokens WHERE expires_at < ?",
                    (_iso(now) if now is not None else now_text,),
                )
                if not conn.execute(
                    "INSERT INTO webhook_tokens (source, token, expires_at)"
                    " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (replay.source, replay.token, _iso(replay.expires_at)),
                ).rowcount:
                    return None
            results: list[tuple[str, ...] | None] = []
            for item in items:
                if not conn.execute(
                    "INSERT INTO processed_messages"
                    " (message_key, source, outcome, processed_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (item.key, item.source, item.outcome[:500], now_text),
                ).rowcount:
                    results.append(None)
                    continue
                results.append(
                    tuple(
                        self._apply_feedback(conn, item.key, action, soft_limit, now_text)
                        for action in item.actions
                    )
                )
            return results

    def _apply_feedback(
        self,
        conn: Connection,
        key: str,
        action: FeedbackAction,
        soft_limit: int,
        now: str,
    ) -> str:
        """One checked action; returns what it did (the ``effect``)."""
        row = conn.execute(
            "SELECT status FROM subscribers WHERE id = ?", (action.subscriber_id,)
        ).fetchone()
        if row is None:
            return "no change (the subscriber was deleted meanwhile)"
        subscriber_id = action.subscriber_id
        when = (
            (action.reported_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        )
        context = f"issue {action.issue_key}, " if action.issue_key else ""
        about = f"{action.status or '?'} {action.diagnostic}".strip()
        # The history's detail ends with how the report was matched and its id.
        when_and_how = f"{when}; {action.detail}" if action.detail else when
        kind = action.kind
        if kind in (FeedbackKind.HARD_BOUNCE, FeedbackKind.SOFT_BOUNCE):
            counted = False
            if kind == FeedbackKind.HARD_BOUNCE:
                changed = self._change_status(
                    conn,
                    subscriber_id,
                    Status.BOUNCED,
                    action.reason,
                    f"{about} ({context}reported {when_and_how})",
                    now,
                    only_from=(Status.ACTIVE, Status.PENDING),
                )
                effect = "marked bounced" if changed else f"no change (subscriber is {row[0]})"
            else:
                counted, effect = self._count_soft_bounce(
                    conn, subscriber_id, action.issue_key, about, context, when_and_how,
                    soft_limit, now,
                )  # fmt: skip
            conn.execute(
                "INSERT INTO bounces (message_key, subscriber_id, email, issue_key, kind, status,"
                " diagnostic, counted, effect, reported_at, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    subscriber_id,
                    action.email,
                    action.issue_key,
                    (
                        BounceKind.HARD if kind == FeedbackKind.HARD_BOUNCE else BounceKind.SOFT
                    ).value,
                    action.status,
                    action.diagnostic,
                    int(counted),
                    effect,
                    None if action.reported_at is None else _iso(action.reported_at),
                    now,
                ),
            )
            return effect
        detail = f"{action.diagnostic or kind.value} ({context}reported {when_and_how})"
        if kind == FeedbackKind.COMPLAINT:
            changed = self._change_status(
                conn,
                subscriber_id,
                Status.COMPLAINED,
                action.reason,
                detail,
                now,
                only_from=(Status.ACTIVE, Status.PENDING, Status.BOUNCED, Status.UNSUBSCRIBED),
            )
            return "marked complained" if changed else f"no change (subscriber is {row[0]})"
        if kind == FeedbackKind.UNSUBSCRIBE:
            changed = self._change_status(
                conn,
                subscriber_id,
                Status.UNSUBSCRIBED,
                action.reason,
                detail,
                now,
                only_from=(Status.ACTIVE, Status.PENDING, Status.BOUNCED),
            )
            return "unsubscribed" if changed else f"no change (subscriber is {row[0]})"
        return f"no change ({kind.value} is never acted on)"
