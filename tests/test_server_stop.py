"""Stopping the service while a request is being answered.

waitress answers each request on a worker thread, which wakes the server's loop through a
pipe (its "trigger") when the answer is written. Stopping must let that worker finish
before the pipe closes: once closed, its number may be another file's (the worker's
``os.write`` then lands in, say, the SQLite database) or nothing (``Bad file descriptor``
in waitress's log), and the answer never leaves. The test holds one request inside the
app and lets it go at the moment that matters to either order: when waitress's workers
are told to stop (the order that works) or when the trigger has been closed (the order
that did not, with the other connections still open).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from newsletter import server
from newsletter.config import Config
from newsletter.server import create_app, start_server

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
TOO_BIG = b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"


class Collected(logging.Handler):
    """waitress's warnings and errors, from any thread; not "Task queue depth is 1"
    (waitress.queue), which says a request waited for the one worker to be free."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "waitress.queue":
            self.records.append(record)


@pytest.fixture
def waitress_log() -> Iterator[list[logging.LogRecord]]:
    handler = Collected()
    logger = logging.getLogger("waitress")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    errors: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: errors.append(f"{args.thread}: {args.exc_value!r}")
    )
    return errors


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        while chunk := connection.recv(65536):
            received += chunk
    return received


def complete(answer: bytes) -> tuple[int, bytes]:
    """The status and body of one whole HTTP answer (its Content-Length all there)."""
    head, separator, body = answer.partition(b"\r\n\r\n")
    assert separator, f"no complete answer: {answer!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert len(body) == int(headers["content-length"])
    return int(status_line.split()[1]), body


@pytest.mark.server
@pytest.mark.parametrize("held", ["app", "waitress"])
def test_stop_lets_the_request_being_answered_finish(
    cfg: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    waitress_log: list[logging.LogRecord],
    thread_errors: list[str],
    held: str,
) -> None:
    """The answer being written when stop() is called reaches its client whole, and no
    worker writes to the closed trigger. Held in the app (a page) or in waitress's own
    refusal (a body over the limit, answered with the theme's error page): both run on a
    worker."""
    app = create_app(cfg, tmp_path / "news.db")
    entered, release, served = threading.Event(), threading.Event(), threading.Event()
    holding = threading.Event()

    def hold() -> None:
        if holding.is_set():
            entered.set()
            release.wait(10)

    if held == "app":
        request, expected = HEALTH, 200
        inner: Callable[..., Any] = app.wsgi_app

        def held_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            hold()
            return inner(environ, start_response)

        app.wsgi_app = held_app  # type: ignore[method-assign]
    else:
        request, expected = TOO_BIG, 413
        make_page = app.extensions[server._ERROR_PAGE]

        def held_page(code: int) -> str:
            hold()
            page: str = make_page(code)
            return page

        app.extensions[server._ERROR_PAGE] = held_page

    running = start_server(app, "127.0.0.1", 0, threads=1)
    waitress = running.server

    class Observed(waitress.channel_class):  # type: ignore[misc,name-defined]
        def service(self) -> None:
            try:
                super().service()
            finally:
                served.set()

    monkeypatch.setattr(waitress, "channel_class", Observed)

    # The order that works: no worker takes a new request; the one running may finish.
    shutdown = waitress.task_dispatcher.shutdown

    def shutting_down(*args: Any, **kwargs: Any) -> Any:
        release.set()
        return shutdown(*args, **kwargs)

    monkeypatch.setattr(waitress.task_dispatcher, "shutdown", shutting_down)

    # The order that did not: the trigger is closed while the request is still in the
    # app. The server's thread stays here until the worker is done, as it would while
    # closing many other connections.
    close_trigger = waitress.trigger._close

    def closing_trigger() -> None:
        close_trigger()
        release.set()
        served.wait(10)

    monkeypatch.setattr(waitress.trigger, "_close", closing_trigger)

    # Once unheld, so that the held request opens no file (templates, the database
    # connection of the one worker) that could take the closed pipe's number.
    warm_up = request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    assert complete(exchange(running.port, warm_up))[0] == expected
    served.clear()
    holding.set()

    answers: list[bytes] = []
    client = threading.Thread(target=lambda: answers.append(exchange(running.port, request)))
    client.start()
    assert entered.wait(10)
    running.stop()
    client.join(10)

    assert not client.is_alive() and served.is_set()
    assert [f"{r.getMessage()}: {r.exc_info and r.exc_info[1]!r}" for r in waitress_log] == []
    assert thread_errors == []
    status, body = complete(answers[0])
    assert status == expected
    assert body == b"ok\n" if held == "app" else b"<html" in body
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2)


@pytest.mark.server
def test_stop_gives_up_on_a_request_that_outlasts_its_timeout(
    cfg: Config,
    tmp_path: Path,
    waitress_log: list[logging.LogRecord],
    thread_errors: list[str],
) -> None:
    """A request still in the app when the timeout ends does not hold stop() up: its
    connection closes unanswered, and when it does end nothing fails."""
    app = create_app(cfg, tmp_path / "news.db")
    entered, release = threading.Event(), threading.Event()
    inner: Callable[..., Any] = app.wsgi_app

    def stuck(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        entered.set()
        release.wait(10)
        return inner(environ, start_response)

    app.wsgi_app = stuck  # type: ignore[method-assign]
    running = start_server(app, "127.0.0.1", 0, threads=1)
    answers: list[bytes] = []
    client = threading.Thread(target=lambda: answers.append(exchange(running.port, HEALTH)))
    client.start()
    assert entered.wait(10)
    running.stop(timeout=0.2)
    assert not running.thread.is_alive()
    client.join(10)
    assert answers == [b""]

    release.set()
    workers = running.server.task_dispatcher
    with workers.lock:
        assert workers.thread_exit_cv.wait_for(lambda: not workers.threads, 10)
    assert [r.getMessage() for r in waitress_log] == ["1 thread(s) still running"]
    assert thread_errors == []
