"""Address rules: which addresses are accepted, their normalised form, and their key.

Syntax only (no DNS), as email-validator decides, with a fast path for the common
ASCII addresses that a large import is made of.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from typing import Any

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from .errors import StoreError

# RFC 5322 atext, ASCII only: exactly email-validator's unquoted (dot-atom) local part.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_FAST_ADDRESS = re.compile(rf"([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@([A-Za-z0-9.-]+)")
_CASE_INSENSITIVE_LOCAL = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)
_MAX_ADDRESS = 254
_domain_cache: dict[str, str | None] = {}
_DOMAIN_CACHE_MAX = 50_000


def _domain_verdict(domain: str) -> str | None:
    """email-validator's normalised form of an ASCII ``domain``, or None to take the slow path.

    The domain checks do not depend on the local part, so ``a@domain`` (the shortest
    local part) gives the same verdict; cached because real lists repeat domains.
    """
    try:
        result = validate_email("a@" + domain, check_deliverability=False)
        verdict = result.domain if result.domain == result.ascii_domain else None
    except EmailNotValidError:
        verdict = None
    if len(_domain_cache) >= _DOMAIN_CACHE_MAX:
        _domain_cache.clear()
    _domain_cache[domain] = verdict
    return verdict


def fast_normalize(address: str) -> str | None:
    """email-validator's normalised address for common ASCII addresses, else None.

    Sound by construction (a test checks it against email-validator): it accepts only a
    dot-atom local part, a domain email-validator accepted, and a length within 254.
    """
    match = _FAST_ADDRESS.fullmatch(address)
    if match is None or len(address) > _MAX_ADDRESS:
        return None
    local, domain = match.groups()
    try:
        norm_domain = _domain_cache[domain]
    except KeyError:
        norm_domain = _domain_verdict(domain)
    if norm_domain is None or len(local) + 1 + len(norm_domain) > _MAX_ADDRESS:
        return None
    if local.lower() in _CASE_INSENSITIVE_LOCAL:
        local = local.lower()
    return f"{local}@{norm_domain}"


def _normalize(address: str) -> str:
    """The normalised address (syntax only, no DNS); raises EmailNotValidError."""
    fast = fast_normalize(address)
    if fast is not None:
        return fast
    return full_normalize(address)


def full_normalize(address: str) -> str:
    """email-validator's verdict, for addresses the fast path does not cover.

    Addresses must be sendable without SMTPUTF8 (our transport does not speak it):
    a non-ASCII local part is refused here, at import, rather than failing at send
    time; an internationalised domain is kept in its ASCII (punycode) form.
    """
    result = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    return str(result.ascii_email or result.normalized)


def normalize_email(address: str) -> str:
    """Validate ``address`` (syntax only, no DNS) and return its normalised form."""
    address = address.strip()
    try:
        return _normalize(address)
    except EmailNotValidError as exc:
        raise StoreError(
            f"invalid email address {address!r}: {exc}", hint="check the address"
        ) from None


def email_key(address: str) -> str:
    """The case-insensitive key an address is stored and looked up under."""
    address = address.strip()
    try:
        return _normalize(address).lower()
    except EmailNotValidError:
        return address.lower()


@functools.cache
def _public_suffixes() -> Any:
    import tldextract

    # The bundled snapshot of the Public Suffix List: no network, no cache files.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def organisational_domain(domain: str) -> str:
    """The registrable domain DMARC aligns on (RFC 7489 3.2): ``news.example.org`` and
    ``mail.example.org`` are both ``example.org``; ``a.b.co.uk`` is ``b.co.uk``.

    From the public suffix list bundled with tldextract; a name it cannot split (no
    known suffix, an IP address) is its own organisational domain.
    """
    name = domain.strip().lower().rstrip(".")
    found: str = _public_suffixes()(name).top_domain_under_public_suffix
    return found or name


# --- suppression ----------------------------------------------------------------------------

SUPPRESSION_KEY_BYTES = 32
SUPPRESSION_HASH_BYTES = 16
_hashers: dict[bytes, Callable[[str], bytes]] = {}


def suppression_hasher(key: bytes) -> Callable[[str], bytes]:
    """The keyed hash suppression entries are stored under, for one database's ``key``.

    BLAKE2b in its keyed mode (a MAC) over :func:`email_key`'s form of the address, 16
    bytes. Keyed, so the entries are no list of addresses: a plain hash of a guessed
    address matches nothing without the key. Fast (0.3 µs, 0.7 µs as an SQL function:
    the keyed state is made once), because an import hashes every new row.
    """
    base = hashlib.blake2b(key=key, digest_size=SUPPRESSION_HASH_BYTES)

    def digest(address_key: str) -> bytes:
        hasher = base.copy()
        hasher.update(address_key.encode("utf-8"))
        return hasher.digest()

    return digest


def suppression_hash(key: bytes, address_key: str) -> bytes:
    """:func:`suppression_hasher`'s hash of one address (also the SQL function)."""
    hasher = _hashers.get(key)
    if hasher is None:
        if len(_hashers) > 16:
            _hashers.clear()
        hasher = _hashers[key] = suppression_hasher(key)
    return hasher(address_key)
