"""The webhook routes of a running service: signed real-shaped requests act, others do not.

Each test starts `serve`'s app on a loopback port (waitress, a real SQLite file) with the
providers' secrets set, signs the providers' documented payload shapes with keys it
generates (tests/support/webhooks.py) and posts them over HTTP. The clock of the service is
the payloads' time; the SNS signing certificate comes from an injected fetcher (no SNS host
is reachable from a test).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from newsletter import config as config_module
from newsletter.models import DeliveryResult, DeliveryState, Status
from newsletter.server import RunningService, create_app, start_server
from newsletter.store import Store
from tests.support import TEST_SECRET_KEY
from tests.support.webhooks import (
    MAILGUN_KEY,
    NOW,
    OUR_MESSAGE_ID,
    SUBSCRIBE_URL,
    TOPIC,
    SendGridSigner,
    SnsSigner,
    basic_auth,
    mailgun_body,
    mailgun_failure,
    postmark_bounce,
    postmark_subscription_change,
    sendgrid_body,
    sendgrid_event,
    ses_bounce,
    ses_complaint,
    sns_body,
    sns_notification,
    sns_subscription,
)

pytestmark = pytest.mark.server

ISSUE = "007-issue"
POSTMARK_USER = "postmark-hook"
POSTMARK_PASSWORD = "a-long-postmark-password"
READERS = (
    "jane@example.com",
    "richard@example.com",
    "john@example.com",
    "mary@example.com",
    "alice@example.com",
    "bob@example.com",
    "carol@example.com",
)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def sns() -> SnsSigner:
    return SnsSigner.create()


@pytest.fixture(scope="module")
def grid() -> SendGridSigner:
    return SendGridSigner.create()


class Certificates:
    """The SNS certificate fetcher: the test's certificate, or a failure, and every URL."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.urls: list[str] = []
        self.fail = False

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if self.fail:
            raise OSError("connection refused")
        return self.pem


@dataclass
class Hooks:
    http: RunningService
    store: Store
    certificates: Certificates

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=10)
        try:
            # A body over the limit is refused (413) before it is all sent: the server's
            # answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request("POST", path, body=body, headers={**JSON, **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def status(self, address: str) -> Status:
        subscriber = self.store.get_subscriber(address)
        assert subscriber is not None
        return subscriber.status

    def statuses(self) -> dict[str, Status]:
        return {s.email: s.status for s in self.store.list_subscribers()}

    def sent(self, *addresses: str, ours: str = "") -> None:
        """The ledger: ``addresses`` got ISSUE; ``ours`` got the copy with OUR_MESSAGE_ID."""
        for address in addresses:
            if self.store.get_subscriber(address) is None:
                self.store.add_subscriber(address)
        self.store.snapshot_recipients(ISSUE, include_new=True)
        with self.store.acquire_send_lock(ISSUE):
            claimed = self.store.claim_batch(ISSUE, "test", 1000)
            self.store.record_results(
                DeliveryResult(
                    ISSUE,
                    c.subscriber.id,
                    DeliveryState.SENT,
                    "250 ok",
                    OUR_MESSAGE_ID if c.subscriber.email == ours else f"<{c.subscriber.id}@x>",
                )
                for c in claimed
                if c.subscriber.email in addresses
            )


def workspace(root: Path, extra: str) -> Path:
    root.mkdir(parents=True)
    (root / "newsletter.toml").write_text(
        '[newsletter]\nname = "The Harbour Ledger"\n'
        'sender = "The Harbour Ledger <newsletter@example.org>"\n'
        'base_url = "https://example.org/ledger"\n' + extra,
        encoding="utf-8",
    )
    return root


def start(folder: Path, sns: SnsSigner, extra: str, env: dict[str, str]) -> Iterator[Hooks]:
    root = workspace(folder, extra)
    cfg = config_module.load(root, environ={config_module.ENV_SECRET_KEY: TEST_SECRET_KEY, **env})
    certificates = Certificates(sns.pem)
    app = create_app(cfg, fetch_certificate=certificates, clock=lambda: NOW)
    running = start_server(app, "127.0.0.1", 0, threads=4)
    store = Store.open(cfg.database)
    try:
        yield Hooks(running, store, certificates)
    finally:
        running.stop()
        store.close()


@pytest.fixture
def hooks(tmp_path: Path, sns: SnsSigner, grid: SendGridSigner) -> Iterator[Hooks]:
    extra = f'[webhooks]\nses_topic_arns = ["{TOPIC}"]\npostmark_username = "{POSTMARK_USER}"\n'
    env = {
        config_module.ENV_POSTMARK_PASSWORD: POSTMARK_PASSWORD,
        config_module.ENV_MAILGUN_SIGNING_KEY: MAILGUN_KEY,
        config_module.ENV_SENDGRID_PUBLIC_KEY: grid.public_key,
    }
    yield from start(tmp_path / "hooks", sns, extra, env)


@pytest.fixture
def bare(tmp_path: Path, sns: SnsSigner) -> Iterator[Hooks]:
    """A service with no webhook configured."""
    yield from start(tmp_path / "bare", sns, "", {})


# --- which routes answer -------------------------------------------------------------------


def test_a_route_answers_only_when_its_provider_is_configured(bare: Hooks, hooks: Hooks) -> None:
    for provider in ("ses", "postmark", "mailgun", "sendgrid"):
        assert bare.post(f"/hooks/{provider}", b"{}") == (404, "not found\n")
        status, text = hooks.post(f"/hooks/{provider}", b"{}")
        assert (status, text) == (400, "refused\n"), provider
    assert hooks.post("/hooks/other", b"{}")[0] == 404


# --- Amazon SES through SNS ------------------------------------------------------------------


def test_ses_bounce_and_complaint_act_on_the_subscribers_they_name_once(
    hooks: Hooks, sns: SnsSigner
) -> None:
    hooks.sent("jane@example.com", "richard@example.com", ours="jane@example.com")
    bounce = sns_body(sns.sign(sns_notification(ses_bounce("Permanent"))))
    headers = {"x-amz-sns-message-type": "Notification"}
    assert hooks.post("/hooks/ses", bounce, headers) == (200, "ok\n")
    assert hooks.status("jane@example.com") == Status.BOUNCED
    event = hooks.store.subscriber_events("jane@example.com")[-1]
    assert event.reason == "bounce-hard" and "matched by ses webhook, Message-ID" in event.detail
    assert "ses event 0100018f3b1ca0b1" in event.detail and ISSUE in event.detail
    # SNS delivers at least once: the same notification again changes nothing.
    assert hooks.post("/hooks/ses", bounce, headers) == (200, "ok\n")
    assert len(hooks.store.subscriber_events("jane@example.com")) == 2
    # The complaint names OUR_MESSAGE_ID, which went to jane, not richard: not his message.
    complaint = sns_body(sns.sign(sns_notification(ses_complaint())))
    assert hooks.post("/hooks/ses", complaint, headers) == (200, "ok\n")
    assert hooks.status("richard@example.com") == Status.ACTIVE


def test_ses_complaint_about_the_readers_own_copy_marks_them_complained(
    hooks: Hooks, sns: SnsSigner
) -> None:
    hooks.sent("richard@example.com", ours="richard@example.com")
    complaint = sns_body(sns.sign(sns_notification(ses_complaint())))
    assert hooks.post("/hooks/ses", complaint)[0] == 200
    assert hooks.status("richard@example.com") == Status.COMPLAINED


def test_ses_forged_or_tampered_notifications_change_nothing(hooks: Hooks, sns: SnsSigner) -> None:
    hooks.sent("jane@example.com", ours="jane@example.com")
    signed = sns.sign(sns_notification(ses_bounce("Permanent")))
    tampered = dict(signed, Message=signed["Message"].replace("Permanent", "Transient"))
    unsigned = {k: v for k, v in signed.items() if k != "Signature"}
    other = SnsSigner.create().sign(sns_notification(ses_bounce("Permanent")))
    for message in (tampered, unsigned, other):
        assert hooks.post("/hooks/ses", sns_body(message)) == (400, "refused\n")
    assert hooks.status("jane@example.com") == Status.ACTIVE


def test_ses_subscription_confirmation_is_logged_not_visited(
    hooks: Hooks, sns: SnsSigner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="newsletter.hooks")
    body = sns_body(sns.sign(sns_subscription()))
    assert hooks.post("/hooks/ses", body) == (200, "ok\n")
    assert any(SUBSCRIBE_URL in record.getMessage() for record in caplog.records)
    assert all("ConfirmSubscription" not in url for url in hooks.certificates.urls)


def test_ses_without_its_certificate_asks_sns_to_retry(hooks: Hooks, sns: SnsSigner) -> None:
    hooks.sent("jane@example.com", ours="jane@example.com")
    hooks.certificates.fail = True
    body = sns_body(sns.sign(sns_notification(ses_bounce("Permanent"))))
    assert hooks.post("/hooks/ses", body)[0] == 503
    assert hooks.status("jane@example.com") == Status.ACTIVE
    hooks.certificates.fail = False
    assert hooks.post("/hooks/ses", body)[0] == 200
    assert hooks.status("jane@example.com") == Status.BOUNCED


# --- Postmark --------------------------------------------------------------------------------


def test_postmark_bounce_needs_the_credentials_and_an_address_we_sent_to(hooks: Hooks) -> None:
    body = json.dumps(postmark_bounce()).encode()
    hooks.store.add_subscriber("john@example.com")
    # Authentic, but we never sent anything to john: nothing changes.
    assert hooks.post("/hooks/postmark", body, basic_auth(POSTMARK_USER, POSTMARK_PASSWORD)) == (
        200,
        "ok\n",
    )
    assert hooks.status("john@example.com") == Status.ACTIVE
    hooks.sent("john@example.com")
    wrong = basic_auth(POSTMARK_USER, "guessed")
    assert hooks.post("/hooks/postmark", body, wrong) == (400, "refused\n")
    assert hooks.post("/hooks/postmark", body) == (400, "refused\n")
    assert hooks.status("john@example.com") == Status.ACTIVE
    # Postmark's MessageID is its own: matched by the address we sent to. (The event was
    # recorded as unmatched the first time: a new record id makes it a new event.)
    again = json.dumps({**postmark_bounce(), "ID": 7}).encode()
    auth = basic_auth(POSTMARK_USER, POSTMARK_PASSWORD)
    assert hooks.post("/hooks/postmark", again, auth) == (200, "ok\n")
    assert hooks.status("john@example.com") == Status.BOUNCED


def test_postmark_unsubscribe_through_its_own_link_unsubscribes(hooks: Hooks) -> None:
    hooks.sent("mary@example.com")
    body = json.dumps(postmark_subscription_change()).encode()
    auth = basic_auth(POSTMARK_USER, POSTMARK_PASSWORD)
    assert hooks.post("/hooks/postmark", body, auth) == (200, "ok\n")
    assert hooks.status("mary@example.com") == Status.UNSUBSCRIBED
    assert hooks.store.subscriber_events("mary@example.com")[-1].reason == "postmark-unsubscribe"


# --- Mailgun ---------------------------------------------------------------------------------


def test_mailgun_failure_bounces_and_a_replay_is_refused(hooks: Hooks) -> None:
    hooks.sent("alice@example.com", ours="alice@example.com")
    body = mailgun_body(mailgun_failure())
    assert hooks.post("/hooks/mailgun", body) == (200, "ok\n")
    assert hooks.status("alice@example.com") == Status.BOUNCED
    assert hooks.store.webhook_token_seen(
        "mailgun", json.loads(body)["signature"]["token"], now=NOW
    )
    events = len(hooks.store.subscriber_events("alice@example.com"))
    assert hooks.post("/hooks/mailgun", body) == (400, "refused\n")
    assert len(hooks.store.subscriber_events("alice@example.com")) == events


def test_mailgun_wrongly_signed_or_stale_requests_change_nothing(hooks: Hooks) -> None:
    hooks.sent("alice@example.com", ours="alice@example.com")
    for body in (
        mailgun_body(mailgun_failure(), key="key-not-ours-0000000000000000000"),
        mailgun_body(mailgun_failure(), timestamp=NOW - timedelta(minutes=30)),
        json.dumps({"event-data": mailgun_failure()}).encode(),
    ):
        assert hooks.post("/hooks/mailgun", body) == (400, "refused\n")
    assert hooks.status("alice@example.com") == Status.ACTIVE


# --- SendGrid --------------------------------------------------------------------------------


def test_sendgrid_batch_acts_on_each_event_for_subscribers_we_sent_to(
    hooks: Hooks, grid: SendGridSigner
) -> None:
    hooks.sent("bob@example.com", "carol@example.com", ours="bob@example.com")
    events = [
        sendgrid_event("bounce", "bob@example.com", status="5.1.1", reason="550 5.1.1 unknown"),
        sendgrid_event("spamreport", "carol@example.com", **{"smtp-id": "<sg@elsewhere>"}),
        sendgrid_event("bounce", "stranger@example.com", status="5.1.1"),
        sendgrid_event("delivered", "carol@example.com"),
    ]
    body = sendgrid_body(events)
    before = hooks.statuses()
    forged = sendgrid_body([*events, sendgrid_event("unsubscribe", "carol@example.com")])
    assert hooks.post("/hooks/sendgrid", forged, grid.headers(body)) == (400, "refused\n")
    assert hooks.statuses() == before
    assert hooks.post("/hooks/sendgrid", body, grid.headers(body)) == (200, "ok\n")
    assert hooks.status("bob@example.com") == Status.BOUNCED
    assert hooks.status("carol@example.com") == Status.COMPLAINED
    assert hooks.store.get_subscriber("stranger@example.com") is None


# --- body size -------------------------------------------------------------------------------


def test_webhooks_take_bodies_up_to_1_mb_and_the_forms_still_64_kb(
    hooks: Hooks, grid: SendGridSigner
) -> None:
    hooks.sent("bob@example.com", ours="bob@example.com")
    padding = "x" * 600_000
    body = sendgrid_body([sendgrid_event("bounce", "bob@example.com", category=[padding])])
    assert len(body) > 512_000
    assert hooks.post("/hooks/sendgrid", body, grid.headers(body)) == (200, "ok\n")
    assert hooks.status("bob@example.com") == Status.BOUNCED
    huge = b"[" + b" " * 1_100_000 + b"]"
    assert hooks.post("/hooks/sendgrid", huge, grid.headers(huge))[0] == 413
    form = b"email=a%40example.org&name=" + b"x" * 200_000
    status, _ = hooks.post(
        "/subscribe", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 413


def test_postmark_networks_are_checked_against_the_client_behind_a_trusted_proxy(
    tmp_path: Path, sns: SnsSigner
) -> None:
    extra = (
        '[server]\ntrusted_proxies = ["127.0.0.1"]\n'
        f'[webhooks]\npostmark_username = "{POSTMARK_USER}"\n'
        'postmark_networks = ["192.0.2.0/24"]\n'
    )
    env = {config_module.ENV_POSTMARK_PASSWORD: POSTMARK_PASSWORD}
    service = start(tmp_path / "proxied", sns, extra, env)
    hooks = next(service)
    try:
        hooks.sent("mary@example.com")
        body = json.dumps(postmark_subscription_change()).encode()
        auth = basic_auth(POSTMARK_USER, POSTMARK_PASSWORD)
        # Straight from loopback (the proxy itself), or from a network Postmark is not in.
        assert hooks.post("/hooks/postmark", body, auth) == (400, "refused\n")
        outside = {**auth, "X-Forwarded-For": "192.0.2.9, 203.0.113.5"}
        assert hooks.post("/hooks/postmark", body, outside) == (400, "refused\n")
        assert hooks.status("mary@example.com") == Status.ACTIVE
        inside = {**auth, "X-Forwarded-For": "203.0.113.5, 192.0.2.9"}
        assert hooks.post("/hooks/postmark", body, inside) == (200, "ok\n")
        assert hooks.status("mary@example.com") == Status.UNSUBSCRIBED
    finally:
        service.close()
