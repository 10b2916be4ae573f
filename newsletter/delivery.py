"""The send loop: claim rows in the ledger, send, record, retry, rate-limit, report.

The ledger is the truth about who got what. A row is committed as ``sending``
before its bytes go to the server, results are recorded in batches, and the
pending recipients are always read from the ledger, never from a counter. The
main thread owns the database; K worker threads each own one transport.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .config import Config
from .errors import DeliveryError, NewsletterError, TransportError
from .message import MessageTemplate, OutgoingMessage, Recipient, prepare
from .render import RenderedIssue
from .store import (
    ClaimedRecipient,
    DeliveryResult,
    DeliveryState,
    LedgerEntry,
    Status,
    Store,
    Subscriber,
)
from .transport import SendResult, Transport

TransportFactory = Callable[[], Transport]
Signer = Callable[[bytes], bytes]
_STOP = object()


@dataclass(frozen=True)
class SendOptions:
    """How one run behaves; None means "as the config says"."""

    limit: int | None = None
    rate: float | None = None
    connections: int | None = None
    include_new: bool = False
    resend_uncertain: bool = False
    batch_size: int = 0  # rows claimed per transaction; 0 = chosen from connections


@dataclass(frozen=True)
class Progress:
    """Counts so far in this run, for a progress bar."""

    done: int
    total: int
    sent: int
    failed: int
    deferred: int
    uncertain: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True)
class DeliveryReport:
    """What a run did, and what the ledger now says about the issue."""

    issue_key: str
    attempted: int
    sent: int
    failed: int
    deferred: int
    uncertain: int
    elapsed: float
    found_uncertain: int  # rows a crashed earlier run left, now marked uncertain
    counts: dict[DeliveryState, int] = field(default_factory=dict)
    problems: tuple[LedgerEntry, ...] = ()
    stopped_by: str = ""  # why the run stopped early ("" = it finished)

    @property
    def rate(self) -> float:
        return self.attempted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and not self.stopped_by
            and self.counts.get(DeliveryState.FAILED, 0) == 0
        )


@dataclass(frozen=True)
class SendPlan:
    """What a send would do, shown before asking for confirmation."""

    issue_key: str
    subject: str
    sender: str
    recipients: int  # the ones this run would send to
    already_sent: int
    uncertain: int
    message_size: int
    transport: str
    snapshot_fixed: bool


def recipient_of(subscriber: Subscriber) -> Recipient:
    return Recipient(
        email=subscriber.email,
        name=subscriber.name,
        fields=subscriber.fields,
        subscriber_id=subscriber.id,
    )


def plan_send(
    config: Config, rendered: RenderedIssue, store: Store, transport_name: str
) -> SendPlan:
    """The numbers for the confirmation prompt, without changing anything."""
    key = rendered.issue.key
    snapshot = store.issue_snapshot(key)
    counts = store.ledger_counts(key)
    if snapshot is None:
        pending = store.count(Status.ACTIVE)
    else:
        pending = counts[DeliveryState.QUEUED] + counts[DeliveryState.DEFERRED]
    template = prepare(rendered, config)
    return SendPlan(
        issue_key=key,
        subject=template.subject,
        sender=config.newsletter.sender,
        recipients=pending,
        already_sent=counts[DeliveryState.SENT],
        uncertain=counts[DeliveryState.UNCERTAIN] + counts[DeliveryState.SENDING],
        message_size=template.size,
        transport=transport_name,
        snapshot_fixed=snapshot is not None,
    )


class _RateLimiter:
    """Spaces out sends across all workers to at most ``rate`` per second."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = time.monotonic()
        self.lock = threading.Lock()
        self.stop = stop

    def acquire(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = max(self.next_at, now)
            self.next_at = at + self.interval
        if at > now:
            self.stop.wait(at - now)


@dataclass(frozen=True)
class _Outcome:
    claimed: ClaimedRecipient
    result: SendResult | None  # None: not handed over (stopped or transport down)
    message_id: str = ""
    error: str = ""


def _worker(
    template: MessageTemplate,
    make_transport: TransportFactory,
    work: queue.Queue[object],
    results: queue.Queue[_Outcome],
    stop: threading.Event,
    limiter: _RateLimiter,
) -> None:
    transport: Transport | None = None
    try:
        while True:
            item = work.get()
            if item is _STOP:
                return
            assert isinstance(item, ClaimedRecipient)
            if stop.is_set():
                results.put(_Outcome(item, None, error="run stopped before sending"))
                continue
            try:
                outgoing: OutgoingMessage = template.personalise(recipient_of(item.subscriber))
            except ValueError as exc:
                results.put(
                    _Outcome(item, SendResult(item.subscriber.email, "failed", None, str(exc)))
                )
                continue
            limiter.acquire()
            try:
                if transport is None:
                    transport = make_transport()
                result = transport.send(template.envelope_from, outgoing.recipient, outgoing.data)
            except NewsletterError as exc:
                # Certainly not handed over; stop the run, this row goes back to the queue.
                stop.set()
                results.put(_Outcome(item, None, error=str(exc)))
                continue
            results.put(_Outcome(item, result, outgoing.message_id))
    finally:
        if transport is not None:
            # Closing a dead connection must not hide the real outcome.
            with contextlib.suppress(Exception):
                transport.close()


def send_issue(
    config: Config,
    rendered: RenderedIssue,
    store: Store,
    make_transport: TransportFactory,
    *,
    options: SendOptions = SendOptions(),
    sign: Signer | None = None,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
) -> DeliveryReport:
    """Send ``rendered`` to every recipient the ledger says is due, once.

    Safe to run again after any failure or crash: it resumes with those not yet
    sent. A second concurrent run on the same issue gets a DeliveryError.
    """
    key = rendered.issue.key
    template = prepare(rendered, config, sign=sign)
    connections = options.connections or config.delivery.connections
    rate = config.delivery.rate if options.rate is None else options.rate
    batch = options.batch_size or max(8, connections * 8)
    stop = stop or threading.Event()
    with store.acquire_send_lock(key) as lock:
        if options.resend_uncertain:
            store.resend_uncertain(key)
        store.snapshot_recipients(key, include_new=options.include_new)
        counts = store.ledger_counts(key)
        due = counts[DeliveryState.QUEUED] + counts[DeliveryState.DEFERRED]
        total = min(due, options.limit) if options.limit is not None else due
        run = _Run(config, store, key, lock.run_id, total, progress)
        work: queue.Queue[object] = queue.Queue()
        results: queue.Queue[_Outcome] = queue.Queue()
        limiter = _RateLimiter(rate, stop)
        workers = [
            threading.Thread(
                target=_worker,
                args=(template, make_transport, work, results, stop, limiter),
                name=f"send-{n}",
                daemon=True,
            )
            for n in range(connections)
        ]
        for worker in workers:
            worker.start()
        try:
            run.loop(work, results, stop, batch, options.limit)
        except KeyboardInterrupt:
            stop.set()
            run.stopped_by = "interrupted"
        finally:
            # Workers finish what is queued (or hand it back once stop is set), then exit.
            for _ in workers:
                work.put(_STOP)
            for worker in workers:
                worker.join()
            run.drain(results, block=False)
            run.flush()
        if run.transport_error and not run.stopped_by:
            run.stopped_by = run.transport_error
        return DeliveryReport(
            issue_key=key,
            attempted=run.sent + run.failed + run.deferred + run.uncertain,
            sent=run.sent,
            failed=run.failed,
            deferred=run.deferred,
            uncertain=run.uncertain,
            elapsed=time.monotonic() - run.started,
            found_uncertain=lock.uncertain,
            counts=store.ledger_counts(key),
            problems=tuple(store.ledger_problems(key, limit=50)),
            stopped_by=run.stopped_by,
        )


class _Run:
    """Book-keeping for one run: in-flight rows, pending results, counters."""

    def __init__(
        self,
        config: Config,
        store: Store,
        key: str,
        run_id: str,
        total: int,
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self.config = config
        self.store = store
        self.key = key
        self.run_id = run_id
        self.total = total
        self.progress = progress
        self.started = time.monotonic()
        self.in_flight = 0
        self.claimed_total = 0
        self.pending: list[DeliveryResult] = []
        self.sent = self.failed = self.deferred = self.uncertain = 0
        self.stopped_by = ""
        self.transport_error = ""
        self.uncertain_rows: list[tuple[ClaimedRecipient, str]] = []

    def loop(
        self,
        work: queue.Queue[object],
        results: queue.Queue[_Outcome],
        stop: threading.Event,
        batch: int,
        limit: int | None,
    ) -> None:
        while not stop.is_set():
            room = batch * 2 - self.in_flight
            left = None if limit is None else limit - self.claimed_total
            claimed: list[ClaimedRecipient] = []
            if room >= batch and (left is None or left > 0):
                claimed = self.store.claim_batch(self.key, self.run_id, min(batch, left or batch))
                for item in claimed:
                    work.put(item)
                self.in_flight += len(claimed)
                self.claimed_total += len(claimed)
            if self.in_flight:
                self.drain(results, block=not claimed)
                if len(self.pending) >= batch or not claimed:
                    self.flush()
                continue
            self.flush()
            if left is not None and left <= 0:
                return
            due_at = self.store.next_retry_at(self.key)
            if due_at is None:
                return
            wait = (due_at - datetime.now(UTC)).total_seconds()
            if wait > 0 and stop.wait(min(wait, 60.0)):
                return

    def drain(self, results: queue.Queue[_Outcome], *, block: bool) -> None:
        """Collect finished sends; wait for at least one when ``block``."""
        try:
            outcome = results.get(timeout=1.0) if block else results.get_nowait()
        except queue.Empty:
            return
        while True:
            self._take(outcome)
            try:
                outcome = results.get_nowait()
            except queue.Empty:
                break
        if self.progress:
            self.progress(
                Progress(
                    done=self.sent + self.failed + self.deferred + self.uncertain,
                    total=self.total,
                    sent=self.sent,
                    failed=self.failed,
                    deferred=self.deferred,
                    uncertain=self.uncertain,
                    elapsed=time.monotonic() - self.started,
                )
            )

    def _take(self, outcome: _Outcome) -> None:
        self.in_flight -= 1
        claimed = outcome.claimed
        subscriber_id = claimed.subscriber.id
        result = outcome.result
        if result is None:
            # Never handed over: back in the queue for this or the next run.
            if outcome.error and not self.transport_error and "stopped" not in outcome.error:
                self.transport_error = outcome.error
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.DEFERRED, outcome.error, retry_at=None
                )
            )
            return
        reply = f"{result.code} {result.reply}".strip() if result.code else result.reply
        if result.outcome == "sent":
            self.sent += 1
            state = DeliveryState.SENT
            self.pending.append(
                DeliveryResult(self.key, subscriber_id, state, reply, outcome.message_id)
            )
        elif result.outcome == "failed":
            self.failed += 1
            self.pending.append(
                DeliveryResult(
                    self.key,
                    subscriber_id,
                    DeliveryState.FAILED,
                    reply,
                    outcome.message_id,
                    bounce=self.config.delivery.bounce_on_5xx and (result.code or 0) >= 500,
                )
            )
        elif result.outcome == "deferred":
            self.deferred += 1
            retry_at = None
            if claimed.attempts <= self.config.delivery.retries:
                backoff = self.config.delivery.retry_backoff * 2 ** (claimed.attempts - 1)
                retry_at = datetime.now(UTC) + timedelta(seconds=backoff)
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.DEFERRED, reply, retry_at=retry_at
                )
            )
        else:
            self.uncertain += 1
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.UNCERTAIN, reply, outcome.message_id
                )
            )

    def flush(self) -> None:
        if self.pending:
            self.store.record_results(self.pending)
            self.pending = []


def send_test(
    config: Config,
    rendered: RenderedIssue,
    addresses: Sequence[str],
    transport: Transport,
    *,
    sign: Signer | None = None,
) -> list[SendResult]:
    """Proof copies with "[TEST]" in the subject; the ledger is not touched."""
    template = prepare(rendered, config, subject_prefix="[TEST] ", sign=sign)
    out: list[SendResult] = []
    try:
        for address in addresses:
            outgoing = template.personalise(
                Recipient(email=address, subscriber_id=f"test:{address}")
            )
            out.append(transport.send(template.envelope_from, address, outgoing.data))
    finally:
        transport.close()
    return out


@dataclass(frozen=True)
class DryRunReport:
    """A dry run built every message and recorded nothing."""

    messages: int
    total_bytes: int
    elapsed: float


def dry_run(
    config: Config,
    rendered: RenderedIssue,
    subscribers: Iterable[Subscriber],
    *,
    sign: Signer | None = None,
) -> DryRunReport:
    """Build (and sign) every message without sending or recording anything."""
    started = time.monotonic()
    template = prepare(rendered, config, sign=sign)
    count = size = 0
    for subscriber in subscribers:
        size += len(template.personalise(recipient_of(subscriber)).data)
        count += 1
    return DryRunReport(count, size, time.monotonic() - started)


def check_can_send(config: Config) -> None:
    """Refuse early when sending could not work, before anything is claimed."""
    if config.smtp.username and not config.secrets.smtp_password:
        raise DeliveryError(
            f"[smtp] username is set but {'NEWSLETTER_SMTP_PASSWORD'} is not",
            where=f"{config.smtp.host}:{config.smtp.port}",
            hint="export NEWSLETTER_SMTP_PASSWORD before sending",
        )


__all__ = [
    "DeliveryReport",
    "DeliveryState",
    "DryRunReport",
    "Progress",
    "SendOptions",
    "SendPlan",
    "TransportError",
    "check_can_send",
    "dry_run",
    "plan_send",
    "send_issue",
    "send_test",
]
