"""Which addresses a fetch may reach, and connections made to exactly the address checked.

A URL given to `issue add`, a feed, or a redirect from either, is someone else's
choice. Left alone it could make the editor's machine fetch its own admin pages
(``http://127.0.0.1:8080/``), the cloud's metadata service (``169.254.169.254``) or
a printer on the office network, and paste the answer into an article. So each
host name is resolved once, every address it resolves to is checked, and the
connection goes to that checked address (with the name in the Host header, in SNI
and in the certificate check), leaving no second look-up that DNS rebinding could
answer differently. ``[fetch] allow_private = true`` turns the check off for an
intranet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import urllib3

from ..errors import ImportSourceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SETTING_HINT = (
    "to fetch from your own network, set allow_private = true under [fetch] in newsletter.toml"
)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
    ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud
}
# Python before 3.11.10 and 3.12.4 counts these as global (gh-113171): named here.
_IETF = ipaddress.IPv4Network("192.0.0.0/24")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not on the public internet ("loopback", ...), or None if it is."""
    if ip in _METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and (reason := blocked_reason(embedded)):
            return reason
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("carrier-grade NAT", ip in _CGNAT),
        ("reserved", ip in _IETF),
        ("site-local", ip in _SITE_LOCAL),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def resolve(
    parts: urllib.parse.SplitResult, where: str, *, allow_private: bool, redirect: bool
) -> list[str]:
    """Every address ``parts.hostname`` resolves to, each one checked; the connection
    goes to one of these, never to a second look-up of the name."""
    host = parts.hostname or ""
    port = _port(parts)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise ImportSourceError(
            "unknown host name", where=where, hint="check the URL, or your connection"
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    if not allow_private:
        for address in addresses:
            reason = blocked_reason(ipaddress.ip_address(address.split("%")[0]))
            if reason is None:
                continue
            named = "" if _is_literal(host, address) else f"{host}: it resolves to "
            led = "a redirect led to " if redirect else "refused to fetch from "
            raise ImportSourceError(
                f"{led}{named}{address}, a {reason} address, not a public one",
                where=where,
                hint=SETTING_HINT,
            )
    return addresses


class Watchdog:
    """Ends a fetch's connections when its time is up.

    A timeout bounds each wait for the next piece of an answer, not the answer: a
    server that sends one byte of its headers or body every few seconds would keep
    a fetch going for hours. At ``deadline`` (``time.monotonic()``) the watchdog
    shuts down every socket it was given, so the read waiting on one ends at once
    (whether in the TLS handshake, the headers or the body); ``fired`` says why.
    """

    def __init__(self, deadline: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down at the deadline (at once if it has passed)."""
        # A duplicate: TLS takes the original object over, and shutting down any
        # descriptor of a connection shuts the connection down.
        copy = sock.dup()
        with self._lock:
            self._sockets.append(copy)
            late = self.fired
        if late:
            _shut(copy)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def close(self) -> None:
        """Stop watching (the fetch is over) and let go of the duplicates."""
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched(base: type[Any], watchdog: Watchdog | None) -> type[Any]:
    """``base`` (a urllib3 connection class) whose sockets ``watchdog`` watches."""
    if watchdog is None:
        return base
    watch = watchdog.watch

    class Watched(base):  # type: ignore[misc,valid-type]
        def _new_conn(self) -> socket.socket:
            sock: socket.socket = super()._new_conn()
            watch(sock)
            return sock

    return Watched


def open_pinned(
    parts: urllib.parse.SplitResult,
    addresses: list[str],
    *,
    headers: Mapping[str, str],
    timeout: urllib3.Timeout,
    watchdog: Watchdog | None = None,
    method: str = "GET",
) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    """GET (or ``method``) ``parts`` from the first of ``addresses`` that takes the connection.

    The caller reads the response, then closes the pool. Redirects are not followed:
    the caller checks each hop's host before going there. ``watchdog`` ends the
    connection at its deadline, wherever the answer is.
    """
    host = _ascii_host(parts.hostname or "")
    port = _port(parts)
    default = 443 if parts.scheme.lower() == "https" else 80
    shown = f"[{host}]" if ":" in host else host
    request_headers = {**headers, "Host": shown if port == default else f"{shown}:{port}"}
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    error: Exception | None = None
    for address in addresses:
        pool: urllib3.HTTPConnectionPool
        if parts.scheme.lower() == "https":
            pool = urllib3.HTTPSConnectionPool(
                address,
                port,
                timeout=timeout,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                server_hostname=host,
                assert_hostname=host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
        pool.ConnectionCls = _watched(pool.ConnectionCls, watchdog)
        try:
            response = pool.urlopen(
                method,
                path,
                headers=request_headers,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
        except urllib3.exceptions.NewConnectionError as exc:
            pool.close()
            error = exc  # refused or unreachable: the next address may answer
            continue
        except BaseException:
            pool.close()
            raise
        return pool, response
    assert error is not None
    raise error


def _port(parts: urllib.parse.SplitResult) -> int:
    try:
        port = parts.port
    except ValueError:
        raise ImportSourceError(
            "the URL has an invalid port", where=parts.netloc, hint="check the URL"
        ) from None
    return port or (443 if parts.scheme.lower() == "https" else 80)


def _is_literal(host: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False


def _ascii_host(host: str) -> str:
    """The host as it goes into the Host header, SNI and the certificate check."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ImportSourceError(
            f"the host name {host!r} cannot be written in ASCII", where=host, hint="check the URL"
        ) from None
