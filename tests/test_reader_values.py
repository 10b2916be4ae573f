"""Per-reader values: the name a reader is greeted by, values templates may only print,
and field names no subscriber has."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import message, render
from newsletter.cli import main
from newsletter.config import Config
from newsletter.errors import RenderError
from newsletter.message import Recipient, first_name_of
from newsletter.store import Store
from tests.support import example_issue, load_config, parse_message, write_template


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        ("Ada Lovelace", {}, "Ada"),
        ("Lovelace, Ada", {}, "Ada"),
        ("Lovelace,  Ada Augusta", {}, "Ada"),
        ("Dr. Ada Lovelace", {}, "Ada"),
        ("Madame Curie", {}, "Curie"),
        ("Prof.", {}, "Prof."),
        ("Cher", {}, "Cher"),
        ("Lovelace,", {}, "Lovelace,"),
        ("  ", {}, ""),
        ("", {}, ""),
        ("Augusta Ada King", {"first_name": "Ada"}, "Ada"),
        ("A. King", {"First Name": "  Ada  "}, "Ada"),
        ("Ada King", {"first_name": "   "}, "Ada"),  # an empty cell: the name decides
        ("", {"Vorname": "Grete"}, "Grete"),
        ("Ada King", {"city": "Port Alder"}, "Ada"),
    ],
)
def test_first_name(name: str, fields: dict[str, str], expected: str) -> None:
    assert first_name_of(name, fields) == expected


def greeting_of(cfg: Config, reader: Recipient) -> tuple[str, str]:
    rendered = render.render_issue(example_issue(cfg), cfg)
    _, text, markup = parse_message(message.prepare(rendered, cfg).personalise(reader).data)
    return text, markup


def test_the_greeting_uses_the_first_name_field_and_the_configured_fallback(
    cfg: Config, workspace: Path
) -> None:
    text, markup = greeting_of(
        cfg, Recipient("ada@example.org", "King, Augusta", {"First_Name": "Ada"}, 1)
    )
    assert "Hello Ada," in markup and "\nHello Ada,\n" in text
    text, markup = greeting_of(cfg, Recipient("someone@example.org", "", {}, 2))
    assert "Hello there," in markup and "\nHello there,\n" in text
    (workspace / "newsletter.toml").write_text(
        (workspace / "newsletter.toml")
        .read_text(encoding="utf-8")
        .replace("[newsletter]\n", '[newsletter]\ngreeting_fallback = "friend"\n'),
        encoding="utf-8",
    )
    text, markup = greeting_of(load_config(workspace), Recipient("x@example.org", "", {}, 3))
    assert "Hello friend," in markup and "\nHello friend,\n" in text


MISUSES = [
    (
        '{% if recipient.field("plan") == "paid" %}Thanks!{% else %}Go paid.{% endif %}',
        'recipient.field("plan") is compared with ==',
    ),
    (
        "{% if recipient.name %}Hi {{ recipient.name }}{% endif %}",
        "recipient.name is tested with if",
    ),
    ("{{ recipient.first_name | upper }}", "recipient.first_name is changed with | upper"),
    ("{{ recipient.email | length }}", "recipient.email is changed with | length"),
    ('{{ recipient.name or "friend" }}', "recipient.name is tested with if"),
    (
        '{% if "@example.org" in recipient.email %}x{% endif %}',
        "recipient.email is searched with in",
    ),
    ("{{ recipient.name[:3] }}", "recipient.name is indexed or sliced"),
    (
        '{{ recipient.field("city") | replace("a", "b") }}',
        'recipient.field("city") is changed with | replace',
    ),
]


@pytest.mark.parametrize(("line", "message_start"), MISUSES)
def test_a_template_that_tests_a_reader_value_is_refused_at_its_line(
    cfg: Config, line: str, message_start: str
) -> None:
    path = write_template(cfg, "email.txt", f"{{{{ newsletter.name }}}}\n\n{line}\n")
    with pytest.raises(RenderError) as caught:
        render.render_issue(example_issue(cfg), cfg)
    text = str(caught.value)
    assert text.startswith(f"{path}:3: {message_start}: the email is rendered once"), text
    assert "\n" not in text


def test_printing_reader_values_still_works(cfg: Config) -> None:
    write_template(
        cfg,
        "email.txt",
        '{{ "Dear " ~ recipient.name }} / {{ recipient.email | e }} / '
        '{{ recipient.field("city") }} / {{ recipient.name | default("x") }}\n',
    )
    rendered = render.render_issue(example_issue(cfg), cfg)
    reader = Recipient("ann@example.org", "Ann Lee", {"city": "Port Alder"}, 1)
    text, _ = parse_message(message.prepare(rendered, cfg).personalise(reader).data)[1:]
    assert text == "Dear Ann Lee / ann@example.org / Port Alder / Ann Lee\n"


def test_a_field_no_subscriber_has_is_a_warning_in_build_check_and_dry_run(
    runner: CliRunner, workspace: Path, cfg: Config
) -> None:
    write_template(
        cfg,
        "email.txt",
        '{% include "!default/email.txt" %}\nCity: {{ recipient.field("citty") }}'
        ' / {{ recipient.field("city") }}\n',
    )
    with Store.open(cfg.database) as store:
        store.add_subscriber("ann@example.org", "Ann", fields={"City": "Port Alder"})
    warning = 'recipient.field("citty"), which no subscriber has'
    build = runner.invoke(main, ["-C", str(workspace), "build", "1"])
    assert build.exit_code == 0, build.output
    assert warning in build.stderr and 'field("city")' not in build.stderr
    check = runner.invoke(main, ["-C", str(workspace), "check", "1"])
    assert "unknown-field" in check.stdout and warning in check.stdout
    dry = runner.invoke(main, ["-C", str(workspace), "send", "1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert warning in dry.stderr and "Dry run: built 1 messages" in dry.stdout
    assert (
        render.unknown_fields(render.render_issue(example_issue(cfg), cfg), ["CITTY", "city"]) == []
    )
