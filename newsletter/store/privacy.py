"""Suppression and one person's data: everything held about an address, and erasing it."""

from __future__ import annotations

from ..addresses import email_key, suppression_hash
from ..db import OperationalError
from ..models import (
    Consent,
    DeliveryState,
    Erasure,
    PendingConfirmation,
    PersonRecord,
    Status,
    SubscriberEvent,
    Suppression,
)
from .base import (
    _SUBSCRIBER_COLUMNS,
    StoreBase,
    _dt,
    _forget,
    _hash_key,
    _now,
    _opt_dt,
    _subscriber,
    _suppress,
    _suppression,
)


class PrivacyMixin(StoreBase):
    """Suppression, a person's record, erasure."""

    def suppression(self, address: str) -> Suppression | None:
        """Why and since when ``address`` is suppressed (see migration 6), or None."""
        with self._reading() as conn:
            return _suppression(conn, email_key(address))

    def count_suppressions(self) -> int:
        """How many addresses are suppressed."""
        return int(self._one("SELECT count(*) FROM suppressions")[0])

    def erased_counts(self, issue_key: str) -> dict[DeliveryState, int]:
        """Ledger rows of ``issue_key`` whose subscriber was erased or removed, per state
        (only these counts are kept); states without any are left out."""
        return {
            DeliveryState(state): number
            for state, number in self._all(
                "SELECT state, count FROM erased_deliveries WHERE issue_key = ? AND count > 0",
                (issue_key,),
            )
        }

    def person(self, address: str) -> PersonRecord | None:
        """Everything held about ``address``: the subscriber row, consent, history, ledger
        rows, bounces (also those recorded for the address without a subscriber), an open
        confirmation and the suppression entry. None when nothing at all is held."""
        key = email_key(address)
        with self._transaction() as conn:  # one consistent view
            row = conn.execute(
                f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.email_key = ?", (key,)
            ).fetchone()
            subscriber = None if row is None else _subscriber(row)
            sid = -1 if subscriber is None else subscriber.id
            consents = tuple(
                Consent(r[0], r[1], _dt(r[2]), r[3], _opt_dt(r[4]))
                for r in conn.execute(
                    "SELECT * FROM (SELECT 'import', m.file || ':' || s.import_line,"
                    "   m.imported_at, coalesce(s.signed_up, ''), s.import_confirmed_at, 0"
                    "   FROM subscribers s JOIN imports m ON m.id = s.import_id WHERE s.id = ?1"
                    " UNION ALL SELECT source, origin, recorded_at, signed_up, confirmed_at, id"
                    "   FROM consents WHERE subscriber_id = ?1) AS c"
                    " ORDER BY 3, 6",
                    (sid,),
                )
            )
            events = tuple(
                SubscriberEvent(
                    r[0],
                    None if r[1] is None else Status(r[1]),
                    Status(r[2]),
                    r[3],
                    r[4],
                    _dt(r[5]),
                )
                for r in conn.execute(
                    "SELECT subscriber_id, old_status, new_status, reason, detail, at"
                    " FROM subscriber_events WHERE subscriber_id = ? ORDER BY id",
                    (sid,),
                )
            )
            bounce_rows = conn.execute(
                f"SELECT {self._BOUNCE_COLUMNS} FROM bounces WHERE subscriber_id = ?"
                " OR (subscriber_id IS NULL AND email <> '' AND lower(trim(email)) = ?)"
                " ORDER BY id",
                (sid, key),
            ).fetchall()
            pending = conn.execute(
                "SELECT requested_at, sent_at, sends FROM confirmations WHERE subscriber_id = ?",
                (sid,),
            ).fetchone()
            suppressed = _suppression(conn, key)
        deliveries = tuple(
            self._entries(
                "d.subscriber_id = ? ORDER BY coalesce(d.sent_at, d.updated_at), d.issue_key",
                (sid,),
            )
        )
        bounces = tuple(self._to_bounce_record(r) for r in bounce_rows)
        if subscriber is None and suppressed is None and not bounces:
            return None
        return PersonRecord(
            address=subscriber.email if subscriber else key,
            subscriber=subscriber,
            suppression=suppressed,
            consents=consents,
            events=events,
            deliveries=deliveries,
            bounces=bounces,
            confirmation=(
                None
                if pending is None
                else PendingConfirmation(_dt(pending[0]), _dt(pending[1]), pending[2])
            ),
        )

    def erase_person(self, address: str) -> Erasure:
        """Delete everything held about ``address`` (an erasure request), keep it suppressed.

        The subscriber row, their history, consent, open confirmation and ledger rows go
        (the ledger rows leave counts per issue and state, see :meth:`erased_counts`);
        bounce records, theirs and any recorded for the address alone, lose the address and
        the server's text but stay counted. The suppression entry, a keyed hash, stays (or
        is made, reason ``erased``) so that no import adds them back. On SQLite deleted
        content is overwritten (secure_delete) and the write-ahead log emptied, so no copy
        of it stays in the database files (unless another process, e.g. `serve`, is reading
        it: then ``Erasure.copies_cleared`` is False and the log is emptied at a later
        checkpoint). PostgreSQL cannot be made to do that from here (see
        ``Erasure.server_keeps_copies``).
        """
        key = email_key(address)
        now = _now()
        with self._lock:
            try:
                with self._transaction() as conn:
                    row = conn.execute(
                        "SELECT id FROM subscribers WHERE email_key = ?", (key,)
                    ).fetchone()
                    events = deliveries = consents = 0
                    bounces = conn.execute(
                        "UPDATE bounces SET email = '', diagnostic = '' WHERE subscriber_id IS NULL"
                        " AND email <> '' AND lower(trim(email)) = ?",
                        (key,),
                    ).rowcount
                    if row is not None:
                        sid = int(row[0])
                        (events,) = conn.execute(
                            "SELECT count(*) FROM subscriber_events WHERE subscriber_id = ?", (sid,)
                        ).fetchone()
                        (deliveries,) = conn.execute(
                            "SELECT count(*) FROM deliveries WHERE subscriber_id = ?", (sid,)
                        ).fetchone()
                        (consents,) = conn.execute(
                            "SELECT count(*) + (SELECT CASE WHEN import_id IS NULL THEN 0"
                            " ELSE 1 END FROM subscribers WHERE id = ?1)"
                            " FROM consents WHERE subscriber_id = ?1",
                            (sid,),
                        ).fetchone()
                        (theirs,) = conn.execute(
                            "SELECT count(*) FROM bounces WHERE subscriber_id = ?", (sid,)
                        ).fetchone()
                        bounces += theirs
                        _suppress(conn, sid, "erased", now)
                        _forget(conn, sid)
                    else:
                        conn.execute(
                            "INSERT INTO suppressions (address_hash, reason, at) VALUES"
                            " (?, 'erased', ?) ON CONFLICT (address_hash) DO NOTHING",
                            (suppression_hash(_hash_key(conn), key), now),
                        )
                    suppressed = _suppression(conn, key)
                    assert suppressed is not None
                busy = self._clear_old_copies()
            except OperationalError as exc:
                raise self._db_error(exc) from None
        return Erasure(
            address=key,
            subscriber=row is not None,
            events=events,
            deliveries=deliveries,
            bounces=bounces,
            consents=consents,
            suppression=suppressed,
            copies_cleared=not busy,
            server_keeps_copies=self.is_postgres,
        )
