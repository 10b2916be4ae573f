"""Helpers for the send tests: the example workspace wired to a test SMTP server, lists, copies."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from newsletter.config import Config, DeliverySettings
from newsletter.db import Database
from newsletter.feedback import FeedbackKind
from newsletter.models import BounceKind, DeliveryState, FeedbackAction, FeedbackItem, Status
from newsletter.store import Store
from tests.support import EXAMPLE_SLUG, REPO
from tests.support.smtp_server import Received, SmtpTestServer

EXAMPLE_CSV = REPO / "examples" / "subscribers.csv"
# The example list: 10 subscribed, 1 unsubscribed (ines.moreau@example.net).
EXAMPLE_ACTIVE = 10
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)


def for_server(
    cfg: Config,
    server: SmtpTestServer,
    db: Path | Database,
    *,
    timeout: float = 5.0,
    **delivery: Any,
) -> Config:
    """``cfg`` sending to ``server`` with its ledger in ``db``; ``delivery`` overrides keys."""
    settings = DeliverySettings(retry_backoff=0.01)
    return dataclasses.replace(
        cfg,
        smtp=server.settings(timeout=timeout),
        delivery=dataclasses.replace(settings, **delivery),
        db_override=db if isinstance(db, Database) else Database("sqlite", db),
    )


def write_list(path: Path, count: int, *, start: int = 0) -> Path:
    """``count`` generated subscribers spread over example.com/org/net."""
    domains = ("example.com", "example.org", "example.net")
    with path.open("w", encoding="utf-8") as out:
        out.write("email,name,city\n")
        for i in range(start, start + count):
            out.write(f"reader{i:04d}@{domains[i % 3]},Reader {i},Port {i}\n")
    return path


def fill(store: Store, folder: Path, generated: int = 0) -> set[str]:
    """The example list plus ``generated`` readers, one bounced; returns the active addresses."""
    store.import_csv(EXAMPLE_CSV)
    if generated:
        store.import_csv(write_list(folder / "generated.csv", generated))
    store.add_subscriber("bounced@example.org", "Bo Unced", status=Status.BOUNCED)
    return {s.email for s in store.list_subscribers(Status.ACTIVE)}


def copies(messages: Iterable[Received]) -> Counter[str]:
    """How many copies each recipient got."""
    return Counter(rcpt for message in messages for rcpt in message.recipients)


def message_id(data: bytes) -> str:
    match = _MESSAGE_ID.search(data)
    assert match is not None, "no Message-ID header"
    return match.group(1).decode("ascii")


def states(store: Store, issue_key: str = EXAMPLE_SLUG) -> dict[str, DeliveryState]:
    """Each subscriber's ledger state for the issue, by address."""
    out: dict[str, DeliveryState] = {}
    for subscriber in store.list_subscribers():
        entry = store.ledger_entry(issue_key, subscriber.id)
        if entry is not None:
            out[subscriber.email] = entry.state
    return out


def with_state(store: Store, state: DeliveryState, issue_key: str = EXAMPLE_SLUG) -> set[str]:
    return {email for email, s in states(store, issue_key).items() if s == state}


def nonzero(counts: dict[DeliveryState, int]) -> dict[str, int]:
    """Ledger counts without the zeros, keyed by name, for readable asserts."""
    return {state.value: n for state, n in counts.items() if n}


def record_bounce(
    store: Store,
    email: str,
    kind: BounceKind,
    status: str,
    diagnostic: str,
    *,
    key: str,
    issue_key: str = "",
    soft_limit: int = 3,
) -> None:
    """A checked bounce for the subscriber at ``email``, applied as the inbox applies one
    (``email`` may differ in case: the address the report named)."""
    subscriber = store.get_subscriber(email)
    assert subscriber is not None, email
    hard = kind == BounceKind.HARD
    action = FeedbackAction(
        kind=FeedbackKind.HARD_BOUNCE if hard else FeedbackKind.SOFT_BOUNCE,
        subscriber_id=subscriber.id,
        email=email,
        issue_key=issue_key,
        reason="bounce-hard" if hard else "bounce-soft",
        detail=f"test {key}",
        status=status,
        diagnostic=diagnostic,
    )
    store.record_feedback([FeedbackItem(key, "test", "applied", (action,))], soft_limit=soft_limit)
