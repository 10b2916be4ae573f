"""The SMTP sink: its fast DATA reader agrees with aiosmtpd's own, it stores what it gets,
and `newsletter smtp-sink` starts, prints and stops cleanly."""

from __future__ import annotations

import mailbox
import os
import queue
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from newsletter.config import SmtpSettings
from newsletter.errors import TransportError
from newsletter.sink import (
    FastSMTP,
    LoopbackController,
    SinkMessage,
    format_message_line,
    start_sink,
)
from newsletter.transport import SmtpTransport
from tests.support import REPO

SENDER = "newsletter@example.org"


class Recorder:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.contents.append(envelope.content)
        return "250 OK"


@pytest.fixture
def servers() -> Iterator[dict[str, tuple[LoopbackController, Recorder]]]:
    """aiosmtpd's stock SMTP and the sink's FastSMTP, side by side."""
    started = {}
    for name, cls in (("stock", SMTP), ("fast", FastSMTP)):
        recorder = Recorder()
        controller = LoopbackController(recorder, smtp_class=cls, data_size_limit=4000)
        controller.start()
        started[name] = (controller, recorder)
    yield started
    for controller, _ in started.values():
        controller.stop()


def raw_data(port: int, payloads: list[bytes]) -> list[int]:
    """Send each payload verbatim after DATA (it must carry its own end marker)."""
    codes = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client", timeout=5) as client:
        client.ehlo()
        for payload in payloads:
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt("a@example.org")[0] == 250
            assert client.docmd("DATA")[0] == 354
            client.send(payload)
            codes.append(client.getreply()[0])
    return codes


PAYLOADS = [
    b".\r\n",  # empty message
    b"\r\n.\r\n",  # one empty line
    b"a\r\n.\r\n",
    b"ab\r\n.\r\n",
    b"\r\nX\r\n.\r\n",
    b"X\r\n\r\n.\r\n",
    b"..\r\n.\r\n",  # a line that is a single dot
    b"..x\r\n..\r\nmid.dot.\r\n...\r\n.\r\n",
    b"Subject: x\r\n\r\nends with a dot.\r\n.\r\n",
    "Subject: é\r\n\r\nZoë, 東京\r\n.\r\n".encode(),
    b"Subject: big\r\n\r\n" + b"0123456789 " * 90 + b"\r\n" + b".line\r\n" * 200 + b".\r\n",
    b"abc\r\n.unstuffed\r\n.\r\n",  # not valid SMTP, but the end is still found
    b"abc\r\n.\rx\r\n.\r\n",  # a bare CR after a dot
    b"abc\r\n.\r\r\n.\r\n",  # ... that is followed by the end marker
]


def test_fast_data_reader_agrees_with_aiosmtpd(
    servers: dict[str, tuple[LoopbackController, Recorder]],
) -> None:
    results = {}
    for name, (controller, recorder) in servers.items():
        codes = raw_data(controller.port, PAYLOADS)
        results[name] = (codes, recorder.contents)
    assert results["fast"] == results["stock"]
    codes, contents = results["fast"]
    assert codes == [250] * len(PAYLOADS)
    assert contents[0] == b"" and contents[6] == b".\r\n"
    assert contents[7] == b".x\r\n.\r\nmid.dot.\r\n..\r\n"


def test_too_much_data_is_refused_and_the_session_goes_on(
    servers: dict[str, tuple[LoopbackController, Recorder]],
) -> None:
    big = b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n"
    dotted = b"Subject: dots\r\n\r\n" + b"..a stuffed line\r\n" * 400
    payloads = [
        big * 5 + b".\r\n",
        b"a\r\n" + big * 5 + b".\r\n",
        dotted + b".\r\n",
        b"small\r\n.\r\n",
    ]
    results = {}
    for name, (controller, recorder) in servers.items():
        results[name] = (raw_data(controller.port, payloads), recorder.contents)
    assert results["fast"] == results["stock"]
    assert results["fast"] == ([552, 552, 552, 250], [b"small\r\n"])


@pytest.mark.server
def test_sink_stores_a_maildir_a_mail_client_can_read(tmp_path: Path) -> None:
    with start_sink(tmp_path / "sink") as sink:
        with SmtpTransport(SmtpSettings(port=sink.port, timeout=5)) as smtp:
            for i in range(3):
                message = b"Subject: n%d\r\nTo: r%d@example.org\r\n\r\nbody %d\r\n" % (i, i, i)
                assert smtp.send(SENDER, f"r{i}@example.org", message).ok
        assert sink.wait_for(3)
        assert sink.count == 3
    box = mailbox.Maildir(tmp_path / "sink", create=False)
    got = sorted((m["Subject"], m["Delivered-To"], m["Return-Path"]) for m in box)
    assert got == [(f"n{i}", f"r{i}@example.org", f"<{SENDER}>") for i in range(3)]
    assert {str(m.get_payload()) for m in box} == {f"body {i}\n" for i in range(3)}


@pytest.mark.server
def test_sink_outbox_and_count_only(tmp_path: Path) -> None:
    with (
        start_sink(None, outbox=tmp_path / "outbox") as sink,
        SmtpTransport(SmtpSettings(port=sink.port, timeout=5)) as smtp,
    ):
        assert smtp.send(SENDER, "a@example.org", b"Subject: hi\r\n\r\nhello\r\n").ok
    (eml,) = (tmp_path / "outbox").glob("*.eml")
    assert eml.read_bytes().endswith(b"\r\n\r\nhello\r\n")
    with start_sink(None) as counter:
        with SmtpTransport(SmtpSettings(port=counter.port, timeout=5)) as smtp:
            for _ in range(5):
                assert smtp.send(SENDER, "a@example.org", b"x\r\n").ok
        assert counter.count == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outbox"]


@pytest.mark.server
def test_on_message_and_its_line(tmp_path: Path) -> None:
    seen: list[SinkMessage] = []
    message = b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n news\r\n\r\nhello\r\n"
    with (
        start_sink(tmp_path / "md", on_message=seen.append) as sink,
        SmtpTransport(SmtpSettings(port=sink.port, timeout=5)) as smtp,
    ):
        assert smtp.send(SENDER, "zoe@example.org", message).ok
    (only,) = seen
    assert only.subject == "Café news"
    assert only.recipients == ("zoe@example.org",) and only.size == len(message)
    line = format_message_line(only)
    assert f"{SENDER} -> zoe@example.org" in line and "'Café news'" in line
    assert str(tmp_path / "md" / "new") in line


@pytest.mark.server
def test_sink_refuses_a_non_loopback_address() -> None:
    with pytest.raises(TransportError) as caught:
        start_sink(None, host="0.0.0.0", port=8025)
    assert str(caught.value).startswith("0.0.0.0:8025: refusing to listen on a non-loopback")
    assert "--allow-remote" in str(caught.value)


@pytest.mark.server
def test_sink_port_in_use_is_a_clear_error() -> None:
    with start_sink(None) as first, pytest.raises(TransportError) as caught:
        start_sink(None, port=first.port)
    assert str(caught.value).startswith(f"127.0.0.1:{first.port}: cannot listen")


# --------------------------------------------------------------------------- the command


def run_cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "newsletter", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def line_reader(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.server
def test_smtp_sink_command_runs_prints_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "newsletter.toml").write_text('[smtp]\nhost = "127.0.0.1"\n')
    proc = run_cli(["smtp-sink", "--port", "0"], tmp_path)
    try:
        lines = line_reader(proc)
        first = lines.get(timeout=20)
        assert first.startswith("smtp-sink listening on 127.0.0.1:"), first
        assert str(tmp_path.resolve() / ".newsletter" / "sink") in first
        port = int(first.split()[3].rstrip(",").rpartition(":")[2])
        with SmtpTransport(SmtpSettings(port=port, timeout=5)) as smtp:
            assert smtp.send(SENDER, "a@example.org", b"Subject: Issue 1\r\n\r\nhi\r\n").ok
        shown = lines.get(timeout=10)
        assert f"{SENDER} -> a@example.org" in shown and "'Issue 1'" in shown
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert lines.get(timeout=10).strip() == "smtp-sink stopped after 1 messages."
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert len(list((tmp_path / ".newsletter" / "sink" / "new").iterdir())) == 1


@pytest.mark.server
def test_smtp_sink_command_errors_are_one_line(tmp_path: Path) -> None:
    refused = run_cli(["smtp-sink", "--host", "0.0.0.0", "--maildir", "md"], tmp_path)
    out, err = refused.communicate(timeout=30)
    assert refused.returncode == 1 and out == ""
    assert err.startswith("Error: 0.0.0.0:8025: refusing to listen on a non-loopback address")
    assert len(err.splitlines()) == 1
    nowhere = run_cli(["smtp-sink", "--port", "0"], tmp_path)  # no workspace, no --maildir
    out, err = nowhere.communicate(timeout=30)
    assert nowhere.returncode == 1 and out == ""
    assert err.startswith("Error: ") and "newsletter.toml" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "arg",
    [
        "<a@example.org>",
        " <a@example.org> SIZE=100 BODY=8BITMIME",
        "<a.b+c@ex-ample.org>",
        "<a@Example.ORG>  X=1",
        "<a@example.org> ",
        '<"quoted"@example.org>',
        "a@example.org",
        "<a..b@example.org>",
        "<a@[127.0.0.1]>",
        "<zoë@example.org>",
        "<>",
        "<a@-bad.org>",
        "<a@example.org",
        "<@relay.example:a@example.org>",
    ],
)
def test_fast_address_parsing_agrees_with_aiosmtpd(arg: str) -> None:
    stock = SMTP(Recorder(), hostname="x")
    fast = FastSMTP(Recorder(), hostname="x")
    assert fast._getaddr(arg) == stock._getaddr(arg)
