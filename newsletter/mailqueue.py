"""A few threads that do slow work (sending a confirmation email) off the request path.

A request hands a job over and answers at once; a mail server that accepts and then
stalls holds up these threads only, never the web server's. The queue is bounded:
when it is full, :meth:`MailQueue.submit` says so at once and the caller carries on
(the job is simply not done; asking again later does it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

LOG = logging.getLogger("newsletter.mailqueue")

Job = Callable[[], None]


class MailQueue:
    """Run jobs on ``threads`` daemon threads, with at most ``size`` jobs waiting.

    Threads start with the first job. :meth:`close` stops taking jobs, drops those
    not started (each job must leave nothing half-done when it never runs) and waits
    a while for those running.
    """

    def __init__(self, *, threads: int = 2, size: int = 100, name: str = "newsletter-mail") -> None:
        if threads < 1 or size < 1:
            raise ValueError("a MailQueue needs at least one thread and one place")
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._size = size
        self._thread_count = threads
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting = 0  # submitted, not yet started
        self._running = 0
        self._closed = False
        self.done = 0
        self.failed = 0
        self.rejected = 0
        self.abandoned = 0

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (and nothing queued) when the queue is full or closed."""
        with self._lock:
            if self._closed or self._waiting >= self._size:
                self.rejected += 1
                return False
            self._waiting += 1
            self._jobs.put(job)
            if not self._threads:
                for number in range(self._thread_count):
                    thread = threading.Thread(
                        target=self._work, name=f"{self._name}-{number}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
        return True

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                if job is None:
                    return
                if self._closed:  # dropped by close() while this thread was looking
                    continue
                self._waiting -= 1
                self._running += 1
                self._changed.notify_all()
            ok = False
            try:
                job()
                ok = True
            except Exception:
                LOG.exception("background job failed")
            finally:
                with self._lock:
                    self._running -= 1
                    if ok:
                        self.done += 1
                    else:
                        self.failed += 1
                    self._changed.notify_all()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._waiting + self._running

    def wait_until(self, test: Callable[[int, int], bool], timeout: float) -> bool:
        """Wait until ``test(waiting, running)`` holds; False if ``timeout`` seconds passed."""
        with self._changed:
            return self._changed.wait_for(lambda: test(self._waiting, self._running), timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is queued or running; False if ``timeout`` seconds passed first."""
        return self.wait_until(lambda waiting, running: waiting + running == 0, timeout)

    def close(self, timeout: float = 5.0) -> int:
        """Take no more jobs, drop those not started, wait up to ``timeout`` seconds for
        the running ones. Returns how many were dropped. A job still running after
        that (a stalled mail server) goes on alone until its own timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            dropped = self._waiting
            self.abandoned += dropped
            self._waiting = 0
            self._changed.notify_all()
            threads = list(self._threads)
            for _ in threads:
                self._jobs.put(None)
        if dropped:
            LOG.warning("%d queued jobs dropped at shutdown", dropped)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        still = sum(thread.is_alive() for thread in threads)
        if still:
            LOG.warning("%d jobs still running at shutdown were left to finish", still)
        return dropped
