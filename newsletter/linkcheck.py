"""Request every image and link of an email as a reader's client would (``check --online``).

HEAD first (no body to download), then GET when a server does not answer HEAD
properly; redirects are followed (at most :data:`MAX_REDIRECTS`). Each request
has the ``[fetch]`` timeout, a GET reads at most :data:`MAX_BODY` bytes, and the
whole check stops waiting after ``deadline`` seconds: whatever has not answered
by then is reported as such.

The links may come from pages and feeds someone else wrote, so every hop goes
through the same guard as fetching (:mod:`.importers.network`): a loopback,
private or metadata address is not requested (readers could not reach it
either) unless ``allow_private``. Addresses under ``trusted`` (the newsletter's
own public address, which may well be a local ``serve`` during a proof) are.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import urllib3

from . import __version__
from .errors import ImportSourceError
from .importers import network

MAX_REDIRECTS = 5
MAX_BODY = 64 * 1024
WORKERS = 8
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class LinkResult:
    """How one address answered: ``problem`` is "" when it did (2xx after redirects)."""

    url: str
    kind: str  # image | link
    status: int | None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class _Settings:
    headers: dict[str, str]
    timeout: urllib3.Timeout
    allow_private: bool
    trusted: str


def check_urls(
    urls: Sequence[tuple[str, str]],
    *,
    timeout: float = 20.0,
    deadline: float = 60.0,
    user_agent: str = f"newsletter/{__version__} (link check)",
    allow_private: bool = False,
    trusted: str = "",
) -> list[LinkResult]:
    """Request each ``(kind, url)`` (http and https only), in parallel; results in order.

    A hop to a loopback, private or metadata address is refused (a failure) unless
    ``allow_private`` or the hop is under ``trusted`` (a base URL, no trailing slash).
    """
    settings = _Settings(
        headers={"User-Agent": user_agent, "Accept": "*/*"},
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        allow_private=allow_private,
        trusted=trusted.rstrip("/"),
    )
    results: dict[int, LinkResult] = {}
    work: queue.Queue[int] = queue.Queue()
    for index in range(len(urls)):
        work.put(index)
    lock = threading.Lock()
    done = threading.Event()

    def worker() -> None:
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                return
            kind, url = urls[index]
            result = _request(settings, kind, url)
            with lock:
                results[index] = result
                if len(results) == len(urls):
                    done.set()

    if urls:
        # Daemon threads: a server that drips its answer cannot hold the process past the
        # deadline (the result is then "no answer").
        for _ in range(min(WORKERS, len(urls))):
            threading.Thread(target=worker, name="linkcheck", daemon=True).start()
        done.wait(deadline)
    with lock:
        return [
            results.get(index) or LinkResult(url, kind, None, f"no answer within {deadline:.0f} s")
            for index, (kind, url) in enumerate(urls)
        ]


class _Problem(Exception):
    """A request that cannot be made or followed (the message is the finding)."""


def _request(settings: _Settings, kind: str, url: str) -> LinkResult:
    if not url.lower().startswith(("http://", "https://")):
        return LinkResult(url, kind, None, "not an http(s) address")
    started = time.monotonic()
    try:
        status = _status(settings, "HEAD", url)
        if status >= 400:  # some servers refuse HEAD (405, 501) or answer it wrongly
            status = _status(settings, "GET", url)
    except _Problem as exc:
        return LinkResult(url, kind, None, str(exc))
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return LinkResult(url, kind, None, _describe(exc, time.monotonic() - started))
    if 200 <= status < 300:
        return LinkResult(url, kind, status)
    return LinkResult(url, kind, status, f"answered {status}")


def _status(settings: _Settings, method: str, url: str) -> int:
    """The status ``url`` answers ``method`` with, after redirects, every hop checked."""
    for hop in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise _Problem(f"a redirect led to {url!r}, not an http(s) address")
        trusted = bool(settings.trusted) and (
            url == settings.trusted or url.startswith(settings.trusted + "/")
        )
        try:
            addresses = network.resolve(
                parts,
                parts.netloc,
                allow_private=settings.allow_private or trusted,
                redirect=hop > 0,
            )
        except ImportSourceError as exc:
            if exc.message == "unknown host name":
                raise _Problem("the host name does not resolve") from None
            raise _Problem(
                f"not requested: {exc.message.removeprefix('refused to fetch from ')}; readers"
                " cannot reach it either ([fetch] allow_private = true requests it)"
            ) from None
        pool, response = network.open_pinned(
            parts, addresses, headers=settings.headers, timeout=settings.timeout, method=method
        )
        try:
            location = response.headers.get("location", "")
            if response.status not in _REDIRECTS or not location:
                if method == "GET":
                    response.read(MAX_BODY, decode_content=False)
                return int(response.status)
        finally:
            response.release_conn()
            pool.close()
        url = urllib.parse.urljoin(url, location.strip())
    raise _Problem(f"more than {MAX_REDIRECTS} redirects")


def _describe(exc: BaseException, elapsed: float) -> str:
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before: it is a timeout too
        return "cannot connect (connection refused or unreachable)"
    if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"no answer within {elapsed:.0f} s"
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return "the host name does not resolve"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS error (certificate?)"
    return f"{type(exc).__name__}: {exc}"
