"""The command line on a bare workspace: a newsletter.toml with a name and nothing else."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from newsletter.cli import main


def minimal_workspace(tmp_path: Path) -> Path:
    """A workspace folder whose config names the newsletter and sets nothing else."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "newsletter.toml").write_text('[newsletter]\nname = "Test"\n', encoding="utf-8")
    return root


def subscribers_cli(workspace: Path, *args: str) -> Result:
    """``newsletter -C WORKSPACE subscribers ARGS...``, in process."""
    return CliRunner().invoke(main, ["-C", str(workspace), "subscribers", *args])
