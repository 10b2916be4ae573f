"""DKIM: signatures that dkimpy verifies against the public key, keys, and bad input."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from newsletter import config, dkim, message
from newsletter.cli import main
from newsletter.errors import ConfigError
from newsletter.message import Recipient
from tests.support import load_config
from tests.support.deliverability import append_config, render_example, signature_tags, write_key

REQUIRED_SIGNED = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)


def dkim_config(root: Path, key_path: Path, *, domain: str = "example.org") -> config.Config:
    append_config(root, f'[dkim]\nselector = "nl2026"\ndomain = "{domain}"\n')
    return load_config(root, **{config.ENV_DKIM_KEY_FILE: str(key_path)})


@pytest.fixture
def signed_setup(
    workspace: Path, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> tuple[config.Config, dkim.DkimSigner]:
    cfg = dkim_config(workspace, write_key(tmp_path / "keys" / "nl.key", rsa_key))
    signer = dkim.signer_from_config(cfg)
    assert signer is not None
    return cfg, signer


def test_personalised_messages_are_signed_and_verify_against_the_public_key(
    signed_setup: tuple[config.Config, dkim.DkimSigner],
) -> None:
    cfg, signer = signed_setup
    template = message.prepare(render_example(cfg), cfg, sign=signer)
    readers = [
        Recipient(email="ana@example.org", name="Ana Lima", subscriber_id=1),
        Recipient(email="bo@example.com", name="Bö $Ünïcode {x}", subscriber_id=2),
    ]
    for reader in readers:
        data = template.personalise(reader).data
        assert data.startswith(b"DKIM-Signature:")
        assert dkim.verify(data, signer.record_value)
        # The same check, spelled out with dkimpy and a DNS function that serves the record.
        names: list[bytes] = []
        assert dkimpy.verify(data, dnsfunc=_dns(signer.record_value, names))
        assert names == [b"nl2026._domainkey.example.org."]


def _dns(record: str, asked: list[bytes]) -> Callable[..., bytes]:
    """A dkimpy DNS function that serves one TXT record and notes the names asked for."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        asked.append(name)
        return record.encode()

    return dnsfunc


def test_signed_headers_include_the_required_ones_with_from_oversigned(
    signed_setup: tuple[config.Config, dkim.DkimSigner],
) -> None:
    cfg, signer = signed_setup
    data = message.sample_message(render_example(cfg), cfg, sign=signer)
    tags = signature_tags(data)
    signed = tags["h"].split(":")
    for name in REQUIRED_SIGNED:
        assert name in signed
    assert signed.count("from") == 2
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "rsa-sha256",
        "relaxed/relaxed",
        "example.org",
        "nl2026",
    )
    assert int(tags["t"]) > 0


def test_edits_after_signing_fail_verification(
    signed_setup: tuple[config.Config, dkim.DkimSigner],
) -> None:
    cfg, signer = signed_setup
    data = message.sample_message(render_example(cfg), cfg, sign=signer)
    assert dkim.verify(data, signer.record_value)
    body_edit = data.replace(b"Welcome to the first issue", b"Welcome to the final issue", 1)
    assert body_edit != data
    assert not dkim.verify(body_edit, signer.record_value)
    header_edit = data.replace(b"Subject: Port", b"Subject: Fort", 1)
    assert header_edit != data
    assert not dkim.verify(header_edit, signer.record_value)
    unsubscribe_edit = data.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"", 1)
    assert not dkim.verify(unsubscribe_edit, signer.record_value)
    # From is oversigned: a second From added in transit breaks the signature.
    head, _, body = data.partition(b"\r\n\r\n")
    extra_from = head + b"\r\nFrom: Mallory <m@example.net>\r\n\r\n" + body
    assert not dkim.verify(extra_from, signer.record_value)


def test_whitespace_changes_that_relaxed_canonicalisation_allows_still_verify(
    signed_setup: tuple[config.Config, dkim.DkimSigner],
) -> None:
    cfg, signer = signed_setup
    data = message.sample_message(render_example(cfg), cfg, sign=signer)
    refolded = data.replace(b"Subject: Port", b"Subject:   Port", 1).replace(
        b"Welcome to the first", b"Welcome  to\tthe first", 1
    )
    assert refolded != data
    assert dkim.verify(refolded, signer.record_value)


def test_only_headers_present_are_signed(workspace: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    signer = dkim.DkimSigner("s", "example.org", rsa_key)
    data = signer(b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    assert signature_tags(data)["h"] == "from:to:subject:from"
    assert dkim.verify(data, signer.record_value)


def test_a_message_with_no_body_separator_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="blank line"):
        dkim.DkimSigner("s", "example.org", rsa_key)(b"From: a@example.org\r\n")


_body_text = st.lists(
    st.sampled_from(["a", "b", " ", "  ", "\t", "\r\n", "\r\n\r\n", "=", "é"]), max_size=40
).map("".join)


@given(_body_text)
@settings(max_examples=300, deadline=None)
def test_body_canonicalisation_matches_dkimpy(text: str) -> None:
    body = text.encode("utf-8")
    assert dkim.relaxed_body(body) == Relaxed.canonicalize_body(body)


@given(
    st.sampled_from(["Subject", "subject ", "X-Thing"]),
    st.lists(st.sampled_from(["v", " ", "\t", "\r\n ", "\r\n\t", "w"]), max_size=20).map("".join),
)
@settings(max_examples=300, deadline=None)
def test_header_canonicalisation_matches_dkimpy(name: str, value: str) -> None:
    raw_name, raw_value = name.encode(), value.encode() + b"\r\n"
    ours = dkim.relaxed_header(raw_name + b":" + raw_value)
    (theirs_name, theirs_value) = Relaxed.canonicalize_headers([(raw_name, raw_value)])[0]
    assert ours == theirs_name + b":" + theirs_value


@given(_body_text, st.text(alphabet="abc \t", max_size=30))
@settings(max_examples=40, deadline=None)
def test_any_body_and_subject_signs_and_verifies(body: str, subject: str) -> None:
    signer = _shared_signer()
    data = signer(
        b"From: a@example.org\r\nSubject: "
        + subject.encode()
        + b"\r\nTo: b@example.org\r\n\r\n"
        + body.encode("utf-8")
    )
    assert dkim.verify(data, signer.record_value)


_SIGNER: list[dkim.DkimSigner] = []


def _shared_signer() -> dkim.DkimSigner:
    if not _SIGNER:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        _SIGNER.append(dkim.DkimSigner("s", "example.org", key))
    return _SIGNER[0]


# --- config and bad input ---------------------------------------------------------------


def test_no_dkim_section_means_no_signer(workspace: Path) -> None:
    assert dkim.signer_from_config(load_config(workspace)) is None


def test_key_file_from_config_is_relative_to_the_workspace(
    workspace: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    write_key(workspace / ".newsletter" / "dkim" / "k.pem", rsa_key)
    append_config(
        workspace,
        '[dkim]\nselector = "s1"\ndomain = "example.org"\nkey_file = ".newsletter/dkim/k.pem"\n',
    )
    signer = dkim.signer_from_config(load_config(workspace))
    assert signer is not None
    assert signer.record_value == dkim.public_record(rsa_key)
    assert dkim.key_file_warnings(load_config(workspace)) == []


def test_missing_key_is_one_line_naming_the_path(workspace: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.key"
    cfg = dkim_config(workspace, missing)
    with pytest.raises(ConfigError) as caught:
        dkim.signer_from_config(cfg)
    text = str(caught.value)
    assert str(missing) in text and "\n" not in text
    assert "NEWSLETTER_DKIM_KEY_FILE" in text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a key at all\n", "not a PEM private key"),
        (b"", "not a PEM private key"),
    ],
)
def test_unreadable_key_contents_are_one_line(
    workspace: Path, tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        dkim.signer_from_config(dkim_config(workspace, path))


def test_key_that_is_a_folder_or_unset(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        dkim.signer_from_config(dkim_config(workspace, tmp_path))
    with pytest.raises(ConfigError, match="no private key file"):
        dkim.signer_from_config(load_config(workspace))  # [dkim] is there now, but no key_file/env


def test_half_configured_dkim_is_an_error(workspace: Path) -> None:
    append_config(workspace, '[dkim]\nselector = "s1"\n')
    with pytest.raises(ConfigError, match=r"\[dkim\] has no domain"):
        dkim.signer_from_config(load_config(workspace))


@pytest.mark.parametrize("selector", ["news_letter", "a b", "a..b", "-a", "a.", "sel/1"])
def test_illegal_selector_is_one_line_from_the_config(workspace: Path, selector: str) -> None:
    append_config(workspace, f'[dkim]\nselector = "{selector}"\ndomain = "example.org"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(workspace)
    text = str(caught.value)
    assert "illegal characters" in text and "\n" not in text
    assert f"{config.CONFIG_NAME}:" in text  # path:line


def test_illegal_domain_in_keygen_is_one_line(
    runner: CliRunner, workspace: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        main,
        [
            "-C",
            str(workspace),
            "dkim",
            "keygen",
            "--domain",
            "exa mple.org",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: ") and "illegal characters" in result.output
    assert list(tmp_path.glob("*.key")) == []


def test_dmarc_alignment_warning_names_both_domains(
    workspace: Path, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    cfg = dkim_config(workspace, write_key(tmp_path / "k.key", rsa_key), domain="mail.example.net")
    signer = dkim.signer_from_config(cfg)
    assert signer is not None
    (warning,) = signer.warnings
    assert "DMARC alignment" in warning
    assert "example.org" in warning and "mail.example.net" in warning


@pytest.mark.parametrize(
    ("sender_domain", "dkim_domain", "aligned"),
    [
        ("example.org", "example.org", True),
        ("news.example.org", "example.org", True),
        ("example.org", "mail.example.org", True),
        ("example.org", "example.net", False),
        ("badexample.org", "example.org", False),
        # Relaxed DMARC alignment is by organisational domain (the public suffix list).
        ("news.example.org", "mail.example.org", True),
        ("news.example.co.uk", "mail.example.co.uk", True),
        ("a.co.uk", "b.co.uk", False),
    ],
)
def test_alignment(workspace: Path, sender_domain: str, dkim_domain: str, aligned: bool) -> None:
    cfg = load_config(workspace)
    cfg = config.replace(
        cfg,
        newsletter=config.NewsletterSettings(sender=f"N <n@{sender_domain}>"),
        dkim=config.DkimSettings(selector="s", domain=dkim_domain),
    )
    assert (dkim.alignment_warning(cfg) is None) is aligned


def test_key_readable_by_others_or_inside_the_workspace_warns(
    workspace: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    key = write_key(workspace / "keys" / "k.pem", rsa_key)
    key.chmod(0o644)
    append_config(
        workspace, '[dkim]\nselector = "s1"\ndomain = "example.org"\nkey_file = "keys/k.pem"\n'
    )
    warnings = dkim.key_file_warnings(load_config(workspace))
    assert any("chmod 600" in w for w in warnings)
    assert any("goes in git" in w for w in warnings)


# --- CLI --------------------------------------------------------------------------------


def test_bad_key_path_through_the_cli_is_one_line_and_exit_1(
    runner: CliRunner, workspace: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.key"
    append_config(
        workspace, f'[dkim]\nselector = "s1"\ndomain = "example.org"\nkey_file = "{missing}"\n'
    )
    result = runner.invoke(main, ["-C", str(workspace), "dkim", "record"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {missing}: DKIM key file not found")
    assert "Traceback" not in result.output
    # check reports the same problem as an error finding and exits 1 too.
    checked = runner.invoke(main, ["-C", str(workspace), "check", "1"])
    assert checked.exit_code == 1
    assert "dkim-config" in checked.output and str(missing) in checked.output


def test_keygen_writes_a_private_key_0600_and_prints_a_record_that_verifies(
    runner: CliRunner, workspace: Path, tmp_path: Path
) -> None:
    out = tmp_path / "keys"
    result = runner.invoke(
        main,
        [
            "-C",
            str(workspace),
            "dkim",
            "keygen",
            "--selector",
            "nl2026",
            "--domain",
            "example.org",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    private, public = out / "nl2026.example.org.key", out / "nl2026.example.org.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert not list(out.glob(".*.tmp"))
    (line,) = [x for x in result.output.splitlines() if " IN TXT " in x]
    assert line.startswith('nl2026._domainkey.example.org IN TXT "v=DKIM1; k=rsa; p=')
    strings = line.split(" IN TXT ", 1)[1].split('" "')
    assert len(strings) == 2 and all(len(s.strip('"')) <= 255 for s in strings)
    record = dkim.record_from_zone_line(line)
    # Sign with the written key through the config, verify against the printed record.
    cfg = dkim_config(workspace, private)
    signer = dkim.signer_from_config(cfg)
    assert signer is not None
    data = message.sample_message(render_example(cfg), cfg, sign=signer)
    assert dkim.verify(data, record)
    # A second keygen for the same selector refuses to overwrite the key.
    again = runner.invoke(
        main,
        ["-C", str(workspace), "dkim", "keygen", "--selector", "nl2026", "--out", str(out)],
    )
    assert again.exit_code == 1 and "already exists" in again.output


def test_keygen_defaults_to_the_state_folder_and_sender_domain(
    runner: CliRunner, workspace: Path
) -> None:
    result = runner.invoke(main, ["-C", str(workspace), "dkim", "keygen", "--bits", "1024"])
    assert result.exit_code == 0, result.output
    assert (workspace / ".newsletter" / "dkim" / "newsletter.example.org.key").is_file()
    assert "newsletter._domainkey.example.org IN TXT" in result.output


def test_keygen_refuses_silly_key_sizes(runner: CliRunner, workspace: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        main, ["-C", str(workspace), "dkim", "keygen", "--bits", "512", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: --bits: key size 512 is out of range")
