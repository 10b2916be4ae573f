"""The reader's preferences page (`serve`, /p/TOKEN): topics and pause, through real HTTP."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from newsletter import config as config_module
from newsletter.message import MessageTemplate, Recipient
from newsletter.models import Status
from newsletter.server import RunningService, create_app, start_server
from newsletter.sink import start_sink
from newsletter.store import Store
from newsletter.tokens import TokenSigner, address_fingerprint
from tests.support import TEST_SECRET_KEY
from tests.test_server import FORM, ISSUE, Service, write_workspace

pytestmark = pytest.mark.server

PREFERENCES = """
[preferences]
topics = { europe = "News from Europe", harbours = "Harbours & ferries" }
"""


@dataclass
class Reader:
    id: int
    email: str
    path: str  # /p/TOKEN


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    sink = start_sink(tmp_path / "sink")
    root = tmp_path / "ws"
    write_workspace(root, sink.port)
    with (root / "newsletter.toml").open("a", encoding="utf-8") as toml:
        toml.write(PREFERENCES)
    cfg = config_module.load(root, environ={"NEWSLETTER_SECRET_KEY": TEST_SECRET_KEY})
    store = Store.open(cfg.database)
    running: RunningService = start_server(create_app(cfg), "127.0.0.1", 0, threads=4)
    try:
        yield Service(cfg, running, sink, store, TokenSigner(TEST_SECRET_KEY))
    finally:
        running.stop()
        sink.stop()
        store.close()


def template(service: Service) -> MessageTemplate:
    """The message template an issue's send uses, as far as its links go."""
    return MessageTemplate(
        segments=(),
        envelope_from="editor@example.org",
        subject="Tides",
        sender_domain="example.org",
        unsubscribe_url=service.config.unsubscribe.url,
        unsubscribe_mailto="",
        issue_key=ISSUE,
        signer=TokenSigner(TEST_SECRET_KEY),
        preferences_url=service.config.public_urls.preferences,
    )


def reader(service: Service, email: str = "reader@example.org") -> Reader:
    sub = service.store.add_subscriber(email, "Rea Der")
    link = template(service).preferences_link(Recipient(email, subscriber_id=sub.id))
    assert link.startswith("https://example.org/gazette/p/")
    return Reader(sub.id, email, "/p/" + link.rsplit("/", 1)[1])


def checked(page: str) -> set[str]:
    """The values of the checked boxes on a page."""
    return set(re.findall(r'value="([^"]+)" checked>', page))


def test_get_shows_topics_and_pause_and_changes_nothing(service: Service) -> None:
    one = reader(service)
    service.store.change_tags(one.id, add=["europe", "vip"])
    for method in ("GET", "HEAD", "GET"):
        status, headers, text = service.request(method, one.path)
        assert status == 200
        assert headers["Cache-Control"] == "no-store"
        assert headers["Referrer-Policy"] == "no-referrer"
    assert "reader@example.org" in text
    assert "News from Europe" in text and html.escape("Harbours & ferries") in text
    assert "vip" not in text  # not a topic the editor offers
    assert checked(text) == {"europe"}
    assert "Pause all issues" in text
    assert service.store.tags_of(one.id) == ["europe", "vip"]
    assert len(service.store.subscriber_events(one.id)) == 2  # added, tag


def test_post_saves_topics_and_pause_and_records_them(service: Service) -> None:
    one = reader(service)
    service.store.change_tags(one.id, add=["europe", "vip"])
    origin = {"Origin": service.http.url}
    body = b"topic=harbours&topic=vip&topic=paused&pause=yes&form=preferences"
    status, _, text = service.request("POST", one.path, body, {**FORM, **origin})
    assert status == 200, text
    assert "Issues are paused" in text
    assert checked(text) == {"harbours", "yes"}
    # Only the offered topics change; "vip" is the editor's, and "paused" is the pause box.
    assert service.store.tags_of(one.id) == ["harbours", "paused", "vip"]
    event = service.store.subscriber_events(one.id)[-1]
    assert (event.reason, event.detail) == (
        "preferences",
        f"preferences page, issue {ISSUE}: +harbours +paused -europe",
    )
    assert event.new_status == Status.ACTIVE
    # Resuming: the pause box unticked.
    status, _, text = service.request("POST", one.path, {"topic": "harbours"}, origin)
    assert status == 200 and "Your choices are saved." in text
    assert service.store.tags_of(one.id) == ["harbours", "vip"]
    # The same choices again change nothing and add no history.
    events = len(service.store.subscriber_events(one.id))
    service.request("POST", one.path, {"topic": "harbours"}, origin)
    assert len(service.store.subscriber_events(one.id)) == events


def test_cross_site_posts_are_refused(service: Service) -> None:
    one = reader(service)
    for headers in (
        {"Origin": "https://evil.example.com"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Referer": "https://evil.example.com/form"},
    ):
        status, _, _ = service.request("POST", one.path, {"pause": "yes"}, headers)
        assert status == 403
    assert service.store.tags_of(one.id) == []


def test_forged_and_altered_links_get_the_neutral_400(service: Service) -> None:
    one = reader(service)
    other = reader(service, "other@example.org")
    token = one.path.rsplit("/", 1)[1]
    payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    subject = f"{one.id}:{address_fingerprint(one.email)}"
    forged = [
        f"{payload}.{flipped}",
        TokenSigner("another-key-of-enough-length").make("preferences", subject, ISSUE),
        service.signer.make("unsubscribe", subject, ISSUE),  # right key, wrong purpose
        "preview",
    ]
    for bad in forged:
        for method in ("GET", "POST"):
            status, _, text = service.request(
                method, f"/p/{bad}", {"pause": "yes"}, {"Origin": service.http.url}
            )
            assert status == 400, bad
            assert "This link does not work" in text
            assert "reader@example.org" not in text and "other@example.org" not in text
    # Genuine links that name nobody on the list now (a proof copy's; an id that belongs to
    # someone else): a page that says so, with no form and no address; nothing changes.
    for nobody in (
        service.signer.make("preferences", f"{other.id}:{address_fingerprint(one.email)}", ISSUE),
        service.signer.make("preferences", "test:proof@example.org:abc", ISSUE),
    ):
        for method in ("GET", "POST"):
            status, _, text = service.request(
                method, f"/p/{nobody}", {"pause": "yes"}, {"Origin": service.http.url}
            )
            assert status == 200 and "names nobody on the list" in text and "<form" not in text
            assert "other@example.org" not in text
    # A preferences token does not unsubscribe.
    status, _, _ = service.request("POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM)
    assert status == 400
    assert service.store.tags_of(one.id) == [] and service.store.tags_of(other.id) == []
    assert service.store.get_subscriber(one.id).status == Status.ACTIVE  # type: ignore[union-attr]


def test_the_page_links_to_unsubscribe_and_a_former_reader_gets_no_form(
    service: Service,
) -> None:
    one = reader(service)
    _, _, text = service.request("GET", one.path)
    found = re.search(r'<a href="\.\./(u/[^"]+)">unsubscribe</a>', text)
    assert found is not None
    status, _, done = service.request("POST", "/" + found.group(1), {"confirm": "yes"})
    assert status == 200 and "You are unsubscribed" in done
    event = service.store.subscriber_events(one.id)[-1]
    assert (event.new_status, event.detail) == (Status.UNSUBSCRIBED, f"issue {ISSUE}")
    status, _, text = service.request("GET", one.path)
    assert status == 200 and "not subscribed" in text and "<form" not in text
    status, _, _ = service.request("POST", one.path, {"pause": "yes"}, {"Origin": service.http.url})
    assert status == 200 and service.store.tags_of(one.id) == []
