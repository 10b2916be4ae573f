"""Signed tokens: forged, altered and re-spelled tokens are refused."""

from __future__ import annotations

import re

import pytest

from newsletter.errors import ConfigError
from newsletter.tokens import (
    CONFIRM_PURPOSE,
    UNSUBSCRIBE_PURPOSE,
    TokenSigner,
    address_fingerprint,
    verp_subscriber_id,
)

KEY = "k" * 32


def test_round_trip_names_purpose_subject_and_context() -> None:
    signer = TokenSigner(KEY)
    data = signer.verify(signer.make("unsubscribe", "42", "001-x"), "unsubscribe")
    assert data is not None
    assert (data.purpose, data.subject, data.context) == ("unsubscribe", "42", "001-x")


def test_other_purpose_other_key_and_tampering_are_refused() -> None:
    signer = TokenSigner(KEY)
    token = signer.make("confirm", "7")
    assert signer.verify(token, "unsubscribe") is None
    assert TokenSigner("z" * 32).verify(token, "confirm") is None
    payload, signature = token.split(".")
    assert signer.verify(f"{payload}x.{signature}", "confirm") is None
    assert signer.verify("garbage", "confirm") is None


def test_every_other_spelling_of_the_signature_is_refused() -> None:
    signer = TokenSigner(KEY)
    token = signer.make("unsubscribe", "42", "001-x")
    payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for char in alphabet:
        if char != signature[-1]:
            assert signer.verify(f"{payload}.{signature[:-1]}{char}", "unsubscribe") is None


def test_expired_tokens_are_refused() -> None:
    signer = TokenSigner(KEY)
    token = signer.make("confirm", "7", issued_at=1_000)
    assert signer.verify(token, "confirm", max_age_seconds=60) is None
    assert signer.verify(token, "confirm") is not None


def test_a_short_or_missing_key_is_one_clear_error_and_repr_hides_the_key() -> None:
    with pytest.raises(ConfigError, match="NEWSLETTER_SECRET_KEY"):
        TokenSigner("short")
    assert KEY not in repr(TokenSigner(KEY))


def test_an_unsubscribe_link_in_mail_already_sent_keeps_working() -> None:
    """Pinned: a token made by an earlier version (same key) verifies and names the same reader."""
    sent_long_ago = (
        "dW5zdWJzY3JpYmUfNDI6Yzk1NTY4NTNkOWY0HzIwMjYtMDEtMDgtZmlyc3QtaXNzdWUfMTc2NzIyNTYwMA"
        ".zIQc2feLSXehe6Diq_qRWg"
    )
    signer = TokenSigner("a-key-kept-for-years-0123456789")
    data = signer.verify(sent_long_ago, UNSUBSCRIBE_PURPOSE)
    assert data is not None and data.context == "2026-01-08-first-issue"
    assert data.subject == f"42:{address_fingerprint('ann.lee@example.org')}"
    assert address_fingerprint(" Ann.Lee@Example.ORG ") == "c9556853d9f4"
    assert signer.verify(sent_long_ago, CONFIRM_PURPOSE) is None


def test_verp_tokens_are_short_lower_case_and_name_subscriber_address_and_issue() -> None:
    signer = TokenSigner(KEY)
    token = signer.verp(123_456_789, "ann@example.org", "001-x")
    assert re.fullmatch(r"[0-9a-z]+-[a-z2-7]{16}", token) and len(token) <= 40
    assert verp_subscriber_id(token) == 123_456_789
    assert signer.verp_matches(token.upper(), 123_456_789, "Ann@Example.org", "001-x")
    for subscriber_id, address, issue in (
        (123_456_788, "ann@example.org", "001-x"),
        (123_456_789, "bob@example.org", "001-x"),
        (123_456_789, "ann@example.org", "002-y"),
    ):
        assert not signer.verp_matches(token, subscriber_id, address, issue)
    assert not TokenSigner("z" * 32).verp_matches(token, 123_456_789, "ann@example.org", "001-x")
    assert verp_subscriber_id("not a token") is None
    assert verp_subscriber_id(signer.make(UNSUBSCRIBE_PURPOSE, "1")) is None
