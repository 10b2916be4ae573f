"""The workspace and its config (``newsletter.toml``), as frozen dataclasses.

Defaults live here and nowhere else. Secrets are never read from the file: they
come from environment variables, and only through :class:`Secrets`, whose
``repr`` hides them.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .db import Database
from .errors import ConfigError, StoreError
from .segments import PAUSED, Segment, SegmentError, TagError, make_segment, normalize_tag

CONFIG_NAME = "newsletter.toml"
STATE_DIR = ".newsletter"

# Environment variables that carry secrets. Only names appear in files and logs.
ENV_SMTP_PASSWORD = "NEWSLETTER_SMTP_PASSWORD"
ENV_SECRET_KEY = "NEWSLETTER_SECRET_KEY"
ENV_DKIM_KEY_FILE = "NEWSLETTER_DKIM_KEY_FILE"
ENV_IMAP_PASSWORD = "NEWSLETTER_IMAP_PASSWORD"
ENV_DB = "NEWSLETTER_DB"
ENV_MAILGUN_SIGNING_KEY = "NEWSLETTER_MAILGUN_SIGNING_KEY"
ENV_POSTMARK_PASSWORD = "NEWSLETTER_POSTMARK_PASSWORD"
ENV_SENDGRID_PUBLIC_KEY = "NEWSLETTER_SENDGRID_PUBLIC_KEY"

_KEY_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")
# A DKIM selector or domain: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
DKIM_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class NewsletterSettings:
    """Who the newsletter is and how it presents itself."""

    name: str = "My Newsletter"
    tagline: str = ""
    sender: str = "My Newsletter <newsletter@example.org>"
    reply_to: str = ""
    # The publication's public address: the archive's home page. Issue pages, images,
    # the feed and the service's endpoints (/u, /subscribe, /confirm) all live under it.
    base_url: str = "https://example.org/newsletter"
    list_id: str = ""
    # The readers' language: the theme's words (gettext catalogs), month names and dates.
    locale: str = "en"
    # Patterns like "{month}/{day}/{yy}"; "" is the locale's own short (bylines) and long
    # (the issue's date) format: 11/18/26 and November 20, 2026 in English.
    date_format: str = ""
    issue_date_format: str = ""
    # Who "Hello ...," greets when a reader's first name is unknown; "" is the locale's
    # word for it ("there" in English).
    greeting_fallback: str = ""
    postal_address: str = ""
    subject_max_length: int = 100
    precedence_bulk: bool = True
    # A Feedback-ID header for providers' feedback loops (Gmail's FBL), e.g.
    # "{issue}:newsletter:harbour-ledger"; {issue} becomes the issue's folder name. "" = none.
    # Out of the repr: render's placeholder nonce hashes this section's repr, and a header
    # setting must not change the email's HTML.
    feedback_id: str = field(default="", repr=False)


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach the mail server. The password comes from the environment."""

    host: str = "127.0.0.1"
    port: int = 8025
    security: str = "none"  # starttls | ssl | none
    username: str = ""
    timeout: float = 30.0
    max_per_connection: int = 100
    helo_name: str = ""
    ca_file: str = ""  # PEM CA certificates to trust instead of the system store (a private CA)


@dataclass(frozen=True)
class DeliverySettings:
    """How fast, how parallel and how patient a send is."""

    rate: float = 0.0  # messages per second; 0 means no limit
    connections: int = 4
    retries: int = 3
    retry_backoff: float = 0.5
    bounce_on_5xx: bool = False
    outbox: bool = False  # also write every sent message to .newsletter/outbox/
    # Pacing for the receiving side: messages per second to each recipient domain. The
    # [delivery.domains] table names domains ("gmail.com" = 20 also covers its subdomains);
    # domain_rate applies to every other domain (0: no limit but [delivery] rate).
    domains: tuple[tuple[str, float], ...] = ()
    domain_rate: float = 0.0
    # Warm-up for a new IP or domain: from warmup_start (YYYY-MM-DD, UTC) on, at most
    # warmup_initial messages the first day, growing by warmup_growth a day, for
    # warmup_days days; then no daily cap. warmup_days = 0: no warm-up.
    warmup_start: str = ""
    warmup_days: int = 0
    warmup_initial: int = 50
    warmup_growth: float = 1.5
    # How long a send's claimed rows stay its own without a sign of life (PostgreSQL, where
    # several senders share an issue): a sender that dies leaves them `uncertain` this long
    # after its last heartbeat, which comes every third of it. Longer survives longer
    # stalls of the database connection; shorter reports a dead sender sooner.
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    """The background worker (`newsletter worker`): how often it looks and retries."""

    poll_seconds: float = 10.0  # how often it looks for new schedules and due retries
    retry_minutes: float = 15.0  # deferred recipients are retried this long after their run
    max_attempts: int = 10  # a recipient deferred this many times is left for the editor
    inbox_interval_minutes: float = 0.0  # read the [bounces] mailbox this often; 0: never
    prune_interval_minutes: float = 60.0  # drop expired unconfirmed sign-ups this often
    progress_seconds: float = 5.0  # a progress line this often while sending


@dataclass(frozen=True)
class DkimSettings:
    """Optional DKIM signing; the private key is a file, never inline."""

    selector: str = ""
    domain: str = ""
    key_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.selector and self.domain)


@dataclass(frozen=True)
class UnsubscribeSettings:
    """Where unsubscribe links point: an https endpoint and/or a mailto."""

    # base_url + "/u" (token appended); loading fills it in unless the file says url = ""
    # (no https link: mailto only). Any other value is refused: it must not disagree.
    url: str = ""
    mailto: str = ""  # e.g. unsubscribe@example.org


@dataclass(frozen=True)
class ServerSettings:
    """The subscription web service (`newsletter serve`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    confirm_ttl_hours: int = 48
    resend_interval_minutes: int = 10
    # Kept for old configs only: it must equal [newsletter] base_url, the one public address.
    public_url: str = ""
    threads: int = 8
    # Reverse proxies whose X-Forwarded-For is believed (IPs or CIDRs, e.g. "127.0.0.1").
    trusted_proxies: tuple[str, ...] = ()
    # Subscribe requests per client address per hour (beyond: 429); 0 means no limit.
    client_limit_per_hour: int = 10
    # Confirmation emails per mailbox (lower case, no +tag, Gmail without dots) per hour.
    mailbox_limit_per_hour: int = 3
    # Confirmation emails per hour in all.
    total_limit_per_hour: int = 300
    # A welcome email when someone confirms (the theme's welcome_email.txt/.html), with a
    # link to the latest issue on the web when welcome_latest_issue is on.
    welcome_email: bool = False
    welcome_latest_issue: bool = True


@dataclass(frozen=True)
class BounceSettings:
    """Bounce processing: where to fetch bounces and when soft becomes hard."""

    soft_limit: int = 3
    imap_host: str = ""
    imap_port: int = 993
    imap_username: str = ""
    imap_folder: str = "INBOX"
    imap_security: str = "ssl"  # ssl | starttls | none (none only for a loopback host)
    # The envelope sender's address, e.g. "bounces@example.org": each copy then goes out
    # from bounces+TOKEN@example.org (VERP), so a bounce names whom and which issue.
    return_path: str = ""

    @property
    def verp_prefix(self) -> str:
        """The local part before ``+TOKEN`` in the bounce address ("bounces" by default)."""
        return self.return_path.rpartition("@")[0] or "bounces"


@dataclass(frozen=True)
class FetchSettings:
    """How article import fetches web pages and feeds: patience and a size limit."""

    timeout: float = 20.0  # seconds to connect, and to wait for each piece of the answer
    max_bytes: int = 5_000_000  # a page or feed larger than this is refused
    # Fetch from loopback, private, link-local (cloud metadata) addresses too: for an
    # intranet. Off, a URL or redirect that leads there is refused.
    allow_private: bool = False


@dataclass(frozen=True)
class WebhookSettings:
    """Email services' event webhooks; their keys and passwords come from the environment."""

    ses_topic_arns: tuple[str, ...] = ()  # SNS topics whose SES notifications are accepted
    postmark_username: str = ""  # the Basic auth user put in Postmark's webhook URL
    postmark_networks: tuple[str, ...] = ()  # if set, Postmark requests only from these CIDRs


@dataclass(frozen=True)
class PreferencesSettings:
    """What a reader may choose on the preferences page (``newsletter serve``, ``/p/...``)."""

    # The tags readers may set or clear themselves, with the label the page shows.
    topics: tuple[tuple[str, str], ...] = ()
    pause: bool = True  # offer "pause all issues" (the tag `paused`)


# An SNS topic ARN: arn:aws[-partition]:sns:<region>:<12-digit account>:<topic name>.
SNS_TOPIC_ARN_RE = re.compile(r"arn:aws(?:-[a-z]+)*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_.-]{1,256}")


# The bounce address: a plain ASCII local part (no "+": VERP adds "+TOKEN") and a domain.
RETURN_PATH_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*/=?^_`{|}~-]+)*"
    rf"@{_LABEL}(?:\.{_LABEL})+"
)

PLACEHOLDER_DOMAINS = ("example.org", "example.com", "example.net")


@dataclass(frozen=True)
class PublicUrls:
    """Every address a reader reaches, derived from ``[newsletter] base_url`` alone.

    The archive's home is the base itself; each issue's page and images live at
    ``base/SLUG/``, the feed at ``base/feed.xml`` and the service's endpoints at
    ``base/u``, ``base/subscribe`` and ``base/confirm``, so none of them can disagree.
    """

    base: str  # no trailing slash

    @property
    def home(self) -> str:
        """The archive's index page."""
        return f"{self.base}/"

    def issue(self, slug: str) -> str:
        """An issue's web page (the "read on the web" link)."""
        return f"{self.base}/{slug}/"

    def asset(self, slug: str, relative: str) -> str:
        """One of an issue's images, ``relative`` to its folder (``images/x.png``)."""
        return f"{self.base}/{slug}/{relative}"

    @property
    def feed(self) -> str:
        return f"{self.base}/feed.xml"

    @property
    def subscribe(self) -> str:
        return f"{self.base}/subscribe"

    @property
    def unsubscribe(self) -> str:
        return f"{self.base}/u"

    @property
    def confirm(self) -> str:
        return f"{self.base}/confirm"

    @property
    def preferences(self) -> str:
        """The reader's preferences page (topics, pause): ``base/p/TOKEN``."""
        return f"{self.base}/p"

    @property
    def path_prefix(self) -> str:
        """The base's path ("/newsletter"; "" at a domain's root), as a proxy may keep it."""
        from urllib.parse import urlsplit

        return urlsplit(self.base).path.rstrip("/")

    @property
    def host(self) -> str:
        from urllib.parse import urlsplit

        return (urlsplit(self.base).hostname or "").lower()

    @property
    def is_placeholder(self) -> bool:
        """True for example.org/.com/.net (and their subdomains): nobody reads there."""
        return any(
            self.host == domain or self.host.endswith("." + domain)
            for domain in PLACEHOLDER_DOMAINS
        )


class Secrets:
    """Secrets from the environment; ``repr`` never shows them.

    Deliberately not a dataclass: tools that print dataclasses field by field (test
    failure reports, debuggers) must not find the values, only this ``repr``.
    """

    __slots__ = ("_values",)
    _values: tuple[str | None, ...]
    NAMES = (
        "smtp_password",
        "secret_key",
        "dkim_key_file",
        "imap_password",
        "mailgun_signing_key",
        "postmark_password",
        "sendgrid_public_key",
    )

    def __init__(
        self,
        smtp_password: str | None = None,
        secret_key: str | None = None,
        dkim_key_file: str | None = None,
        imap_password: str | None = None,
        mailgun_signing_key: str | None = None,
        postmark_password: str | None = None,
        sendgrid_public_key: str | None = None,
    ) -> None:
        values = (
            smtp_password,
            secret_key,
            dkim_key_file,
            imap_password,
            mailgun_signing_key,
            postmark_password,
            sendgrid_public_key,
        )
        object.__setattr__(self, "_values", values)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secrets are read-only; use .replace()")

    @property
    def smtp_password(self) -> str | None:
        return self._values[0]

    @property
    def secret_key(self) -> str | None:
        return self._values[1]

    @property
    def dkim_key_file(self) -> str | None:
        return self._values[2]

    @property
    def imap_password(self) -> str | None:
        return self._values[3]

    @property
    def mailgun_signing_key(self) -> str | None:
        return self._values[4]

    @property
    def postmark_password(self) -> str | None:
        return self._values[5]

    @property
    def sendgrid_public_key(self) -> str | None:
        return self._values[6]

    def replace(self, **changes: str | None) -> Secrets:
        """A copy with some values changed (the demo's throwaway key, tests)."""
        unknown = set(changes) - set(self.NAMES)
        if unknown:
            raise TypeError(f"unknown secret(s): {', '.join(sorted(unknown))}")
        current = dict(zip(self.NAMES, self._values, strict=True))
        return Secrets(**{**current, **changes})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secrets) and self._values == other._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={'<set>' if value else None}"
            for name, value in zip(self.NAMES, self._values, strict=True)
        )
        return f"Secrets({shown})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Secrets:
        env = os.environ if environ is None else environ
        return cls(
            smtp_password=env.get(ENV_SMTP_PASSWORD) or None,
            secret_key=env.get(ENV_SECRET_KEY) or None,
            dkim_key_file=env.get(ENV_DKIM_KEY_FILE) or None,
            imap_password=env.get(ENV_IMAP_PASSWORD) or None,
            mailgun_signing_key=env.get(ENV_MAILGUN_SIGNING_KEY) or None,
            postmark_password=env.get(ENV_POSTMARK_PASSWORD) or None,
            sendgrid_public_key=env.get(ENV_SENDGRID_PUBLIC_KEY) or None,
        )


@dataclass(frozen=True)
class Config:
    """Everything the tool knows about one workspace."""

    root: Path
    newsletter: NewsletterSettings = NewsletterSettings()
    smtp: SmtpSettings = SmtpSettings()
    delivery: DeliverySettings = DeliverySettings()
    dkim: DkimSettings = DkimSettings()
    unsubscribe: UnsubscribeSettings = UnsubscribeSettings()
    server: ServerSettings = ServerSettings()
    bounces: BounceSettings = BounceSettings()
    fetch: FetchSettings = FetchSettings()
    webhooks: WebhookSettings = WebhookSettings()
    worker: WorkerSettings = WorkerSettings()
    preferences: PreferencesSettings = PreferencesSettings()
    # [segments]: name -> a filter over tags, status, fields and sign-up date (segments.py).
    segments: Mapping[str, Segment] = field(default_factory=dict)
    secrets: Secrets = field(default_factory=Secrets)
    db_override: Database | None = None

    @property
    def path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def issues_dir(self) -> Path:
        return self.root / "issues"

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def build_dir(self) -> Path:
        return self.state_dir / "build"

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def feeds_path(self) -> Path:
        """The editor's feed list (content, kept in git)."""
        return self.root / "feeds.toml"

    @property
    def feed_state_path(self) -> Path:
        """What the tool remembers about feeds: ETags, Last-Modified, items seen."""
        return self.state_dir / "feeds.json"

    @property
    def database(self) -> Database:
        """Where the list and the ledger live: ``--db``/``NEWSLETTER_DB`` (a path or a
        ``postgresql://`` URL), else the workspace's SQLite file."""
        return self.db_override or Database("sqlite", self.state_dir / "newsletter.db")

    @property
    def public_urls(self) -> PublicUrls:
        """Where readers reach the publication: every public address derives from this."""
        return PublicUrls(self.newsletter.base_url.strip().rstrip("/"))

    @property
    def publish_dir(self) -> Path:
        """Resized images and other files publishing prepares once (under .newsletter/)."""
        return self.state_dir / "publish"

    @property
    def sender_domain(self) -> str:
        from email.utils import parseaddr

        address = parseaddr(self.newsletter.sender)[1]
        domain = address.rpartition("@")[2] or "localhost"
        # Message-ID and List-Id are ASCII-only: an internationalised domain in punycode.
        try:
            return domain.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return domain

    @property
    def list_id(self) -> str:
        """RFC 2919 List-Id value; defaults to the newsletter name on the sender's domain."""
        if self.newsletter.list_id:
            return self.newsletter.list_id
        slug = re.sub(r"[^a-z0-9]+", "-", self.newsletter.name.lower()).strip("-") or "list"
        return f"{self.newsletter.name} <{slug}.{self.sender_domain}>"


_SECTIONS: dict[str, type[Any]] = {
    "newsletter": NewsletterSettings,
    "smtp": SmtpSettings,
    "delivery": DeliverySettings,
    "dkim": DkimSettings,
    "unsubscribe": UnsubscribeSettings,
    "server": ServerSettings,
    "bounces": BounceSettings,
    "fetch": FetchSettings,
    "webhooks": WebhookSettings,
    "worker": WorkerSettings,
}

# Keys that look like secrets are refused in the file, with a pointer to the env var.
_SECRET_KEYS = {
    "password": ENV_SMTP_PASSWORD,
    "smtp_password": ENV_SMTP_PASSWORD,
    "secret": ENV_SECRET_KEY,
    "secret_key": ENV_SECRET_KEY,
    "imap_password": ENV_IMAP_PASSWORD,
    "private_key": ENV_DKIM_KEY_FILE,
    "signing_key": ENV_MAILGUN_SIGNING_KEY,
    "mailgun_signing_key": ENV_MAILGUN_SIGNING_KEY,
    "postmark_password": ENV_POSTMARK_PASSWORD,
    "public_key": ENV_SENDGRID_PUBLIC_KEY,
    "sendgrid_public_key": ENV_SENDGRID_PUBLIC_KEY,
}

T = TypeVar("T")


def find_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` that holds ``newsletter.toml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise ConfigError(
        f"no {CONFIG_NAME} here or in any parent folder",
        where=str(here),
        hint="run `newsletter init` to create a workspace, or cd into one",
    )


def load(
    root: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    db: Database | Path | str | None = None,
) -> Config:
    """Load and validate the workspace config at ``root`` (or found upward from cwd)."""
    root = find_root() if root is None else root.resolve()
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"no {CONFIG_NAME} found",
            where=str(root),
            hint="run `newsletter init` to create a workspace",
        )
    text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _toml_line(str(exc))
        where = f"{path}:{line}" if line else str(path)
        message = str(getattr(exc, "msg", exc)).split(" (at line")[0]
        raise ConfigError(f"invalid TOML: {message}", where=where, hint="fix the syntax") from None
    env = os.environ if environ is None else environ
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name in _MAPPED_SECTIONS and isinstance(value, dict):
            sections[name] = _MAPPED_SECTIONS[name](value, path, text)
            continue
        if name not in _SECTIONS and not isinstance(value, dict):
            raise ConfigError(
                f"unknown top-level key '{name}'",
                where=f"{path}:{_line_of(text, name)}",
                hint="keys go under a section such as [newsletter]",
            )
        if name not in _SECTIONS:
            raise ConfigError(
                f"unknown section [{name}]",
                where=f"{path}:{_line_of(text, name, section=True)}",
                hint=f"use one of: {', '.join(sorted([*_SECTIONS, *_MAPPED_SECTIONS]))}",
            )
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{name}' must be a [{name}] table",
                where=f"{path}:{_line_of(text, name)}",
                hint="see README.md for the config format",
            )
        sections[name] = _build(_SECTIONS[name], name, value, path, text)
    sections = _derive_public_urls(sections, data, path, text)
    override = _database(db, env)
    config = Config(
        root=root,
        secrets=Secrets.from_env(env),
        db_override=override,
        **sections,
    )
    _validate(config, path, text)
    return config


def _database(db: Database | Path | str | None, env: Mapping[str, str]) -> Database | None:
    """The ``--db`` option, else ``NEWSLETTER_DB``: a path or a database URL."""
    if isinstance(db, Database):
        return db
    where = "--db" if db else ENV_DB
    text = db if db else env.get(ENV_DB)
    if not text:
        return None
    try:
        database = Database.parse(text, where=where)
    except StoreError as exc:
        raise ConfigError(exc.message, where=where, hint=exc.hint) from None
    folder = None if database.path is None else database.path.parent
    if folder is not None and not folder.is_dir():
        raise ConfigError(
            f"the database folder {folder} does not exist",
            where=where,
            hint="create the folder first, or fix the path (a typo would start an empty list)",
        )
    return database


def _line_in_section(text: str, section: str, key: str) -> int:
    """The line of ``key`` inside ``[section]`` (a key may repeat in other sections)."""
    inside = False
    start = 1
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            name = header.group(1).strip()
            inside = name == section or name.startswith(section + ".")
            if name == section:
                start = number
            continue
        if inside and re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", line):
            return number
    return start


def _segments(values: dict[str, Any], path: Path, text: str) -> dict[str, Segment]:
    """``[segments]``: each name's expression, parsed now so a typo stops every command
    with the line and the position, not a send halfway."""
    out: dict[str, Segment] = {}
    for name, expression in values.items():
        where = f"{path}:{_line_in_section(text, 'segments', name)}"
        if not isinstance(expression, str):
            raise ConfigError(
                f"[segments] {name} must be a string, not {type(expression).__name__}",
                where=where,
                hint='write it as europe = "tag:europe and not tag:paused"',
            )
        try:
            out[name] = make_segment(name, expression, where=where)
        except SegmentError as exc:
            raise ConfigError(exc.message, where=where, hint=exc.hint) from None
    return out


def _preferences(values: dict[str, Any], path: Path, text: str) -> PreferencesSettings:
    """``[preferences]``: ``topics`` is a list of tags or a table of tag = "label"."""
    known = {"topics", "pause"}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"unknown key '{key}' in [preferences]",
                where=f"{path}:{_line_in_section(text, 'preferences', key)}",
                hint="use one of: pause, topics",
            )
    where = f"{path}:{_line_in_section(text, 'preferences', 'topics')}"
    raw = values.get("topics", [])
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        pairs = [(item, item) for item in raw]
    elif isinstance(raw, dict) and all(isinstance(label, str) for label in raw.values()):
        pairs = list(raw.items())
    else:
        raise ConfigError(
            '[preferences] topics must be a list of tags or a table of tag = "label"',
            where=where,
            hint='write topics = ["europe", "harbours"]',
        )
    topics: list[tuple[str, str]] = []
    for tag, label in pairs:
        try:
            normalized = normalize_tag(tag)
        except TagError as exc:
            raise ConfigError(f"[preferences] topics: {exc.message}", where=where) from None
        if normalized == PAUSED:
            raise ConfigError(
                f"[preferences] topics: {PAUSED} is the pause, not a topic",
                where=where,
                hint="remove it; pause = true offers it",
            )
        if normalized not in (t for t, _ in topics):
            topics.append((normalized, " ".join(label.split())[:100] or normalized))
    pause = values.get("pause", True)
    if not isinstance(pause, bool):
        raise ConfigError(
            "[preferences] pause must be true or false",
            where=f"{path}:{_line_in_section(text, 'preferences', 'pause')}",
        )
    return PreferencesSettings(tuple(topics), pause)


# Sections whose keys the editor names (not fixed settings): parsed by their own function.
_MAPPED_SECTIONS: dict[str, Any] = {"segments": _segments, "preferences": _preferences}


def _derive_public_urls(
    sections: dict[str, Any], data: dict[str, Any], path: Path, text: str
) -> dict[str, Any]:
    """Fill in ``[unsubscribe] url`` from ``base_url``; refuse addresses that disagree with it.

    Older configs set the unsubscribe and service addresses separately (and the README
    once put base_url at ``.../archive``); those keys are accepted when they agree.
    """
    news: NewsletterSettings = sections.get("newsletter", NewsletterSettings())
    base = news.base_url.strip().rstrip("/")
    base_line = f"{path}:{_line_of(text, 'base_url')}"
    parts = urlsplit(base)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(
            f"[newsletter] base_url '{news.base_url}' is not a web address",
            where=base_line,
            hint='write where readers reach the publication, e.g. "https://example.org/newsletter"',
        )
    urls = PublicUrls(base)
    unsubscribe: UnsubscribeSettings = sections.get("unsubscribe", UnsubscribeSettings())
    given = data.get("unsubscribe", {})
    if "url" not in given:
        # One-click unsubscribe needs https: a plain-http address (a local trial) has none.
        derived = urls.unsubscribe if parts.scheme == "https" else ""
        sections["unsubscribe"] = dataclasses.replace(unsubscribe, url=derived)
    elif unsubscribe.url and unsubscribe.url.rstrip("/") != urls.unsubscribe:
        old_base = unsubscribe.url.rstrip("/").removesuffix("/u")
        if base.endswith("/archive") and base.removesuffix("/archive") == old_base:
            raise ConfigError(
                "[newsletter] base_url is the publication's address now, not its archive's",
                where=base_line,
                hint=f'set base_url = "{old_base}" (old links under /archive/ keep working) '
                "and remove [unsubscribe] url",
            )
        raise ConfigError(
            f"[unsubscribe] url must be {urls.unsubscribe}, derived from [newsletter] base_url",
            where=f"{path}:{_line_of(text, 'url')}",
            hint='remove the line (it is derived), or write url = "" to send a mailto link only',
        )
    server: ServerSettings = sections.get("server", ServerSettings())
    if server.public_url and server.public_url.strip().rstrip("/") != base:
        raise ConfigError(
            f"[server] public_url disagrees with [newsletter] base_url ({base})",
            where=f"{path}:{_line_of(text, 'public_url')}",
            hint="remove public_url: base_url is the one public address",
        )
    return sections


def _build(cls: type[T], section: str, values: dict[str, Any], path: Path, text: str) -> T:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{path}:{_line_of(text, key)}"
        if key in _SECRET_KEYS:
            raise ConfigError(
                f"[{section}] {key}: secrets never go in the config file",
                where=where,
                hint=f"remove it and set the environment variable {_SECRET_KEYS[key]}",
            )
        if key not in known:
            raise ConfigError(
                f"unknown key '{key}' in [{section}]",
                where=where,
                hint=f"use one of: {', '.join(sorted(known))}",
            )
        if section == "delivery" and key == "domains":
            kwargs[key] = _domain_rates(value, where)
            continue
        default = known[key].default
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is tuple:  # a list of strings
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ConfigError(
                    f"[{section}] {key} must be a list of strings",
                    where=where,
                    hint='write it as ["...", "..."]',
                )
            value = tuple(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"[{section}] {key} must be {expected.__name__}, not {type(value).__name__}",
                where=where,
                hint="fix the value",
            )
        kwargs[key] = value
    return cls(**kwargs)


def _domain_rates(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    """``[delivery.domains]``: recipient domain -> messages per second, checked."""
    hint = 'write it as a table: [delivery.domains] then "gmail.com" = 20'
    if not isinstance(value, dict):
        raise ConfigError("[delivery] domains must be a table", where=where, hint=hint)
    rates: list[tuple[str, float]] = []
    for name, rate in value.items():
        domain = str(name).strip().lower().rstrip(".")
        if not DKIM_NAME_RE.fullmatch(domain) or "." not in domain:
            raise ConfigError(
                f"[delivery.domains] '{name}' is not a domain name", where=where, hint=hint
            )
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
            raise ConfigError(
                f"[delivery.domains] {name}: the rate must be a number above 0 (messages/s)",
                where=where,
                hint="e.g. 20; leave the domain out for no limit of its own",
            )
        rates.append((domain, float(rate)))
    return tuple(sorted(rates))


DATE_FIELDS = ("month", "day", "yy", "year", "mm", "dd", "month_name", "mon", "weekday")


def date_format_problem(pattern: str) -> str:
    """What is wrong with a byline date pattern such as ``{month}/{day}/{yy}``, or ""."""
    import string

    try:
        for _literal, name, spec, conversion in string.Formatter().parse(pattern):
            if name is None:
                continue
            if name not in DATE_FIELDS:
                return f"unknown field {{{name}}}"
            if spec or conversion:
                return f"{{{name}}} takes no format spec or conversion"
    except ValueError as exc:
        return f"'{pattern}' is not a valid pattern ({exc})"
    return ""


def _validate(config: Config, path: Path, text: str) -> None:
    from email.utils import parseaddr

    def fail(key: str, message: str, hint: str) -> None:
        raise ConfigError(message, where=f"{path}:{_line_of(text, key)}", hint=hint)

    for key in ("date_format", "issue_date_format"):
        problem = date_format_problem(getattr(config.newsletter, key))
        if problem:
            fail(
                key,
                f"[newsletter] {key}: {problem}",
                f"use fields like {{{', '.join(DATE_FIELDS)}}}",
            )
    try:
        from .i18n import babel_locale

        babel_locale(config.newsletter.locale)
    except ValueError as exc:
        fail(
            "locale", f"[newsletter] locale: {exc}", 'use a language code such as "en", "de", "fr"'
        )
    if "@" not in parseaddr(config.newsletter.sender)[1]:
        fail(
            "sender",
            "[newsletter] sender is not an email address",
            'write it as "Name <addr@domain>"',
        )
    for key, value in (
        ("name", config.newsletter.name),
        ("sender", config.newsletter.sender),
        ("reply_to", config.newsletter.reply_to),
        ("list_id", config.newsletter.list_id),
    ):
        if "\r" in value or "\n" in value:
            fail(key, f"[newsletter] {key} contains a line break", "put it on one line")
    if config.smtp.security not in ("starttls", "ssl", "none"):
        fail(
            "security",
            f"[smtp] security '{config.smtp.security}' is not valid",
            "use starttls, ssl or none",
        )
    if not 0 < config.smtp.port < 65536:
        fail("port", f"[smtp] port {config.smtp.port} is out of range", "use 1-65535")
    if config.delivery.connections < 1:
        fail("connections", "[delivery] connections must be at least 1", "set it to 1 or more")
    if config.delivery.rate < 0:
        fail("rate", "[delivery] rate must not be negative", "use 0 for no limit")
    if config.delivery.domain_rate < 0:
        fail("domain_rate", "[delivery] domain_rate must not be negative", "use 0 for no limit")
    if not config.delivery.lease_seconds >= 1:
        fail("lease_seconds", "[delivery] lease_seconds must be at least 1", "e.g. 60")
    if config.delivery.warmup_days < 0 or config.delivery.warmup_initial < 1:
        fail(
            "warmup_days",
            "[delivery] warmup_days must be 0 or more and warmup_initial at least 1",
            "e.g. warmup_days = 30, warmup_initial = 50",
        )
    if config.delivery.warmup_growth < 1:
        fail("warmup_growth", "[delivery] warmup_growth must be at least 1", "e.g. 1.5")
    if config.delivery.warmup_days:
        try:
            datetime.date.fromisoformat(config.delivery.warmup_start)
        except ValueError:
            fail(
                "warmup_start",
                f"[delivery] warmup_start '{config.delivery.warmup_start}' is not a date",
                "write the first day of the warm-up as YYYY-MM-DD",
            )
    for key in ("poll_seconds", "progress_seconds"):
        if getattr(config.worker, key) <= 0:
            fail(key, f"[worker] {key} must be more than 0", "e.g. 10")
    for key in ("retry_minutes", "inbox_interval_minutes", "prune_interval_minutes"):
        if getattr(config.worker, key) < 0:
            fail(key, f"[worker] {key} must not be negative", "e.g. 15")
    if config.worker.max_attempts < 1:
        fail("max_attempts", "[worker] max_attempts must be at least 1", "e.g. 10")
    if "\r" in config.newsletter.feedback_id or "\n" in config.newsletter.feedback_id:
        fail("feedback_id", "[newsletter] feedback_id contains a line break", "one line")
    for key, value in (("selector", config.dkim.selector), ("domain", config.dkim.domain)):
        if value and not DKIM_NAME_RE.fullmatch(value):
            fail(
                key,
                f"[dkim] {key} '{value}' has illegal characters",
                "use letters, digits and hyphens, with dots between labels",
            )
    if config.server.confirm_ttl_hours < 1:
        fail("confirm_ttl_hours", "[server] confirm_ttl_hours must be at least 1", "e.g. 48")
    if config.server.resend_interval_minutes < 0:
        fail(
            "resend_interval_minutes",
            "[server] resend_interval_minutes must not be negative",
            "e.g. 10",
        )
    if config.server.threads < 1:
        fail("threads", "[server] threads must be at least 1", "e.g. 8")
    for key in ("client_limit_per_hour", "mailbox_limit_per_hour", "total_limit_per_hour"):
        if getattr(config.server, key) < 0:
            fail(key, f"[server] {key} must not be negative", "use 0 for no limit")
    for proxy in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            fail(
                "trusted_proxies",
                f"[server] trusted_proxies: '{proxy}' is not an IP address or network",
                'use addresses or CIDRs, e.g. ["127.0.0.1", "10.0.0.0/8"]',
            )
    if config.bounces.soft_limit < 1:
        fail("soft_limit", "[bounces] soft_limit must be at least 1", "e.g. 3")
    if config.bounces.imap_security not in ("ssl", "starttls", "none"):
        fail(
            "imap_security",
            f"[bounces] imap_security '{config.bounces.imap_security}' is not valid",
            "use ssl, starttls or none",
        )
    if config.bounces.return_path and not RETURN_PATH_RE.fullmatch(config.bounces.return_path):
        fail(
            "return_path",
            f"[bounces] return_path '{config.bounces.return_path[:100]}' is not a plain address",
            'write the bounce mailbox\'s address, e.g. "bounces@example.org" (no "+" in it)',
        )
    if config.fetch.timeout <= 0:
        fail("timeout", "[fetch] timeout must be more than 0 seconds", "set it to e.g. 20")
    if config.fetch.max_bytes < 1:
        fail("max_bytes", "[fetch] max_bytes must be at least 1", "set it to e.g. 5000000")
    for arn in config.webhooks.ses_topic_arns:
        if not SNS_TOPIC_ARN_RE.fullmatch(arn):
            fail(
                "ses_topic_arns",
                f"[webhooks] ses_topic_arns: '{arn[:100]}' is not an SNS topic ARN",
                "copy it from the SNS console, e.g. arn:aws:sns:us-east-1:123456789012:bounces",
            )
    for network in config.webhooks.postmark_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            fail(
                "postmark_networks",
                f"[webhooks] postmark_networks: '{network[:100]}' is not an IP address or network",
                "write addresses or CIDRs such as 203.0.113.0/24",
            )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            "not UTF-8 text", where=f"{path}:{line}", hint="save it as UTF-8"
        ) from None


def _toml_line(message: str) -> int | None:
    match = re.search(r"at line (\d+)", message)
    return int(match.group(1)) if match else None


def _line_of(text: str, key: str, *, section: bool = False) -> int:
    """Best-effort line number of a key (or [section]) for error messages."""
    pattern = rf"^\s*\[\s*{re.escape(key)}\s*\]" if section else rf"^\s*\"?{re.escape(key)}\"?\s*="
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(pattern, line):
            return number
    return 1


def replace(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with top-level fields changed (tests, CLI overrides)."""
    return dataclasses.replace(config, **changes)


DEFAULT_CONFIG = """\
# newsletter workspace config. Secrets never go here: they come from environment
# variables (NEWSLETTER_SMTP_PASSWORD, NEWSLETTER_SECRET_KEY, NEWSLETTER_DKIM_KEY_FILE).

[newsletter]
name = "{name}"
tagline = ""
sender = "{name} <newsletter@example.org>"
reply_to = ""
# Where readers reach the publication: the archive's home page. Issue pages and their
# images, the feed (feed.xml) and the service's addresses (/u to unsubscribe,
# /subscribe, /confirm) all live under it. Run `newsletter serve` there (see README).
base_url = "https://example.org/newsletter"
# The readers' language (the theme ships en, de and fr); dates follow it unless
# date_format (bylines) or issue_date_format say otherwise, e.g. "{{day}}.{{month}}.{{year}}".
locale = "en"
postal_address = ""

[smtp]
host = "127.0.0.1"
port = 8025
security = "none"      # starttls | ssl | none
username = ""
# ca_file = "/etc/ssl/private-ca.pem"  # trust this CA (PEM) instead of the system's

[unsubscribe]
# The https link is base_url + "/u" (answered by `newsletter serve`); add a mailto too:
mailto = ""            # e.g. unsubscribe@example.org

# Named filters for `newsletter send ISSUE --segment NAME` (README: Tags and segments):
# [segments]
# europe = "tag:europe and not tag:harbours"

# What readers may choose on their preferences page (the link in every footer):
# [preferences]
# topics = {{ europe = "News from Europe", harbours = "Harbours and ferries" }}
"""


def init_workspace(root: Path, *, name: str = "My Newsletter") -> list[Path]:
    """Create a workspace: config, issues/, templates/, and a .gitignore for the state folder."""
    from .files import atomic_write_text

    if (root / CONFIG_NAME).exists():
        raise ConfigError(
            f"{CONFIG_NAME} already exists",
            where=str(root / CONFIG_NAME),
            hint="this folder is already a workspace; choose another folder",
        )
    if '"' in name or "\\" in name or "\n" in name:
        raise ConfigError(
            "the name may not contain quotes, backslashes or line breaks",
            where=name,
            hint="choose a plainer name",
        )
    created: list[Path] = []
    for folder in (root / "issues", root / "templates"):
        folder.mkdir(parents=True, exist_ok=True)
        created.append(folder)
    atomic_write_text(root / CONFIG_NAME, DEFAULT_CONFIG.format(name=name))
    created.append(root / CONFIG_NAME)
    gitignore = root / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    if f"{STATE_DIR}/" not in lines:
        atomic_write_text(gitignore, "\n".join([*lines, f"{STATE_DIR}/"]) + "\n")
        created.append(gitignore)
    return created
