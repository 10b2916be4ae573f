"""Signed, opaque tokens for unsubscribe, confirmation and preferences links.

A token names what it is for, whom and which issue, and carries an HMAC so it
cannot be forged or altered. The key comes from the environment only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
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
# A per-recipient envelope sender (VERP): bounces+TOKEN@domain names subscriber and issue.
VERP_PURPOSE = "verp"
_VERP_MAC_CHARS = 16  # base32: 80 bits
_VERP_TOKEN = re.compile(r"([0-9a-z]{1,13})-([a-z2-7]{16})")


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

    def verp(self, subscriber_id: int, address: str, issue_key: str) -> str:
        """The TOKEN of the envelope sender ``PREFIX+TOKEN@domain`` of one copy of an issue.

        Short (the local part of an address has at most 64 characters), and of lower-case
        letters, digits and one hyphen, so a server that changes the case of an address
        does not break it: the subscriber id in base 36, then 80 bits of HMAC over the id,
        the address's fingerprint and the issue. The issue is not spelled out: it is found
        among the issues the ledger says went to that subscriber (:meth:`verp_matches`).
        """
        return f"{_base36(subscriber_id)}-{self._verp_mac(subscriber_id, address, issue_key)}"

    def verp_matches(self, token: str, subscriber_id: int, address: str, issue_key: str) -> bool:
        """Whether ``token`` is the VERP token of that subscriber (at that address) and issue."""
        return hmac.compare_digest(
            token.strip().lower().encode("ascii", "replace"),
            self.verp(subscriber_id, address, issue_key).encode("ascii"),
        )

    def _verp_mac(self, subscriber_id: int, address: str, issue_key: str) -> str:
        payload = "\x1f".join(
            (VERP_PURPOSE, str(subscriber_id), address_fingerprint(address), issue_key)
        ).encode("utf-8")
        mac = base64.b32encode(hmac.new(self._key, payload, hashlib.sha256).digest())
        return mac.decode("ascii").lower()[:_VERP_MAC_CHARS]


def verp_subscriber_id(token: str) -> int | None:
    """The subscriber id a VERP token claims (not yet verified), or None if it is no token."""
    match = _VERP_TOKEN.fullmatch(token.strip().lower())
    return int(match.group(1), 36) if match else None


def _base36(number: int) -> str:
    if number < 0:
        raise ValueError("a subscriber id is not negative")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def address_fingerprint(address: str) -> str:
    """A short hash of an address, so a token also names whom it was made for.

    Unsubscribe tokens carry ``"<subscriber id>:<fingerprint>"`` and confirmation
    tokens carry the fingerprint as context: if the id ever belongs to someone else
    (a deleted row whose id SQLite reused), the link does nothing instead of acting
    for a stranger. Unsubscribe links in mail already sent carry it too, so it never
    changes.
    """
    return hashlib.sha256(address.strip().casefold().encode("utf-8")).hexdigest()[:12]
