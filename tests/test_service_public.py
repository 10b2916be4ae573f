"""The subscription service facing the public: Host headers, link scanners, subscription
bombing, a stalled mail server, slow clients and timing.

Real parts throughout: waitress on 127.0.0.1, a real SQLite file, and the
fault-injecting aiosmtpd server of tests/smtp_server.py (it can accept and stall).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import http.client
import re
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from limits import RateLimitItemPerHour
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from newsletter import config as config_module
from newsletter.models import Status
from newsletter.ratelimit import (
    DatabaseStorage,
    canonical_mailbox,
    client_address,
    trusted_networks,
)
from newsletter.server import (
    RunningService,
    create_app,
    mail_queue,
    start_server,
)
from newsletter.store import Store
from tests.support.smtp_server import ALWAYS, Faults, ServerFactory, SmtpTestServer

ROOT = Path(__file__).parents[1]
KEY = "test-secret-key-0123456789abcdef"
pytestmark = pytest.mark.server  # every test runs the service on 127.0.0.1
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LINK_RE = re.compile(r"https?://\S+/confirm/\S+")


def write_config(
    root: Path,
    smtp_port: int,
    *,
    server: str = "",
    smtp_timeout: float = 5.0,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "templates").mkdir(exist_ok=True)
    (root / "newsletter.toml").write_text(
        '[newsletter]\nname = "The Test Gazette"\n'
        'sender = "The Test Gazette <editor@example.org>"\n'
        'base_url = "https://example.org/gazette"\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nsecurity = "none"\n'
        f"timeout = {smtp_timeout}\n[server]\n{server}",
        encoding="utf-8",
    )


@dataclass
class Site:
    """A running service, its database and the mail server it sends to."""

    config: config_module.Config
    http: RunningService
    store: Store
    mail: SmtpTestServer

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, str] | bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 10,
    ) -> tuple[int, http.client.HTTPMessage, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=timeout)
        data = urlencode(body).encode() if isinstance(body, dict) else body
        sent = dict(headers or {})
        if isinstance(body, dict):
            sent.update(FORM)
        try:
            # A body over the limit is answered (413) before it is all sent.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        return response.status, response.headers, text

    def ask(self, address: str, *, timeout: float = 10, **headers: str) -> tuple[int, str]:
        """POST the subscribe form (without waiting for its email)."""
        sent = {"Origin": self.http.url, **headers}
        status, _, text = self.request(
            "POST", "/subscribe", {"email": address}, sent, timeout=timeout
        )
        return status, text

    def settle(self, timeout: float = 15) -> None:
        assert mail_queue(self.http.app).wait_idle(timeout)

    def messages(self) -> list[EmailMessage]:
        found = []
        for received in self.mail.messages:
            message = email.message_from_bytes(received.data, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            found.append(message)
        return found

    def unsubscribe_token(self, subscriber_id: int) -> str:
        from newsletter.tokens import TokenSigner

        return TokenSigner(KEY).make("unsubscribe", str(subscriber_id), "001-x")

    def recipients(self) -> list[str]:
        return [r for m in self.mail.messages for r in m.recipients]


@contextlib.contextmanager
def site(
    tmp_path: Path,
    mail: SmtpTestServer,
    *,
    server: str = "",
    smtp_timeout: float = 5.0,
    threads: int = 4,
    **app_options: Any,
) -> Iterator[Site]:
    root = tmp_path / "ws"
    write_config(root, mail.port, server=server, smtp_timeout=smtp_timeout)
    cfg = config_module.load(root, environ={"NEWSLETTER_SECRET_KEY": KEY})
    store = Store.open(cfg.database)
    running = start_server(create_app(cfg, **app_options), "127.0.0.1", 0, threads=threads)
    try:
        yield Site(cfg, running, store, mail)
    finally:
        running.stop()
        store.close()


def link_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    found = LINK_RE.search(body.get_content())
    assert found is not None
    return found.group(0)


# --- links and redirects never come from the Host header ------------------------------------


def test_links_start_with_the_public_address_whatever_the_host_header(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    mail = smtp_server()
    with site(tmp_path, mail) as s:
        # An attacker asks for the victim, through a Host header of their own.
        status, text = s.ask(
            "victim@example.org", Host="attacker.example", Origin="https://example.org"
        )
        assert status == 200 and "Check your inbox" in text
        s.settle()
        (message,) = s.messages()
        assert link_of(message).startswith("https://example.org/gazette/confirm/")
        assert "attacker.example" not in message.as_string()


def test_redirects_are_relative_whatever_the_host_header(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server()) as s:
        for path in ("/", "//subscribe", "//healthz", "/archive//", "//archive"):
            status, headers, _ = s.request("GET", path, headers={"Host": "evil.example"})
            location = headers.get("Location")
            if location is not None:
                parts = urlsplit(location)
                assert not parts.scheme and not parts.netloc, (path, location)
                assert "evil.example" not in location
        status, headers, _ = s.request("GET", "/archive", headers={"Host": "evil.example"})
        assert status in (301, 302, 308) and not urlsplit(headers["Location"]).netloc


# --- confirming takes a click ---------------------------------------------------------------


def test_fetching_the_confirmation_link_confirms_nobody(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server()) as s:
        s.ask("scanned@example.org")
        s.settle()
        path = urlsplit(link_of(s.messages()[0])).path.removeprefix("/gazette")
        for method in ("GET", "HEAD", "GET"):  # what link scanners do
            status, headers, text = s.request(method, path)
            assert status == 200 and headers["Cache-Control"] == "no-store"
            pending = s.store.get_subscriber("scanned@example.org")
            assert pending is not None and pending.status == Status.PENDING
        assert '<form method="post">' in text and "<button" in text
        assert "scanned@example.org" not in text
        # The button posts back to the same address; twice is harmless.
        for _ in range(2):
            status, _, text = s.request("POST", path, {"confirm": "yes"})
            assert status == 200 and "You are subscribed" in text
        active = s.store.get_subscriber("scanned@example.org")
        assert active is not None and active.status == Status.ACTIVE
        assert [e.reason for e in s.store.subscriber_events(active.id)] == [
            "subscribe-form",
            "confirmed",
        ]


# --- subscription bombing -------------------------------------------------------------------


def test_one_client_gets_ten_requests_an_hour_then_429(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server()) as s:
        s.store.add_subscriber("known@example.org")
        answers = [s.ask(f"bomb{i}@example.org")[0] for i in range(10)]
        assert answers == [200] * 10
        # Over the limit: the same 429 for any address, and X-Forwarded-For from an
        # untrusted peer changes nothing.
        refused = []
        for address, forwarded in (
            ("bomb10@example.org", ""),
            ("known@example.org", "198.51.100.1"),
            ("bomb11@example.org", "198.51.100.2"),
        ):
            status, headers, text = s.request(
                "POST",
                "/subscribe",
                {"email": address},
                {"Origin": s.http.url, "X-Forwarded-For": forwarded},
            )
            assert status == 429 and 0 < int(headers["Retry-After"]) <= 3600
            assert address not in text
            refused.append(text)
        assert len(set(refused)) == 1
        s.settle()
        assert len(s.mail.messages) == 10
        assert s.store.get_subscriber("bomb10@example.org") is None


def test_forwarded_for_counts_only_from_a_trusted_proxy(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    server = 'trusted_proxies = ["127.0.0.1"]\nclient_limit_per_hour = 2\n'
    with site(tmp_path, smtp_server(), server=server) as s:

        def ask(address: str, forwarded: str) -> int:
            return s.ask(address, **{"X-Forwarded-For": forwarded})[0]

        assert ask("a1@example.org", "198.51.100.7") == 200
        assert ask("a2@example.org", "198.51.100.7") == 200
        assert ask("a3@example.org", "198.51.100.7") == 429
        # Prepending a made-up hop does not help: the proxy appended the real one.
        assert ask("a4@example.org", "203.0.113.50, 198.51.100.7") == 429
        # Another client behind the same proxy has its own budget.
        assert ask("b1@example.org", "198.51.100.8") == 200


def test_client_address_takes_the_right_most_untrusted_hop() -> None:
    proxies = trusted_networks(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert client_address("127.0.0.1", "", proxies) == "127.0.0.1"
    assert client_address("192.0.2.9", "198.51.100.1", proxies) == "192.0.2.9"
    assert client_address("127.0.0.1", "198.51.100.1", proxies) == "198.51.100.1"
    assert client_address("127.0.0.1", "1.2.3.4, 198.51.100.1, 10.1.2.3", proxies) == (
        "198.51.100.1"
    )
    assert client_address("::1", "[2001:db8:1:2:3:4:5:6]:443", proxies) == "2001:db8:1:2::/64"
    assert client_address("2001:db8::1", "", proxies) == client_address(
        "2001:db8::ffff", "", proxies
    )
    assert client_address("::ffff:192.0.2.4", "", proxies) == "192.0.2.4"
    assert client_address("127.0.0.1", "10.0.0.1, 10.0.0.2", proxies) == "10.0.0.1"


def test_canonical_mailbox() -> None:
    assert canonical_mailbox("Jane.Doe+news@Example.org") == "jane.doe@example.org"
    assert canonical_mailbox("j.a.n.e.doe+x@googlemail.com") == "janedoe@gmail.com"
    assert canonical_mailbox("JaneDoe@gmail.com") == "janedoe@gmail.com"
    assert canonical_mailbox("+only@example.org") == "@example.org"


def test_tag_variants_of_one_mailbox_get_three_confirmations(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server(), server="client_limit_per_hour = 0\n") as s:
        for i in range(50):
            assert s.ask(f"Jane+{i}@example.org")[0] == 200
        assert s.ask("jane.other@example.org")[0] == 200  # another mailbox
        s.settle()
        sent = s.recipients()
        assert len(sent) == 4 and "jane.other@example.org" in sent
        # Those refused hold no reservation: they can ask again next hour.
        assert s.store.confirmation_sent_at("Jane+49@example.org") is None


def test_the_total_limit_holds_whoever_asks(tmp_path: Path, smtp_server: ServerFactory) -> None:
    server = "client_limit_per_hour = 0\ntotal_limit_per_hour = 5\n"
    with site(tmp_path, smtp_server(), server=server) as s:
        answers = {s.ask(f"many{i}@example.org")[1].replace(f"many{i}@", "X@") for i in range(8)}
        assert len(answers) == 1 and "Check your inbox" in answers.pop()
        s.settle()
        assert len(s.mail.messages) == 5


def test_limits_are_shared_by_every_serve_on_the_database(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server(), server="client_limit_per_hour = 4\n") as s:
        other = start_server(create_app(s.config), "127.0.0.1", 0)
        try:
            first = [s.ask(f"x{i}@example.org")[0] for i in range(3)]
            conn = http.client.HTTPConnection("127.0.0.1", other.port, timeout=10)
            second = []
            for i in range(3):
                body = urlencode({"email": f"y{i}@example.org"})
                conn.request("POST", "/subscribe", body, {**FORM, "Origin": other.url})
                response = conn.getresponse()
                response.read()
                second.append(response.status)
            conn.close()
        finally:
            other.stop()
        assert first == [200, 200, 200] and second == [200, 429, 429]


def test_sqlite_storage_counts_atomically_across_connections(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    one = DatabaseStorage(db)
    two = storage_from_string(f"newsletter-db:{db}")
    assert isinstance(two, DatabaseStorage) and two.check()

    def hammer(storage: DatabaseStorage) -> None:
        for _ in range(100):
            storage.incr("k", 3600)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in (one, two) * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert one.get("k") == two.get("k") == 800
    assert 3590 < one.get_expiry("k") - datetime.now(UTC).timestamp() <= 3600
    # A window that ended starts again at the next hit.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE rate_limits SET expires_at = expires_at - 7200")
    assert one.get("k") == 0 and one.incr("k", 60) == 1
    assert one.expire() == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE rate_limits SET expires_at = 0")
    assert one.expire() == 1
    limiter = FixedWindowRateLimiter(one)
    item = RateLimitItemPerHour(3, namespace="t")
    assert [limiter.hit(item, "a") for _ in range(4)] == [True, True, True, False]
    assert limiter.hit(item, "b")
    one.clear(item.key_for("a"))
    assert limiter.hit(item, "a")
    assert one.reset() == 2
    one.close()
    two.close()


def test_unconfirmed_requests_are_pruned_after_the_ttl(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write_config(root, 2525, server="confirm_ttl_hours = 48\n")
    cfg = config_module.load(root, environ={"NEWSLETTER_SECRET_KEY": KEY})
    long_ago = datetime.now(UTC) - timedelta(hours=49)
    with Store.open(cfg.database) as store:
        store.request_confirmation("stale@example.org", resend_after=timedelta(0), now=long_ago)
        store.request_confirmation("fresh@example.org", resend_after=timedelta(0))
        # Asked long ago, and again just now: its new link is still good.
        store.request_confirmation("again@example.org", resend_after=timedelta(0), now=long_ago)
        store.request_confirmation("again@example.org", resend_after=timedelta(0))
        # An unsubscribed reader asking to come back keeps their row.
        gone = store.add_subscriber("gone@example.org")
        store.unsubscribe(gone.id, "one-click")
        store.request_confirmation("gone@example.org", resend_after=timedelta(0), now=long_ago)
        store.add_subscriber("imported@example.org", status=Status.PENDING, reason="import")
        store.add_subscriber("active@example.org")
        with sqlite3.connect(cfg.database.path) as conn:
            conn.execute(
                "UPDATE subscribers SET status_changed_at = ? WHERE email = ?",
                (long_ago.isoformat(), "imported@example.org"),
            )
    create_app(cfg)  # serve prunes when it starts, then every few minutes
    with Store.open(cfg.database) as store:
        left = {s.email for s in store.list_subscribers()}
        assert left == {
            "fresh@example.org",
            "again@example.org",
            "gone@example.org",
            "imported@example.org",
            "active@example.org",
        }
        assert store.prune_pending(timedelta(hours=48)) == 0
        assert store.prune_pending(timedelta(0)) == 2  # fresh and again


def test_rate_limit_settings_are_checked(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write_config(root, 2525, server='trusted_proxies = ["10.0.0.0/8", "nonsense"]\n')
    with pytest.raises(config_module.ConfigError) as bad:
        config_module.load(root, environ={})
    assert "'nonsense' is not an IP address or network" in str(bad.value)
    assert str(bad.value).startswith(f"{root / 'newsletter.toml'}:")
    write_config(root, 2525, server="mailbox_limit_per_hour = -1\n")
    with pytest.raises(config_module.ConfigError, match="must not be negative"):
        config_module.load(root, environ={})
    write_config(root, 2525, server='trusted_proxies = ["127.0.0.1", "::1"]\n')
    cfg = config_module.load(root, environ={})
    assert cfg.server.trusted_proxies == ("127.0.0.1", "::1")
    assert cfg.server.client_limit_per_hour == 10


# --- the confirmation email goes out in the background --------------------------------------


def test_a_stalled_mail_server_holds_up_no_request(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    # The server accepts connections and then never answers MAIL FROM.
    mail = smtp_server(Faults(stall={"MAIL": ALWAYS}))
    addresses = [f"reader{i}@example.org" for i in range(6)]
    with site(tmp_path, mail, smtp_timeout=3.0, threads=2, mail_threads=2) as s:
        for address in addresses:
            assert s.ask(address, timeout=2)[0] == 200  # at once, not after the stall
        queue = mail_queue(s.http.app)
        assert queue.wait_until(lambda waiting, running: running == 2, 5)
        for _ in range(5):
            status, _, text = s.request("GET", "/healthz", timeout=2)
            assert (status, text) == (200, "ok\n")
        token = s.unsubscribe_token(s.store.add_subscriber("leaving@example.org").id)
        status, _, _ = s.request(
            "POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM, timeout=2
        )
        assert status == 200
        assert queue.pending == 6 and s.mail.messages == []
        mail.faults.stall["MAIL"] = 0  # the server recovers
        s.settle()
        assert sorted(s.recipients()) == addresses


def test_a_full_queue_answers_the_same_and_a_later_ask_sends(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    mail = smtp_server(Faults(stall={"MAIL": ALWAYS}))
    with site(tmp_path, mail, smtp_timeout=3.0, mail_threads=1, mail_queue_size=1) as s:
        queue = mail_queue(s.http.app)
        first = s.ask("one@example.org", timeout=2)
        assert queue.wait_until(lambda waiting, running: running == 1, 5)
        second = s.ask("two@example.org", timeout=2)
        third = s.ask("three@example.org", timeout=2)  # no room: dropped
        assert queue.rejected == 1
        pages = {
            text.replace(a, "X")
            for (_, text), a in zip((first, second, third), ("one@", "two@", "three@"), strict=True)
        }
        assert len(pages) == 1 and first[0] == second[0] == third[0] == 200
        mail.faults.stall["MAIL"] = 0  # the server recovers
        s.settle()
        assert sorted(s.recipients()) == ["one@example.org", "two@example.org"]
        assert s.store.get_subscriber("three@example.org") is None  # nothing half-done
        assert s.ask("three@example.org")[0] == 200  # asking again sends
        s.settle()
        assert s.recipients()[-1] == "three@example.org"


def test_stop_abandons_queued_emails_cleanly(tmp_path: Path, smtp_server: ServerFactory) -> None:
    mail = smtp_server(Faults(stall={"MAIL": ALWAYS}))
    root = tmp_path / "ws"
    write_config(root, mail.port, smtp_timeout=2.0)
    cfg = config_module.load(root, environ={"NEWSLETTER_SECRET_KEY": KEY})
    app = create_app(cfg, mail_threads=1)
    running = start_server(app, "127.0.0.1", 0)
    queue = mail_queue(app)
    for i in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=2)
        body = urlencode({"email": f"q{i}@example.org"})
        conn.request("POST", "/subscribe", body, {**FORM, "Origin": running.url})
        assert conn.getresponse().status == 200
        conn.close()
    assert queue.wait_until(lambda waiting, running: running == 1 and waiting == 2, 5)
    running.stop(timeout=0.2)
    assert queue.abandoned == 2
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2)
    # The one being sent gives up at its SMTP timeout and releases its reservation.
    assert queue.wait_idle(10)
    with Store.open(cfg.database) as store:
        assert store.confirmation_sent_at("q0@example.org") is None
        assert store.get_subscriber("q1@example.org") is None
        assert store.get_subscriber("q2@example.org") is None
    assert mail.messages == []


# --- slow clients ---------------------------------------------------------------------------


def test_two_hundred_slow_clients_leave_healthz_answering(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server()) as s:
        idle = [socket.create_connection(("127.0.0.1", s.http.port), timeout=5) for _ in range(200)]
        stop = threading.Event()
        trickler = socket.create_connection(("127.0.0.1", s.http.port), timeout=5)

        def trickle() -> None:
            trickler.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while not stop.wait(0.05):  # pacing, one byte at a time, never done
                with contextlib.suppress(OSError):
                    trickler.sendall(b"a")

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            for _ in range(3):
                status, _, text = s.request("GET", "/healthz", timeout=2)
                assert (status, text) == (200, "ok\n")
            assert s.ask("patient@example.org", timeout=2)[0] == 200
        finally:
            stop.set()
            thread.join()
            for sock in [*idle, trickler]:
                sock.close()


def test_oversized_headers_and_bodies_are_refused(
    tmp_path: Path, smtp_server: ServerFactory
) -> None:
    with site(tmp_path, smtp_server()) as s:
        status, _, _ = s.request("GET", "/healthz", headers={"X-Big": "a" * 16_000})
        assert status == 431
        status, _, _ = s.request("GET", "/healthz", headers={"X-Fine": "a" * 4_000})
        assert status == 200
        status, _, _ = s.request(
            "POST", "/subscribe", b"email=" + b"a" * 100_000, {**FORM, "Origin": s.http.url}
        )
        assert status == 413


# --- the same work whatever the address's status ------------------------------------------


def test_subscribe_runs_the_same_queries_and_answers_the_same_for_any_address(
    tmp_path: Path, smtp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)

        def trace(sql: str) -> None:
            if threading.current_thread().name.startswith("waitress"):
                statements.append(re.sub(r"'[^']*'|\b\d+(\.\d+)?\b", "?", sql))

        conn.set_trace_callback(trace)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    with site(tmp_path, smtp_server(), threads=1) as s:
        s.store.add_subscriber("active@example.org")
        gone = s.store.add_subscriber("gone@example.org")
        s.store.unsubscribe(gone.id, "one-click")
        s.store.request_confirmation("pending@example.org", resend_after=timedelta(0))
        s.ask("warm-up@example.org")  # the first request opens the connections
        s.settle()
        seen = {}
        for state in ("active", "gone", "pending", "unknown"):
            statements.clear()
            status, headers, text = s.request(
                "POST", "/subscribe", {"email": f"{state}@example.org"}, {"Origin": s.http.url}
            )
            answer = (
                status,
                tuple(
                    sorted(
                        (k, v) for k, v in headers.items() if k not in ("Date", "Content-Length")
                    )
                ),
                text.replace(f"{state}@", "X@"),
            )
            seen[state] = (answer, tuple(statements))
            s.settle()
        answers = {answer for answer, _ in seen.values()}
        queries = {queries for _, queries in seen.values()}
        assert len(answers) == 1 and len(queries) == 1, seen
        assert not any("subscribers" in q for q in queries.pop())
