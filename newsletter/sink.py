"""A local SMTP server that keeps what it receives: the embedded default for trying the tool.

``newsletter smtp-sink`` runs it; tests, the benchmark and the README demo start
it in a background thread with :func:`start_sink`. It is a real aiosmtpd
server on a loopback address that stores each message in a Maildir (so a mail
client can open it), optionally also as ``.eml`` files, or only counts them.

aiosmtpd reads DATA one line at a time, which caps it near 550 messages per
second; :class:`FastSMTP` reads the whole body with one ``readuntil`` instead.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from .errors import TransportError
from .transport import OutboxTransport, is_loopback, maildir_deliver, trace_headers

__all__ = [
    "DATA_SIZE_LIMIT",
    "FastSMTP",
    "LoopbackController",
    "RunningSink",
    "SinkHandler",
    "SinkMessage",
    "format_message_line",
    "start_sink",
]

DATA_SIZE_LIMIT = 32 * 1024 * 1024  # bytes, as aiosmtpd's default
_TERMINATOR = b"\r\n.\r\n"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(
    rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>\s*(.*)",
    re.DOTALL,
)


class FastSMTP(SMTP):
    """aiosmtpd's SMTP with DATA read in one ``readuntil`` rather than line by line.

    Same replies and hooks as the original (``handle_DATA`` gets
    ``envelope.content`` as dot-unstuffed bytes); ``decode_data`` is not supported.
    """

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL/RCPT address with the email package's full
        # RFC 5322 parser (~100 µs); a plain <local@domain> needs only a regex.
        match = _PLAIN_ADDRESS.match(arg)
        if match is None or (
            self.local_part_limit and len(match.group(1).rpartition("@")[0]) > self.local_part_limit
        ):
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        return match.group(1), match.group(2)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await self._read_data()
        except asyncio.CancelledError:
            # The connection was lost during DATA.
            self._writer.close()
            raise
        if content is None:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | None:
        """The unstuffed message, or None if it was larger than ``data_size_limit``."""
        reader: asyncio.StreamReader = self._reader
        limit: int | None = self.data_size_limit
        # The reader's limit is the longest command line; lift it while reading
        # DATA so that a whole message fits one readuntil (restored below).
        saved = reader._limit  # type: ignore[attr-defined]
        reader._limit = (limit or 1 << 30) + len(_TERMINATOR)  # type: ignore[attr-defined]
        too_big = False
        dotted = True  # whether a line may need un-stuffing (the fast path knows)
        try:
            head = await reader.readexactly(3)
            if head == b".\r\n":  # an empty message
                return b""
            if b"\r" in head or b"\n" in head:
                # A first line shorter than 3 bytes: only then could the end marker
                # start inside ``head``; go line by line (never in real mail).
                data = head
                while not (b"\r\n" + data).endswith(_TERMINATOR):
                    try:
                        data += await reader.readuntil(b"\n")
                    except asyncio.LimitOverrunError as exc:
                        data += await reader.readexactly(exc.consumed)
                    if limit and len(data) > limit + 3:
                        too_big = True
                        data = data[-len(_TERMINATOR) :]  # enough to see the end marker
            else:
                data, too_big, dotted = await self._read_body(reader, head, limit)
        finally:
            reader._limit = saved  # type: ignore[attr-defined]
        if too_big or (limit and len(data) - 3 > limit):
            return None
        content = data[:-3]  # keep the last line's CRLF, drop ".\r\n"
        if content.startswith(b"."):
            content = content[1:]
        if dotted:
            content = content.replace(b"\r\n.", b"\r\n")
        return content

    @staticmethod
    async def _read_body(
        reader: asyncio.StreamReader, head: bytes, limit: int | None
    ) -> tuple[bytes, bool, bool]:
        """The raw body after ``head`` up to and including the end marker, whether it
        was too big, and whether any other line started with ".".

        It reads up to each line that starts with "." (``CRLF .``), so that one scan
        both finds the end marker and sees whether any line needs un-stuffing: a
        message without dotted lines (all a newsletter sends) is scanned once.
        """
        pieces = [head]
        size = len(head)
        too_big = dotted = False
        while True:
            try:
                piece = await reader.readuntil(b"\r\n.")
            except asyncio.LimitOverrunError as exc:
                too_big = True  # no dotted line within the limit: drop what is buffered
                await reader.readexactly(exc.consumed)
                pieces = []
                continue
            size += len(piece)
            if limit and size > limit + 3:
                too_big = True
            pieces = [] if too_big else pieces
            pieces.append(piece)
            after = await reader.readexactly(1)
            if after == b"\r":
                after += await reader.readexactly(1)
                if after == b"\r\n":
                    pieces.append(after)
                    return b"".join(pieces), too_big, dotted
                if after.endswith(b"\r"):
                    # "CRLF . CR CR": not valid SMTP; the second CR may start the end
                    # marker, so read the rest line by line, as aiosmtpd does.
                    data = b"".join(pieces) + after
                    while not data.endswith(_TERMINATOR):
                        try:
                            data += await reader.readuntil(b"\n")
                        except asyncio.LimitOverrunError as exc:
                            data += await reader.readexactly(exc.consumed)
                        if limit and len(data) > limit + 3:
                            too_big = True
                            data = data[-len(_TERMINATOR) :]
                    return data, too_big, True
            dotted = True
            pieces.append(after)
            size += len(after)


class LoopbackController(Controller):
    """aiosmtpd's threaded Controller, able to bind port 0 and report the port it got."""

    def __init__(
        self,
        handler: Any,
        hostname: str = "127.0.0.1",
        port: int = 0,
        *,
        smtp_class: type[SMTP] = FastSMTP,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("server_hostname", "localhost")  # avoids a DNS lookup per connection
        super().__init__(handler, hostname=hostname, port=port, **kwargs)
        self.smtp_class = smtp_class
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory(self) -> SMTP:
        smtp = self.smtp_class(self.handler, **self.SMTP_kwargs)
        self._sessions.add(smtp)
        return smtp

    def stop(self, no_assert: bool = False) -> None:
        """Stop, hanging up on connected clients first (aiosmtpd leaves them open)."""

        def hang_up() -> None:
            for smtp in list(self._sessions):
                if smtp.transport is not None:
                    smtp.transport.close()

        if self._thread is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(hang_up)
        super().stop(no_assert)

    def _run(self, ready_event: threading.Event) -> None:
        try:
            super()._run(ready_event)
        finally:
            ready_event.set()  # also when binding failed, so start() need not wait out a timeout

    def _trigger_server(self) -> None:
        if self._thread_exception is not None:
            raise self._thread_exception  # binding failed: say why, at once
        sockets = getattr(self.server, "sockets", None)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class SinkMessage:
    """One message the sink received, and where it stored it."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    paths: tuple[Path, ...] = ()
    received_at: float = 0.0

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def subject(self) -> str:
        return _subject(self.data)


_SUBJECT = re.compile(rb"^Subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _subject(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _SUBJECT.search(head)
    if not match:
        return ""
    raw = re.sub(rb"\r?\n[ \t]", b" ", match.group(1)).decode("utf-8", "replace").strip()
    try:
        return str(make_header(decode_header(raw)))
    except (ValueError, LookupError):
        return raw


def format_message_line(message: SinkMessage) -> str:
    """One line for the terminal: time, envelope, size, subject, where it is stored."""
    stamp = time.strftime("%H:%M:%S", time.localtime(message.received_at or time.time()))
    size = f"{message.size / 1024:.1f} kB"
    to = ", ".join(message.recipients)
    where = f"  {message.paths[0]}" if message.paths else ""
    return f"{stamp}  {message.mail_from or '<>'} -> {to}  {size}  {message.subject!r}{where}"


class SinkHandler:
    """Stores each message in a Maildir and/or an outbox, or only counts it."""

    def __init__(
        self,
        maildir: Path | None = None,
        outbox: Path | None = None,
        on_message: Callable[[SinkMessage], None] | None = None,
    ) -> None:
        self.maildir = maildir
        self.outbox = OutboxTransport(outbox) if outbox is not None else None
        self.on_message = on_message
        self.count = 0
        self.changed = threading.Condition()
        if maildir is not None:
            for sub in ("tmp", "new", "cur"):
                (maildir / sub).mkdir(parents=True, exist_ok=True)
        if self.outbox is not None:
            self.outbox.open()
        self._names = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.content
        assert isinstance(data, bytes)  # FastSMTP never decodes
        mail_from: str = envelope.mail_from or ""
        recipients = tuple(envelope.rcpt_tos)
        paths: list[Path] = []
        if self.maildir is not None or self.outbox is not None:
            # Written on the event loop thread: ~0.1 ms per file here, and a
            # writer thread measured slower (hand-offs and the GIL cost more).
            try:
                paths = self._store(mail_from, recipients, data)
            except (OSError, TransportError) as exc:
                return f"451 4.3.0 cannot store the message: {exc}"
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        if self.on_message is not None:
            self.on_message(SinkMessage(mail_from, recipients, data, tuple(paths), time.time()))
        return "250 2.0.0 OK stored" if paths else "250 2.0.0 OK"

    def _store(self, mail_from: str, recipients: tuple[str, ...], data: bytes) -> list[Path]:
        paths = []
        for recipient in recipients:
            if self.maildir is not None:
                self._names += 1
                name = f"{time.time_ns()}.S{id(self):x}Q{self._names}.newsletter-sink"
                copy = trace_headers(mail_from, recipient, data) + data
                paths.append(maildir_deliver(self.maildir, name, copy, fsync=False))
            if self.outbox is not None:
                self.outbox.send(mail_from, recipient, data)
        return paths


class RunningSink:
    """A sink serving in a background thread: ``.port``, ``.count``, ``.stop()``."""

    def __init__(self, controller: LoopbackController, handler: SinkHandler) -> None:
        self._controller = controller
        self.handler = handler
        self.host: str = controller.hostname
        self.port: int = controller.port
        self._stopped = threading.Event()

    @property
    def count(self) -> int:
        """Messages received so far."""
        return self.handler.count

    @property
    def maildir(self) -> Path | None:
        return self.handler.maildir

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until ``count`` messages have arrived (True) or ``timeout`` passes (False)."""
        with self.handler.changed:
            return self.handler.changed.wait_for(lambda: self.handler.count >= count, timeout)

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from another thread) or Ctrl-C."""
        while not self._stopped.wait(1.0):
            pass

    def stop(self) -> None:
        """Stop listening and end the thread; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._controller.stop()

    def __enter__(self) -> RunningSink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RunningSink({self.host}:{self.port}, {self.count} messages)"


def start_sink(
    maildir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    outbox: Path | None = None,
    on_message: Callable[[SinkMessage], None] | None = None,
    allow_remote: bool = False,
    data_size_limit: int = DATA_SIZE_LIMIT,
) -> RunningSink:
    """Start a sink in a background thread and return once it accepts connections.

    ``maildir`` and ``outbox`` both None means count only (for benchmarks).
    ``port=0`` picks a free port (read it from ``.port``). A host that is not
    loopback is refused unless ``allow_remote``: anyone who can reach it could
    drop mail into the folders.
    """
    where = f"{host}:{port}"
    if not is_loopback(host, resolve=False) and not allow_remote:
        raise TransportError(
            "refusing to listen on a non-loopback address",
            where=where,
            hint="use 127.0.0.1; anyone who can reach the sink can drop mail in it "
            "(--allow-remote if you really mean it)",
        )
    try:
        handler = SinkHandler(maildir, outbox, on_message)
    except OSError as exc:
        raise TransportError(
            f"cannot create the sink's folders: {exc.strerror or exc}",
            where=str(exc.filename or maildir or outbox),
            hint="choose a writable --maildir",
        ) from None
    controller = LoopbackController(
        handler, hostname=host, port=port, data_size_limit=data_size_limit
    )
    try:
        controller.start()
    except OSError as exc:
        controller.stop(no_assert=True)
        controller.loop.close()
        raise TransportError(
            f"cannot listen: {exc.strerror or exc}",
            where=where,
            hint="is another smtp-sink running there? choose another --port",
        ) from None
    return RunningSink(controller, handler)
