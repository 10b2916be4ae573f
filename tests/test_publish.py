"""Publishing: every image and link of an email answers at the public address before the
first copy goes out, the static export works on a plain web server, and the archive is a
publication (index, feed, sharing tags) with nobody's personal data in it.

Everything is real: images made with Pillow, the SMTP sink, waitress serving the Flask
app on 127.0.0.1, http.server for the static export, feedparser for the feed. The public
host (example.org) is rewritten to the local port, once keeping the path prefix as a
proxy may and once stripping it.
"""

from __future__ import annotations

import email
import email.policy
import html
import http.client
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from functools import cache, partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import feedparser
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from newsletter import config as config_module
from newsletter import content, images, publish, render
from newsletter.cli import main
from newsletter.server import RunningService, create_app, start_server
from newsletter.sink import RunningSink, start_sink
from newsletter.store import Store
from tests.support import CHROMIUM, CHROMIUM_ARGS
from tests.support.local_http import LocalServer, Reply
from tests.support.local_http import serve as serve_local

KEY = "test-secret-key-0123456789abcdef"
BASE = "https://example.org/newsletter"
ISSUE = "001-tides-and-timetables"
DRAFT = "002-draft-days"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{16,}")

CONFIG = """\
[newsletter]
name = "The Test Gazette"
tagline = "Small news, read closely."
sender = "The Test Gazette <editor@example.org>"
base_url = "{base}"
postal_address = "1 Example Street, Example Town"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
timeout = 5.0

[unsubscribe]
mailto = "unsubscribe@example.org"
"""

ISSUE_MD = """\
---
number: {number}
date: 2026-03-0{number}
title: {title}
preheader: {preheader}
articles:
  - 01-harbour-wall.md
  - 02-night-bus.md
---
A short introduction to **two** stories.
"""

WALL = """\
---
title: The Harbour Wall Gets a Second Life
source: Example Times
url: https://example.org/news/harbour-wall
image: ../images/wall.jpg
image_alt: A long grey harbour wall under a pale sky
---
The old harbour wall will be repaired rather than replaced, the council said.

![A narrow plan of the wall](../images/plan.png "The plan, drawn narrow")
"""

BUS = """\
---
title: The Night Bus Finds Its Riders
source: Example Times
---
Ridership on the night bus doubled in a year.

![""](../images/rule.png)
"""


@cache
def jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG (a gradient under noise): heavy at full size, as photos are."""
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 40)
    picture = Image.merge("RGB", (gradient, noise, Image.blend(gradient, noise, 0.5)))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=95)
    return out.getvalue()


def png(width: int, height: int, colour: tuple[int, int, int] = (40, 90, 140)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def write_workspace(root: Path, smtp_port: int, base: str = BASE) -> None:
    (root / "templates").mkdir(parents=True)
    (root / "newsletter.toml").write_text(
        CONFIG.format(base=base, smtp_port=smtp_port), encoding="utf-8"
    )
    for number, key, title in ((1, ISSUE, "Tides and Timetables"), (2, DRAFT, "Draft Days")):
        folder = root / "issues" / key
        (folder / "articles").mkdir(parents=True)
        (folder / "images").mkdir()
        (folder / "images" / "wall.jpg").write_bytes(jpeg(1800, 1200))
        (folder / "images" / "plan.png").write_bytes(png(300, 200))
        (folder / "images" / "rule.png").write_bytes(png(600, 8, (200, 190, 170)))
        (folder / "issue.md").write_text(
            ISSUE_MD.format(
                number=number, title=title, preheader=f"Two short stories, number {number}."
            ),
            encoding="utf-8",
        )
        (folder / "articles" / "01-harbour-wall.md").write_text(WALL, encoding="utf-8")
        (folder / "articles" / "02-night-bus.md").write_text(BUS, encoding="utf-8")


@dataclass
class Site:
    """A workspace, its SMTP sink and its running `serve`, with two subscribers."""

    root: Path
    config: config_module.Config
    sink: RunningSink
    http: RunningService

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["-C", str(self.root), *args])

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def local(self, url: str, *, keep_prefix: bool) -> str:
        """The path to request locally for a public URL (as a proxy would pass it on)."""
        assert url.startswith(BASE), url
        rest = url[len(BASE) :] or "/"
        return f"{urlsplit(BASE).path}{rest}" if keep_prefix else rest

    def messages(self) -> list[EmailMessage]:
        found = []
        for path in sorted((self.sink.maildir / "new").iterdir()):  # type: ignore[operator]
            parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
        return found


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setenv(config_module.ENV_SECRET_KEY, KEY)
    monkeypatch.delenv(config_module.ENV_DB, raising=False)
    sink = start_sink(tmp_path / "sink")
    root = tmp_path / "ws"
    write_workspace(root, sink.port)
    cfg = config_module.load(root, environ={config_module.ENV_SECRET_KEY: KEY})
    with Store.open(cfg.database) as store:
        store.add_subscriber("ada@example.org", "Ada Lovelace", {"city": "Portsmouth"})
        store.add_subscriber("bob@example.org", "Bob Reader")
    running = start_server(create_app(cfg), "127.0.0.1", 0, threads=4)
    try:
        yield Site(root, cfg, sink, running)
    finally:
        running.stop()
        sink.stop()


class Links(HTMLParser):
    """Every src and href of a document (and the form actions)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "action"):
                self.found.append((tag, value))


def links(markup: str) -> list[tuple[str, str]]:
    parser = Links()
    parser.feed(markup)
    return parser.found


def html_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def public_links(markup: str) -> list[str]:
    return sorted({url for _tag, url in links(markup) if url.startswith(BASE)})


def assert_all_answer(site: Site, urls: list[str]) -> None:
    for keep_prefix in (True, False):
        for url in urls:
            path = site.local(url, keep_prefix=keep_prefix)
            status, _, _ = site.get(path)
            assert status == 200, (url, path, status)


# --- the end-to-end promise -----------------------------------------------------------------


def test_every_public_image_and_link_of_a_sent_email_answers_before_and_after_the_first_send(
    site: Site,
) -> None:
    # Nothing is on the web yet: the email's web link would be a 404.
    assert site.get(f"/newsletter/{ISSUE}/")[0] == 404
    proof = site.run("send", "1", "--test", "editor@example.org")
    assert proof.exit_code == 0, proof.output
    assert f"Published:  {BASE}/{ISSUE}/" in proof.stdout
    (test_copy,) = site.messages()
    urls = public_links(html_part(test_copy))
    kinds = {urlsplit(url).path.rsplit("/", 2)[-2] for url in urls}
    assert f"{BASE}/{ISSUE}/" in urls  # read on the web
    assert f"{BASE}/{ISSUE}/images/plan.png" in urls and "u" in kinds  # images, unsubscribe
    # Published but never sent: the proof's every public address answers 200.
    assert_all_answer(site, urls)
    # A proof does not announce the issue: the index and the feed do not list it yet.
    assert "(unlisted until sent or published)" in proof.stdout
    assert b"Tides and Timetables" not in site.get("/")[2]
    assert feedparser.parse(site.get("/feed.xml")[2]).entries == []

    sent = site.run("send", "1", "--yes")
    assert sent.exit_code == 0, sent.output
    real = [m for m in site.messages() if "[TEST]" not in str(m["Subject"])]
    assert {str(m["To"]) for m in real} == {
        "Ada Lovelace <ada@example.org>",
        "Bob Reader <bob@example.org>",
    }
    for message in real:
        urls = public_links(html_part(message))
        assert any("/u/" in url for url in urls)
        assert_all_answer(site, urls)
    assert b"Tides and Timetables" in site.get("/")[2]  # sent: listed
    # The large photo is served resized, the original stays in the issue folder.
    status, headers, data = site.get(f"/newsletter/{ISSUE}/images/wall.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    served = Image.open(io.BytesIO(data))
    assert served.width == images.MAX_WIDTH and len(data) <= images.MAX_BYTES
    original = site.config.issues_dir / ISSUE / "images" / "wall.jpg"
    assert Image.open(original).width == 1800


def test_publish_puts_an_unsent_issue_up_and_undo_takes_it_down(site: Site) -> None:
    page = f"/{DRAFT}/"
    image = f"/{DRAFT}/images/plan.png"
    assert site.get(page)[0] == 404 and site.get(image)[0] == 404
    result = site.run("publish", "2")
    assert result.exit_code == 0, result.output
    assert f"Published issue 2: {BASE}/{DRAFT}/" in result.stdout
    assert "3 images" in result.stdout and "1 resized to at most 1200 px wide" in result.stdout
    assert site.get(page)[0] == 200 and site.get(image)[0] == 200
    index = site.get("/")[2].decode()
    assert "Draft Days" in index

    undo = site.run("publish", "2", "--undo")
    assert undo.exit_code == 0, undo.output
    assert "Took down issue 2" in undo.stdout
    assert "no longer served either" in undo.stdout
    assert site.get(page)[0] == 404 and site.get(image)[0] == 404
    assert "Draft Days" not in site.get("/")[2].decode()


def test_undo_of_a_sent_issue_keeps_the_images_its_emails_show_and_says_which(
    site: Site,
) -> None:
    assert site.run("send", "1", "--yes").exit_code == 0
    undo = site.run("publish", "1", "--undo")
    assert undo.exit_code == 0, undo.output
    assert "Its 3 images stay: the issue was sent" in undo.stdout
    assert f"  {BASE}/{ISSUE}/images/plan.png" in undo.stdout.splitlines()
    assert site.get(f"/{ISSUE}/")[0] == 404
    assert "Tides and Timetables" not in site.get("/")[2].decode()
    assert site.get(f"/{ISSUE}/images/plan.png")[0] == 200
    assert site.get(f"/{ISSUE}/images/wall.jpg")[0] == 200
    # Publishing again brings the page back.
    assert site.run("publish", "1").exit_code == 0
    assert site.get(f"/{ISSUE}/")[0] == 200


def test_serve_answers_with_and_without_the_path_prefix(site: Site) -> None:
    assert site.run("publish", "1").exit_code == 0
    for prefix in ("", "/newsletter"):
        status, _, body = site.get(f"{prefix}/")
        assert status == 200 and b"Tides and Timetables" in body
        assert site.get(f"{prefix}/{ISSUE}/")[0] == 200
        assert site.get(f"{prefix}/{ISSUE}/images/rule.png")[0] == 200
        assert site.get(f"{prefix}/feed.xml")[0] == 200
        assert site.get(f"{prefix}/subscribe")[0] == 200
        # Relative links of the service's own pages resolve under the same prefix.
        if prefix:  # the public address without its slash: the index's links would leave it
            status, headers, _ = site.get(prefix)
            assert status == 308 and urljoin(f"http://h{prefix}", headers["location"]) == (
                f"http://h{prefix}/"
            )
        status, headers, _ = site.get(f"{prefix}/{ISSUE}")
        assert status == 308
        assert urljoin(f"http://h{prefix}/{ISSUE}", headers["location"]).endswith(
            f"{prefix}/{ISSUE}/"
        )
    assert site.get("/newsletter/nothing/")[0] == 404


# --- the archive as a publication -----------------------------------------------------------


def test_index_feed_and_page_show_the_issues_and_nobody(site: Site) -> None:
    assert site.run("send", "1", "--yes").exit_code == 0
    assert site.run("publish", "2").exit_code == 0
    status, headers, body = site.get("/")
    index = body.decode()
    assert status == 200
    # Newest first, with date, lead headlines and a subscribe form posting to the service.
    assert index.index("Draft Days") < index.index("Tides and Timetables")
    assert "March 2, 2026" in index and "The Night Bus Finds Its Riders" in index
    assert f'action="{BASE}/subscribe"' in index and 'name="email"' in index
    assert "form-action 'self' https://example.org" in headers["content-security-policy"]
    status, headers, feed_bytes = site.get("/feed.xml")
    assert headers["content-type"].startswith("application/atom+xml")
    feed = feedparser.parse(feed_bytes)
    assert not feed.bozo, feed.get("bozo_exception")
    assert [e.title for e in feed.entries] == ["Draft Days", "Tides and Timetables"]
    assert [e.link for e in feed.entries] == [f"{BASE}/{DRAFT}/", f"{BASE}/{ISSUE}/"]
    assert feed.entries[1].summary == "Two short stories, number 1."
    page = site.get(f"/{ISSUE}/")[2].decode()
    assert '<meta property="og:title" content="Tides and Timetables">' in page
    assert '<meta property="og:description" content="Two short stories, number 1.">' in page
    assert f'<meta property="og:image" content="{BASE}/{ISSUE}/images/wall.jpg">' in page
    assert '<meta name="twitter:card" content="summary_large_image">' in page
    assert f'<link rel="canonical" href="{BASE}/{ISSUE}/">' in page
    for document in (index, feed_bytes.decode(), page):
        for person in ("ada@example.org", "Ada Lovelace", "bob@example.org", "Bob Reader"):
            assert person not in document
        assert TOKEN_RE.search(document) is None and "%%nl:" not in document
        assert "/u/" not in document


def test_titles_are_text_in_the_feed_the_index_and_the_sharing_tags(site: Site) -> None:
    """Markup in a title stays text everywhere; a control character pasted into a title
    after the issue went out leaves the feed readable instead of failing it."""
    folder = site.config.issues_dir / ISSUE
    hostile = 'Tides "><script>alert(1)</script> & ]]> <b>bold</b>'
    issue_md = folder / "issue.md"
    issue_md.write_text(
        issue_md.read_text(encoding="utf-8").replace(
            "title: Tides and Timetables", f"title: '{hostile}'"
        ),
        encoding="utf-8",
    )
    assert site.run("send", "1", "--yes").exit_code == 0
    page = site.get(f"/{ISSUE}/")[2].decode()
    assert "<script>alert(1)</script>" not in page
    escaped = (
        "Tides &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; ]]&gt; &lt;b&gt;bold&lt;/b&gt;"
    )
    assert f'<meta property="og:title" content="{escaped}">' in page
    index = site.get("/")[2].decode()
    assert "<script>alert(1)</script>" not in index and "&lt;script&gt;" in index
    # Edited after sending: an ESC in an article's title (YAML's "\e").
    bus = folder / "articles" / "02-night-bus.md"
    bus.write_text(
        bus.read_text(encoding="utf-8").replace(
            "title: The Night Bus Finds Its Riders", 'title: "The Night Bus\\e Finds Its Riders"'
        ),
        encoding="utf-8",
    )
    status, _, feed_bytes = site.get("/feed.xml")
    assert status == 200
    feed = feedparser.parse(feed_bytes)
    assert not feed.bozo, feed.get("bozo_exception")
    assert [entry.title for entry in feed.entries] == [hostile]
    assert "<li>The Night Bus Finds Its Riders</li>" in feed.entries[0].content[0].value
    exported = site.run("publish", "--to", str(site.root.parent / "site"))
    assert exported.exit_code == 1  # the page cannot be built with it: one clear line
    assert exported.stderr.startswith("Error: ") and "Traceback" not in exported.output


def test_a_lead_image_given_by_url_is_shared_by_that_url(site: Site) -> None:
    """An imported article's lead image is the page's og:image URL: shared as it is, not
    as a path under the issue's folder."""
    remote = 'https://cdn.example.net/wall.jpg?w=1200&q="80"'
    wall = site.config.issues_dir / ISSUE / "articles" / "01-harbour-wall.md"
    wall.write_text(WALL.replace("image: ../images/wall.jpg", f"image: '{remote}'"))
    assert site.run("publish", "1").exit_code == 0
    page = site.get(f"/{ISSUE}/")[2].decode()
    shown = html.escape(remote, quote=True)
    assert f'<meta property="og:image" content="{shown}">' in page
    assert f'<meta name="twitter:image" content="{shown}">' in page


def test_images_keep_their_own_width_and_decorative_ones_need_no_alt(site: Site) -> None:
    issue = content.read_issue(site.config.issues_dir / ISSUE)
    rendered = render.render_issue(issue, site.config)
    tags = {
        m.group(1): m.group(0)
        for m in re.finditer(r'<img\b[^>]*?src="[^"]*/([^/"]+)"[^>]*>', rendered.html)
    }
    assert 'width="300"' in tags["plan.png"] and "max-width:300px" in tags["plan.png"]
    assert 'width="552"' in tags["wall.jpg"]  # wider than the column: the column's width
    assert 'alt=""' in tags["rule.png"] and rendered.missing_alt == ()
    bus = rendered.text.rsplit("The Night Bus Finds Its Riders", 1)[1]
    assert "Ridership" in bus and "[Image" not in bus  # decoration: not in the text part


def test_a_real_send_refuses_an_image_without_alt_text_but_a_proof_goes(site: Site) -> None:
    article = site.config.issues_dir / ISSUE / "articles" / "02-night-bus.md"
    article.write_text(BUS.replace('![""]', "![]"), encoding="utf-8")
    result = site.run("send", "1", "--yes")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {article}: image '../images/rule.png' has no alt text; describe it: "
        '![A ferry at dusk](...), or write ![""](...) if it is only decoration; '
        "`newsletter check` lists them all"
    ]
    assert site.messages() == []
    with Store.open(site.config.database) as store:
        assert store.issue_snapshot(ISSUE) is None and store.publication_states() == {}
    proof = site.run("send", "1", "--test", "editor@example.org")
    assert proof.exit_code == 0, proof.output
    assert "has no alt text (a real send refuses)" in proof.stderr
    assert len(site.messages()) == 1
    check = site.run("check", "1")
    assert check.exit_code == 1
    (alt,) = [line for line in check.stdout.splitlines() if "image-alt" in line]
    assert alt.startswith("error") and alt.endswith(f"[issues/{ISSUE}/articles/02-night-bus.md:7]")


def test_a_proof_as_a_subscriber_shows_their_copy_but_goes_to_the_editor(site: Site) -> None:
    result = site.run("send", "1", "--test", "editor@example.org", "--as", "ada@example.org")
    assert result.exit_code == 0, result.output
    (proof,) = site.messages()
    assert str(proof["To"]) == "Ada Lovelace <editor@example.org>"
    assert str(proof["Subject"]).strip().startswith("[TEST] ")
    markup = html_part(proof)
    assert "Hello Ada," in markup and "subscribed as ada@example.org" in markup
    # Its unsubscribe link names the proof, not Ada: following it changes nothing.
    (unsubscribe,) = [url for url in public_links(markup) if "/u/" in url]
    status, _, _ = site.get(site.local(unsubscribe, keep_prefix=False))
    assert status == 200
    nobody = site.run("send", "1", "--test", "editor@example.org", "--as", "nobody@example.org")
    assert nobody.exit_code == 1
    assert "--as nobody@example.org: no such subscriber" in nobody.stderr
    alone = site.run("send", "1", "--as", "ada@example.org")
    assert alone.exit_code == 1 and "--as works with --test" in alone.stderr


# --- the static export ----------------------------------------------------------------------


@pytest.fixture
def static_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    folder = tmp_path / "public"
    handler = partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def fetch(url: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    conn.request("GET", parts.path or "/")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_the_static_export_works_on_a_plain_web_server(
    site: Site, static_server: tuple[Path, str]
) -> None:
    folder, root = static_server
    assert site.run("send", "1", "--yes").exit_code == 0
    assert site.run("publish", "2").exit_code == 0
    result = site.run("publish", "--to", str(folder))
    assert result.exit_code == 0, result.output
    assert "2 issue pages" in result.stdout
    # The export is served at the public address: map it onto the local server.
    pages = [root + "/"]
    checked: set[str] = set()
    while pages:
        page = pages.pop()
        status, body = fetch(page)
        assert status == 200, page
        for tag, url in links(body.decode()):
            if url.startswith(BASE):
                url = root + url[len(BASE) :]
            elif url.startswith(("http://", "https://", "mailto:", "#")):
                continue  # the articles' sources, and the index's form (the service)
            target = urljoin(page, url)
            if target in checked:
                continue
            checked.add(target)
            if tag == "a" and target.endswith("/"):
                pages.append(target)
            elif tag != "form":
                assert fetch(target)[0] == 200, (page, url)
    assert f"{root}/{ISSUE}/images/wall.jpg" in checked
    assert f"{root}/{DRAFT}/" in checked and f"{root}/feed.xml" in checked
    feed = feedparser.parse(fetch(f"{root}/feed.xml")[1])
    assert not feed.bozo and len(feed.entries) == 2
    for entry in feed.entries:
        assert fetch(root + entry.link[len(BASE) :])[0] == 200
    assert Image.open(folder / ISSUE / "images" / "wall.jpg").width == images.MAX_WIDTH


def test_the_export_replaces_its_own_folder_and_refuses_any_other(
    site: Site, tmp_path: Path
) -> None:
    assert site.run("publish", "1").exit_code == 0
    out = tmp_path / "public"
    assert site.run("publish", "--to", str(out)).exit_code == 0
    stale = out / "999-gone" / "index.html"
    stale.parent.mkdir()
    stale.write_text("old", encoding="utf-8")
    assert site.run("publish", "--to", str(out)).exit_code == 0
    assert not stale.exists() and (out / ISSUE / "index.html").is_file()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"mine")
    refused = site.run("publish", "--to", str(other))
    assert refused.exit_code == 1
    assert "is not empty and is not an earlier archive export" in refused.stderr
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]
    # A folder that cannot be written (here: /proc takes no new folder, whoever asks).
    unwritable = site.run("publish", "--to", "/proc/newsletter-archive")
    assert unwritable.exit_code == 1, unwritable.output
    assert unwritable.stderr.startswith("Error: /proc/") and "Traceback" not in unwritable.output
    assert "cannot write the archive" in unwritable.stderr


# --- checks ----------------------------------------------------------------------------------


def test_check_says_what_would_not_be_served(site: Site) -> None:
    article = site.config.issues_dir / ISSUE / "articles" / "02-night-bus.md"
    article.write_text(
        BUS
        + f"\nSee [the next one]({BASE}/{DRAFT}/), [a lost one]({BASE}/099-lost/)"
        + f" and ![A map]({BASE}/{ISSUE}/images/missing.png).\n",
        encoding="utf-8",
    )
    result = site.run("check", "1", "--json")
    assert result.exit_code == 1
    found = {(f["level"], f["code"], f["message"]) for f in json.loads(result.stdout)["findings"]}
    assert ("warning", "public-url-placeholder") in {(level, code) for level, code, _ in found}
    assert (
        "error",
        "link-not-served",
        f"link {BASE}/099-lost/ would not be served at its address: there is no issue "
        "'099-lost' to serve there",
    ) in found
    assert (
        "error",
        "image-not-served",
        f"image {BASE}/{ISSUE}/images/missing.png would not be served at its address: "
        "images/missing.png is not one of this issue's images",
    ) in found
    # The draft exists but is not on the web.
    assert (
        "error",
        "link-not-served",
        f"link {BASE}/{DRAFT}/ would not be served: issue {DRAFT} is not published; "
        f"`newsletter publish {DRAFT}` first",
    ) in found
    assert site.run("publish", "2").exit_code == 0
    again = json.loads(site.run("check", "1", "--json").stdout)
    assert not any(DRAFT in f["message"] for f in again["findings"] if f["level"] == "error")


def test_issue_show_reports_the_image_weight(site: Site) -> None:
    result = site.run("issue", "show", "1")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Images:")]
    total = sum(p.stat().st_size for p in (site.config.issues_dir / ISSUE / "images").iterdir())
    assert f"3 images, {total / 1024:.0f} KB" in line and "1 resized" in line


def test_build_writes_a_sample_for_an_example_reader(site: Site) -> None:
    result = site.run("build", "1")
    assert result.exit_code == 0, result.output
    out = site.config.build_dir / ISSUE
    sample = (out / "sample.html").read_text(encoding="utf-8")
    assert "Hello Sam," in sample and "reader@example.org" in sample
    assert render.find_placeholders(sample) == []
    with Image.open(out / "images" / "wall.jpg") as built:  # as readers get it
        assert built.width == images.MAX_WIDTH
    assert "%%nl:" in (out / "email.html").read_text(encoding="utf-8")  # the template
    parsed = email.message_from_bytes(
        (out / "sample.eml").read_bytes(), policy=email.policy.default
    )
    assert "reader@example.org" in str(parsed["To"])


def test_publish_refuses_a_page_that_cannot_be_built(site: Site) -> None:
    (site.config.issues_dir / DRAFT / "images" / "plan.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = site.run("publish", "2")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "cannot be published" in result.stderr
    assert "plan.png" in result.stderr
    with Store.open(site.config.database) as store:
        assert publish.visibility(store).pages == frozenset()


@pytest.fixture
def web() -> Iterator[LocalServer]:
    yield from serve_local()


def test_check_online_requests_every_image_and_link_and_lists_each_failure(
    site: Site, web: LocalServer
) -> None:
    """HEAD first, GET where HEAD is refused (http.server answers it 501), redirects
    followed, a stalled answer given up after [fetch] timeout; nothing leaves loopback
    (allow_private: the links' server is on 127.0.0.1, as an intranet's would be)."""
    web.routes["/ok"] = Reply(200, b"fine")
    web.routes["/moved"] = Reply(301, b"", {"Location": "/ok"})
    web.routes["/gone"] = Reply(404, b"no")
    stall = threading.Event()
    web.routes["/slow"] = Reply(200, b"late", stall=stall)
    ws = site.root
    toml = ws / "newsletter.toml"
    # The emails point at the running `serve` (which keeps its /newsletter prefix).
    toml.write_text(
        toml.read_text(encoding="utf-8").replace(BASE, f"{site.http.url}/newsletter")
        + "\n[fetch]\ntimeout = 1.0\nallow_private = true\n",
        encoding="utf-8",
    )
    articles = ws / "issues" / ISSUE / "articles"
    (articles / "01-harbour-wall.md").write_text(
        WALL.replace("https://example.org/news/harbour-wall", web.url("/moved")), encoding="utf-8"
    )
    (articles / "02-night-bus.md").write_text(
        BUS + f"\n[Fine]({web.url('/ok')}), [gone]({web.url('/gone')}), "
        f"[slow]({web.url('/slow')}).\n",
        encoding="utf-8",
    )
    assert site.run("publish", "1").exit_code == 0
    try:
        result = site.run("check", "1", "--online", "--json")
    finally:
        stall.set()
    assert result.exit_code == 1, result.output
    assert result.stdout, result.stderr
    findings = json.loads(result.stdout)["findings"]
    online = sorted((f["code"], f["message"]) for f in findings if f["code"].startswith("online-"))
    assert online == [
        ("online-link", f"link {web.url('/gone')}: answered 404"),
        ("online-link", f"link {web.url('/slow')}: no answer within 1 s"),
    ]
    (summary,) = [f["message"] for f in findings if f["code"] == "online"]
    # 3 images, the web page, the moved source link, ok, gone, slow; not the per-reader ones.
    assert summary.startswith("requested 8 images and links: 6 answered, 2 failed")
    assert web.requests_for("/ok") and web.requests_for("/moved")  # GET after the 501 to HEAD


def test_check_online_requests_no_private_address_but_the_public_one(
    site: Site, web: LocalServer
) -> None:
    """A link in an imported article may point anywhere: at the editor's router, at the
    cloud's metadata service. Without allow_private, no hop to a loopback, private or
    metadata address is requested (readers could not reach it either), except under the
    newsletter's own public address, here a local `serve`. (Only loopback here: the other
    ranges are tested in test_importers_network without any connection.)"""
    toml = site.root / "newsletter.toml"
    toml.write_text(
        toml.read_text(encoding="utf-8").replace(BASE, f"{site.http.url}/newsletter"),
        encoding="utf-8",
    )
    router, by_name = web.url("/admin"), web.url("/admin", host="localhost")
    articles = site.root / "issues" / ISSUE / "articles"
    (articles / "01-harbour-wall.md").write_text(
        WALL.replace("https://example.org/news/harbour-wall", router), encoding="utf-8"
    )
    (articles / "02-night-bus.md").write_text(BUS + f"\n[By name]({by_name}).\n", encoding="utf-8")
    assert site.run("publish", "1").exit_code == 0
    result = site.run("check", "1", "--online", "--json")
    findings = json.loads(result.stdout)["findings"]
    online = sorted(f["message"] for f in findings if f["code"] == "online-link")
    reach = "readers cannot reach it either ([fetch] allow_private = true requests it)"
    expected = [
        (router, "127.0.0.1, a loopback address"),
        (by_name, "localhost: it resolves to "),  # 127.0.0.1 or ::1, as the system says
    ]
    assert len(online) == len(expected), online
    for message, (url, why) in zip(online, sorted(expected), strict=True):
        assert message.startswith(f"link {url}: not requested: {why}"), message
        assert message.endswith(f"; {reach}"), message
    assert web.requests == []  # nothing reached the private server
    (summary,) = [f["message"] for f in findings if f["code"] == "online"]
    # The issue's page and its 3 images, on the public address, answered.
    assert summary.startswith("requested 6 images and links: 4 answered, 2 failed"), summary


# --- what a reader sees: real Chromium at a phone's and a desktop's width -------------------


@pytest.mark.browser
@pytest.mark.server
@pytest.mark.parametrize("width", [375, 1200])
def test_the_archive_index_and_an_issue_page_in_chromium(
    site: Site, tmp_path: Path, width: int
) -> None:
    from playwright.sync_api import Request, Route, sync_playwright

    assert site.run("send", "1", "--yes").exit_code == 0
    assert site.run("publish", "2").exit_code == 0
    outside: list[str] = []

    def loopback_only(route: Route, request: Request) -> None:
        if urlsplit(request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", loopback_only)
            page.goto(f"{site.http.url}/newsletter/")
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            assert page.locator("input[type=email]").is_visible()
            assert page.get_by_role("button", name="Subscribe").is_visible()
            titles = page.locator("li.issue h3").all_inner_texts()
            assert titles == ["Draft Days", "Tides and Timetables"]
            page.screenshot(path=str(tmp_path / f"index-{width}.png"), full_page=True)

            page.get_by_role("link", name="Tides and Timetables").click()
            page.wait_for_load_state("load")
            assert page.url == f"{site.http.url}/newsletter/{ISSUE}/"
            assert page.evaluate("document.documentElement.scrollWidth") <= width
            shown = page.evaluate(
                "Array.from(document.images, i => [i.src.split('/').pop(), i.complete,"
                " i.naturalWidth, i.getBoundingClientRect().width])"
            )
            assert {name for name, *_ in shown} == {"wall.jpg", "plan.png", "rule.png"}
            for name, complete, natural, drawn in shown:
                assert complete and natural > 0, name  # every image loaded
                assert drawn <= min(width, images.COLUMN_WIDTH) + 1, (name, drawn)
            plan = next(drawn for name, _, _, drawn in shown if name == "plan.png")
            assert plan <= 300  # its own width: never stretched
            page.screenshot(path=str(tmp_path / f"issue-{width}.png"), full_page=True)
        finally:
            browser.close()
    assert outside == []
