"""The audience end to end: three segments over 1,000 subscribers, each `send --segment`
reaching exactly its readers through a real SMTP server; a reader who pauses on the
preferences page (the link in their own copy, posted to a running `serve`) gets nothing
from the next send."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import http.client
import re
import shutil
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from click.testing import CliRunner, Result

from newsletter import config
from newsletter.cli import main
from newsletter.server import RunningService, create_app, start_server
from newsletter.store import Store
from tests.support import EXAMPLE_SLUG, TEST_SECRET_KEY, copy_example, load_config
from tests.support.smtp_server import Received, ServerFactory, SmtpTestServer

pytestmark = pytest.mark.server

READERS = 1_000
CITIES = ("Lisbon", "Porto", "lisbon", "Oslo", "")
AUDIENCE = """
[segments]
europe = "tag:europe and not tag:harbours"
lisbon = 'field:city = "Lisbon"'
newcomers = "joined >= 2026-01-01 or tag:vip"

[preferences]
topics = { europe = "News from Europe", harbours = "Harbours and ferries" }
"""


def reader(i: int) -> dict[str, object]:
    """Subscriber i of the generated list, as the test expects to find them."""
    status = "unsubscribed" if i % 20 == 0 else "bounced" if i % 37 == 0 else "active"
    tags = {tag for tag, every in (("europe", 3), ("harbours", 5)) if i % every == 0}
    if i % 50 == 7:
        tags.add("vip")
    return {
        "email": f"reader{i:04d}@{('example.org', 'example.com', 'example.net')[i % 3]}",
        "status": status,
        "tags": tags,
        "city": CITIES[(i // 2) % len(CITIES)],
        "joined": dt.date(2025, 1, 1) + dt.timedelta(days=i % 500),
    }


PEOPLE = [reader(i) for i in range(READERS)]


def expected(segment: str) -> set[str]:
    """Who a send to ``segment`` must reach, worked out here, not by the tool."""

    def wanted(p: dict[str, object]) -> bool:
        tags = p["tags"]
        assert isinstance(tags, set)
        if segment == "europe":
            return "europe" in tags and "harbours" not in tags
        if segment == "lisbon":
            return str(p["city"]).lower() == "lisbon"
        joined = p["joined"]
        assert isinstance(joined, dt.date)
        return joined >= dt.date(2026, 1, 1) or "vip" in tags

    return {str(p["email"]) for p in PEOPLE if p["status"] == "active" and wanted(p)}


class Site:
    def __init__(self, root: Path, server: SmtpTestServer) -> None:
        self.server = server
        self.ws = copy_example(root / "ws", smtp={"port": server.port, "timeout": 5.0})
        with (self.ws / config.CONFIG_NAME).open("a", encoding="utf-8") as toml:
            toml.write(AUDIENCE)
        self.db = root / "state" / "newsletter.db"
        self.db.parent.mkdir()
        for number in (2, 3, 4):  # more issues: each send fixes its own recipients
            folder = self.ws / "issues" / f"{number:03d}-issue-{number}"
            shutil.copytree(self.ws / "issues" / EXAMPLE_SLUG, folder)
            issue_md = folder / "issue.md"
            text = issue_md.read_text(encoding="utf-8").replace(
                "number: 1\n", f"number: {number}\n"
            )
            issue_md.write_text(text, encoding="utf-8")

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["-C", str(self.ws), "--db", str(self.db), *args])

    def send(self, issue: int, *args: str) -> list[Received]:
        """Send an issue; the messages the server received for it."""
        before = len(self.server.messages)
        result = self.run("send", str(issue), "--yes", *args)
        assert result.exit_code == 0, result.output
        return self.server.messages[before:]


@pytest.fixture
def site(
    tmp_path: Path, smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Site]:
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    for name in (config.ENV_SMTP_PASSWORD, config.ENV_DB, config.ENV_DKIM_KEY_FILE):
        monkeypatch.delenv(name, raising=False)
    yield Site(tmp_path, smtp_server())


def import_list(site: Site, folder: Path) -> None:
    lines = ["email,status,tags,created_at,city"]
    for p in PEOPLE:
        tags = p["tags"]
        assert isinstance(tags, set)
        lines.append(
            f"{p['email']},{p['status']},{';'.join(sorted(tags))},{p['joined']},{p['city']}"
        )
    csv_file = folder / "list.csv"
    csv_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = site.run("subscribers", "import", str(csv_file))
    assert result.exit_code == 0, result.output
    assert f"{READERS} added" in result.stdout


def recipients(messages: list[Received]) -> list[str]:
    return [rcpt for message in messages for rcpt in message.recipients]


def preferences_path(message: Received) -> str:
    """The preferences link in the reader's own copy, as a path on the service."""
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    text = parsed.get_body(("plain",))
    assert text is not None
    found = re.search(r"Your preferences \(topics, pause\):\s+(https://\S+)", text.get_content())
    assert found is not None
    link = found.group(1)
    assert link.startswith("https://example.org/ledger/p/")
    return urlsplit(link).path  # the service answers under the public prefix too


def post(service: RunningService, path: str, form: dict[str, str]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.request(
        "POST",
        path,
        body=urlencode(form),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": "https://example.org",
        },
    )
    response = conn.getresponse()
    text = response.read().decode("utf-8")
    conn.close()
    return response.status, text


def test_three_segments_each_reach_exactly_their_readers_and_a_pause_is_honoured(
    site: Site, tmp_path: Path
) -> None:
    import_list(site, tmp_path)
    segments = {"europe": 2, "lisbon": 3, "newcomers": 4}
    sizes = {name: len(expected(name)) for name in segments}
    assert all(40 < size < 400 for size in sizes.values()), sizes  # real, distinct segments
    copies: dict[str, list[Received]] = {}
    for name, issue in segments.items():
        dry = site.run("send", str(issue), "--segment", name, "--dry-run")
        assert f"built {sizes[name]} messages" in dry.stdout, dry.output
        copies[name] = site.send(issue, "--segment", name)
        got = recipients(copies[name])
        assert len(got) == len(set(got))  # nobody twice
        assert set(got) == expected(name), name
        status = site.run("status", str(issue))
        assert f"{sizes[name]} recipients in segment {name}" in status.stdout

    # A reader of the europe segment opens their own preferences link and pauses.
    pauser = copies["europe"][10]
    path = preferences_path(pauser)
    service = start_server(create_app(load_config(site.ws), site.db), "127.0.0.1", 0, threads=2)
    try:
        status, page = post(service, path, {"topic": "europe", "pause": "yes"})
    finally:
        service.stop()
    assert status == 200 and "Issues are paused" in page
    with Store.open(site.db) as store:
        assert "paused" in store.tags_of(pauser.recipients[0])
        event = store.subscriber_events(pauser.recipients[0])[-1]
        assert event.reason == "preferences" and event.detail.endswith(": +paused")

    # The next send to the same segment reaches everyone in it but the reader who paused.
    after = set(recipients(site.send(1, "--segment", "europe")))
    assert after == expected("europe") - {pauser.recipients[0]}
    with Store.open(site.db) as store:
        assert store.ledger_entry(EXAMPLE_SLUG, pauser.recipients[0]) is None
