"""Checks that a message's To header names exactly one recipient, however odd the name.

Shared by the newsletter (tests/test_message.py) and the confirmation mail
(tests/test_server.py): both write names that strangers chose.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.header import decode_header, make_header
from email.headerregistry import AddressHeader
from email.utils import getaddresses

from hypothesis import strategies as st

from newsletter.message import header_safe_name

_TO_FIELD = re.compile(rb"^To:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.MULTILINE | re.IGNORECASE)

# Names that break a naive To header: the characters that mean something in an address
# list, quotes and escapes, encoded-word look-alikes, unicode, and the 200-character limit.
_TRICKY = [*" ,;:.\"\\<>@()[]=?_'", "a", "Z", "0", "é", "ß", "東", "🙂", "\u00a0", "\u200b"]
NAMES = st.one_of(
    st.text(max_size=220),
    st.text(alphabet=st.sampled_from(_TRICKY), max_size=220),
    st.lists(
        st.sampled_from(
            [
                "Dr.",
                "Jane",
                "Q.",
                "Public,",
                "attacker@evil.example,",
                "=?utf-8?q?x?=",
                '"',
                "\\",
                "Zoë",
                "O'Neil",
                "(x)",
                "<y@evil.example>",
                "a" * 90,
            ]
        ),
        max_size=20,
    ).map(" ".join),
)
ADDRESSES = st.sampled_from(
    [
        "ann@example.org",
        "o'neil+tag@example.com",
        "first.last-x_y@sub.example.net",
        "l" * 60 + "@example.org",
    ]
)


def to_field(data: bytes) -> bytes:
    """The raw To field of a serialised message, folds included (there must be one)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    found = _TO_FIELD.findall(head)
    assert len(found) == 1, head
    field: bytes = found[0]
    return field


def assert_one_recipient(data: bytes, address: str, name: str) -> None:
    """The To header parses back to ``address`` alone, with the name the reader typed."""
    field = to_field(data)
    assert field.isascii()
    lines = (b"To:" + field).split(b"\r\n")
    assert all(len(line) <= 78 for line in lines), lines
    unfolded = field.replace(b"\r\n", b"").decode("ascii")
    assert [pair[1] for pair in getaddresses([unfolded])] == [address], unfolded
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    header = parsed["To"]
    assert isinstance(header, AddressHeader)
    assert [a.addr_spec for a in header.addresses] == [address], unfolded
    assert not header.defects, (unfolded, header.defects)
    expected = header_safe_name(name)
    shown = header.addresses[0].display_name
    phrase = unfolded.removesuffix(f"<{address}>").strip() if expected else ""
    if phrase.startswith("=?"):
        # RFC 2047 drops the space between two encoded-words; CPython's address parser
        # keeps one, so only the RFC decoder gives the name back exactly.
        assert str(make_header(decode_header(phrase))) == expected, unfolded
        assert shown.replace(" ", "") == expected.replace(" ", ""), unfolded
    else:
        assert shown == expected, unfolded
