"""``newsletter check``: what would hurt an issue's delivery, before anything is sent.

The checks read the rendered issue (HTML, text part, subject), one complete
sample message (headers as a receiver parses them), the DKIM signature of that
sample verified against the key, and optionally SpamAssassin's verdict on it.
Errors are things that break mail or the rules big receivers enforce; warnings
are things that cost inbox placement or readers; info is context.
"""

from __future__ import annotations

import dataclasses
import email.policy
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parseaddr, parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from . import dkim, images, message, publish, render
from .config import Config
from .content import Issue
from .errors import ConfigError, NewsletterError
from .render import GMAIL_CLIP_BYTES, RenderedIssue

Level = Literal["error", "warning", "info"]
LEVELS: tuple[Level, ...] = ("error", "warning", "info")
TEXT_MIN_RATIO = 0.5  # text part words / HTML visible words below this is "much shorter"
SPAM_TIMEOUT = 120.0
HEAVY_IMAGES_BYTES = 1_000_000  # images readers download with one issue, above this: a warning
ONLINE_DEADLINE = 60.0  # seconds `check --online` waits for all answers together
SPAM_INSTALL_HINT = "install it with `apt-get install spamassassin` (Debian/Ubuntu) and run again"
REQUIRED_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2007\u00a0\ufeff\u034f"), " ")


@dataclass(frozen=True)
class Finding:
    """One thing the editor should know: how bad, a stable code, what and where."""

    level: Level
    code: str
    message: str
    where: str = ""


@dataclass(frozen=True)
class SpamRule:
    name: str
    score: float
    description: str


@dataclass(frozen=True)
class SpamResult:
    """SpamAssassin's verdict on the sample message (local tests only, no network)."""

    score: float
    required: float
    rules: tuple[SpamRule, ...]
    version: str = ""


@dataclass(frozen=True)
class CheckReport:
    """Everything ``check`` found for one issue."""

    issue_number: int
    subject: str
    html_size: int
    findings: tuple[Finding, ...]
    spam: SpamResult | None = None

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        data = dataclasses.asdict(self)
        data.update(ok=self.ok, errors=len(self.errors), warnings=len(self.warnings))
        return data


def check_issue(
    config: Config,
    issue: Issue,
    *,
    spam: bool = False,
    online: bool = False,
    subscriber_fields: Iterable[str] | None = None,
) -> CheckReport:
    """Render ``issue`` and run every check on it; ``spam`` also runs SpamAssassin, and
    ``online`` requests every image and link of the email. ``subscriber_fields`` (the free
    fields subscribers have) finds ``recipient.field(...)`` names nobody has."""
    rendered = render.render_issue(issue, config)
    sample = message.sample_message(rendered, config)
    findings = [
        *(
            Finding("warning", "unknown-field", text)
            for text in render.unknown_fields(rendered, subscriber_fields or ())
            if subscriber_fields is not None
        ),
        *_check_size(rendered),
        *_check_html(rendered, issue, config.root),
        *_check_public(rendered, config),
        *(_check_online(rendered, config) if online else ()),
        *_check_body(rendered, config),
        *_check_subject(rendered, config),
        *check_headers(sample, config),
    ]
    signed = _check_dkim(rendered, config, findings)
    result = None
    if spam:
        try:
            # Score what would be sent: signed when DKIM is on (local mode cannot fetch
            # the key, so the signature neither adds nor removes points there).
            result = spam_score(signed or sample)
        except NewsletterError as exc:
            findings.append(Finding("warning", "spam-unavailable", str(exc)))
        else:
            findings.append(_spam_finding(result))
    order = {level: index for index, level in enumerate(LEVELS)}
    return CheckReport(
        issue_number=issue.number,
        subject=rendered.subject,
        html_size=rendered.html_size,
        findings=tuple(sorted(findings, key=lambda f: order[f.level])),
        spam=result,
    )


# --- size ------------------------------------------------------------------------------


def _check_size(rendered: RenderedIssue) -> Iterator[Finding]:
    size, clip = rendered.html_size, GMAIL_CLIP_BYTES
    if size > clip:
        yield Finding(
            "warning",
            "html-size",
            f"email HTML is {size / 1024:.0f} KB, over Gmail's ~{clip // 1024} KB clip: "
            "readers see '[Message clipped]' and lose the footer with the unsubscribe link; "
            "shorten the issue or use excerpts",
        )
    else:
        yield Finding(
            "info",
            "html-size",
            f"email HTML is {size / 1024:.0f} KB of Gmail's ~{clip // 1024} KB clip",
        )


# --- HTML: images and links ------------------------------------------------------------


@dataclass
class _Link:
    href: str
    line: int
    text: list[str] = dataclasses.field(default_factory=list)
    image_alt: bool = False


@dataclass(frozen=True)
class _Image:
    attrs: dict[str, str]
    line: int


class _Scan(HTMLParser):
    """Collects images and links (with the text inside each link) from the email HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[_Image] = []
        self.links: list[_Link] = []
        self._open: list[_Link] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        line = self.getpos()[0]
        if tag in ("style", "script", "title"):
            self._skip += 1
        elif tag == "img":
            self.images.append(_Image(values, line))
            if self._open and values.get("alt", "").strip():
                self._open[-1].image_alt = True
        elif tag == "a" and "href" in values:
            link = _Link(values["href"].strip(), line)
            self.links.append(link)
            self._open.append(link)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag in ("style", "script", "title"):
            self._skip -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "title"):
            self._skip = max(self._skip - 1, 0)
        elif tag == "a" and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and not self._skip:
            self._open[-1].text.append(data)


def _check_html(rendered: RenderedIssue, issue: Issue, root: Path) -> Iterator[Finding]:
    scan = _Scan()
    scan.feed(rendered.html)
    scan.close()
    locate = _Locator(issue, root)
    for image in scan.images:
        src = image.attrs.get("src", "")
        name = src.rsplit("/", 1)[-1] or src
        where = locate(name, image.line)
        if "alt" not in image.attrs:  # alt="" is decorative (or in rendered.missing_alt)
            yield Finding(
                "error",
                "image-alt",
                f"image {name} has no alt text: readers with images off (the default in "
                'many clients) see nothing; add alt="a description" (alt="" if it is only '
                "decoration); send refuses until then",
                where,
            )
        width = image.attrs.get("width", "").strip()
        if not re.fullmatch(r"\d+", width):
            problem = "has no width attribute" if not width else f"has width '{width}', not pixels"
            yield Finding(
                "warning",
                "image-width",
                f"image {name} {problem}: Outlook for Windows then shows it at its natural "
                "size and can break the layout; give it a pixel width",
                where,
            )
        yield from _check_url(src, "image", locate(name, image.line), rendered)
    for missing in rendered.missing_alt:
        path, _, image_name = missing.rpartition(": ")
        src = image_name.removeprefix("image ").strip("'")
        yield Finding(
            "error",
            "image-alt",
            f"{image_name} has no alt text: readers with images off (the default in many "
            'clients) see nothing; describe it, or write ![""](...) if it is only decoration; '
            "send refuses until then",
            _Locator(issue, root)(src, 0) if src else path,
        )
    for link in scan.links:
        where = locate(link.href, link.line)
        yield from _check_url(link.href, "link", where, rendered)
        text = "".join(link.text).translate(_INVISIBLE).strip()
        if not text and not link.image_alt:
            yield Finding(
                "warning",
                "link-empty",
                f"link to {_short(link.href)} has no text: screen readers and spam filters "
                "see a blank link; give it words",
                where,
            )


# --- the public address: placeholder, served, online ------------------------------------


def _email_urls(rendered: RenderedIssue) -> list[tuple[str, str, int]]:
    """(kind, url, line) of every image and link in the email HTML, without per-reader ones."""
    scan = _Scan()
    scan.feed(rendered.html)
    scan.close()
    found = [("image", i.attrs.get("src", "").strip(), i.line) for i in scan.images]
    found += [("link", link.href, link.line) for link in scan.links]
    return [
        (kind, url, line)
        for kind, url, line in found
        if url and url not in rendered.placeholders and not render.find_placeholders(url)
    ]


def _check_public(rendered: RenderedIssue, config: Config) -> Iterator[Finding]:
    urls = config.public_urls
    where = f"{config.path}: [newsletter] base_url"
    if urls.is_placeholder:
        yield Finding(
            "warning",
            "public-url-placeholder",
            f"the public address {urls.base} is a placeholder: the issue's images, its web "
            "link and the unsubscribe link would not work for readers; set base_url to where "
            "`newsletter serve` (or your copy of `publish --to`) answers",
            where,
        )
    slug = rendered.issue.slug
    assets = {relative for _source, relative in rendered.assets}
    others: dict[str, tuple[str, str, int]] = {}
    for kind, url, line in dict.fromkeys(_email_urls(rendered)):
        found = publish.route(config, url)
        if found is None or found.kind in ("index", "feed", "service"):
            continue
        problem = ""
        if found.slug != slug:
            folder = publish.issue_folder(config, found.slug)
            if folder is None:
                problem = f"there is no issue '{found.slug}' to serve there"
            else:
                others[found.slug] = (kind, url, line)
        elif found.kind == "asset" and found.relative not in assets:
            problem = f"{found.relative} is not one of this issue's images"
        if problem:
            yield Finding(
                "error",
                f"{kind}-not-served",
                f"{kind} {_short(url)} would not be served at its address: {problem}",
                f"email.html:{line}",
            )
    if others and config.database.exists:
        from .store import Store

        with Store.open(config.database) as store:
            visible = publish.visibility(store)
        for other, (kind, url, line) in others.items():
            needed = visible.pages if kind == "link" else visible.assets
            if other not in needed:
                yield Finding(
                    "error",
                    f"{kind}-not-served",
                    f"{kind} {_short(url)} would not be served: issue {other} is not "
                    f"published; `newsletter publish {other}` first",
                    f"email.html:{line}",
                )
    weight = images.weight(source for source, _ in rendered.assets)
    if weight.count:
        level: Level = "warning" if weight.published_bytes > HEAVY_IMAGES_BYTES else "info"
        advice = "; readers on phones wait for every one" if level == "warning" else ""
        yield Finding(level, "image-weight", f"images: {weight.describe()}{advice}")


def _check_online(rendered: RenderedIssue, config: Config) -> Iterator[Finding]:
    """Request every image and link of the email; each failure is an error."""
    from . import linkcheck

    # A fragment never reaches the server: the contents' page#article-N are one request.
    wanted = list(
        dict.fromkeys(
            (kind, url.split("#", 1)[0])
            for kind, url, _line in _email_urls(rendered)
            if url.lower().startswith(("http://", "https://"))
        )
    )
    results = linkcheck.check_urls(
        wanted,
        timeout=config.fetch.timeout,
        deadline=ONLINE_DEADLINE,
        user_agent=f"newsletter/{_version()} (+{config.public_urls.base}; link check)",
        allow_private=config.fetch.allow_private,
        trusted=config.public_urls.base,
    )
    failed = [result for result in results if not result.ok]
    for result in failed:
        yield Finding(
            "error",
            f"online-{result.kind}",
            f"{result.kind} {_short(result.url)}: {result.problem}",
        )
    yield Finding(
        "info",
        "online",
        f"requested {len(results)} images and links: {len(results) - len(failed)} answered, "
        f"{len(failed)} failed (per-reader unsubscribe links are not requested)",
    )


def _version() -> str:
    from . import __version__

    return __version__


def _check_url(url: str, kind: str, where: str, rendered: RenderedIssue) -> Iterator[Finding]:
    if url in rendered.placeholders or url.startswith("#"):
        return  # per-recipient values (checked in the sample message) and in-page anchors
    for token in render.find_placeholders(url):
        url = url.replace(token, "x")
    problem = _url_problem(url, kind)
    if problem:
        yield Finding("error", f"{kind}-malformed", f"{kind} {_short(url)}: {problem}", where)
    elif url.lower().startswith("http://"):
        yield Finding(
            "warning",
            f"{kind}-http",
            f"{kind} {_short(url)} uses http: clients warn or block it; use https",
            where,
        )


def _url_problem(url: str, kind: str) -> str | None:
    if not url:
        return "the address is empty"
    if re.search(r"\s", url):
        return "the address contains spaces"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    scheme = parts.scheme.lower()
    schemes = ("http", "https") if kind == "image" else ("http", "https", "mailto", "tel")
    if not scheme:
        return "a relative address does not work in email; write the full https:// URL"
    if scheme not in schemes:
        return f"'{scheme}:' addresses do not work here; use {' or '.join(schemes)}"
    if scheme == "mailto":
        return None if "@" in parts.path else "the mailto has no email address"
    if scheme == "tel":
        return None if re.search(r"\d", parts.path) else "the tel: link has no number"
    if not host or not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+|localhost|\[[0-9a-f:.]+\]", host):
        return f"'{parts.netloc or url}' is not a valid host name"
    return None


class _Locator:
    """Finds which article (or issue.md) a URL or image name came from, with its line."""

    def __init__(self, issue: Issue, root: Path) -> None:
        self.root = root
        self.files: list[tuple[Path, list[str]]] = []
        for path in (issue.path / "issue.md", *(a.path for a in issue.articles)):
            try:
                self.files.append((path, path.read_text(encoding="utf-8").splitlines()))
            except OSError:
                continue

    def __call__(self, needle: str, html_line: int) -> str:
        if needle:
            for path, lines in self.files:
                for number, line in enumerate(lines, start=1):
                    if needle in line:
                        shown = (
                            path.relative_to(self.root) if path.is_relative_to(self.root) else path
                        )
                        return f"{shown}:{number}"
        return f"email.html:{html_line}"


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 1] + "…"


# --- body, preheader, subject ----------------------------------------------------------


def _check_body(rendered: RenderedIssue, config: Config) -> Iterator[Finding]:
    issue_file = str(rendered.issue.path / "issue.md")
    keys = set(rendered.placeholders.values())
    html_tokens = {t for t, k in rendered.placeholders.items() if k == "unsubscribe_url"}
    if not any(
        re.search(r"""href\s*=\s*["']?[^"'>\s]*""" + re.escape(t), rendered.html)
        for t in html_tokens
    ):
        yield Finding(
            "error",
            "unsubscribe-missing",
            "the email body has no unsubscribe link: the law (CAN-SPAM, GDPR) and Gmail/Yahoo "
            "want one readers can see; keep {{ recipient.unsubscribe_url }} in a link in the "
            "footer",
            "templates/email.mjml",
        )
    if not any(t in rendered.text for t in html_tokens) and "unsubscribe_url" in keys:
        yield Finding(
            "warning",
            "unsubscribe-text-missing",
            "the text part has no unsubscribe link; "
            "add {{ recipient.unsubscribe_url }} to email.txt",
            "templates/email.txt",
        )
    address = config.newsletter.postal_address
    visible = render.visible_text(rendered.html)
    if not address:
        yield Finding(
            "warning",
            "postal-address-missing",
            "no postal address is configured: CAN-SPAM requires one in every newsletter",
            f"{config.path}: [newsletter] postal_address",
        )
    elif " ".join(address.split()) not in visible:
        yield Finding(
            "warning",
            "postal-address-hidden",
            "the postal address is configured but the email does not show it; keep "
            "{{ newsletter.postal_address }} in the footer",
            "templates/email.mjml",
        )
    preheader = rendered.preheader.strip()
    if not preheader:
        yield Finding(
            "warning",
            "preheader-missing",
            "no preheader: the inbox shows the first words of the email instead; add "
            "'preheader:' to the front matter",
            issue_file,
        )
    elif " ".join(preheader.split()) not in visible:
        yield Finding(
            "warning",
            "preheader-hidden",
            "the preheader is set but the email HTML does not contain it; keep {{ preheader }} "
            "in the template",
            "templates/email.mjml",
        )
    text_words = len(rendered.text.split())
    html_words = len(visible.translate(_INVISIBLE).split())
    if text_words == 0:
        yield Finding(
            "error",
            "text-empty",
            "the plain-text part is empty: spam filters distrust HTML-only mail and text-only "
            "readers see nothing; check templates/email.txt",
            "templates/email.txt",
        )
    elif text_words < TEXT_MIN_RATIO * html_words:
        yield Finding(
            "warning",
            "text-short",
            f"the plain-text part has {text_words} words against {html_words} in the HTML: "
            "a thin text part looks like spam; let email.txt carry the whole issue",
            "templates/email.txt",
        )


def _check_subject(rendered: RenderedIssue, config: Config) -> Iterator[Finding]:
    subject = rendered.subject.strip()
    where = str(rendered.issue.path / "issue.md")
    limit = config.newsletter.subject_max_length
    if not subject:
        yield Finding(
            "error", "subject-empty", "the subject is empty; give the issue a title", where
        )
        return
    letters = [c for c in subject if c.isalpha()]
    if len(letters) >= 4 and all(c.isupper() for c in letters):
        yield Finding(
            "warning",
            "subject-caps",
            "the subject is all capitals, which spam filters score and readers skip; "
            "write it in sentence or title case",
            where,
        )
    if len(subject) > limit:
        yield Finding(
            "warning",
            "subject-long",
            f"the subject has {len(subject)} characters (more than {limit}); inboxes cut it "
            "off, so put the point first or shorten it",
            where,
        )


# --- headers ---------------------------------------------------------------------------


def parse_message(data: bytes) -> EmailMessage:
    """Parse a message the way a receiver would (stdlib, modern policy)."""
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def check_headers(data: bytes, config: Config) -> Iterator[Finding]:
    """A complete message's headers against RFC 5322/2369/2919/8058 and the bulk-sender rules."""
    msg = parse_message(data)
    where = "sample message"
    config_where = str(config.path)
    required = list(REQUIRED_HEADERS)
    if config.newsletter.reply_to:
        required.append("Reply-To")
    if config.newsletter.precedence_bulk:
        required.append("Precedence")
    unsubscribe_hint = "set [unsubscribe] url (https) and mailto in newsletter.toml"
    for name in required:
        if msg[name] is None:
            hint = unsubscribe_hint if name.startswith("List-Unsubscribe") else "see message.py"
            yield Finding("error", "header-missing", f"the {name} header is missing; {hint}", where)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Reply-To"):
        if len(msg.get_all(name) or ()) > 1:
            yield Finding("error", "header-duplicate", f"the {name} header appears twice", where)
    if msg["From"] is not None and "@" not in parseaddr(str(msg["From"]))[1]:
        yield Finding("error", "header-invalid", "From is not an email address", config_where)
    if msg["Date"] is not None:
        try:
            parsedate_to_datetime(str(msg["Date"]))
        except (TypeError, ValueError):
            yield Finding(
                "error", "header-invalid", f"Date '{msg['Date']}' is not a valid date", where
            )
    message_id = str(msg["Message-ID"] or "")
    match = re.fullmatch(r"\s*<[^<>@\s]+@([^<>@\s]+)>\s*", message_id)
    if message_id and not match:
        yield Finding("error", "header-invalid", f"Message-ID {message_id} is malformed", where)
    elif match and match.group(1).lower() != config.sender_domain.lower():
        yield Finding(
            "error",
            "header-invalid",
            f"Message-ID is on {match.group(1)}, not on the sender's domain {config.sender_domain}",
            where,
        )
    if msg["MIME-Version"] is not None and str(msg["MIME-Version"]).strip() != "1.0":
        yield Finding("error", "header-invalid", "MIME-Version is not 1.0", where)
    list_id = str(msg["List-Id"] or "")
    if list_id and not re.search(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+\.[A-Za-z0-9.-]+>", list_id):
        yield Finding(
            "warning",
            "header-invalid",
            f"List-Id '{list_id}' is not of the form 'Name <id.example.org>' (RFC 2919)",
            config_where,
        )
    if msg["List-Unsubscribe"] is not None:
        uris = re.findall(r"<([^<>]+)>", str(msg["List-Unsubscribe"]))
        if not any(u.startswith("https://") for u in uris):
            yield Finding(
                "error",
                "unsubscribe-one-click",
                "List-Unsubscribe has no https URL, so Gmail and Yahoo cannot offer one-click "
                "unsubscribe (RFC 8058), which they require of bulk senders",
                f"{config_where}: [unsubscribe] url",
            )
        if not any(u.startswith("mailto:") for u in uris):
            yield Finding(
                "warning",
                "unsubscribe-mailto",
                "List-Unsubscribe has no mailto address; some clients only offer that one",
                f"{config_where}: [unsubscribe] mailto",
            )
    post = msg["List-Unsubscribe-Post"]
    if post is not None and str(post).strip() != "List-Unsubscribe=One-Click":
        yield Finding(
            "error",
            "header-invalid",
            "List-Unsubscribe-Post must be exactly 'List-Unsubscribe=One-Click'",
            where,
        )
    if config.newsletter.precedence_bulk and msg["Precedence"] not in (None, "bulk"):
        yield Finding("error", "header-invalid", "Precedence is not 'bulk'", where)
    if not msg.is_multipart() or {p.get_content_type() for p in msg.iter_parts()} != {
        "text/plain",
        "text/html",
    }:
        yield Finding(
            "error",
            "mime-structure",
            "the message is not multipart/alternative with a text and an HTML part",
            where,
        )


# --- DKIM ------------------------------------------------------------------------------


def _check_dkim(rendered: RenderedIssue, config: Config, findings: list[Finding]) -> bytes | None:
    """Sign the sample and verify it against the key; return the signed sample if it verifies."""
    try:
        signer = dkim.signer_from_config(config)
    except ConfigError as exc:
        findings.append(
            Finding("error", "dkim-config", _without_where(exc), exc.where or str(config.path))
        )
        return None
    if signer is None:
        findings.append(
            Finding(
                "warning",
                "dkim-off",
                "DKIM signing is off: Gmail and Yahoo require DKIM aligned with the From domain "
                "from bulk senders, and one-click unsubscribe needs it; set [dkim] selector, "
                "domain and key_file, unless your mail server signs for you",
                str(config.path),
            )
        )
        return None
    for warning in signer.warnings:
        findings.append(
            Finding("warning", "dkim-alignment", warning, f"{config.path}: [dkim] domain")
        )
    for warning in dkim.key_file_warnings(config):
        findings.append(Finding("warning", "dkim-key-file", warning))
    signed = message.sample_message(rendered, config, sign=signer)
    if not dkim.verify(signed, signer.record_value):
        findings.append(
            Finding(
                "error",
                "dkim-verify",
                "the DKIM signature on the sample message does not verify against its own key",
                str(dkim.key_path(config)),
            )
        )
        return None
    findings.append(
        Finding(
            "info",
            "dkim-ok",
            f"DKIM signs and verifies (d={signer.domain}, s={signer.selector}); the public key "
            f"must be published as TXT at {signer.record_name}",
        )
    )
    return signed


def _without_where(exc: NewsletterError) -> str:
    return f"{exc.message}; {exc.hint}" if exc.hint else exc.message


# --- SpamAssassin ----------------------------------------------------------------------


def spam_score(data: bytes, *, timeout: float = SPAM_TIMEOUT) -> SpamResult:
    """Run ``spamassassin -L -t`` (local tests only) on one message and parse its report."""
    program = shutil.which("spamassassin")
    if program is None:
        raise ConfigError(
            "SpamAssassin is not installed", where="spamassassin", hint=SPAM_INSTALL_HINT
        )
    try:
        done = subprocess.run(
            # -L: no network tests; bayes_auto_learn 0: a check must not train the user's filter.
            [program, "-L", "-t", "--cf=bayes_auto_learn 0"],
            input=data,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"SpamAssassin took longer than {timeout:.0f} s", where=program, hint="run it again"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"SpamAssassin could not run ({exc.strerror})", where=program, hint=SPAM_INSTALL_HINT
        ) from None
    result = parse_spamassassin(done.stdout.decode("utf-8", "replace"))
    if result is None:
        first = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no report"])[-1]
        raise ConfigError(
            f"SpamAssassin gave no score ({first})",
            where=program,
            hint="run `spamassassin -L -t` by hand to see why",
        )
    return result


_SA_TOTAL = re.compile(
    r"Content analysis details:\s+\((-?\d+(?:\.\d+)?) points?, (-?\d+(?:\.\d+)?) required\)"
)
_SA_RULE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]+)\s+(.*?)\s*$")
_SA_STATUS = re.compile(
    r"^X-Spam-Status:.*?score=(-?\d+(?:\.\d+)?)\s+required=(-?\d+(?:\.\d+)?)", re.M
)
_SA_VERSION = re.compile(r"^X-Spam-Checker-Version:\s*(.*?)\s*$", re.M)


def parse_spamassassin(report: str) -> SpamResult | None:
    """Score, threshold and rules from ``spamassassin -t`` output (None if there is none)."""
    total = _SA_TOTAL.search(report) or _SA_STATUS.search(report)
    if total is None:
        return None
    rules: list[SpamRule] = []
    lines = report[total.end() :].splitlines()
    in_table = False
    for line in lines:
        if line.startswith("----"):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.strip():
            break
        match = _SA_RULE.match(line)
        if match:
            rules.append(SpamRule(match.group(2), float(match.group(1)), match.group(3)))
        elif rules and line.startswith(" "):
            last = rules[-1]
            rules[-1] = dataclasses.replace(last, description=f"{last.description} {line.strip()}")
        else:
            break
    version = _SA_VERSION.search(report)
    return SpamResult(
        score=float(total.group(1)),
        required=float(total.group(2)),
        rules=tuple(rules),
        version=version.group(1) if version else "",
    )


def _spam_finding(result: SpamResult) -> Finding:
    scored = [r for r in result.rules if r.score > 0]
    fired = ", ".join(f"{r.name} ({r.score:+.1f})" for r in scored)
    text = (
        f"SpamAssassin scores the sample {result.score:.1f} (spam at {result.required:.1f}); "
        + (f"rules that add points: {fired}" if fired else "no rule adds points")
    )
    if result.score >= result.required:
        return Finding("error", "spam-score", text)
    if result.score > 0:
        return Finding("warning", "spam-score", text)
    return Finding("info", "spam-score", text)
