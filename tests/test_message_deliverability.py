"""Message headers that deliverability depends on: a fresh Date per recipient."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from newsletter import check, message
from newsletter.message import Recipient
from tests.support import load_config
from tests.support.deliverability import render_example


def test_date_is_stamped_when_each_copy_is_made_not_when_the_issue_is_prepared(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(workspace)
    clock = [1_800_000_000.0]
    monkeypatch.setattr(message.time, "time", lambda: clock[0])
    template = message.prepare(render_example(cfg), cfg)
    clock[0] += 5 * 3600  # a long, rate-limited send: five hours later
    data = template.personalise(Recipient(email="late@example.org")).data
    date = check.parse_message(data)["Date"]
    assert parsedate_to_datetime(str(date)).timestamp() == clock[0]
    assert list(check.check_headers(data, cfg)) == []
