"""Fetching stays on the public internet: no loopback, private or metadata addresses.

Every test that connects does so only to 127.0.0.1 (the local test server) or to a
closed loopback port; the other ranges are checked without any connection.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from newsletter.config import FetchSettings
from newsletter.errors import ImportSourceError
from newsletter.importers import feeds, network, web
from tests.support.importers import make_workspace, one_error_line, run, snapshot
from tests.support.local_http import HTML, LocalServer, Reply, serve
from tests.support.smtp_server import make_certificate
from tests.support.web_pages import news_article, rss_feed

AGENT = "newsletter-test/1"
REFUSED = "set allow_private = true under [fetch] in newsletter.toml"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    yield from serve()


def settings(*, allow_private: bool = False) -> FetchSettings:
    return FetchSettings(timeout=5.0, max_bytes=100_000, allow_private=allow_private)


# --- which addresses count as public (no connection is made) ------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.100.100.200", "carrier-grade NAT"),  # a cloud's metadata service
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", None),  # reserved
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("192.0.2.10", None),  # documentation
        ("198.18.0.1", None),  # benchmarking
        # What Python before 3.11.10 / 3.12.4 files as global (gh-113171):
        ("192.0.0.192", "cloud metadata"),  # Oracle Cloud's metadata service
        ("192.0.0.8", "reserved"),  # IETF protocol assignments, 192.0.0.0/24
        ("fec0::1", "site-local"),  # deprecated, still routed on some networks
    ],
)
def test_addresses_off_the_public_internet_are_named(address: str, kind: str | None) -> None:
    """(None: refused, under whichever name this Python's ipaddress module files it.)"""
    reason = network.blocked_reason(ipaddress.ip_address(address))
    assert reason is not None and reason == (kind or reason)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert network.blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/admin",
        "http://100.100.100.200/latest/meta-data/",
        "https://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://192.0.0.192/opc/v1/instance/",
        "http://[fec0::1]/",
    ],
)
def test_non_loopback_private_urls_are_refused_when_resolved(url: str) -> None:
    """Checked by resolve() alone, so a failure here never sends traffic off this machine."""
    parts = web.check_url(url)
    with pytest.raises(ImportSourceError) as caught:
        network.resolve(parts, "here", allow_private=False, redirect=False)
    assert str(parts.hostname) in str(caught.value) and REFUSED in str(caught.value)


# --- the guard in a real fetch ----------------------------------------------------------------

LOOPBACK_FORMS = [
    "127.0.0.1",
    "0x7f000001",
    "2130706433",
    "127.1",
    "0.0.0.0",
    "localhost",
    "[::1]",
    "[::ffff:127.0.0.1]",
]


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_loopback_in_any_spelling_is_refused_before_connecting(
    server: LocalServer, host: str
) -> None:
    server.routes["/admin"] = Reply(body=b"<html>secret</html>", headers=HTML)
    with pytest.raises(ImportSourceError) as caught:
        web.fetch(server.url("/admin", host), settings(), AGENT)
    message = str(caught.value)
    assert "\n" not in message and REFUSED in message
    assert "loopback address" in message or "unspecified address" in message
    assert caught.value.where == f"{host.strip('[]')}:{server.port}"
    assert server.requests == []


def test_allow_private_fetches_from_the_local_network(server: LocalServer) -> None:
    server.routes["/page"] = Reply(body=b"<html><body>ok</body></html>", headers=HTML)
    page = web.fetch(server.url("/page"), settings(allow_private=True), AGENT)
    assert page.status == 200 and page.body == b"<html><body>ok</body></html>"


@pytest.fixture
def loopback_counts_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 plays a public web server; the rest of 127/8 and ::1 stay loopback."""
    real = network.blocked_reason
    monkeypatch.setattr(
        network,
        "blocked_reason",
        lambda ip: None if ip == ipaddress.ip_address("127.0.0.1") else real(ip),
    )


@pytest.mark.usefixtures("loopback_counts_as_public")
@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("http://127.0.0.2:{port}/admin", "127.0.0.2"),
        ("http://0x7f000002:{port}/admin", "127.0.0.2"),
        ("http://[::1]:{port}/admin", "::1"),
        ("/hop2", "127.0.0.3"),  # two redirects: the second hop is checked too
    ],
)
def test_a_redirect_to_a_private_address_is_refused_at_that_hop(
    server: LocalServer, target: str, address: str
) -> None:
    server.routes["/start"] = Reply(302, headers={"Location": target.format(port=server.port)})
    server.routes["/hop2"] = Reply(301, headers={"Location": f"http://127.0.0.3:{server.port}/"})
    with pytest.raises(ImportSourceError) as caught:
        web.fetch(server.url("/start"), settings(), AGENT)
    message = str(caught.value)
    assert f"a redirect led to {address}" in message or f"resolves to {address}" in message
    assert "loopback address" in message and REFUSED in message
    assert caught.value.where.endswith(f":{server.port}")


@pytest.mark.usefixtures("loopback_counts_as_public")
def test_the_connection_goes_to_the_address_that_was_checked(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name answers a public address first and a loopback one after.

    The fetch must look the name up once and connect to that answer; a second look-up
    would get 127.0.0.2, where nothing listens.
    """
    real_lookup = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            lookups.append(host)
            host = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return real_lookup(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    server.routes["/page"] = Reply(body=b"<html><body>public</body></html>", headers=HTML)
    page = web.fetch(server.url("/page", "rebind.example"), settings(), AGENT)
    assert page.body == b"<html><body>public</body></html>"
    assert lookups == ["rebind.example"]
    (request,) = server.requests
    assert request.headers["host"] == f"rebind.example:{server.port}"


def test_an_unknown_host_is_one_clear_error() -> None:
    with pytest.raises(ImportSourceError, match="unknown host name"):
        web.fetch("http://no-such-host.invalid/", settings(), AGENT)


def test_a_closed_ipv6_port_is_a_connection_error_not_a_crash() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImportSourceError, match="could not connect"):
        web.fetch(f"http://[::1]:{port}/", settings(allow_private=True), AGENT)


# --- https: the name goes into SNI and the certificate check, the connection to the IP ---


def _certificate_for_localhost_only(folder: Path) -> tuple[Path, Path]:
    files = make_certificate(folder, with_ip=False)
    return files.cert, files.key


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """An https server whose certificate names localhost (not 127.0.0.1), trusted here."""
    cert_file, key_file = _certificate_for_localhost_only(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    yield from serve(context)


def test_https_checks_the_certificate_against_the_name_not_the_address(
    tls_server: LocalServer,
) -> None:
    tls_server.routes["/page"] = Reply(body=b"<html><body>secure</body></html>", headers=HTML)
    page = web.fetch(tls_server.url("/page", "localhost"), settings(allow_private=True), AGENT)
    assert page.body == b"<html><body>secure</body></html>"
    assert tls_server.requests[0].headers["host"] == f"localhost:{tls_server.port}"
    # The same server by its address: the certificate does not name 127.0.0.1.
    with pytest.raises(ImportSourceError, match="secure connection failed"):
        web.fetch(tls_server.url("/page"), settings(allow_private=True), AGENT)


# --- through the CLI: one line, exit 1, nothing written ------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433"])
def test_issue_add_refuses_a_loopback_url_by_default(
    server: LocalServer, tmp_path: Path, host: str
) -> None:
    server.routes["/story"] = Reply(body=news_article(canonical="").encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws", allow_private=False)
    before = snapshot(cfg.root)
    line = one_error_line(run(cfg, "issue", "add", "1", server.url("/story", host)))
    assert line.startswith(f"Error: {host}:{server.port}: ")
    assert "127.0.0.1" in line and "loopback address" in line and REFUSED in line
    assert snapshot(cfg.root) == before and server.requests == []


def test_feed_pull_goes_through_the_same_guard(server: LocalServer, tmp_path: Path) -> None:
    server.routes["/feed.xml"] = Reply(
        body=rss_feed([("A story", server.url("/story"), "Fri, 14 Mar 2025 08:30:00 GMT")]),
        headers={"Content-Type": "application/rss+xml"},
    )
    cfg = make_workspace(tmp_path / "ws", allow_private=False)
    feeds.add_feed(cfg, "local", server.url("/feed.xml"))
    result = run(cfg, "feed", "pull")
    assert result.exit_code == 1, result.output
    assert f"127.0.0.1:{server.port}" in result.stderr and REFUSED in result.stderr
    assert server.requests == []


def test_allow_private_in_the_config_file_lets_an_intranet_page_in(
    server: LocalServer, tmp_path: Path
) -> None:
    server.routes["/story"] = Reply(body=news_article(canonical="").encode(), headers=HTML)
    cfg = make_workspace(tmp_path / "ws", allow_private=True)
    assert "allow_private = true" in (cfg.root / "newsletter.toml").read_text()
    result = run(cfg, "issue", "add", "1", server.url("/story"))
    assert result.exit_code == 0, result.output
    assert urllib.parse.urlsplit(server.requests[0].path).path == "/story"
