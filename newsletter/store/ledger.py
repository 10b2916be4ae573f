"""The delivery ledger: the send lock, the recipient snapshot, claims and results, the
runs that send, and which issues were sent and published.

On SQLite one run sends an issue at a time (a file lock). On PostgreSQL any number of
runs, on any machines, share it: each registers in ``senders`` with a lease that a
heartbeat renews, claims rows with ``FOR UPDATE SKIP LOCKED`` and owns its ``sending``
rows while the lease lasts. A run whose lease runs out is ``expired`` by the next live
sender that looks, and its ``sending`` rows become ``uncertain``, as a crashed SQLite
run's do. Lease times are on the database's clock, so the senders' clocks may differ.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..addresses import email_key
from ..db import Connection, DatabaseError, Dialect
from ..errors import DeliveryError, StoreError
from ..models import (
    PROBLEM_STATES,
    ClaimedRecipient,
    DeliveryResult,
    DeliveryState,
    IssueSnapshot,
    LedgerEntry,
    SenderRun,
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

LOG = logging.getLogger("newsletter.store.ledger")

LEASE_SECONDS = 60.0  # [delivery] lease_seconds
RATE_WINDOW = 60.0  # seconds: a sender's rate in `status` is over this last stretch
_INTERRUPTED = "'interrupted while sending (run ' || claimed_by || ')'"


def _domain_filter(domains: Sequence[str], dialect: Dialect) -> tuple[str, list[str]]:
    """SQL (on ``s.email_key``) that leaves out addresses at these domains or under them."""
    if not domains:
        return "", []
    at = dialect.position("'@'", "s.email_key")
    domain = f"substr(s.email_key, {at} + 1)"
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


@dataclass(eq=False)
class _Lease:
    """This store's run on one issue: its lease, its counts, the heartbeat that renews it."""

    issue_key: str
    run_id: str
    seconds: float
    skew: timedelta  # the database's clock minus ours: leases run on the database's clock
    found: int = 0  # rows this run marked uncertain (left by dead runs)
    claimed: int = 0
    sent: int = 0
    # (monotonic time, sent so far), over the last RATE_WINDOW seconds and one before it
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    # Set once the run knows its rows are no longer its own: another sender expired it,
    # or (monotonic ``deadline``) its last renewed lease ran out without a renewal since.
    lost: threading.Event = field(default_factory=threading.Event)
    deadline: float = math.inf

    def now(self) -> datetime:
        return datetime.now(UTC) + self.skew

    def times(self) -> tuple[str, str]:
        """Now and the end of a lease starting now, on the database's clock."""
        now = self.now()
        return _iso(now), _iso(now + timedelta(seconds=self.seconds))

    def renewed(self, started: float) -> None:
        """A renewal that began at monotonic time ``started`` committed: the lease lasts
        till ``seconds`` after it, whatever the database's clock says meanwhile."""
        self.deadline = max(self.deadline, started + self.seconds)

    def count_sent(self, sent: int) -> None:
        self.sent += sent
        moment = time.monotonic()
        self.samples.append((moment, self.sent))
        while len(self.samples) > 2 and self.samples[1][0] <= moment - RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float:
        """Messages sent per second over the last minute (since the start, if shorter)."""
        if not self.samples:
            return 0.0
        moment = time.monotonic()
        first_at, first_sent = self.samples[0]
        for at, sent in self.samples:  # the last sample at or before the window's start
            if at > moment - RATE_WINDOW:
                break
            first_at, first_sent = at, sent
        span = moment - max(first_at, moment - RATE_WINDOW)
        return (self.sent - first_sent) / span if span > 0 else 0.0


def _sender_run(row: Sequence[Any], now: datetime) -> SenderRun:
    return SenderRun(
        run_id=row[0],
        issue_key=row[1],
        host=row[2],
        pid=int(row[3]),
        state=row[4],
        started_at=_dt(row[5]),
        heartbeat_at=_dt(row[6]),
        lease_until=_dt(row[7]),
        finished_at=_opt_dt(row[8]),
        claimed=int(row[9]),
        sent=int(row[10]),
        failed=int(row[11]),
        deferred=int(row[12]),
        uncertain=int(row[13]),
        rate=float(row[14]),
        responding=row[4] == "running" and _dt(row[7]) >= now,
        heartbeat_age=max(0.0, (now - _dt(row[6])).total_seconds()),
    )


_SENDER_COLUMNS = (
    "run_id, issue_key, host, pid, state, started_at, heartbeat_at, lease_until, finished_at,"
    " claimed, sent, failed, deferred, uncertain, rate"
)


class LedgerMixin(StoreBase):
    """The delivery ledger, the runs that send, and publications."""

    def lock_path(self, issue_key: str) -> Path | None:
        """The file whose flock marks a running send of ``issue_key`` (None in memory and
        on PostgreSQL, where runs cooperate instead)."""
        if self.path is None:
            return None
        return self.path.with_name(f"{self.path.name}.send-{_lock_name(issue_key)}.lock")

    @contextlib.contextmanager
    def acquire_send_lock(
        self, issue_key: str, *, lease_seconds: float = LEASE_SECONDS
    ) -> Iterator[SendLock]:
        """Register one run sending ``issue_key``, for the duration of the block.

        SQLite: the run holds the issue's send lock; DeliveryError if another holds it.
        PostgreSQL: any number of runs share the issue; this one's claims are its own while
        its lease (``lease_seconds``, renewed every third of it by a heartbeat thread) lasts.
        On entry, rows left ``sending`` by dead runs become ``uncertain`` (counted in
        ``SendLock.uncertain``), and deferred rows parked for "the next run" become due.
        One store runs one send of an issue at a time (a second is a DeliveryError).
        """
        host, pid = socket.gethostname(), os.getpid()
        run_id = f"{host}:{pid}:{uuid.uuid4().hex[:8]}"
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
                holder = f"pid {pid} on {host}, run {run_id}\n"
                os.pwrite(fd, holder.encode(), 0)
            lease = _Lease(issue_key, run_id, lease_seconds, timedelta(0))
            self._held[issue_key] = lease
        try:
            lease.skew = self._clock_skew()
            started = time.monotonic()
            now, until = lease.times()
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO senders (run_id, issue_key, host, pid, state, started_at,"
                    " heartbeat_at, lease_until) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                    (run_id, issue_key, host, pid, now, now, until),
                )
            lease.renewed(started)
            lease.count_sent(0)
            uncertain = self.mark_crashed_as_uncertain(issue_key)
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE deliveries SET retry_at = ? WHERE issue_key = ? AND state = 'deferred'"
                    " AND retry_at IS NULL",
                    (_now(), issue_key),
                )
            lease.thread = threading.Thread(
                target=self._heartbeat, args=(lease,), name=f"lease-{run_id}", daemon=True
            )
            lease.thread.start()
            yield SendLock(issue_key, run_id, uncertain)
        finally:
            lease.stop.set()
            if lease.thread is not None:
                lease.thread.join()
            with contextlib.suppress(StoreError, DatabaseError):
                now, _ = lease.times()
                with self._transaction() as conn:
                    conn.execute(
                        "UPDATE senders SET state = 'finished', finished_at = ?, heartbeat_at = ?,"
                        " rate = ?, claimed = ? WHERE run_id = ? AND state = 'running'",
                        (now, now, lease.rate(), lease.claimed, run_id),
                    )
            with self._lock:
                self._held.pop(issue_key, None)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                    os.close(fd)  # releases the flock

    def _clock_skew(self) -> timedelta:
        """How far the database's clock is ahead of ours (PostgreSQL; 0 on SQLite, which
        runs on this machine's clock)."""
        if not self.is_postgres:
            return timedelta(0)
        with self._reading() as conn:
            before = datetime.now(UTC)
            server: datetime = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            after = datetime.now(UTC)
        return server - (before + (after - before) / 2)

    def _database_now(self) -> datetime:
        return datetime.now(UTC) + self._clock_skew()

    def _heartbeat(self, lease: _Lease) -> None:
        """Renew ``lease`` every third of its length until the run ends or loses it.

        A thread, not the send loop, so that waits the loop cannot cut short (a server
        that takes its 30 s timeout, a retry's backoff, a slow snapshot) do not cost the
        lease; claims renew it too, and fail once it is lost.
        """
        while not lease.stop.wait(lease.seconds / 3):
            try:
                started = time.monotonic()
                with self._transaction(exclusive=not self.is_postgres) as conn:
                    self._relaxed_commit(conn)
                    if not self._renew(conn, lease):
                        LOG.warning(
                            "run %s lost its lease on issue %s", lease.run_id, lease.issue_key
                        )
                        return
                lease.renewed(started)
            except (StoreError, DatabaseError) as exc:
                LOG.warning("run %s could not renew its lease: %s", lease.run_id, exc)

    def _relaxed_commit(self, conn: Connection) -> None:
        """PostgreSQL: this transaction's commit need not wait for the disk, as SQLite's
        results are committed with synchronous=NORMAL. Losing it to a crash of the server
        only leaves rows `sending`, which become uncertain: never sent twice. Claims keep
        the full wait (a lost claim would make a sent row `queued` again)."""
        if self.is_postgres:
            conn.execute("SET LOCAL synchronous_commit TO OFF")

    def _renew(self, conn: Connection, lease: _Lease, *, claimed: int = 0) -> bool:
        """Extend the run's lease (and lock its row till commit), counting ``claimed`` more
        rows; False if the run lost it."""
        now, until = lease.times()
        held = (
            conn.execute(
                "UPDATE senders SET heartbeat_at = ?, lease_until = ?, rate = ?, claimed = ?"
                " WHERE run_id = ? AND state = 'running'",
                (now, until, lease.rate(), lease.claimed + claimed, lease.run_id),
            ).rowcount
            == 1
        )
        if not held:
            lease.lost.set()
        return held

    def lease_lost(self, issue_key: str) -> bool:
        """Whether this store's run on ``issue_key`` may no longer send the rows it
        claimed, because another sender expired it (PostgreSQL; on SQLite the send lock
        is the lease). No query while the lease lasts; once it ran out unrenewed (the
        database slow or out of reach), one renewal decides, and a StoreError if the
        database cannot answer: the rows may be another sender's any moment."""
        lease: _Lease | None = self._held.get(issue_key)
        if lease is None or not self.is_postgres:
            return False
        if lease.lost.is_set() or time.monotonic() <= lease.deadline:
            return lease.lost.is_set()
        started = time.monotonic()
        with self._transaction(exclusive=False) as conn:
            held = self._renew(conn, lease)
        if held:
            lease.renewed(started)
        return not held

    def _expire_runs(self, conn: Connection, issue_key: str, now: str) -> int:
        """Runs of ``issue_key`` whose lease ran out become ``expired``, and their
        ``sending`` rows ``uncertain``; returns how many rows."""
        expired = [
            row[0]
            for row in conn.execute(
                "UPDATE senders SET state = 'expired', finished_at = ?"
                " WHERE issue_key = ? AND state = 'running' AND lease_until < ? RETURNING run_id",
                (now, issue_key, now),
            ).fetchall()
        ]
        if not expired:
            return 0
        LOG.info("runs %s of issue %s stopped renewing their lease", expired, issue_key)
        marks = ", ".join("?" * len(expired))
        return conn.execute(
            "UPDATE deliveries SET state = 'uncertain', updated_at = ?,"
            f" last_reply = {_INTERRUPTED} WHERE issue_key = ? AND state = 'sending'"
            f" AND claimed_by IN ({marks})",
            (now, issue_key, *expired),
        ).rowcount

    def _expire_dead_senders(self, lease: _Lease) -> None:
        """Before a claim (PostgreSQL): expire runs whose lease ran out, if there are any
        (one small read when there are none)."""
        now = _iso(lease.now())
        if not self._one(
            "SELECT 1 FROM senders WHERE issue_key = ? AND state = 'running'"
            " AND lease_until < ? LIMIT 1",
            (lease.issue_key, now),
        ):
            return
        with self._transaction(exclusive=False) as conn:
            lease.found += self._expire_runs(conn, lease.issue_key, now)

    def mark_crashed_as_uncertain(self, issue_key: str) -> int:
        """Rows left ``sending`` by dead runs become ``uncertain``; call only while holding
        the send lock.

        SQLite: with the lock held no other run is alive on this issue, so every
        ``sending`` row was claimed by a run that died before recording the result.
        PostgreSQL: runs whose lease ran out are dead; so are claims of no running run.
        """
        lease = self._held.get(issue_key)
        if lease is None:
            raise RuntimeError(f"mark_crashed_as_uncertain({issue_key!r}) needs the send lock")
        now = _iso(lease.now())
        with self._transaction() as conn:
            if not self.is_postgres:
                conn.execute(
                    "UPDATE senders SET state = 'expired', finished_at = ?"
                    " WHERE issue_key = ? AND state = 'running' AND run_id <> ?",
                    (now, issue_key, lease.run_id),
                )
                found = conn.execute(
                    f"UPDATE deliveries SET state = 'uncertain', updated_at = ?,"
                    f" last_reply = {_INTERRUPTED} WHERE issue_key = ? AND state = 'sending'",
                    (now, issue_key),
                ).rowcount
            else:
                found = self._expire_runs(conn, issue_key, now)
                found += conn.execute(
                    f"UPDATE deliveries SET state = 'uncertain', updated_at = ?,"
                    f" last_reply = {_INTERRUPTED} WHERE issue_key = ? AND state = 'sending'"
                    " AND claimed_by NOT IN (SELECT run_id FROM senders"
                    "   WHERE issue_key = ? AND state = 'running')",
                    (now, issue_key, issue_key),
                ).rowcount
        lease.found += found
        return found

    def found_uncertain(self, issue_key: str) -> int:
        """Rows this store's run on ``issue_key`` found left by dead runs and marked
        uncertain, at its start and (PostgreSQL) since."""
        lease = self._held.get(issue_key)
        return 0 if lease is None else int(lease.found)

    def rows_in_flight(self, issue_key: str, *, besides: str = "") -> int:
        """Rows of ``issue_key`` that running senders (other than run ``besides``) have
        claimed and not yet recorded. A dead run's count as its until its lease runs out
        and a live sender expires it."""
        row = self._one(
            "SELECT count(*) FROM deliveries INDEXED BY deliveries_state"
            " WHERE issue_key = ? AND state = 'sending' AND claimed_by <> ?"
            " AND claimed_by IN (SELECT run_id FROM senders"
            "   WHERE issue_key = ? AND state = 'running')",
            (issue_key, besides, issue_key),
        )
        return int(row[0])

    def senders(self, issue_key: str, *, finished: bool = False) -> list[SenderRun]:
        """The runs sending ``issue_key`` now (with ``finished``: every run it had), oldest
        first. A run that stopped renewing its lease is listed as not responding."""
        now = self._database_now()
        where = "" if finished else " AND state = 'running'"
        rows = self._all(
            f"SELECT {_SENDER_COLUMNS} FROM senders WHERE issue_key = ?{where}"
            " ORDER BY started_at, run_id",
            (issue_key,),
        )
        return [_sender_run(row, now) for row in rows]

    def pacing_share(self) -> int:
        """How many senders share the configured rates (``[delivery] rate``, domain pacing)
        now: on PostgreSQL, the runs alive on the database, whatever their issue, as they
        send from one newsletter's reputation; on SQLite 1, as each run paced alone
        before several senders existed."""
        if not self.is_postgres:
            return 1
        row = self._one(
            "SELECT count(*) FROM senders WHERE state = 'running' AND lease_until >= ?",
            (_iso(self._database_now()),),
        )
        return max(1, int(row[0]))

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
        self,
        issue_key: str,
        worker_id: str,
        n: int,
        *,
        skip_domains: Sequence[str] = (),
        cap: tuple[int, datetime] | None = None,
    ) -> list[ClaimedRecipient]:
        """Move up to ``n`` due rows (queued, then deferred whose retry time has come) to
        ``sending``, durably committed before returning; send only what this returns.

        Rows whose subscriber is no longer active become ``cancelled`` instead, so an
        unsubscribe during a send is honoured for everyone not yet claimed. An empty
        list means nothing is due now (see :meth:`next_retry_at`). Rows of recipients at
        ``skip_domains`` (or under them) are left for later (a domain's pacing).

        With ``worker_id`` the run id of this store's send lock, the claim renews the
        run's lease (DeliveryError if the run lost it: its rows are someone else's now),
        and on PostgreSQL first expires the runs whose lease ran out. Rows another run
        holds are skipped, never waited for (``FOR UPDATE SKIP LOCKED``).

        ``cap`` (a number and a moment: the warm-up plan's day) claims no more than leaves
        that many messages sent or being sent since then, by every run of every issue; such
        claims take the writer lock, so that senders sharing the cap count in turn.
        """
        if n <= 0:
            return []
        lease = self._held.get(issue_key)
        if lease is not None and lease.run_id != worker_id:
            lease = None  # a claim outside the run (tests, tools): no lease to renew
        if lease is not None and self.is_postgres:
            self._expire_dead_senders(lease)
        now = _now()
        skip_sql, skip_params = _domain_filter(skip_domains, self._conn.dialect)
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
        # PostgreSQL: rows another sender's claim holds are passed over, and a row that
        # claim took is seen as it now is (no longer queued). SQLite has one writer.
        locking = " FOR UPDATE OF d SKIP LOCKED" if self.is_postgres else ""
        claimed: list[ClaimedRecipient] = []
        started = time.monotonic()
        # On PostgreSQL the claim needs no table-wide writer lock: its rows' locks suffice.
        exclusive = cap is not None or not self.is_postgres
        with self._transaction(durable=self.durable_claims, exclusive=exclusive) as conn:
            if cap is not None:
                n = min(n, cap[0] - self._sent_or_sending(conn, cap[1]))
            while len(claimed) < n:
                want = n - len(claimed)
                # PostgreSQL: a row a claim took off 'queued' leaves a dead entry in the
                # state index until VACUUM, and while other senders' transactions are
                # open the scan cannot skip them cheaply: from the start of the queue each
                # claim would walk every row claimed so far. So the scan starts after the
                # last row this store reached; only when too few are there does it look
                # below (rows passed over while another claim held them), so nobody is
                # left behind. The two ranges are disjoint: no row is read twice.
                # A claim that skips paced domains leaves their rows behind it: the next
                # one starts from the beginning again.
                if skip_domains:
                    self._claim_from.pop(issue_key, None)
                cursor = self._claim_from.get(issue_key, 0) if self.is_postgres else 0
                rows = conn.execute(
                    f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'queued'"
                    f" AND d.subscriber_id > ?{skip_sql} ORDER BY d.subscriber_id LIMIT ?"
                    f"{locking}",
                    (PAUSED, issue_key, cursor, *skip_params, want),
                ).fetchall()
                if rows and self.is_postgres and not skip_domains:
                    self._claim_from[issue_key] = max(cursor, rows[-1][1])
                if len(rows) < want and cursor:
                    rows += conn.execute(
                        f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'queued'"
                        f" AND d.subscriber_id <= ?{skip_sql} ORDER BY d.subscriber_id LIMIT ?"
                        f"{locking}",
                        (PAUSED, issue_key, cursor, *skip_params, want - len(rows)),
                    ).fetchall()
                if len(rows) < want:
                    rows += conn.execute(
                        f"SELECT {columns} {joined} WHERE d.issue_key = ? AND d.state = 'deferred'"
                        f" AND d.retry_at <= ?{skip_sql} ORDER BY d.subscriber_id LIMIT ?"
                        f"{locking}",
                        (PAUSED, issue_key, now, *skip_params, want - len(rows)),
                    ).fetchall()
                if not rows:
                    break
                active = [r for r in rows if r[5] == Status.ACTIVE and not r[-1]]
                gone = [r for r in rows if r[5] != Status.ACTIVE or r[-1]]
                if active:  # one statement for the batch: one round trip on PostgreSQL
                    conn.execute(
                        "UPDATE deliveries SET state = 'sending', attempts = attempts + 1,"
                        " claimed_by = ?, updated_at = ? WHERE issue_key = ? AND subscriber_id"
                        f" IN ({', '.join('?' * len(active))})",
                        (worker_id, now, issue_key, *(r[1] for r in active)),
                    )
                if gone:
                    conn.executemany(
                        "UPDATE deliveries SET state = 'cancelled', retry_at = NULL,"
                        " updated_at = ?, last_reply = ? WHERE issue_key = ? AND subscriber_id = ?",
                        [(now, _not_sent(r[5], bool(r[-1])), issue_key, r[1]) for r in gone],
                    )
                claimed.extend(
                    ClaimedRecipient(issue_key, _subscriber(r[1:-1]), r[0] + 1) for r in active
                )
            # The lease is renewed in the claim's own transaction: the rows are claimed only
            # if the run still holds it. (Renewing last cannot deadlock with a sender that
            # expires this run: that one waits for no row this claim is taking.)
            if lease is not None and not self._renew(conn, lease, claimed=len(claimed)):
                raise DeliveryError(
                    f"this send of issue {issue_key} (run {lease.run_id}) lost its lease:"
                    " another sender took its unrecorded rows as uncertain",
                    where=self._where,
                    hint="the database was out of reach longer than [delivery] lease_seconds;"
                    " send again to carry on (see `newsletter status`)",
                )
        if lease is not None:
            lease.claimed += len(claimed)
            lease.renewed(started)
        return claimed

    @staticmethod
    def _sent_or_sending(conn: Connection, since: datetime) -> int:
        return int(
            conn.execute(
                "SELECT count(*) FROM deliveries WHERE state = 'sending'"
                " OR (state = 'sent' AND sent_at >= ?)",
                (_iso(since),),
            ).fetchone()[0]
        )

    def sent_or_sending_since(self, moment: datetime) -> int:
        """Messages sent at or after ``moment`` or being sent now, by every run (what a
        warm-up cap counts while several senders share it)."""
        with self._reading() as conn:
            return self._sent_or_sending(conn, moment)

    def record_results(
        self, results: Iterable[DeliveryResult], *, run_id: str | None = None
    ) -> int:
        """Record outcomes of claimed rows in one transaction; returns rows updated.

        Only rows in ``sending`` change (claimed by run ``run_id``, when given), so a
        result recorded twice is a no-op, and so is a result of a run whose lease ran out
        (its rows are ``uncertain`` by then, or claimed again by another run). A FAILED
        result with ``bounce`` also marks an active subscriber bounced (with the reply).
        With ``run_id`` the run of this store's send lock, its counts and lease move on.
        """
        now = _now()
        groups: dict[DeliveryState, list[tuple[Any, ...]]] = {}
        bounces = []
        for result in results:
            sent = result.state == DeliveryState.SENT
            retry = (
                _iso(result.retry_at)
                if result.state == DeliveryState.DEFERRED and result.retry_at is not None
                else None
            )
            row: tuple[Any, ...] = (
                result.state.value,
                result.reply,
                result.message_id,
                retry,
                now,
                now if sent else None,
                result.issue_key,
                result.subscriber_id,
            )
            groups.setdefault(result.state, []).append(row if run_id is None else (*row, run_id))
            if result.bounce and result.state == DeliveryState.FAILED:
                bounces.append(result)
        if not groups:
            return 0
        lease = next((x for x in self._held.values() if x.run_id == run_id), None)
        sql = (
            "UPDATE deliveries SET state = ?, last_reply = ?,"
            " message_id = coalesce(nullif(?, ''), message_id), retry_at = ?,"
            " updated_at = ?, sent_at = coalesce(?, sent_at)"
            " WHERE issue_key = ? AND subscriber_id = ? AND state = 'sending'"
            + ("" if run_id is None else " AND claimed_by = ?")
        )
        # Status changes read then write: with bounces, the writer lock (as every status
        # change takes); otherwise, on PostgreSQL, row locks suffice.
        started = time.monotonic()
        with self._transaction(exclusive=bool(bounces) or not self.is_postgres) as conn:
            self._relaxed_commit(conn)
            # The run's row first: an expiring sender locks it before the run's rows too.
            renewed = lease is not None and self._renew(conn, lease)
            counts = {state: conn.executemany(sql, rows) for state, rows in groups.items()}
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
            if renewed and lease is not None:
                lease.count_sent(counts.get(DeliveryState.SENT, 0))
                conn.execute(
                    "UPDATE senders SET sent = sent + ?, failed = failed + ?,"
                    " deferred = deferred + ?, uncertain = uncertain + ?, rate = ?"
                    " WHERE run_id = ?",
                    (
                        *(
                            counts.get(state, 0)
                            for state in (
                                DeliveryState.SENT,
                                DeliveryState.FAILED,
                                DeliveryState.DEFERRED,
                                DeliveryState.UNCERTAIN,
                            )
                        ),
                        lease.rate(),
                        lease.run_id,
                    ),
                )
        if renewed and lease is not None:
            lease.renewed(started)
        return sum(counts.values())

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
