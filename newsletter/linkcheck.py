"""Request every image and link of an email as a reader's client would (``check --online``).

HEAD first (no body to download), then GET when a server does not answer HEAD
properly; redirects are followed (at most :data:`MAX_REDIRECTS`). Each request
has the ``[fetch]`` timeout, a GET reads at most :data:`MAX_BODY` bytes, and the
whole check stops waiting after ``deadline`` seconds: whatever has not answered
by then is reported as such.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import urllib3

from . import __version__

MAX_REDIRECTS = 5
MAX_BODY = 64 * 1024
WORKERS = 8


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


def check_urls(
    urls: Sequence[tuple[str, str]],
    *,
    timeout: float = 20.0,
    deadline: float = 60.0,
    user_agent: str = f"newsletter/{__version__} (link check)",
) -> list[LinkResult]:
    """Request each ``(kind, url)`` (http and https only), in parallel; results in order."""
    pool = urllib3.PoolManager(
        num_pools=16,
        headers={"User-Agent": user_agent, "Accept": "*/*"},
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        retries=urllib3.Retry(
            total=MAX_REDIRECTS,
            connect=0,
            read=0,
            status=0,
            other=0,
            redirect=MAX_REDIRECTS,
            raise_on_redirect=True,
            raise_on_status=False,
        ),
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
            result = _request(pool, kind, url)
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


def _request(pool: urllib3.PoolManager, kind: str, url: str) -> LinkResult:
    if not url.lower().startswith(("http://", "https://")):
        return LinkResult(url, kind, None, "not an http(s) address")
    started = time.monotonic()
    try:
        response = pool.request("HEAD", url, preload_content=False)
        status = response.status
        response.release_conn()
        if status >= 400:  # some servers refuse HEAD (405, 501) or answer it wrongly
            response = pool.request("GET", url, preload_content=False)
            status = response.status
            response.read(MAX_BODY, decode_content=False)
            response.release_conn()
    except urllib3.exceptions.MaxRetryError as exc:
        reason = exc.reason
        if isinstance(reason, urllib3.exceptions.ResponseError) or reason is None:
            return LinkResult(url, kind, None, f"more than {MAX_REDIRECTS} redirects")
        return LinkResult(url, kind, None, _describe(reason, time.monotonic() - started))
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return LinkResult(url, kind, None, _describe(exc, time.monotonic() - started))
    if 200 <= status < 300:
        return LinkResult(url, kind, status)
    return LinkResult(url, kind, status, f"answered {status}")


def _describe(exc: BaseException, elapsed: float) -> str:
    if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"no answer within {elapsed:.0f} s"
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return "the host name does not resolve"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "cannot connect (connection refused or unreachable)"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS error (certificate?)"
    return f"{type(exc).__name__}: {exc}"
