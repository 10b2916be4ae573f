"""Scheduled sends for the worker, and the counts that the worker and ``/metrics`` read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..errors import DeliveryError
from ..models import ScheduleEntry, ScheduleState
from .base import StoreBase, _dt, _iso, _now, _opt_dt


class SchedulesMixin(StoreBase):
    """Schedules and send counts."""

    _SCHEDULE_COLUMNS = (
        "issue_key, send_at, zone, source, state, last_error, not_before, updated_at"
    )

    @staticmethod
    def _to_schedule(row: Sequence[Any]) -> ScheduleEntry:
        return ScheduleEntry(
            row[0],
            _dt(row[1]),
            row[2],
            row[3],
            ScheduleState(row[4]),
            row[5],
            _opt_dt(row[6]),
            _dt(row[7]),
        )

    def set_schedule(
        self, issue_key: str, send_at: datetime, *, zone: str = "", source: str = "command"
    ) -> ScheduleEntry:
        """Schedule (or move) the send of ``issue_key``; refused while the worker sends it."""
        now = _now()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT state FROM schedules WHERE issue_key = ?", (issue_key,)
            ).fetchone()
            if row is not None and row[0] == ScheduleState.SENDING:
                raise DeliveryError(
                    f"issue {issue_key} is being sent by the worker",
                    where=self._where,
                    hint="let it finish; `newsletter status` shows how far it got",
                )
            conn.execute(
                "INSERT INTO schedules (issue_key, send_at, zone, source, state, last_error,"
                " not_before, created_at, updated_at) VALUES (?, ?, ?, ?, 'scheduled', '', NULL,"
                " ?, ?) ON CONFLICT (issue_key) DO UPDATE SET send_at = excluded.send_at,"
                " zone = excluded.zone, source = excluded.source, state = 'scheduled',"
                " last_error = '', not_before = NULL, updated_at = excluded.updated_at",
                (issue_key, _iso(send_at), zone, source, now, now),
            )
            row = conn.execute(
                f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE issue_key = ?",
                (issue_key,),
            ).fetchone()
        return self._to_schedule(row)

    def get_schedule(self, issue_key: str) -> ScheduleEntry | None:
        row = self._one(
            f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE issue_key = ?", (issue_key,)
        )
        return None if row is None else self._to_schedule(row)

    def list_schedules(self) -> list[ScheduleEntry]:
        """Every schedule, the soonest first."""
        rows = self._all(f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules ORDER BY send_at")
        return [self._to_schedule(row) for row in rows]

    def due_schedules(self, now: datetime) -> list[ScheduleEntry]:
        """Schedules whose time has come and that are not finished: ``scheduled``, and
        ``sending`` ones a stopped or killed worker left (they resume from the ledger)."""
        stamp = _iso(now)
        rows = self._all(
            f"SELECT {self._SCHEDULE_COLUMNS} FROM schedules WHERE state IN"
            " ('scheduled', 'sending') AND send_at <= ? AND (not_before IS NULL"
            " OR not_before <= ?) ORDER BY send_at, issue_key",
            (stamp, stamp),
        )
        return [self._to_schedule(row) for row in rows]

    def next_schedule_at(self) -> datetime | None:
        """When the next unfinished schedule becomes due, or None."""
        row = self._one(
            "SELECT min(CASE WHEN not_before > send_at THEN not_before ELSE send_at END)"
            " FROM schedules WHERE state IN ('scheduled', 'sending')"
        )
        return _opt_dt(row[0])

    def update_schedule(
        self,
        issue_key: str,
        state: ScheduleState,
        *,
        error: str = "",
        not_before: datetime | None = None,
        only_from: Sequence[ScheduleState] | None = None,
    ) -> bool:
        """Move a schedule to ``state`` (with the error that did it); False when it is not
        there, or not in one of ``only_from``."""
        where = ""
        params: list[Any] = [
            ScheduleState(state).value,
            error,
            None if not_before is None else _iso(not_before),
            _now(),
            issue_key,
        ]
        if only_from is not None:
            where = f" AND state IN ({', '.join('?' * len(only_from))})"
            params += [ScheduleState(s).value for s in only_from]
        with self._transaction() as conn:
            return (
                conn.execute(
                    "UPDATE schedules SET state = ?, last_error = ?, not_before = ?,"
                    f" updated_at = ? WHERE issue_key = ?{where}",
                    params,
                ).rowcount
                > 0
            )

    def deferred_due(
        self, now: datetime, parked_before: datetime, max_attempts: int | None = None
    ) -> list[str]:
        """Issues with deferred rows to retry now: a retry time that has come (a run did not
        reach it), or parked for "the next run" (no retry time) since before ``parked_before``;
        rows tried ``max_attempts`` times already do not count.
        """
        rows = self._all(
            "SELECT i.issue_key FROM issue_sends i WHERE EXISTS (SELECT 1 FROM deliveries d"
            " INDEXED BY deliveries_state WHERE d.issue_key = i.issue_key"
            " AND d.state = 'deferred' AND d.attempts < ?"
            " AND ((d.retry_at IS NOT NULL AND d.retry_at <= ?)"
            " OR (d.retry_at IS NULL AND d.updated_at <= ?))) ORDER BY i.issue_key",
            (max_attempts or 2**62, _iso(now), _iso(parked_before)),
        )
        return [row[0] for row in rows]

    def sent_since(self, moment: datetime) -> int:
        """Messages the ledger records as sent at or after ``moment`` (warm-up caps)."""
        row = self._one(
            "SELECT count(*) FROM deliveries WHERE state = 'sent' AND sent_at >= ?",
            (_iso(moment),),
        )
        return int(row[0])

    def metric_counts(self) -> dict[str, list[tuple[str, ...]]]:
        """Counts for ``GET /metrics``, computed now so that every process agrees: rows
        of labels and a count, never an address or a name."""
        colon = self._conn.dialect.position("':'", "outcome || ':'")
        queries = {
            "subscribers": "SELECT status, count(*) FROM subscribers GROUP BY status",
            "ledger": "SELECT issue_key, state, count(*) FROM deliveries GROUP BY issue_key, state",
            "events": "SELECT new_status, coalesce(old_status, ''), count(*)"
            " FROM subscriber_events GROUP BY new_status, old_status",
            # outcome is "applied: …", "unmatched: …" (readers.Outcome, then the reason).
            "inbound": "SELECT source, substr(outcome, 1,"
            f" {colon} - 1),"
            " count(*) FROM processed_messages GROUP BY 1, 2",
            "bounces": "SELECT kind, count(*) FROM bounces GROUP BY kind",
            "schedules": "SELECT state, count(*) FROM schedules GROUP BY state",
        }
        return {
            name: [tuple(str(cell) for cell in row) for row in self._all(sql)]
            for name, sql in queries.items()
        }
