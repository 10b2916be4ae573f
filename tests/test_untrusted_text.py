"""Text from outside is data, never a template: Jinja syntax in it reaches the reader as typed.

The workspace's own templates run unsandboxed Jinja2 (README: "Templates are code").
That is safe only while nothing a stranger wrote becomes template source: not a fetched
page, not a feed entry, not a CSV cell, not a name typed into the subscribe form.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from newsletter import content, message, render
from newsletter.config import Config
from newsletter.server import confirmation_message
from newsletter.store import Store
from tests.support import TEST_SECRET_KEY, parse_message
from tests.support.importers import make_workspace, run
from tests.support.local_http import HTML, LocalServer, Reply, serve
from tests.support.web_pages import rss_feed

EXPRESSION = "{{ 7*7 }}"
STATEMENT = "{% if true %}ran{% endif %}"
NAME = "{{7*7}}{%raw%}"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


def hostile_page() -> str:
    paragraphs = "".join(
        f"<p>Paragraph {n} says {EXPRESSION} and {STATEMENT} about ferry fares, which went"
        " up again this winter for everyone who crosses the harbour twice a day.</p>"
        for n in range(1, 6)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Fares {EXPRESSION} up</title></head>
<body><div class="content"><h1>Fares {EXPRESSION} up</h1>{paragraphs}</div></body></html>
"""


def assert_literal(text: str) -> None:
    assert EXPRESSION in text and STATEMENT in text
    assert not re.search(r"\b49\b", text) and "ran about" not in text


def test_page_feed_and_csv_values_reach_the_email_literally(
    server: LocalServer, tmp_path: Path
) -> None:
    server.routes["/story"] = Reply(body=hostile_page().encode(), headers=HTML)
    server.routes["/feed.xml"] = Reply(
        body=rss_feed(
            [(f"Fares {STATEMENT}", server.url("/story"), "Fri, 14 Mar 2025 08:30:00 GMT")]
        ),
        headers={"Content-Type": "application/rss+xml"},
    )
    cfg = make_workspace(tmp_path / "ws")
    assert run(cfg, "feed", "add", "harbour", server.url("/feed.xml")).exit_code == 0
    pulled = run(cfg, "feed", "pull")
    assert f"Fares {STATEMENT}" in pulled.stdout
    (item,) = re.findall(r"^  ([0-9a-f]{7,12})  ", pulled.stdout, re.M)
    added = run(cfg, "issue", "add", "1", f"feed:{item}")
    assert added.exit_code == 0, added.output
    issue_md = cfg.issues_dir / "001-first" / "issue.md"
    issue_md.write_text(issue_md.read_text(encoding="utf-8") + "\nThis week: fares.\n")
    issue = content.read_issue(cfg.issues_dir / "001-first")
    (article,) = issue.articles
    assert article.summary == f"About Fares {STATEMENT}."  # filled in from the feed

    csv_file = tmp_path / "list.csv"
    csv_file.write_text(f"email,name\nreader@example.org,{NAME}\n", encoding="utf-8")
    with Store.open(":memory:") as store:
        assert store.import_csv(csv_file).added == 1
        subscriber = store.get_subscriber("reader@example.org")
    assert subscriber is not None and subscriber.name == NAME

    rendered = render.render_issue(issue, cfg)
    cfg = dataclasses.replace(cfg, secrets=cfg.secrets.replace(secret_key=TEST_SECRET_KEY))
    template = message.prepare(rendered, cfg)
    recipient = message.Recipient(email=subscriber.email, name=subscriber.name)
    parsed, text, markup = parse_message(template.personalise(recipient).data)
    for part in (text, markup):
        assert_literal(part)
        assert f"Fares {EXPRESSION} up" in part
    assert f"Hello {NAME}," in markup  # the text part has no greeting
    assert parsed["To"].addresses[0].display_name == NAME


def test_a_name_from_the_subscribe_form_is_not_a_template(cfg: Config) -> None:
    data = confirmation_message(cfg, "new@example.org", f"{NAME} Lee", "https://example.org/c/t")
    _, text, markup = parse_message(data)
    assert text.startswith(f"Hello {NAME},"), text
    assert f"Hello {NAME}," in markup and "49" not in text + markup
