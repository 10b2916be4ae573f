"""The delivery ledger: the send lock, the recipient snapshot, claims and results, and
which issues were sent and published.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

from ..addresses import email_key
from ..errors import DeliveryError
from ..models import (
    PROBLEM_STATES,
    ClaimedRecipient,
    DeliveryResult,
    DeliveryState,
    IssueSnapshot,
    LedgerEntry,
    SendLock,
    Status,
)
from ..segments import PAUSED, Segment
from .base import (
    _SUBSCRIBER_COLUMNS,
    StoreBase,
    _dt,
    _iso,
    _now,
    _opt_dt,
    _recipient_filter,
    _subscriber,
)


def _domain_filter(domains: Sequence[str]) -> tuple[str, list[str]]:
    """SQL (on ``s.email_key``) that leaves out addresses at these domains or under them."""
    if not domains:
        return "", []
    domain = "substr(s.email_key, instr(s.email_key, '@') + 1)"
    params: list[str] = []
    tests = []
    for name in domains:
        escaped = name.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        tests.append(f"{domain} = ? OR {domain} LIKE ? ESCAPE '\\'")
        params += [name.lower(), f"%.{escaped}"]
    return f" AND NOT ({' OR '.join(tests)})", params


def _not_sent(status: str, paused: bool) -> str:
    """The ledger's reply for a row a send cancels: the reader left, or paused."""
    return f"not sent: subscriber is {PAUSED if paused and status == 'active' else status}"


def _lock_name(issue_key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", issue_key):
        return issue_key
    return hashlib.sha256(issue_key.encode()).hexdigest()[:16]


class LedgerMixin(StoreBase):
    """The delivery ledger and publications."""

    def lock_path(self, issue_key: str) -> Path | None:
        """The file whose flock marks a running send of ``issue_key`` (None in memory)."""
        if self.path is None:
            return None
        return self.path.with_name(f"{self.path.name}.send-{_lock_name(issue_key)}.lock")

    @contextlib.contextmanager
    def acquire_send_lock(self, issue_key: str) -> Iterator[SendLock]:
        """Hold the send lock of ``issue_key`` for one run; DeliveryError if another holds it.

        On entry, rows left ``sending`` by a dead run become ``uncertain`` (counted in
        ``SendLock.uncertain``), and deferred rows parked for "the next run" become due.
        """
        run_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        lock_path = self.lock_path(issue_key)
        fd: int | None = None
        busy = f"another send of issue {issue_key} is running"
        hint = "wait for it to finish or stop it (a stopped send releases the lock at once)"
        with self._lock:
            if issue_key in self._held:
                raise DeliveryError(f"{busy} (in this process)", where=self._where, hint=hint)
            if lock_path is not None:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    detail = f" ({holder})" if holder else ""
                    raise DeliveryError(f"{busy}{detail}", where=self._where, hint=hint) from None
                except BaseException:
                    os.close(fd)
                    raise
                os.ftruncate(fd, 0)
                holder = f"pid {os.getpid()} on {socket.gethostname()}, run {run_id}\n"
                os.pwrite(fd, holder.encode(), 0)
            self._held[issue_key] = run_id
        try:
            uncertain = self.mark_crashed_as_uncertain(issue_key)
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE deliveries SET retry_at = ? WHERE issue_key = ? AND state = 'deferred'"
                    " AND retry_at IS NULL",
                    (_now(), issue_key),
                )
            yield SendLock(issue_key, run_id, uncertain)
        finally:
            with self._lock:
                self._held.pop(issue_key, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                    os.close(fd)  # releases the flock

    def mark_crashed_as_uncertain(self, issue_key: str) -> int:
        """Rows left ``sending`` become ``uncertain``; call only while holding the send lock.

        With the lock held no other run is alive on this issue, so every ``sending`` row
        was claimed by a run that died before recording the result.
        """
        if issue_key not in self._held:
            raise RuntimeError(f"mark_crashed_as_uncertain({issue_key!r}) needs the send lock")
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET state = 'uncertain', updated_at = ?,"
                " last_reply = 'interrupted while sending (run ' || claimed_by || ')'"
                " WHERE issue_key = ? AND state = 'sending'",
                (_now(), issue_key),
            ).rowcount

    def snapshot_recipients(
        self, issue_key: str, *, include_new: bool = False, segment: Segment | None = None
    ) -> int:
        """Fix the recipients of ``issue_key``; returns how many ledger rows were added.

        The first call queues every active subscriber who has not paused (and, with a
        ``segment``, is in it), and records the time and the segment. Later calls add
        nobody, unless ``include_new``: then such subscribers without a row are queued,
        within the same segment. A segment other than the recorded one is a DeliveryError
        naming it. With nobody to send to, the first call records nothing.
        """
        now = _now()
        where, params = _recipient_filter(segment, self._conn.dialect)
        with self._transaction() as conn:
            known = conn.execute(
                "SELECT segment FROM issue_sends WHERE issue_key = ?", (issue_key,)
            ).fetchone()
            if known is not None:
                self._check_segment(issue_key, known[0], segment)
                if not include_new:
                    return 0
            else:
                if not conn.execute(
                    f"SELECT 1 FROM subscribers s WHERE {where} LIMIT 1", params
                ).fetchone():
                    return 0
                conn.execute(
                    "INSERT INTO issue_sends (issue_key, snapshot_at, segment, segment_filter)"
                    " VALUES (?, ?, ?, ?)",
                    (
                        issue_key,
                        now,
                        "" if segment is None else segment.name,
                        "" if segment is None else segment.expression,
                    ),
                )
            return conn.execute(
                "INSERT INTO deliveries (issue_key, subscriber_id, state, updated_at)"
                f" SELECT ?, s.id, 'queued', ? FROM subscribers s WHERE {where}"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d"
                "   WHERE d.issue_key = ? AND d.subscriber_id = s.id)"
                " ORDER BY s.id",
                (issue_key, now, *params, issue_key),
            ).rowcount

    def _check_segment(self, issue_key: str, recorded: str, segment: Segment | None) -> None:
        given = "" if segment is None else segment.name
        if given == recorded:
            return
        first = f"segment {recorded}" if recorded else "every active subscriber (no segment)"
        raise DeliveryError(
            f"issue {issue_key} went to {first} at its first send;"
            f" {'segment ' + given if given else 'a send without a segment'} cannot change that",
            where=self._where,
            hint=f"send it with --segment {recorded}"
            if recorded
            else "send it without --segment (and no segment: in issue.md)",
        )

    def issue_segment(self, issue_key: str) -> str | None:
        """The segment ``issue_key`` went to ("" for everyone), or None if never sent."""
        row = self._one("SELECT segment FROM issue_sends WHERE issue_key = ?", (issue_key,))
        return None if row is None else str(row[0])

    def check_issue_segment(self, issue_key: str, segment: Segment | None) -> None:
        """DeliveryError when ``issue_key`` was first sent to another segment than this."""
        recorded = self.issue_segment(issue_key)
        if recorded is not None:
            self._check_segment(issue_key, recorded, segment)

    def issue_snapshot(self, issue_key: str) -> IssueSnapshot | None:
        """When the recipients of ``issue_key`` were fixed, or None if never sent."""
        row = self._one(
            "SELECT i.issue_key, i.snapshot_at,"
            " (SELECT count(*) FROM deliveries d WHERE d.issue_key = i.issue_key)"
            " FROM issue_sends i WHERE i.issue_key = ?",
            (issue_key,),
        )
        return None if row is None else IssueSnapshot(row[0], _dt(row[1]), row[2])

    def issues_with_deliveries(self) -> list[IssueSnapshot]:
        """Every issue with a ledger, oldest snapshot first."""
        rows = self._all(
            "SELECT i.issue_key, i.snapshot_at,"
            " (SELECT count(*) FROM deliveries d WHERE d.issue_key = i.issue_key)"
            " FROM issue_sends i ORDER BY i.snapshot_at, i.issue_key"
        )
        return [IssueSnapshot(r[0], _dt(r[1]), r[2]) for r in rows]

    def claim_batch(
        self, issue_key: str, worker_id: str, n: int, *, skip_domains: Sequence[str] = ()
    ) -> list[ClaimedRecipient]:
        """Move up to ``n`` due rows (queued, then deferred whose retry time has come) to
        ``sending``, durably committed before returning; send only what this returns.

        Rows whose subscriber is no longer active become ``cancelled`` instead, so an
        unsubscribe during a send is honoured for everyone not yet claimed. An empty
        list means nothing is due now (see :meth:`next_retry_at`). Rows of recipients at
        ``skip_domains`` (or under them) are left for later (a domain's pacing).
        """
        if n <= 0:
            return []
        now = _now()
        skip_sql, skip_params = _domain_filter(skip_domains)
        # The last column: whether the reader paused (a `paused` tag) since the snapshot.
        columns = (
            f"d.attempts, {_SUBSCRIBER_COLUMNS}, EXISTS (SELECT 1 FROM subscriber_tags t"
            " WHERE t.subscriber_id = s.id AND t.tag = ?)"
        )
        # The planner, without statistics, would walk the primary key (every row of the
        # issue) to get subscriber_id order; the state index gives it too, per state.
        joined = (
            "FROM deliveries d INDEXED BY deliveries_state"
            " JOIN subscribers s ON s.id = d.subscriber_id"
        )
        claimed: list[ClaimedRecipient] = []
        with self._transaction(durable=self.durable_claims) as conn:
            while len(claimed) < n:
                want = n - len(claimed)
                rows = conn.execute(
                    f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'queued'"
                    f"{skip_sql} ORDER BY d.subscriber_id LIMIT ?",
                    (PAUSED, issue_key, *skip_params, want),
                ).fetchall()
                if len(rows) < want:
                    rows += conn.execute(
                        f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'deferred'"
                        f" AND d.retry_at <= ?{skip_sql} ORDER BY d.subscriber_id LIMIT ?",
                        (PAUSED, issue_key, now, *skip_params, want - len(rows)),
                    ).fetchall()
                if not rows:
                    break
                active = [r for r in rows if r[5] == Status.ACTIVE and not r[-1]]
                gone = [r for r in rows if r[5] != Status.ACTIVE or r[-1]]
                conn.executemany(
                    "UPDATE deliveries SET state = 'sending', attempts = attempts + 1,"
                    " claimed_by = ?, updated_at = ? WHERE issue_key = ? AND subscriber_id = ?",
                    [(worker_id, now, issue_key, r[1]) for r in active],
                )
                conn.executemany(
                    "UPDATE deliveries SET state = 'cancelled', retry_at = NULL, updated_at = ?,"
                    " last_reply = ? WHERE issue_key = ? AND subscriber_id = ?",
                    [(now, _not_sent(r[5], bool(r[-1])), issue_key, r[1]) for r in gone],
                )
                claimed.extend(
                    ClaimedRecipient(issue_key, _subscriber(r[1:-1]), r[0] + 1) for r in active
                )
        return claimed

    def record_results(self, results: Iterable[DeliveryResult]) -> int:
        """Record outcomes of claimed rows in one transaction; returns rows updated.

        Only rows in ``sending`` change, so a result recorded twice is a no-op. A FAILED
        result with ``bounce`` also marks an active subscriber bounced (with the reply).
        """
        now = _now()
        params = []
        bounces = []
        for result in results:
            sent = result.state == DeliveryState.SENT
            retry = (
                _iso(result.retry_at)
                if result.state == DeliveryState.DEFERRED and result.retry_at is not None
                else None
            )
            params.append(
                (
                    result.state.value,
                    result.reply,
                    result.message_id,
                    retry,
                    now,
                    now if sent else None,
                    result.issue_key,
                    result.subscriber_id,
                )
            )
            if result.bounce and result.state == DeliveryState.FAILED:
                bounces.append(result)
        if not params:
            return 0
        with self._transaction() as conn:
            updated = conn.executemany(
                "UPDATE deliveries SET state = ?, last_reply = ?,"
                " message_id = coalesce(nullif(?, ''), message_id), retry_at = ?,"
                " updated_at = ?, sent_at = coalesce(?, sent_at)"
                " WHERE issue_key = ? AND subscriber_id = ? AND state = 'sending'",
                params,
            )
            for result in bounces:
                self._change_status(
                    conn,
                    result.subscriber_id,
                    Status.BOUNCED,
                    "smtp-5xx",
                    f"issue {result.issue_key}: {result.reply}",
                    now,
                    only_from=(Status.ACTIVE, Status.PENDING),
                )
        return updated

    def next_retry_at(self, issue_key: str) -> datetime | None:
        """When the earliest deferred row of this run becomes due, or None."""
        row = self._one(
            "SELECT min(retry_at) FROM deliveries INDEXED BY deliveries_state"
            " WHERE issue_key = ? AND state = 'deferred'",
            (issue_key,),
        )
        return _opt_dt(row[0])

    def resend_uncertain(self, issue_key: str) -> int:
        """Queue ``uncertain`` rows again (the user accepts possible duplicates)."""
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET state = 'queued', updated_at = ?"
                " WHERE issue_key = ? AND state = 'uncertain'",
                (_now(), issue_key),
            ).rowcount

    def ledger_counts(self, issue_key: str) -> dict[DeliveryState, int]:
        """Rows per state for ``issue_key``, every state present (zero when none)."""
        counts = dict.fromkeys(DeliveryState, 0)
        for state, number in self._all(
            "SELECT state, count(*) FROM deliveries WHERE issue_key = ? GROUP BY state",
            (issue_key,),
        ):
            counts[DeliveryState(state)] = number
        return counts

    def count_new_subscribers(self, issue_key: str, segment: Segment | None = None) -> int:
        """Recipients (active, not paused, in ``segment``) with no ledger row for
        ``issue_key``: all of them before its first send; afterwards, those a send adds
        only with ``include_new``."""
        where, params = _recipient_filter(segment, self._conn.dialect)
        row = self._one(
            f"SELECT count(*) FROM subscribers s WHERE {where} AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.issue_key = ? AND d.subscriber_id = s.id)",
            (*params, issue_key),
        )
        return int(row[0])

    def ledger_problems(self, issue_key: str, limit: int | None = None) -> list[LedgerEntry]:
        """Failed, uncertain and deferred rows with address and server reply."""
        states = ", ".join(f"'{s.value}'" for s in PROBLEM_STATES)
        return self._entries(
            f"d.issue_key = ? AND d.state IN ({states}) ORDER BY d.state, s.email_key"
            + ("" if limit is None else f" LIMIT {int(limit)}"),
            (issue_key,),
        )

    def ledger_entry(self, issue_key: str, email_or_id: str | int) -> LedgerEntry | None:
        """The ledger row of one subscriber for ``issue_key``, or None."""
        param: str | int
        if isinstance(email_or_id, int):
            where, param = "d.subscriber_id = ?", email_or_id
        else:
            where, param = "s.email_key = ?", email_key(email_or_id)
        entries = self._entries(f"d.issue_key = ? AND {where}", (issue_key, param))
        return entries[0] if entries else None

    def sent_issue_keys(self) -> list[str]:
        """Issues that at least one subscriber was sent, oldest snapshot first (the archive)."""
        rows = self._all(
            "SELECT i.issue_key FROM issue_sends i WHERE EXISTS (SELECT 1 FROM deliveries d"
            " INDEXED BY deliveries_state WHERE d.issue_key = i.issue_key AND d.state = 'sent')"
            " ORDER BY i.snapshot_at, i.issue_key"
        )
        return [row[0] for row in rows]

    # -- publications ----------------------------------------------------------------------

    def set_publication(self, issue_key: str, state: str) -> None:
        """Record whether an issue's page is on the web: ``published`` (and listed),
        ``unlisted`` (answers at its address, for proofs) or ``withdrawn``."""
        if state not in ("published", "unlisted", "withdrawn"):
            raise ValueError(f"unknown publication state {state!r}")
        now = _now()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO publications (issue_key, state, published_at, changed_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (issue_key) DO UPDATE"
                " SET state = excluded.state, changed_at = excluded.changed_at",
                (issue_key, state, now, now),
            )

    def publication_states(self) -> dict[str, str]:
        """issue_key -> 'published', 'unlisted' or 'withdrawn', for every issue ever published."""
        return dict(self._all("SELECT issue_key, state FROM publications"))
