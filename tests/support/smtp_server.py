"""A real aiosmtpd server on 127.0.0.1 that misbehaves on purpose, for transport and delivery tests.

Use the ``smtp_server`` fixture (a factory)::

    def test_x(smtp_server):
        server = smtp_server(Faults(rcpt={"bad@example.org": "550 5.1.1 no such user"}))
        transport = SmtpTransport(server.settings())

Faults live in the server's handler, not in mocks: the client sees real
replies, real hang-ups and real silences. ``tls="starttls"`` or ``"ssl"`` uses a
self-signed certificate made at test time (``server.cafile`` verifies it);
``auth=True`` requires AUTH as :data:`USERNAME` / :data:`PASSWORD`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from newsletter.config import SmtpSettings
from newsletter.sink import FastSMTP, LoopbackController

USERNAME = "tester"
PASSWORD = "s3cret-pa55word"

Stage = Literal["greeting", "MAIL", "RCPT", "DATA", "END"]
ALWAYS = -1


@dataclass
class Faults:
    """What the server gets wrong. Counts go down as faults fire; ALWAYS never runs out."""

    # After this many accepted messages (server-wide), answer the next MAIL with 421 and hang up.
    close_421_after: int | None = None
    close_421_times: int = 1
    # Reply to RCPT TO for these addresses, e.g. {"x@example.org": "451 4.2.1 try later"}.
    rcpt: dict[str, str] = field(default_factory=dict)
    # How many times each ``rcpt`` fault fires before the address is accepted (default: always).
    rcpt_times: dict[str, int] = field(default_factory=dict)
    # Reply after the final dot for these recipients, e.g. "554 5.7.1 content rejected".
    data_reply: dict[str, str] = field(default_factory=dict)
    # Hang up when the DATA command arrives (before 354): the message never went out.
    drop_at_data: int = 0
    # Hang up after the whole message arrived, without a reply: the client cannot know.
    drop_after_data: int = 0
    # Never answer at this stage ("END" is after the final dot), this many times.
    stall: dict[Stage, int] = field(default_factory=dict)

    def take(self, name: str, stage: str | None = None) -> bool:
        """True if the fault fires now (and count it down)."""
        if stage is not None:
            left = self.stall.get(stage, 0)  # type: ignore[call-overload]
            if left == 0:
                return False
            if left > 0:
                self.stall[stage] = left - 1  # type: ignore[index]
            return True
        left = getattr(self, name)
        if left == 0:
            return False
        if left > 0:
            setattr(self, name, left - 1)
        return True


@dataclass(frozen=True)
class Received:
    """One message as the server took it."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    peer: Any
    mail_options: tuple[str, ...] = ()


def _hang_up(server: SMTP) -> None:
    if server.transport is not None:
        server.transport.close()


async def _stall() -> None:
    """Never answer; ends when the client hangs up or the server stops."""
    await asyncio.Event().wait()


class FaultyHandler:
    """aiosmtpd handler that records messages and injects :class:`Faults`."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.messages: list[Received] = []
        self.logins: list[str] = []
        self.rsets = 0
        # Called on the server's thread with each message as it arrives (before the reply).
        self.on_message: Callable[[Received], None] | None = None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        f = self.faults
        if f.take("stall", "MAIL"):
            await _stall()
        if (
            f.close_421_after is not None
            and len(self.messages) >= f.close_421_after
            and f.take("close_421_times")
        ):
            server.loop.call_soon(_hang_up, server)
            return "421 4.3.2 Service shutting down, try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.faults.take("stall", "RCPT"):
            await _stall()
        reply = self.faults.rcpt.get(address)
        left = self.faults.rcpt_times.get(address, ALWAYS)
        if reply is not None and left != 0:
            if left > 0:
                self.faults.rcpt_times[address] = left - 1
            if reply.startswith("421"):
                server.loop.call_soon(_hang_up, server)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.rsets += 1
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.mail_from is not None and isinstance(envelope.content, bytes)
        self.messages.append(
            Received(
                envelope.mail_from,
                tuple(envelope.rcpt_tos),
                envelope.content,
                session.peer,
                tuple(envelope.mail_options),
            )
        )
        if self.on_message is not None:
            self.on_message(self.messages[-1])
        if self.faults.take("drop_after_data"):
            _hang_up(server)
            await _stall()
        if self.faults.take("stall", "END"):
            await _stall()
        for recipient in envelope.rcpt_tos:
            reply = self.faults.data_reply.get(recipient)
            if reply is not None:
                self.messages.pop()
                return reply
        return "250 2.0.0 OK queued"


class FaultySMTP(FastSMTP):
    """The sink's fast server, plus faults that need to act before a handler hook runs."""

    def __init__(self, handler: FaultyHandler, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": wanted for loopback plaintext tests.
            warnings.simplefilter("ignore")
            super().__init__(handler, **kwargs)
        self.faulty = handler

    async def _handle_client(self) -> None:
        if self.faulty.faults.take("stall", "greeting"):
            await _stall()
        await super()._handle_client()

    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.rcpt_tos:
            if self.faulty.faults.take("drop_at_data"):
                _hang_up(self)
                return
            if self.faulty.faults.take("stall", "DATA"):
                await _stall()
        await super().smtp_DATA(arg)


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this certificate."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_certificate(folder: Path, *, with_ip: bool = True) -> TlsFiles:
    """Generate a self-signed certificate valid for localhost and (``with_ip``) 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost")]
                + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if with_ip else [])
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "cert.pem", folder / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class SmtpTestServer:
    """A started server: where it listens, what it received, and client settings for it."""

    def __init__(
        self,
        faults: Faults,
        *,
        tls: Literal["starttls", "ssl"] | None = None,
        tls_files: TlsFiles | None = None,
        auth: bool = False,
        data_size_limit: int | None = None,
    ) -> None:
        # Faults apply from after start(): the controller's own probe connection is spared.
        self.handler = FaultyHandler(Faults())
        self.tls = tls
        self.tls_files = tls_files
        self.auth = auth
        kwargs: dict[str, Any] = {}
        if tls is not None:
            assert tls_files is not None
            if tls == "ssl":
                kwargs["ssl_context"] = tls_files.server_context()
            else:
                kwargs["tls_context"] = tls_files.server_context()
                kwargs["require_starttls"] = True
        if auth:
            kwargs["auth_required"] = True
            # With implicit TLS ("ssl") aiosmtpd does not know the link is encrypted.
            kwargs["auth_require_tls"] = tls == "starttls"
            kwargs["authenticator"] = self._authenticate
        if data_size_limit is not None:
            kwargs["data_size_limit"] = data_size_limit
        self.controller = LoopbackController(
            self.handler, hostname="127.0.0.1", port=0, smtp_class=FaultySMTP, **kwargs
        )
        self.controller.start()
        self.handler.faults = faults
        self._stopped = False
        self.host = "127.0.0.1"
        self.port: int = self.controller.port

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == USERNAME.encode()
            and data.password == PASSWORD.encode()
        )
        if ok:
            self.handler.logins.append(USERNAME)
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535

    @property
    def faults(self) -> Faults:
        return self.handler.faults

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    @property
    def connections_used(self) -> int:
        """How many distinct connections delivered messages."""
        return len({m.peer for m in self.messages})

    @property
    def cafile(self) -> Path | None:
        return self.tls_files.cert if self.tls_files else None

    def settings(self, **changes: Any) -> SmtpSettings:
        """Client settings that reach this server (short timeout), with ``changes``."""
        base = SmtpSettings(
            host=self.host,
            port=self.port,
            security=self.tls or "none",
            username=USERNAME if self.auth else "",
            timeout=5.0,
            ca_file=str(self.cafile) if self.cafile else "",
        )
        return replace(base, **changes)

    def stop(self) -> None:
        """Stop the server (twice is fine)."""
        if not self._stopped:
            self._stopped = True
            self.controller.stop(no_assert=True)


ServerFactory = Callable[..., SmtpTestServer]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1, made once per test session."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def smtp_server(tls_files: TlsFiles) -> Iterator[ServerFactory]:
    """Start fault-injecting SMTP servers: ``smtp_server(Faults(...), tls=..., auth=...)``."""
    servers: list[SmtpTestServer] = []

    def start(
        faults: Faults | None = None,
        *,
        tls: Literal["starttls", "ssl"] | None = None,
        auth: bool = False,
        data_size_limit: int | None = None,
    ) -> SmtpTestServer:
        server = SmtpTestServer(
            faults or Faults(),
            tls=tls,
            tls_files=tls_files if tls else None,
            auth=auth,
            data_size_limit=data_size_limit,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
