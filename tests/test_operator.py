"""What an operator needs: the DNS records to publish, the config's TLS setting, JSON
output, progress lines and logs without a terminal, metrics, the deploy files."""

from __future__ import annotations

import configparser
import dataclasses
import datetime as dt
import email
import email.policy
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from newsletter import config, dkim, dns, logsetup
from newsletter.cli import main
from newsletter.delivery import Progress
from newsletter.models import DeliveryResult, DeliveryState
from newsletter.progress import ProgressLines
from newsletter.server import close_app, create_app, redact_path
from newsletter.sink import SinkMessage, start_sink
from newsletter.store import Store
from newsletter.tokens import CONFIRM_PURPOSE, TokenSigner, address_fingerprint
from tests.support import EXAMPLE_SLUG, REPO, TEST_SECRET_KEY, copy_example, load_config
from tests.support.deliverability import write_key
from tests.support.delivery import fill
from tests.support.smtp_server import ServerFactory

S = DeliveryState
HOUR = dt.timedelta(hours=1)


def test_dns_prints_spf_dkim_and_dmarc_for_the_sender_domain(
    workspace: Path, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, runner: CliRunner
) -> None:
    key = write_key(tmp_path / "keys" / "nl.key", rsa_key)
    text = (workspace / "newsletter.toml").read_text(encoding="utf-8")
    text = text.replace("editor@example.org", "editor@news.example.org").replace(
        'host = "127.0.0.1"', 'host = "mail.example.org"'
    )
    text += '\n[dkim]\nselector = "nl2026"\ndomain = "mail.example.org"\n'
    (workspace / "newsletter.toml").write_text(text, encoding="utf-8")
    cfg = load_config(workspace, **{config.ENV_DKIM_KEY_FILE: str(key)})
    spf, dkim_record, dmarc = dns.records(cfg)
    assert (spf.name, spf.value) == ("news.example.org.", "v=spf1 a:mail.example.org ~all")
    signer = dkim.signer_from_config(cfg)
    assert signer is not None and signer.warnings == ()  # same organisational domain
    assert dkim_record.name == "nl2026._domainkey.mail.example.org."
    assert dkim_record.value == signer.record_value
    assert dmarc.name == "_dmarc.news.example.org."
    assert dmarc.value.startswith("v=DMARC1; p=none; rua=mailto:")
    assert any("_dmarc.example.org covers news.example.org" in note for note in dmarc.notes)

    result = runner.invoke(
        main, ["-C", str(workspace), "dns"], env={config.ENV_DKIM_KEY_FILE: str(key)}
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert 'news.example.org. IN TXT "v=spf1 a:mail.example.org ~all"' in lines
    assert any(line.startswith("nl2026._domainkey.mail.example.org. IN TXT") for line in lines)
    assert any(line.startswith('_dmarc.news.example.org. IN TXT "v=DMARC1;') for line in lines)


def test_dns_without_dkim_says_how_to_get_a_key(workspace: Path, runner: CliRunner) -> None:
    result = runner.invoke(main, ["-C", str(workspace), "dns"])
    assert result.exit_code == 0, result.output
    assert "DKIM is off: run `newsletter dkim keygen`" in result.stdout
    assert "_domainkey" not in result.stdout


def test_init_documents_the_ca_file(tmp_path: Path, runner: CliRunner) -> None:
    result = runner.invoke(main, ["init", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "new" / "newsletter.toml").read_text(encoding="utf-8")
    assert "# ca_file = " in text
    assert config.load(tmp_path / "new").smtp.ca_file == ""


# --- the service: metrics and the access log ------------------------------------------------


def test_metrics_come_from_the_database_and_name_nobody(cfg: config.Config, tmp_path: Path) -> None:
    db = tmp_path / "news.db"
    with Store.open(db) as store:
        fill(store, tmp_path)
        store.unsubscribe("eamon@example.com", "link")
        store.snapshot_recipients(EXAMPLE_SLUG)
        with store.acquire_send_lock(EXAMPLE_SLUG) as lock:
            claimed = store.claim_batch(EXAMPLE_SLUG, lock.run_id, 3)
            store.record_results(
                [
                    DeliveryResult(EXAMPLE_SLUG, claimed[0].subscriber.id, S.SENT, "250 ok"),
                    DeliveryResult(EXAMPLE_SLUG, claimed[1].subscriber.id, S.FAILED, "550 no"),
                    DeliveryResult(EXAMPLE_SLUG, claimed[2].subscriber.id, S.DEFERRED, "451"),
                ]
            )
        store.set_schedule("002-later", dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        emails = [s.email for s in store.list_subscribers()]
        queued = store.ledger_counts(EXAMPLE_SLUG)[S.QUEUED]
    app = create_app(cfg, db)
    try:
        response = app.test_client().get("/metrics")
    finally:
        close_app(app)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    text = response.get_data(as_text=True)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("newsletter_messages_total", (("outcome", "sent"),))] == 1
    assert samples[("newsletter_messages_total", (("outcome", "failed"),))] == 1
    assert samples[("newsletter_messages_deferred", ())] == 1
    assert samples[("newsletter_queue_depth", (("issue", EXAMPLE_SLUG),))] == queued + 1
    assert samples[("newsletter_subscribers", (("status", "unsubscribed"),))] == 2
    assert samples[("newsletter_unsubscribes_total", ())] >= 1
    assert samples[("newsletter_schedules", (("state", "scheduled"),))] == 1
    assert not any(email.lower() in text.lower() for email in emails)


def test_the_access_log_has_no_tokens(
    cfg: config.Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "abcdefghijklmnopqrstuvwxyz012345.ABCDEFGHIJKLMNOP"
    app = create_app(cfg, tmp_path / "news.db")
    try:
        client = app.test_client()
        with caplog.at_level(logging.INFO, logger="newsletter.access"):
            client.get(f"/u/{secret}")
            client.get(f"/confirm/{secret}?next=1")
            client.post(f"/hooks/postmark/{secret}")
            client.get("/healthz")
    finally:
        close_app(app)
    lines = [r.getMessage() for r in caplog.records if r.name == "newsletter.access"]
    assert len(lines) == 4
    assert not any(secret in line for line in lines), lines
    assert lines[0].startswith("GET /u/[redacted] ")
    assert lines[1].startswith("GET /confirm/[redacted]?[redacted] ")
    assert lines[2].startswith("POST /hooks/postmark/[redacted] ")
    assert lines[3].startswith("GET /healthz 200 3 B ")
    assert redact_path("/newsletter/u/tok") == "/newsletter/u/[redacted]"
    assert redact_path("/2026-01-issue/") == "/2026-01-issue/"


def test_a_request_path_cannot_forge_a_line_of_the_access_log(
    cfg: config.Config, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's %0A decodes to a line break in the path: logged as \\x0a, on one line,
    and a long path is cut."""
    app = create_app(cfg)
    try:
        with caplog.at_level(logging.INFO, logger="newsletter.access"):
            app.test_client().get("/a%0A2026-12-01 03:42:17 INFO access: GET /forged 200")
            app.test_client().get("/" + "x" * 5000)
    finally:
        close_app(app)
    lines = [r.getMessage() for r in caplog.records if r.name == "newsletter.access"]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert lines[0].startswith("GET /a\\x0a2026-12-01 03:42:17 INFO access: GET /forged 200 404 ")
    assert len(lines[1]) < 400


def test_json_log_lines_carry_the_extra_fields() -> None:
    stream = io.StringIO()
    with logsetup.logging_to(json_lines=True, stream=stream):
        logging.getLogger("newsletter.worker").info(
            "issue %s: sent %d", "x", 3, extra={"event": "send-done", "sent": 3}
        )
    (line,) = stream.getvalue().splitlines()
    data = json.loads(line)
    assert data["message"] == "issue x: sent 3" and data["level"] == "info"
    assert data["logger"] == "newsletter.worker"
    assert data["event"] == "send-done" and data["sent"] == 3
    assert data["time"].endswith("+00:00")
    assert logging.getLogger("newsletter").handlers == []  # put back as it was


def test_progress_lines_come_every_few_seconds_with_rate_and_eta() -> None:
    clock = [0.0]
    lines: list[str] = []
    progress = ProgressLines(lines.append, every=5.0, clock=lambda: clock[0])

    def at(seconds: float, done: int) -> None:
        clock[0] = seconds
        progress(Progress(done, 1000, done, 0, 0, 0, seconds or 0.001))

    at(0, 0)
    at(2, 200)
    assert lines == []
    at(5, 500)
    assert lines == ["sent 500/1,000 (50%), 100 msgs/s, ETA 5 s"]
    at(6, 600)
    at(10, 1000)
    assert lines[-1] == "sent 1,000/1,000 (100%), 100 msgs/s"
    assert len(lines) == 2


# --- JSON output ----------------------------------------------------------------------------


@pytest.mark.server
def test_json_output_of_send_status_subscribers_and_issue_list(
    tmp_path: Path, smtp_server: ServerFactory, runner: CliRunner
) -> None:
    server = smtp_server()
    ws = copy_example(
        tmp_path / "ws",
        smtp={"port": server.port, "timeout": 5.0},
        extra="[worker]\nprogress_seconds = 0.001\n",
    )
    db = tmp_path / "news.db"
    with Store.open(db) as store:
        active = fill(store, tmp_path)
    base = ["-C", str(ws), "--db", str(db)]
    sent = runner.invoke(main, [*base, "send", "1", "--yes", "--json"])
    assert sent.exit_code == 0, sent.output
    report = json.loads(sent.stdout)
    assert report["sent"] == len(active) and report["ok"] is True
    assert report["counts"]["sent"] == len(active)
    assert "Subject:" in sent.stderr  # the plan went to stderr
    # No terminal: progress lines instead of a bar.
    assert any(line.startswith("Sending: sent ") for line in sent.stderr.splitlines())

    status = json.loads(runner.invoke(main, [*base, "status", "1", "--json"]).stdout)
    assert status["counts"]["sent"] == len(active) and status["snapshot"]["recipients"]
    counted = json.loads(runner.invoke(main, [*base, "subscribers", "count", "--json"]).stdout)
    assert counted["active"] == len(active) and counted["total"] == len(active) + 2
    listed = runner.invoke(main, [*base, "subscribers", "list", "--status", "active", "--json"])
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {row["email"] for row in rows} == active
    issues = json.loads(runner.invoke(main, [*base, "issue", "list", "--json"]).stdout)
    assert issues[0]["slug"] == EXAMPLE_SLUG and issues[0]["schedule"] is None


# --- deploy/ --------------------------------------------------------------------------------


def unit_command(name: str) -> list[str]:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(REPO / "deploy" / name, encoding="utf-8")
    assert unit["Service"]["EnvironmentFile"] == "/etc/newsletter/newsletter.env"
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    return shlex.split(unit["Service"]["ExecStart"])


def test_the_systemd_units_run_real_commands(tmp_path: Path) -> None:
    worker_cmd = unit_command("newsletter-worker.service")
    serve_cmd = unit_command("newsletter-serve.service")
    assert worker_cmd[:3] == ["/opt/newsletter/bin/newsletter", "-C", "/srv/newsletter"]
    assert worker_cmd[3:] == ["worker", "--log-json"] and serve_cmd[3:] == ["serve", "--log-json"]
    # The worker's command line, with this checkout and a test workspace, does one pass.
    ws = copy_example(tmp_path / "ws")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
        "PYTHONPATH": str(REPO),
        config.ENV_SECRET_KEY: TEST_SECRET_KEY,
    }
    command = [sys.executable, "-m", "newsletter", "-C", str(ws), *worker_cmd[3:], "--once"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in done.stderr.splitlines()]
    assert logged and all(entry["logger"].startswith("newsletter.") for entry in logged)
    assert logged[-1]["event"] == "pass"
    # The service's command line parses (it would serve until stopped).
    context = main.make_context("newsletter", serve_cmd[1:])
    serve = main.get_command(context, serve_cmd[3])
    assert serve is not None
    # With its parent: click caches a command's help option from the first context made
    # for it, and one made without the parent's `-h` would break `serve -h` afterwards.
    assert serve.make_context("serve", serve_cmd[4:], parent=context).params["log_json"] is True


def test_the_container_image_runs_serve_and_can_run_the_worker() -> None:
    text = (REPO / "deploy" / "Containerfile").read_text(encoding="utf-8")
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)[1])  # type: ignore[index]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)[1])  # type: ignore[index]
    assert entry == ["newsletter", "-C", "/srv/newsletter"]
    context = main.make_context("newsletter", [*entry[1:], *cmd])
    serve = main.get_command(context, cmd[0])
    assert serve is not None
    params = serve.make_context(cmd[0], cmd[1:], parent=context).params
    assert params["host"] == "0.0.0.0" and params["port"] == 8080
    assert "STOPSIGNAL SIGTERM" in text


# --- the welcome email ------------------------------------------------------------------------


def test_a_welcome_email_follows_a_confirmation_once_when_configured(
    cfg: config.Config, tmp_path: Path
) -> None:
    arrived: list[SinkMessage] = []
    with start_sink(on_message=arrived.append) as sink:
        wired = dataclasses.replace(
            cfg,
            smtp=dataclasses.replace(cfg.smtp, port=sink.port),
            server=dataclasses.replace(cfg.server, welcome_email=True),
        )
        db = tmp_path / "news.db"
        with Store.open(db) as store:
            store.request_confirmation("new@example.org", "Nia New", resend_after=HOUR)
            store.request_confirmation("next@example.org", "", resend_after=HOUR)
            store.set_publication(EXAMPLE_SLUG, "published")
            ids = {s.email: s.id for s in store.list_subscribers()}
        signer = TokenSigner(TEST_SECRET_KEY)

        def link(address: str) -> str:
            token = signer.make(CONFIRM_PURPOSE, str(ids[address]), address_fingerprint(address))
            return f"/confirm/{token}"

        app = create_app(wired, db, mail_threads=1)  # one thread: the mails go in order
        try:
            client = app.test_client()
            assert client.post(link("new@example.org")).status_code == 200
            assert client.post(link("new@example.org")).status_code == 200  # twice: one mail
            assert client.post(link("next@example.org")).status_code == 200
            assert sink.wait_for(2, timeout=20)
        finally:
            close_app(app)
    assert [m.recipients for m in arrived] == [("new@example.org",), ("next@example.org",)]
    message = email.message_from_bytes(arrived[0].data, policy=email.policy.default)
    assert message["Subject"] == f"Welcome to {cfg.newsletter.name}"
    assert message["To"] == "Nia New <new@example.org>"
    assert message["Date"].endswith("+0000")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    unsubscribe = re.search(r"<(https://[^>]+)>", str(message["List-Unsubscribe"]))
    assert unsubscribe is not None and unsubscribe[1].startswith(cfg.unsubscribe.url + "/")
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert text.startswith("Hello Nia,")
    assert cfg.public_urls.issue(EXAMPLE_SLUG) in text  # the latest issue, on the web
    assert unsubscribe[1] in text


def test_no_welcome_email_by_default(cfg: config.Config, tmp_path: Path) -> None:
    arrived: list[SinkMessage] = []
    with start_sink(on_message=arrived.append) as sink:
        wired = dataclasses.replace(cfg, smtp=dataclasses.replace(cfg.smtp, port=sink.port))
        db = tmp_path / "news.db"
        with Store.open(db) as store:
            store.request_confirmation("new@example.org", resend_after=HOUR)
            subscriber = store.get_subscriber("new@example.org")
        assert subscriber is not None and not wired.server.welcome_email
        token = TokenSigner(TEST_SECRET_KEY).make(
            CONFIRM_PURPOSE, str(subscriber.id), address_fingerprint(subscriber.email)
        )
        app = create_app(wired, db, mail_threads=1)
        try:
            assert app.test_client().post(f"/confirm/{token}").status_code == 200
            dropped = close_app(app, timeout=10)
        finally:
            close_app(app)
    assert dropped == 0 and arrived == []
