"""What an operator needs: the DNS records to publish, the config's TLS setting, JSON
output, progress lines and logs without a terminal, metrics, the deploy files."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import config, dkim, dns
from newsletter.cli import main
from tests.support import load_config
from tests.support.deliverability import write_key


def test_dns_prints_spf_dkim_and_dmarc_for_the_sender_domain(
    workspace: Path, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, runner: CliRunner
) -> None:
    key = write_key(tmp_path / "keys" / "nl.key", rsa_key)
    text = (workspace / "newsletter.toml").read_text(encoding="utf-8")
    text = text.replace("editor@example.org", "editor@news.example.org").replace(
        'host = "127.0.0.1"', 'host = "mail.example.org"'
    )
    text += '\n[dkim]\nselector = "nl2026"\ndomain = "mail.example.org"\n'
    (workspace / "newsletter.toml").write_text(text, encoding="utf-8")
    cfg = load_config(workspace, **{config.ENV_DKIM_KEY_FILE: str(key)})
    spf, dkim_record, dmarc = dns.records(cfg)
    assert (spf.name, spf.value) == ("news.example.org.", "v=spf1 a:mail.example.org ~all")
    signer = dkim.signer_from_config(cfg)
    assert signer is not None and signer.warnings == ()  # same organisational domain
    assert dkim_record.name == "nl2026._domainkey.mail.example.org."
    assert dkim_record.value == signer.record_value
    assert dmarc.name == "_dmarc.news.example.org."
    assert dmarc.value.startswith("v=DMARC1; p=none; rua=mailto:")
    assert any("_dmarc.example.org covers news.example.org" in note for note in dmarc.notes)

    result = runner.invoke(
        main, ["-C", str(workspace), "dns"], env={config.ENV_DKIM_KEY_FILE: str(key)}
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert 'news.example.org. IN TXT "v=spf1 a:mail.example.org ~all"' in lines
    assert any(line.startswith("nl2026._domainkey.mail.example.org. IN TXT") for line in lines)
    assert any(line.startswith('_dmarc.news.example.org. IN TXT "v=DMARC1;') for line in lines)


def test_dns_without_dkim_says_how_to_get_a_key(workspace: Path, runner: CliRunner) -> None:
    result = runner.invoke(main, ["-C", str(workspace), "dns"])
    assert result.exit_code == 0, result.output
    assert "DKIM is off: run `newsletter dkim keygen`" in result.stdout
    assert "_domainkey" not in result.stdout


def test_init_documents_the_ca_file(tmp_path: Path, runner: CliRunner) -> None:
    result = runner.invoke(main, ["init", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "new" / "newsletter.toml").read_text(encoding="utf-8")
    assert "# ca_file = " in text
    assert config.load(tmp_path / "new").smtp.ca_file == ""
