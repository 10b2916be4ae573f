"""``newsletter worker``: what happens without anyone at a keyboard.

One plain loop (a scheduler library would add a second copy of the schedule; the database
already is the schedule, shared with the CLI): each pass

* registers ``send_at`` times written in issue.md (checked as ``schedule`` does),
* sends the issues whose time has come, through :func:`delivery.prepare_send` like ``send``,
  after the same checks (failing them: not sent, the schedule says why),
* retries deferred recipients once their backoff is over,
* reads the inbound mailbox every ``[worker] inbox_interval_minutes`` (when configured),
* prunes sign-ups nobody confirmed in time,

then sleeps until the next schedule is due or ``poll_seconds`` pass. One worker per
database: a second one is refused (an OS lock the kernel drops when its process dies).
A stop request (SIGTERM) lets the messages in flight finish and be recorded, as ``send``
does; after a kill -9 the next worker resumes from the ledger, as a resumed ``send`` does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import content, delivery, publish
from .config import Config
from .content import Issue
from .errors import DeliveryError, NewsletterError
from .models import DeliveryState, ScheduleState
from .pacing import start_of_day
from .progress import ProgressLines
from .render import RenderedIssue, render_issue
from .schedule import parse_when, preflight, schedule_issue
from .segments import require_segment
from .store import Store

LOG = logging.getLogger("newsletter.worker")
Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Job:
    """One thing a pass did: ``kind`` is send, retry, register, inbox or prune."""

    kind: str
    ok: bool
    detail: str
    issue_key: str = ""


@dataclass(frozen=True)
class PassReport:
    """What one pass did; ``ok`` is False when any job failed (the exit status of --once)."""

    jobs: tuple[Job, ...] = ()

    @property
    def ok(self) -> bool:
        return all(job.ok for job in self.jobs)


def read_inbox(config: Config, store: Store) -> str:
    """Read the inbound mailbox once (bounces, complaints, mailto unsubscribes, each acted
    on only when it refers to a message we sent); returns a line for the log."""
    from . import mailboxes

    summary = mailboxes.fetch_imap(store, config)
    return (
        f"{summary.messages} messages: {summary.marked_bounced} marked bounced, "
        f"{summary.marked_complained} complained, {summary.unsubscribed} unsubscribed, "
        f"{len(summary.unreadable)} unreadable"
    )


def inbox_configured(config: Config) -> bool:
    return bool(config.bounces.imap_host) and config.worker.inbox_interval_minutes > 0


def lock_path(store: Store) -> Path | None:
    return None if store.path is None else store.path.with_name(f"{store.path.name}.worker.lock")


@contextlib.contextmanager
def worker_lock(store: Store) -> Iterator[None]:
    """Hold the database's worker lock; DeliveryError when another worker holds it."""
    path = lock_path(store)
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise DeliveryError(
                "another worker is running on this database" + (f" ({holder})" if holder else ""),
                where=str(store.path),
                hint="one worker per database: stop the other one first",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


@dataclass
class _Timers:
    """When the periodic jobs last ran (monotonic clock is not needed: minutes apart)."""

    inbox: dt.datetime | None = None
    prune: dt.datetime | None = None
    seen: dict[Path, tuple[float, str]] = field(default_factory=dict)  # issue.md -> (mtime, at)


class Worker:
    """The worker's passes over one workspace and its database.

    ``clock`` gives "now" (tests move it); ``stop`` ends the loop and any send in
    progress, after its messages in flight; ``outbound`` replaces the configured
    transport (tests).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        stop: threading.Event | None = None,
        clock: Clock = utc_now,
        outbound: delivery.Outbound | None = None,
        progress_line: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.stop = stop or threading.Event()
        self.clock = clock
        self.outbound = outbound
        self.progress_line = progress_line or (lambda line: LOG.info("%s", line))
        self.timers = _Timers()

    # -- the loop ------------------------------------------------------------------------

    def run_forever(self) -> PassReport:
        """Passes until ``stop`` is set; returns the last pass's report."""
        LOG.info(
            "worker started on %s (polling every %g s)",
            self.store.path,
            self.config.worker.poll_seconds,
            extra={"event": "start"},
        )
        report = PassReport()
        while not self.stop.is_set():
            report = self.run_pass()
            self.stop.wait(self.seconds_to_next())
        LOG.info("worker stopped", extra={"event": "stop"})
        return report

    def seconds_to_next(self) -> float:
        """Until the next schedule is due, at most ``poll_seconds`` (a schedule made by
        another process meanwhile is seen within that)."""
        wait = self.config.worker.poll_seconds
        due = self.store.next_schedule_at()
        if due is not None:
            wait = min(wait, max((due - self.clock()).total_seconds(), 0.0))
        return wait

    def run_pass(self) -> PassReport:
        """One pass over every job; the jobs' failures are logged and reported, not raised."""
        jobs: list[Job] = []
        for step in (
            self._register,
            self._send_due,
            self._retry_deferred,
            self._inbox,
            self._prune,
        ):
            if self.stop.is_set():
                break
            try:
                jobs.extend(step())
            except NewsletterError as exc:
                LOG.error("%s", exc, extra={"event": "error"})
                jobs.append(Job(step.__name__.strip("_"), False, str(exc)))
        return PassReport(tuple(jobs))

    # -- schedules -----------------------------------------------------------------------

    def _register(self) -> list[Job]:
        """Schedule the future ``send_at`` of issue.md files not scheduled yet (or moved)."""
        jobs: list[Job] = []
        for folder in content.iter_issue_folders(self.config.issues_dir):
            path = folder / content.ISSUE_FILE
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            seen = self.timers.seen.get(path)
            if seen is not None and seen[0] == mtime:
                continue
            try:
                issue = content.read_issue(folder)
            except NewsletterError as exc:
                self.timers.seen[path] = (mtime, "")
                LOG.warning("%s", exc, extra={"event": "issue-unreadable"})
                continue
            self.timers.seen[path] = (mtime, issue.send_at)
            if issue.send_at:
                job = self._register_one(issue)
                if job is not None:
                    jobs.append(job)
        return jobs

    def _register_one(self, issue: Issue) -> Job | None:
        key = issue.slug
        entry = self.store.get_schedule(key)
        try:
            when = parse_when(issue.send_at, where=issue.send_at_where)
        except NewsletterError as exc:
            LOG.error("%s", exc, extra={"event": "schedule-invalid", "issue": key})
            return Job("register", False, str(exc), key)
        if entry is not None and (
            entry.source != "issue.md"
            or entry.state != ScheduleState.SCHEDULED
            or entry.send_at == when.at
        ):
            return None  # scheduled by command, running, finished or cancelled: left alone
        now = self.clock()
        if when.at <= now or self.store.issue_snapshot(key) is not None:
            return None  # an old issue's send_at does not send it now
        try:
            made = schedule_issue(self.config, self.store, issue, when, source="issue.md", now=now)
        except NewsletterError as exc:
            LOG.error("not scheduled: %s", exc, extra={"event": "schedule-refused", "issue": key})
            return Job("register", False, str(exc), key)
        LOG.info(
            "scheduled issue %s for %s (send_at in issue.md)",
            key,
            f"{when.local():%Y-%m-%d %H:%M %Z}",
            extra={"event": "scheduled", "issue": key, "send_at": made.send_at.isoformat()},
        )
        return Job("register", True, f"scheduled for {made.send_at.isoformat()}", key)

    def _send_due(self) -> list[Job]:
        jobs = []
        for entry in self.store.due_schedules(self.clock()):
            if self.stop.is_set():
                break
            jobs.append(self.send_scheduled(entry.issue_key))
        return jobs

    def send_scheduled(self, key: str) -> Job:
        """Check and send one scheduled issue, or resume it; its schedule records the end."""
        store = self.store
        resumed = store.get_schedule(key)
        if not store.update_schedule(
            key,
            ScheduleState.SENDING,
            only_from=(ScheduleState.SCHEDULED, ScheduleState.SENDING),
        ):
            return Job("send", True, "no longer scheduled", key)
        extra = {"event": "send", "issue": key}
        again = resumed is not None and resumed.state == ScheduleState.SENDING
        LOG.info("%s issue %s", "resuming" if again else "sending", key, extra=extra)
        try:
            issue = content.read_issue(self.config.issues_dir / key)
        except NewsletterError as exc:
            return self._failed(key, str(exc))
        checked = preflight(self.config, issue)
        if not checked.ok or checked.rendered is None:
            return self._failed(key, "; ".join(checked.problems))
        publish.publish_issue(self.config, store, issue)
        return self._run(key, checked.rendered, kind="send")

    def _failed(self, key: str, error: str) -> Job:
        """The checks failed at send time: nothing is sent, the schedule says why."""
        self.store.update_schedule(key, ScheduleState.FAILED, error=error)
        LOG.error(
            "issue %s not sent: %s", key, error, extra={"event": "send-refused", "issue": key}
        )
        return Job("send", False, error, key)

    def _run(self, key: str, rendered: RenderedIssue, *, kind: str) -> Job:
        scheduled = kind == "send"
        retry_at = self.clock() + dt.timedelta(minutes=self.config.worker.retry_minutes)
        # The segment it goes to: issue.md's for a scheduled send (as `send` reads it); the
        # one its first send recorded for a retry, which only resumes that snapshot.
        name = rendered.issue.segment if scheduled else (self.store.issue_segment(key) or "")
        try:
            segment = require_segment(self.config.segments, name) if name else None
        except NewsletterError as exc:
            if scheduled:
                return self._failed(key, str(exc))
            LOG.error("issue %s: %s", key, exc, extra={"event": f"{kind}-error", "issue": key})
            return Job(kind, False, str(exc), key)
        try:
            prepared = delivery.prepare_send(
                self.config, rendered, self.store, outbound=self.outbound
            )
            lines = ProgressLines(
                lambda line: self.progress_line(f"issue {key}: {line}"),
                every=self.config.worker.progress_seconds,
            )
            report = prepared.run(
                delivery.SendOptions(segment=segment), progress=lines, stop=self.stop
            )
        except DeliveryError as exc:
            # Another send of this issue is running (a `send` by hand): it does the work.
            LOG.warning("%s", exc, extra={"event": f"{kind}-busy", "issue": key})
            if scheduled:
                self.store.update_schedule(
                    key,
                    ScheduleState.SENDING,
                    error=str(exc),
                    not_before=self.clock() + dt.timedelta(minutes=1),
                )
            return Job(kind, True, str(exc), key)
        except NewsletterError as exc:
            # The server is down or refuses the login: nothing was sent; try again later.
            LOG.error("issue %s: %s", key, exc, extra={"event": f"{kind}-error", "issue": key})
            if scheduled:
                self.store.update_schedule(
                    key, ScheduleState.SENDING, error=str(exc), not_before=retry_at
                )
            return Job(kind, False, str(exc), key)
        counts = report.counts
        summary = (
            f"sent {report.sent}, failed {report.failed}, deferred {report.deferred}, "
            f"uncertain {report.uncertain} in {report.elapsed:.1f} s; the ledger: "
            + ", ".join(f"{state} {n}" for state, n in counts.items() if n)
        )
        extra = {
            "event": f"{kind}-done",
            "issue": key,
            "sent": report.sent,
            "failed": report.failed,
            "deferred": report.deferred,
            "uncertain": report.uncertain,
        }
        if report.found_uncertain:
            LOG.warning(
                "issue %s: %d recipients left uncertain by a crashed run (not sent again)",
                key,
                report.found_uncertain,
                extra={"event": "uncertain", "issue": key, "uncertain": report.found_uncertain},
            )
        if report.stopped_by:
            stopped = self.stop.is_set() and report.error is None
            LOG.log(
                logging.INFO if stopped else logging.ERROR,
                "issue %s stopped (%s): %s",
                key,
                report.stopped_by,
                summary,
                extra=extra,
            )
            if scheduled:
                self.store.update_schedule(
                    key,
                    ScheduleState.SENDING,
                    error="" if stopped else report.stopped_by,
                    not_before=None if stopped else retry_at,
                )
            return Job(kind, stopped, report.stopped_by, key)
        if scheduled and not counts.get(DeliveryState.QUEUED):
            self.store.update_schedule(key, ScheduleState.SENT)
        elif scheduled and report.warmup_left is not None:
            # The warm-up plan's cap for today is reached: the rest goes tomorrow (UTC).
            tomorrow = start_of_day(self.clock()) + dt.timedelta(days=1)
            self.store.update_schedule(
                key, ScheduleState.SENDING, error="warm-up cap reached", not_before=tomorrow
            )
            LOG.info(
                "issue %s: the warm-up cap for today is reached; %d left for tomorrow",
                key,
                counts.get(DeliveryState.QUEUED, 0),
                extra={"event": "warmup", "issue": key},
            )
        LOG.info("issue %s: %s", key, summary, extra=extra)
        return Job(kind, report.failed == 0, summary, key)

    # -- deferred recipients ---------------------------------------------------------------

    def _retry_deferred(self) -> list[Job]:
        now = self.clock()
        parked = now - dt.timedelta(minutes=self.config.worker.retry_minutes)
        jobs = []
        for key in self.store.deferred_due(now, parked, self.config.worker.max_attempts):
            if self.stop.is_set():
                break
            schedule = self.store.get_schedule(key)
            if schedule is not None and schedule.state == ScheduleState.SENDING:
                continue  # its scheduled send resumes it
            LOG.info("retrying deferred recipients of issue %s", key, extra={"event": "retry"})
            try:
                issue = content.read_issue(self.config.issues_dir / key)
                rendered = render_issue(issue, self.config)
            except NewsletterError as exc:
                LOG.error("issue %s: %s", key, exc, extra={"event": "retry-error", "issue": key})
                jobs.append(Job("retry", False, str(exc), key))
                continue
            jobs.append(self._run(key, rendered, kind="retry"))
        return jobs

    # -- mail in, and housekeeping ---------------------------------------------------------

    def _inbox(self) -> list[Job]:
        if not inbox_configured(self.config):
            return []
        now = self.clock()
        every = dt.timedelta(minutes=self.config.worker.inbox_interval_minutes)
        if self.timers.inbox is not None and now - self.timers.inbox < every:
            return []
        self.timers.inbox = now
        try:
            line = read_inbox(self.config, self.store)
        except NewsletterError as exc:
            LOG.error("inbox: %s", exc, extra={"event": "inbox-error"})
            return [Job("inbox", False, str(exc))]
        LOG.info("inbox: %s", line, extra={"event": "inbox"})
        return [Job("inbox", True, line)]

    def _prune(self) -> list[Job]:
        now = self.clock()
        every = dt.timedelta(minutes=self.config.worker.prune_interval_minutes)
        if self.timers.prune is not None and now - self.timers.prune < every:
            return []
        self.timers.prune = now
        ttl = dt.timedelta(hours=self.config.server.confirm_ttl_hours)
        pruned = self.store.prune_pending(ttl, now=now)
        if pruned:
            LOG.info(
                "pruned %d unconfirmed sign-ups older than %s",
                pruned,
                ttl,
                extra={"event": "prune", "pruned": pruned},
            )
        return [Job("prune", True, f"pruned {pruned}")]


def run(
    config: Config,
    store: Store,
    *,
    once: bool = False,
    stop: threading.Event | None = None,
    clock: Clock = utc_now,
    outbound: delivery.Outbound | None = None,
) -> PassReport:
    """Hold the worker lock and run one pass (``once``) or passes until ``stop``."""
    with worker_lock(store):
        worker = Worker(config, store, stop=stop, clock=clock, outbound=outbound)
        if not once:
            return worker.run_forever()
        report = worker.run_pass()
        failed = [job for job in report.jobs if not job.ok]
        LOG.info(
            "one pass: %d jobs, %d failed",
            len(report.jobs),
            len(failed),
            extra={"event": "pass", "jobs": len(report.jobs), "failed": len(failed)},
        )
        return report


__all__ = [
    "Job",
    "PassReport",
    "Worker",
    "inbox_configured",
    "read_inbox",
    "run",
    "worker_lock",
]
