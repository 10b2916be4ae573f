"""The reader's language: the theme's words, dates, the service's pages, the archive and
the confirmation email through gettext catalogs (German and French ship) and Babel."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import config, message, publish, render, server
from newsletter.cli import main
from newsletter.config import Config
from newsletter.errors import ConfigError
from newsletter.message import Recipient
from newsletter.server import create_app
from tests.support import EXAMPLE_SLUG, REPO, example_issue, load_config
from tests.support import catalogs as theme_catalogs
from tests.support import parse_message as parse


def set_locale(workspace: Path, locale: str) -> Config:
    """The example workspace in ``locale``, its dates left to the locale."""
    path = workspace / config.CONFIG_NAME
    text = path.read_text(encoding="utf-8").replace('date_format = "{month}/{day}/{yy}"\n', "")
    path.write_text(text.replace("[newsletter]\n", f'[newsletter]\nlocale = "{locale}"\n'))
    return load_config(workspace)


def english_theme_words(content: str) -> set[str]:
    """The English words of the email's templates (the message ids), in pieces around
    their values, leaving out any piece the issue's own English text also has."""
    pieces = set()
    for msgid, places in theme_catalogs.extract().items():
        if not any(place.startswith(("email.", "article.")) for place in places):
            continue
        for piece in re.split(r"%\(\w+\)[sd]", msgid):
            piece = piece.strip(" ,.:")
            if len(piece) >= 4 and piece not in content:
                pieces.add(piece)
    return pieces | {"By Marguerite"}


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        (
            "fr",
            [
                "Numéro 1 · 20 novembre 2026",
                "Dans ce numéro",
                "Par Marguerite Ollerenshaw, The Quayside Review, 16/11/2026",
                "Bonjour Ada,",
                "Se désabonner",
                "Lire l’original sur The Quayside Review",
            ],
        ),
        (
            "de",
            [
                "Ausgabe 1 · 20. November 2026",
                "In dieser Ausgabe",
                "Von Marguerite Ollerenshaw, The Quayside Review, 16.11.26",
                "Hallo Ada,",
                "Abbestellen",
                "Das Original bei The Quayside Review lesen",
            ],
        ),
    ],
)
def test_a_build_in_another_language_has_no_english_theme_word(
    runner: CliRunner, workspace: Path, locale: str, expected: list[str]
) -> None:
    cfg = set_locale(workspace, locale)
    result = runner.invoke(main, ["-C", str(workspace), "build", "1"])
    assert result.exit_code == 0, result.output
    out = cfg.build_dir / EXAMPLE_SLUG
    sample = email.message_from_bytes(
        (out / "sample.eml").read_bytes(), policy=email.policy.default
    )
    issue = example_issue(cfg)
    content = issue.intro + "".join(a.body + a.title + a.bio for a in issue.articles)
    rendered = render.render_issue(issue, cfg)
    reader = Recipient("ada@example.org", "Ada Lovelace", {}, 1)
    _, text, markup = parse(message.prepare(rendered, cfg).personalise(reader).data)
    data = render.visible_text  # what a reader sees of each HTML page
    seen = {
        "email": data(markup),
        "text": text,
        "web": data((out / "web.html").read_text(encoding="utf-8")),
        "sample": data(str(sample.get_body(("html",)).get_content())),  # type: ignore[union-attr]
    }
    for word in english_theme_words(content):
        for name, shown in seen.items():
            assert word not in shown, (name, word)
    for phrase in expected:
        assert phrase in seen["email"] or phrase in seen["web"], phrase
    assert f'lang="{locale}"' in markup
    assert expected[0] in text and expected[1].upper() in text


def test_the_shipped_catalogs_translate_every_message() -> None:
    found = theme_catalogs.extract()
    assert len(found) > 60 and "In this issue" in found and "Not found" in found
    for locale in theme_catalogs.LOCALES:
        assert theme_catalogs.missing(locale) == [], locale


@pytest.mark.parametrize(
    ("locale", "fallback"), [("de", "Hallo zusammen,"), ("fr", "Bonjour à vous,")]
)
def test_the_fallback_greeting_is_translated(workspace: Path, locale: str, fallback: str) -> None:
    cfg = set_locale(workspace, locale)
    rendered = render.render_issue(example_issue(cfg), cfg)
    data = message.prepare(rendered, cfg).personalise(Recipient("x@example.org", "", {}, 3)).data
    _, text, markup = parse(data)
    assert fallback in markup and f"\n{fallback}\n" in text


def test_months_and_weekdays_follow_the_locale() -> None:
    import datetime as dt

    day = dt.date(2026, 3, 2)
    pattern = "{weekday} {day} {month_name} ({mon}) {year}"
    assert render.format_date(day, pattern, "fr") == "lundi 2 mars (mars) 2026"
    assert render.format_date(day, pattern, "de") == "Montag 2 März (März) 2026"
    assert render.format_date(day, pattern) == "Monday 2 March (Mar) 2026"
    assert render.format_date(day, "") == "March 2, 2026"
    assert render.format_date(day, "", "fr", default="short") == "02/03/2026"


def test_a_workspace_catalog_overrides_the_theme_and_adds_a_language(
    workspace: Path, cfg: Config
) -> None:
    own = workspace / "templates" / "locale" / "fr" / "LC_MESSAGES" / "newsletter.po"
    own.parent.mkdir(parents=True)
    own.write_text('msgid "In this issue"\nmsgstr "Au sommaire"\n', encoding="utf-8")
    dutch = workspace / "templates" / "locale" / "nl" / "LC_MESSAGES" / "newsletter.po"
    dutch.parent.mkdir(parents=True)
    dutch.write_text('msgid "In this issue"\nmsgstr "In dit nummer"\n', encoding="utf-8")
    cfg_fr = set_locale(workspace, "fr")
    french = render.render_issue(example_issue(cfg), cfg_fr)
    assert "Au sommaire" in french.html and "Dans ce numéro" not in french.html
    assert "Numéro 1" in french.html  # the theme's catalog fills in the rest
    cfg_nl = load_config(workspace)
    cfg_nl = dataclasses.replace(
        cfg_nl, newsletter=dataclasses.replace(cfg_nl.newsletter, locale="nl")
    )
    dutch_issue = render.render_issue(example_issue(cfg_nl), cfg_nl)
    assert "In dit nummer" in dutch_issue.html
    assert "20 november 2026" in dutch_issue.html  # Babel knows Dutch dates without a catalog
    # A broken catalog is an error at its line, not a silent English email.
    own.write_text('msgid "In this issue"\nmsgstr "Au sommaire"\nmsgtxt "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(own))}:3: cannot read"):
        render.render_issue(example_issue(cfg), cfg_fr)
    # So is a translation whose values do not match its message's.
    own.write_text(
        'msgid ""\nmsgstr "Content-Type: text/plain; charset=utf-8\\n"\n\n'
        '#, python-format\nmsgid "Issue %(number)s"\nmsgstr "Numéro %(numero)s"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(own))}:5: the translation of"):
        render.render_issue(example_issue(cfg), cfg_fr)


def test_an_unknown_locale_is_refused_when_the_config_loads(workspace: Path) -> None:
    path = workspace / config.CONFIG_NAME
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            "[newsletter]\n", '[newsletter]\nlocale = "xx-notalanguage"\n'
        ),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"newsletter\.toml:\d+: \[newsletter\] locale: unknown"):
        load_config(workspace)


def test_the_service_pages_the_archive_and_the_confirmation_speak_french(
    workspace: Path,
) -> None:
    cfg = set_locale(workspace, "fr")
    app = create_app(cfg)
    try:
        client = app.test_client()
        page = client.get("/subscribe").get_data(as_text=True)
        assert 'lang="fr"' in page and "S’abonner à The Harbour Ledger" in page
        assert "Adresse e-mail" in page and "Email address" not in page
        missing = client.get("/no-such-page/x/y")
        assert missing.status_code == 404
        assert "Cette page n’existe pas." in missing.get_data(as_text=True)
        bad = client.get("/u/not-a-token").get_data(as_text=True)
        assert "Ce lien ne fonctionne pas" in bad and "Aller au formulaire" in bad
    finally:
        server.close_app(app)
    index = publish.index_html(cfg, [])
    assert "Aucun numéro n’a encore été publié." in index and "Numéros précédents" in index
    assert "Past issues" not in index
    data = server.confirmation_message(cfg, "ann@example.org", "Lee, Ann", "https://x.example/c")
    confirm = email.message_from_bytes(data, policy=email.policy.default)
    assert confirm["Subject"] == "Confirmez votre abonnement à The Harbour Ledger"
    body = confirm.get_body(("plain",))
    assert body is not None
    text = str(body.get_content()).replace("\r\n", "\n")
    assert text.startswith("Bonjour Ann,\n\nquelqu’un, sans doute vous,")
    assert "Hello" not in text and "confirm" not in text.replace("confirmer", "")


def test_the_welcome_email_speaks_french(workspace: Path) -> None:
    import datetime as dt

    from newsletter.models import Status, Subscriber
    from newsletter.publish import ArchiveEntry
    from newsletter.welcome import welcome_message

    cfg = set_locale(workspace, "fr")
    now = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)
    reader = Subscriber(7, "ann@example.org", "Lee, Ann", {}, Status.ACTIVE, now, now, now, 0)
    latest = ArchiveEntry(EXAMPLE_SLUG, 1, dt.date(2026, 11, 20), "Trams", "", ())
    data = welcome_message(cfg, reader, latest=latest)
    mail = email.message_from_bytes(data, policy=email.policy.default)
    text_part, html_part = mail.get_body(("plain",)), mail.get_body(("html",))
    assert text_part is not None and html_part is not None
    text = str(text_part.get_content()).replace("\r\n", "\n")
    markup = str(html_part.get_content())
    shown = {"subject": str(mail["Subject"]), "text": text, "html": render.visible_text(markup)}
    assert shown["subject"] == "Bienvenue dans The Harbour Ledger"
    assert text.startswith("Bonjour Ann,\n\nbienvenue dans The Harbour Ledger")
    assert "Trams (20 novembre 2026)" in text and "Trams (20 novembre 2026)" in shown["html"]
    assert "Se désabonner" in shown["html"] and 'lang="fr"' in markup
    # No English word of the welcome's templates or of its subject is left.
    tagline = cfg.newsletter.tagline  # the workspace's own words, in English here
    english = set()
    for msgid, places in theme_catalogs.extract().items():
        if any(place.startswith(("welcome_email.", "welcome.py")) for place in places):
            english |= {p.strip(" ,.:;") for p in re.split(r"%\(\w+\)[sd]", msgid)}
    for word in {w for w in english if len(w) >= 4 and w not in tagline}:
        for name, seen in shown.items():
            assert word not in seen, (name, word)
    assert len(english) > 8


def test_a_workspace_overrides_a_service_page(workspace: Path, cfg: Config) -> None:
    page = workspace / "templates" / "service" / "message.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        '{% extends "!default/service/base.html" %}{% block body %}'
        "<p>OUR OWN: {{ message }}</p>{% endblock %}",
        encoding="utf-8",
    )
    app = create_app(cfg)
    try:
        answer = app.test_client().get("/no-such-page/x/y").get_data(as_text=True)
    finally:
        server.close_app(app)
    assert "OUR OWN: There is no such page." in answer
    assert (REPO / "templates" / "service" / "message.html").is_file()
