"""Limits on subscribe requests and confirmation emails, shared by every ``serve`` process.

The counting is the well-kept ``limits`` library's fixed-window strategy; its counters
live in the workspace database (table ``rate_limits``, created by the store's
migrations) through :class:`DatabaseStorage`, where each hit is one atomic SQL upsert.
So every ``serve`` process on one database (SQLite, or PostgreSQL across machines), or a
restart, shares the same budget.

Three limits guard the subscribe form (all per hour, configured in ``[server]``):
subscribe requests per client address, confirmation emails per mailbox (its
:func:`canonical_mailbox`, so ``+tag`` variants count as one), and confirmation emails
in all. Counter keys are keyed hashes: the table holds no address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from limits import RateLimitItem, RateLimitItemPerHour
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from .config import ServerSettings
from .db import Connection, Database, DatabaseError, connect
from .store import BUSY_TIMEOUT_MS, Store

SCHEME = "newsletter-db"
GMAIL_DOMAINS = ("gmail.com", "googlemail.com")
IPV6_CLIENT_PREFIX = 64  # one IPv6 client usually holds a whole /64
MAX_CLIENT_KEY = 64

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DatabaseStorage(Storage):
    """A ``limits`` storage in the workspace's database (fixed windows only).

    ``DatabaseStorage(database)`` (a :class:`Database`, a path or a URL), or
    ``limits.storage.storage_from_string("newsletter-db:" + url_or_path)``. Each thread
    uses its own connection, or ``connection`` when given (a pool's, which lends each
    thread one; its owner closes it); a hit is one ``INSERT ... ON CONFLICT DO UPDATE ...
    RETURNING``, atomic between threads, processes and (on PostgreSQL) machines.
    """

    STORAGE_SCHEME = [SCHEME]  # noqa: RUF012 (the limits registry reads a list)

    def __init__(
        self,
        uri: Database | str | Path | None = None,
        wrap_exceptions: bool = False,
        connection: Connection | None = None,
        **options: float | str | bool,
    ) -> None:
        if uri is None:
            raise ValueError("DatabaseStorage needs the database")
        if isinstance(uri, Database):
            database = uri
        else:
            text = str(uri)
            database = Database.parse(text.removeprefix(f"{SCHEME}:"))
        Store.open(database).close()  # create or migrate the table now
        self.database = database
        self._shared = connection
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Connection] = []
        super().__init__(f"{SCHEME}:{database}", wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return DatabaseError

    def _conn(self) -> Connection:
        if self._shared is not None:
            return self._shared
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.database, busy_timeout_ms=BUSY_TIMEOUT_MS)
            if not self.database.is_postgres:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Count ``amount`` hits on ``key``; a window starts at the first hit after expiry."""
        now = time.time()
        rows = (
            self._conn()
            .execute(
                "INSERT INTO rate_limits (key, hits, expires_at) VALUES (?1, ?2, ?3)"
                " ON CONFLICT (key) DO UPDATE SET"  # the row's columns, named (PostgreSQL)
                " hits = CASE WHEN rate_limits.expires_at <= ?4 THEN ?2"
                " ELSE rate_limits.hits + ?2 END,"
                " expires_at = CASE WHEN rate_limits.expires_at <= ?4 THEN ?3"
                " ELSE rate_limits.expires_at END"
                " RETURNING hits",
                (key, amount, now + expiry, now),
            )
            .fetchall()
        )
        return int(rows[0][0])

    def get(self, key: str) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT hits FROM rate_limits WHERE key = ? AND expires_at > ?", (key, time.time())
            )
            .fetchone()
        )
        return 0 if row is None else int(row[0])

    def get_expiry(self, key: str) -> float:
        now = time.time()
        row = (
            self._conn()
            .execute(
                "SELECT expires_at FROM rate_limits WHERE key = ? AND expires_at > ?", (key, now)
            )
            .fetchone()
        )
        return now if row is None else float(row[0])

    def check(self) -> bool:
        try:
            self._conn().execute("SELECT count(*) FROM rate_limits").fetchone()
        except DatabaseError:
            return False
        return True

    def reset(self) -> int | None:
        return self._conn().execute("DELETE FROM rate_limits").rowcount

    def clear(self, key: str) -> None:
        self._conn().execute("DELETE FROM rate_limits WHERE key = ?", (key,))

    def expire(self) -> int:
        """Delete the counters whose window has ended (housekeeping); how many went."""
        return (
            self._conn()
            .execute("DELETE FROM rate_limits WHERE expires_at <= ?", (time.time(),))
            .rowcount
        )

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


def canonical_mailbox(address: str) -> str:
    """One spelling for every way of writing a mailbox, for the per-mailbox limit.

    Lower case; without a ``+tag`` (``jane+news@`` is ``jane@``); for Gmail
    (gmail.com, googlemail.com) also without dots, on gmail.com. Over-merging only
    makes the limit stricter, never lets mail through.
    """
    local, _, domain = address.strip().lower().rpartition("@")
    local = local.split("+", 1)[0]
    if domain in GMAIL_DOMAINS:
        local = local.replace(".", "")
        domain = GMAIL_DOMAINS[0]
    return f"{local}@{domain}"


def trusted_networks(proxies: Sequence[str]) -> tuple[IPNetwork, ...]:
    """The ``[server] trusted_proxies`` setting as networks (validated by the config)."""
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [2001:db8::1] or [2001:db8::1]:443
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # 192.0.2.1:443
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(peer: str, forwarded_for: str, trusted: Sequence[IPNetwork]) -> str:
    """Who is asking: the peer, unless it is a trusted proxy, then X-Forwarded-For's
    right-most hop that is not a trusted proxy (a client can prepend anything, but the
    proxies append what they saw). An IPv6 client counts as its /64."""
    hops = [hop for hop in forwarded_for.split(",") if hop.strip()]
    current = peer
    while True:
        address = _address(current)
        if address is None:
            return current.strip()[:MAX_CLIENT_KEY] or "unknown"
        if not hops or not any(address in network for network in trusted):
            break
        current = hops.pop()
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


class SubscribeLimiter:
    """The three limits of the subscribe form, over one :class:`limits` storage."""

    def __init__(self, storage: Storage, settings: ServerSettings, secret: str) -> None:
        self.storage = storage
        self._limiter = FixedWindowRateLimiter(storage)
        self._key = hashlib.sha256(f"newsletter rate limits\0{secret}".encode()).digest()
        self._client = _per_hour(settings.client_limit_per_hour, "client")
        self._mailbox = _per_hour(settings.mailbox_limit_per_hour, "mailbox")
        self._total = _per_hour(settings.total_limit_per_hour, "total")

    def _id(self, value: str) -> str:
        return hashlib.blake2b(value.encode(), key=self._key, digest_size=16).hexdigest()

    def client(self, client: str) -> int:
        """Count one subscribe request from ``client``: 0 if allowed, else the seconds
        until its window ends (for Retry-After)."""
        if self._client is None or self._limiter.hit(self._client, self._id(client)):
            return 0
        stats = self._limiter.get_window_stats(self._client, self._id(client))
        return max(1, int(stats.reset_time - time.time()) + 1)

    def mail(self, address: str) -> str:
        """Count one confirmation email to ``address``: "" if it may go, else the limit
        it is over ("mailbox" or "total")."""
        if self._mailbox is not None and not self._limiter.hit(
            self._mailbox, self._id(canonical_mailbox(address))
        ):
            return "mailbox"
        if self._total is not None and not self._limiter.hit(self._total, "all"):
            return "total"
        return ""


def _per_hour(amount: int, namespace: str) -> RateLimitItem | None:
    return RateLimitItemPerHour(amount, namespace=namespace) if amount > 0 else None
