"""Real-shaped provider webhook requests, signed with keys the tests generate.

The payloads follow the providers' documented examples (AWS SES/SNS developer guides,
Postmark's webhook pages, Mailgun's webhook payloads, SendGrid's event webhook); the
signing follows each provider's documented scheme, written here independently of
newsletter.webhooks so a test fails if either side gets the scheme wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TOPIC = "arn:aws:sns:us-east-1:123456789012:newsletter-feedback"
CERT_URL = (
    "https://sns.us-east-1.amazonaws.com/"
    "SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem"
)
SUBSCRIBE_URL = (
    "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={TOPIC}&Token=2336412f37fb687f5d51e6e241d09c80"
)
OUR_MESSAGE_ID = "<171455.42.7@example.org>"


# ------------------------------------------------------------------------- SES over SNS


@dataclass(frozen=True)
class SnsSigner:
    """An RSA key and a certificate for it, as SNS's signing certificate would be."""

    key: rsa.RSAPrivateKey
    pem: bytes

    @classmethod
    def create(cls, *, not_after: datetime | None = None) -> SnsSigner:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=30))
            .not_valid_after(not_after or NOW + timedelta(days=300))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert.public_bytes(serialization.Encoding.PEM))

    def sign(self, message: dict[str, Any], *, version: str = "2") -> dict[str, Any]:
        """``message`` with SignatureVersion, SigningCertURL and Signature set."""
        message = {"SigningCertURL": CERT_URL, **message, "SignatureVersion": version}
        if message["Type"] == "Notification":
            names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
        else:
            names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token"]
            names += ["TopicArn", "Type"]
        text = "".join(f"{name}\n{message[name]}\n" for name in names if name in message)
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(text.encode("utf-8"), padding.PKCS1v15(), algorithm)
        message["Signature"] = base64.b64encode(signature).decode("ascii")
        return message


def sns_notification(ses: dict[str, Any], *, timestamp: datetime = NOW) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC,
        "Message": json.dumps(ses),
        "Timestamp": timestamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&x=1",
    }


def sns_subscription(*, subscribe_url: str = SUBSCRIBE_URL) -> dict[str, Any]:
    return {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37fb687f5d51e6e241d09c80",
        "TopicArn": TOPIC,
        "Message": (
            f"You have chosen to subscribe to the topic {TOPIC}.\n"
            "To confirm the subscription, visit the SubscribeURL included in this message."
        ),
        "SubscribeURL": subscribe_url,
        "Timestamp": "2024-05-01T11:59:30.000Z",
    }


def _ses_mail(*recipients: str) -> dict[str, Any]:
    return {
        "timestamp": "2024-05-01T11:58:00.000Z",
        "source": "newsletter@example.org",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/example.org",
        "sendingAccountId": "123456789012",
        # SES's own id, not the Message-ID header we wrote
        "messageId": "0100018f3b1c9a2e-3f1e7c52-aaaa-bbbb-cccc-2f6d1e0b9a11-000000",
        "destination": list(recipients),
        "headersTruncated": False,
        "headers": [
            {"name": "From", "value": "The Harbour Ledger <newsletter@example.org>"},
            {"name": "To", "value": recipients[0]},
            {"name": "Message-ID", "value": OUR_MESSAGE_ID},
            {"name": "Subject", "value": "Issue 7"},
        ],
        "commonHeaders": {
            "from": ["The Harbour Ledger <newsletter@example.org>"],
            "to": list(recipients),
            "messageId": OUR_MESSAGE_ID,
            "subject": "Issue 7",
        },
    }


def ses_bounce(bounce_type: str = "Permanent", *recipients: str) -> dict[str, Any]:
    recipients = recipients or ("jane@example.com",)
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General" if bounce_type == "Permanent" else "MailboxFull",
            "bouncedRecipients": [
                {
                    "emailAddress": address,
                    "action": "failed",
                    "status": "5.1.1" if bounce_type == "Permanent" else "4.2.2",
                    "diagnosticCode": f"smtp; 550 5.1.1 <{address}>... User unknown",
                }
                for address in recipients
            ],
            "timestamp": "2024-05-01T11:59:00.000Z",
            "feedbackId": "0100018f3b1ca0b1-7a2c9f4e-1111-2222-3333-444455556666-000000",
            "remoteMtaIp": "192.0.2.25",
            "reportingMTA": "dsn; a8-25.smtp-out.amazonses.com",
        },
        "mail": _ses_mail(*recipients),
    }


def ses_complaint(feedback_type: str = "abuse") -> dict[str, Any]:
    return {
        "notificationType": "Complaint",
        "complaint": {
            "userAgent": "ExampleCorp Feedback Loop (V0.01)",
            "complainedRecipients": [{"emailAddress": "richard@example.com"}],
            "complaintFeedbackType": feedback_type,
            "arrivalDate": "2024-05-01T11:59:10.000Z",
            "timestamp": "2024-05-01T11:59:20.000Z",
            "feedbackId": "0100018f3b1cb2d3-aaaa-bbbb-cccc-ddddeeeeffff-000000",
        },
        "mail": _ses_mail("richard@example.com"),
    }


def ses_delivery() -> dict[str, Any]:
    return {
        "notificationType": "Delivery",
        "delivery": {
            "timestamp": "2024-05-01T11:58:05.000Z",
            "processingTimeMillis": 546,
            "recipients": ["mary@example.com"],
            "smtpResponse": "250 ok:  Message 64111812 accepted",
            "reportingMTA": "a8-70.smtp-out.amazonses.com",
        },
        "mail": _ses_mail("mary@example.com"),
    }


def sns_body(message: dict[str, Any]) -> bytes:
    return json.dumps(message, indent=2).encode("utf-8")


# ----------------------------------------------------------------------------- Postmark


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


def postmark_bounce(bounce_type: str = "HardBounce", type_code: int = 1) -> dict[str, Any]:
    return {
        "RecordType": "Bounce",
        "MessageStream": "outbound",
        "ID": 4323372036854775807,
        "Type": bounce_type,
        "TypeCode": type_code,
        "Name": "Hard bounce",
        "Tag": "issue-7",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
        "Metadata": {"issue": "7"},
        "ServerID": 23,
        "Description": "The server was unable to deliver your message (ex: unknown user).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": "john@example.com",
        "From": "newsletter@example.org",
        "BouncedAt": "2024-05-01T11:59:00Z",
        "DumpAvailable": True,
        "Inactive": True,
        "CanActivate": True,
        "Subject": "Issue 7",
        "Content": "Return-Path: <>\r\n...",
    }


def postmark_spam_complaint() -> dict[str, Any]:
    return {
        "RecordType": "SpamComplaint",
        "MessageStream": "outbound",
        "ID": 42,
        "Type": "SpamComplaint",
        "TypeCode": 512,
        "Name": "Spam complaint",
        "Tag": "issue-7",
        "MessageID": "00000000-0000-0000-0000-000000000000",
        "Metadata": {},
        "ServerID": 1234,
        "Description": "",
        "Details": "Test spam complaint details",
        "Email": "john@example.com",
        "From": "newsletter@example.org",
        "BouncedAt": "2024-05-01T11:59:00Z",
        "DumpAvailable": True,
        "Inactive": True,
        "CanActivate": False,
        "Subject": "Issue 7",
    }


def postmark_subscription_change(
    *, suppress: bool = True, reason: str | None = "ManualSuppression"
) -> dict[str, Any]:
    return {
        "RecordType": "SubscriptionChange",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
        "ServerID": 123456,
        "MessageStream": "broadcast",
        "ChangedAt": "2024-05-01T11:59:34.416071Z",
        "Recipient": "mary@example.com",
        "Origin": "Recipient",
        "SuppressSending": suppress,
        "SuppressionReason": reason if suppress else None,
        "Tag": "issue-7",
        "Metadata": {},
    }


# ------------------------------------------------------------------------------ Mailgun

MAILGUN_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"


def mailgun_body(
    event_data: Any,
    *,
    key: str = MAILGUN_KEY,
    timestamp: datetime = NOW,
    token: str = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0",
) -> bytes:
    stamp = str(int(timestamp.timestamp()))
    signature = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    payload = {
        "signature": {"timestamp": stamp, "token": token, "signature": signature},
        "event-data": event_data,
    }
    return json.dumps(payload).encode("utf-8")


def mailgun_event(event: str, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "G9Bn5sl1TC6nu79C8C0bwg",
        "timestamp": NOW.timestamp() - 30,
        "log-level": "error",
        "event": event,
        "recipient": "alice@example.com",
        "recipient-domain": "example.com",
        "envelope": {
            "sender": "bounces@example.org",
            "transport": "smtp",
            "targets": "alice@example.com",
        },
        "message": {
            "headers": {
                "to": "alice@example.com",
                "message-id": OUR_MESSAGE_ID.strip("<>"),
                "from": "The Harbour Ledger <newsletter@example.org>",
                "subject": "Issue 7",
            },
            "attachments": [],
            "size": 111,
        },
        "tags": ["issue-7"],
        "user-variables": {},
        "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
    }
    data.update(fields)
    return data


def mailgun_failure(severity: str = "permanent", reason: str = "bounce") -> dict[str, Any]:
    temporary = severity == "temporary"
    return mailgun_event(
        "failed",
        severity=severity,
        reason=reason,
        **{
            "delivery-status": {
                "attempt-no": 1,
                "code": 452 if temporary else 550,
                "enhanced-code": "4.2.2" if temporary else "5.1.1",
                "message": (
                    "4.2.2 The email account that you tried to reach is over quota."
                    if temporary
                    else "5.1.1 The email account that you tried to reach does not exist."
                ),
                "description": "",
                "mx-host": "mx.example.com",
                "session-seconds": 0.43,
                "tls": True,
            }
        },
    )


# ----------------------------------------------------------------------------- SendGrid


@dataclass(frozen=True)
class SendGridSigner:
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> SendGridSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_key(self) -> str:
        """As SendGrid shows it: base64 of the DER SubjectPublicKeyInfo."""
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")

    def headers(self, body: bytes, *, timestamp: datetime = NOW) -> dict[str, str]:
        stamp = str(int(timestamp.timestamp()))
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "Content-Type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }


def sendgrid_event(event: str, email: str = "bob@example.com", **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "email": email,
        "timestamp": int(NOW.timestamp()) - 60,
        "smtp-id": OUR_MESSAGE_ID,
        "event": event,
        "category": ["issue-7"],
        "sg_event_id": f"sg-{event}-{email}",
        "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
    }
    data.update(fields)
    return data


def sendgrid_body(events: list[Any]) -> bytes:
    return json.dumps(events).encode("utf-8")
