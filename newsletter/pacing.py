"""Pacing for the receiving side: per-domain rates, slowing down when a domain says so,
and a warm-up plan's daily cap.

A sender on its own IP must not hit Gmail at 1,500 messages per second. Each recipient
domain gets a key: the longest ``[delivery.domains]`` entry it is or is under
("gmail.com" covers "gmail.com" and "x.gmail.com"), else the domain itself. A key with a
rate gets its sends spaced ``1/rate`` apart; the send loop holds that domain's claimed
rows back while the other domains' rows go ahead (see ``delivery._Run``), so one slow
domain does not stall the rest. A 421, or a 4xx that says it is about rate, volume or
too many messages, halves that key's rate (from what it was sending at, for a domain
without a limit) for a while; it then grows back by half every ``RECOVER_SECONDS``.

The configured limits are the newsletter's: on PostgreSQL, where several senders share
an issue, each paces at its ``share`` of them (the send loop counts the senders alive).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections import deque
from collections.abc import Callable, Sequence

from .config import Config

MIN_RATE = 0.2  # messages/s: a slowed-down domain never goes below this
RECOVER_SECONDS = 30.0  # after a rate-limit reply, the rate grows back this often
HOLD_SECONDS = 0.2  # rows held per throttled domain: about this much of its sending
RATE_WINDOW = 2.0  # seconds of sends remembered to tell what a domain was sending at
SLOW_DOWN_GUARD = 2.0  # seconds after a slow-down in which another one changes nothing

# Replies that mean "you send too fast" rather than "this mailbox is full": Gmail's
# 421-4.7.28 / 450-4.2.1 "rate", Yahoo's 421 4.7.0 [TSS04] "unexpected volume",
# Microsoft's 451 4.7.500 "server busy", and the many "too many messages/connections".
_RATE_LIMITED = re.compile(
    r"rate|limit|too many|volume|throttl|busy|4\.7\.(?:0|28|500)\b|TSS0\d",
    re.IGNORECASE,
)


def domain_of(email: str) -> str:
    return email.rpartition("@")[2].strip().lower().rstrip(".")


def is_rate_limited(code: int | None, reply: str) -> bool:
    """Whether a 4xx reply says the sender goes too fast (slow the domain down)."""
    if code == 421:
        return True
    return code is not None and 400 <= code < 500 and bool(_RATE_LIMITED.search(reply))


class DomainPacer:
    """Per-domain send slots. Not thread-safe: the send loop's own thread owns it."""

    def __init__(
        self,
        limits: Sequence[tuple[str, float]] = (),
        default: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = dict(limits)
        self.default = default
        # Senders sharing the limits (PostgreSQL: the runs alive on the database); each
        # paces at its part of every configured rate.
        self.share = 1
        self.clock = clock
        self.next_at: dict[str, float] = {}
        # key -> (rate, since, the rate it grows back to before its limit applies again)
        self.slowed: dict[str, tuple[float, float, float]] = {}
        self.recent: dict[str, deque[float]] = {}
        self._keys: dict[str, str] = {}

    def key(self, domain: str) -> str:
        """The limit ``domain`` counts against: a configured domain it is or is under, or
        itself."""
        found = self._keys.get(domain)
        if found is None:
            found = domain
            labels = domain.split(".")
            for start in range(len(labels)):
                candidate = ".".join(labels[start:])
                if candidate in self.limits:
                    found = candidate
                    break
            self._keys[domain] = found
        return found

    def configured(self, key: str) -> float | None:
        rate = self.limits.get(key, self.default)
        return rate / self.share if rate > 0 else None

    def rate(self, key: str) -> float | None:
        """Messages per second allowed to ``key`` now; None: no limit of its own."""
        configured = self.configured(key)
        slowed = self.slowed.get(key)
        if slowed is None:
            return configured
        rate, since, ceiling = slowed
        grown = rate * 1.5 ** int((self.clock() - since) / RECOVER_SECONDS)
        if grown < ceiling:
            return grown
        del self.slowed[key]  # recovered: back to its own limit, or none
        return configured

    def throttled(self, key: str) -> bool:
        return self.rate(key) is not None

    def hold(self, key: str) -> int:
        """How many claimed rows of ``key`` may wait for their slot."""
        rate = self.rate(key)
        return 1 if rate is None else max(2, math.ceil(rate * HOLD_SECONDS))

    def take(self, key: str) -> bool:
        """Use ``key``'s slot if it has come; never two within ``1/rate``."""
        rate = self.rate(key)
        now = self.clock()
        if rate is not None:
            at = self.next_at.get(key, now)
            if at > now:
                return False
            self.next_at[key] = max(at, now) + 1.0 / rate
        window = self.recent.setdefault(key, deque())
        window.append(now)
        while window and window[0] < now - RATE_WINDOW:
            window.popleft()
        return True

    def wait(self, key: str) -> float:
        """Seconds until ``key``'s next slot (0: now)."""
        return max(0.0, self.next_at.get(key, 0.0) - self.clock())

    def slow_down(self, key: str) -> float:
        """A rate-limit reply from ``key``: halve what it was allowed (or was sending at).

        Replies to the messages already in flight when the first one came say the same
        thing: within ``SLOW_DOWN_GUARD`` seconds of a slow-down, another changes nothing.
        """
        now = self.clock()
        slowed = self.slowed.get(key)
        if slowed is not None and now - slowed[1] < SLOW_DOWN_GUARD:
            return slowed[0]
        current = self.rate(key)
        if current is None:
            window = self.recent.get(key, deque())
            current = max(len(window) / RATE_WINDOW, MIN_RATE * 2)
        rate = max(MIN_RATE, current / 2)
        self.slowed[key] = (rate, now, current)
        self.next_at[key] = max(self.next_at.get(key, now), now) + 1.0 / rate
        return rate


def warmup_cap(config: Config, day: dt.date) -> int | None:
    """The warm-up plan's cap for ``day`` (UTC), or None when there is none that day."""
    settings = config.delivery
    if not settings.warmup_days or not settings.warmup_start:
        return None
    index = max(0, (day - dt.date.fromisoformat(settings.warmup_start)).days)
    if index >= settings.warmup_days:
        return None
    return math.ceil(settings.warmup_initial * settings.warmup_growth**index)


def start_of_day(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


__all__ = [
    "DomainPacer",
    "domain_of",
    "is_rate_limited",
    "start_of_day",
    "warmup_cap",
]
