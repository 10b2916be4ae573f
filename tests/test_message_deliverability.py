"""Message headers that deliverability depends on: a fresh Date per recipient."""

from __future__ import annotations

import dataclasses
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


def test_date_has_a_numeric_zone_not_the_obsolete_gmt(workspace: Path) -> None:
    cfg = load_config(workspace)
    data = message.prepare(render_example(cfg), cfg).personalise(Recipient("a@example.org")).data
    (line,) = [h for h in data.split(b"\r\n\r\n")[0].split(b"\r\n") if h.startswith(b"Date:")]
    assert line.endswith(b" +0000") and b"GMT" not in line


def test_feedback_id_names_the_issue_when_configured(workspace: Path) -> None:
    cfg = load_config(workspace)
    plain = message.prepare(render_example(cfg), cfg).personalise(Recipient("a@example.org"))
    assert b"Feedback-ID:" not in plain.data
    cfg = dataclasses.replace(
        cfg,
        newsletter=dataclasses.replace(cfg.newsletter, feedback_id="{issue}:news:harbour-ledger"),
    )
    data = message.prepare(render_example(cfg), cfg).personalise(Recipient("a@example.org")).data
    parsed = check.parse_message(data)
    assert parsed["Feedback-ID"] == "001-trams-ferries-benches:news:harbour-ledger"
    assert list(check.check_headers(data, cfg)) == []
