"""Helpers for the send tests: the example workspace wired to a test SMTP server, lists, copies."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from newsletter import config
from newsletter.config import Config, DeliverySettings
from newsletter.models import DeliveryState, Status
from newsletter.store import Store
from tests.smtp_server import Received, SmtpTestServer

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-secret-key-0123456789abcdef"
EXAMPLE_CSV = REPO / "examples" / "subscribers.csv"
# The example list: 10 subscribed, 1 unsubscribed (ines.moreau@example.net).
EXAMPLE_ACTIVE = 10
ISSUE_KEY = "001-trams-ferries-benches"
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)


def copy_example(root: Path, *, smtp: dict[str, Any] | None = None, extra: str = "") -> Path:
    """The repository's example workspace at ``root``; ``smtp`` replaces [smtp] keys."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / config.CONFIG_NAME).read_text(encoding="utf-8")
    if smtp:
        head, sep, rest = text.partition("[smtp]\n")
        assert sep, "the example config has an [smtp] section"
        section, _, tail = rest.partition("\n[")
        lines = [line for line in section.splitlines() if line.split("=")[0].strip() not in smtp]
        lines += [f"{key} = {_toml(value)}" for key, value in smtp.items()]
        text = head + sep + "\n".join(lines) + "\n\n[" + tail
    (root / config.CONFIG_NAME).write_text(text + "\n" + extra, encoding="utf-8")
    shutil.copytree(REPO / "issues", root / "issues")
    (root / "templates").mkdir()
    return root


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def load(root: Path, **env: str) -> Config:
    """The workspace's config with the test secret key and only the given environment."""
    return config.load(root, environ={config.ENV_SECRET_KEY: SECRET, **env})


def for_server(
    cfg: Config, server: SmtpTestServer, db: Path, *, timeout: float = 5.0, **delivery: Any
) -> Config:
    """``cfg`` sending to ``server`` with its ledger in ``db``; ``delivery`` overrides keys."""
    settings = DeliverySettings(retry_backoff=0.01)
    return dataclasses.replace(
        cfg,
        smtp=server.settings(timeout=timeout),
        delivery=dataclasses.replace(settings, **delivery),
        db_override=db,
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


def states(store: Store, issue_key: str = ISSUE_KEY) -> dict[str, DeliveryState]:
    """Each subscriber's ledger state for the issue, by address."""
    out: dict[str, DeliveryState] = {}
    for subscriber in store.list_subscribers():
        entry = store.ledger_entry(issue_key, subscriber.id)
        if entry is not None:
            out[subscriber.email] = entry.state
    return out


def with_state(store: Store, state: DeliveryState, issue_key: str = ISSUE_KEY) -> set[str]:
    return {email for email, s in states(store, issue_key).items() if s == state}


def nonzero(counts: dict[DeliveryState, int]) -> dict[str, int]:
    """Ledger counts without the zeros, keyed by name, for readable asserts."""
    return {state.value: n for state, n in counts.items() if n}
