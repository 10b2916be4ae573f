"""Rendering: golden output for the example, email-client properties, theme overrides, errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import html
import re
import shutil
import textwrap
from pathlib import Path

import lxml.html
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter import config, message, package_data, render
from newsletter.config import Config
from newsletter.content import Article, Issue
from newsletter.errors import ContentError, RenderError
from newsletter.render import RenderedIssue
from tests.support import EXAMPLE_SLUG, example_issue, parse_message, write_template

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def issue(cfg: Config) -> Issue:
    return example_issue(cfg)


@pytest.fixture
def rendered(issue: Issue, cfg: Config) -> RenderedIssue:
    return render.render_issue(issue, cfg)


def parse_strict(markup: str) -> lxml.html.HtmlElement:
    """Parse with libxml2's HTML parser in strict mode: any error raises."""
    parser = lxml.html.HTMLParser(recover=False)
    root = lxml.html.document_fromstring(markup, parser=parser)
    assert len(parser.error_log) == 0, list(parser.error_log)[:5]
    return root


def hidden(element: lxml.html.HtmlElement) -> bool:
    return any(
        "display:none" in (a.get("style") or "").replace(" ", "") for a in element.iterancestors()
    )


def visible_paragraphs(root: lxml.html.HtmlElement) -> list[lxml.html.HtmlElement]:
    return [p for p in root.xpath("//body//p") if not hidden(p)]


def small_screen_rules(root: lxml.html.HtmlElement) -> list[str]:
    """Bodies of @media (max-width: N px) blocks, N <= 480, found in <style> tags."""
    found = []
    for style in root.xpath("//style"):
        css = style.text or ""
        for match in re.finditer(r"@media[^{]*max-width:\s*(\d+)px[^{]*\{(.*?)\}\s*\}", css, re.S):
            if int(match.group(1)) <= 480:
                found.append(match.group(2))
    return found


def send_to(
    rendered: RenderedIssue, cfg: Config, recipient: message.Recipient
) -> tuple[str, str, str]:
    """Prepare once, personalise for one recipient; return (To header, text, html) decoded."""
    template = message.prepare(rendered, cfg)
    parsed, text, markup = parse_message(template.personalise(recipient).data)
    return str(parsed["To"]), text, markup


# --- golden files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "attribute"), [("example-email.html", "html"), ("example-email.txt", "text")]
)
def test_golden_output(
    rendered: RenderedIssue, request: pytest.FixtureRequest, name: str, attribute: str
) -> None:
    actual: str = getattr(rendered, attribute)
    path = GOLDEN / name
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual.encode("utf-8"))
    assert path.is_file(), f"{path} is missing; run pytest --update-golden and review the diff"
    expected = path.read_bytes().decode("utf-8")
    if actual != expected:
        diff = "".join(
            (line if len(line) < 240 else f"{line[:240]}…\n")
            for line in list(
                difflib.unified_diff(
                    expected.splitlines(keepends=True),
                    actual.splitlines(keepends=True),
                    f"golden/{name}",
                    "rendered",
                )
            )[:60]
        )
        pytest.fail(f"output differs from {path} (pytest --update-golden if on purpose):\n{diff}")


def test_rendering_is_deterministic_wherever_the_workspace_lives(
    rendered: RenderedIssue, workspace: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(workspace, moved)
    other_cfg = config.load(moved, environ={config.ENV_SECRET_KEY: "another-key-0123456789"})
    again = render.render_issue(example_issue(other_cfg), other_cfg)
    assert (again.html, again.text, again.web_html) == (
        rendered.html,
        rendered.text,
        rendered.web_html,
    )
    assert dict(again.placeholders) == dict(rendered.placeholders)
    for output in (rendered.html, rendered.text, rendered.web_html):
        assert str(workspace) not in output
        assert not re.search(r"\d{2}:\d{2}:\d{2}", output)  # no clock times
        today = dt.date.today()
        assert today.isoformat() not in output
        assert render.format_date(today, "{month_name} {day}, {year}") not in output


# --- email-client properties of the example ------------------------------------------------


def test_html_parses_strictly(rendered: RenderedIssue) -> None:
    for markup in (rendered.html, rendered.web_html):
        root = parse_strict(markup)
        assert root.find("body") is not None
    assert rendered.html.startswith("<!doctype html>")


def test_every_visible_paragraph_has_inline_style(rendered: RenderedIssue) -> None:
    paragraphs = visible_paragraphs(parse_strict(rendered.html))
    assert len(paragraphs) > 50
    bare = [
        lxml.html.tostring(p)[:80] for p in paragraphs if "margin" not in (p.get("style") or "")
    ]
    assert not bare
    # Lists, quotes and headings get their look inline too.
    root = parse_strict(rendered.html)
    for tag in ("h2", "ol", "li", "blockquote", "a"):
        elements = root.xpath(f"//body//{tag}")
        assert elements, tag
        assert all(e.get("style") for e in elements), tag


def test_small_screen_media_rule_survives_inlining(rendered: RenderedIssue) -> None:
    root = parse_strict(rendered.html)
    rules = small_screen_rules(root)
    assert any("font-size:18px!important" in rule.replace(" ", "") for rule in rules), rules
    # ... and was not inlined into the elements (that would apply it on every screen).
    inline = " ".join(e.get("style") or "" for e in root.xpath("//body//*")).replace(" ", "")
    assert "font-size:18px" not in inline
    assert "!important" not in inline
    assert 'name="viewport"' in rendered.html


def test_preheader_is_hidden_without_tricks_spam_filters_flag(
    rendered: RenderedIssue, issue: Issue
) -> None:
    root = parse_strict(rendered.html)
    (box,) = [d for d in root.xpath("//body//div") if issue.preheader in (d.text or "")]
    style = (box.get("style") or "").replace(" ", "").lower()
    assert "display:none" in style
    assert "max-height:0" in style
    assert not re.search(r"font-size:[01]px", style)
    assert not re.search(r"color:(#fff\b|#ffffff|white)", style)
    assert not re.search(r"font-size:[01]px", style.replace("max-height", ""))
    # It comes first in the body, so the inbox shows it next to the subject.
    assert visible_text_before(rendered.html, issue.preheader) == ""


def visible_text_before(markup: str, marker: str) -> str:
    body = markup[markup.index("<body") :]
    return render.visible_text(body[: body.index(marker)])


def test_images_have_alt_text_and_a_pixel_width(rendered: RenderedIssue, issue: Issue) -> None:
    images = parse_strict(rendered.html).xpath("//img")
    assert len(images) == 5
    for image in images:
        assert image.get("alt", "").strip(), image.get("src")
        assert re.fullmatch(r"\d+", image.get("width", "")), image.get("width")
        assert int(image.get("width")) <= 600
        style = (image.get("style") or "").replace(" ", "")
        # No height attribute: the height follows the width (auto, CSS's initial value).
        assert image.get("height") is None
        assert "height:" not in style and ("width:100%" in style or "max-width:100%" in style)
        assert image.get("src").startswith(f"https://example.org/ledger/{EXAMPLE_SLUG}/images/")
    # The captioned in-body image keeps its caption.
    assert "The riverbank as surveyed in 1894" in render.visible_text(rendered.html)


def test_layout_is_one_column_at_most_600px(rendered: RenderedIssue) -> None:
    widths = [int(w) for w in re.findall(r"max-width:\s*(\d+)px", rendered.html)]
    assert max(widths) == 600
    assert "mj-column-per-100" in rendered.web_html
    # In the email, MJML's rule for a 100 % column repeats its inline width: left out.
    assert rendered.html.count('class="mj-outlook-group-fix"') == 1


def test_masthead_is_the_h1_titles_h2_and_article_headings_smaller(
    rendered: RenderedIssue, cfg: Config
) -> None:
    for markup in (rendered.html, rendered.web_html):
        root = parse_strict(markup)
        (h1,) = root.xpath("//h1")
        assert h1.text_content() == cfg.newsletter.name
        titles = root.xpath("//h2[not(contains(@class, 'toc-title'))]")
        assert [t.text_content() for t in titles] == [a.title for a in rendered.issue.articles]
        # The web page's contents link to the titles; in the email nothing does (clients
        # ignore links to an anchor inside an email), so it carries no id.
        expected = (
            [f"article-{n}" for n in range(1, 6)] if markup is rendered.web_html else [None] * 5
        )
        assert [t.get("id") for t in titles] == expected
        # The Markdown's own ## headings sit below the titles: h3, never h2.
        sub = [h.text_content() for h in root.xpath("//h3")]
        assert "A promenade timeline" in sub and "Why benches disappeared" in sub
        assert not [h for h in root.xpath("//h2") if h.text_content() in sub]
    root = parse_strict(rendered.html)

    def size(element: lxml.html.HtmlElement) -> int:
        return int(re.search(r"font-size:\s*(\d+)px", element.get("style")).group(1))

    title, heading = (
        root.xpath("//h2[not(contains(@class, 'toc-title'))]")[0],
        root.xpath("//h3")[0],
    )
    assert size(heading) < size(title)
    assert "sans-serif" in heading.get("style") and "sans-serif" not in title.get("style")


def test_heading_levels_shift_below_the_article_title() -> None:
    markup = render.markdown_html("# One\n\n## Two\n\n### Three\n\n###### Six\n")
    assert re.findall(r"<(h\d)>", markup) == ["h3", "h3", "h4", "h6"]
    assert "TWO" in render.markdown_text("## Two\n")  # the text part is unchanged


def test_contents_link_to_the_web_page_which_every_client_opens(
    rendered: RenderedIssue, cfg: Config
) -> None:
    web_url = cfg.public_urls.issue(EXAMPLE_SLUG)
    email_links = parse_strict(rendered.html).xpath("//ol[contains(@class, 'toc')]//a/@href")
    assert email_links == [f"{web_url}#article-{n}" for n in range(1, 6)]
    web = parse_strict(rendered.web_html)
    assert web.xpath("//nav//ol//a/@href") == [f"#article-{n}" for n in range(1, 6)]
    for n in range(1, 6):
        assert web.xpath(f"//*[@id='article-{n}']")
    # The web page is a page: header, main and footer landmarks, not an email "article".
    assert [e.tag for e in web.xpath("//body//*[self::header or self::main or self::footer]")] == [
        "header",
        "main",
        "footer",
    ]
    assert not web.xpath("//*[@role='article']")
    assert "<!--landmark" not in rendered.web_html and "landmark:" not in rendered.html


def test_no_inline_font_size_under_14px_in_the_body(rendered: RenderedIssue) -> None:
    """Clients that drop <style> (and its media queries) show the inline sizes."""
    root = parse_strict(rendered.html)
    too_small = []
    for element in root.xpath("//body//*"):
        if hidden(element) or not (element.text or "").strip():
            continue
        sized = next(
            (
                int(match.group(1))
                for e in (element, *element.iterancestors())
                if (match := re.search(r"font-size:\s*(\d+)px", e.get("style") or ""))
            ),
            None,
        )
        if sized is not None and sized < 14:
            too_small.append((sized, element.text.strip()[:30]))
    assert too_small == []


def test_text_part_carries_the_content(rendered: RenderedIssue, issue: Issue) -> None:
    text = rendered.text
    for article in issue.articles:
        assert f"\n{article.title}\n" in text
    assert "\nThe Harbour Ledger, 11/18/26\n" in text  # the house brief: no author
    assert "\nBy Marguerite Ollerenshaw, The Quayside Review, 11/16/26\n" in text
    assert "\n1. Port Alder’s long-awaited harbour tram" in text
    assert "\n2. In Kestrelford" in text
    assert "\n> The old timetable told people" in text
    assert "ridership\n   dashboard <https://example.org/port-alder-transit/ridership>" in text or (
        "<https://example.org/port-alder-transit/ridership>" in text
    )
    assert "[Image: A hand-drawn style map" in text
    assert "A PROMENADE TIMELINE" in text  # headings stand out
    assert "Welcome to the first issue of *The Harbour Ledger*" in text
    # Prose is wrapped; only URLs and the footer's address placeholder may run long.
    prose = [line for line in text.splitlines() if "http" not in line and "%%nl:" not in line]
    assert max(len(line) for line in prose) <= render.TEXT_WIDTH
    assert "<p>" not in text and "&amp;" not in text and "&#" not in text


MAX_TEXT_LINE = 78


def long_lines(text: str) -> list[str]:
    """Lines over 78 characters that are not a web address alone (in <>, quoted or listed)."""
    return [
        line
        for line in text.splitlines()
        if len(line) > MAX_TEXT_LINE
        and not re.fullmatch(r"[>\s]*(?:\d+\.\s+|-\s+)?<?\S+://\S+", line)
    ]


def test_text_lines_fit_78_characters_and_greet_the_reader(
    issue: Issue, cfg: Config, rendered: RenderedIssue
) -> None:
    long_title = "A Very Long Title About Harbours, Ferries, Trams and " * 3 + "Benches"
    first = dataclasses.replace(
        issue.articles[0],
        title=long_title,
        body="## " + "A heading that goes on and on " * 4 + "\n\n" + issue.articles[0].body,
    )
    tall = dataclasses.replace(issue, articles=(first, *issue.articles[1:]))
    result = render.render_issue(tall, cfg)
    recipient = message.Recipient(email="ann@example.org", name="Ann Lee", subscriber_id=3)
    _, text, _ = send_to(result, cfg, recipient)
    assert long_lines(text) == []
    assert "\nHello Ann,\n\nWelcome to the first issue" in text  # as in the HTML
    # The title, its contents entry (hanging under its number) and the heading are wrapped.
    assert "\n1. A Very Long Title About Harbours, Ferries, Trams and A Very Long\n   Title" in text
    assert "\nA HEADING THAT GOES ON AND ON A HEADING THAT GOES ON AND ON A HEADING\n" in text
    # Each address the text part gives stands alone on its line.
    assert "\nhttps://example.org/ledger/001-trams-ferries-benches/\n" in text
    assert re.search(r"\nUnsubscribe:\nhttps://example\.org/ledger/u/\S+\n", text)
    assert long_lines(rendered.text) == []


def test_bylines_follow_the_configured_date_format(cfg: Config, issue: Issue) -> None:
    ferry, brief = issue.articles[1], issue.articles[0]
    assert render.byline(ferry, cfg.newsletter.date_format) == (
        "By Marguerite Ollerenshaw, The Quayside Review, 11/16/26"
    )
    assert render.byline(brief, cfg.newsletter.date_format) == "The Harbour Ledger, 11/18/26"
    assert (
        render.byline(ferry, "{day}.{mm}.{year}")
        == "By Marguerite Ollerenshaw, The Quayside Review, 16.11.2026"
    )
    assert (
        render.byline(dataclasses.replace(ferry, date=None, source=""), "{day}")
        == "By Marguerite Ollerenshaw"
    )
    european = dataclasses.replace(
        cfg, newsletter=dataclasses.replace(cfg.newsletter, date_format="{day}/{month}/{yy}")
    )
    assert (
        "\nBy Marguerite Ollerenshaw, The Quayside Review, 16/11/26\n"
        in render.render_issue(issue, european).text
    )


def test_web_page_has_no_placeholders_and_no_unsubscribe_link(rendered: RenderedIssue) -> None:
    assert render.find_placeholders(rendered.web_html) == []
    assert "%%nl:" not in rendered.web_html
    assert "/ledger/u/" not in rendered.web_html
    assert "unsubscribe" not in rendered.web_html.lower()
    assert "Hello" not in rendered.web_html
    parse_strict(rendered.web_html)
    # The page keeps its CSS in <style> (browsers read it) and shows every article.
    assert "<style" in rendered.web_html
    for article_title in ("The Ferry Timetable", "What the Humble Bench"):
        assert article_title in render.visible_text(rendered.web_html)


def test_html_is_under_gmail_clip(rendered: RenderedIssue) -> None:
    assert rendered.html_size < render.GMAIL_CLIP_BYTES
    assert not rendered.over_gmail_clip
    assert not any("clipping" in w for w in rendered.warnings)


def test_huge_issue_warns_about_gmail_clipping(issue: Issue, cfg: Config) -> None:
    huge = dataclasses.replace(issue, articles=issue.articles * 2)
    result = render.render_issue(huge, cfg)
    assert result.over_gmail_clip
    (warning,) = [w for w in result.warnings if "clipping" in w]
    assert f"{result.html_size / 1024:.0f} KB" in warning


def test_missing_preheader_is_a_warning(issue: Issue, cfg: Config) -> None:
    result = render.render_issue(dataclasses.replace(issue, preheader=""), cfg)
    assert any("no preheader" in w for w in result.warnings)
    assert "display:none" not in result.html.replace(" ", "").split("<body", 1)[1][:600]


# --- per-recipient values ----------------------------------------------------------------


def test_placeholders_are_the_only_per_recipient_parts(rendered: RenderedIssue) -> None:
    assert sorted(rendered.placeholders.values()) == [
        "email",
        "first_name",
        "preferences_url",
        "unsubscribe_url",
    ]
    for token in rendered.placeholders:
        assert token in rendered.html
    assert set(render.find_placeholders(rendered.text)) <= set(rendered.placeholders)


def test_no_placeholder_survives_substitution(rendered: RenderedIssue, cfg: Config) -> None:
    to, text, markup = send_to(
        rendered, cfg, message.Recipient(email="ann@example.org", name="Ann Lee", subscriber_id=3)
    )
    assert render.find_placeholders(text) == []
    assert render.find_placeholders(markup) == []
    assert to == "Ann Lee <ann@example.org>"
    assert "Hello Ann," in markup
    assert "you subscribed as\nann@example.org." in text
    assert re.search(r'<a href="https://example\.org/ledger/u/[A-Za-z0-9_.-]+"', markup)
    assert re.search(r"Unsubscribe:\nhttps://example\.org/ledger/u/[A-Za-z0-9_.-]+\n", text)


NASTY_NAMES = [
    "Zoë$ {name} 100% <b>bold</b>",
    "${HOME} {{ x }} {% if %} %s %%",
    "Łukasz Żółć-Ñúñez",
    "李小龍",
    '"Quoted, Name" \\ back',
    "O'Brien & <script>alert(1)</script>",
    "🚀 Rocket",
]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_names_come_through_unharmed(rendered: RenderedIssue, cfg: Config, name: str) -> None:
    write_template(
        cfg, "email.txt", 'Dear {{ recipient.name }}!\n{% include "!default/email.txt" %}'
    )
    rendered = render.render_issue(example_issue(cfg), cfg)
    recipient = message.Recipient(email="reader@example.org", name=name, subscriber_id=9)
    raw = message.prepare(rendered, cfg).personalise(recipient).data
    parsed, text, markup = parse_message(raw)
    assert text.startswith(f"Dear {name}!\n")  # raw in text
    greeted = recipient.first_name or "there"
    assert f"Hello {html.escape(greeted, quote=True)}," in markup  # escaped in HTML
    assert "<script>" not in markup
    (address,) = parsed["To"].addresses
    assert (address.display_name, address.addr_spec) == (name, "reader@example.org")
    to_line = next(line for line in raw.split(b"\r\n") if line.startswith(b"To: "))
    if not name.isascii():
        assert b"=?utf-8?" in to_line  # RFC 2047
    assert raw.isascii()


def test_editor_text_that_looks_like_a_placeholder_is_left_alone(issue: Issue, cfg: Config) -> None:
    fake = "%%nl:name:0123456789%%"
    lead = issue.articles[0]
    article = dataclasses.replace(lead, body=f"Our tool writes {fake} for names.\n\n" + lead.body)
    rendered = render.render_issue(
        dataclasses.replace(issue, articles=(article, *issue.articles[1:])), cfg
    )
    assert fake not in rendered.placeholders
    assert fake in rendered.html and fake in rendered.text
    _, text, markup = send_to(rendered, cfg, message.Recipient(email="a@example.org", name="Ann"))
    assert f"Our tool writes {fake} for names." in text
    assert fake in markup
    assert set(render.find_placeholders(text) + render.find_placeholders(markup)) == {fake}


# --- generated content: the properties hold for any article --------------------------------

# No "<" in words: "a<b c>" is raw HTML (cleaned, see RAW_HTML), not text that must survive.
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéüß€$%{}&>", min_size=1, max_size=10)
PHRASE = st.lists(WORD, min_size=1, max_size=12).map(" ".join)


@st.composite
def inline(draw: st.DrawFn) -> str:
    words = draw(PHRASE)
    style = draw(st.sampled_from(["plain", "em", "strong", "link"]))
    if style == "em":
        return f"*{words}*"
    if style == "strong":
        return f"**{words}**"
    if style == "link":
        return f"[{words}](https://example.org/{draw(st.integers(0, 999))})"
    return words


LINE = st.lists(inline(), min_size=1, max_size=4).map(" ".join)
BLOCK = st.one_of(
    LINE,
    st.lists(LINE, min_size=1, max_size=4).map(
        lambda xs: "\n".join(f"{i}. {x}" for i, x in enumerate(xs, 1))
    ),
    st.lists(LINE, min_size=1, max_size=4).map(lambda xs: "\n".join(f"- {x}" for x in xs)),
    st.lists(LINE, min_size=1, max_size=3).map(lambda xs: "\n>\n".join(f"> {x}" for x in xs)),
    LINE.map(lambda x: f"## {x}"),
)
BODY = st.lists(BLOCK, min_size=1, max_size=6).map("\n\n".join)
# Raw HTML an editor or an import might leave in Markdown, balanced or not.
RAW_HTML = st.lists(
    st.sampled_from(
        [
            "<b>",
            "</p>",
            "<div>",
            "</div>",
            "</mj-text>",
            "<mj-section>",
            "<!-- note",
            '<img src="https://example.org/x.png">',
            "<script>alert(1)</script>",
            "<table><tr><td>cell",
            "<br>",
        ]
    ),
    max_size=3,
)
NAME = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=24)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODY, raw_html=RAW_HTML, title=PHRASE, name=NAME)
def test_properties_hold_for_generated_articles(
    cfg: Config, body: str, raw_html: list[str], title: str, name: str
) -> None:
    folder = cfg.issues_dir / "009-generated"
    article = Article(
        path=folder / "articles" / "01-x.md",
        title=title,
        body="\n\n".join([body, *raw_html]),
        author="A. Writer",
        source="Src",
        date=dt.date(2025, 3, 15),
    )
    issue = Issue(
        path=folder,
        number=9,
        date=dt.date(2025, 3, 16),
        title="Generated",
        preheader="Pre",
        intro="Hi.",
        articles=(article,),
    )
    rendered = render.render_issue(issue, cfg)
    root = parse_strict(rendered.html)
    assert all(p.get("style") for p in visible_paragraphs(root))
    assert any("!important" in rule for rule in small_screen_rules(root))
    assert "alert(" not in rendered.html and "<mj-" not in rendered.html
    page_text = root.text_content()
    for word in re.findall(r"[^\s*\[\]()#>]+", re.sub(r"\]\([^)]*\)", "]", body)):
        if re.fullmatch(r"\d+\.|-|:", word):
            continue
        assert word in page_text, word
        assert word.casefold() in rendered.text.casefold(), word  # h2 headings are upper-cased
    recipient = message.Recipient(email="reader@example.org", name=name)
    _, text, markup = send_to(rendered, cfg, recipient)
    assert render.find_placeholders(text) == [] and render.find_placeholders(markup) == []
    assert f"Hello {html.escape(recipient.first_name or 'there', quote=True)}," in markup
    assert long_lines(text) == []


# --- the theme: overrides, !default, errors --------------------------------------------------


def test_workspace_template_overrides_the_theme(cfg: Config, issue: Issue) -> None:
    write_template(
        cfg,
        "article.mjml",
        '<mj-section><mj-column><mj-text><p class="custom">'
        "OVERRIDE {{ article.number }}: {{ article.title }}"
        "</p></mj-text></mj-column></mj-section>\n",
    )
    result = render.render_issue(issue, cfg)
    assert "OVERRIDE 1: Port Alder’s Harbour Tram" in result.html
    assert "OVERRIDE 5: What the Humble Bench" in result.web_html
    assert "Read the original at" not in result.html  # the theme's article.mjml is not used
    assert "In this issue" in result.html  # the rest of the theme still is


def test_extends_default_reaches_the_original(cfg: Config, issue: Issue) -> None:
    write_template(
        cfg,
        "email.mjml",
        '{% extends "!default/email.mjml" %}\n'
        "{% block masthead %}<mj-section><mj-column><mj-text>"
        '<p class="masthead">CUSTOM MASTHEAD</p>'
        "</mj-text></mj-column></mj-section>{% endblock %}\n",
    )
    result = render.render_issue(issue, cfg)
    assert "CUSTOM MASTHEAD" in result.html
    assert "Issue 1 · November 20, 2026" not in result.html  # the block was replaced
    assert "Read the original at The Quayside Review" in result.html  # the rest is the theme's
    parse_strict(result.html)


def test_unknown_template_variable_names_template_file_and_line(cfg: Config, issue: Issue) -> None:
    path = write_template(
        cfg,
        "article.mjml",
        "<mj-section>\n<mj-column>\n<mj-text>{{ article.subtitle }}</mj-text>\n"
        "</mj-column>\n</mj-section>\n",
    )
    with pytest.raises(RenderError) as info:
        render.render_issue(issue, cfg)
    text = str(info.value)
    assert text.startswith(f"{path}:3: unknown template variable")
    assert "subtitle" in text and "\n" not in text


def test_unknown_top_level_variable(cfg: Config, issue: Issue) -> None:
    path = write_template(cfg, "email.txt", "{{ newsletter.name }}\n{{ sender_name }}\n")
    with pytest.raises(
        RenderError, match=rf"^{re.escape(str(path))}:2: unknown template variable: 'sender_name'"
    ):
        render.render_issue(issue, cfg)


def test_template_syntax_error_names_file_and_line(cfg: Config, issue: Issue) -> None:
    path = write_template(
        cfg, "article.mjml", "<mj-section>\n{% if article.url %}\n</mj-section>\n"
    )
    with pytest.raises(RenderError) as info:
        render.render_issue(issue, cfg)
    assert str(info.value).startswith(f"{path}:")
    assert "template syntax error" in str(info.value)


def test_mjml_error_is_a_render_error_naming_the_template(cfg: Config, issue: Issue) -> None:
    path = write_template(
        cfg,
        "email.mjml",
        '{% extends "!default/email.mjml" %}\n'
        "{% block footer %}<mj-section><mj-column><mj-text>unclosed{% endblock %}\n",
    )
    with pytest.raises(RenderError) as info:
        render.render_issue(issue, cfg)
    text = str(info.value)
    assert text.startswith(f"{path}: MJML error: ")
    assert "\n" not in text


def test_raw_html_in_an_article_is_cleaned_not_trusted(issue: Issue, cfg: Config) -> None:
    lead = issue.articles[0]
    body = (
        "Compare a <b>bold claim with </mj-text><script>alert(1)</script> and <div>.\n\n"
        '<img src="https://example.org/chart.png" alt="A chart" width="400" onerror="alert(2)">\n'
    )
    rendered = render.render_issue(
        dataclasses.replace(issue, articles=(dataclasses.replace(lead, body=body),)), cfg
    )
    root = parse_strict(rendered.html)  # the MJML and the HTML survive unbalanced tags
    assert "alert(" not in rendered.html and "<script" not in rendered.html
    assert "</mj-text>" not in rendered.html
    assert root.xpath("//b[contains(., 'bold claim')]")
    (chart,) = root.xpath('//img[@src="https://example.org/chart.png"]')
    assert (chart.get("alt"), chart.get("width"), chart.get("onerror")) == ("A chart", "400", None)
    assert "Compare a bold claim with" in rendered.text and "<b>" not in rendered.text


# --- Markdown to text ------------------------------------------------------------------------


def test_markdown_text_lists_quotes_links_and_nesting() -> None:
    text = render.markdown_text(
        "Intro with [a link](https://example.org/a) and [https://example.org/b](https://example.org/b).\n\n"
        "3. three\n4. four\n   - nested\n\n"
        "> quoted *words*\n>\n> > deeper\n\n"
        '![Alt text](x.png "A caption")\n\n'
        "---\n\n"
        "    code block\n"
    )
    assert "Intro with a link <https://example.org/a> and https://example.org/b." in text
    assert "<https://example.org/b>" not in text  # a bare URL is not written twice
    assert "\n3. three\n4. four\n   - nested" in text
    assert "\n> quoted _words_\n" in text
    assert "\n> > deeper" in text
    assert "[Image: Alt text] A caption" in text
    assert "* * *" in text
    assert "    code block" in text


def _append(path: Path, text: str) -> int:
    """Add ``text`` at the end of a file; returns the line it starts on."""
    before = path.read_text(encoding="utf-8").rstrip("\n") + "\n\n"
    path.write_text(before + text, encoding="utf-8")
    return before.count("\n") + 1


@pytest.mark.parametrize(
    ("deep", "lost", "offset"),
    [
        (">" * 5_000 + " buried\n\nThe paragraph after it.\n", "buried", 0),
        ("".join("  " * i + f"- level {i}\n" for i in range(12)), "level 11", 9),
        ("> - " * 12 + "buried\n", "buried", 0),
    ],
)
def test_markdown_nested_too_deep_is_an_error_at_its_line(
    cfg: Config, deep: str, lost: str, offset: int
) -> None:
    """markdown-it stops at 20 levels and drops the rest: once without a word."""
    folder = cfg.issues_dir / EXAMPLE_SLUG
    article = sorted((folder / "articles").glob("*.md"))[1]
    line = _append(article, "A last paragraph.\n\n" + deep) + 2 + offset
    issue = example_issue(cfg)
    with pytest.raises(ContentError, match="nested more than") as info:
        render.render_issue(issue, cfg)
    assert info.value.where == f"{article}:{line}"
    assert "\n" not in str(info.value)
    with pytest.raises(ContentError, match="nested more than"):
        render.markdown_text(deep)
    assert lost in deep and lost not in render._markdown().render(deep)  # gone, unchecked


def test_markdown_nested_too_deep_in_the_intro_names_issue_md(cfg: Config) -> None:
    issue_md = cfg.issues_dir / EXAMPLE_SLUG / "issue.md"
    line = _append(issue_md, ">" * 40 + " deep\n")
    with pytest.raises(ContentError) as info:
        render.render_issue(example_issue(cfg), cfg)
    assert info.value.where == f"{issue_md}:{line}"


def test_nesting_up_to_the_limit_keeps_every_word() -> None:
    quotes = ">" * 19 + " nineteen quotes deep\n\nafter\n"
    lists = "".join("  " * i + f"- level {i}\n" for i in range(9)) + "\nafter the list\n"
    inline = "*" * 60 + "starred" + "*" * 60 + " " + "[" * 40 + "bracketed" + "]" * 40 + "\n"
    for source, words in (
        (quotes, ["nineteen quotes deep", "after"]),
        (lists, [*(f"level {i}" for i in range(9)), "after the list"]),
        (inline, ["starred", "bracketed"]),
    ):
        markup, plain = render.markdown_both(source)
        assert all(word in markup and word in plain for word in words), (source, plain)


def test_build_writes_the_three_files_and_images(issue: Issue, cfg: Config, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = render.build(issue, cfg, out)
    assert set(result.files) == {"email.html", "email.txt", "web.html"}
    for name, size in result.files.items():
        assert (out / name).stat().st_size == size
    assert (out / "email.html").read_text(encoding="utf-8") == result.rendered.html
    assert (out / "images" / "bench.png").read_bytes() == (
        issue.path / "images" / "bench.png"
    ).read_bytes()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_an_override_added_or_removed_later_is_seen(cfg: Config, issue: Issue) -> None:
    """A long-running process (the preview server) renders again after the editor adds a file."""
    assert "LATE OVERRIDE" not in render.render_issue(issue, cfg).text
    path = write_template(cfg, "email.txt", 'LATE OVERRIDE\n{% include "!default/email.txt" %}')
    assert render.render_issue(issue, cfg).text.startswith("LATE OVERRIDE\n")
    path.unlink()
    assert "LATE OVERRIDE" not in render.render_issue(issue, cfg).text


# --- speed-ups that must not change the output ---------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    line=st.lists(
        st.sampled_from(
            ["a", "bc", "defgh", " ", "  ", "\t", "\xa0", "\u2007", "\u3000", "-", "x" * 14]
        ),
        max_size=30,
    ).map("".join),
    width=st.integers(1, 30),
    first=st.sampled_from(["", "> ", "1. ", "    "]),
    rest=st.sampled_from(["", "   ", "> > "]),
)
def test_wrap_line_matches_textwrap(line: str, width: int, first: str, rest: str) -> None:
    expected = textwrap.wrap(
        line,
        width=width,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )
    assert render.wrap_line(line, width, first, rest) == expected


def test_changed_markdown_is_converted_again_and_warnings_repeat(issue: Issue, cfg: Config) -> None:
    lead = issue.articles[0]
    with_image = dataclasses.replace(lead, body=lead.body + "\n\n![](../images/bench.png)\n")
    changed = dataclasses.replace(issue, articles=(with_image, *issue.articles[1:]))
    first, second = render.render_issue(changed, cfg), render.render_issue(changed, cfg)
    for result in (first, second):  # the second render is served from the Markdown cache
        assert any("has no alt text" in w for w in result.warnings)
    assert first.html == second.html
    edited = dataclasses.replace(
        with_image, body=with_image.body.replace("three weeks ahead", "a month ahead")
    )
    third = render.render_issue(
        dataclasses.replace(issue, articles=(edited, *issue.articles[1:])), cfg
    )
    assert "a month ahead" in third.html and "a month ahead" in third.text
    assert "three weeks ahead" not in third.text


def test_floating_images_still_get_an_align_attribute(cfg: Config, issue: Issue) -> None:
    theme_css = (package_data.default_theme_dir() / "email.css").read_text(encoding="utf-8")
    write_template(cfg, "email.css", theme_css + "\n.body-image { float: right; }\n")
    root = parse_strict(render.render_issue(issue, cfg).html)
    # The lead images are the first of their articles; the rest sit in the body.
    floating = root.xpath('//img[contains(@style, "float")]')
    assert len(floating) == 3 and all(img.get("align") == "right" for img in floating)
    assert all(
        img.get("align") is None for img in root.xpath('//img[not(contains(@style, "float"))]')
    )


def test_text_part_keeps_loose_lists_and_multi_paragraph_quotes_readable() -> None:
    source = (
        "Intro.\n\n1. First item.\n\n   Its second paragraph.\n\n2. Second item.\n\n"
        "- a\n- b\n\n> Quote one.\n>\n> Quote two.\n\nAfter.\n"
    )
    assert render.markdown_text(source) == (
        "Intro.\n\n1. First item.\n\n   Its second paragraph.\n\n2. Second item.\n\n"
        "- a\n- b\n\n> Quote one.\n>\n> Quote two.\n\nAfter."
    )


def test_a_transparent_image_is_a_dark_mode_warning(issue: Issue, cfg: Config) -> None:
    from PIL import Image

    images = issue.path / "images"
    Image.new("RGBA", (40, 20), (0, 0, 0, 0)).save(images / "logo.png")
    Image.new("RGB", (40, 20), (250, 250, 250)).save(images / "solid.png")
    lead = issue.articles[0]
    article = dataclasses.replace(
        lead,
        body=lead.body + "\n\n![A logo](../images/logo.png)\n\n![A box](../images/solid.png)\n",
    )
    result = render.render_issue(dataclasses.replace(issue, articles=(article,)), cfg)
    (warning,) = [w for w in result.warnings if "transparent" in w]
    assert "images/logo.png" in warning and "dark" in warning
    assert str(images / "logo.png") in warning
    # The dark look gives images a light ground to stand on where the client honours it.
    compact = result.html.replace(" ", "")
    assert re.search(r"img\{background-color:#[0-9a-f]{6}!important\}", compact)


def test_most_of_the_example_email_is_text(rendered: RenderedIssue, cfg: Config) -> None:
    """Gmail clips at ~102 KB: markup is room taken from the text (bench/markup.py)."""
    assert rendered.visible_share >= 0.60
    plain = render.render_issue(rendered.issue, cfg, compact=False)
    assert rendered.html_size < plain.html_size * 0.92
    head = rendered.html[: rendered.html.index("<body")]
    assert "/*" not in head and "Inlined into every element" not in head
    assert "letter-spacing" not in head  # the inlined rules are not kept in <head> too
    assert "@media" in head and "prefers-color-scheme" in head and "[data-ogsc]" in head
    assert "<![endif]--><!--[if mso | IE]>" not in rendered.html
    assert rendered.html.count('class="mj-outlook-group-fix"') == 1  # one section holds it all


def test_words_before_clip(rendered: RenderedIssue, issue: Issue, cfg: Config) -> None:
    words = len(render.visible_text(rendered.html).split())
    per_word = rendered.html_size / words
    expected = (render.GMAIL_CLIP_BYTES - rendered.html_size) / per_word
    assert rendered.words_before_clip == int(expected) > 1000
    huge = render.render_issue(dataclasses.replace(issue, articles=issue.articles * 3), cfg)
    assert huge.over_gmail_clip and huge.words_before_clip == 0


@pytest.mark.parametrize(
    ("source", "merged"),
    [
        (
            "<mj-section><mj-column><mj-text>a</mj-text></mj-column></mj-section>\n"
            "<mj-section><mj-column><mj-text>b</mj-text></mj-column></mj-section>",
            True,
        ),
        # Two columns side by side, a section with its own padding, something between.
        (
            "<mj-section><mj-column><mj-text>a</mj-text></mj-column>"
            "<mj-column><mj-text>b</mj-text></mj-column></mj-section>"
            "<mj-section><mj-column><mj-text>c</mj-text></mj-column></mj-section>",
            False,
        ),
        (
            '<mj-section padding="9px"><mj-column><mj-text>a</mj-text></mj-column></mj-section>'
            "<mj-section><mj-column><mj-text>b</mj-text></mj-column></mj-section>",
            False,
        ),
        (
            "<mj-section><mj-column><mj-text>a</mj-text></mj-column></mj-section>"
            "<mj-raw><hr></mj-raw>"
            "<mj-section><mj-column><mj-text>b</mj-text></mj-column></mj-section>",
            False,
        ),
    ],
)
def test_merge_sections_only_joins_plain_one_column_sections(source: str, merged: bool) -> None:
    head = '<mjml><mj-head><mj-attributes><mj-section padding="0" /></mj-attributes></mj-head>'
    document = f"{head}<mj-body>{source}</mj-body></mjml>"
    result = render.merge_sections(document)
    assert (result.split("<mj-body>")[1].count("<mj-section") == 1) is merged
    assert re.sub(r"<[^>]+>|\s", "", result) == re.sub(r"<[^>]+>|\s", "", document)
    # Sections keep MJML's 20px padding unless the theme sets it to 0: then nothing merges.
    assert render.merge_sections(document.replace(' padding="0"', "")) == document.replace(
        ' padding="0"', ""
    )
