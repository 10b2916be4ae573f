"""Handing finished message bytes to something that delivers or keeps them.

One small interface, like Django's mail backends: ``open``, ``send`` one message
to one recipient, ``close``. Versions: SMTP (smtplib), a Maildir, an outbox of
``.eml`` files, and memory (tests).

The contract every version keeps, because the delivery ledger depends on it:

* ``send`` returns a :class:`SendResult` whose ``outcome`` is the truth about
  that one message: ``sent``, ``failed`` (permanent, 5xx), ``deferred``
  (temporary, 4xx: try again later) or ``uncertain`` (the whole message went
  out but the server's answer was lost, so it may or may not have been taken).
* ``send`` raises :class:`~newsletter.errors.TransportError` only when the
  message certainly was not handed over (server unreachable, login refused,
  outbox not writable); the caller may send it again later.
* ``send`` opens the connection if needed; ``close`` is idempotent.
* One instance is used by one thread; instances share no state, so K threads
  can each own one.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from .config import ENV_SMTP_PASSWORD, Config, SmtpSettings
from .errors import ConfigError, TransportError
from .files import atomic_write_bytes

Outcome = Literal["sent", "failed", "deferred", "uncertain"]
TransportKind = Literal["smtp", "outbox"]

__all__ = [
    "CopyToOutbox",
    "MaildirTransport",
    "MemoryTransport",
    "OutboxTransport",
    "Outcome",
    "SendResult",
    "SmtpTransport",
    "StoredMessage",
    "Transport",
    "TransportKind",
    "WireReady",
    "is_loopback",
    "maildir_deliver",
    "smtp_data_bytes",
    "trace_headers",
    "transport_from_config",
]


@dataclass(frozen=True)
class SendResult:
    """What happened to one message for one recipient."""

    recipient: str
    outcome: Outcome
    code: int | None = None
    reply: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "sent"


class Transport(Protocol):
    """Send finished message bytes to one recipient at a time."""

    def open(self) -> None: ...

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult: ...

    def close(self) -> None: ...


def is_loopback(host: str, *, resolve: bool) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, ``localhost`` names).

    ``resolve=False`` looks at the spelling alone: a decision about sending a password
    in clear must not depend on what a DNS server answers. ``resolve=True`` also looks
    a name up and accepts it when every address it has is loopback (the preview's
    warning, where a name from /etc/hosts is a fair thing to bind to).
    """
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if not resolve or not name:
        return False
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0])).is_loopback for i in infos)


def trace_headers(envelope_from: str, recipient: str, message: bytes) -> bytes:
    """``Return-Path`` and ``Delivered-To`` lines, as a delivery agent adds to a stored copy.

    They record the envelope, which is otherwise lost once a message is a file,
    and use the message's own line ending.
    """
    first = message.find(b"\n")
    eol = b"\n" if first == 0 or (first > 0 and message[first - 1] != 13) else b"\r\n"
    return (
        b"Return-Path: <"
        + _header_safe(envelope_from)
        + b">"
        + eol
        + b"Delivered-To: "
        + _header_safe(recipient)
        + eol
    )


def _header_safe(value: str) -> bytes:
    return value.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class StoredMessage:
    """A message as a test transport kept it."""

    envelope_from: str
    recipient: str
    data: bytes


class MemoryTransport:
    """Keeps every message in ``messages``; for tests and dry runs."""

    def __init__(self) -> None:
        self.messages: list[StoredMessage] = []
        self.opened = 0  # how many times a connection was opened
        self.is_open = False

    def open(self) -> None:
        if not self.is_open:
            self.is_open = True
            self.opened += 1

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        self.open()
        self.messages.append(StoredMessage(envelope_from, recipient, bytes(message)))
        return SendResult(recipient, "sent", 250, "kept in memory")

    def close(self) -> None:
        self.is_open = False

    def __repr__(self) -> str:
        return f"MemoryTransport({len(self.messages)} messages)"


# --------------------------------------------------------------------------- files

_sequence = itertools.count(1)  # next() on itertools.count is atomic: unique names across threads
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _unique_stem() -> str:
    return f"{time.time_ns()}.P{os.getpid()}Q{next(_sequence)}"


def _file_error(path: Path, exc: OSError) -> TransportError:
    return TransportError(
        f"cannot write a message file: {exc.strerror or exc}",
        where=str(path),
        hint="check that the folder exists, is writable and the disk is not full",
    )


class MaildirTransport:
    """Delivers into a Maildir (``tmp/`` then rename into ``new/``), readable by mail clients.

    Each stored copy starts with ``Return-Path`` and ``Delivered-To`` lines
    (see :func:`trace_headers`); the rest is the message byte for byte.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._ready = False

    def open(self) -> None:
        if self._ready:
            return
        try:
            for sub in ("tmp", "new", "cur"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _file_error(self.path, exc) from None
        self._ready = True

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        self.open()
        name = f"{_unique_stem()}.{_HOST}"
        try:
            path = maildir_deliver(
                self.path,
                name,
                trace_headers(envelope_from, recipient, message) + message,
                fsync=self.fsync,
            )
        except OSError as exc:
            raise _file_error(self.path, exc) from None
        return SendResult(recipient, "sent", None, f"saved {path.name}")

    def close(self) -> None:
        self._ready = False

    def __repr__(self) -> str:
        return f"MaildirTransport({str(self.path)!r})"


def maildir_deliver(maildir: Path, name: str, data: bytes, *, fsync: bool) -> Path:
    """Write ``data`` to ``maildir/tmp/name``, then rename it into ``new/`` (Maildir's protocol)."""
    tmp = maildir / "tmp" / name
    final = maildir / "new" / name
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


class OutboxTransport:
    """Writes each message atomically as one ``.eml`` file in a folder (``.newsletter/outbox/``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def open(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _file_error(self.path, exc) from None

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        safe = re.sub(r"[^A-Za-z0-9@._+-]", "_", recipient)[:80]
        path = self.path / f"{_unique_stem()}-{safe}.eml"
        try:
            atomic_write_bytes(path, trace_headers(envelope_from, recipient, message) + message)
        except OSError as exc:
            raise _file_error(self.path, exc) from None
        return SendResult(recipient, "sent", None, f"saved {path.name}")

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"OutboxTransport({str(self.path)!r})"


class CopyToOutbox:
    """Sends through ``inner`` and keeps a copy of each *sent* message in an outbox."""

    def __init__(self, inner: Transport, outbox: OutboxTransport) -> None:
        self.inner = inner
        self.outbox = outbox

    def open(self) -> None:
        self.outbox.open()
        self.inner.open()

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        result = self.inner.send(envelope_from, recipient, message)
        if result.outcome == "sent":
            try:
                self.outbox.send(envelope_from, recipient, message)
            except TransportError as exc:
                # The message did go out: a lost copy must not make it look unsent.
                return replace(result, reply=f"{result.reply} (no outbox copy: {exc})")
        return result

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"CopyToOutbox({self.inner!r}, {self.outbox!r})"


# --------------------------------------------------------------------------- SMTP

_EOL = re.compile(rb"\r\n|\r|\n")


class WireReady(bytes):
    """Message bytes whose maker guarantees what SMTP needs: CRLF line ends only (no bare
    CR or LF) and no line that starts with ".", so no dot-stuffing.

    :func:`smtp_data_bytes` then only appends the end marker. Its checks scan the whole
    message several times, and a newsletter is ~130 kB: they cost more than the rest
    of the client's work per message. ``message.prepare`` makes such bytes.
    """

    __slots__ = ()


def smtp_data_bytes(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, ending in ``CRLF . CRLF``.

    Done once per message (and reused if the message is retried).
    """
    if isinstance(message, WireReady):
        return message + (b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n")
    if message.count(b"\n") != message.count(b"\r\n") or message.count(b"\r") != message.count(
        b"\n"
    ):
        message = _EOL.sub(b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    message = message.replace(b"\r\n.", b"\r\n..")
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"


def _angle(address: str) -> str:
    """``<address>`` for the SMTP envelope (``<>`` for the null sender)."""
    if "<" in address or " " in address or "(" in address:
        return smtplib.quoteaddr(address)
    return f"<{address}>"


def _no_delay(smtp: smtplib.SMTP) -> None:
    """Turn off Nagle's algorithm: SMTP is request/reply, and the last piece of a message
    would otherwise wait for the server's delayed ACK."""
    sock = getattr(smtp, "sock", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Retry(Exception):
    """A failure before the message was complete: safe to reconnect and send again."""

    def __init__(self, code: int | None, reply: str) -> None:
        super().__init__(reply)
        self.code = code
        self.reply = reply


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


class SmtpTransport:
    """SMTP through smtplib: TLS checked, AUTH only when safe, one reused connection.

    Replies map to outcomes: 2xx sent, 4xx deferred, 5xx failed. A 421, a
    dropped connection or a timeout before the end of the message makes it
    reconnect once and send that message once more; if the connection is lost
    after the final dot, the result is ``uncertain``, never a silent resend.
    A 5xx to MAIL FROM raises: the sender is refused, so every message would be.

    The connection is reused for ``max_per_connection`` messages (0: no limit).
    RSET is sent only after a transaction that did not finish (a refused RCPT,
    say): a finished DATA already resets the session (RFC 5321 4.1.1.4), and an
    RSET per message would add a round trip to every message.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        password: str | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ehlo_name: str = "",
    ) -> None:
        self.settings = settings
        self._password = password
        self._ssl_context = ssl_context
        self._ehlo_name = settings.helo_name or ehlo_name or "localhost"
        self._smtp: smtplib.SMTP | None = None
        self._on_connection = 0  # transactions started on the current connection
        self._dirty = False  # a transaction was left half-done: RSET before the next
        self.connections = 0  # connections opened so far (for reports and tests)
        self._check_settings()

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def __repr__(self) -> str:
        s = self.settings
        password = "<set>" if self._password else None
        return (
            f"SmtpTransport({self.where}, security={s.security}, "
            f"username={s.username!r}, password={password})"
        )

    def _check_settings(self) -> None:
        s = self.settings
        if s.security not in ("starttls", "ssl", "none"):
            raise ConfigError(
                f"[smtp] security '{s.security}' is not valid",
                where=self.where,
                hint="use starttls, ssl or none",
            )
        if not s.username:
            return
        if s.security == "none" and not is_loopback(s.host, resolve=False):
            raise TransportError(
                "refusing to send the SMTP password unencrypted to a non-loopback host",
                where=self.where,
                hint='set [smtp] security = "starttls" (port 587) or "ssl" (port 465)',
            )
        if not self._password:
            raise ConfigError(
                f"[smtp] username is set but {ENV_SMTP_PASSWORD} is not",
                where=self.where,
                hint=f"export {ENV_SMTP_PASSWORD} in the environment (never in newsletter.toml)",
            )

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        cafile = self.settings.ca_file or None
        try:
            return ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load [smtp] ca_file: {getattr(exc, 'strerror', None) or exc}",
                where=str(cafile),
                hint="point ca_file at a PEM file of trusted certificates",
            ) from None

    # -- connection

    def open(self) -> None:
        """Connect, say EHLO, STARTTLS if asked, log in if a username is set."""
        if self._smtp is not None:
            return
        self._smtp = self._connect()
        self._on_connection = 0
        self._dirty = False
        self.connections += 1

    def close(self) -> None:
        """QUIT politely if connected; safe to call any number of times."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            smtp.close()

    def __enter__(self) -> SmtpTransport:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _drop(self) -> None:
        """Forget a connection that the server closed or broke (no QUIT)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _fail(self, message: str, hint: str) -> TransportError:
        if self._password and self._password in message:
            message = message.replace(self._password, "***")
        return TransportError(message, where=self.where, hint=hint)

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = self._context() if s.security != "none" else None
        try:
            if s.security == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    s.host,
                    s.port,
                    local_hostname=self._ehlo_name,
                    timeout=s.timeout,
                    context=context,
                )
            else:
                smtp = smtplib.SMTP(
                    s.host, s.port, local_hostname=self._ehlo_name, timeout=s.timeout
                )
            try:
                _no_delay(smtp)
                self._greet(smtp, context)
            except BaseException:
                smtp.close()
                raise
            return smtp
        except TransportError:
            raise
        except ssl.SSLCertVerificationError as exc:
            trusted = (
                f"the CAs in [smtp] ca_file ({self.settings.ca_file})"
                if self.settings.ca_file
                else "the system's CAs ([smtp] ca_file is not set)"
            )
            raise self._fail(
                f"the server's TLS certificate was not accepted: {exc.verify_message}; "
                f"checked against {trusted}",
                "fix the server's certificate, or connect by the name on it; for a private CA "
                "point [smtp] ca_file at its PEM certificate",
            ) from None
        except ssl.SSLError as exc:
            raise self._fail(
                f"TLS failed: {exc.reason or exc}",
                'check [smtp] security: port 465 usually wants "ssl", port 587 "starttls"',
            ) from None
        except smtplib.SMTPAuthenticationError as exc:
            raise self._fail(
                f"login refused: {exc.smtp_code} {_text(exc.smtp_error)}",
                f"check [smtp] username and {ENV_SMTP_PASSWORD}",
            ) from None
        except smtplib.SMTPConnectError as exc:
            raise self._fail(
                f"the server refused the session: {exc.smtp_code} {_text(exc.smtp_error)}",
                "try again later, or check [smtp] host and port",
            ) from None
        except TimeoutError:
            raise self._fail(
                f"no answer within {s.timeout:g} s",
                "check [smtp] host and port, or raise [smtp] timeout",
            ) from None
        except smtplib.SMTPServerDisconnected as exc:
            if "timed out" in str(exc):
                raise self._fail(
                    f"no answer within {s.timeout:g} s",
                    "check [smtp] host and port, or raise [smtp] timeout",
                ) from None
            raise self._fail(
                f"the server closed the connection: {_text(str(exc))}",
                'check [smtp] security and port (465 usually wants "ssl")',
            ) from None
        except ConnectionRefusedError:
            raise self._fail(
                "connection refused",
                "is the mail server running? check [smtp] host and port; to try things "
                "locally run `newsletter smtp-sink`",
            ) from None
        except smtplib.SMTPException as exc:
            raise self._fail(
                f"SMTP error: {_text(str(exc))}", "check the [smtp] settings"
            ) from None
        except OSError as exc:
            raise self._fail(
                f"cannot connect: {exc.strerror or exc}", "check [smtp] host and port"
            ) from None

    def _greet(self, smtp: smtplib.SMTP, context: ssl.SSLContext | None) -> None:
        s = self.settings
        code, reply = smtp.ehlo()
        if not 200 <= code < 300:
            code, reply = smtp.helo()
            if not 200 <= code < 300:
                raise self._fail(
                    f"the server refused EHLO/HELO: {code} {_text(reply)}", "check [smtp] helo_name"
                )
        if s.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise self._fail(
                    "the server does not offer STARTTLS",
                    'use [smtp] security = "ssl" if it expects TLS from the start (port 465)',
                )
            code, reply = smtp.starttls(context=context)
            if code != 220:
                raise self._fail(
                    f"STARTTLS refused: {code} {_text(reply)}", "check the server's TLS setup"
                )
            smtp.ehlo()
        if s.username:
            if not smtp.has_extn("auth"):
                raise self._fail(
                    "the server does not offer AUTH",
                    "remove [smtp] username if it needs no login, or use starttls/ssl",
                )
            assert self._password is not None  # checked in __init__
            smtp.login(s.username, self._password)

    # -- sending

    def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        """Send one message to one recipient; see the module docstring for outcomes."""
        if any(c in envelope_from + recipient for c in "\r\n"):
            return SendResult(recipient, "failed", None, "address contains a line break")
        data = smtp_data_bytes(message)
        eight_bit = not message.isascii()
        for attempt in (1, 2):
            if (
                self._smtp is not None
                and self.settings.max_per_connection > 0
                and self._on_connection >= self.settings.max_per_connection
            ):
                self.close()
            self.open()
            try:
                return self._transaction(envelope_from, recipient, data, eight_bit)
            except _Retry as retry:
                self._drop()
                if attempt == 2:
                    return SendResult(recipient, "deferred", retry.code, retry.reply)
        raise AssertionError("unreachable")  # pragma: no cover

    def _transaction(
        self, envelope_from: str, recipient: str, data: bytes, eight_bit: bool
    ) -> SendResult:
        smtp = self._smtp
        assert smtp is not None
        options: list[str] = []
        if not (envelope_from + recipient).isascii():
            if not smtp.has_extn("smtputf8"):
                return SendResult(
                    recipient,
                    "failed",
                    None,
                    "the address is not ASCII and the server does not support SMTPUTF8",
                )
            options.append("SMTPUTF8")
        if eight_bit and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")

        def step(code: int, reply: bytes) -> SendResult | None:
            """None to go on; else the result for a refusal. 421 means reconnect."""
            if code == 421 or code == -1:
                raise _Retry(code, _text(reply) or "the server closed the session")
            if 400 <= code < 500:
                return SendResult(recipient, "deferred", code, _text(reply))
            if code >= 500:
                return SendResult(recipient, "failed", code, _text(reply))
            return None

        try:
            if self._dirty:
                code, reply = smtp.rset()
                if code != 250:
                    raise _Retry(code, f"RSET refused: {_text(reply)}")
            self._dirty = True
            self._on_connection += 1
            # docmd rather than smtp.mail/rcpt: their address re-parsing costs
            # more than the rest of the client's work for a message.
            smtp.command_encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
            suffix = "".join(f" {option}" for option in options)
            code, reply = smtp.docmd("MAIL", f"FROM:{_angle(envelope_from)}{suffix}")
            if 500 <= code < 600:
                raise self._fail(
                    f"the server refused the sender <{envelope_from}>: {code} {_text(reply)}",
                    "check [newsletter] sender is an address this server lets you send from",
                )
            refused = step(code, reply)
            if refused is None:
                code, reply = smtp.docmd("RCPT", f"TO:{_angle(recipient)}")
                refused = step(code, reply)
            if refused is None:
                code, reply = smtp.docmd("DATA")
                if code != 354:
                    refused = step(code, reply) or SendResult(
                        recipient, "failed", code, f"unexpected reply to DATA: {_text(reply)}"
                    )
            if refused is not None:
                return refused
            smtp.send(data)  # raises before the final dot is out: safe to retry
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError) as exc:
            raise _Retry(None, f"connection lost: {_text(str(exc))}") from None
        try:
            code, reply = smtp.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            return SendResult(
                recipient,
                "uncertain",
                None,
                f"connection lost after the whole message was sent: {_text(str(exc))}",
            )
        if code == -1:
            # An answer to the final dot that is not a reply: nobody knows if it was taken.
            self._drop()
            return SendResult(
                recipient,
                "uncertain",
                None,
                f"unreadable reply after the whole message was sent: {_text(reply)}",
            )
        self._dirty = False
        return step(code, reply) or SendResult(recipient, "sent", code, _text(reply))


# --------------------------------------------------------------------------- factory


def transport_from_config(
    config: Config,
    *,
    kind: TransportKind = "smtp",
    ssl_context: ssl.SSLContext | None = None,
) -> Transport:
    """A new transport for one sending thread, as the workspace config says.

    ``kind="smtp"`` is the mail server in ``[smtp]`` (with a copy of each sent
    message in the outbox when ``[delivery] outbox`` is on); ``kind="outbox"``
    only writes ``.eml`` files to ``.newsletter/outbox/``.
    """
    if kind == "outbox":
        return OutboxTransport(config.outbox_dir)
    settings = config.smtp
    if settings.ca_file and not Path(settings.ca_file).is_absolute():
        settings = replace(settings, ca_file=str(config.root / settings.ca_file))
    smtp = SmtpTransport(
        settings,
        config.secrets.smtp_password,
        ssl_context=ssl_context,
        ehlo_name=settings.helo_name or config.sender_domain,
    )
    if config.delivery.outbox:
        return CopyToOutbox(smtp, OutboxTransport(config.outbox_dir))
    return smtp
