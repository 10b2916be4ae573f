"""Signed tokens: forged, altered and re-spelled tokens are refused."""

from __future__ import annotations

import pytest

from newsletter.errors import ConfigError
from newsletter.tokens import TokenSigner

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
