"""The subscription web service: one-click unsubscribe, double opt-in, the archive, health.

A Flask app (:func:`create_app`) served by waitress, a production WSGI server in
pure Python (:func:`start_server`, ``newsletter serve``). It shares the CLI's
SQLite database: every request opens its own connection, with the store's busy
timeout, so a send running at the same time never makes a request fail with
"database is locked".

What a page shows never depends on who a token or an address belongs to beyond
what its holder already knows: a forged token gets a neutral 400 page, and a
subscribe request gets the same "check your inbox" answer whatever the status of
the address (no enumeration).
"""

from __future__ import annotations

import contextlib
import email.policy
import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from flask import Flask, Response, request, send_file
from werkzeug.exceptions import HTTPException

from . import content, render
from .config import Config
from .errors import (
    ContentError,
    NewsletterError,
    RenderError,
    ServiceError,
    StoreError,
    TransportError,
)
from .message import UNSUBSCRIBE_PURPOSE
from .store import Status, Store, email_key
from .tokens import TokenData, TokenSigner, address_fingerprint
from .transport import Transport, transport_from_config

CONFIRM_PURPOSE = "confirm"
ONE_CLICK_FIELD = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"
MAX_REQUEST_BYTES = 64 * 1024
MAX_NAME = 100
LOG = logging.getLogger("newsletter.server")

# Our own pages load nothing from anywhere and post only to themselves.
PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)
# Archive pages show the issue's own (possibly remote) images and styles, and run no script.
ARCHIVE_CSP = (
    "default-src 'none'; img-src 'self' https: http: data:; style-src 'self' 'unsafe-inline'"
    " https:; font-src https: data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
ASSET_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"

_PAGES = {
    "base.html": """<!doctype html>
<html lang="{{ locale }}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{{ title }} · {{ newsletter }}</title>
<style>
body{font:17px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:34em;
margin:3em auto;padding:0 1em;color:#1d2330;background:#fff}
h1{font-size:1.5em;line-height:1.25}
button{font:inherit;padding:.55em 1.4em;border:0;border-radius:4px;background:#1d4e89;
color:#fff;cursor:pointer}
label{display:block;font-weight:600}
input{font:inherit;padding:.45em;width:100%;box-sizing:border-box;margin:.25em 0 1em;
border:1px solid #98a2b3;border-radius:4px}
.error{color:#a4161a}.muted{color:#5b6475;font-size:.9em}
.hp{position:absolute;left:-10000px;width:1px;height:1px;overflow:hidden}
li{margin:.4em 0}
</style></head>
<body><main>
<h1>{{ title }}</h1>
{% block body %}{% endblock %}
</main>
<footer><p class="muted">{{ newsletter }}</p></footer></body></html>
""",
    "unsubscribe.html": """{% extends "base.html" %}{% block body %}
<p>Do you want to stop receiving {{ newsletter }}?</p>
<form method="post">
<input type="hidden" name="confirm" value="yes">
<button type="submit">Unsubscribe</button>
</form>
<p class="muted">Nothing changes until you press the button.</p>
{% endblock %}""",
    "unsubscribed.html": """{% extends "base.html" %}{% block body %}
<p>You are unsubscribed from {{ newsletter }}. You will receive no more issues.</p>
<p class="muted">Changed your mind? You can <a href="{{ subscribe_url }}">subscribe again</a>.</p>
{% endblock %}""",
    "bad_link.html": """{% extends "base.html" %}{% block body %}
<p>{{ message }}</p>
{% if subscribe_url -%}
<p><a href="{{ subscribe_url }}">Go to the subscription form</a></p>
{%- endif %}
{% endblock %}""",
    "subscribe.html": """{% extends "base.html" %}{% block body %}
{% if tagline %}<p>{{ tagline }}</p>{% endif %}
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<form method="post">
<label for="email">Email address</label>
<input id="email" name="email" type="email" required maxlength="254" autocomplete="email"
 value="{{ email }}">
<label for="name">Name <span class="muted">(optional)</span></label>
<input id="name" name="name" type="text" maxlength="{{ max_name }}" autocomplete="name"
 value="{{ name }}">
<div class="hp" aria-hidden="true"><label for="website">Leave this empty</label>
<input id="website" name="website" type="text" tabindex="-1" autocomplete="off"></div>
<button type="submit">Subscribe</button>
</form>
<p class="muted">We will send you an email with a link to confirm. Every issue has an
unsubscribe link.</p>
{% endblock %}""",
    "check_inbox.html": """{% extends "base.html" %}{% block body %}
<p>If <strong>{{ email }}</strong> can be subscribed, a message with a confirmation link is on
its way to it. Open it and follow the link to start receiving {{ newsletter }}.</p>
<p class="muted">Nothing there after a few minutes? Look in the spam folder, or
<a href="{{ subscribe_url }}">try again</a> a little later.</p>
{% endblock %}""",
    "confirmed.html": """{% extends "base.html" %}{% block body %}
<p>Thank you. You are subscribed to {{ newsletter }}; the next issue will come to your inbox.</p>
{% if archive %}<p><a href="{{ archive_url }}">Read past issues</a></p>{% endif %}
{% endblock %}""",
    "archive.html": """{% extends "base.html" %}{% block body %}
{% if issues %}<ul>
{% for item in issues %}<li><a href="{{ item.href }}">{{ item.title }}</a>
<span class="muted">· No. {{ item.number }} · {{ item.date }}</span></li>
{% endfor %}</ul>{% else %}<p>No issue has been sent yet.</p>{% endif %}
<p><a href="{{ subscribe_url }}">Subscribe</a></p>
{% endblock %}""",
    "message.html": """{% extends "base.html" %}{% block body %}
<p>{{ message }}</p>
{% endblock %}""",
    "confirm_email.txt": """Hello{{ greeting }},

someone, probably you, asked to subscribe {{ email }} to {{ newsletter }}.

To confirm, open this link within {{ ttl_hours }} hours:

{{ link }}

If you did not ask for this, ignore this message: you will not be subscribed.
""",
    "confirm_email.html": """<!doctype html>
<html lang="{{ locale }}"><head><meta charset="utf-8"><title>{{ subject }}</title></head>
<body style="font-family:Helvetica,Arial,sans-serif;font-size:16px;line-height:1.5;color:#1d2330">
<p>Hello{{ greeting }},</p>
<p>someone, probably you, asked to subscribe {{ email }} to {{ newsletter }}.</p>
<p><a href="{{ link }}" style="display:inline-block;padding:10px 20px;background:#1d4e89;
color:#ffffff;text-decoration:none;border-radius:4px">Confirm my subscription</a></p>
<p style="font-size:13px;color:#5b6475">The link works for {{ ttl_hours }} hours. If you did not
ask for this, ignore this message: you will not be subscribed.</p>
</body></html>
""",
}

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(_PAGES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
    undefined=jinja2.StrictUndefined,
)


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-case, or "" when it has none."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        return ""
    return f"{parts.scheme}://{parts.netloc}".lower()


def email_digest(address: str) -> str:
    """A short hash of an address for confirmation tokens (which are not encrypted)."""
    return hashlib.sha256(email_key(address).encode("utf-8")).hexdigest()[:16]


def public_base(config: Config) -> str:
    """Where readers reach the service (no trailing slash), or "" to use the request's."""
    if config.server.public_url:
        return config.server.public_url.rstrip("/")
    url = config.unsubscribe.url.rstrip("/")
    if url:
        return url.rsplit("/", 1)[0]
    return ""


def confirmation_message(
    config: Config,
    address: str,
    name: str,
    link: str,
    *,
    sign: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """The double opt-in email: one small MIME message (text and HTML), signed if DKIM is on."""
    news = config.newsletter
    subject = f"Confirm your subscription to {news.name}"
    values = {
        "greeting": f" {name.split()[0]}" if name.split() else "",
        "email": address,
        "newsletter": news.name,
        "link": link,
        "ttl_hours": config.server.confirm_ttl_hours,
        "subject": subject,
        "locale": news.locale,
    }
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = news.sender
    msg["To"] = formataddr((name, address))
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=config.sender_domain)
    if news.reply_to:
        msg["Reply-To"] = news.reply_to
    # RFC 3834: no vacation replies to a message that a form made.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(_ENV.get_template("confirm_email.txt").render(values), cte="quoted-printable")
    msg.add_alternative(
        _ENV.get_template("confirm_email.html").render(values),
        subtype="html",
        cte="quoted-printable",
    )
    data = msg.as_bytes()
    return sign(data) if sign is not None else data


def _clean_name(value: str) -> str:
    """A display name from a form: no control characters, one line, not too long."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", value).split())[:MAX_NAME]


@dataclass(frozen=True)
class _ArchivedIssue:
    """A sent issue rendered for the web, and the local images it may show."""

    issue: content.Issue
    html: str
    assets: dict[str, Path]


class _ArchiveCache:
    """Rendered archive pages, kept until a file of the issue or the templates changes."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._pages: dict[str, tuple[tuple[Any, ...], _ArchivedIssue]] = {}

    def _signature(self, folder: Path) -> tuple[Any, ...]:
        stamps: list[Any] = []
        for root in (folder, self._config.templates_dir):
            if root.is_dir():
                stamps.extend(
                    (str(p), p.stat().st_mtime_ns, p.stat().st_size)
                    for p in sorted(root.rglob("*"))
                    if p.is_file()
                )
        if self._config.path.is_file():
            stamps.append(self._config.path.stat().st_mtime_ns)
        return tuple(stamps)

    def get(self, folder: Path) -> _ArchivedIssue:
        signature = self._signature(folder)
        with self._lock:
            cached = self._pages.get(folder.name)
            if cached is not None and cached[0] == signature:
                return cached[1]
        issue = content.read_issue(folder)
        # Relative image addresses: the page is served at /archive/<slug>/, beside them.
        rendered = render.render_issue(issue, self._config, asset_base="")
        if render.find_placeholders(rendered.web_html):
            raise RenderError(
                "the web page still has personal placeholders",
                where=str(folder),
                hint="the templates must not use recipient values when web is true",
            )
        page = _ArchivedIssue(
            issue, rendered.web_html, {relative: source for source, relative in rendered.assets}
        )
        with self._lock:
            self._pages[folder.name] = (signature, page)
        return page


def create_app(
    config: Config,
    store_path: Path | str | None = None,
    *,
    transport_factory: Callable[[], Transport] | None = None,
) -> Flask:
    """The service's WSGI app for ``config``, on the database at ``store_path``.

    ``store_path`` defaults to the workspace database. ``transport_factory`` makes
    the transport for one confirmation email (default: the configured SMTP server).
    Needs NEWSLETTER_SECRET_KEY: the same key signs the unsubscribe links in the issues.
    """
    from .dkim import signer_from_config

    signer = TokenSigner(config.secrets.secret_key)
    db_path = Path(store_path) if store_path is not None else config.db_path
    Store.open(db_path).close()  # create or migrate now, not on the first request
    sign = signer_from_config(config)
    make_transport = transport_factory or (lambda: transport_from_config(config))
    archive = _ArchiveCache(config)
    news = config.newsletter
    ttl = timedelta(hours=config.server.confirm_ttl_hours)
    resend_after = timedelta(minutes=config.server.resend_interval_minutes)
    envelope_from = parseaddr(news.sender)[1]
    trusted_origins = {
        origin
        for origin in (
            _origin(config.server.public_url),
            _origin(config.unsubscribe.url),
            _origin(news.base_url),
        )
        if origin
    }

    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    # One connection per server thread, kept open: closing the last connection to a
    # WAL database checkpoints it, which costs more than the request itself.
    connections = threading.local()
    # Our own threads take turns to write here, in order, rather than in SQLite's busy
    # handler, which sleeps and retries (unfair, and slow under load). Other processes
    # (a send) are still waited for by the busy timeout.
    writing = threading.Lock()

    def db() -> Store:
        store: Store | None = getattr(connections, "store", None)
        if store is None:
            store = connections.store = Store.open(db_path)
        return store

    def drop_db() -> None:
        store: Store | None = getattr(connections, "store", None)
        connections.store = None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def page(template: str, status: int = 200, **values: Any) -> Response:
        values.setdefault("subscribe_url", _url("subscribe"))
        html = _ENV.get_template(template).render(
            newsletter=news.name, locale=news.locale, **values
        )
        return Response(html, status=status, mimetype="text/html")

    def _url(path: str) -> str:
        """A link to one of our pages, relative to the page itself, so that the service
        works the same behind a proxy that mounts it under any path."""
        return "../" * (request.path.count("/") - 1) + path

    def redirect(path: str, code: int = 302) -> Response:
        return Response(status=code, headers={"Location": _url(path)})

    def external_base() -> str:
        return public_base(config) or request.url_root.rstrip("/")

    def bad_link(message: str, status: int = 400) -> Response:
        return page("bad_link.html", status, title="This link does not work", message=message)

    # -- unsubscribe -----------------------------------------------------------------------

    def unsubscribe_token(token: str) -> TokenData | None:
        return signer.verify(token, UNSUBSCRIBE_PURPOSE)

    @app.route("/u/<token>", methods=["GET", "HEAD", "POST"])
    def unsubscribe(token: str) -> Response:
        data = unsubscribe_token(token)
        if data is None:
            return bad_link(
                "This unsubscribe link is incomplete or was changed. Copy the whole link from"
                " the email, or use the unsubscribe link in a more recent issue."
            )
        if request.method != "POST":
            # Link scanners fetch GETs: a GET only asks.
            return page("unsubscribe.html", title=f"Unsubscribe from {news.name}")
        one_click = request.form.get(ONE_CLICK_FIELD, "") == ONE_CLICK_VALUE
        reason = "one-click" if one_click else "link"
        detail = f"issue {data.context}" if data.context else ""
        ref, _, fingerprint = data.subject.partition(":")
        with writing:
            target = db().get_subscriber(int(ref) if ref.isdigit() else ref)
            if target is None or (fingerprint and fingerprint != address_fingerprint(target.email)):
                # Not (or no longer) this person's link: say the usual, change nothing.
                return page("unsubscribed.html", title="You are unsubscribed")
            subscriber = db().unsubscribe(target.id, reason, detail)
        if subscriber is not None:
            LOG.info("unsubscribe: subscriber %s (%s, %s)", subscriber.id, reason, detail)
        # RFC 8058: answer the POST itself, never with a redirect.
        return page("unsubscribed.html", title="You are unsubscribed")

    # -- subscribe -------------------------------------------------------------------------

    def same_origin() -> bool:
        """Cross-site form posts are refused: Origin (or Referer) must be ours when sent."""
        allowed = trusted_origins | {_origin(request.host_url)}
        sent = request.headers.get("Origin")
        if sent is not None:
            return sent.lower() in allowed
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            return False
        referer = request.headers.get("Referer")
        if referer:
            return _origin(referer) in allowed
        return True

    def subscribe_form(
        status: int = 200, *, error: str = "", address: str = "", name: str = ""
    ) -> Response:
        return page(
            "subscribe.html",
            status,
            title=f"Subscribe to {news.name}",
            tagline=news.tagline,
            error=error,
            email=address,
            name=name,
            max_name=MAX_NAME,
        )

    @app.get("/subscribe")
    def subscribe_page() -> Response:
        return subscribe_form()

    @app.post("/subscribe")
    def subscribe() -> Response:
        if not same_origin():
            return page(
                "message.html",
                403,
                title="Not allowed",
                message="Please subscribe through the form on our own site.",
            )
        address = request.form.get("email", "").strip()[:254]
        name = _clean_name(request.form.get("name", ""))
        check_inbox = page("check_inbox.html", title="Check your inbox", email=address)
        if request.form.get("website"):
            return check_inbox  # a bot filled the hidden field: say the usual, do nothing
        try:
            with writing:
                wanted = db().request_confirmation(
                    address, name, resend_after=resend_after, reason="subscribe-form"
                )
        except StoreError as exc:
            if "invalid email address" not in exc.message:
                raise
            return subscribe_form(
                400,
                error="That does not look like an email address. Please check it.",
                address=address,
                name=name,
            )
        if not wanted.send:
            return check_inbox
        subscriber = wanted.subscriber
        token = signer.make(CONFIRM_PURPOSE, str(subscriber.id), email_digest(subscriber.email))
        link = f"{external_base()}/confirm/{token}"
        data = confirmation_message(config, subscriber.email, subscriber.name, link, sign=sign)
        transport = make_transport()
        try:
            result = transport.send(envelope_from, subscriber.email, data)
        except TransportError as exc:
            LOG.error("confirmation email not sent: %s", exc)
            with writing:
                db().release_confirmation(wanted)
            return unavailable("We could not send the confirmation email just now.")
        finally:
            transport.close()
        if result.outcome in ("failed", "deferred"):
            LOG.warning("confirmation email refused: %s %s", result.code, result.reply)
            with writing:
                db().release_confirmation(wanted)
            if result.outcome == "failed":
                return subscribe_form(
                    400,
                    error="Our mail server refused this address. Please check it.",
                    address=address,
                    name=name,
                )
            return unavailable("We could not send the confirmation email just now.")
        LOG.info("confirmation email sent to subscriber %s", subscriber.id)
        return check_inbox

    @app.get("/confirm/<token>")
    def confirm(token: str) -> Response:
        expired = (
            "This confirmation link has expired or is not valid. Subscribe again to get a new one."
        )
        data = signer.verify(token, CONFIRM_PURPOSE, max_age_seconds=int(ttl.total_seconds()))
        if data is None or not data.subject.isdigit():
            return bad_link(expired)
        store = db()
        subscriber = store.get_subscriber(int(data.subject))
        if subscriber is None or email_digest(subscriber.email) != data.context:
            return bad_link(expired)
        issued = datetime.fromtimestamp(data.issued_at, UTC)
        with writing:
            confirmed = store.confirm_subscription(
                subscriber.id, issued_at=issued, detail="confirmation link"
            )
        if confirmed is None or confirmed.status != Status.ACTIVE:
            return bad_link(expired)
        return page(
            "confirmed.html",
            title="You are subscribed",
            archive=bool(sent_issue_keys()),
            archive_url=_url("archive"),
        )

    # -- archive ---------------------------------------------------------------------------

    def sent_issue_keys() -> list[str]:
        return db().sent_issue_keys()

    def sent_folder(slug: str) -> Path | None:
        if slug not in sent_issue_keys():
            return None
        folder = config.issues_dir / slug
        if folder.parent.resolve() != config.issues_dir.resolve() or not folder.is_dir():
            return None
        return folder

    def not_found() -> Response:
        return page("message.html", 404, title="Not found", message="There is no such page.")

    @app.get("/archive")
    @app.get("/archive/")
    def archive_index() -> Response:
        found: list[tuple[tuple[Any, int], dict[str, Any]]] = []
        for key in sent_issue_keys():
            folder = sent_folder(key)
            if folder is None:
                continue
            try:
                issue = content.read_issue(folder)
            except ContentError as exc:
                LOG.warning("archive: skipping %s: %s", key, exc)
                continue
            item = {
                "href": _url(f"archive/{key}/"),
                "title": issue.title,
                "number": issue.number,
                "date": render.format_date(issue.date, news.issue_date_format),
            }
            found.append(((issue.date, issue.number), item))
        found.sort(key=lambda pair: pair[0], reverse=True)
        items = [item for _, item in found]
        response = page("archive.html", title=f"{news.name}: past issues", issues=items)
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @app.get("/archive/<slug>")
    def archive_issue_redirect(slug: str) -> Response:
        # The page's images are relative to the folder: /archive/<slug>/
        if sent_folder(slug) is None:
            return not_found()
        return redirect(f"archive/{slug}/", code=308)

    @app.get("/archive/<slug>/")
    def archive_issue(slug: str) -> Response:
        folder = sent_folder(slug)
        if folder is None:
            return not_found()
        archived = archive.get(folder)
        response = Response(archived.html, mimetype="text/html")
        response.headers["Content-Security-Policy"] = ARCHIVE_CSP
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @app.get("/archive/<slug>/<path:asset>")
    def archive_asset(slug: str, asset: str) -> Response:
        folder = sent_folder(slug)
        if folder is None:
            return not_found()
        source = archive.get(folder).assets.get(asset)  # only the issue's own images
        if source is None or not source.is_file():
            return not_found()
        response = send_file(source, max_age=3600, conditional=True)
        response.headers["Content-Security-Policy"] = ASSET_CSP
        return response

    # -- health and errors -----------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> Response:
        db().count(Status.ACTIVE)  # the database answers
        return Response("ok\n", mimetype="text/plain")

    @app.get("/")
    def home() -> Response:
        return redirect("subscribe")

    def unavailable(message: str) -> Response:
        response = page(
            "message.html",
            503,
            title="Please try again later",
            message=f"{message} Please try again in a few minutes.",
        )
        response.headers["Retry-After"] = "120"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        if exc.code == 404:
            return not_found()
        return page("message.html", exc.code or 500, title=exc.name, message="That did not work.")

    @app.errorhandler(NewsletterError)
    def newsletter_error(exc: NewsletterError) -> Response:
        LOG.error("%s", exc)
        if isinstance(exc, StoreError):
            drop_db()  # the next request opens a fresh connection
        return unavailable("Something on our side is not working.")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        LOG.exception("unexpected error")
        return page(
            "message.html",
            500,
            title="Something went wrong",
            message="Something went wrong on our side. Please try again later.",
        )

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # tokens are in our URLs
        response.headers["X-Frame-Options"] = "DENY"
        return response

    return app


# --- serving ----------------------------------------------------------------------------


@dataclass
class RunningService:
    """A waitress server answering in a background thread: ``.url``, ``.stop()``."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Close the listening socket and every connection, and end the thread.

        The closing runs on the server's own thread (through its trigger): closing
        sockets under a running select() from here would break it.
        """
        from waitress import wasyncore

        if self.thread.is_alive():
            self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
            self.thread.join(5)

    def __enter__(self) -> RunningService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_server(app: Flask, host: str, port: int, *, threads: int = 8) -> Any:
    """A waitress server bound to ``host:port`` (0 picks a free port); not yet running."""
    from waitress import create_server

    try:
        return create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="newsletter",
            asyncore_loop_timeout=0.2,  # how soon stop() is noticed
            channel_timeout=60,
        )
    except OSError as exc:
        raise ServiceError(
            f"cannot listen: {exc.strerror or exc}",
            where=f"{host}:{port}",
            hint="is something else running there? choose another --port",
        ) from None


def start_server(
    app: Flask, host: str = "127.0.0.1", port: int = 0, *, threads: int = 8
) -> RunningService:
    """Serve ``app`` from a background thread (tests, benchmarks); returns once it listens."""
    server = make_server(app, host, port, threads=threads)
    thread = threading.Thread(target=server.run, name="newsletter-serve", daemon=True)
    thread.start()
    return RunningService(server, thread, host, int(server.effective_port))


def serve_forever(server: Any) -> None:
    """Run a server from :func:`make_server` until Ctrl-C."""
    from waitress import wasyncore

    try:
        server.run()
    finally:
        wasyncore.close_all(server._map)
