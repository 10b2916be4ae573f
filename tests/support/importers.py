"""Workspaces and CLI runs shared by the importer tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from click.testing import CliRunner, Result

from newsletter import config as config_module
from newsletter import content
from newsletter.cli import main
from newsletter.config import Config

BASE_URL = "https://example.org/ledger"


def make_workspace(
    root: Path, *, timeout: float = 5.0, max_bytes: int = 2_000_000, allow_private: bool = True
) -> Config:
    """A workspace with issue 1 (empty) and the given fetch limits.

    ``allow_private`` is on by default here, and only here: the test pages are served
    from 127.0.0.1, which a real workspace refuses to fetch from.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "newsletter.toml").write_text(
        "[newsletter]\n"
        'name = "The Harbour Ledger"\n'
        'sender = "The Harbour Ledger <editor@example.org>"\n'
        f'base_url = "{BASE_URL}"\n'
        'tagline = "Weekly notes on harbours"\n'
        "\n[fetch]\n"
        f"timeout = {timeout}\n"
        f"max_bytes = {max_bytes}\n"
        f"allow_private = {'true' if allow_private else 'false'}\n",
        encoding="utf-8",
    )
    cfg = config_module.load(root)
    content.new_issue(cfg.issues_dir, title="First", date=dt.date(2026, 11, 20))
    return cfg


def run(cfg: Config, *args: str) -> Result:
    """The CLI, in-process, on the workspace."""
    return CliRunner().invoke(main, ["-C", str(cfg.root), *args], catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), to prove nothing changed."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def one_error_line(result: Result) -> str:
    """Assert the CLI failed the way users see it: exit 1, one `Error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]
