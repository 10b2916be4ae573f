"""The MIME message: built once per issue, filled in per recipient, safe on the wire."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
from email.message import EmailMessage
from pathlib import Path

import mjml
import premailer
import pytest
from hypothesis import HealthCheck, given, settings

from newsletter import config, message, render
from newsletter.config import Config
from newsletter.content import Issue
from newsletter.errors import ConfigError
from newsletter.message import MessageTemplate, Recipient
from newsletter.render import RenderedIssue
from newsletter.tokens import UNSUBSCRIBE_PURPOSE, TokenSigner, address_fingerprint
from tests.support import (
    EXAMPLE_SLUG,
    TEST_SECRET_KEY,
    example_issue,
    parse_message,
    write_template,
)
from tests.support.address_headers import ADDRESSES, NAMES, assert_one_recipient

ANN = Recipient(email="ann@example.org", name="Ann Lee", subscriber_id=42)


@pytest.fixture
def issue(cfg: Config) -> Issue:
    return example_issue(cfg)


@pytest.fixture
def rendered(issue: Issue, cfg: Config) -> RenderedIssue:
    return render.render_issue(issue, cfg)


@pytest.fixture
def template(rendered: RenderedIssue, cfg: Config) -> MessageTemplate:
    return message.prepare(rendered, cfg)


def wire_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    lines = data[:-2].split(b"\r\n")
    assert not any(b"\r" in line or b"\n" in line for line in lines), "bare CR or LF"
    return lines


def unsubscribe_token(parsed: EmailMessage) -> str:
    match = re.search(r"<https://example\.org/ledger/u/([^>]+)>", str(parsed["List-Unsubscribe"]))
    assert match, parsed["List-Unsubscribe"]
    return match.group(1)


def with_settings(cfg: Config, section: str, **changes: object) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )


def test_headers(template: MessageTemplate, rendered: RenderedIssue) -> None:
    out = template.personalise(ANN)
    parsed, _, _ = parse_message(out.data)
    assert parsed["From"] == "The Harbour Ledger <editor@example.org>"
    assert parsed["To"] == "Ann Lee <ann@example.org>"
    assert parsed["Subject"] == rendered.subject
    assert parsed["Reply-To"] == "letters@example.org"
    assert parsed["Date"].datetime is not None
    assert re.fullmatch(r"<[^@<>\s]+@example\.org>", parsed["Message-ID"])
    assert parsed["Message-ID"] == out.message_id
    assert parsed["List-Id"] == "The Harbour Ledger <the-harbour-ledger.example.org>"
    unsubscribe = str(parsed["List-Unsubscribe"])
    assert re.fullmatch(
        r"<https://example\.org/ledger/u/[\w.-]+>, "
        r"<mailto:unsubscribe@example\.org\?subject=unsubscribe%20[\w.-]+>",
        unsubscribe,
    ), unsubscribe
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["MIME-Version"] == "1.0"
    assert out.recipient == "ann@example.org"
    assert template.envelope_from == "editor@example.org"


def test_each_copy_gets_its_own_message_id_and_token(template: MessageTemplate) -> None:
    bob = Recipient(email="bob@example.org", name="Bob", subscriber_id=43)
    first, second = (parse_message(template.personalise(r).data)[0] for r in (ANN, bob))
    assert first["Message-ID"] != second["Message-ID"]
    assert unsubscribe_token(first) != unsubscribe_token(second)


def test_multipart_alternative_text_first_both_quoted_printable(template: MessageTemplate) -> None:
    parsed, text, markup = parse_message(template.personalise(ANN).data)
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content_charset() == "utf-8"
    assert text.startswith("The Harbour Ledger\n")
    assert markup.startswith("<!doctype html>")
    assert "Port Alder’s Harbour Tram" in text and "Port Alder’s Harbour Tram" in markup


def test_decoded_parts_equal_the_rendered_issue_with_values_filled_in(
    template: MessageTemplate, rendered: RenderedIssue
) -> None:
    out = template.personalise(ANN)
    _, text, markup = parse_message(out.data)
    link = template.unsubscribe_link(ANN)
    preferences = template.preferences_link(ANN)
    values = {
        "first_name": "Ann",
        "email": "ann@example.org",
        "name": "Ann Lee",
        "unsubscribe_url": link,
        "preferences_url": preferences,
    }
    expected_text, expected_html = rendered.text, rendered.html
    for token, key in rendered.placeholders.items():
        value = values.get(key, "")
        expected_text = expected_text.replace(token, value)
        expected_html = expected_html.replace(token, value)
    assert link.startswith("https://example.org/ledger/u/")
    assert preferences.startswith("https://example.org/ledger/p/")
    assert (text, markup) == (expected_text, expected_html)


def test_lines_are_short_and_crlf_only(template: MessageTemplate) -> None:
    lines = wire_lines(template.personalise(ANN).data)
    assert max(len(line) for line in lines) <= 998
    assert all(
        len(line) <= 78 for line in lines if not line.startswith((b"List-Unsubscribe:", b" <"))
    )
    assert template.personalise(ANN).data.isascii()


def test_lines_stay_short_with_a_long_paragraph_and_a_long_url(issue: Issue, cfg: Config) -> None:
    long_url = "https://example.org/" + "/".join(f"segment{i:04d}" for i in range(150))
    paragraph = " ".join(f"word{i}" for i in range(500))
    unbroken = "x" * 3000
    body = f"{paragraph}\n\n{unbroken}\n\nSee [the source]({long_url}) or {long_url}.\n"
    assert len(paragraph) > 3000 and len(long_url) > 1500
    lead = dataclasses.replace(issue.articles[0], body=body, url=long_url)
    rendered = render.render_issue(dataclasses.replace(issue, articles=(lead,)), cfg)
    data = message.prepare(rendered, cfg).personalise(ANN).data
    assert max(len(line) for line in wire_lines(data)) <= 998
    _, text, markup = parse_message(data)
    assert unbroken in text and unbroken in markup
    assert f'href="{long_url}"' in markup
    assert f"<{long_url}>" in text


def test_line_breaks_in_config_header_values_are_refused(
    rendered: RenderedIssue, cfg: Config
) -> None:
    for key, value in (
        ("reply_to", "letters@example.org\r\nBcc: victim@example.com"),
        ("sender", "Ledger <editor@example.org>\nBcc: victim@example.com"),
        ("list_id", "x\r\n"),
    ):
        with pytest.raises(ConfigError) as info:
            message.prepare(rendered, with_settings(cfg, "newsletter", **{key: value}))
        assert "line break" in str(info.value) and "\n" not in str(info.value)


def test_line_break_in_a_subject_is_refused(rendered: RenderedIssue, cfg: Config) -> None:
    with pytest.raises(ConfigError, match="Subject header value contains a line break"):
        message.prepare(rendered, cfg, subject_prefix="[Test]\r\nBcc: victim@example.com ")


@pytest.mark.parametrize(
    "name",
    [
        "Ann\r\nBcc: victim@example.com",
        "Ann\nLee",
        "Eve\x0bX-Injected: yes",
        "Eve\x0cX-Injected: yes",
        "Eve\x1cX-Injected: yes\x85Bcc: b@example.com\u2028X: y",
        "Eve\x00\x7f",
    ],
)
def test_control_and_line_break_characters_in_a_name_never_make_a_header(
    template: MessageTemplate, name: str
) -> None:
    data = template.personalise(Recipient(email="ann@example.org", name=name)).data
    head = data.split(b"\r\n\r\n", 1)[0]
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["X-Injected"] is None and parsed["Bcc"] is None and parsed["X"] is None
    assert all(line.startswith((b" ", b"\t")) or b":" in line for line in head.split(b"\r\n"))
    assert all(32 <= byte < 127 for byte in head.replace(b"\r\n", b""))


def test_a_huge_name_is_cut_so_the_to_line_stays_short(template: MessageTemplate) -> None:
    data = template.personalise(Recipient(email="ann@example.org", name="A" * 1200)).data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    "name",
    [
        "Dr. Jane Q. Public, Head of Communications at Port Example Harbour Authority",
        "Friend, attacker@evil.example, and a few more words to make the line fold",
        'Ann "the first" Lee \\ and co.',
        "Zoë Łukasiewicz-Ørsted, 東京",
        "x" * 300,
    ],
)
def test_a_name_with_commas_never_adds_a_recipient(template: MessageTemplate, name: str) -> None:
    """A comma in a long name once folded into two addresses: "Dr." and the subscriber."""
    data = template.personalise(Recipient(email="ann@example.org", name=name)).data
    assert_one_recipient(data, "ann@example.org", name)


@given(name=NAMES, address=ADDRESSES)
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_every_to_header_names_exactly_the_subscriber(
    template: MessageTemplate, name: str, address: str
) -> None:
    data = template.personalise(Recipient(email=address, name=name)).data
    assert_one_recipient(data, address, name)
    assert max(len(line) for line in wire_lines(data)) <= 998


@pytest.mark.parametrize(
    "address", ["ann@example.org\r\nBcc: victim@example.com", "jörg@example.org"]
)
def test_an_address_that_cannot_be_a_header_fails_only_that_recipient(
    template: MessageTemplate, address: str
) -> None:
    with pytest.raises(message.RecipientError):
        template.personalise(Recipient(email=address, name="Ann"))


def test_qp_lines_stay_within_76_even_around_empty_values(cfg: Config, issue: Issue) -> None:
    rendered = render.render_issue(issue, cfg)
    token = next(t for t, key in rendered.placeholders.items() if key == "email")
    field = token.replace(":email:", ":field.city:")
    text = "".join(f"{'x' * 70}{field}" for _ in range(20))
    placeholders = {**rendered.placeholders, field: "field.city"}
    crafted = dataclasses.replace(rendered, text=text, placeholders=placeholders)
    data = message.prepare(crafted, cfg).personalise(Recipient(email="a@example.org")).data
    body = data.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76


def test_unsubscribe_token_verifies_and_a_tampered_one_does_not(template: MessageTemplate) -> None:
    parsed, text, markup = parse_message(template.personalise(ANN).data)
    token = unsubscribe_token(parsed)
    assert f"https://example.org/ledger/u/{token}" in text
    assert f'href="https://example.org/ledger/u/{token}"' in markup
    signer = TokenSigner(TEST_SECRET_KEY)
    data = signer.verify(token, UNSUBSCRIBE_PURPOSE)
    assert data is not None
    assert (data.subject, data.context) == (f"42:{address_fingerprint(ANN.email)}", EXAMPLE_SLUG)
    payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert signer.verify(f"{payload}.{flipped}", UNSUBSCRIBE_PURPOSE) is None
    # Someone else's id with this token's signature: refused.
    forged_payload = signer.make(UNSUBSCRIBE_PURPOSE, "43", EXAMPLE_SLUG).split(".")[0]
    assert signer.verify(f"{forged_payload}.{signature}", UNSUBSCRIBE_PURPOSE) is None
    other_key = TokenSigner("k" * 32).make(UNSUBSCRIBE_PURPOSE, "42", EXAMPLE_SLUG)
    assert signer.verify(other_key, UNSUBSCRIBE_PURPOSE) is None
    assert signer.verify(token[:-2], UNSUBSCRIBE_PURPOSE) is None
    assert signer.verify(token, "confirm") is None  # another purpose
    assert TokenSigner("another-secret-key-0123").verify(token, UNSUBSCRIBE_PURPOSE) is None


def test_no_secret_key_is_a_one_line_config_error(rendered: RenderedIssue, workspace: Path) -> None:
    cfg = config.load(workspace, environ={})
    with pytest.raises(ConfigError) as info:
        message.prepare(rendered, cfg)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("environment: NEWSLETTER_SECRET_KEY is not set")
    assert "export NEWSLETTER_SECRET_KEY" in text
    short = config.load(workspace, environ={config.ENV_SECRET_KEY: "short"})
    with pytest.raises(ConfigError, match="shorter than 16"):
        message.prepare(rendered, short)


def test_bulk_mail_needs_an_https_unsubscribe(rendered: RenderedIssue, cfg: Config) -> None:
    with pytest.raises(ConfigError, match="no unsubscribe address"):
        message.prepare(rendered, with_settings(cfg, "unsubscribe", url="", mailto=""))
    with pytest.raises(ConfigError, match="is not https"):
        message.prepare(rendered, with_settings(cfg, "unsubscribe", url="http://example.org/u"))
    only_mailto = message.prepare(rendered, with_settings(cfg, "unsubscribe", url=""))
    parsed, _, markup = parse_message(only_mailto.personalise(ANN).data)
    assert str(parsed["List-Unsubscribe"]).startswith(
        "<mailto:unsubscribe@example.org?subject=unsubscribe%20"
    )
    assert parsed["List-Unsubscribe-Post"] is None  # one-click needs https
    assert 'href="mailto:unsubscribe@example.org?subject=unsubscribe%20' in markup


def test_subscriber_fields_and_names_in_templates(cfg: Config, issue: Issue) -> None:
    write_template(
        cfg,
        "email.txt",
        'To {{ recipient.name }} in {{ recipient.field("city") }}:\n'
        '{% include "!default/email.txt" %}',
    )
    rendered = render.render_issue(issue, cfg)
    template = message.prepare(rendered, cfg)
    reader = Recipient(
        email="c@example.org", name="Čeněk Dvořák", fields={"city": "Zürich & <Bern>"}
    )
    _, text, _ = parse_message(template.personalise(reader).data)
    assert text.startswith("To Čeněk Dvořák in Zürich & <Bern>:\n")
    assert render.find_placeholders(text) == []
    nobody = Recipient(email="d@example.org")  # a missing field is empty, not a token
    _, text, markup = parse_message(template.personalise(nobody).data)
    assert text.startswith("To  in :\n")
    assert "Hello there," in markup


def test_personalise_does_no_rendering(
    template: MessageTemplate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expensive work happens once per issue: after prepare, no Jinja, MJML or premailer."""

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendering during personalise")

    monkeypatch.setattr(mjml, "mjml2html", tripwire)
    monkeypatch.setattr(premailer.Premailer, "transform", tripwire)
    monkeypatch.setattr(render, "render_issue", tripwire)
    monkeypatch.setattr(render, "markdown_html", tripwire)
    outs = [
        template.personalise(Recipient(email=f"r{i}@example.org", name=f"R {i}")) for i in range(50)
    ]
    assert len({o.message_id for o in outs}) == 50
    assert all(f"r{i}@example.org".encode() in o.data for i, o in enumerate(outs))


def test_signing_hook_sees_the_finished_bytes(rendered: RenderedIssue, cfg: Config) -> None:
    seen: list[bytes] = []

    def sign(data: bytes) -> bytes:
        seen.append(data)
        return b"DKIM-Signature: v=1; test\r\n" + data

    out = message.prepare(rendered, cfg, sign=sign).personalise(ANN)
    assert out.data.startswith(b"DKIM-Signature: v=1; test\r\nFrom: ")
    assert out.data.endswith(seen[0])
    assert b"ann@example.org" in seen[0]


def test_sample_message_works_without_a_secret_key(
    rendered: RenderedIssue, workspace: Path
) -> None:
    data = message.sample_message(rendered, config.load(workspace, environ={}))
    parsed, text, markup = parse_message(data)
    assert parsed["To"] == "Sam Example <reader@example.org>"
    assert render.find_placeholders(text) == render.find_placeholders(markup) == []


def test_verp_gives_each_subscribers_copy_its_own_signed_envelope_sender(
    rendered: RenderedIssue, cfg: Config
) -> None:
    plain = message.prepare(rendered, cfg)
    assert plain.personalise(ANN).envelope_from == "editor@example.org"
    verp = message.prepare(
        rendered, with_settings(cfg, "bounces", return_path="returns@mail.example.org")
    )
    ann = verp.personalise(ANN)
    local, _, domain = ann.envelope_from.partition("@")
    prefix, _, token = local.partition("+")
    assert (prefix, domain) == ("returns", "mail.example.org")
    signer = TokenSigner(TEST_SECRET_KEY)
    assert signer.verp_matches(token, 42, "ann@example.org", rendered.issue.slug)
    assert not signer.verp_matches(token, 42, "ann@example.org", "002-another-issue")
    assert not signer.verp_matches(token, 43, "ann@example.org", rendered.issue.slug)
    assert len(local) <= 64  # RFC 5321's limit for a local part
    bob = verp.personalise(Recipient(email="bob@example.org", subscriber_id=43))
    assert bob.envelope_from != ann.envelope_from
    # Only the envelope differs: the bytes are the same template, the token is not in them.
    assert b"returns+" not in ann.data and ann.data.count(b"\r\n") == plain.personalise(
        ANN
    ).data.count(b"\r\n")
    # A proof or a sample (no subscriber id) goes out from the bounce address itself.
    proof = verp.personalise(Recipient(email="editor@example.org", subscriber_id="test:x"))
    assert proof.envelope_from == verp.envelope_from == "returns@mail.example.org"
