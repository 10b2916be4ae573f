"""The send loop: claim rows in the ledger, send, record, retry, rate-limit, report.

The ledger is the truth about who got what. A row is committed as ``sending``
before its bytes go to the server, results are recorded in batches, and the
pending recipients are always read from the ledger, never from a counter. The
main thread owns the database; K worker threads each own one transport.
:func:`prepare_send` is the one way in, for the CLI, the demo and the bench alike.

What a run guarantees, whatever stops it:

* A row is handed to a worker only after its claim is committed (and fsynced),
  so a message that may have gone out is never ``queued`` again: at worst it
  is ``uncertain`` (a kill -9 between send and record), reported and re-sent
  only on request.
* A row whose message certainly did not go out (transport down, run stopped
  before its turn) is handed back as ``deferred`` for the next run.
* 4xx replies are retried with exponential backoff up to ``[delivery] retries``
  times within the run, then left ``deferred`` for the next run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .config import Config
from .dkim import signer_from_config
from .errors import DeliveryError, NewsletterError
from .message import MessageTemplate, Recipient, RecipientError, prepare, sample_recipient
from .models import (
    ClaimedRecipient,
    DeliveryResult,
    DeliveryState,
    LedgerEntry,
    Subscriber,
)
from .pacing import DomainPacer, domain_of, is_rate_limited, start_of_day, warmup_cap
from .render import RenderedIssue
from .segments import Segment
from .store import Store
from .transport import SendResult, Transport, WireReady, transport_from_config

TransportFactory = Callable[[], Transport]
Signer = Callable[[bytes], bytes]
_STOP = object()


@dataclass(frozen=True)
class _Paced:
    """A row released at its domain's slot: the sending threads take it before the rest,
    so that waiting behind other domains' rows does not bunch that domain's sends."""

    item: ClaimedRecipient


class _WorkQueue(queue.Queue[object]):
    """The sending threads' queue: paced rows first, then the rest in order."""

    def _init(self, maxsize: int) -> None:
        self.queue: collections.deque[object] = collections.deque()
        self.paced: collections.deque[object] = collections.deque()

    def _qsize(self) -> int:
        return len(self.queue) + len(self.paced)

    def _put(self, item: object) -> None:
        if isinstance(item, _Paced):
            self.paced.append(item.item)
        else:
            self.queue.append(item)

    def _get(self) -> object:
        return self.paced.popleft() if self.paced else self.queue.popleft()


PROGRESS_INTERVAL = 0.1  # seconds between progress callbacks (the last one always comes)
CLAIM_AHEAD_SECONDS = 1.0  # with a rate limit, claim at most about this much work at once
SHARE_SECONDS = 1.0  # how often a run counts the senders it shares the rates with


@dataclass(frozen=True)
class SendOptions:
    """How one run behaves; None means "as the config says"."""

    limit: int | None = None  # at most this many sends (retries count) in this run
    rate: float | None = None
    connections: int | None = None
    include_new: bool = False
    resend_uncertain: bool = False
    batch_size: int = 0  # rows claimed per transaction; 0 = chosen from connections and rate
    # Only this [segments] entry; the first send records it and later ones must agree.
    segment: Segment | None = None


@dataclass(frozen=True)
class Progress:
    """Counts so far in this run, for a progress bar. ``done`` never goes down."""

    done: int  # rows that reached their state for this run (sent, failed, deferred, uncertain)
    total: int  # rows due when the run started (at most --limit)
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
    """What a run did, and what the ledger now says about the issue.

    ``sent``/``failed``/``deferred``/``uncertain`` count rows by where this run
    left them (``deferred``: left for the next run); ``attempts`` counts
    messages handed to the transport, retries included.
    """

    issue_key: str
    attempts: int
    sent: int
    failed: int
    deferred: int
    uncertain: int
    retried: int  # 4xx replies retried within the run
    elapsed: float
    found_uncertain: int  # rows a crashed earlier run left, now marked uncertain
    counts: dict[DeliveryState, int] = field(default_factory=dict)
    problems: tuple[LedgerEntry, ...] = ()
    stopped_by: str = ""  # why the run stopped early ("" = it finished)
    error: NewsletterError | None = None  # the error that stopped it, if any
    warmup_left: int | None = None  # the warm-up plan's messages left today, before this run
    slowed: int = 0  # rate-limit replies that slowed their domain down

    @property
    def done(self) -> int:
        return self.sent + self.failed + self.deferred + self.uncertain

    @property
    def rate(self) -> float:
        return self.attempts / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        """No recipient failed in this run, and the run was not stopped."""
        return self.failed == 0 and not self.stopped_by


@dataclass(frozen=True)
class SendPlan:
    """What a send would do, shown before asking for confirmation."""

    issue_key: str
    subject: str
    sender: str
    recipients: int  # the ones this run would send to
    already_sent: int
    uncertain: int
    new_subscribers: int  # active, not in the fixed recipients (sent to with include_new)
    message_size: int
    transport: str
    snapshot_fixed: bool
    warmup_left: int | None = None  # the warm-up plan's messages left today (None: no plan)
    segment: str = ""  # the segment it goes to ("" = every active subscriber)


def recipient_of(subscriber: Subscriber) -> Recipient:
    return Recipient(
        email=subscriber.email,
        name=subscriber.name,
        fields=subscriber.fields,
        subscriber_id=subscriber.id,
    )


@dataclass(frozen=True)
class DryRunReport:
    """A dry run built every message and recorded nothing."""

    messages: int
    total_bytes: int
    elapsed: float
    invalid: tuple[str, ...] = ()  # addresses whose message could not be built


def describe_transport(config: Config) -> str:
    """Where the configured transport sends, as the send plan shows it."""
    smtp = config.smtp
    name = f"SMTP {smtp.host}:{smtp.port} ({smtp.security})"
    return f"{name} + copies in {config.outbox_dir}" if config.delivery.outbox else name


@dataclass(frozen=True)
class Outbound:
    """How mail leaves: a factory for the transport each sending thread owns, and the
    DKIM signer (None: unsigned). Built once, for a send or for the service's mail."""

    make_transport: TransportFactory
    sign: Signer | None = field(default=None, repr=False)
    description: str = "a custom transport"


def outbound_from_config(
    config: Config, *, make_transport: TransportFactory | None = None
) -> Outbound:
    """The configured transport and DKIM signer, checked now rather than mid-send.

    The SMTP settings are checked (a username without its password, a password that
    would go out unencrypted) without connecting, and the DKIM key is read and parsed
    once. ``make_transport`` replaces the configured transport (the service's tests).
    """
    if make_transport is not None:
        return Outbound(make_transport, signer_from_config(config))
    transport_from_config(config)  # checks the settings; connects to nothing
    return Outbound(
        lambda: transport_from_config(config),
        signer_from_config(config),
        describe_transport(config),
    )


def prepare_send(
    config: Config,
    rendered: RenderedIssue,
    store: Store | None = None,
    *,
    outbound: Outbound | None = None,
) -> PreparedSend:
    """The one way to send an issue: the signer, the transport factory and the message
    template are built here, once; the result offers the plan, the run, a dry run and
    proof copies. ``store`` may be None for proof copies only (they touch no ledger).
    """
    out = outbound if outbound is not None else outbound_from_config(config)
    template = prepare(rendered, config, sign=out.sign)
    return PreparedSend(config, rendered, store, out, template)


@dataclass(frozen=True)
class PreparedSend:
    """An issue ready to go: its message built once, signed per copy when DKIM is on."""

    config: Config
    rendered: RenderedIssue
    store: Store | None
    outbound: Outbound
    template: MessageTemplate

    @property
    def issue_key(self) -> str:
        return self.rendered.issue.slug

    def _store(self) -> Store:
        if self.store is None:
            raise ValueError("this send was prepared without a store: proof copies only")
        return self.store

    def message_size(self) -> int:
        """The size of one finished copy for an example reader, DKIM-Signature included.

        Real copies differ only by the reader's own values (address, name, token,
        Message-ID), a few dozen bytes.
        """
        return len(self.template.personalise(sample_recipient()).data)

    def plan(self, options: SendOptions = SendOptions()) -> SendPlan:
        """The numbers for the confirmation prompt, without changing anything."""
        store = self._store()
        key = self.issue_key
        store.check_issue_segment(key, options.segment)  # before anyone is asked
        # In this order, because another sender (PostgreSQL) may fix the recipients
        # meanwhile: without a snapshot, `new` was read before there was one; with one,
        # the counts (and the newcomers) are read after it.
        new = store.count_new_subscribers(key, options.segment)
        snapshot = store.issue_snapshot(key)
        counts = store.ledger_counts(key)
        if snapshot is not None:
            new = store.count_new_subscribers(key, options.segment)
        # A row still `sending` belongs to a dead run (uncertain) or to a running one (a
        # sender on PostgreSQL): not ours to send either way.
        uncertain = counts[DeliveryState.UNCERTAIN] + max(
            0, counts[DeliveryState.SENDING] - store.rows_in_flight(key)
        )
        if snapshot is None:
            pending = new
        else:
            pending = counts[DeliveryState.QUEUED] + counts[DeliveryState.DEFERRED]
            if options.include_new:
                pending += new
            if options.resend_uncertain:
                pending += uncertain
        if options.limit is not None:
            pending = min(pending, options.limit)
        warmup = warmup_left(self.config, store)
        if warmup is not None:
            pending = min(pending, warmup)
        return SendPlan(
            issue_key=key,
            subject=self.template.subject,
            sender=self.config.newsletter.sender,
            recipients=pending,
            already_sent=counts[DeliveryState.SENT],
            uncertain=uncertain,
            new_subscribers=new if snapshot is not None else 0,
            message_size=self.message_size(),
            transport=self.outbound.description,
            snapshot_fixed=snapshot is not None,
            warmup_left=warmup,
            segment="" if options.segment is None else options.segment.name,
        )

    def run(
        self,
        options: SendOptions = SendOptions(),
        *,
        progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> DeliveryReport:
        """Send to every recipient the ledger says is due, once.

        Safe to run again after any failure or crash: it resumes with those not yet
        sent. A second concurrent run on the same issue gets a DeliveryError. When
        the server cannot be reached at the start, the TransportError is raised
        before anything changes (the recipients are not fixed either).
        """
        return _send(
            self.config,
            self.template,
            self.issue_key,
            self._store(),
            self.outbound.make_transport,
            options,
            progress,
            stop or threading.Event(),
        )

    def dry_run(
        self, subscribers: Iterable[Subscriber] | None = None, *, segment: Segment | None = None
    ) -> DryRunReport:
        """Build (and sign) every message, by default for everyone a send would go to now
        (active, not paused, in ``segment``), without sending or recording anything."""
        if subscribers is None:
            subscribers = self._store().list_recipients(segment)
        started = time.monotonic()
        count = size = 0
        invalid: list[str] = []
        for subscriber in subscribers:
            try:
                size += len(self.template.personalise(recipient_of(subscriber)).data)
            except ValueError:
                invalid.append(subscriber.email)
                continue
            count += 1
        return DryRunReport(count, size, time.monotonic() - started, tuple(invalid))

    def send_test(
        self, addresses: Sequence[str], *, as_subscriber: Subscriber | None = None
    ) -> list[SendResult]:
        """Proof copies with "[TEST]" in the subject over one connection; no ledger.

        With ``as_subscriber`` each proof is that reader's copy (name, address, fields)
        sent to the test address; its unsubscribe link names the test address, not them.
        """
        template = prepare(
            self.rendered, self.config, subject_prefix="[TEST] ", sign=self.outbound.sign
        )
        transport = self.outbound.make_transport()
        out: list[SendResult] = []
        try:
            for address in addresses:
                reader = (
                    Recipient(email=address)
                    if as_subscriber is None
                    else recipient_of(as_subscriber)
                )
                try:
                    outgoing = template.personalise(
                        dataclasses.replace(reader, subscriber_id=f"test:{address}"),
                        to=address,
                    )
                except ValueError as exc:
                    out.append(SendResult(address, "failed", None, str(exc)))
                    continue
                out.append(transport.send(outgoing.envelope_from, address, outgoing.data))
        finally:
            transport.close()
        return out


class RateLimiter:
    """Spaces sends across all workers to at most ``rate`` per second.

    ``clock`` and ``sleep`` are injectable so the spacing can be tested without
    waiting; ``sleep`` returns True when the run was stopped meanwhile.
    """

    def __init__(
        self,
        rate: float,
        stop: threading.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.rate = rate
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock = clock
        self.sleep = sleep or stop.wait
        self.next_at = clock()
        self.lock = threading.Lock()

    def share(self, senders: int) -> None:
        """Leave this run ``1/senders`` of the rate: the others take the rest."""
        with self.lock:
            self.interval = senders / self.rate if self.rate > 0 else 0.0

    def acquire(self) -> bool:
        """Wait for this send's slot; False if the run was stopped while waiting."""
        if not self.interval:
            return True
        with self.lock:
            now = self.clock()
            at = max(self.next_at, now)
            self.next_at = at + self.interval
        if at > now:
            return not self.sleep(at - now)
        return True


@dataclass(frozen=True)
class _Outcome:
    claimed: ClaimedRecipient
    result: SendResult | None  # None: certainly not handed over (run stopped, transport down)
    message_id: str = ""
    note: str = ""  # why it was not handed over
    error: NewsletterError | None = None  # set when this outcome stops the run


def _worker(
    template: MessageTemplate,
    make_transport: TransportFactory,
    transport: Transport | None,
    work: queue.Queue[object],
    results: queue.Queue[_Outcome],
    stop: threading.Event,
    limiter: RateLimiter,
) -> None:
    """Send claimed rows from ``work`` until _STOP; every row gets exactly one outcome."""
    try:
        while True:
            item = work.get()
            if item is _STOP:
                return
            assert isinstance(item, ClaimedRecipient)
            email = item.subscriber.email
            if stop.is_set():
                results.put(_Outcome(item, None, note="not sent: the run stopped first"))
                continue
            try:
                outgoing = template.personalise(recipient_of(item.subscriber))
            except RecipientError as exc:
                # This recipient's data cannot make a valid message: theirs alone fails.
                results.put(_Outcome(item, SendResult(email, "failed", None, str(exc))))
                continue
            except Exception as exc:
                # Anything else (the template, the signer) would fail every recipient:
                # stop, and hand the row back unsent rather than fail the whole list.
                stop.set()
                error = DeliveryError(
                    f"cannot build the message for {email}: {exc!r}",
                    hint="nothing was sent to this recipient; fix the cause and send again",
                )
                results.put(_Outcome(item, None, note=f"not sent: {exc!r}", error=error))
                continue
            # prepare() makes CRLF-only bytes with no line starting with "." (no dot-stuffing
            # needed); a signer of unknown make may not keep that.
            data = outgoing.data if template.sign is not None else WireReady(outgoing.data)
            if not limiter.acquire() or stop.is_set():
                results.put(_Outcome(item, None, note="not sent: the run stopped first"))
                continue
            if transport is None:
                try:
                    transport = make_transport()
                except Exception as exc:  # nothing was sent: hand the row back
                    stop.set()
                    setup_error: NewsletterError = (
                        exc
                        if isinstance(exc, NewsletterError)
                        else DeliveryError(f"cannot set up the transport: {exc!r}")
                    )
                    results.put(_Outcome(item, None, note=f"not sent: {exc}", error=setup_error))
                    continue
            try:
                result = transport.send(outgoing.envelope_from, outgoing.recipient, data)
            except NewsletterError as exc:
                # The transport's contract: raised only when the message certainly did not
                # go out. Stop the run; this row goes back to the queue for the next one.
                stop.set()
                results.put(_Outcome(item, None, note=f"not sent: {exc}", error=exc))
                continue
            except Exception as exc:
                # A bug or something unforeseen: nobody knows whether the server took it.
                stop.set()
                error = DeliveryError(
                    f"unexpected error while sending to {email}: {exc!r}",
                    hint="this is a bug in newsletter; the recipient is marked uncertain",
                )
                reply = f"unexpected error while sending: {exc!r}"
                results.put(
                    _Outcome(
                        item,
                        SendResult(email, "uncertain", None, reply),
                        outgoing.message_id,
                        error=error,
                    )
                )
                continue
            results.put(_Outcome(item, result, outgoing.message_id))
    finally:
        if transport is not None:
            # Closing a dead connection must not hide the real outcome.
            with contextlib.suppress(Exception):
                transport.close()


def warmup_left(config: Config, store: Store, now: datetime | None = None) -> int | None:
    """Messages the warm-up plan allows today beyond those already sent, or None (no cap)."""
    moment = now or datetime.now(UTC)
    cap = warmup_cap(config, moment.date())
    if cap is None:
        return None
    return max(0, cap - store.sent_since(start_of_day(moment)))


def _batch_size(options: SendOptions, connections: int, rate: float) -> int:
    """Rows per claim: enough to amortise the claim's fsync, few enough that a crash
    leaves little uncertain (up to two batches are claimed and not yet recorded).

    Measured with bench/send.py (4 connections, 2 cores): 8 rows per claim sent 1,740
    msgs/s, 32 rows 1,900, 128 rows 1,980. A kill leaves up to ~3 batches uncertain,
    so the small batch is worth its cost; the fsync per claim costs only ~2%.
    """
    if options.batch_size > 0:
        return options.batch_size
    batch = max(8, connections * 2)
    if rate > 0:
        batch = min(batch, max(1, math.ceil(rate * CLAIM_AHEAD_SECONDS / 2)))
    return batch


def _send(
    config: Config,
    template: MessageTemplate,
    key: str,
    store: Store,
    make_transport: TransportFactory,
    options: SendOptions,
    progress: Callable[[Progress], None] | None,
    stop: threading.Event,
) -> DeliveryReport:
    """The run behind :meth:`PreparedSend.run`."""
    connections = options.connections or config.delivery.connections
    rate = config.delivery.rate if options.rate is None else options.rate
    batch = _batch_size(options, connections, rate)
    started = time.monotonic()
    warmup = warmup_left(config, store)
    # Every claim counts against the day's cap afresh: other senders (PostgreSQL) share it.
    today = datetime.now(UTC)
    day_cap = warmup_cap(config, today.date())
    cap = None if day_cap is None else (day_cap, start_of_day(today))
    if warmup is not None:
        options = dataclasses.replace(
            options, limit=warmup if options.limit is None else min(options.limit, warmup)
        )
    with store.acquire_send_lock(key, lease_seconds=config.delivery.lease_seconds) as lock:
        store.check_issue_segment(key, options.segment)
        counts = store.ledger_counts(key)
        maybe_work = (
            store.issue_snapshot(key) is None
            or options.include_new
            or counts[DeliveryState.QUEUED] + counts[DeliveryState.DEFERRED] > 0
            or (options.resend_uncertain and counts[DeliveryState.UNCERTAIN] > 0)
        ) and (options.limit is None or options.limit > 0)
        first: Transport | None = None
        if maybe_work:
            # Connect before touching the ledger: a server that is down or refuses
            # the login is one clear error, and the recipients stay unfixed.
            first = make_transport()
            try:
                first.open()
            except BaseException:
                with contextlib.suppress(Exception):
                    first.close()
                raise
        try:
            if options.resend_uncertain:
                store.resend_uncertain(key)
            store.snapshot_recipients(key, include_new=options.include_new, segment=options.segment)
            counts = store.ledger_counts(key)
        except BaseException:
            if first is not None:
                with contextlib.suppress(Exception):
                    first.close()
            raise
        due = counts[DeliveryState.QUEUED] + counts[DeliveryState.DEFERRED]
        total = min(due, options.limit) if options.limit is not None else due
        run = _Run(config, store, key, lock.run_id, total, batch, options.limit, stop, progress)
        run.cap = cap
        if due == 0 or (options.limit is not None and options.limit <= 0):
            if first is not None:
                with contextlib.suppress(Exception):
                    first.close()
        else:
            run.execute(template, make_transport, first, connections, rate)
        return DeliveryReport(
            issue_key=key,
            attempts=run.attempts,
            sent=run.sent,
            failed=run.failed,
            deferred=run.deferred + len(run.tries),  # scheduled retries the run did not reach
            uncertain=run.uncertain,
            retried=run.retried,
            elapsed=time.monotonic() - started,
            found_uncertain=store.found_uncertain(key),
            counts=store.ledger_counts(key),
            problems=tuple(store.ledger_problems(key, limit=50)),
            stopped_by=run.stopped_by,
            error=run.error,
            warmup_left=warmup,
            slowed=run.slowed,
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
        batch: int,
        limit: int | None,
        stop: threading.Event,
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self.config = config
        self.store = store
        self.key = key
        self.run_id = run_id
        self.total = total
        self.batch = batch
        self.limit = limit
        self.stop = stop
        self.progress = progress
        # How often to look again while only other senders hold rows (PostgreSQL).
        self.poll = min(1.0, config.delivery.lease_seconds / 4)
        self.started = time.monotonic()
        self.last_progress = 0.0
        self.work: queue.Queue[object] = _WorkQueue()
        self.results: queue.Queue[_Outcome] = queue.Queue()
        self.workers: list[threading.Thread] = []
        self.in_flight = 0
        self.claimed_total = 0
        self.pending: list[DeliveryResult] = []
        self.tries: dict[int, int] = {}  # subscriber id -> 4xx replies in this run, while retried
        self.attempts = self.sent = self.failed = self.deferred = self.uncertain = 0
        self.retried = 0
        self.stopped_by = ""
        self.error: NewsletterError | None = None
        # Pacing: rows of a domain with a rate wait here (claimed) for their slot, while
        # other domains' rows go ahead; see newsletter.pacing.
        self.pacer = DomainPacer(config.delivery.domains, config.delivery.domain_rate)
        self.held: dict[str, collections.deque[ClaimedRecipient]] = {}
        self.held_count = 0
        self.skipped_dry: frozenset[str] | None = None  # skip set of the last empty claim
        self.slowed = 0  # rate-limit replies that slowed a domain down
        self.limiter: RateLimiter | None = None
        self.shared_at = -math.inf  # when the senders sharing the rates were last counted
        self.cap: tuple[int, datetime] | None = None  # the warm-up plan's cap and its day

    @property
    def done(self) -> int:
        return self.sent + self.failed + self.deferred + self.uncertain

    def execute(
        self,
        template: MessageTemplate,
        make_transport: TransportFactory,
        first: Transport | None,
        connections: int,
        rate: float,
    ) -> None:
        limiter = RateLimiter(rate, self.stop)
        self.limiter = limiter
        self.workers = [
            threading.Thread(
                target=_worker,
                args=(
                    template,
                    make_transport,
                    first if n == 0 else None,
                    self.work,
                    self.results,
                    self.stop,
                    limiter,
                ),
                name=f"send-{n}",
                daemon=True,
            )
            for n in range(connections)
        ]
        for worker in self.workers:
            worker.start()
        failed = True
        try:
            self.loop()
            failed = False
        except KeyboardInterrupt:
            self.stop.set()
            self.stopped_by = "interrupted"
            failed = False
        finally:
            if failed:
                self.stop.set()  # the database failed us: send nothing more
            # Workers finish what is queued (or hand it back once stop is set), then exit.
            for _ in self.workers:
                self.work.put(_STOP)
            for worker in self.workers:
                worker.join()
            self.drain(block=False)
            for rows in self.held.values():  # never handed over: back in the queue
                while rows:
                    self._take(_Outcome(rows.popleft(), None, note="not sent: the run stopped"))
            self.held_count = 0
            if failed:
                # Best effort: whatever is not recorded stays `sending`, i.e. uncertain.
                with contextlib.suppress(NewsletterError):
                    self.flush()
            else:
                self.flush()
            self.report_progress(force=True)
        if self.error is not None and not self.stopped_by:
            self.stopped_by = str(self.error)
        elif self.stop.is_set() and not self.stopped_by:
            self.stopped_by = "stopped"  # by the caller's stop event

    def share_rates(self) -> None:
        """Split the configured rates between the senders alive now (PostgreSQL; on SQLite
        a run paces alone), counted again every SHARE_SECONDS."""
        now = time.monotonic()
        if now - self.shared_at < SHARE_SECONDS:
            return
        self.shared_at = now
        share = self.store.pacing_share()
        self.pacer.share = share
        if self.limiter is not None:
            self.limiter.share(share)

    def loop(self) -> None:
        while not self.stop.is_set():
            if self.store.lease_lost(self.key):
                # Its rows are another sender's to call uncertain now (PostgreSQL): hand
                # back the ones not yet sent, rather than send what a resend would repeat.
                raise DeliveryError(
                    f"this send of issue {self.key} (run {self.run_id}) lost its lease:"
                    " another sender may take its unrecorded rows as uncertain",
                    hint="the database was out of reach longer than [delivery] lease_seconds;"
                    " send again to carry on (see `newsletter status`)",
                )
            self.share_rates()
            left = None if self.limit is None else self.limit - self.claimed_total
            claimed: list[ClaimedRecipient] = []
            skip = frozenset(
                key for key, rows in self.held.items() if len(rows) >= self.pacer.hold(key)
            )
            if (
                self.in_flight - self.held_count <= self.batch
                and (left is None or left > 0)
                and not (self.skipped_dry is not None and skip >= self.skipped_dry)
            ):
                # Record what came back, then claim the next batch (durably) and hand it out.
                self.flush()
                want = self.batch if left is None else min(self.batch, left)
                claimed = self.store.claim_batch(
                    self.key, self.run_id, want, skip_domains=sorted(skip), cap=self.cap
                )
                # Nothing but held domains' rows left: claim again once one of them drains.
                self.skipped_dry = skip if skip and len(claimed) < want else None
                for item in claimed:
                    key = self.pacer.key(domain_of(item.subscriber.email))
                    if self.pacer.throttled(key):
                        self.held.setdefault(key, collections.deque()).append(item)
                        self.held_count += 1
                    else:
                        self.pacer.take(key)
                        self.work.put(item)
                self.in_flight += len(claimed)
                self.claimed_total += len(claimed)
            self.release()
            if self.in_flight:
                self.drain(block=not claimed)
                self.release()
                continue
            self.flush()
            if self.limit is not None and self.claimed_total >= self.limit:
                return
            if (
                self.cap is not None
                and self.store.sent_or_sending_since(self.cap[1]) >= self.cap[0]
            ):
                return  # other senders took the rest of the day's cap
            due_at = self.store.next_retry_at(self.key)
            if due_at is None:
                if not self.store.rows_in_flight(self.key, besides=self.run_id):
                    return  # nothing queued, nothing deferred, nobody else sending
                # Other senders (PostgreSQL) still hold rows: they record them, defer them
                # (claimed here when due) or die, and then their lease runs out and the
                # next claim here makes them uncertain. The run ends with every row settled.
                if self.stop.wait(self.poll):
                    return
                continue
            wait = (due_at - datetime.now(UTC)).total_seconds()
            if wait > 0 and self.stop.wait(min(wait, 60.0)):
                return

    def release(self) -> None:
        """Hand the held rows whose domain's slot has come to the sending threads."""
        for key, rows in self.held.items():
            while rows and self.pacer.take(key):
                self.work.put(_Paced(rows.popleft()))
                self.held_count -= 1

    def _wake_in(self) -> float:
        """How long the loop may wait for results before a held row's slot comes."""
        waits = [self.pacer.wait(key) for key, rows in self.held.items() if rows]
        return max(0.001, min([0.5, *waits]))

    def drain(self, *, block: bool) -> None:
        """Collect finished sends; wait for at least one when ``block`` (or until a held
        row's slot comes)."""
        try:
            if block:
                wake = self._wake_in()
                outcome = self.results.get(timeout=wake)
            else:
                outcome = self.results.get_nowait()
        except queue.Empty:
            if (
                block
                and wake >= 0.5
                and self.in_flight > self.held_count
                and not any(worker.is_alive() for worker in self.workers)
            ):
                # Cannot happen unless a worker died of a bug; never wait forever.
                self.stop.set()
                self.error = self.error or DeliveryError(
                    "every sending thread stopped", hint="this is a bug in newsletter"
                )
            return
        while True:
            self._take(outcome)
            try:
                outcome = self.results.get_nowait()
            except queue.Empty:
                break
        self.report_progress()

    def report_progress(self, *, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        self.progress(
            Progress(
                done=self.done,
                total=self.total,
                sent=self.sent,
                failed=self.failed,
                deferred=self.deferred,
                uncertain=self.uncertain,
                elapsed=now - self.started,
            )
        )

    def _take(self, outcome: _Outcome) -> None:
        self.in_flight -= 1
        subscriber_id = outcome.claimed.subscriber.id
        if outcome.error is not None and self.error is None:
            self.error = outcome.error
        result = outcome.result
        if result is None:
            # Never handed over: back in the queue for the next run.
            self.tries.pop(subscriber_id, None)
            self.deferred += 1
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.DEFERRED, outcome.note, retry_at=None
                )
            )
            return
        self.attempts += 1
        reply = f"{result.code} {result.reply}".strip() if result.code else result.reply
        if result.outcome == "deferred" and is_rate_limited(result.code, result.reply):
            # This domain says we send too fast: slow it down, the others go on.
            self.pacer.slow_down(self.pacer.key(domain_of(outcome.claimed.subscriber.email)))
            self.slowed += 1
        if result.outcome == "deferred":
            tries = self.tries.get(subscriber_id, 0) + 1
            retry_at = None
            if tries <= self.config.delivery.retries and not self.stop.is_set():
                self.tries[subscriber_id] = tries
                self.retried += 1
                backoff = self.config.delivery.retry_backoff * 2 ** (tries - 1)
                retry_at = datetime.now(UTC) + timedelta(seconds=backoff)
            else:
                self.tries.pop(subscriber_id, None)
                self.deferred += 1
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.DEFERRED, reply, retry_at=retry_at
                )
            )
            return
        self.tries.pop(subscriber_id, None)
        if result.outcome == "sent":
            self.sent += 1
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.SENT, reply, outcome.message_id
                )
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
        else:
            self.uncertain += 1
            self.pending.append(
                DeliveryResult(
                    self.key, subscriber_id, DeliveryState.UNCERTAIN, reply, outcome.message_id
                )
            )

    def flush(self) -> None:
        if self.pending:
            self.store.record_results(self.pending, run_id=self.run_id)
            self.pending = []


__all__ = [
    "DeliveryReport",
    "DryRunReport",
    "Outbound",
    "PreparedSend",
    "Progress",
    "RateLimiter",
    "SendOptions",
    "SendPlan",
    "describe_transport",
    "outbound_from_config",
    "prepare_send",
]
