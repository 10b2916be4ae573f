"""Compacting the email's HTML: each step takes out only what no client needs, and an email
built from many kinds of MJML block looks the same before and after (headless Chromium)."""

from __future__ import annotations

import re
from pathlib import Path

import lxml.html
import pytest
from playwright.sync_api import sync_playwright

from newsletter import render
from newsletter.compact import compact_html, declarations
from tests.support import CHROMIUM, CHROMIUM_ARGS


def page(body: str, head: str = "") -> str:
    """A document shaped like MJML's: a wrapper div in the body."""
    return (
        f"<!doctype html>\n<html><head>{head}</head>"
        f'<body><div class="page">{body}</div></body></html>'
    )


def style_of(markup: str, xpath: str) -> dict[str, str]:
    (element,) = lxml.html.document_fromstring(markup).xpath(xpath)
    return dict(declarations(element.get("style", "")))


SERIF = "font-family:Georgia,'Times New Roman',serif"
GEORGIA = f"{SERIF};font-size:17px;color:#1f2328"


def cell(div: str, content: str) -> str:
    """One mj-text as MJML writes it: a row, a cell, a div with the text's fonts."""
    return (
        '<table><tr><td align="left" style="padding:0 24px">'
        f'<div style="{div}">{content}</div></td></tr></table>'
    )


def test_a_paragraph_drops_what_it_inherits_from_its_div_and_keeps_the_rest() -> None:
    paragraph = (
        '<p style=\'margin:0;font-family:Georgia, "Times New Roman", serif;'
        "color:#1f2328;font-size:14px'>x</p>"
    )
    out = compact_html(page(cell(GEORGIA, paragraph)))
    assert style_of(out, "//p") == {"margin": "0", "font-size": "14px"}
    assert style_of(out, "//td/div") == dict(declarations(GEORGIA))  # Outlook needs them


@pytest.mark.parametrize(
    "content",
    [
        # Outlook styles headings itself, and every client colours links.
        f'<h2 style="{SERIF}">x</h2>',
        '<p><a href="https://example.org/" style="color:#1f2328">x</a></p>',
        # Outlook for Windows does not pass fonts into a table's cells.
        f'<table><tr><td><p style="{SERIF}">x</p></td></tr></table>',
        # What Outlook sees around it is not what other clients see.
        f'<!--[if mso]><table><tr><td><![endif]--><p style="{SERIF}">x</p>',
        # An em is italic by itself: what it holds does not inherit the div's style.
        '<p><em><span style="font-style:normal">x</span></em></p>',
    ],
)
def test_declarations_a_client_may_need_stay(content: str) -> None:
    out = compact_html(page(cell(GEORGIA + ";font-style:normal", content)))
    for element in lxml.html.document_fromstring(out).xpath("//td/div//*[@style]"):
        assert element.get("style") in content, element.get("style")
    assert len(re.findall(r"font-family:Georgia", out)) == 1 + content.count("Georgia")


def test_a_cell_align_counts_as_its_text_align() -> None:
    markup = page(
        '<table><tr><td align="center" style="padding:0">'
        '<div style="text-align:center;color:red"><p style="text-align:center">x</p></div>'
        "</td></tr></table>"
    )
    out = compact_html(markup)
    assert style_of(out, "//td/div") == {"color": "red"}
    assert lxml.html.document_fromstring(out).xpath("//p")[0].get("style") is None


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        ("<p>text</p>", False),
        # Outlook adds a paragraph after a table, in the cell's size.
        ("<p>text</p><table><tr><td>x</td></tr></table>", True),
    ],
)
def test_font_size_zero_leaves_a_cell_with_only_a_sized_div(content: str, kept: bool) -> None:
    cells = f'<td style="font-size:0px;padding:0"><div style="font-size:17px">{content}</div></td>'
    out = compact_html(page(f"<table><tr>{cells}</tr></table>"))
    assert ("font-size" in style_of(out, "//body/div/table/tr/td")) is kept


def test_font_size_zero_stays_where_an_image_or_a_spacer_sits_in_the_cell() -> None:
    image = '<td style="font-size:0px"><img src="https://example.org/a.png" alt="A"></td>'
    spacer = '<td style="font-size:0px"><div style="height:20px;line-height:20px"> </div></td>'
    out = compact_html(page(f"<table><tr>{image}</tr><tr>{spacer}</tr></table>"))
    assert out.count("font-size:0px") == 2


def test_word_break_moves_from_every_cell_to_the_wrapper_and_outlook_gets_a_rule() -> None:
    rows = "".join(
        '<tr><td style="font-size:0px;padding:0;word-break:break-word">'
        f'<img src="x{n}.png" alt="" width="9"></td></tr>'
        for n in range(3)
    )
    out = compact_html(page(f"<table>{rows}</table>"))
    assert style_of(out, "//body/div") == {"word-break": "break-word"}
    assert out.count("word-break") == 2
    head = out[: out.index("</head>")]
    assert "<!--[if mso]><style>td{word-break:break-word}</style><![endif]-->" in head


def row(padding: str, content: str, css_class: str = "") -> str:
    attribute = f' class="{css_class}"' if css_class else ""
    return (
        f'<tr><td align="left"{attribute} style="padding:{padding}">'
        f'<div style="font-size:17px">{content}</div></td></tr>'
    )


@pytest.mark.parametrize(
    ("rows", "merged"),
    [
        # The table after the paragraph has no margin: the gap is the paragraph's.
        (
            row("0 24px", '<p style="margin:0 0 16px">a</p>')
            + row("0 24px 24px", "<table><tr><td>b</td></tr></table>"),
            True,
        ),
        (
            row("8px 24px 0", '<p style="margin:0 0 16px">a</p>')
            + row("0 24px 8px", '<p style="margin:16px 0">b</p>'),
            False,  # 16 + 16 apart in two cells, 16 in one
        ),
        (
            row("0 24px", '<p style="margin:0">a</p>')
            + row("0 24px", '<p style="margin:0">b</p>', css_class="bio-box"),
            False,
        ),
        (
            row("0 24px 4px", '<p style="margin:0">a</p>')
            + row("0 24px", '<p style="margin:0">b</p>'),
            False,
        ),
    ],
)
def test_two_text_rows_merge_only_where_no_gap_changes(rows: str, merged: bool) -> None:
    out = compact_html(page(f"<table>{rows}</table>", head="<style>.bio-box{color:red}</style>"))
    root = lxml.html.document_fromstring(out)
    assert (len(root.xpath("//body/div/table/tr")) == 1) is merged
    if merged:
        assert style_of(out, "//body/div/table/tr/td")["padding"] == "0 24px 24px"
        assert [e.tag for e in root.xpath("//body/div/table/tr/td/div/*")] == ["p", "table"]


def test_unused_classes_tbody_and_bare_divs_go() -> None:
    head = (
        "<!--[if lte mso 11]><style>.mj-outlook-group-fix{width:100%}</style><![endif]-->"
        "<style>@media (max-width:480px){.kept p{color:red}}</style>"
    )
    body = (
        '<!--[if mso | IE]><table class="paper-outlook"><tr><td><![endif]-->'
        '<table><tbody><tr><td class="kept unused"><div style="font-size:1px">'
        '<div class="bio"><p>x</p></div></div></td></tr></tbody></table>'
        '<div class="mj-outlook-group-fix mj-column-per-100">y</div>'
    )
    out = compact_html(page(body, head))
    assert 'class="kept"' in out and "unused" not in out and "bio" not in out
    assert 'class="mj-outlook-group-fix"' in out and "paper-outlook" not in out
    assert "<tbody" not in out and '<div style="font-size:1px"><p>x</p></div>' in out


def test_style_values_are_written_short_where_every_client_reads_the_short_form() -> None:
    body = (
        '<table bgcolor="#ffffff"><tr><td style="padding:8px 24px 8px 24px;'
        " background-color: #FFFFFF; line-height:0px;"
        " font-family: Georgia, 'Times New Roman', serif;\">"
        '<p style="margin:0px auto;">x</p></td></tr></table>'
    )
    out = compact_html(page(body))
    assert 'bgcolor="#ffffff"' in out  # Lotus Notes misreads #fff there
    assert (
        'style="padding:8px 24px;background-color:#FFF;line-height:0px;'
        "font-family:Georgia,'Times New Roman',serif\"" in out
    )
    assert '<p style="margin:0 auto">' in out


def test_full_width_column_rules_go_and_the_others_stay() -> None:
    head = (
        '<style type="text/css">@media only screen and (min-width:480px){.mj-column-per-100'
        "{width:100% !important;max-width:100%}}</style>"
        '<style media="screen and (min-width:480px)">.moz-text-html .mj-column-per-100'
        "{width:100% !important;max-width:100%}</style>"
        '<style type="text/css">@media only screen and (min-width:480px){.mj-column-per-50'
        "{width:50% !important;max-width:50%}}</style>"
    )
    out = compact_html(page('<div class="mj-column-per-100 mj-column-per-50">x</div>', head))
    assert "mj-column-per-100" not in out
    assert out.count("mj-column-per-50") == 2


def test_premailer_adds_no_align_attribute_in_the_compact_email() -> None:
    source = (
        '<mjml><mj-head><mj-style inline="inline">.c { text-align: center; }</mj-style>'
        '</mj-head><mj-body><mj-section><mj-column><mj-text><p class="c">x</p></mj-text>'
        "</mj-column></mj-section></mj-body></mjml>"
    )
    uncompacted = render.mjml_to_html(source, compact=False)
    assert '<p class="c" style="text-align:center" align="center">' in uncompacted
    assert 'align="center">x' not in render.mjml_to_html(source)


# Many kinds of MJML block, two columns, inline and head styles, a word too long for a line.
_PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAw"
    "MDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)
VARIED = f"""<mjml><mj-head><mj-attributes><mj-all font-family="Arial, sans-serif" />
<mj-text font-size="16px" line-height="1.5" color="#333333" /></mj-attributes>
<mj-style inline="inline">p {{ margin: 0 0 12px; }} .note {{ font-family: Arial, sans-serif;
font-size: 16px; color: #333333; }} .big {{ font-size: 20px; }}
h2 {{ margin: 0; font-size: 22px; }} .center {{ text-align: center; }}</mj-style>
<mj-style>@media (max-width: 480px) {{ .big {{ font-size: 24px !important; }} }}
@media (prefers-color-scheme: dark) {{ .note {{ color: #eeeeee !important; }} }}</mj-style>
</mj-head><mj-body background-color="#eeeeee" width="600px">
<mj-section background-color="#ffffff"><mj-column>
<mj-text><h2>Title</h2><p>A word too long for a line: {"a" * 80}, then more.</p></mj-text>
<mj-text padding-top="0"><p class="note center">Second block</p>
<table><tr><td>cell</td></tr></table></mj-text>
<mj-image src="{_PIXEL}" width="200px" alt="A picture" />
<mj-button href="https://example.org/">Go</mj-button>
<mj-divider border-color="#cccccc" /><mj-spacer height="20px" />
<mj-text padding-bottom="0"><p class="big">Big</p></mj-text>
<mj-text padding-top="0"><p style="margin-top:0">After</p></mj-text></mj-column></mj-section>
<mj-section><mj-column width="50%"><mj-text align="center">Left <span>inline</span></mj-text>
<mj-image src="{_PIXEL}" width="100px" alt="Left" /></mj-column>
<mj-column width="50%"><mj-text>Right column text that wraps over several lines.</mj-text>
</mj-column></mj-section><mj-section><mj-column><mj-table><tr><th>A</th><th>B</th></tr>
<tr><td>1</td><td>2</td></tr></mj-table></mj-column></mj-section></mj-body></mjml>"""


@pytest.mark.browser
def test_compacting_many_kinds_of_mjml_block_changes_no_pixel(tmp_path: Path) -> None:
    from PIL import Image, ImageChops

    files = {}
    for compact in (True, False):
        files[compact] = tmp_path / f"email-{compact}.html"
        files[compact].write_text(render.mjml_to_html(VARIED, compact=compact), encoding="utf-8")
    assert files[True].stat().st_size < files[False].stat().st_size * 0.9
    # The two text blocks around "Big" and "After" became one cell.
    assert files[True].read_text(encoding="utf-8").count("<tr>") < files[False].read_text(
        encoding="utf-8"
    ).count("<tr>")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for width in (320, 600):
            for scheme in ("light", "dark"):
                shots = []
                for compact in (True, False):
                    view = browser.new_page(viewport={"width": width, "height": 900})
                    view.goto(files[compact].as_uri())
                    view.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
                    shot = tmp_path / f"{width}-{scheme}-{compact}.png"
                    view.screenshot(path=str(shot), full_page=True)
                    view.close()
                    shots.append(Image.open(shot).convert("RGB"))
                assert shots[0].size == shots[1].size, (width, scheme)
                difference = ImageChops.difference(shots[0], shots[1])
                changed = sum(1 for pixel in difference.get_flattened_data() if max(pixel) > 0)
                assert changed == 0, (width, scheme, changed)
        browser.close()
