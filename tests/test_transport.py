"""The transport contract, run against memory, maildir, outbox and a real aiosmtpd server,
then SMTP faults injected by the server (tests/smtp_server.py), never by mocks."""

from __future__ import annotations

import ipaddress
import mailbox
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from newsletter.config import SmtpSettings
from newsletter.errors import ConfigError, TransportError
from newsletter.transport import (
    CopyToOutbox,
    MaildirTransport,
    MemoryTransport,
    OutboxTransport,
    SendResult,
    SmtpTransport,
    Transport,
    is_loopback,
    smtp_data_bytes,
    trace_headers,
    transport_from_config,
)
from tests.support.smtp_server import (
    ALWAYS,
    PASSWORD,
    USERNAME,
    Faults,
    ServerFactory,
    SmtpTestServer,
    make_certificate,
)

SENDER = "newsletter@example.org"


def make_message(n: int = 0, *, extra: bytes = b"") -> bytes:
    """A realistic message with the awkward bits: dot lines, a 998-byte line, UTF-8 headers."""
    return (
        (
            b"From: Newsletter <newsletter@example.org>\r\n"
            b"To: =?utf-8?q?Zo=C3=AB?= <reader%d@example.org>\r\n"
            b"Subject: Issue %d\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n"
            b"\r\n"
            b"Hello reader %d.\r\n"
            b".\r\n"
            b"..two dots\r\n"
            b". a dot and a space\r\n"
            b"\r\n.\r\n" % (n, n, n)
        )
        + b"x" * 998
        + b"\r\n"
        + extra
        + b"end.\r\n"
    )


def strip_trace(data: bytes) -> bytes:
    """Drop the Return-Path/Delivered-To lines a stored copy starts with."""
    lines = data.split(b"\r\n", 2)
    assert lines[0].startswith(b"Return-Path: <") and lines[1].startswith(b"Delivered-To: ")
    return lines[2]


@dataclass
class Harness:
    """A transport under test and a way to read what arrived at the other end."""

    transport: Transport
    received: Callable[[], list[tuple[str, str, bytes]]]  # (envelope from, recipient, bytes)
    connections: Callable[[], int | None]  # connections opened, where observable


def _maildir_received(path: Path) -> list[tuple[str, str, bytes]]:
    out = []
    for file in sorted((path / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns):
        data = file.read_bytes()
        head = data.split(b"\r\n", 2)
        out.append((head[0][14:-1].decode(), head[1][14:].decode(), strip_trace(data)))
    return out


def _outbox_received(path: Path) -> list[tuple[str, str, bytes]]:
    out = []
    files = sorted(path.glob("*.eml"), key=lambda p: int(p.name.split(".")[0]))
    for file in files:
        data = file.read_bytes()
        head = data.split(b"\r\n", 2)
        out.append((head[0][14:-1].decode(), head[1][14:].decode(), strip_trace(data)))
    return out


@pytest.fixture(params=["memory", "maildir", "outbox", "smtp"])
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, smtp_server: ServerFactory
) -> Iterator[Harness]:
    kind = request.param
    if kind == "memory":
        memory = MemoryTransport()
        yield Harness(
            memory,
            lambda: [(m.envelope_from, m.recipient, m.data) for m in memory.messages],
            lambda: memory.opened,
        )
    elif kind == "maildir":
        yield Harness(
            MaildirTransport(tmp_path / "md"),
            lambda: _maildir_received(tmp_path / "md"),
            lambda: None,
        )
    elif kind == "outbox":
        yield Harness(
            OutboxTransport(tmp_path / "outbox"),
            lambda: _outbox_received(tmp_path / "outbox"),
            lambda: None,
        )
    else:
        server = smtp_server()
        smtp = SmtpTransport(server.settings())
        yield Harness(
            smtp,
            lambda: [(m.mail_from, m.recipients[0], m.data) for m in server.messages],
            lambda: server.connections_used,
        )
        smtp.close()


# --------------------------------------------------------------------------- the contract


@pytest.mark.server
def test_message_arrives_byte_for_byte(harness: Harness) -> None:
    message = make_message(1)
    harness.transport.open()
    result = harness.transport.send(SENDER, "reader1@example.org", message)
    assert result.outcome == "sent" and result.recipient == "reader1@example.org"
    assert harness.received() == [(SENDER, "reader1@example.org", message)]


@pytest.mark.server
def test_eight_bit_body_arrives_unchanged(harness: Harness) -> None:
    message = make_message(2, extra="Zoë says: ça marche, 東京\r\n".encode())
    assert harness.transport.send(SENDER, "reader2@example.org", message).outcome == "sent"
    assert harness.received()[0][2] == message


@pytest.mark.server
def test_each_recipient_gets_its_own_envelope(harness: Harness) -> None:
    recipients = [f"r{i}@example.com" for i in range(5)]
    results = [harness.transport.send(SENDER, r, make_message(i)) for i, r in enumerate(recipients)]
    assert [r.recipient for r in results] == recipients
    assert all(isinstance(r, SendResult) and r.outcome == "sent" for r in results)
    got = harness.received()
    assert [(f, r) for f, r, _ in got] == [(SENDER, r) for r in recipients]
    assert [d for _, _, d in got] == [make_message(i) for i in range(5)]


@pytest.mark.server
def test_many_messages_over_one_connection(harness: Harness) -> None:
    harness.transport.open()
    for i in range(60):
        assert harness.transport.send(SENDER, f"r{i}@example.net", make_message(i)).ok
    harness.transport.close()
    assert len(harness.received()) == 60
    assert {r for _, r, _ in harness.received()} == {f"r{i}@example.net" for i in range(60)}
    assert harness.connections() in (1, None)


@pytest.mark.server
def test_close_is_idempotent_and_send_reopens(harness: Harness) -> None:
    harness.transport.close()  # before open: nothing to do
    harness.transport.open()
    harness.transport.open()  # open twice: still one connection
    assert harness.transport.send(SENDER, "a@example.org", make_message(1)).ok
    harness.transport.close()
    harness.transport.close()
    assert harness.transport.send(SENDER, "b@example.org", make_message(2)).ok  # reopens
    harness.transport.close()
    assert [r for _, r, _ in harness.received()] == ["a@example.org", "b@example.org"]
    assert harness.connections() in (2, None)


# --------------------------------------------------------------------------- SMTP details


def test_bare_lf_becomes_crlf_and_dots_are_stuffed() -> None:
    assert smtp_data_bytes(b"a\n.b\nc") == b"a\r\n..b\r\nc\r\n.\r\n"
    assert smtp_data_bytes(b".x\r\n") == b"..x\r\n.\r\n"
    assert smtp_data_bytes(b"") == b"\r\n.\r\n"


@pytest.mark.server
def test_lf_message_is_sent_with_crlf(smtp_server: ServerFactory) -> None:
    server = smtp_server()
    with SmtpTransport(server.settings()) as smtp:
        assert smtp.send(SENDER, "a@example.org", b"Subject: x\n\n.line\nend\n").ok
    assert server.messages[0].data == b"Subject: x\r\n\r\n.line\r\nend\r\n"


@pytest.mark.server
def test_8bitmime_and_smtputf8_are_declared(smtp_server: ServerFactory) -> None:
    server = smtp_server()
    with SmtpTransport(server.settings()) as smtp:
        assert smtp.send(SENDER, "ascii@example.org", make_message(1)).ok
        assert smtp.send(SENDER, "zoë@example.org", make_message(2, extra="é\r\n".encode())).ok
    first, second = server.messages
    assert first.mail_options == ()
    assert set(second.mail_options) == {"SMTPUTF8", "BODY=8BITMIME"}
    assert second.recipients == ("zoë@example.org",)


@pytest.mark.server
def test_reconnects_after_max_per_connection(smtp_server: ServerFactory) -> None:
    server = smtp_server()
    with SmtpTransport(server.settings(max_per_connection=2)) as smtp:
        for i in range(5):
            assert smtp.send(SENDER, f"r{i}@example.org", make_message(i)).ok
    assert len(server.messages) == 5
    assert server.connections_used == 3
    assert smtp.connections == 3


@pytest.mark.server
def test_parallel_transports_share_nothing(smtp_server: ServerFactory) -> None:
    server = smtp_server()
    results: list[SendResult] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        with SmtpTransport(server.settings()) as smtp:
            for i in range(25):
                result = smtp.send(SENDER, f"t{t}-{i}@example.org", make_message(i))
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 100 and all(r.ok for r in results)
    got = sorted(m.recipients[0] for m in server.messages)
    assert got == sorted(f"t{t}-{i}@example.org" for t in range(4) for i in range(25))
    assert server.connections_used == 4


# --------------------------------------------------------------------------- SMTP faults


@pytest.mark.server
def test_421_in_mid_run_reconnects_and_goes_on(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(close_421_after=3))
    with SmtpTransport(server.settings()) as smtp:
        results = [smtp.send(SENDER, f"r{i}@example.org", make_message(i)) for i in range(8)]
    assert [r.outcome for r in results] == ["sent"] * 8
    assert [m.recipients[0] for m in server.messages] == [f"r{i}@example.org" for i in range(8)]
    assert server.connections_used == 2


@pytest.mark.server
def test_421_again_after_reconnect_is_deferred(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(close_421_after=0, close_421_times=ALWAYS))
    smtp = SmtpTransport(server.settings())
    result = smtp.send(SENDER, "a@example.org", make_message())
    smtp.close()
    assert (result.outcome, result.code) == ("deferred", 421)
    assert "shutting down" in result.reply
    assert server.messages == []
    assert smtp.connections == 2  # one reconnect, not more


@pytest.mark.server
@pytest.mark.parametrize(
    ("reply", "outcome", "code"),
    [
        ("451 4.2.1 Mailbox busy, try later", "deferred", 451),
        ("452 4.2.2 Mailbox full", "deferred", 452),
        ("550 5.1.1 No such user here", "failed", 550),
    ],
)
def test_rcpt_refusals_map_to_outcomes(
    smtp_server: ServerFactory, reply: str, outcome: str, code: int
) -> None:
    server = smtp_server(Faults(rcpt={"bad@example.org": reply}))
    with SmtpTransport(server.settings()) as smtp:
        before = smtp.send(SENDER, "ok1@example.org", make_message(1))
        refused = smtp.send(SENDER, "bad@example.org", make_message(2))
        after = smtp.send(SENDER, "ok2@example.org", make_message(3))
    assert (refused.outcome, refused.code, refused.recipient) == (outcome, code, "bad@example.org")
    assert refused.reply == reply[4:]
    assert before.ok and after.ok
    # The refused transaction was reset, and the connection kept.
    assert server.handler.rsets == 1
    assert [m.recipients[0] for m in server.messages] == ["ok1@example.org", "ok2@example.org"]
    assert server.connections_used == 1


@pytest.mark.server
def test_rejection_after_the_data_is_failed(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(data_reply={"spam@example.org": "554 5.7.1 Content rejected"}))
    with SmtpTransport(server.settings()) as smtp:
        result = smtp.send(SENDER, "spam@example.org", make_message())
        assert smtp.send(SENDER, "fine@example.org", make_message()).ok
    assert (result.outcome, result.code, result.reply) == ("failed", 554, "5.7.1 Content rejected")


@pytest.mark.server
def test_message_too_large_is_failed(smtp_server: ServerFactory) -> None:
    server = smtp_server(data_size_limit=2000)
    with SmtpTransport(server.settings()) as smtp:
        result = smtp.send(SENDER, "a@example.org", make_message(extra=b"y" * 900 + b"\r\n") * 3)
        assert smtp.send(SENDER, "b@example.org", b"Subject: small\r\n\r\nhi\r\n").ok
    assert (result.outcome, result.code) == ("failed", 552)
    assert [m.recipients[0] for m in server.messages] == ["b@example.org"]


@pytest.mark.server
def test_sender_refused_raises(smtp_server: ServerFactory) -> None:
    server = smtp_server(auth=True)  # MAIL without login: 530
    smtp = SmtpTransport(server.settings(username=""))
    with pytest.raises(TransportError) as caught:
        smtp.send(SENDER, "a@example.org", make_message())
    smtp.close()
    assert f"127.0.0.1:{server.port}" in str(caught.value)
    assert "refused the sender" in str(caught.value)


@pytest.mark.server
def test_drop_before_the_message_is_retried_once(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(drop_at_data=1))
    with SmtpTransport(server.settings()) as smtp:
        result = smtp.send(SENDER, "a@example.org", make_message())
    assert result.outcome == "sent"
    assert len(server.messages) == 1  # exactly one copy
    assert smtp.connections == 2


@pytest.mark.server
def test_drop_after_the_final_dot_is_uncertain_not_resent(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(drop_after_data=1))
    with SmtpTransport(server.settings()) as smtp:
        result = smtp.send(SENDER, "a@example.org", make_message(1))
        assert result.outcome == "uncertain" and result.code is None
        assert "after the whole message was sent" in result.reply
        # The server did get it: resending would have made a second copy.
        assert len(server.messages) == 1
        assert smtp.send(SENDER, "b@example.org", make_message(2)).ok  # and life goes on
    assert [m.recipients[0] for m in server.messages] == ["a@example.org", "b@example.org"]


@pytest.mark.server
def test_stall_after_the_final_dot_is_uncertain(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(stall={"END": 1}))
    smtp = SmtpTransport(server.settings(timeout=0.5))
    start = time.monotonic()
    result = smtp.send(SENDER, "a@example.org", make_message())
    took = time.monotonic() - start
    smtp.close()
    assert result.outcome == "uncertain"
    assert "timed out" in result.reply
    assert len(server.messages) == 1
    assert took < 3  # one timeout, no retry


@pytest.mark.server
def test_stall_before_the_message_times_out_and_retries(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(stall={"RCPT": 1}))
    with SmtpTransport(server.settings(timeout=0.5)) as smtp:
        result = smtp.send(SENDER, "a@example.org", make_message())
    assert result.outcome == "sent"
    assert len(server.messages) == 1
    assert smtp.connections == 2


@pytest.mark.server
def test_stalled_greeting_is_a_clear_error(smtp_server: ServerFactory) -> None:
    server = smtp_server(Faults(stall={"greeting": ALWAYS}))
    smtp = SmtpTransport(server.settings(timeout=0.5))
    with pytest.raises(TransportError) as caught:
        smtp.open()
    message = str(caught.value)
    assert message.startswith(f"127.0.0.1:{server.port}: no answer within 0.5 s")
    assert "timeout" in message  # the hint


@pytest.mark.server
def test_server_down_mid_run_raises_not_sent(smtp_server: ServerFactory) -> None:
    server = smtp_server()
    smtp = SmtpTransport(server.settings())
    assert smtp.send(SENDER, "a@example.org", make_message()).ok
    server.stop()
    with pytest.raises(TransportError, match="connection refused"):
        smtp.send(SENDER, "b@example.org", make_message())
    smtp.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_names_host_and_port() -> None:
    port = free_port()
    smtp = SmtpTransport(SmtpSettings(host="127.0.0.1", port=port, timeout=2))
    with pytest.raises(TransportError) as caught:
        smtp.open()
    assert str(caught.value).startswith(f"127.0.0.1:{port}: connection refused;")
    assert "smtp-sink" in str(caught.value)


# --------------------------------------------------------------------------- AUTH and TLS


@pytest.mark.server
def test_auth_over_loopback_plaintext(smtp_server: ServerFactory) -> None:
    server = smtp_server(auth=True)
    with SmtpTransport(server.settings(), PASSWORD) as smtp:
        assert smtp.send(SENDER, "a@example.org", make_message()).ok
    assert server.handler.logins == [USERNAME]


@pytest.mark.server
def test_wrong_password_is_a_clear_error_without_the_password(smtp_server: ServerFactory) -> None:
    server = smtp_server(auth=True)
    smtp = SmtpTransport(server.settings(), "wrong-Pa55")
    with pytest.raises(TransportError) as caught:
        smtp.open()
    message = str(caught.value)
    assert message.startswith(f"127.0.0.1:{server.port}: login refused: 535")
    assert "NEWSLETTER_SMTP_PASSWORD" in message
    assert "wrong-Pa55" not in message and "wrong-Pa55" not in repr(smtp)
    assert repr(smtp).endswith("password=<set>)")


def test_missing_password_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NEWSLETTER_SMTP_PASSWORD"):
        SmtpTransport(SmtpSettings(username="someone"), None)


@pytest.mark.parametrize("host", ["mail.example.org", "192.0.2.10", "::ffff:192.0.2.1"])
def test_never_auth_in_plaintext_to_a_remote_host(host: str) -> None:
    with pytest.raises(TransportError) as caught:
        SmtpTransport(SmtpSettings(host=host, port=25, username="me"), "pw")
    assert f"{host}:25" in str(caught.value)
    assert "starttls" in str(caught.value) and "unencrypted" in str(caught.value)


def test_loopback_detection() -> None:
    loopback = ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "a.localhost"]
    assert all(is_loopback(host, resolve=False) for host in loopback)
    others = ["example.org", "10.0.0.1", "0.0.0.0", "localhost.example"]
    assert not any(is_loopback(host, resolve=False) for host in others)


def test_loopback_detection_resolves_a_name_only_when_asked() -> None:
    """This machine's own name is looked up (in /etc/hosts, no traffic) only with resolve."""
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    only_loopback = all(ipaddress.ip_address(str(a)).is_loopback for a in addresses)
    assert is_loopback(name, resolve=True) is only_loopback
    assert is_loopback(name, resolve=False) is (name == "localhost")
    assert is_loopback("localhost", resolve=True) and not is_loopback("", resolve=True)


@pytest.mark.server
@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_tls_with_trusted_certificate_and_auth(smtp_server: ServerFactory, tls: str) -> None:
    server: SmtpTestServer = smtp_server(tls=tls, auth=True)
    with SmtpTransport(server.settings(), PASSWORD) as smtp:
        assert smtp.send(SENDER, "a@example.org", make_message()).ok
    assert server.handler.logins == [USERNAME]
    assert server.messages[0].data == make_message()


@pytest.mark.server
@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_tls_with_an_untrusted_certificate_fails_clearly(
    smtp_server: ServerFactory, tls: str
) -> None:
    server = smtp_server(tls=tls, auth=True)
    smtp = SmtpTransport(server.settings(ca_file=""), PASSWORD)  # the system's trust store
    with pytest.raises(TransportError) as caught:
        smtp.send(SENDER, "a@example.org", make_message())
    message = str(caught.value)
    assert message.startswith(f"127.0.0.1:{server.port}: the server's TLS certificate was not")
    assert "self-signed certificate" in message
    assert "checked against the system's CAs ([smtp] ca_file is not set)" in message
    assert server.handler.logins == [] and server.messages == []


@pytest.mark.server
def test_a_certificate_the_ca_file_does_not_vouch_for_names_the_file(
    smtp_server: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server(tls="starttls", auth=True)
    other = make_certificate(tmp_path / "other-ca")  # a CA, but not the server's
    smtp = SmtpTransport(server.settings(ca_file=str(other.cert)), PASSWORD)
    with pytest.raises(TransportError) as caught:
        smtp.send(SENDER, "a@example.org", make_message())
    assert f"checked against the CAs in [smtp] ca_file ({other.cert})" in str(caught.value)
    assert server.messages == []


@pytest.mark.server
def test_ssl_context_argument_overrides_ca_file(smtp_server: ServerFactory) -> None:
    server = smtp_server(tls="starttls")
    assert server.tls_files is not None
    smtp = SmtpTransport(server.settings(ca_file=""), ssl_context=server.tls_files.client_context())
    with smtp:
        assert smtp.send(SENDER, "a@example.org", make_message()).ok


@pytest.mark.server
def test_starttls_required_but_not_offered(smtp_server: ServerFactory) -> None:
    server = smtp_server()
    smtp = SmtpTransport(server.settings(security="starttls"))
    with pytest.raises(TransportError, match="does not offer STARTTLS"):
        smtp.open()


# --------------------------------------------------------------------------- files and factory


def test_maildir_is_readable_by_a_mail_library(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "md", fsync=False)
    transport.send(SENDER, "zoe@example.org", make_message(3))
    (only,) = list(mailbox.Maildir(tmp_path / "md", create=False))
    assert only["Subject"] == "Issue 3"
    assert only["Delivered-To"] == "zoe@example.org"
    assert str(only.get_payload()).startswith("Hello reader 3.")


def test_unwritable_outbox_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    transport = OutboxTransport(blocker / "outbox")
    with pytest.raises(TransportError) as caught:
        transport.open()
        transport.send(SENDER, "a@example.org", make_message())
    assert str(blocker / "outbox") in str(caught.value)


def test_trace_headers_follow_the_message_line_ends() -> None:
    assert trace_headers("a@x.org", "b@y.org", b"A: b\r\n") == (
        b"Return-Path: <a@x.org>\r\nDelivered-To: b@y.org\r\n"
    )
    assert trace_headers("a@x.org", "b@y.org", b"A: b\n").endswith(b"b@y.org\n")


def _config(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    from newsletter import config as config_module

    (tmp_path / "newsletter.toml").write_text(text)
    return config_module.load(tmp_path, environ=env or {})


@pytest.mark.server
def test_factory_builds_smtp_with_outbox_copy(tmp_path: Path, smtp_server: ServerFactory) -> None:
    server = smtp_server()
    config = _config(
        tmp_path,
        f"[smtp]\nport = {server.port}\n[delivery]\noutbox = true\n"
        '[newsletter]\nsender = "N <news@example.net>"\n',
    )
    transport = transport_from_config(config)  # type: ignore[arg-type]
    assert isinstance(transport, CopyToOutbox)
    assert transport.send("news@example.net", "a@example.org", make_message()).ok
    transport.close()
    assert len(server.messages) == 1
    (copy,) = (tmp_path / ".newsletter" / "outbox").glob("*.eml")
    assert strip_trace(copy.read_bytes()) == make_message()


def test_factory_outbox_kind_and_relative_ca_file(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        '[smtp]\nhost = "smtp.example.org"\nsecurity = "starttls"\nusername = "u"\n'
        'ca_file = "certs/ca.pem"\n',
        {"NEWSLETTER_SMTP_PASSWORD": "pw-123"},
    )
    outbox = transport_from_config(config, kind="outbox")  # type: ignore[arg-type]
    assert isinstance(outbox, OutboxTransport)
    smtp = transport_from_config(config)  # type: ignore[arg-type]
    assert isinstance(smtp, SmtpTransport)
    assert smtp.settings.ca_file == str(tmp_path.resolve() / "certs" / "ca.pem")
    assert "pw-123" not in repr(smtp)
    with pytest.raises(ConfigError, match="ca_file"):
        smtp.open()  # the file does not exist: said before any connection


def test_a_failed_outbox_copy_does_not_make_a_sent_message_unsent(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    memory = MemoryTransport()
    transport = CopyToOutbox(memory, OutboxTransport(blocker / "outbox"))
    result = transport.send(SENDER, "a@example.org", make_message())
    assert result.outcome == "sent" and "no outbox copy" in result.reply
    assert len(memory.messages) == 1
