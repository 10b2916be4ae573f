"""Several `serve` instances on one PostgreSQL database answer as one (issue 16).

Two apps, each from its own copy of the workspace (as on two machines), each served by
waitress on 127.0.0.1, share only the database (a real PostgreSQL server) and the SMTP
sink: a link one sends, the other honours; a limit counts across both; what one records,
a sender's store sees.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from newsletter import config as config_module
from newsletter.db import Database, PooledConnection
from newsletter.models import DeliveryState, Status
from newsletter.ratelimit import DatabaseStorage
from newsletter.server import create_app, start_server
from newsletter.sink import RunningSink, start_sink
from newsletter.store import Store
from newsletter.tokens import TokenSigner
from tests.support import TEST_SECRET_KEY
from tests.support.postgres import PostgresServer
from tests.test_server import FORM, ISSUE, Service, confirmation_link, write_workspace

pytestmark = pytest.mark.server


@dataclass
class Instances:
    a: Service
    b: Service
    store: Store  # a sender's, on the same database
    sink: RunningSink
    database: Database


@pytest.fixture
def instances(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[Instances]:
    database = postgres_server.new_database()
    sink = start_sink(tmp_path / "sink")
    store = Store.open(database)
    services = []
    try:
        for name in ("a", "b"):
            root = tmp_path / name
            write_workspace(root, sink.port)
            cfg = config_module.load(
                root, environ={"NEWSLETTER_SECRET_KEY": TEST_SECRET_KEY}, db=database
            )
            running = start_server(create_app(cfg), "127.0.0.1", 0, threads=4)
            services.append(Service(cfg, running, sink, store, TokenSigner(TEST_SECRET_KEY)))
        yield Instances(services[0], services[1], store, sink, database)
    finally:
        for service in services:
            service.http.stop()
        sink.stop()
        store.close()
        postgres_server.drop_database(database)


def test_a_link_sent_by_one_instance_is_confirmed_on_the_other(instances: Instances) -> None:
    a, b = instances.a, instances.b
    assert a.subscribe("new.reader@example.org", "New Reader")[0] == 200
    assert instances.sink.wait_for(1)
    path = urlsplit(confirmation_link(a.messages()[0])).path.removeprefix("/gazette")
    status, _, text = b.request("POST", path, {"confirm": "yes"})
    assert status == 200 and "You are subscribed" in text
    reader = instances.store.get_subscriber("new.reader@example.org")
    assert reader is not None and reader.status == Status.ACTIVE
    assert [e.reason for e in instances.store.subscriber_events(reader.id)] == [
        "subscribe-form",
        "confirmed",
    ]
    # Asking again on B is "pending" no more: B sees what A recorded and B confirmed.
    assert b.subscribe("new.reader@example.org")[0] == 200
    assert instances.sink.count == 1


def test_the_per_mailbox_limit_counts_across_instances(instances: Instances) -> None:
    """Three confirmation emails an hour to one mailbox ([server] mailbox_limit_per_hour),
    whichever instance is asked: in-memory counters would have let a fourth through."""
    assert instances.a.config.server.mailbox_limit_per_hour == 3
    for n, service in enumerate((instances.a, instances.b, instances.a, instances.b, instances.a)):
        assert service.subscribe(f"jane+{n}@example.org")[0] == 200
    assert instances.sink.count == 3
    assert sorted(m["To"] for m in instances.a.messages()) == [
        f"jane+{n}@example.org" for n in range(3)
    ]
    # Refused sends were released: each later address is pending without an email.
    fourth = instances.store.get_subscriber("jane+3@example.org")
    assert fourth is not None and fourth.status == Status.PENDING
    assert instances.store.confirmation_sent_at("jane+3@example.org") is None


def test_an_unsubscribe_on_one_instance_cancels_the_senders_row(instances: Instances) -> None:
    store = instances.store
    readers = [store.add_subscriber(f"reader{n}@example.org") for n in range(3)]
    assert store.snapshot_recipients(ISSUE) == 3
    leaving = readers[1]
    token = instances.b.unsubscribe_token(leaving.id)
    status, _, text = instances.b.request(
        "POST", f"/u/{token}", b"List-Unsubscribe=One-Click", FORM
    )
    assert status == 200 and "You are unsubscribed" in text
    with store.acquire_send_lock(ISSUE):
        claimed = store.claim_batch(ISSUE, "sender", 10)
    assert [c.subscriber.id for c in claimed] == [readers[0].id, readers[2].id]
    entry = store.ledger_entry(ISSUE, leaving.id)
    assert entry is not None and entry.state == DeliveryState.CANCELLED
    # And A, asked about the same link, sees it done.
    status, _, text = instances.a.request("GET", f"/u/{token}")
    assert status == 200


def test_the_archive_follows_the_database_on_every_instance(instances: Instances) -> None:
    for service in (instances.a, instances.b):
        assert ISSUE not in service.request("GET", "/")[2]
    instances.store.set_publication(ISSUE, "published")
    for service in (instances.a, instances.b):
        status, _, text = service.request("GET", "/")
        assert status == 200 and ISSUE in text
        assert service.request("GET", f"/{ISSUE}/")[0] == 200


def test_one_instance_answers_many_requests_at_once_from_its_pool(
    instances: Instances,
) -> None:
    """Twelve threads of requests on four server threads: every answer right, and the
    service never held more connections than its pool's size."""
    store = instances.store
    ids = [store.add_subscriber(f"many{n}@example.org").id for n in range(12)]

    def unsubscribe(subscriber_id: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", instances.a.http.port, timeout=30)
        token = instances.a.unsubscribe_token(subscriber_id)
        conn.request("POST", f"/u/{token}", body=b"List-Unsubscribe=One-Click", headers=FORM)
        status = conn.getresponse().status
        conn.close()
        return status

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(unsubscribe, ids)) == [200] * 12
    after = [store.get_subscriber(subscriber_id) for subscriber_id in ids]
    assert [s.status for s in after if s is not None] == [Status.UNSUBSCRIBED] * 12
    pool = instances.a.http.app.extensions["newsletter"].pool
    assert isinstance(pool, PooledConnection)
    stats = pool.pool.get_stats()
    assert stats["requests_num"] >= 12  # every request borrowed a connection...
    assert stats["pool_size"] <= 4 + 4  # ...from at most [server] threads + mail threads


def test_a_pooled_store_lends_each_thread_its_own_connection(
    postgres_server: PostgresServer,
) -> None:
    database = postgres_server.new_database()
    pool = PooledConnection(database, size=2)
    try:
        store = Store(pool)
        store.add_subscriber("pooled@example.org")
        with store._transaction() as conn:
            conn.execute(
                "UPDATE subscribers SET name = 'Inside' WHERE email_key = 'pooled@example.org'"
            )
            # A read in the same thread, inside the transaction, sees its write...
            inside = store.get_subscriber("pooled@example.org")
            assert inside is not None and inside.name == "Inside"
            # ...and another thread, on another connection, does not yet.
            with ThreadPoolExecutor(1) as other:
                outside = other.submit(store.get_subscriber, "pooled@example.org").result()
            assert outside is not None and outside.name == ""
        after = store.get_subscriber("pooled@example.org")
        assert after is not None and after.name == "Inside"
        assert pool.pool.get_stats()["pool_size"] <= 2
    finally:
        pool.close()
        postgres_server.drop_database(database)


def test_the_rate_limit_storage_counts_atomically_on_either_engine(database: Database) -> None:
    """Threads on connections of their own (and, on PostgreSQL, on a pool's) count every
    hit once; a window that ended starts again at the next hit."""
    own = DatabaseStorage(database)
    pool = PooledConnection(database, size=3) if database.is_postgres else None
    pooled = DatabaseStorage(database, connection=pool)

    def hammer(storage: DatabaseStorage) -> None:
        for _ in range(50):
            storage.incr("k", 3600)

    with ThreadPoolExecutor(8) as threads:
        list(threads.map(hammer, (own, pooled) * 4))
    assert own.get("k") == pooled.get("k") == 400
    assert 3590 < own.get_expiry("k") - time.time() <= 3600
    with Store.open(database) as store, store._transaction() as conn:
        conn.execute("UPDATE rate_limits SET expires_at = expires_at - 7200")
    assert pooled.get("k") == 0 and pooled.incr("k", 60) == 1
    own.close()
    pooled.close()
    if pool is not None:
        pool.close()
