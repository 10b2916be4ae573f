"""Signed, opaque tokens for unsubscribe, confirmation and preferences links.

A token names what it is for, whom and which issue, and carries an HMAC so it
cannot be forged or altered. The key comes from the environment only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from .errors import ConfigError

_SIG_BYTES = 16
# What a token is for; a token made for one purpose never verifies for another.
UNSUBSCRIBE_PURPOSE = (
    "unsubscribe"  # subject "<subscriber id>:<address_fingerprint>", context the issue
)
CONFIRM_PURPOSE = "confirm"  # subject the subscriber id, context address_fingerprint(address)
# The reader's preferences page: subject "<subscriber id>:<address_fingerprint>", context the issue.
PREFERENCES_PURPOSE = "preferences"


@dataclass(frozen=True)
class TokenData:
    """What a verified token says."""

    purpose: str
    subject: str  # e.g. a subscriber id
    context: str  # e.g. an issue key ("" when none)
    issued_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Makes and checks tokens with one secret key; ``repr`` never shows the key."""

    def __init__(self, secret: str | None) -> None:
        if not secret or len(secret) < 16:
            raise ConfigError(
                "NEWSLETTER_SECRET_KEY is not set or shorter than 16 characters",
                where="environment",
                hint="set it to a long random string, "
                'e.g. export NEWSLETTER_SECRET_KEY="$(openssl rand -hex 32)"',
            )
        self._key = secret.encode("utf-8")

    def __repr__(self) -> str:
        return "TokenSigner(<key hidden>)"

    def _signature(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_SIG_BYTES]

    def make(
        self, purpose: str, subject: str, context: str = "", *, issued_at: int | None = None
    ) -> str:
        stamp = int(time.time()) if issued_at is None else issued_at
        payload = "\x1f".join((purpose, subject, context, str(stamp))).encode("utf-8")
        return f"{_b64(payload)}.{_b64(self._signature(payload))}"

    def verify(
        self, token: str, purpose: str, *, max_age_seconds: int | None = None
    ) -> TokenData | None:
        """The token's data, or None when it is forged, altered, expired or for another purpose."""
        try:
            payload_text, signature_text = token.split(".", 1)
            payload = _unb64(payload_text)
            signature = _unb64(signature_text)
        except (ValueError, TypeError):
            return None
        # Only the canonical spelling is accepted: base64 leaves slack in the last character.
        if _b64(payload) != payload_text or _b64(signature) != signature_text:
            return None
        if not hmac.compare_digest(signature, self._signature(payload)):
            return None
        try:
            found_purpose, subject, context, stamp = payload.decode("utf-8").split("\x1f")
            issued_at = int(stamp)
        except ValueError:
            return None
        if found_purpose != purpose:
            return None
        if max_age_seconds is not None and time.time() - issued_at > max_age_seconds:
            return None
        return TokenData(found_purpose, subject, context, issued_at)


def address_fingerprint(address: str) -> str:
    """A short hash of an address, so a token also names whom it was made for.

    Unsubscribe tokens carry ``"<subscriber id>:<fingerprint>"`` and confirmation
    tokens carry the fingerprint as context: if the id ever belongs to someone else
    (a deleted row whose id SQLite reused), the link does nothing instead of acting
    for a stranger. Unsubscribe links in mail already sent carry it too, so it never
    changes.
    """
    return hashlib.sha256(address.strip().casefold().encode("utf-8")).hexdigest()[:12]
