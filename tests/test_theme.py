"""The default theme as readers see it, in real headless Chromium: the example issue's email
and web page at a phone's and a desktop's width, in light and dark, checked by axe-core.

Pages are loaded from files, with their images; any request that would leave the machine
is aborted (and counted, so a test fails if the theme ever tried).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, Route, sync_playwright

from newsletter import message, render
from tests.support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EXAMPLE_SLUG,
    copy_example,
    example_issue,
    load_config,
)
from tests.support import parse_message as parse

READER = message.Recipient(email="reader@example.org", name="Ada Lovelace", subscriber_id=1)
# The email is an article inside the mail client's page, which has its own main landmark:
# axe's two rules about a whole page's landmarks do not apply to it (they do to the web page).
EMAIL_ONLY_SKIPS = ("landmark-one-main", "region")


@dataclass
class Pages:
    email: Path
    web: Path


@dataclass
class Outside:
    urls: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Pages:
    """The example issue's email (filled in for one reader) and web page, as files whose
    images load from the issue folder."""
    root = tmp_path_factory.mktemp("theme")
    cfg = load_config(copy_example(root / "ws"))
    issue = example_issue(cfg)
    rendered = render.render_issue(issue, cfg, asset_base=issue.path.resolve().as_uri())
    data = message.prepare(rendered, cfg).personalise(READER).data
    _, _, markup = parse(data)
    email, web = root / "email.html", root / "web.html"
    email.write_text(markup, encoding="utf-8")
    web.write_text(rendered.web_html, encoding="utf-8")
    return Pages(email, web)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_file(browser: Browser, path: Path, width: int, outside: Outside) -> Page:
    page = browser.new_page(viewport={"width": width, "height": 900})

    def only_files(route: Route) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.urls.append(route.request.url)
            route.abort()

    page.route("**/*", only_files)
    page.goto(path.as_uri())
    return page


def violations(page: Page, skip: tuple[str, ...] = ()) -> list[str]:
    options: dict[str, Any] = {"resultTypes": ["violations"]}
    if skip:
        options["rules"] = {rule: {"enabled": False} for rule in skip}
    found = Axe().run(page, options=options).response["violations"]
    return [
        f"{v['id']}: {node['target']} {node.get('failureSummary', '')[:160]}"
        for v in found
        for node in v["nodes"]
    ]


@pytest.mark.browser
@pytest.mark.parametrize("width", [375, 600])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_violation_in_the_email_or_the_web_page(
    browser: Browser, pages: Pages, width: int, scheme: str
) -> None:
    outside = Outside()
    for path, skip in ((pages.email, EMAIL_ONLY_SKIPS), (pages.web, ())):
        page = open_file(browser, path, width, outside)
        page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
        assert violations(page, skip) == [], path.name
        page.close()
    assert outside.urls == []


# Colours of the page's ground, its paper and its body text, as the browser shows them.
_COLOURS = """() => {
  const style = (selector) => getComputedStyle(document.querySelector(selector));
  return {
    body: getComputedStyle(document.body).backgroundColor,
    paper: style('.paper').backgroundColor,
    text: style('.paper p').color,
    heading: style('h2:not(.toc-title)').color,
  };
}"""


@pytest.mark.browser
def test_dark_mode_changes_the_page_and_keeps_contrast(browser: Browser, pages: Pages) -> None:
    outside = Outside()
    for path, skip in ((pages.email, EMAIL_ONLY_SKIPS), (pages.web, ())):
        page = open_file(browser, path, 600, outside)
        light = page.evaluate(_COLOURS)
        page.emulate_media(color_scheme="dark")
        dark = page.evaluate(_COLOURS)
        for key in ("body", "paper", "text", "heading"):
            assert light[key] != dark[key], (path.name, key)
        assert _luminance(dark["paper"]) < 0.05 < _luminance(dark["text"]), dark
        assert _luminance(light["paper"]) > 0.8 > _luminance(light["text"]) + 0.6, light
        # axe measures every text against its own ground, in the dark scheme too.
        contrast = [v for v in violations(page, skip) if v.startswith("color-contrast")]
        assert contrast == [], path.name
        page.close()
    # The email tells clients it has a dark look of its own.
    source = pages.email.read_text(encoding="utf-8")
    assert '<meta name="color-scheme" content="light dark"' in source
    assert '<meta name="supported-color-schemes" content="light dark"' in source
    assert "[data-ogsc]" in source and "[data-ogsb]" in source
    assert outside.urls == []


def _luminance(css_colour: str) -> float:
    """WCAG relative luminance of an ``rgb(r, g, b)`` colour."""
    r, g, b = (int(part) for part in css_colour.split("(")[1].split(")")[0].split(",")[:3])

    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)


@pytest.mark.browser
def test_no_horizontal_overflow_at_320_px(browser: Browser, pages: Pages) -> None:
    outside = Outside()
    for path in (pages.email, pages.web):
        page = open_file(browser, path, 320, outside)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow == 0, path.name
        page.close()


# The smallest font size of any visible text, after removing every <style> block: what a
# client that drops the head's styles (and so the media queries) shows.
_SMALLEST_TEXT = """() => {
  document.querySelectorAll('style').forEach((style) => style.remove());
  let smallest = [1000, ''];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    const element = node.parentElement;
    if (!node.textContent.trim() || !element.offsetParent && element !== document.body) continue;
    const size = parseFloat(getComputedStyle(element).fontSize);
    if (size < smallest[0]) smallest = [size, node.textContent.trim().slice(0, 40)];
  }
  return smallest;
}"""


@pytest.mark.browser
def test_no_text_under_14px_where_the_styles_in_head_are_dropped(
    browser: Browser, pages: Pages
) -> None:
    outside = Outside()
    for width in (375, 600):
        page = open_file(browser, pages.email, width, outside)
        size, text = page.evaluate(_SMALLEST_TEXT)
        assert size >= 14, (width, text)
        page.close()


@pytest.mark.browser
def test_compacting_the_markup_changes_no_pixel(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The steps that only make the HTML smaller (sections merged, inlined CSS out of the
    head, comments and spaces) leave the email looking exactly as it did, light and dark."""
    from PIL import Image, ImageChops

    root = tmp_path_factory.mktemp("compact")
    cfg = load_config(copy_example(root / "ws"))
    issue = example_issue(cfg)
    base = issue.path.resolve().as_uri()
    files = {}
    for compact in (True, False):
        rendered = render.render_issue(issue, cfg, asset_base=base, compact=compact)
        _, _, markup = parse(message.prepare(rendered, cfg).personalise(READER).data)
        files[compact] = root / f"email-{compact}.html"
        files[compact].write_text(markup, encoding="utf-8")
    assert files[True].stat().st_size < files[False].stat().st_size * 0.92
    outside = Outside()
    for width in (375, 600):
        for scheme in ("light", "dark"):
            shots = []
            for compact in (True, False):
                page = open_file(browser, files[compact], width, outside)
                page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
                shot = root / f"{width}-{scheme}-{compact}.png"
                page.screenshot(path=str(shot), full_page=True)
                page.close()
                shots.append(Image.open(shot).convert("RGB"))
            assert shots[0].size == shots[1].size, (width, scheme)
            difference = ImageChops.difference(shots[0], shots[1])
            changed = sum(1 for pixel in difference.get_flattened_data() if max(pixel) > 0)
            assert changed <= 20, (width, scheme, changed)  # anti-aliasing at most
    assert outside.urls == []


@pytest.mark.browser
def test_axe_finds_no_violation_in_the_archive_and_the_service_pages(
    browser: Browser, tmp_path: Path
) -> None:
    from newsletter import publish, server

    cfg = load_config(copy_example(tmp_path / "ws"))
    pages = {"index.html": publish.index_html(cfg, publish.archive_entries(cfg, [EXAMPLE_SLUG]))}
    app = server.create_app(cfg)
    try:
        client = app.test_client()
        for path, name in (("/subscribe", "subscribe"), ("/u/x", "bad-link"), ("/x/y/z", "404")):
            pages[f"{name}.html"] = client.get(path).get_data(as_text=True)
    finally:
        server.close_app(app)
    outside = Outside()
    for name, markup in pages.items():
        path = tmp_path / name
        path.write_text(markup, encoding="utf-8")
        for scheme in ("light", "dark"):
            page = open_file(browser, path, 375, outside)
            page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
            assert violations(page) == [], (name, scheme)
            page.close()
    assert outside.urls == []
