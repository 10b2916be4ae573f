"""The address rules: the fast path agrees with email-validator, and takes common addresses."""

from __future__ import annotations

import os

from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from newsletter import addresses
from newsletter.addresses import fast_normalize

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
LOCAL = st.text(alphabet=ATEXT + '."\\ @<>(),:;[]é', min_size=0, max_size=70)
LABEL = st.text(alphabet="abcXYZ019-_é", min_size=0, max_size=66) | st.sampled_from(
    ["xn--p1ai", "xn--bcher-kva", "ab--cd", "XN--abc", "a" * 63, "a" * 64]
)
TLD = st.sampled_from(
    [
        "com",
        "ORG",
        "net",
        "123",
        "test",
        "localhost",
        "local",
        "invalid",
        "onion",
        "arpa",
        "example",
        "xn--p1ai",
        "c0m",
        "",
        "x",
    ]
)
DOMAIN = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, max_size=5), TLD)
STRUCTURED = st.builds(lambda local, domain: f"{local}@{domain}", LOCAL, DOMAIN)
MAILBOXES = st.builds(
    lambda name, domain: f"{name}@{domain}",
    st.sampled_from(["Postmaster", "ABUSE", "info", "Sales", "nobody"]),
    DOMAIN,
)
PADDED = st.builds(
    lambda n, m: "a" * n + "@" + ".".join(["b" * 60] * m) + ".com",
    st.integers(1, 200),
    st.integers(0, 4),
)
FREE = st.text(alphabet=ATEXT + '.@- "<>[]', max_size=40)
# Mostly valid addresses, so that the fast path is exercised often.
ATOM = st.text(alphabet=ATEXT, min_size=1, max_size=12)
HOST_LABEL = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
VALIDISH = st.builds(
    lambda atoms, labels, tld: ".".join(atoms) + "@" + ".".join([*labels, tld]),
    st.lists(ATOM, min_size=1, max_size=4),
    st.lists(HOST_LABEL, min_size=1, max_size=4),
    TLD,
)


def validator_verdict(address: str) -> str | None:
    """email-validator's verdict for an address we must send without SMTPUTF8."""
    try:
        result = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return None
    return str(result.ascii_email or result.normalized)


# ADDRESS_EXAMPLES=30000 for a long run (passed when written).
@settings(
    max_examples=int(os.environ.get("ADDRESS_EXAMPLES", "800")),
    suppress_health_check=[HealthCheck.too_slow],
    deadline=None,
)
@given(st.one_of(VALIDISH, STRUCTURED, MAILBOXES, PADDED, FREE))
@example("Reader.1@Example.com")
@example("a@b.com.")
@example("a@-b.com")
@example("a@b..com")
@example(".a@b.com")
@example("a.@b.com")
@example("a@xn--p1ai.com")
@example("a" * 64 + "@" + "b" * 63 + ".com")
@example("a@" + ".".join(["b" * 63] * 3) + "." + "c" * 61)
def test_fast_path_agrees_with_email_validator(address: str) -> None:
    expected = validator_verdict(address)
    fast = fast_normalize(address)
    if fast is not None:
        assert fast == expected
    try:
        mine: str | None = addresses._normalize(address)
    except EmailNotValidError:
        mine = None
    assert mine == expected


def test_fast_path_takes_common_addresses() -> None:
    assert fast_normalize("Reader.1@Example.com") == "Reader.1@example.com"
    assert fast_normalize("first.last+tag@sub.example.org") == "first.last+tag@sub.example.org"
    assert fast_normalize("POSTMASTER@example.net") == "postmaster@example.net"
    assert fast_normalize("josé@example.com") is None  # non-ASCII: email-validator decides
