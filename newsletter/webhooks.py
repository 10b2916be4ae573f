"""Email services' event webhooks, checked and turned into :class:`Feedback`.

One function per provider takes the raw request (body bytes, headers) and either raises
:class:`WebhookError` or returns a :class:`WebhookResult`. Each request is authenticated
by the provider's own scheme before anything in it is believed: Amazon SES through SNS
(an RSA signature checked against a certificate fetched only from an SNS host), Postmark
(HTTP Basic credentials we chose), Mailgun (HMAC-SHA256 with the signing key, a fresh
timestamp and an unused token) and SendGrid (ECDSA P-256 over timestamp and body).

Pure: no web framework, no database. The caller passes ``now``, the secrets, and for
Mailgun a ``seen`` check; it records ``WebhookResult.replay_token`` together with the
feedback, and processes each ``Feedback.event_id`` once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import urllib3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .errors import NewsletterError
from .feedback import Feedback, FeedbackKind

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_EVENTS",
    "SNS_MAX_AGE",
    "TIMESTAMP_TOLERANCE",
    "SnsCertificates",
    "WebhookError",
    "WebhookResult",
    "mailgun_feedback",
    "postmark_feedback",
    "sendgrid_feedback",
    "sendgrid_public_key",
    "ses_feedback",
    "sns_url_allowed",
]

MAX_BODY_BYTES = 1_000_000  # a request body larger than this is refused unread
MAX_EVENTS = 1_000  # events (or recipients) in one request
# Mailgun and SendGrid sign a timestamp: older than this, or this far ahead, is refused.
TIMESTAMP_TOLERANCE = timedelta(minutes=5)
# SNS retries a delivery for at most an hour; older signed messages are replays.
SNS_MAX_AGE = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of our clock an SNS timestamp may be
MAX_DIAGNOSTIC = 300  # characters of the provider's words kept in Feedback.diagnostic
MAX_CERTIFICATE_BYTES = 64 * 1024

# https://sns.<region>.amazonaws.com only: the region is letters-and-digits labels with
# hyphens (us-east-1, eu-central-2, us-gov-west-1), nothing else on the host. (The China
# regions' amazonaws.com.cn hosts are not accepted.)
_SNS_HOST = re.compile(r"sns\.[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}\.amazonaws\.com")
_STATUS = re.compile(r"\b([245]\.[0-9]{1,3}\.[0-9]{1,3})\b")
_ADDRESS = re.compile(r"[^\s@<>\"]{1,64}@[^\s@<>\"]{1,255}")
_MESSAGE_ID = re.compile(r"<?([^\s<>]{1,500}@[^\s<>]{1,500})>?")


class WebhookError(NewsletterError):
    """A webhook request that is not authentic, not fresh or not readable: refused whole."""


@dataclass(frozen=True)
class WebhookResult:
    """What one authentic request reports.

    ``feedback`` holds one record per reported recipient (unknown event types give none).
    ``skipped`` says which known events could not be used and why (no recipient...), for
    the log. ``replay_token`` (Mailgun) is to be recorded with the feedback, so ``seen``
    refuses it next time. ``subscribe_url`` (SES) is set for an SNS subscription
    confirmation: visiting it confirms the subscription, which the caller decides.
    """

    feedback: tuple[Feedback, ...] = ()
    skipped: tuple[str, ...] = ()
    replay_token: str | None = None
    subscribe_url: str | None = None


# --------------------------------------------------------------------------- Amazon SES


def sns_url_allowed(url: str) -> bool:
    """Whether ``url`` is https on ``sns.<region>.amazonaws.com``, port and userinfo-free."""
    if not (isinstance(url, str) and url.isascii() and url.isprintable() and " " not in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and port is None
        and "@" not in parts.netloc
        and parts.hostname is not None
        and parts.netloc == parts.hostname
        and _SNS_HOST.fullmatch(parts.hostname) is not None
    )


class SnsCertificates:
    """Fetch SNS signing certificates over verified https, bounded, and cache them by URL.

    The production ``fetch_certificate`` for :func:`ses_feedback`, which checks the URL
    before calling it. ``pool`` is for tests (a loopback server); the default verifies
    the server's certificate against the system's trusted CAs.
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        max_bytes: int = MAX_CERTIFICATE_BYTES,
        pool: urllib3.PoolManager | None = None,
        cache_size: int = 16,
    ) -> None:
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._max_bytes = max_bytes
        self._pool = pool or urllib3.PoolManager(cert_reqs="CERT_REQUIRED")
        self._cache: dict[str, bytes] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __call__(self, url: str) -> bytes:
        with self._lock:
            cached = self._cache.get(url)
        if cached is not None:
            return cached
        try:
            response = self._pool.request(
                "GET",
                url,
                timeout=self._timeout,
                retries=False,
                redirect=False,
                preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise WebhookError(
                f"could not fetch the SNS signing certificate ({type(exc).__name__})",
                hint="SNS will retry the delivery",
            ) from None
        complete = False
        try:
            if response.status != 200:
                raise WebhookError(
                    f"the SNS signing certificate URL answered HTTP {response.status}"
                )
            data = bytearray()
            try:
                for chunk in response.stream(8192):
                    data += chunk
                    if len(data) > self._max_bytes:
                        raise WebhookError(
                            f"the SNS signing certificate is larger than {self._max_bytes} bytes"
                        )
            except urllib3.exceptions.HTTPError as exc:
                raise WebhookError(
                    f"could not read the SNS signing certificate ({type(exc).__name__})"
                ) from None
            complete = True
        finally:
            if not complete:
                response.close()  # unread data left: the connection must not be reused
            response.release_conn()
        body = bytes(data)
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[url] = body
        return body


_SNS_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
_SNS_SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
_SNS_SIGNED_FIELDS["UnsubscribeConfirmation"] = _SNS_SIGNED_FIELDS["SubscriptionConfirmation"]


def ses_feedback(
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: datetime,
    topic_arns: Collection[str],
    fetch_certificate: Callable[[str], bytes],
    max_age: timedelta = SNS_MAX_AGE,
) -> WebhookResult:
    """Amazon SES bounce and complaint notifications delivered by SNS to an https endpoint.

    The SNS message must name an allowed topic, carry a SignatureVersion 1 (SHA1withRSA)
    or 2 (SHA256withRSA) signature that the certificate at its SigningCertURL verifies,
    and be at most ``max_age`` old. The certificate URL is checked (https on an SNS host)
    before ``fetch_certificate`` is called with it.
    """
    _check_now(now)
    _check_size(body)
    message = _json_object(body, "SNS message")
    kind = _require_str(message, "Type", "SNS message")
    if kind not in _SNS_TYPES:
        raise WebhookError(f"unknown SNS message type {_shown(kind)}")
    declared = _header(headers, "x-amz-sns-message-type")
    if declared is not None and declared != kind:
        raise WebhookError("the x-amz-sns-message-type header does not match the message Type")
    topic = _require_str(message, "TopicArn", "SNS message")
    if not topic_arns:
        raise WebhookError(
            "no SES topic is configured", hint="list the topic ARNs in [webhooks] ses_topic_arns"
        )
    if topic not in topic_arns:
        raise WebhookError(
            f"SNS topic {_shown(topic)} is not in [webhooks] ses_topic_arns",
            hint="add it there if this topic is yours",
        )
    cert_url = _require_str(message, "SigningCertURL", "SNS message")
    if not sns_url_allowed(cert_url):
        raise WebhookError(
            "the SigningCertURL is not https on an sns.<region>.amazonaws.com host; not fetched"
        )
    # Stale or future messages are refused before anything is fetched for them.
    sent = _sns_time(_require_str(message, "Timestamp", "SNS message"))
    if sent < now - max_age:
        raise WebhookError(f"the SNS message is older than {max_age}: a replay, or too late")
    if sent > now + CLOCK_SKEW:
        raise WebhookError("the SNS message is dated in the future")
    _verify_sns_signature(message, kind, cert_url, fetch_certificate, now)
    if kind == "SubscriptionConfirmation":
        url = _require_str(message, "SubscribeURL", "SNS message")
        if not sns_url_allowed(url):
            raise WebhookError(
                "the SubscribeURL is not https on an sns.<region>.amazonaws.com host"
            )
        return WebhookResult(subscribe_url=url)
    if kind == "UnsubscribeConfirmation":
        return WebhookResult()
    notification = _json_object(
        _require_str(message, "Message", "SNS message").encode("utf-8", "surrogatepass"),
        "SES notification",
    )
    return _ses_notification(notification, _require_str(message, "MessageId", "SNS message"))


def _verify_sns_signature(
    message: Mapping[str, Any],
    kind: str,
    cert_url: str,
    fetch_certificate: Callable[[str], bytes],
    now: datetime,
) -> None:
    version = message.get("SignatureVersion")
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise WebhookError(f"unsupported SNS SignatureVersion {_shown(version)}")
    signature = _b64(_require_str(message, "Signature", "SNS message"), "SNS Signature")
    canonical = bytearray()
    for name in _SNS_SIGNED_FIELDS[kind]:
        value = message.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise WebhookError(f"the SNS message has no {name} string")
        # (a lone surrogate cannot be in a message SNS signed: kept, so it fails to verify)
        canonical += f"{name}\n{value}\n".encode("utf-8", "surrogatepass")
    try:
        pem = fetch_certificate(cert_url)
    except WebhookError:
        raise
    except Exception as exc:  # the caller's fetcher: whatever it raises means "not verified"
        raise WebhookError(
            f"could not fetch the SNS signing certificate ({type(exc).__name__})"
        ) from None
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        key = certificate.public_key()
    except (ValueError, TypeError):
        raise WebhookError("the SNS signing certificate is not a PEM X.509 certificate") from None
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise WebhookError("the SNS signing certificate is not valid at this time")
    if not isinstance(key, rsa.RSAPublicKey):
        raise WebhookError("the SNS signing certificate does not hold an RSA key")
    try:
        key.verify(signature, bytes(canonical), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise WebhookError("the SNS signature does not verify") from None


def _sns_time(value: str) -> datetime:
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise WebhookError(f"the SNS Timestamp {_shown(value)} is not an ISO 8601 time") from None
    if stamp.tzinfo is None:
        raise WebhookError("the SNS Timestamp has no time zone")
    return stamp


def _ses_notification(notification: Mapping[str, Any], sns_message_id: str) -> WebhookResult:
    # Identity notifications say notificationType; configuration-set event publishing,
    # eventType. Delivery, Send, Open... are not readers' feedback.
    kind = notification.get("notificationType", notification.get("eventType"))
    mail = notification.get("mail")
    message_ids = _ses_message_ids(mail if isinstance(mail, dict) else {})
    if kind == "Bounce":
        detail = notification.get("bounce")
        listed = "bouncedRecipients"
    elif kind == "Complaint":
        detail = notification.get("complaint")
        listed = "complainedRecipients"
    elif kind == "DeliveryDelay":
        detail = notification.get("deliveryDelay")
        listed = "delayedRecipients"
    else:
        return WebhookResult()
    if not isinstance(detail, dict):
        return WebhookResult(skipped=(f"{kind}: no {kind.lower()} object",))
    recipients = detail.get(listed)
    if not isinstance(recipients, list):
        return WebhookResult(skipped=(f"{kind}: no {listed} list",))
    _check_count(len(recipients))
    base = _event_id(detail.get("feedbackId"), None) or _event_id(sns_message_id, detail)
    feedback: list[Feedback] = []
    skipped: list[str] = []
    for index, entry in enumerate(recipients):
        address = _address(entry.get("emailAddress")) if isinstance(entry, dict) else None
        if address is None or not isinstance(entry, dict):
            skipped.append(f"{kind} recipient {index + 1}: no email address")
            continue
        feedback_kind: FeedbackKind | None
        diagnostic = _str(entry, "diagnosticCode") or ""
        if kind == "Bounce":
            bounce_type = detail.get("bounceType")
            # Permanent: the address does not work (or SES has it suppressed). Transient and
            # Undetermined: counted as soft, so N in a row bounce.
            feedback_kind = (
                FeedbackKind.HARD_BOUNCE if bounce_type == "Permanent" else FeedbackKind.SOFT_BOUNCE
            )
            diagnostic = diagnostic or " / ".join(
                str(part)
                for part in (bounce_type, detail.get("bounceSubType"))
                if isinstance(part, str)
            )
        elif kind == "Complaint":
            complaint_type = _str(detail, "complaintFeedbackType")
            if complaint_type == "not-spam":
                continue  # the reader said it is not spam: nothing to act on
            feedback_kind = FeedbackKind.COMPLAINT
            diagnostic = complaint_type or "complaint"
        else:
            feedback_kind = FeedbackKind.DELAY
        feedback.append(
            Feedback(
                kind=feedback_kind,
                recipient=address,
                source="ses",
                event_id=f"{base}/{index}",
                status=_status(_str(entry, "status"), diagnostic),
                diagnostic=_diagnostic(diagnostic),
                message_ids=message_ids,
            )
        )
    return WebhookResult(feedback=tuple(feedback), skipped=tuple(skipped))


def _ses_message_ids(mail: Mapping[str, Any]) -> tuple[str, ...]:
    # mail.messageId is SES's own id; the Message-ID header we wrote is in mail.headers
    # (SES rewrites the header on the way out, so only the copies in the notification
    # carry ours) and in mail.commonHeaders.messageId.
    found: list[object] = []
    headers = mail.get("headers")
    if isinstance(headers, list):
        for header in headers[:MAX_EVENTS]:
            if (
                isinstance(header, dict)
                and isinstance(header.get("name"), str)
                and header["name"].lower() == "message-id"
            ):
                found.append(header.get("value"))
    common = mail.get("commonHeaders")
    if isinstance(common, dict):
        found.append(common.get("messageId"))
    return _message_ids(*found)


# ----------------------------------------------------------------------------- Postmark

# Postmark's bounce types (https://postmarkapp.com/developer/api/bounce-api#bounce-types)
# that say something about the reader's address; the rest (AutoResponder, DnsError,
# SpamNotification, Unknown, ManuallyDeactivated, DMARCPolicy...) change nothing.
_POSTMARK_BOUNCES = {
    "HardBounce": FeedbackKind.HARD_BOUNCE,
    "BadEmailAddress": FeedbackKind.HARD_BOUNCE,
    "SoftBounce": FeedbackKind.SOFT_BOUNCE,
    "Transient": FeedbackKind.SOFT_BOUNCE,
    "Blocked": FeedbackKind.SOFT_BOUNCE,
    "SpamComplaint": FeedbackKind.COMPLAINT,
    "Unsubscribe": FeedbackKind.UNSUBSCRIBE,
}
_POSTMARK_SUPPRESSIONS = {
    "ManualSuppression": FeedbackKind.UNSUBSCRIBE,  # the reader used Postmark's unsubscribe
    "HardBounce": FeedbackKind.HARD_BOUNCE,
    "SpamComplaint": FeedbackKind.COMPLAINT,
}


def postmark_feedback(
    body: bytes,
    headers: Mapping[str, str],
    *,
    username: str,
    password: str | None,
    remote_addr: str | None = None,
    allowed_networks: Collection[str] = (),
) -> WebhookResult:
    """A Postmark Bounce, SpamComplaint or SubscriptionChange webhook.

    Postmark signs nothing: the webhook URL carries HTTP Basic credentials we chose, and
    those are compared here in constant time. With ``allowed_networks`` (CIDRs), the
    request must also come from one of them (``remote_addr`` is the peer address, not a
    forwarded header).
    """
    _check_size(body)
    if not password:
        raise WebhookError(
            "Postmark webhooks are not set up",
            hint="set NEWSLETTER_POSTMARK_PASSWORD and put the credentials in the webhook URL",
        )
    if allowed_networks and not _address_in(remote_addr, allowed_networks):
        raise WebhookError(
            f"request from {_shown(remote_addr)}, outside [webhooks] postmark_networks"
        )
    _check_basic_auth(headers, username, password)
    record = _json_object(body, "Postmark webhook")
    record_type = record.get("RecordType")
    feedback_kind: FeedbackKind | None
    if record_type in ("Bounce", "SpamComplaint"):
        bounce_type = record.get("Type")
        if record_type == "SpamComplaint":
            feedback_kind = FeedbackKind.COMPLAINT
        elif isinstance(bounce_type, str):
            feedback_kind = _POSTMARK_BOUNCES.get(bounce_type)
        else:
            feedback_kind = None
        recipient_field = "Email"
        diagnostic = _str(record, "Details") or _str(record, "Description") or ""
    elif record_type == "SubscriptionChange":
        reason = record.get("SuppressionReason")
        # SuppressSending false is a reactivation in Postmark: only the reader's own
        # double opt-in brings someone back here, so it changes nothing.
        if record.get("SuppressSending") is not True:
            feedback_kind = None
        elif reason is None:
            feedback_kind = FeedbackKind.UNSUBSCRIBE
        elif isinstance(reason, str):
            feedback_kind = _POSTMARK_SUPPRESSIONS.get(reason)
        else:
            feedback_kind = None
        recipient_field = "Recipient"
        diagnostic = f"suppressed by Postmark: {reason or 'unsubscribe'}"
    else:
        return WebhookResult()
    if feedback_kind is None:
        return WebhookResult()
    recipient = _address(record.get(recipient_field))
    if recipient is None:
        return WebhookResult(skipped=(f"Postmark {record_type}: no {recipient_field} address",))
    record_id = record.get("ID")
    event_id = (
        _event_id(f"{record_type}:{record_id}", record)
        if isinstance(record_id, int | str) and not isinstance(record_id, bool)
        else _event_hash(record)
    )
    return WebhookResult(
        feedback=(
            Feedback(
                kind=feedback_kind,
                recipient=recipient,
                source="postmark",
                event_id=event_id,
                status=_status(None, diagnostic),
                diagnostic=_diagnostic(diagnostic),
                # Postmark's MessageID is its own unless the message was sent with
                # X-PM-KeepID: true; either way it is what Postmark says we sent.
                message_ids=_message_ids(record.get("MessageID")),
            ),
        )
    )


def _check_basic_auth(headers: Mapping[str, str], username: str, password: str) -> None:
    value = _header(headers, "authorization") or ""
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        raise WebhookError("no HTTP Basic credentials", hint="put them in the Postmark webhook URL")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookError("the HTTP Basic credentials are not base64") from None
    given_user, colon, given_password = decoded.partition(b":")
    # Both compared, always, in constant time: neither part may be guessed separately.
    user_ok = hmac.compare_digest(given_user, _secret_bytes(username))
    password_ok = hmac.compare_digest(given_password, _secret_bytes(password))
    if not (colon and user_ok and password_ok):
        raise WebhookError("wrong Postmark webhook credentials")


def _address_in(remote_addr: str | None, networks: Collection[str]) -> bool:
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    for network in networks:
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False


# ------------------------------------------------------------------------------ Mailgun


def mailgun_feedback(
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: datetime,
    signing_key: str | None,
    seen: Callable[[str], bool],
    tolerance: timedelta = TIMESTAMP_TOLERANCE,
) -> WebhookResult:
    """A Mailgun event webhook (``failed``, ``complained``, ``unsubscribed``...).

    The body's ``signature`` object is checked: HMAC-SHA256 of timestamp + token with the
    webhook signing key, a timestamp within ``tolerance`` of ``now``, and a token for
    which ``seen(token)`` is false. The result's ``replay_token`` is that token: record
    it with the feedback (and keep it for ``tolerance`` at least) so ``seen`` refuses it.
    Mailgun's signature does not cover ``event-data``: the single-use token, the short
    window and https are what keep a captured request from being reused or rewritten.
    """
    _check_now(now)
    _check_size(body)
    if not signing_key:
        raise WebhookError(
            "Mailgun webhooks are not set up", hint="set NEWSLETTER_MAILGUN_SIGNING_KEY"
        )
    payload = _json_object(body, "Mailgun webhook")
    signature = payload.get("signature")
    if not isinstance(signature, dict):
        raise WebhookError("the Mailgun webhook has no signature object")
    timestamp = signature.get("timestamp")
    token = signature.get("token")
    given = signature.get("signature")
    if not (isinstance(timestamp, str) and isinstance(token, str) and isinstance(given, str)):
        raise WebhookError("the Mailgun signature needs timestamp, token and signature strings")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise WebhookError("the Mailgun signature timestamp is not a Unix time")
    if not (0 < len(token) <= 200 and token.isascii() and token.isprintable()):
        raise WebhookError("the Mailgun signature token is not a short printable string")
    expected = hmac.new(
        _secret_bytes(signing_key), (timestamp + token).encode("ascii"), hashlib.sha256
    ).hexdigest()
    if not (given.isascii() and hmac.compare_digest(expected, given.lower())):
        raise WebhookError("the Mailgun signature does not verify")
    _check_fresh(int(timestamp), now, tolerance, "Mailgun")
    if seen(token):
        raise WebhookError("this Mailgun token was used before: a replay")
    event = payload.get("event-data")
    if not isinstance(event, dict):
        raise WebhookError("the Mailgun webhook has no event-data object")
    result = _mailgun_event(event)
    return WebhookResult(feedback=result.feedback, skipped=result.skipped, replay_token=token)


def _mailgun_event(event: Mapping[str, Any]) -> WebhookResult:
    name = event.get("event")
    status_object = event.get("delivery-status")
    status = status_object if isinstance(status_object, dict) else {}
    code = _str(status, "enhanced-code")
    diagnostic = _str(status, "message") or _str(status, "description") or ""
    kind: FeedbackKind | None = None
    if name == "failed":
        severity = event.get("severity")
        reason = event.get("reason")
        if severity == "temporary":
            kind = FeedbackKind.DELAY  # Mailgun keeps trying
        elif severity == "permanent":
            # Mailgun's own suppression lists say why it did not even try.
            if reason == "suppress-complaint":
                kind = FeedbackKind.COMPLAINT
            elif reason == "suppress-unsubscribe":
                kind = FeedbackKind.UNSUBSCRIBE
            elif reason in ("old", "espblock") or (code or "").startswith("4."):
                # gave up after retrying, or the provider blocked Mailgun: not the address
                kind = FeedbackKind.SOFT_BOUNCE
            else:
                kind = FeedbackKind.HARD_BOUNCE
        diagnostic = diagnostic or (str(reason) if isinstance(reason, str) else "")
    elif name == "complained":
        kind = FeedbackKind.COMPLAINT
        diagnostic = "complaint"
    elif name == "unsubscribed":
        kind = FeedbackKind.UNSUBSCRIBE
        diagnostic = "unsubscribed through Mailgun"
    if kind is None:
        return WebhookResult()
    recipient = _address(event.get("recipient"))
    if recipient is None:
        return WebhookResult(skipped=(f"Mailgun {name}: no recipient address",))
    message = event.get("message")
    message_headers = message.get("headers") if isinstance(message, dict) else None
    message_id = message_headers.get("message-id") if isinstance(message_headers, dict) else None
    return WebhookResult(
        feedback=(
            Feedback(
                kind=kind,
                recipient=recipient,
                source="mailgun",
                event_id=_event_id(event.get("id"), event),
                status=_status(code, diagnostic),
                diagnostic=_diagnostic(diagnostic),
                message_ids=_message_ids(message_id),
            ),
        )
    )


# ----------------------------------------------------------------------------- SendGrid

SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# Why SendGrid dropped a message without trying: only some reasons are the reader's.
_SENDGRID_DROPPED = {
    "bounced address": FeedbackKind.HARD_BOUNCE,
    "invalid": FeedbackKind.HARD_BOUNCE,
    "spam reporting address": FeedbackKind.COMPLAINT,
    "unsubscribed address": FeedbackKind.UNSUBSCRIBE,
}


@lru_cache(maxsize=8)
def sendgrid_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key SendGrid shows (base64 DER, or PEM), checked to be P-256."""
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            key = serialization.load_der_public_key(base64.b64decode(text.strip(), validate=True))
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise WebhookError(
            "the SendGrid verification key is not a base64 public key",
            hint="copy it from SendGrid's Signed Event Webhook settings "
            "into NEWSLETTER_SENDGRID_PUBLIC_KEY",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise WebhookError("the SendGrid verification key is not an ECDSA P-256 key")
    return key


def sendgrid_feedback(
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: datetime,
    public_key: str | None,
    tolerance: timedelta = TIMESTAMP_TOLERANCE,
) -> WebhookResult:
    """A SendGrid signed event webhook: a JSON array of events.

    The ECDSA (P-256, SHA-256) signature in X-Twilio-Email-Event-Webhook-Signature must
    verify over the X-Twilio-Email-Event-Webhook-Timestamp value followed by the raw body,
    with the account's verification key, and the timestamp be within ``tolerance``.
    """
    _check_now(now)
    _check_size(body)
    if not public_key:
        raise WebhookError(
            "SendGrid webhooks are not set up", hint="set NEWSLETTER_SENDGRID_PUBLIC_KEY"
        )
    key = sendgrid_public_key(public_key)
    given = _header(headers, SENDGRID_SIGNATURE_HEADER)
    timestamp = _header(headers, SENDGRID_TIMESTAMP_HEADER)
    if not given or not timestamp:
        raise WebhookError(
            f"no {SENDGRID_SIGNATURE_HEADER} and {SENDGRID_TIMESTAMP_HEADER} headers",
            hint="turn on the Signed Event Webhook in SendGrid",
        )
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise WebhookError("the SendGrid timestamp header is not a Unix time")
    signature = _b64(given, "SendGrid signature")
    try:
        key.verify(signature, timestamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise WebhookError("the SendGrid signature does not verify") from None
    _check_fresh(int(timestamp), now, tolerance, "SendGrid")
    events = _json(body, "SendGrid webhook")
    if not isinstance(events, list):
        raise WebhookError("the SendGrid webhook body is not a JSON array of events")
    _check_count(len(events))
    feedback: list[Feedback] = []
    skipped: list[str] = []
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            skipped.append(f"event {index + 1}: not an object")
            continue
        one = _sendgrid_event(event, index)
        feedback.extend(one.feedback)
        skipped.extend(one.skipped)
    return WebhookResult(feedback=tuple(feedback), skipped=tuple(skipped))


def _sendgrid_event(event: Mapping[str, Any], index: int) -> WebhookResult:
    name = event.get("event")
    reason = _str(event, "reason") or ""
    status = _str(event, "status")
    kind: FeedbackKind | None = None
    if name == "bounce":
        # type "blocked": the receiving server refused SendGrid (reputation, content), not
        # the address; "bounce" (or none, in older payloads): the address failed.
        if event.get("type") == "blocked" or (status or "").startswith("4."):
            kind = FeedbackKind.SOFT_BOUNCE
        else:
            kind = FeedbackKind.HARD_BOUNCE
    elif name == "dropped":
        kind = _SENDGRID_DROPPED.get(reason.strip().lower())
    elif name == "deferred":
        kind = FeedbackKind.DELAY
    elif name == "spamreport":
        kind = FeedbackKind.COMPLAINT
        reason = reason or "spam report"
    elif name in ("unsubscribe", "group_unsubscribe"):
        kind = FeedbackKind.UNSUBSCRIBE
        reason = reason or f"{name} through SendGrid"
    if kind is None:
        return WebhookResult()
    recipient = _address(event.get("email"))
    if recipient is None:
        return WebhookResult(skipped=(f"event {index + 1} ({name}): no email address",))
    return WebhookResult(
        feedback=(
            Feedback(
                kind=kind,
                recipient=recipient,
                source="sendgrid",
                event_id=_event_id(event.get("sg_event_id"), event),
                status=_status(status, reason),
                diagnostic=_diagnostic(reason),
                # smtp-id is the Message-ID header of the message as we handed it over
                message_ids=_message_ids(event.get("smtp-id")),
            ),
        )
    )


# ------------------------------------------------------------------------------ helpers


def _check_now(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")  # the caller's mistake


def _check_size(body: bytes) -> None:
    if not isinstance(body, bytes | bytearray):
        raise WebhookError("the request body is not bytes")
    if len(body) > MAX_BODY_BYTES:
        raise WebhookError(f"the request body is larger than {MAX_BODY_BYTES} bytes")


def _check_count(count: int) -> None:
    if count > MAX_EVENTS:
        raise WebhookError(f"{count} events in one request; at most {MAX_EVENTS} are read")


def _check_fresh(timestamp: int, now: datetime, tolerance: timedelta, provider: str) -> None:
    age = now.timestamp() - timestamp
    if age > tolerance.total_seconds():
        raise WebhookError(f"the {provider} timestamp is older than {tolerance}: a replay?")
    if -age > tolerance.total_seconds():
        raise WebhookError(f"the {provider} timestamp is in the future")


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, too deep, huge numbers
        raise WebhookError(f"the {what} is not valid JSON") from None


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    value = _json(body, what)
    if not isinstance(value, dict):
        raise WebhookError(f"the {what} is not a JSON object")
    return value


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def _str(mapping: Mapping[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) and value else None


def _require_str(mapping: Mapping[str, Any], key: str, what: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value:
        raise WebhookError(f"the {what} has no {key}")
    return value


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookError(f"the {what} is not base64") from None


def _shown(value: object) -> str:
    """A value from the request, safe and short enough for one error line."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def _address(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    if len(value) > 320 or not _ADDRESS.fullmatch(value) or not value.isprintable():
        return None
    return value


def _message_ids(*values: object) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        if not isinstance(value, str):
            continue
        match = _MESSAGE_ID.fullmatch(value.strip())
        if match and match.group(1).isprintable():
            message_id = f"<{match.group(1)}>"
            if message_id not in found:
                found.append(message_id)
    return tuple(found)


def _status(given: str | None, diagnostic: str) -> str | None:
    for text in (given or "", diagnostic):
        match = _STATUS.search(text)
        if match:
            return match.group(1)
    return None


def _diagnostic(text: str) -> str:
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return cleaned[:MAX_DIAGNOSTIC]


def _secret_bytes(value: str) -> bytes:
    # os.environ keeps undecodable bytes as surrogates: give them back as they were set.
    return value.encode("utf-8", "surrogateescape")


def _event_id(value: object, event: Mapping[str, Any] | None) -> str:
    """The provider's event id if it is a sane one, else a hash of the event."""
    if (
        isinstance(value, str | int)
        and not isinstance(value, bool)
        and 0 < len(text := str(value)) <= 200
        and text.isascii()
        and text.isprintable()
    ):
        return text
    return _event_hash(event) if event is not None else ""


def _event_hash(event: Mapping[str, Any]) -> str:
    """A stable id for an event the provider gave none: the same event hashes the same."""
    try:
        canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (ValueError, RecursionError):
        raise WebhookError("an event without an id is too deeply nested to identify") from None
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()
