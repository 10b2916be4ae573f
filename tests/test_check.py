"""`newsletter check`: the example is clean, and each check fires on a crafted bad issue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from newsletter import check, config, content, message, render
from newsletter.check import CheckReport, Finding
from newsletter.cli import main
from tests.support import example_issue, load_config
from tests.support.deliverability import append_config, render_example, write_key


def codes(report: CheckReport, level: str | None = None) -> set[str]:
    return {f.code for f in report.findings if level is None or f.level == level}


def finding(report: CheckReport, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert found, f"no {code} in {codes(report)}"
    return found[0]


def write_issue(
    root: Path,
    body: str,
    *,
    number: int = 2,
    front: str = "preheader: A short preheader for the inbox.\n",
    article_front: str = "",
) -> content.Issue:
    """An issue with one article whose Markdown body is ``body``."""
    folder = root / "issues" / f"{number:03d}-crafted"
    (folder / "articles").mkdir(parents=True)
    (folder / "issue.md").write_text(
        f"---\nnumber: {number}\ndate: 2026-12-01\ntitle: A crafted issue\n{front}"
        "articles:\n  - 01-only.md\n---\nHello and welcome.\n",
        encoding="utf-8",
    )
    (folder / "articles" / "01-only.md").write_text(
        f"---\ntitle: The only article\n{article_front}---\n{body}\n", encoding="utf-8"
    )
    return content.read_issue(folder)


GOOD_BODY = (
    "A plain paragraph with a [good link](https://example.org/good) and enough words to "
    "make the text part and the HTML part agree about what this issue says.\n"
)


# --- the example ------------------------------------------------------------------------


PLACEHOLDER = "public-url-placeholder"


def test_the_example_issue_has_no_errors_and_warns_only_of_its_placeholder_address(
    workspace: Path,
) -> None:
    cfg = load_config(workspace)
    report = check.check_issue(cfg, example_issue(cfg), spam=False)
    assert report.errors == () and codes(report, "warning") == {PLACEHOLDER, "dkim-off"}, (
        report.findings
    )
    assert "https://example.org/ledger is a placeholder" in finding(report, PLACEHOLDER).message
    assert "5 images, 9 KB" in finding(report, "image-weight").message
    assert report.ok
    assert {"html-size"} <= codes(report, "info")
    # Gmail and Yahoo require DKIM of bulk senders: without it, a warning.
    assert "Gmail and Yahoo require DKIM" in finding(report, "dkim-off").message
    assert report.issue_number == 1
    assert report.html_size < render.GMAIL_CLIP_BYTES
    assert report.spam is None


def test_cli_check_of_the_example_exits_0_and_says_so(runner: CliRunner, workspace: Path) -> None:
    result = runner.invoke(main, ["-C", str(workspace), "check", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "0 errors, 2 warnings"


def test_json_output_parses(runner: CliRunner, workspace: Path) -> None:
    result = runner.invoke(main, ["-C", str(workspace), "check", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True and data["errors"] == 0 and data["warnings"] == 2
    assert data["issue_number"] == 1
    assert {"level", "code", "message", "where"} <= set(data["findings"][0])
    assert data["spam"] is None


# --- each check on a crafted issue ------------------------------------------------------


def test_links_and_images_that_hurt(workspace: Path) -> None:
    body = (
        GOOD_BODY + "See [the old site](http://example.org/old), [a relative one](/relative/page), "
        "[a broken host](https://exa_mple!.org/x) and this []( https://example.org/empty ).\n\n"
        '<img src="https://example.org/no-alt.png" width="552">\n\n'
        '<img src="https://example.org/no-width.png" alt="A harbour at dusk">\n\n'
        '<img src="http://example.org/plain.png" alt="Plain" width="100%">\n'
    )
    cfg = load_config(workspace)
    report = check.check_issue(cfg, write_issue(workspace, body), spam=False)
    assert finding(report, "link-http").level == "warning"
    assert "http://example.org/old" in finding(report, "link-http").message
    malformed = [f for f in report.findings if f.code == "link-malformed"]
    assert {f.level for f in malformed} == {"error"}
    assert any("/relative/page" in f.message for f in malformed)
    assert any("exa_mple" in f.message for f in malformed)
    assert "example.org/empty" in finding(report, "link-empty").message
    assert "no-alt.png" in finding(report, "image-alt").message
    widths = [f.message for f in report.findings if f.code == "image-width"]
    assert any("no-width.png has no width" in m for m in widths)
    assert any("plain.png has width '100%'" in m for m in widths)
    assert "plain.png" in finding(report, "image-http").message
    # Findings point at the article the URL came from, with its line.
    assert finding(report, "link-http").where.endswith("articles/01-only.md:5")
    assert not report.ok


def test_subject_in_capitals_and_too_long(workspace: Path) -> None:
    subject = "BIG NEWS FROM THE HARBOUR " * 5
    cfg = load_config(workspace)
    issue = write_issue(
        workspace, GOOD_BODY, front=f"subject: {subject.strip()}\npreheader: Something.\n"
    )
    report = check.check_issue(cfg, issue, spam=False)
    assert finding(report, "subject-caps").level == "warning"
    assert "129 characters" in finding(report, "subject-long").message
    plain = write_issue(workspace, GOOD_BODY, number=3, front="subject: TfL\npreheader: x\n")
    assert {"subject-caps", "subject-long"}.isdisjoint(codes(check.check_issue(cfg, plain)))


def test_no_preheader(workspace: Path) -> None:
    cfg = load_config(workspace)
    report = check.check_issue(cfg, write_issue(workspace, GOOD_BODY, front=""), spam=False)
    assert finding(report, "preheader-missing").level == "warning"
    assert finding(report, "preheader-missing").where.endswith("issue.md")


def test_html_over_the_gmail_clip(workspace: Path) -> None:
    body = "\n\n".join(f"Paragraph {n} " + "words and more words " * 60 for n in range(120))
    cfg = load_config(workspace)
    report = check.check_issue(cfg, write_issue(workspace, body), spam=False)
    assert report.html_size > render.GMAIL_CLIP_BYTES
    assert finding(report, "html-size").level == "warning"
    assert "clip" in finding(report, "html-size").message


def test_no_unsubscribe_link_and_no_postal_address_in_the_body(workspace: Path) -> None:
    (workspace / "templates" / "email.mjml").write_text(
        '{% extends "!default/email.mjml" %}\n'
        "{% block footer %}<mj-section><mj-column><mj-text><p>Bye.</p></mj-text>"
        "</mj-column></mj-section>{% endblock %}\n",
        encoding="utf-8",
    )
    cfg = load_config(workspace)
    report = check.check_issue(cfg, example_issue(cfg), spam=False)
    assert finding(report, "unsubscribe-missing").level == "error"
    assert finding(report, "postal-address-hidden").level == "warning"
    assert "unsubscribe-text-missing" not in codes(report)  # the text part still has it


def test_postal_address_not_configured(workspace: Path) -> None:
    cfg = load_config(workspace)
    cfg = config.replace(
        cfg,
        newsletter=config.NewsletterSettings(**{**cfg.newsletter.__dict__, "postal_address": ""}),
    )
    report = check.check_issue(cfg, example_issue(cfg), spam=False)
    assert finding(report, "postal-address-missing").level == "warning"


@pytest.mark.parametrize(
    ("text_template", "code", "level"),
    [
        ("{# nothing #}\n", "text-empty", "error"),
        ("{{ newsletter.name }}: read it on the web at {{ web_url }}\n", "text-short", "warning"),
    ],
)
def test_thin_text_part(workspace: Path, text_template: str, code: str, level: str) -> None:
    (workspace / "templates" / "email.txt").write_text(text_template, encoding="utf-8")
    cfg = load_config(workspace)
    report = check.check_issue(cfg, example_issue(cfg), spam=False)
    assert finding(report, code).level == level
    assert finding(report, "unsubscribe-text-missing").level == "warning"


def test_missing_unsubscribe_headers(workspace: Path) -> None:
    cfg = load_config(workspace)
    none = config.replace(cfg, unsubscribe=config.UnsubscribeSettings())
    report = check.check_issue(none, example_issue(none), spam=False)
    missing = {f.message.split(" header")[0] for f in report.findings if f.code == "header-missing"}
    assert missing == {"the List-Unsubscribe", "the List-Unsubscribe-Post"}
    mailto_only = config.replace(
        cfg, unsubscribe=config.UnsubscribeSettings(mailto="unsubscribe@example.org")
    )
    report = check.check_issue(mailto_only, example_issue(mailto_only), spam=False)
    assert finding(report, "unsubscribe-one-click").level == "error"
    url_only = config.replace(
        cfg, unsubscribe=config.UnsubscribeSettings(url="https://example.org/ledger/u")
    )
    report = check.check_issue(url_only, example_issue(url_only), spam=False)
    assert finding(report, "unsubscribe-mailto").level == "warning"
    assert report.ok


def test_header_checks_on_a_crafted_message(workspace: Path) -> None:
    cfg = load_config(workspace)
    good = message.sample_message(render_example(cfg), cfg)
    assert list(check.check_headers(good, cfg)) == []
    head, _, body = good.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.startswith((b"Date:", b"Precedence:", b"Message-ID:"))
    ]
    lines += [b"Message-ID: <abc@mailer.example.net>", b"Subject: twice"]
    found = list(check.check_headers(b"\r\n".join(lines) + b"\r\n\r\n" + body, cfg))
    text = " | ".join(f.message for f in found)
    assert "the Date header is missing" in text
    assert "the Precedence header is missing" in text
    assert "not on the sender's domain example.org" in text
    assert "the Subject header appears twice" in text
    assert all(f.level == "error" for f in found)


# --- DKIM in check ----------------------------------------------------------------------


def test_dkim_configured_signs_and_verifies(
    workspace: Path, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    key = write_key(tmp_path / "k.key", rsa_key)
    append_config(workspace, '[dkim]\nselector = "nl"\ndomain = "example.org"\n')
    cfg = load_config(workspace, **{config.ENV_DKIM_KEY_FILE: str(key)})
    report = check.check_issue(cfg, example_issue(cfg), spam=False)
    assert "nl._domainkey.example.org" in finding(report, "dkim-ok").message
    assert report.errors == () and codes(report, "warning") == {PLACEHOLDER}


def test_dkim_misaligned_domain_warns(
    workspace: Path, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    key = write_key(tmp_path / "k.key", rsa_key)
    append_config(workspace, '[dkim]\nselector = "nl"\ndomain = "example.net"\n')
    cfg = load_config(workspace, **{config.ENV_DKIM_KEY_FILE: str(key)})
    report = check.check_issue(cfg, example_issue(cfg), spam=False)
    assert "DMARC alignment" in finding(report, "dkim-alignment").message
    assert "dkim-ok" in codes(report)


# --- SpamAssassin -----------------------------------------------------------------------


@pytest.mark.spamassassin
def test_example_scores_at_most_zero_in_spamassassin(runner: CliRunner, workspace: Path) -> None:
    """The issue's target: SpamAssassin 4 in local mode gives the example at most 0.0."""
    result = runner.invoke(main, ["-C", str(workspace), "check", "1", "--spam", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    spam = data["spam"]
    assert spam["score"] <= 0.0, spam["rules"]
    assert spam["required"] > 0
    assert all({"name", "score", "description"} == set(rule) for rule in spam["rules"])
    assert "MAILING_LIST_MULTI" in {rule["name"] for rule in spam["rules"]}
    assert (data["errors"], data["warnings"]) == (0, 2), data["findings"]  # placeholder, DKIM off
    (scored,) = [f for f in data["findings"] if f["code"] == "spam-score"]
    assert scored["level"] == "info"


def test_spam_without_spamassassin_says_how_to_install_it(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    cfg = load_config(workspace)
    report = check.check_issue(cfg, example_issue(cfg), spam=True)
    unavailable = finding(report, "spam-unavailable")
    assert unavailable.level == "warning"
    assert "apt-get install spamassassin" in unavailable.message
    assert report.spam is None


SA_REPORT = """\
Content analysis details:   (3.4 points, 5.0 required)

 pts rule name              description
---- ---------------------- --------------------------------------------------
 0.0 HTML_MESSAGE           BODY: HTML included in message
 2.5 HTML_FONT_LOW_CONTRAST BODY: HTML font color similar or identical to
                            background
 1.9 SUBJ_ALL_CAPS          Subject is all capitals
-1.0 MAILING_LIST_MULTI     Multiple indicators imply a widely-seen list
                            manager

--===============1==
"""


def test_parse_spamassassin_report() -> None:
    result = check.parse_spamassassin(SA_REPORT)
    assert result is not None
    assert (result.score, result.required) == (3.4, 5.0)
    assert [r.name for r in result.rules] == [
        "HTML_MESSAGE",
        "HTML_FONT_LOW_CONTRAST",
        "SUBJ_ALL_CAPS",
        "MAILING_LIST_MULTI",
    ]
    assert result.rules[1].description.endswith("identical to background")
    assert check.parse_spamassassin("no report here") is None
    assert check._spam_finding(result).level == "warning"
    assert "HTML_FONT_LOW_CONTRAST (+2.5)" in check._spam_finding(result).message
