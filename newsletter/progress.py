"""A progress line every few seconds for a send nobody watches on a terminal (a log, cron,
systemd): ``sent 1,200/5,000 (24%), 310 msgs/s, ETA 12 s``."""

from __future__ import annotations

import time
from collections.abc import Callable

from .delivery import Progress


def describe(progress: Progress) -> str:
    """One line: where the run stands, its rate and how long the rest will take."""
    total = max(progress.total, progress.done)
    share = f" ({100 * progress.done // total}%)" if total else ""
    rate = progress.rate
    left = total - progress.done
    eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
    extra = "".join(
        f", {number:,} {name}"
        for name, number in (
            ("failed", progress.failed),
            ("deferred", progress.deferred),
            ("uncertain", progress.uncertain),
        )
        if number
    )
    return f"sent {progress.sent:,}/{total:,}{share}, {rate:,.0f} msgs/s{eta}{extra}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """A ``progress`` callback for :meth:`PreparedSend.run` that emits a line at most every
    ``every`` seconds, and the last one when the run ends (``done == total``)."""

    def __init__(
        self,
        emit: Callable[[str], None],
        *,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.every = every
        self.clock = clock
        self.last: float | None = None
        self.finished = False

    def __call__(self, progress: Progress) -> None:
        now = self.clock()
        final = progress.total > 0 and progress.done >= progress.total
        if final and self.finished:
            return
        if self.last is None:
            self.last = now  # the first line comes after `every` seconds, not at once
            if not final:
                return
        if final or now - self.last >= self.every:
            self.last = now
            self.finished = final
            self.emit(describe(progress))


__all__ = ["ProgressLines", "describe"]
