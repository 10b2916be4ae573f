"""Providers' webhooks: authentic requests give feedback, anything else is refused whole."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter import webhooks
from newsletter.feedback import Feedback, FeedbackKind
from newsletter.webhooks import (
    SnsCertificates,
    WebhookError,
    WebhookResult,
    mailgun_feedback,
    postmark_feedback,
    sendgrid_feedback,
    ses_feedback,
    sns_url_allowed,
)
from tests.support.local_http import LocalServer, Reply, closed_port, serve
from tests.support.webhooks import (
    CERT_URL,
    MAILGUN_KEY,
    NOW,
    OUR_MESSAGE_ID,
    SUBSCRIBE_URL,
    TOPIC,
    SendGridSigner,
    SnsSigner,
    basic_auth,
    mailgun_body,
    mailgun_event,
    mailgun_failure,
    postmark_bounce,
    postmark_spam_complaint,
    postmark_subscription_change,
    sendgrid_body,
    sendgrid_event,
    ses_bounce,
    ses_complaint,
    ses_delivery,
    sns_body,
    sns_notification,
    sns_subscription,
)

# --- Amazon SES through SNS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> SnsSigner:
    return SnsSigner.create()


class Fetcher:
    """The injected certificate fetch: records every URL it was asked for."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.urls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        return self.pem


def ses(body: bytes, fetcher: Fetcher, **changes: Any) -> WebhookResult:
    kwargs: dict[str, Any] = {"now": NOW, "topic_arns": (TOPIC,), "fetch_certificate": fetcher}
    kwargs.update(changes)
    headers = kwargs.pop("headers", {"x-amz-sns-message-type": "Notification"})
    return ses_feedback(body, headers, **kwargs)


@pytest.mark.parametrize("version", ["1", "2"])
def test_ses_permanent_bounce_is_a_hard_bounce_with_our_message_id(
    signer: SnsSigner, version: str
) -> None:
    fetcher = Fetcher(signer.pem)
    message = signer.sign(sns_notification(ses_bounce("Permanent")), version=version)
    result = ses(sns_body(message), fetcher)
    assert result.feedback == (
        Feedback(
            kind=FeedbackKind.HARD_BOUNCE,
            recipient="jane@example.com",
            source="ses",
            event_id="0100018f3b1ca0b1-7a2c9f4e-1111-2222-3333-444455556666-000000/0",
            status="5.1.1",
            diagnostic="smtp; 550 5.1.1 <jane@example.com>... User unknown",
            # the header we wrote, not SES's own mail.messageId
            message_ids=(OUR_MESSAGE_ID,),
        ),
    )
    assert fetcher.urls == [CERT_URL]
    assert result.subscribe_url is None and result.replay_token is None


def test_ses_transient_bounce_is_soft_and_every_recipient_is_reported(signer: SnsSigner) -> None:
    message = signer.sign(
        sns_notification(ses_bounce("Transient", "a@example.com", "b@example.com"))
    )
    result = ses(sns_body(message), Fetcher(signer.pem))
    assert [(f.kind, f.recipient, f.status) for f in result.feedback] == [
        (FeedbackKind.SOFT_BOUNCE, "a@example.com", "4.2.2"),
        (FeedbackKind.SOFT_BOUNCE, "b@example.com", "4.2.2"),
    ]
    assert len({f.event_id for f in result.feedback}) == 2


def test_ses_complaint_and_not_spam(signer: SnsSigner) -> None:
    message = signer.sign(sns_notification(ses_complaint("abuse")))
    (complaint,) = ses(sns_body(message), Fetcher(signer.pem)).feedback
    assert complaint.kind is FeedbackKind.COMPLAINT
    assert complaint.recipient == "richard@example.com"
    assert complaint.diagnostic == "abuse"
    message = signer.sign(sns_notification(ses_complaint("not-spam")))
    assert ses(sns_body(message), Fetcher(signer.pem)).feedback == ()


def test_ses_delivery_gives_no_feedback(signer: SnsSigner) -> None:
    message = signer.sign(sns_notification(ses_delivery()))
    assert ses(sns_body(message), Fetcher(signer.pem)) == WebhookResult()


def test_ses_subscription_confirmation_exposes_the_subscribe_url(signer: SnsSigner) -> None:
    message = signer.sign(sns_subscription())
    result = ses(
        sns_body(message),
        Fetcher(signer.pem),
        headers={"X-Amz-Sns-Message-Type": "SubscriptionConfirmation"},
    )
    assert result == WebhookResult(subscribe_url=SUBSCRIBE_URL)


def test_ses_subscribe_url_on_a_foreign_host_is_refused(signer: SnsSigner) -> None:
    message = signer.sign(sns_subscription(subscribe_url="https://evil.example.net/confirm"))
    with pytest.raises(WebhookError, match="SubscribeURL is not https on an sns"):
        ses(sns_body(message), Fetcher(signer.pem), headers={})


def _tamper_message(message: dict[str, Any]) -> None:
    inner = json.loads(message["Message"])
    inner["bounce"]["bouncedRecipients"][0]["emailAddress"] = "victim@example.com"
    message["Message"] = json.dumps(inner)


@pytest.mark.parametrize(
    ("case", "change", "error"),
    [
        ("altered message", _tamper_message, "signature does not verify"),
        ("altered subject", lambda m: m.update(Subject="hello"), "signature does not verify"),
        ("sha1 claimed for sha256", lambda m: m.update(SignatureVersion="1"), "does not verify"),
        ("unknown version", lambda m: m.update(SignatureVersion="3"), "SignatureVersion '3'"),
        ("garbage signature", lambda m: m.update(Signature="!!!"), "not base64"),
        ("no signature", lambda m: m.pop("Signature"), "has no Signature"),
        (
            "wrong topic",
            lambda m: m.update(TopicArn="arn:aws:sns:us-east-1:999999999999:other"),
            "is not in \\[webhooks\\] ses_topic_arns",
        ),
        ("stale", lambda m: m.update(Timestamp="2024-05-01T10:59:00.000Z"), "older than"),
        ("future", lambda m: m.update(Timestamp="2024-05-01T12:10:00Z"), "in the future"),
        ("unknown type", lambda m: m.update(Type="Surprise"), "unknown SNS message type"),
    ],
)
def test_ses_forged_or_altered_messages_are_refused(
    signer: SnsSigner, case: str, change: Callable[[dict[str, Any]], Any], error: str
) -> None:
    message = signer.sign(sns_notification(ses_bounce()))
    change(message)
    with pytest.raises(WebhookError, match=error):
        ses(sns_body(message), Fetcher(signer.pem), headers={})


def test_ses_signed_with_another_key_is_refused(signer: SnsSigner) -> None:
    forger = SnsSigner.create()
    message = forger.sign(sns_notification(ses_bounce()))
    with pytest.raises(WebhookError, match="signature does not verify"):
        ses(sns_body(message), Fetcher(signer.pem))


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/SimpleNotificationService-1.pem",
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-1.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example.com/x.pem",
        "https://sns.us-east-1.amazonaws.com:8443/x.pem",
        "https://user@sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com\\@evil.example.com/x.pem",
        "https://sns.evil.amazonaws.com/x.pem",
        "https://sqs.us-east-1.amazonaws.com/x.pem",
        "https://SNS.US-EAST-1.AMAZONAWS.COM/x.pem",
        "https://sns.us-east-1.amazonaws.com./x.pem",
        "https://127.0.0.1/x.pem",
    ],
)
def test_a_certificate_url_off_the_sns_hosts_is_never_fetched(signer: SnsSigner, url: str) -> None:
    fetcher = Fetcher(signer.pem)
    message = signer.sign({**sns_notification(ses_bounce()), "SigningCertURL": url})
    assert not sns_url_allowed(url)
    with pytest.raises(WebhookError, match="SigningCertURL is not https on an sns"):
        ses(sns_body(message), fetcher)
    assert fetcher.urls == []


@pytest.mark.parametrize(
    "url",
    [
        CERT_URL,
        "https://sns.eu-central-1.amazonaws.com/SimpleNotificationService-a.pem",
        "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-b.pem",
        "https://sns.ap-southeast-2.amazonaws.com/SimpleNotificationService-c.pem",
    ],
)
def test_sns_hosts_of_every_region_are_allowed(url: str) -> None:
    assert sns_url_allowed(url)


def test_ses_needs_a_configured_topic_and_fetches_nothing_without_one(signer: SnsSigner) -> None:
    fetcher = Fetcher(signer.pem)
    message = signer.sign(sns_notification(ses_bounce()))
    with pytest.raises(WebhookError, match="no SES topic is configured"):
        ses(sns_body(message), fetcher, topic_arns=())
    assert fetcher.urls == []


def test_ses_expired_certificate_or_failing_fetch_is_refused(signer: SnsSigner) -> None:
    expired = SnsSigner.create(not_after=NOW - timedelta(days=1))
    message = expired.sign(sns_notification(ses_bounce()))
    with pytest.raises(WebhookError, match="not valid at this time"):
        ses(sns_body(message), Fetcher(expired.pem))

    def broken(url: str) -> bytes:
        raise OSError("network unreachable")

    message = signer.sign(sns_notification(ses_bounce()))
    with pytest.raises(WebhookError, match=r"could not fetch .* \(OSError\)"):
        ses(sns_body(message), Fetcher(b""), fetch_certificate=broken)
    with pytest.raises(WebhookError, match=r"not a PEM X\.509 certificate"):
        ses(sns_body(message), Fetcher(b"-----BEGIN CERTIFICATE-----\nxx\n"))


def test_ses_header_type_must_match_the_message(signer: SnsSigner) -> None:
    message = signer.sign(sns_notification(ses_bounce()))
    with pytest.raises(WebhookError, match="x-amz-sns-message-type"):
        ses(
            sns_body(message),
            Fetcher(signer.pem),
            headers={"x-amz-sns-message-type": "SubscriptionConfirmation"},
        )


# --- the production certificate fetch -----------------------------------------------------


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


def test_certificates_are_fetched_once_and_cached(server: LocalServer, signer: SnsSigner) -> None:
    server.routes["/cert.pem"] = Reply(body=signer.pem)
    fetch = SnsCertificates(pool=urllib3.PoolManager())
    assert fetch(server.url("/cert.pem")) == signer.pem
    assert fetch(server.url("/cert.pem")) == signer.pem
    assert len(server.requests_for("/cert.pem")) == 1


def test_certificate_fetch_failures_are_webhook_errors(server: LocalServer) -> None:
    fetch = SnsCertificates(pool=urllib3.PoolManager(), timeout=0.3, max_bytes=1000)
    with pytest.raises(WebhookError, match="answered HTTP 404"):
        fetch(server.url("/missing.pem"))
    server.routes["/big.pem"] = Reply(body=b"x" * 5000, omit_length=True)
    with pytest.raises(WebhookError, match="larger than 1000 bytes"):
        fetch(server.url("/big.pem"))
    server.routes["/moved.pem"] = Reply(302, headers={"Location": "https://evil.example.com/"})
    with pytest.raises(WebhookError, match="answered HTTP 302"):
        fetch(server.url("/moved.pem"))
    release = threading.Event()
    server.routes["/slow.pem"] = Reply(body=b"x", stall=release)
    try:
        with pytest.raises(WebhookError, match="could not fetch"):
            fetch(server.url("/slow.pem"))
    finally:
        release.set()
    with pytest.raises(WebhookError, match="could not fetch"):
        fetch(f"http://127.0.0.1:{closed_port()}/cert.pem")


# --- Postmark ------------------------------------------------------------------------------

PM_USER, PM_PASSWORD = "postmark-hooks", "s3cret-horse-battery-staple"


def postmark(record: Any, headers: dict[str, str] | None = None, **changes: Any) -> WebhookResult:
    kwargs: dict[str, Any] = {"username": PM_USER, "password": PM_PASSWORD}
    kwargs.update(changes)
    body = record if isinstance(record, bytes) else json.dumps(record).encode()
    if headers is None:
        headers = basic_auth(PM_USER, PM_PASSWORD)
    return postmark_feedback(body, headers, **kwargs)


@pytest.mark.parametrize(
    ("bounce_type", "code", "kind"),
    [
        ("HardBounce", 1, FeedbackKind.HARD_BOUNCE),
        ("BadEmailAddress", 100000, FeedbackKind.HARD_BOUNCE),
        ("SoftBounce", 4096, FeedbackKind.SOFT_BOUNCE),
        ("Transient", 2, FeedbackKind.SOFT_BOUNCE),
        ("Blocked", 100006, FeedbackKind.SOFT_BOUNCE),
        ("AutoResponder", 64, None),
        ("DnsError", 256, None),
        ("ManuallyDeactivated", 100002, None),
        ("SomethingNew", 999, None),
    ],
)
def test_postmark_bounce_types(bounce_type: str, code: int, kind: FeedbackKind | None) -> None:
    result = postmark(postmark_bounce(bounce_type, code))
    assert [f.kind for f in result.feedback] == ([kind] if kind else [])


def test_postmark_hard_bounce_record() -> None:
    (bounce,) = postmark(postmark_bounce()).feedback
    assert bounce == Feedback(
        kind=FeedbackKind.HARD_BOUNCE,
        recipient="john@example.com",
        source="postmark",
        event_id="Bounce:4323372036854775807",
        status="5.1.1",
        diagnostic="smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        message_ids=(),  # Postmark's own MessageID is a UUID, not a Message-ID
    )


def test_postmark_complaint_and_subscription_changes() -> None:
    (complaint,) = postmark(postmark_spam_complaint()).feedback
    assert (complaint.kind, complaint.event_id) == (FeedbackKind.COMPLAINT, "SpamComplaint:42")
    (unsubscribe,) = postmark(postmark_subscription_change()).feedback
    assert (unsubscribe.kind, unsubscribe.recipient) == (
        FeedbackKind.UNSUBSCRIBE,
        "mary@example.com",
    )
    assert unsubscribe.event_id.startswith("sha256:")
    assert postmark(postmark_subscription_change()).feedback[0].event_id == unsubscribe.event_id
    (hard,) = postmark(postmark_subscription_change(reason="HardBounce")).feedback
    assert hard.kind is FeedbackKind.HARD_BOUNCE
    # a reactivation in Postmark never reactivates anyone here
    assert postmark(postmark_subscription_change(suppress=False)).feedback == ()
    assert postmark({"RecordType": "Open", "Recipient": "x@example.com"}).feedback == ()


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        (basic_auth(PM_USER, "wrong-password"), "wrong Postmark webhook credentials"),
        (basic_auth("someone-else", PM_PASSWORD), "wrong Postmark webhook credentials"),
        (basic_auth(PM_USER, PM_PASSWORD + "x"), "wrong Postmark webhook credentials"),
        ({"Authorization": "Basic " + "bm9jb2xvbg=="}, "wrong Postmark webhook credentials"),
        ({}, "no HTTP Basic credentials"),
        ({"Authorization": "Bearer abc"}, "no HTTP Basic credentials"),
        ({"Authorization": "Basic ###"}, "not base64"),
    ],
)
def test_postmark_wrong_or_missing_credentials_are_refused(
    headers: dict[str, str], error: str
) -> None:
    with pytest.raises(WebhookError, match=error) as caught:
        postmark(postmark_bounce(), headers)
    assert PM_PASSWORD not in str(caught.value)


def test_postmark_without_a_password_configured_refuses_everything() -> None:
    with pytest.raises(WebhookError, match="NEWSLETTER_POSTMARK_PASSWORD"):
        postmark(postmark_bounce(), basic_auth(PM_USER, ""), password=None)


def test_postmark_network_allow_list() -> None:
    nets = ("50.31.156.0/24", "2001:db8::/32")
    assert postmark(postmark_bounce(), remote_addr="50.31.156.6", allowed_networks=nets).feedback
    assert postmark(postmark_bounce(), remote_addr="2001:db8::5", allowed_networks=nets).feedback
    for addr in ("203.0.113.9", None, "not-an-ip"):
        with pytest.raises(WebhookError, match="outside \\[webhooks\\] postmark_networks"):
            postmark(postmark_bounce(), remote_addr=addr, allowed_networks=nets)


# --- Mailgun -------------------------------------------------------------------------------


class Seen:
    """The caller's token store: ``seen`` checks, the caller records after acting."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()

    def __call__(self, token: str) -> bool:
        return token in self.tokens


def mailgun(body: bytes, seen: Seen | None = None, **changes: Any) -> WebhookResult:
    kwargs: dict[str, Any] = {"now": NOW, "signing_key": MAILGUN_KEY, "seen": seen or Seen()}
    kwargs.update(changes)
    return mailgun_feedback(body, {"Content-Type": "application/json"}, **kwargs)


def test_mailgun_permanent_failure_is_a_hard_bounce_and_hands_back_the_token() -> None:
    result = mailgun(mailgun_body(mailgun_failure()))
    assert result.feedback == (
        Feedback(
            kind=FeedbackKind.HARD_BOUNCE,
            recipient="alice@example.com",
            source="mailgun",
            event_id="G9Bn5sl1TC6nu79C8C0bwg",
            status="5.1.1",
            diagnostic="5.1.1 The email account that you tried to reach does not exist.",
            message_ids=(OUR_MESSAGE_ID,),
        ),
    )
    assert result.replay_token == "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (mailgun_failure("temporary", "generic"), FeedbackKind.DELAY),
        (mailgun_failure("permanent", "suppress-bounce"), FeedbackKind.HARD_BOUNCE),
        (mailgun_failure("permanent", "old"), FeedbackKind.SOFT_BOUNCE),
        (mailgun_failure("permanent", "suppress-complaint"), FeedbackKind.COMPLAINT),
        (mailgun_failure("permanent", "suppress-unsubscribe"), FeedbackKind.UNSUBSCRIBE),
        (mailgun_event("complained"), FeedbackKind.COMPLAINT),
        (mailgun_event("unsubscribed"), FeedbackKind.UNSUBSCRIBE),
        (mailgun_event("delivered"), None),
        (mailgun_event("opened"), None),
    ],
)
def test_mailgun_event_kinds(event: dict[str, Any], kind: FeedbackKind | None) -> None:
    result = mailgun(mailgun_body(event))
    assert [f.kind for f in result.feedback] == ([kind] if kind else [])
    assert result.replay_token is not None  # authentic: recorded even with no feedback


def test_mailgun_replayed_token_is_refused() -> None:
    seen = Seen()
    body = mailgun_body(mailgun_failure())
    result = mailgun(body, seen)
    assert result.replay_token is not None
    seen.tokens.add(result.replay_token)
    with pytest.raises(WebhookError, match="token was used before"):
        mailgun(body, seen)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (mailgun_body(mailgun_failure(), key="key-not-ours"), "signature does not verify"),
        (
            mailgun_body(mailgun_failure(), timestamp=NOW - timedelta(minutes=6)),
            "older than 0:05:00",
        ),
        (mailgun_body(mailgun_failure(), timestamp=NOW + timedelta(minutes=6)), "in the future"),
        (b'{"event-data": {}}', "no signature object"),
        (b'{"signature": {"timestamp": 1}}', "needs timestamp, token and signature"),
    ],
)
def test_mailgun_bad_signatures_are_refused(body: bytes, error: str) -> None:
    with pytest.raises(WebhookError, match=error):
        mailgun(body)


def test_mailgun_signature_covers_timestamp_and_token() -> None:
    payload = json.loads(mailgun_body(mailgun_failure()))
    for field, value in (("timestamp", str(int(NOW.timestamp()) - 1)), ("token", "b" * 50)):
        forged = json.loads(json.dumps(payload))
        forged["signature"][field] = value
        with pytest.raises(WebhookError, match="signature does not verify"):
            mailgun(json.dumps(forged).encode())


def test_mailgun_without_a_signing_key_refuses_everything() -> None:
    with pytest.raises(WebhookError, match="NEWSLETTER_MAILGUN_SIGNING_KEY") as caught:
        mailgun(mailgun_body(mailgun_failure()), signing_key=None)
    assert MAILGUN_KEY not in str(caught.value)


# --- SendGrid ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid() -> SendGridSigner:
    return SendGridSigner.create()


def sendgrid(body: bytes, headers: dict[str, str], key: str, **changes: Any) -> WebhookResult:
    kwargs: dict[str, Any] = {"now": NOW, "public_key": key}
    kwargs.update(changes)
    return sendgrid_feedback(body, headers, **kwargs)


def test_sendgrid_batch_maps_each_event(grid: SendGridSigner) -> None:
    events = [
        sendgrid_event("bounce", "a@example.com", type="bounce", status="5.1.1", reason="550"),
        sendgrid_event("bounce", "b@example.com", type="blocked", status="5.7.1", reason="block"),
        sendgrid_event("dropped", "c@example.com", reason="Bounced Address", status="5.0.0"),
        sendgrid_event("dropped", "d@example.com", reason="Spam Content (if enabled)"),
        sendgrid_event("spamreport", "e@example.com"),
        sendgrid_event("unsubscribe", "f@example.com"),
        sendgrid_event("group_unsubscribe", "g@example.com", asm_group_id=10),
        sendgrid_event("deferred", "h@example.com", response="400 try again later"),
        sendgrid_event("delivered", "i@example.com", response="250 OK"),
        sendgrid_event("open", "j@example.com"),
        sendgrid_event("dropped", "k@example.com", reason="Unsubscribed Address"),
        sendgrid_event("dropped", "l@example.com", reason="Spam Reporting Address"),
    ]
    body = sendgrid_body(events)
    result = sendgrid(body, grid.headers(body), grid.public_key)
    assert [(f.recipient, f.kind) for f in result.feedback] == [
        ("a@example.com", FeedbackKind.HARD_BOUNCE),
        ("b@example.com", FeedbackKind.SOFT_BOUNCE),
        ("c@example.com", FeedbackKind.HARD_BOUNCE),
        ("e@example.com", FeedbackKind.COMPLAINT),
        ("f@example.com", FeedbackKind.UNSUBSCRIBE),
        ("g@example.com", FeedbackKind.UNSUBSCRIBE),
        ("h@example.com", FeedbackKind.DELAY),
        ("k@example.com", FeedbackKind.UNSUBSCRIBE),
        ("l@example.com", FeedbackKind.COMPLAINT),
    ]
    first = result.feedback[0]
    assert first.source == "sendgrid"
    assert first.event_id == "sg-bounce-a@example.com"
    assert first.status == "5.1.1"
    assert first.message_ids == (OUR_MESSAGE_ID,)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("altered body", "signature does not verify"),
        ("other key", "signature does not verify"),
        ("stale", "older than"),
        ("future", "in the future"),
        ("no headers", "no X-Twilio-Email-Event-Webhook-Signature"),
        ("restamped", "signature does not verify"),
    ],
)
def test_sendgrid_forged_altered_or_stale_requests_are_refused(
    grid: SendGridSigner, case: str, error: str
) -> None:
    body = sendgrid_body([sendgrid_event("bounce", type="bounce", status="5.1.1")])
    headers = grid.headers(body)
    if case == "altered body":
        body = body.replace(b"bob@", b"eve@")
    elif case == "other key":
        headers = SendGridSigner.create().headers(body)
    elif case == "stale":
        headers = grid.headers(body, timestamp=NOW - timedelta(minutes=6))
    elif case == "future":
        headers = grid.headers(body, timestamp=NOW + timedelta(minutes=6))
    elif case == "no headers":
        headers = {}
    elif case == "restamped":  # a fresh timestamp on an old signature
        headers = grid.headers(body, timestamp=NOW - timedelta(minutes=6))
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(int(NOW.timestamp()))
    with pytest.raises(WebhookError, match=error):
        sendgrid(body, headers, grid.public_key)


def test_sendgrid_key_must_be_a_p256_public_key(grid: SendGridSigner) -> None:
    body = sendgrid_body([])
    with pytest.raises(WebhookError, match="not a base64 public key"):
        sendgrid(body, grid.headers(body), "not a key")
    with pytest.raises(WebhookError, match="NEWSLETTER_SENDGRID_PUBLIC_KEY"):
        sendgrid(body, grid.headers(body), "")
    assert sendgrid(body, grid.headers(body), grid.public_key) == WebhookResult()


def test_sendgrid_body_must_be_an_array_of_bounded_length(grid: SendGridSigner) -> None:
    body = json.dumps({"event": "bounce"}).encode()
    with pytest.raises(WebhookError, match="not a JSON array"):
        sendgrid(body, grid.headers(body), grid.public_key)
    body = sendgrid_body([{"event": "open"}] * (webhooks.MAX_EVENTS + 1))
    with pytest.raises(WebhookError, match="1001 events in one request"):
        sendgrid(body, grid.headers(body), grid.public_key)


def test_sendgrid_events_without_an_address_are_skipped_and_said(grid: SendGridSigner) -> None:
    body = sendgrid_body(
        [sendgrid_event("bounce", email="not an address"), 7, sendgrid_event("spamreport")]
    )
    result = sendgrid(body, grid.headers(body), grid.public_key)
    assert [f.kind for f in result.feedback] == [FeedbackKind.COMPLAINT]
    assert result.skipped == ("event 1 (bounce): no email address", "event 2: not an object")


# --- every provider ------------------------------------------------------------------------


def test_every_provider_refuses_oversized_bodies_and_malformed_json(
    signer: SnsSigner, grid: SendGridSigner
) -> None:
    big = b"[" + b" " * webhooks.MAX_BODY_BYTES + b"]"
    for bad in (big, b"{not json", b"\xff\xfe\x00", b"[" * 100_000):
        with pytest.raises(WebhookError):
            ses(bad, Fetcher(signer.pem))
        with pytest.raises(WebhookError):
            postmark(bad)
        with pytest.raises(WebhookError):
            mailgun(bad)
        with pytest.raises(WebhookError):
            sendgrid(bad, grid.headers(bad), grid.public_key)


def test_odd_strings_from_the_provider_never_reach_the_feedback(
    signer: SnsSigner, grid: SendGridSigner
) -> None:
    odd = "\ud800\x00\n"
    event = sendgrid_event("spamreport", sg_event_id=odd, reason=f"spam{odd}report")
    event["smtp-id"] = f"<a{odd}@example.org>"
    body = json.dumps([event]).encode()
    (complaint,) = sendgrid(body, grid.headers(body), grid.public_key).feedback
    assert complaint.event_id.startswith("sha256:")  # the id was not usable: a hash instead
    assert complaint.diagnostic == "spam report"
    assert complaint.message_ids == ()
    (bounce,) = mailgun(mailgun_body(mailgun_failure() | {"id": "x" * 201})).feedback
    assert bounce.event_id.startswith("sha256:")
    message = signer.sign({**sns_notification(ses_bounce()), "Subject": "Issue 7"})
    message["Subject"] = "\ud800"  # a lone surrogate: refused, not a crash
    with pytest.raises(WebhookError, match="signature does not verify"):
        ses(sns_body(message), Fetcher(signer.pem))


def test_errors_never_echo_the_secrets(grid: SendGridSigner) -> None:
    body = mailgun_body(mailgun_failure(), key="key-not-ours")
    with pytest.raises(WebhookError) as caught:
        mailgun(body)
    assert MAILGUN_KEY not in str(caught.value)


# Leaves include the providers' own words, so the fuzz reaches the mapping code.
WORDS = st.sampled_from(
    [
        "failed",
        "permanent",
        "temporary",
        "complained",
        "unsubscribed",
        "bounce",
        "blocked",
        "dropped",
        "spamreport",
        "Bounce",
        "Complaint",
        "Permanent",
        "HardBounce",
        "SpamComplaint",
        "SubscriptionChange",
        "ManualSuppression",
        "someone@example.com",
        "<id@example.org>",
        "5.1.1",
        "\ud800 lone surrogate",
        "nul\x00 and\nnewline",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | WORDS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "event",
                    "email",
                    "type",
                    "status",
                    "reason",
                    "severity",
                    "recipient",
                    "id",
                    "message",
                    "headers",
                    "message-id",
                    "delivery-status",
                    "smtp-id",
                    "sg_event_id",
                    "RecordType",
                    "Type",
                    "Email",
                    "ID",
                    "Recipient",
                    "SuppressSending",
                    "SuppressionReason",
                    "notificationType",
                    "bounce",
                    "complaint",
                    "bounceType",
                    "bouncedRecipients",
                    "complainedRecipients",
                    "emailAddress",
                    "mail",
                    "commonHeaders",
                    "messageId",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)
_FUZZ_GRID = SendGridSigner.create()
_FUZZ_SIGNER = SnsSigner.create()
HEADERS = st.dictionaries(st.text(max_size=40), st.text(max_size=80), max_size=4)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_webhook_errors(call: Callable[[], WebhookResult]) -> None:
    try:
        result = call()
    except WebhookError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(result, WebhookResult)
    for feedback in result.feedback:
        assert isinstance(feedback, Feedback) and feedback.event_id


@FUZZ
@given(body=st.binary(max_size=300), headers=HEADERS)
def test_random_requests_only_ever_raise_webhook_errors(
    body: bytes, headers: dict[str, str]
) -> None:
    _only_webhook_errors(
        lambda: ses_feedback(
            body, headers, now=NOW, topic_arns=(TOPIC,), fetch_certificate=Fetcher(b"")
        )
    )
    _only_webhook_errors(
        lambda: postmark_feedback(body, headers, username=PM_USER, password=PM_PASSWORD)
    )
    _only_webhook_errors(
        lambda: mailgun_feedback(body, headers, now=NOW, signing_key=MAILGUN_KEY, seen=Seen())
    )
    _only_webhook_errors(
        lambda: sendgrid_feedback(body, headers, now=NOW, public_key=_FUZZ_GRID.public_key)
    )


@FUZZ
@given(record=JSON)
def test_authentic_requests_with_any_json_only_ever_raise_webhook_errors(record: Any) -> None:
    body = json.dumps(record).encode()
    _only_webhook_errors(lambda: postmark(body))
    _only_webhook_errors(lambda: mailgun(mailgun_body(record)))
    events = json.dumps(record if isinstance(record, list) else [record]).encode()
    _only_webhook_errors(
        lambda: sendgrid(events, _FUZZ_GRID.headers(events), _FUZZ_GRID.public_key)
    )
    message = _FUZZ_SIGNER.sign(
        {**sns_notification({}), "Message": json.dumps(record)}, version="2"
    )
    _only_webhook_errors(lambda: ses(sns_body(message), Fetcher(_FUZZ_SIGNER.pem)))
