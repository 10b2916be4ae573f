"""A small HTTP server on 127.0.0.1 for importer tests: routes, recorded requests, stalls.

Each route answers with a fixed :class:`Reply`, or with a function of the request
(for ETag handling). A route can ``stall`` on a :class:`threading.Event`, so a
timeout test waits for the client to give up and then releases the server
thread, with no sleeps.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    stall: threading.Event | None = None  # wait for this before answering
    declared_length: int | None = None  # a Content-Length to send instead of the real one
    omit_length: bool = False  # no Content-Length: the body ends when the connection closes


@dataclass(frozen=True)
class Request:
    path: str
    headers: Mapping[str, str]


Route = Reply | Callable[[Request], Reply]


class LocalServer:
    """Serve ``routes`` (path -> Reply) until closed; ``requests`` records what came in."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.scheme = "https" if tls else "http"
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()})
                with server._lock:
                    server.requests.append(request)
                route = server.routes.get(self.path.split("?")[0])
                reply = Reply(404, b"not here") if route is None else route
                if callable(reply):
                    reply = reply(request)
                if reply.stall is not None:
                    reply.stall.wait(timeout=30)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if reply.omit_length:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        length = (
                            reply.declared_length
                            if reply.declared_length is not None
                            else len(reply.body)
                        )
                        self.send_header("Content-Length", str(length))
                    self.end_headers()
                    if reply.status != 304:
                        self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first, as the size-limit tests expect

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:  # the handshake happens on accept, in the serving thread
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def requests_for(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up early (size limits, timeouts) are expected: no tracebacks."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def serve(tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    """Generator for a pytest fixture: a running server, closed afterwards."""
    server = LocalServer(tls)
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HTML = {"Content-Type": "text/html; charset=utf-8"}


class Dripper:
    """A server on 127.0.0.1 that answers every connection with ``data`` one byte at a
    time, a byte every ``interval`` seconds (within any read timeout), until ``close``.

    The slow-loris answer: each byte comes in time, the whole never does.
    """

    def __init__(self, data: bytes, interval: float) -> None:
        self.data = data
        self.interval = interval
        self.stopped = threading.Event()
        self.sent = 0  # bytes sent in all
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request
                for byte in self.data:
                    conn.sendall(bytes([byte]))
                    self.sent += 1
                    if self.stopped.wait(self.interval):  # paces the trickle
                        return
            except OSError:
                return  # the client hung up: what the tests want

    def close(self) -> None:
        self.stopped.set()
        self._listener.close()


def drip(data: bytes, interval: float) -> Iterator[Dripper]:
    """Generator for a pytest fixture: a :class:`Dripper`, closed afterwards."""
    dripper = Dripper(data, interval)
    try:
        yield dripper
    finally:
        dripper.close()
