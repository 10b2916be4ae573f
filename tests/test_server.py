"""The subscription web service, through real HTTP requests to waitress on 127.0.0.1.

Confirmation emails go through the configured SMTP transport to a real aiosmtpd
sink; the database is a real SQLite file shared with a "send" running in another
thread. Responses are read with http.client, which never follows redirects.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings

from newsletter import config as config_module
from newsletter.errors import ConfigError
from newsletter.message import MessageTemplate, Recipient
from newsletter.models import DeliveryResult, DeliveryState, Status
from newsletter.server import (
    RunningService,
    confirmation_message,
    create_app,
    mail_queue,
    start_server,
)
from newsletter.sink import RunningSink, start_sink
from newsletter.store import Store
from newsletter.tokens import TokenSigner, address_fingerprint
from tests.support import REPO, TEST_SECRET_KEY
from tests.support.address_headers import ADDRESSES, NAMES, assert_one_recipient

ISSUE = "001-tides-and-timetables"
DRAFT = "002-not-sent-yet"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{16,}")

CONFIG = """\
[newsletter]
name = "The Test Gazette"
tagline = "Small news, read closely."
sender = "The Test Gazette <editor@example.org>"
base_url = "https://example.org/gazette"
postal_address = "1 Example Street, Example Town"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
timeout = 5.0

[unsubscribe]
url = "https://example.org/gazette/u"

[server]
confirm_ttl_hours = 48
resend_interval_minutes = 10
"""

ISSUE_MD = """\
---
number: {number}
date: 2026-03-0{number}
title: {title}
preheader: Two short stories about water and waiting.
articles:
  - 01-harbour-wall.md
---
A short introduction.
"""

ARTICLE = """\
---
title: The Harbour Wall Gets a Second Life
source: Example Times
url: https://example.org/news/harbour-wall
image: ../images/wall.png
image_alt: A long grey harbour wall
---
The old harbour wall will be repaired rather than replaced, the council said.

![The wall at low tide](../images/wall.png)
"""

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
    b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)


def write_workspace(root: Path, smtp_port: int) -> None:
    (root / "templates").mkdir(parents=True)
    (root / "newsletter.toml").write_text(CONFIG.format(smtp_port=smtp_port), encoding="utf-8")
    for number, key, title in ((1, ISSUE, "Tides and Timetables"), (2, DRAFT, "Draft Days")):
        folder = root / "issues" / key
        (folder / "articles").mkdir(parents=True)
        (folder / "images").mkdir()
        (folder / "images" / "wall.png").write_bytes(PNG)
        (folder / "issue.md").write_text(
            ISSUE_MD.format(number=number, title=title), encoding="utf-8"
        )
        (folder / "articles" / "01-harbour-wall.md").write_text(ARTICLE, encoding="utf-8")


@dataclass
class Service:
    """A running service and what the tests look at."""

    config: config_module.Config
    http: RunningService
    sink: RunningSink
    store: Store
    signer: TokenSigner

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, str] | bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=10)
        data = urlencode(body).encode() if isinstance(body, dict) else body
        sent = dict(headers or {})
        if isinstance(body, dict):
            sent.update(FORM)
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        conn.close()
        return response.status, response.headers, text

    def unsubscribe_token(self, subscriber_id: int, issue: str = ISSUE, **kw: int) -> str:
        return self.signer.make("unsubscribe", str(subscriber_id), issue, **kw)

    def subscribe(self, address: str, name: str = "", **headers: str) -> tuple[int, str]:
        """POST the form, then wait until its background job (record, email) is done."""
        origin = {"Origin": self.http.url}
        origin.update(headers)
        status, _, text = self.request(
            "POST", "/subscribe", {"email": address, "name": name}, origin
        )
        self.settle()
        return status, text

    def settle(self) -> None:
        """Wait until the confirmation emails asked for so far are sent (or given up)."""
        assert mail_queue(self.http.app).wait_idle(10)

    def messages(self) -> list[EmailMessage]:
        assert self.sink.maildir is not None
        found = []
        for path in sorted((self.sink.maildir / "new").iterdir()):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            found.append(message)
        return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    sink = start_sink(tmp_path / "sink")
    root = tmp_path / "ws"
    write_workspace(root, sink.port)
    cfg = config_module.load(root, environ={"NEWSLETTER_SECRET_KEY": TEST_SECRET_KEY})
    store = Store.open(cfg.database)
    app = create_app(cfg)
    running = start_server(app, "127.0.0.1", 0, threads=4)
    try:
        yield Service(cfg, running, sink, store, TokenSigner(TEST_SECRET_KEY))
    finally:
        running.stop()
        sink.stop()
        store.close()


def send_issue(store: Store, issue_key: str) -> None:
    """Ledger rows for ``issue_key``: every active subscriber got it."""
    store.snapshot_recipients(issue_key)
    with store.acquire_send_lock(issue_key):
        claimed = store.claim_batch(issue_key, "test", 1000)
        store.record_results(
            DeliveryResult(issue_key, c.subscriber.id, DeliveryState.SENT, "250 ok", f"<{i}@x>")
            for i, c in enumerate(claimed)
        )


# --- unsubscribe --------------------------------------------------------------------------


@pytest.mark.server
def test_one_click_post_unsubscribes_at_once_with_200_and_is_idempotent(service: Service) -> None:
    reader = service.store.add_subscriber("reader@example.org", "Rea Der")
    path = f"/u/{service.unsubscribe_token(reader.id)}"
    status, headers, text = service.request("POST", path, b"List-Unsubscribe=One-Click", FORM)
    assert status == 200
    assert headers.get("Location") is None and headers.get("Set-Cookie") is None
    assert "You are unsubscribed" in text
    assert "reader@example.org" not in text and "Rea Der" not in text
    after = service.store.get_subscriber(reader.id)
    assert after is not None and after.status == Status.UNSUBSCRIBED
    events = service.store.subscriber_events(reader.id)
    assert [(e.new_status, e.reason, e.detail) for e in events[1:]] == [
        (Status.UNSUBSCRIBED, "one-click", f"issue {ISSUE}")
    ]
    again = service.request("POST", path, b"List-Unsubscribe=One-Click", FORM)
    assert again[0] == 200 and "You are unsubscribed" in again[2]
    assert len(service.store.subscriber_events(reader.id)) == len(events)


@pytest.mark.server
def test_one_click_also_accepts_multipart_form_data(service: Service) -> None:
    reader = service.store.add_subscriber("multi@example.org")
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        b"One-Click\r\n--XyZ--\r\n"
    )
    status, _, _ = service.request(
        "POST",
        f"/u/{service.unsubscribe_token(reader.id)}",
        body,
        {"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert status == 200
    assert service.store.subscriber_events(reader.id)[-1].reason == "one-click"


@pytest.mark.server
def test_get_shows_a_button_and_never_unsubscribes(service: Service) -> None:
    reader = service.store.add_subscriber("scanner@example.org")
    path = f"/u/{service.unsubscribe_token(reader.id)}"
    for method in ("GET", "HEAD", "GET"):
        status, headers, text = service.request(method, path)
        assert status == 200
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-store"
    assert '<form method="post">' in text and "<button" in text
    still = service.store.get_subscriber(reader.id)
    assert still is not None and still.status == Status.ACTIVE
    # The page's button posts the form back to the same address.
    status, _, text = service.request("POST", path, {"confirm": "yes"})
    assert status == 200 and "You are unsubscribed" in text
    assert service.store.subscriber_events(reader.id)[-1].reason == "link"


@pytest.mark.server
def test_forged_or_altered_tokens_get_a_neutral_400(service: Service) -> None:
    reader = service.store.add_subscriber("victim@example.org", "Vic Tim")
    good = service.unsubscribe_token(reader.id)
    payload, signature = good.split(".")
    # The first character: the last one of 16 bytes in base64 also carries padding bits.
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    altered_payload = ("A" if payload[0] != "A" else "B") + payload[1:]
    other_id = TokenSigner(TEST_SECRET_KEY).make("unsubscribe", str(reader.id + 1), ISSUE)
    forged = [
        f"{payload}.{flipped}",  # altered signature
        f"{altered_payload}.{signature}",  # altered payload
        other_id.split(".")[0] + "." + signature,  # another subscriber, old signature
        TokenSigner("another-key-of-enough-length").make("unsubscribe", str(reader.id), ISSUE),
        service.signer.make("confirm", str(reader.id), ISSUE),  # right key, wrong purpose
        "not-a-token",
        "preview",
    ]
    pages = set()
    for token in forged:
        for method in ("GET", "POST"):
            status, _, text = service.request(
                method, f"/u/{token}", b"List-Unsubscribe=One-Click", FORM
            )
            assert status == 400, token
            assert "This link does not work" in text
            assert "victim@example.org" not in text and "Vic Tim" not in text
            pages.add(text)
    assert len(pages) == 1  # one neutral page, whatever the token says
    after = service.store.get_subscriber(reader.id)
    assert after is not None and after.status == Status.ACTIVE


@pytest.mark.server
def test_a_token_from_an_old_issue_still_works(service: Service) -> None:
    reader = service.store.add_subscriber("loyal@example.org")
    two_years_ago = int(time.time()) - 2 * 365 * 86400
    token = service.unsubscribe_token(reader.id, "000-long-ago", issued_at=two_years_ago)
    status, _, _ = service.request("POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM)
    assert status == 200
    event = service.store.subscriber_events(reader.id)[-1]
    assert (event.new_status, event.detail) == (Status.UNSUBSCRIBED, "issue 000-long-ago")


@pytest.mark.server
def test_the_link_in_an_issue_works(service: Service) -> None:
    """The link message.py puts in every issue lands on this service."""
    reader = service.store.add_subscriber("link@example.org")
    template = MessageTemplate(
        segments=(),
        envelope_from="editor@example.org",
        subject="Tides",
        sender_domain="example.org",
        unsubscribe_url=service.config.unsubscribe.url,
        unsubscribe_mailto="",
        issue_key=ISSUE,
        signer=TokenSigner(TEST_SECRET_KEY),
    )
    link = template.unsubscribe_link(Recipient("link@example.org", subscriber_id=reader.id))
    assert link.startswith("https://example.org/gazette/u/")
    path = "/u/" + link.rsplit("/", 1)[1]
    status, _, _ = service.request("POST", path, b"List-Unsubscribe=One-Click", FORM)
    assert status == 200
    after = service.store.get_subscriber(reader.id)
    assert after is not None and after.status == Status.UNSUBSCRIBED


# --- subscribe and confirm ----------------------------------------------------------------


def confirmation_link(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    found = re.search(r"https?://\S+/confirm/\S+", body.get_content())
    assert found is not None
    return found.group(0)


@pytest.mark.server
def test_subscribe_sends_a_confirmation_and_the_link_makes_them_active(
    service: Service,
) -> None:
    status, _, form = service.request("GET", "/subscribe")
    assert status == 200 and 'name="email"' in form and 'method="post"' in form
    status, text = service.subscribe("new.reader@example.org", "Nia Reader")
    assert status == 200 and "Check your inbox" in text
    subscriber = service.store.get_subscriber("new.reader@example.org")
    assert subscriber is not None and subscriber.status == Status.PENDING
    assert subscriber.name == "Nia Reader"
    assert service.sink.wait_for(1)
    (message,) = service.messages()
    assert message["To"] == "Nia Reader <new.reader@example.org>"
    assert message["From"] == "The Test Gazette <editor@example.org>"
    assert message["Subject"] == "Confirm your subscription to The Test Gazette"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"] and message["Date"]
    link = confirmation_link(message)
    html = message.get_body(("html",))
    assert html is not None and link.replace("&", "&amp;") in html.get_content()
    # The link starts with the public address ([unsubscribe] url without its /u).
    assert link.startswith("https://example.org/gazette/confirm/")
    path = urlsplit(link).path.removeprefix("/gazette")
    status, _, text = service.request("GET", path)
    assert status == 200 and "<button" in text  # a GET only asks
    status, _, text = service.request("POST", path, {"confirm": "yes"})
    assert status == 200 and "You are subscribed" in text
    active = service.store.get_subscriber("new.reader@example.org")
    assert active is not None and active.status == Status.ACTIVE
    events = service.store.subscriber_events(active.id)
    assert [(e.old_status, e.new_status, e.reason) for e in events] == [
        (None, Status.PENDING, "subscribe-form"),
        (Status.PENDING, Status.ACTIVE, "confirmed"),
    ]
    # Clicking it again is harmless.
    again = service.request("POST", path, {"confirm": "yes"})
    assert again[0] == 200 and len(service.store.subscriber_events(active.id)) == 2


@pytest.mark.server
def test_a_name_from_the_form_never_adds_a_recipient(service: Service) -> None:
    """A comma in the name once put the attacker's address into the confirmation's To."""
    name = "Friend, attacker@evil.example, and some more words to make it fold over the line"
    status, _ = service.subscribe("victim@example.org", name)
    assert status == 200
    assert service.sink.wait_for(1)
    assert service.sink.maildir is not None
    (path,) = (service.sink.maildir / "new").iterdir()
    data = path.read_bytes()
    assert_one_recipient(data, "victim@example.org", name)


@given(name=NAMES, address=ADDRESSES)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_every_confirmation_to_header_names_exactly_the_subscriber(
    cfg: config_module.Config, name: str, address: str
) -> None:
    data = confirmation_message(cfg, address, name, "https://example.org/confirm/t")
    assert_one_recipient(data, address, name)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


@pytest.mark.server
def test_an_expired_or_foreign_confirmation_link_does_nothing(service: Service) -> None:
    service.subscribe("late@example.org")
    subscriber = service.store.get_subscriber("late@example.org")
    assert subscriber is not None
    ttl = service.config.server.confirm_ttl_hours * 3600
    stale = service.signer.make(
        "confirm",
        str(subscriber.id),
        address_fingerprint("late@example.org"),
        issued_at=int(time.time()) - ttl - 60,
    )
    wrong_address = service.signer.make(
        "confirm", str(subscriber.id), address_fingerprint("x@example.org")
    )
    for token in (stale, wrong_address, service.unsubscribe_token(subscriber.id)):
        for method in ("GET", "POST"):
            status, _, text = service.request(method, f"/confirm/{token}", {"confirm": "yes"})
            assert status == 400 and "expired or is not valid" in text
            assert "late@example.org" not in text
    after = service.store.get_subscriber(subscriber.id)
    assert after is not None and after.status == Status.PENDING


@pytest.mark.server
def test_subscribing_again_while_pending_resends_within_a_rate_limit(service: Service) -> None:
    for _ in range(3):
        assert service.subscribe("eager@example.org")[0] == 200
    # Each response came after its email was handed over: only the first one sent.
    assert service.sink.count == 1
    sent_at = service.store.confirmation_sent_at("eager@example.org")
    assert sent_at is not None
    # Eleven minutes later (the interval is ten), a new request sends again.
    with sqlite3.connect(service.config.database.path) as conn:
        earlier = (sent_at - timedelta(minutes=11)).isoformat()
        conn.execute("UPDATE confirmations SET sent_at = ?", (earlier,))
    assert service.subscribe("eager@example.org")[0] == 200
    assert service.sink.count == 2
    assert [m["To"] for m in service.messages()] == ["eager@example.org"] * 2
    subscriber = service.store.get_subscriber("eager@example.org")
    assert subscriber is not None and subscriber.status == Status.PENDING


@pytest.mark.server
def test_someone_who_unsubscribed_comes_back_only_through_a_confirmation(
    service: Service,
) -> None:
    reader = service.store.add_subscriber("returning@example.org")
    service.store.unsubscribe(reader.id, "one-click")
    assert service.subscribe("returning@example.org")[0] == 200
    after = service.store.get_subscriber(reader.id)
    assert after is not None and after.status == Status.UNSUBSCRIBED  # not yet
    assert service.sink.wait_for(1)
    path = urlsplit(confirmation_link(service.messages()[0])).path.removeprefix("/gazette")
    assert service.request("POST", path, {"confirm": "yes"})[0] == 200
    back = service.store.get_subscriber(reader.id)
    assert back is not None and back.status == Status.ACTIVE
    # Unsubscribing again: the old confirmation link cannot undo it.
    token = service.unsubscribe_token(reader.id)
    service.request("POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM)
    status, _, _ = service.request("POST", path, {"confirm": "yes"})
    assert status == 400
    final = service.store.get_subscriber(reader.id)
    assert final is not None and final.status == Status.UNSUBSCRIBED


@pytest.mark.server
def test_an_active_subscriber_gets_the_same_answer_and_no_email(service: Service) -> None:
    service.store.add_subscriber("already@example.org")
    status, known = service.subscribe("already@example.org")
    status_new, unknown = service.subscribe("someone.new@example.org")
    assert status == status_new == 200
    assert known.replace("already@example.org", "X") == unknown.replace(
        "someone.new@example.org", "X"
    )
    assert service.sink.wait_for(1)
    assert [m["To"] for m in service.messages()] == ["someone.new@example.org"]


@pytest.mark.server
def test_bad_addresses_cross_site_posts_and_bots_are_turned_away(service: Service) -> None:
    status, text = service.subscribe("not an address")
    assert status == 400 and "does not look like an email address" in text
    assert 'value="not an address"' in text
    status, text = service.subscribe("<script>@example.org")
    assert status == 400 and "<script>@" not in text  # escaped
    status, text = service.subscribe("victim@example.org", Origin="https://evil.example.com")
    assert status == 403
    status, _, _ = service.request(
        "POST",
        "/subscribe",
        {"email": "victim@example.org"},
        {"Sec-Fetch-Site": "cross-site"},
    )
    assert status == 403
    status, _, text = service.request(
        "POST",
        "/subscribe",
        {"email": "bot-target@example.org", "website": "http://spam.example.com"},
        {"Origin": service.http.url},
    )
    assert status == 200 and "Check your inbox" in text
    # The site's own origin from the config is accepted too (behind a proxy).
    status, _ = service.subscribe("proxied@example.org", Origin="https://example.org")
    assert status == 200
    assert service.store.count() == 1 and service.sink.wait_for(1)


@pytest.mark.server
def test_a_mail_server_that_is_down_leaves_no_stale_reservation(
    service: Service, tmp_path: Path
) -> None:
    service.sink.stop()  # nothing listens on the configured SMTP port any more
    status, text = service.subscribe("unlucky@example.org")
    assert status == 200 and "Check your inbox" in text  # the email is sent afterwards
    assert service.store.confirmation_sent_at("unlucky@example.org") is None
    fresh = start_sink(tmp_path / "sink2", port=service.sink.port)
    try:
        assert service.subscribe("unlucky@example.org")[0] == 200
        assert fresh.wait_for(1)
    finally:
        fresh.stop()


# --- archive and health -------------------------------------------------------------------


@pytest.mark.server
def test_archive_lists_sent_issues_and_serves_them_without_personal_data(
    service: Service,
) -> None:
    readers = [
        service.store.add_subscriber(f"reader{i}@example.org", f"Reader Number{i}")
        for i in range(3)
    ]
    status, _, text = service.request("GET", "/")
    assert status == 200 and "No issue has been published yet" in text
    send_issue(service.store, ISSUE)  # sent before publishing existed: it counts as published
    status, _, text = service.request("GET", "/")
    assert status == 200
    assert "Tides and Timetables" in text and f'href="{ISSUE}/"' in text
    assert "Draft Days" not in text  # never sent
    status, headers, _ = service.request("GET", f"/{ISSUE}")
    assert status == 308 and headers["Location"] == f"{ISSUE}/"
    status, headers, page = service.request("GET", f"/{ISSUE}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "The Harbour Wall Gets a Second Life" in page
    assert "%%nl:" not in page and "{{" not in page
    assert TOKEN_RE.search(page) is None  # no working unsubscribe token
    assert "/u/" not in page
    for reader in readers:
        assert reader.email not in page and reader.name not in page
    assert "script-src" not in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # Its image, and nothing else of the folder.
    assert 'src="images/wall.png"' in page
    status, headers, _ = service.request("GET", f"/{ISSUE}/images/wall.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    # Where earlier versions served the archive, old emails' links keep working.
    assert service.request("GET", "/archive")[1]["Location"] == "./"
    assert service.request("GET", "/archive/")[1]["Location"] == "../"
    assert service.request("GET", f"/archive/{ISSUE}/")[0] == 200
    assert service.request("GET", f"/archive/{ISSUE}/images/wall.png")[0] == 200
    for path in (
        f"/{ISSUE}/issue.md",
        f"/{ISSUE}/articles/01-harbour-wall.md",
        f"/{ISSUE}/%2e%2e/%2e%2e/newsletter.toml",
        f"/{ISSUE}/images/../../../newsletter.toml",
        f"/{DRAFT}/",
        f"/{DRAFT}/images/wall.png",
        "/..%2fnewsletter.toml/",
        f"/archive/{ISSUE}/issue.md",
        f"/archive/{DRAFT}/",
        "/archive/..%2fnewsletter.toml/",
    ):
        assert service.request("GET", path)[0] == 404, path


@pytest.mark.server
def test_archive_page_follows_edits(service: Service) -> None:
    service.store.add_subscriber("reader@example.org")
    send_issue(service.store, ISSUE)
    assert "A short introduction." in service.request("GET", f"/{ISSUE}/")[2]
    issue_md = service.config.issues_dir / ISSUE / "issue.md"
    issue_md.write_text(
        issue_md.read_text().replace("A short introduction.", "A corrected introduction."),
        encoding="utf-8",
    )
    assert "A corrected introduction." in service.request("GET", f"/{ISSUE}/")[2]


@pytest.mark.server
def test_healthz_and_security_headers(service: Service) -> None:
    status, headers, text = service.request("GET", "/healthz")
    assert (status, text) == (200, "ok\n")
    status, headers, text = service.request("GET", "/subscribe")
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers.get("Set-Cookie") is None
    status, headers, text = service.request("GET", "/nothing-here")
    assert status == 404 and "There is no such page" in text
    status, _, _ = service.request("DELETE", "/subscribe")
    assert status == 405


# --- a send running while unsubscribes arrive ---------------------------------------------


@pytest.mark.server
def test_unsubscribes_during_a_send_are_honoured_with_no_lost_update(
    service: Service, tmp_path: Path
) -> None:
    """A sender thread claims and records batches on its own connection while
    one-click POSTs arrive through the server. Nobody is claimed after their
    unsubscribe finished, every unsubscribe sticks once, and nothing fails with
    "database is locked"."""
    csv = tmp_path / "list.csv"
    csv.write_text(
        "email,name\n" + "".join(f"r{i:04d}@example.org,R {i}\n" for i in range(600)),
        encoding="utf-8",
    )
    service.store.import_csv(csv)
    ids = sorted(s.id for s in service.store.list_subscribers())
    leaving = ids[::4][::-1]  # the highest ids first: they are claimed last
    service.store.snapshot_recipients(ISSUE)
    first_unsubscribe = threading.Event()
    claims: list[tuple[int, int, list[int]]] = []  # (start ns, end ns, subscriber ids)
    failures: list[BaseException] = []

    def send() -> None:
        try:
            first_unsubscribe.wait(10)
            with Store.open(service.config.database) as sender, sender.acquire_send_lock(ISSUE):
                while True:
                    start = time.monotonic_ns()
                    batch = sender.claim_batch(ISSUE, "sender", 10)
                    claims.append((start, time.monotonic_ns(), [c.subscriber.id for c in batch]))
                    if not batch:
                        return
                    sender.record_results(
                        DeliveryResult(ISSUE, c.subscriber.id, DeliveryState.SENT, "250 ok")
                        for c in batch
                    )
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def leave(subscriber_id: int) -> tuple[int, int, int]:
        token = service.unsubscribe_token(subscriber_id)
        start = time.monotonic_ns()
        status = service.request("POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM)[0]
        end = time.monotonic_ns()
        first_unsubscribe.set()
        return status, start, end

    sender_thread = threading.Thread(target=send)
    sender_thread.start()
    with ThreadPoolExecutor(4) as pool:
        answers = dict(zip(leaving, pool.map(leave, leaving), strict=True))
    sender_thread.join(60)
    assert not failures, failures
    assert all(status == 200 for status, _, _ in answers.values())
    counts = service.store.ledger_counts(ISSUE)
    assert counts[DeliveryState.QUEUED] == counts[DeliveryState.SENDING] == 0
    assert counts[DeliveryState.SENT] + counts[DeliveryState.CANCELLED] == len(ids)
    assert counts[DeliveryState.CANCELLED] > 0  # the two really overlapped
    claimed_in = {sid: start for start, _, batch in claims for sid in batch}
    for subscriber_id, (_, _, unsubscribed_at) in answers.items():
        entry = service.store.ledger_entry(ISSUE, subscriber_id)
        assert entry is not None
        if entry.state == DeliveryState.SENT:
            # Sent only if its claim began before the unsubscribe was answered.
            assert claimed_in[subscriber_id] < unsubscribed_at
        else:
            assert entry.state == DeliveryState.CANCELLED and subscriber_id not in claimed_in
        events = service.store.subscriber_events(subscriber_id)
        assert [e.reason for e in events] == ["import", "one-click"]
    cancelled = [
        s.id
        for s in service.store.list_subscribers()
        if (e := service.store.ledger_entry(ISSUE, s.id)) and e.state == DeliveryState.CANCELLED
    ]
    assert set(cancelled) <= set(leaving)


# --- the command --------------------------------------------------------------------------


@pytest.mark.server
def test_newsletter_serve_runs_the_service_until_interrupted(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write_workspace(root, 2525)
    env = dict(os.environ, PYTHONPATH=str(REPO), NEWSLETTER_SECRET_KEY=TEST_SECRET_KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "-C", str(root), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"Serving on http://127\.0\.0\.1:(\d+)", line)
        assert match, line + (proc.stderr.read() if proc.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)  # as systemd stops it
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Stopped." in out


@pytest.mark.server
def test_newsletter_serve_without_the_secret_key_says_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write_workspace(root, 2525)
    env = {k: v for k, v in os.environ.items() if k != "NEWSLETTER_SECRET_KEY"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "newsletter", "-C", str(root), "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: environment: NEWSLETTER_SECRET_KEY is not set")
    assert "Traceback" not in result.stderr


def test_the_service_checks_how_its_mail_leaves_when_it_starts(tmp_path: Path) -> None:
    """A login whose password is missing is an error at start, not at the first subscribe."""
    root = tmp_path / "ws"
    write_workspace(root, 2525)
    cfg = config_module.load(root, environ={"NEWSLETTER_SECRET_KEY": TEST_SECRET_KEY})
    cfg = dataclasses.replace(cfg, smtp=dataclasses.replace(cfg.smtp, username="editor"))
    with pytest.raises(ConfigError) as caught:
        create_app(cfg)
    assert "NEWSLETTER_SMTP_PASSWORD" in str(caught.value)


def test_confirmation_dates_are_aware() -> None:
    """The store compares token times with its own: both are timezone-aware UTC."""
    with Store.open(":memory:") as store:
        request = store.request_confirmation("tz@example.org", resend_after=timedelta(minutes=10))
        sent = store.confirmation_sent_at("tz@example.org")
        assert request.send and sent is not None and sent.tzinfo is not None
        assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)


@pytest.mark.server
def test_a_real_send_skips_those_who_unsubscribe_while_it_runs(service: Service) -> None:
    """The send loop (newsletter.delivery) through SMTP to the sink; once it is under way,
    the last twenty readers press one-click: none of them gets the issue.

    The first progress report comes while at most two batches are claimed; a later one
    (progress is reported every 0.1 s) could come after the last rows were sent already.
    """
    from newsletter import content, delivery, render

    readers = [service.store.add_subscriber(f"s{i:03d}@example.org") for i in range(120)]
    leaving = readers[-20:]
    rendered = render.render_issue(
        content.read_issue(service.config.issues_dir / ISSUE), service.config
    )
    answers: list[int] = []

    def progress(state: delivery.Progress) -> None:
        if state.done and not answers:  # mid-run, from the send's own thread
            for reader in leaving:
                token = service.unsubscribe_token(reader.id)
                answers.append(
                    service.request("POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM)[0]
                )

    with Store.open(service.config.database) as sender:
        report = delivery.prepare_send(service.config, rendered, sender).run(
            delivery.SendOptions(connections=2, batch_size=8), progress=progress
        )
    assert answers == [200] * 20
    counts = service.store.ledger_counts(ISSUE)
    assert counts[DeliveryState.SENT] == 100 and counts[DeliveryState.CANCELLED] == 20
    assert report.sent == 100
    received = {m["To"] for m in service.messages()}
    assert len(received) == 100
    assert not received & {r.email for r in leaving}


@pytest.mark.server
def test_a_token_whose_id_now_names_someone_else_changes_nothing(service: Service) -> None:
    """Tokens carry a fingerprint of the address: a reused id cannot unsubscribe a stranger."""
    stranger = service.store.add_subscriber("stranger@example.org")
    fingerprint = address_fingerprint("someone-deleted@example.org")
    token = service.signer.make("unsubscribe", f"{stranger.id}:{fingerprint}", ISSUE)
    status, _, text = service.request("POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM)
    assert status == 200 and "You are unsubscribed" in text
    after = service.store.get_subscriber(stranger.id)
    assert after is not None and after.status == Status.ACTIVE
    own = service.signer.make(
        "unsubscribe", f"{stranger.id}:{address_fingerprint(stranger.email)}", ISSUE
    )
    assert service.request("POST", f"/u/{own}", b"List-Unsubscribe=One-Click", FORM)[0] == 200
    after = service.store.get_subscriber(stranger.id)
    assert after is not None and after.status == Status.UNSUBSCRIBED


# --- consent and suppression (issue 11) ---------------------------------------------------


@pytest.mark.server
def test_the_form_records_consent_and_the_click_completes_it(service: Service) -> None:
    referer = f"{service.http.url}/about/join?email=reader@example.org&t=secret#form"
    assert service.subscribe("page@example.org", Referer=referer)[0] == 200
    assert service.subscribe("plain@example.org")[0] == 200
    assert service.sink.wait_for(2)
    pending = service.store.person("page@example.org")
    assert pending is not None
    (consent,) = pending.consents
    # The page's path only: not the query (it can carry an address or a token), no IP.
    assert (consent.source, consent.origin, consent.confirmed_at) == ("form", "/about/join", None)
    assert abs(consent.recorded_at - datetime.now(UTC)) < timedelta(minutes=1)
    plain = service.store.person("plain@example.org")
    assert plain is not None and [c.origin for c in plain.consents] == ["/subscribe"]
    message = next(m for m in service.messages() if m["To"] == "page@example.org")
    path = urlsplit(confirmation_link(message)).path.removeprefix("/gazette")
    assert service.request("POST", path, {"confirm": "yes"})[0] == 200
    confirmed = service.store.person("page@example.org")
    assert confirmed is not None
    (consent,) = confirmed.consents
    assert consent.confirmed_at is not None and consent.confirmed_at >= consent.recorded_at


@pytest.mark.server
def test_only_the_persons_confirmation_brings_a_removed_address_back(
    service: Service, tmp_path: Path
) -> None:
    reader = service.store.add_subscriber("removed@example.org", "Rae")
    send_issue(service.store, ISSUE)
    service.store.set_status(reader.id, Status.BOUNCED, "bounce-hard", "5.1.1")
    service.store.remove_subscriber(reader.id, force=True)
    old_list = tmp_path / "old.csv"
    old_list.write_text("email,name\nremoved@example.org,Rae\n", encoding="utf-8")
    assert service.store.import_csv(old_list).suppressed == 1
    # Their own request and click lift it.
    assert service.subscribe("removed@example.org")[0] == 200
    assert service.sink.wait_for(1)
    path = urlsplit(confirmation_link(service.messages()[0])).path.removeprefix("/gazette")
    assert service.store.suppression("removed@example.org") is not None  # not before the click
    assert service.request("POST", path, {"confirm": "yes"})[0] == 200
    back = service.store.get_subscriber("removed@example.org")
    assert back is not None and back.status == Status.ACTIVE
    assert service.store.suppression("removed@example.org") is None
