"""How many pixels of the example issue changed between two versions of the theme or the code.

Usage: PYTHONPATH=. python bench/screenshots.py save NAME [DIR]
       PYTHONPATH=. python bench/screenshots.py compare NAME OTHER [DIR]

``save`` writes the example email (filled in for one reader), the same email without its
``<style>`` blocks (what Gmail with a non-Google account shows) and the web page to DIR
(default: the system's temporary folder). Run it on two commits (``git stash``, a second
worktree), then ``compare`` screenshots both in headless Chromium at 320, 375, 600 and
900 px, light and dark, and prints the changed pixels of each: 0 means the same rendering.
tests/test_theme.py compares compacted and uncompacted HTML this way; this script is for
changes to the theme itself, which both share. Figures are printed, never asserted.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    EXAMPLE_SLUG,
    copy_example,
    example_issue,
    load_config,
    parse_message,
)

KINDS = ("email", "bare", "web")


def save(name: str, folder: Path) -> None:
    from newsletter import message, render

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(copy_example(Path(tmp) / "ws"))
        base = (REPO / "issues" / EXAMPLE_SLUG).as_uri()
        rendered = render.render_issue(example_issue(cfg), cfg, asset_base=base)
        reader = message.Recipient(email="reader@example.org", name="Ada Lovelace", subscriber_id=1)
        _, _, markup = parse_message(message.prepare(rendered, cfg).personalise(reader).data)
    (folder / f"{name}-email.html").write_text(markup, encoding="utf-8")
    bare = re.sub(r"(?is)<style\b.*?</style>", "", markup)
    (folder / f"{name}-bare.html").write_text(bare, encoding="utf-8")
    (folder / f"{name}-web.html").write_text(rendered.web_html, encoding="utf-8")
    print(
        f"{name}: email {rendered.html_size:,} bytes, {rendered.visible_share:.1%} visible text, "
        f"about {rendered.words_before_clip:,} more words before Gmail's clip"
    )


def compare(name: str, other: str, folder: Path) -> None:
    from PIL import Image, ImageChops
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for kind in KINDS:
            for width in (320, 375, 600, 900):
                for scheme in ("light", "dark"):
                    shots = []
                    for version in (name, other):
                        page = browser.new_page(viewport={"width": width, "height": 900})
                        page.route(
                            "**/*",
                            lambda route: (
                                route.continue_()
                                if route.request.url.startswith("file:")
                                else route.abort()
                            ),
                        )
                        page.goto((folder / f"{version}-{kind}.html").as_uri())
                        page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
                        shot = folder / f"shot-{version}-{kind}-{width}-{scheme}.png"
                        page.screenshot(path=str(shot), full_page=True)
                        page.close()
                        shots.append(Image.open(shot).convert("RGB"))
                    if shots[0].size != shots[1].size:
                        sizes = f"{shots[0].size} {shots[1].size}"
                        print(f"{kind:5} {width:4} {scheme:5}  sizes differ: {sizes}")
                        continue
                    difference = ImageChops.difference(shots[0], shots[1])
                    changed = sum(1 for px in difference.get_flattened_data() if max(px) > 0)
                    print(f"{kind:5} {width:4} {scheme:5}  {changed:>7,} pixels changed")
        browser.close()


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("save", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "save":
        save(sys.argv[2], Path(sys.argv[3] if len(sys.argv) > 3 else tempfile.gettempdir()))
    else:
        folder = Path(sys.argv[4] if len(sys.argv) > 4 else tempfile.gettempdir())
        compare(sys.argv[2], sys.argv[3], folder)


if __name__ == "__main__":
    main()
