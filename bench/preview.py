"""How fast the preview follows a save: rebuild time, and save-to-visible in Chromium.

Run from the repo root:  PYTHONPATH=. python bench/preview.py
Uses a copy of the bundled example issue in a temporary folder and Debian's Chromium.
Prints figures; asserts nothing. Everything is served from 127.0.0.1.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from newsletter import config, content, preview  # noqa: E402
from tests.support import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.test_preview import save, wait_for_frames  # noqa: E402

EDITS = 8


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp)
        shutil.copy(ROOT / "newsletter.toml", workspace)
        shutil.copytree(ROOT / "issues", workspace / "issues")
        folder = next(content.iter_issue_folders(workspace / "issues"))
        article = folder / "articles" / sorted(p.name for p in (folder / "articles").iterdir())[-1]
        original = article.read_text(encoding="utf-8")
        cfg = config.load(workspace)
        with preview.PreviewServer(cfg, folder, "127.0.0.1", 0) as server, sync_playwright() as p:
            first = server.state
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            page.goto(server.url)
            wait_for_frames(page)
            load = time.perf_counter() - start
            builds, visible = [], []
            for n in range(EDITS):
                marker = f"Bench marker {n} for the preview."
                version = server.version
                start = time.perf_counter()
                save(article, f"{original}\n{marker}\n")
                page.frame_locator("#frame-desktop").locator("body").get_by_text(marker).wait_for(
                    timeout=10_000
                )
                visible.append(time.perf_counter() - start)
                server.wait_for_version(version + 1, 5)
                builds.append(server.state.seconds)
            save(article, original)
            browser.close()
    size = first.envelope.html_size / 1024 if first.envelope else 0.0
    rows = [
        ("example issue", f"{first.issue}, email HTML {size:.1f} KB"),
        ("first build (2 renders, 2 messages)", f"{first.seconds * 1000:.0f} ms"),
        ("page load until both frames show it", f"{load * 1000:.0f} ms"),
        (f"rebuild after a save ({EDITS} saves)", spread(builds)),
        ("save -> new text in the desktop frame", spread(visible)),
    ]
    for label, value in rows:
        print(f"{label:<40} {value}")


def spread(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms"


if __name__ == "__main__":
    main()
