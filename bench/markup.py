"""How much of the example email's HTML is text a reader sees, and where the rest goes.

Usage: PYTHONPATH=. python bench/markup.py

Gmail clips an email's HTML at ~102 KB, so markup is room taken from the text. Prints the
email's size, its visible-text share (goal, issue 14: >= 60 %), what the markup is made
of, the same figures without the steps that only make the HTML smaller (render_issue's
compact=False: sections merged, inlined CSS out of <head>, comments and spaces), and how
many more words fit before the clip. Figures are printed, never asserted.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from newsletter import config, content, render  # noqa: E402

GOAL = 0.60
_PARTS = {
    "inline styles": re.compile(r"""\sstyle=("[^"]*"|'[^']*')"""),
    "Outlook comments": re.compile(r"<!--\[if.*?<!\[endif\]-->", re.S),
    "<style> blocks": re.compile(r"<style\b.*?</style>", re.S),
    "link and image addresses": re.compile(r"""\s(?:href|src)="[^"]*\""""),
}


def describe(label: str, rendered: render.RenderedIssue) -> None:
    html = rendered.html
    size = rendered.html_size
    print(f"{label}: {size:,} bytes, {rendered.visible_share:.1%} visible text")
    for name, pattern in _PARTS.items():
        part = sum(len(found.encode()) for found in pattern.findall(html))
        print(f"    {name:<26} {part:>7,} bytes  {part / size:6.1%}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        root.mkdir()
        shutil.copy2(REPO / config.CONFIG_NAME, root / config.CONFIG_NAME)
        shutil.copytree(REPO / "issues", root / "issues")
        (root / "templates").mkdir()
        cfg = config.load(root, environ={})
        issue = content.read_issue(next(content.iter_issue_folders(cfg.issues_dir)))
        compact = render.render_issue(issue, cfg)
        plain = render.render_issue(issue, cfg, compact=False)
    describe("example email", compact)
    describe("without compacting", plain)
    print(f"goal: >= {GOAL:.0%} visible text")
    print(
        f"room before Gmail's clip: {render.GMAIL_CLIP_BYTES - compact.html_size:,} bytes,"
        f" about {compact.words_before_clip:,} more words"
    )


if __name__ == "__main__":
    main()
