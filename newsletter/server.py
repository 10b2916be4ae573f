"""The subscription web service: one-click unsubscribe, double opt-in, the archive, health.

A Flask app (:func:`create_app`) served by waitress, a production WSGI server in
pure Python (:func:`start_server`, ``newsletter serve``). It shares the CLI's
database. On SQLite every server thread keeps its own connection, with the store's
busy timeout, so a send running at the same time never makes a request fail with
"database is locked". On PostgreSQL a pool lends connections per operation, and any
number of ``serve`` processes, on any machines, can answer for one list: everything one
of them must know lives in the database (subscribers, confirmations, rate limits,
publications) or is stateless (signed tokens), and archive pages are rendered from
the workspace's files.

What a page shows never depends on who a token or an address belongs to beyond
what its holder already knows: a forged token gets a neutral 400 page, and a
subscribe request gets the same "check your inbox" answer, after the same work,
whatever the status of the address (no enumeration): the request only counts it
against the client's limit and queues it; a background thread (:mod:`.mailqueue`)
records it and sends the confirmation email.

No absolute link is ever built from a request header: links start with the
configured public address, or, on loopback only, with the address served.
"""

from __future__ import annotations

import contextlib
import email.policy
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, request, send_file
from werkzeug.exceptions import HTTPException

from . import publish, render
from .addresses import normalize_email
from .config import Config
from .db import Database, PooledConnection
from .delivery import outbound_from_config
from .errors import (
    NewsletterError,
    ServiceError,
    StoreError,
    TransportError,
    printable,
)
from .hooks import enabled_providers, webhook_blueprint
from .mailqueue import MailQueue
from .message import first_name_of, rfc5322_date, with_to_line
from .models import Status, Subscriber
from .ratelimit import DatabaseStorage, SubscribeLimiter, client_address, trusted_networks
from .segments import PAUSED
from .store import Store
from .tokens import (
    CONFIRM_PURPOSE,
    PREFERENCES_PURPOSE,
    UNSUBSCRIBE_PURPOSE,
    TokenData,
    TokenSigner,
    address_fingerprint,
)
from .transport import Transport
from .webhooks import MAX_BODY_BYTES as MAX_WEBHOOK_BYTES

ONE_CLICK_FIELD = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"
MAX_REQUEST_BYTES = 64 * 1024
MAX_HEADER_BYTES = 8 * 1024
MAX_NAME = 100
# Confirmation emails go out from this many threads, with this many waiting at most.
MAIL_THREADS = 4
MAIL_QUEUE_SIZE = 1000
HOUSEKEEPING_SECONDS = 300  # pruning of stale pending rows and expired counters
_EXTENSION = "newsletter"
_ERROR_PAGE = "newsletter.error_page"  # app.extensions: status code -> the page's HTML
WEBHOOKS_CONFIG = "NEWSLETTER_WEBHOOKS"  # app.config: the providers whose route answers
LOG = logging.getLogger("newsletter.server")
ACCESS = logging.getLogger("newsletter.access")
# Path segments that carry a token: /u/<token>, /confirm/<token>, /hooks/<provider>/<...>.
_TOKEN_PATH = re.compile(r"(^|/)(u|confirm)/[^/]+|(^|/)(hooks|webhooks)/([^/]+)/.+")


MAX_LOGGED_PATH = 300  # characters of a request's path in the access log


def redact_path(path: str, query: str = "") -> str:
    """A request's path for the access log, without the tokens in it (or its query), on
    one line whatever the client sent (a decoded %0A must not start a forged log line)."""

    def hide(match: re.Match[str]) -> str:
        if match.group(2):
            return f"{match.group(1)}{match.group(2)}/[redacted]"
        return f"{match.group(3)}{match.group(4)}/{match.group(5)}/[redacted]"

    shown = printable(_TOKEN_PATH.sub(hide, path))
    if len(shown) > MAX_LOGGED_PATH:
        shown = shown[:MAX_LOGGED_PATH] + "…"
    return shown + ("?[redacted]" if query else "")


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
# The archive's index posts its subscribe form to the public address's /subscribe.
INDEX_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self' {origin};"
    " frame-ancestors 'none'; base-uri 'none'"
)


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-case, or "" when it has none."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.netloc:
        return ""
    return f"{parts.scheme}://{parts.netloc}".lower()


def public_base(config: Config) -> str:
    """Where readers reach the service (no trailing slash): the one public address."""
    return config.public_urls.base


ERROR_TEMPLATE = "error.html"  # in the theme's service/ folder


def error_words(config: Config, code: int) -> tuple[str, str]:
    """The title and sentence of the error page for HTTP status ``code``, in the
    newsletter's language: what went wrong as a reader can act on it, never how (no
    exception, limit, path or server name)."""
    _ = render.theme_gettext(config)
    if code == 400:
        return _("Bad request"), _("The request could not be read. Please go back and try again.")
    if code == 403:
        return _("Not allowed"), _("This page cannot be used from here.")
    if code == 404:
        return _("Not found"), _("There is no such page.")
    if code == 405:
        return _("Not allowed"), _("This page cannot be used this way.")
    if code in (413, 431):
        return _("Too large"), _("What was sent is too large for this page.")
    if code == 414:
        return _("Address too long"), _("The address of this page is too long.")
    if code == 429:
        return _("Too many requests"), _(
            "Too many requests came from your network. Please try again later."
        )
    if code == 501:
        return _("Not supported"), _("This page cannot answer this kind of request.")
    if code == 503:
        return _("Please try again later"), _("Please try again in a few minutes.")
    if code >= 500:
        return _("Something went wrong"), _(
            "Something went wrong on our side. Please try again later."
        )
    return _("That did not work"), _("That did not work.")


def error_html(config: Config, code: int, message: str | None = None, **values: Any) -> str:
    """The theme's ``service/error.html`` for ``code`` (a workspace may override it)."""
    title, words = error_words(config, code)
    values.setdefault("subscribe_url", f"{public_base(config)}/subscribe")
    return render.render_theme_template(
        config,
        f"service/{ERROR_TEMPLATE}",
        {
            "newsletter": config.newsletter.name,
            "title": title,
            "message": message or words,
            "code": code,
            **values,
        },
    )


class PublicPrefix:
    """WSGI middleware: answer under the public address's path too.

    With ``base_url = https://example.org/newsletter``, a proxy that strips the
    prefix sends ``/u/...`` and one that keeps it sends ``/newsletter/u/...``; the
    prefix moves to SCRIPT_NAME, so both reach the same routes and every relative
    link the pages write resolves the same.
    """

    def __init__(self, app: Callable[..., Any], prefix: str) -> None:
        self.app = app
        first = prefix.strip("/").split("/", 1)[0]
        # A prefix named like one of our own paths could not be told apart: never strip it.
        self.prefix = "" if first in publish.RESERVED else prefix.rstrip("/")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if self.prefix and path == self.prefix:
            # The index's links are relative to BASE/: answered at BASE they would leave it.
            home = self.prefix.rsplit("/", 1)[-1] + "/"
            start_response(
                "308 Permanent Redirect",
                [("Location", home), ("Content-Length", "0"), ("Cache-Control", "no-store")],
            )
            return [b""]
        if self.prefix and path.startswith(self.prefix + "/"):
            environ = dict(environ)
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.prefix
            environ["PATH_INFO"] = path[len(self.prefix) :] or "/"
        return self.app(environ, start_response)


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
    _ = render.theme_gettext(config)
    subject = _("Confirm your subscription to %(newsletter)s", newsletter=news.name)
    values = {
        "greeting": first_name_of(name),
        "email": address,
        "newsletter": news.name,
        "link": link,
        "ttl_hours": config.server.confirm_ttl_hours,
        "subject": subject,
    }
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = news.sender
    msg["Subject"] = subject
    msg["Date"] = rfc5322_date()
    msg["Message-ID"] = make_msgid(domain=config.sender_domain)
    if news.reply_to:
        msg["Reply-To"] = news.reply_to
    # RFC 3834: no vacation replies to a message that a form made.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        render.render_theme_template(config, "service/confirm_email.txt", values),
        cte="quoted-printable",
    )
    msg.add_alternative(
        render.render_theme_template(config, "service/confirm_email.html", values),
        subtype="html",
        cte="quoted-printable",
    )
    data = with_to_line(msg.as_bytes(), name, address)
    return sign(data) if sign is not None else data


def _clean_name(value: str) -> str:
    """A display name from a form: no control characters, one line, not too long."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", value).split())[:MAX_NAME]


MAX_PAGE = 200  # characters of the form's page kept with a subscriber's consent


def _form_page(referer: str | None, posted_to: str) -> str:
    """The page a subscribe form was on, for the consent record: the Referer's path when
    one was sent (no host, query or fragment: a query may carry tokens or addresses),
    else the path the form was posted to. Printable, one line, bounded; never an IP."""
    path = ""
    if referer:
        with contextlib.suppress(ValueError):
            path = urlsplit(referer[:2048]).path
    path = re.sub(r"[^\x21-\x7e]", "", path or posted_to)
    return path[:MAX_PAGE] or "/"


def create_app(
    config: Config,
    store_path: Database | Path | str | None = None,
    *,
    transport_factory: Callable[[], Transport] | None = None,
    mail_threads: int = MAIL_THREADS,
    mail_queue_size: int = MAIL_QUEUE_SIZE,
    fetch_certificate: Callable[[str], bytes] | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Flask:
    """The service's WSGI app for ``config``, on the database at ``store_path``.

    ``store_path`` defaults to the workspace database. ``transport_factory`` makes
    the transport for one confirmation email (default: the configured SMTP server).
    Needs NEWSLETTER_SECRET_KEY: the same key signs the unsubscribe links in the issues.
    Confirmation emails go out from ``mail_threads`` background threads, with at most
    ``mail_queue_size`` waiting; :func:`close_app` stops them (:class:`RunningService`
    and :func:`serve_forever` do). The email services' webhooks (:mod:`.hooks`) fetch
    SNS certificates with ``fetch_certificate`` and read the time from ``clock``
    (defaults: verified https, the system clock).
    """
    signer = TokenSigner(config.secrets.secret_key)
    if store_path is None:
        database = config.database
    elif isinstance(store_path, Database):
        database = store_path
    else:
        database = Database.parse(store_path)
    with Store.open(database) as setup:  # create or migrate now, not on the first request
        setup.prune_pending(timedelta(hours=config.server.confirm_ttl_hours))
    # Confirmation mail leaves the way an issue does: same transport, same DKIM signer.
    outbound = outbound_from_config(config, make_transport=transport_factory)
    archive = publish.PageCache(config)
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
    # Werkzeug answers "//x" with a redirect to an absolute URL built from the Host header.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    # PostgreSQL: one pool of connections for every thread (the server's and the mail
    # queue's), lent per operation, so that a request holds a connection only while it
    # uses one; a broken connection is replaced by the pool.
    pool = (
        PooledConnection(database, size=config.server.threads + mail_threads)
        if database.is_postgres
        else None
    )
    shared = None if pool is None else Store(pool)
    storage = DatabaseStorage(database, connection=pool)
    limiter = SubscribeLimiter(storage, config.server, config.secrets.secret_key or "")
    proxies = trusted_networks(config.server.trusted_proxies)
    mail = MailQueue(threads=mail_threads, size=mail_queue_size)
    app.extensions[_EXTENSION] = _Background(mail, storage, pool)
    app.extensions[_ERROR_PAGE] = lambda code: error_html(config, code)
    app.wsgi_app = PublicPrefix(app.wsgi_app, config.public_urls.path_prefix)  # type: ignore[method-assign]

    # SQLite: one connection per server thread, kept open: closing the last connection
    # to a WAL database checkpoints it, which costs more than the request itself.
    connections = threading.local()
    # Our own threads take turns to write here, in order, rather than in SQLite's busy
    # handler, which sleeps and retries (unfair, and slow under load). Other processes
    # (a send) are still waited for by the busy timeout. (On PostgreSQL the store's
    # exclusive transactions wait for each other anyway; reads do not take this lock.)
    writing = threading.Lock()

    def db() -> Store:
        if shared is not None:
            return shared
        store: Store | None = getattr(connections, "store", None)
        if store is None:
            store = connections.store = Store.open(database)
        return store

    def drop_db() -> None:
        store: Store | None = getattr(connections, "store", None)
        connections.store = None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def _(message: str, **values: Any) -> str:
        """The service's words in the workspace's language (an edited catalog is seen)."""
        return render.theme_gettext(config)(message, **values)

    def page(template: str, status: int = 200, **values: Any) -> Response:
        values.setdefault("subscribe_url", _url("subscribe"))
        html = render.render_theme_template(
            config, f"service/{template}", {"newsletter": news.name, **values}
        )
        return Response(html, status=status, mimetype="text/html")

    def _url(path: str) -> str:
        """A link to one of our pages, relative to the page itself, so that the service
        works the same behind a proxy that mounts it under any path."""
        return "../" * (request.path.count("/") - 1) + path

    def redirect(path: str, code: int = 302) -> Response:
        return Response(status=code, headers={"Location": _url(path)})

    def external_base() -> str:
        """Where links start: the configured public address, never a request header."""
        return public_base(config)

    def error_page(code: int, message: str | None = None) -> Response:
        html = error_html(config, code, message, subscribe_url=_url("subscribe"))
        return Response(html, status=code, mimetype="text/html")

    def bad_link(message: str, status: int = 400) -> Response:
        return page("bad_link.html", status, title=_("This link does not work"), message=message)

    # -- unsubscribe -----------------------------------------------------------------------

    def unsubscribe_token(token: str) -> TokenData | None:
        return signer.verify(token, UNSUBSCRIBE_PURPOSE)

    @app.route("/u/<token>", methods=["GET", "HEAD", "POST"])
    def unsubscribe(token: str) -> Response:
        data = unsubscribe_token(token)
        if data is None:
            return bad_link(
                _(
                    "This unsubscribe link is incomplete or was changed. Copy the whole link"
                    " from the email, or use the unsubscribe link in a more recent issue."
                )
            )
        if request.method != "POST":
            # Link scanners fetch GETs: a GET only asks.
            return page(
                "unsubscribe.html", title=_("Unsubscribe from %(newsletter)s", newsletter=news.name)
            )
        one_click = request.form.get(ONE_CLICK_FIELD, "") == ONE_CLICK_VALUE
        reason = "one-click" if one_click else "link"
        detail = f"issue {data.context}" if data.context else ""
        ref, _colon, fingerprint = data.subject.partition(":")
        with writing:
            target = db().get_subscriber(int(ref) if ref.isdigit() else ref)
            if target is None or (fingerprint and fingerprint != address_fingerprint(target.email)):
                # Not (or no longer) this person's link: say the usual, change nothing.
                return page("unsubscribed.html", title=_("You are unsubscribed"))
            subscriber = db().unsubscribe(target.id, reason, detail)
        if subscriber is not None:
            LOG.info("unsubscribe: subscriber %s (%s, %s)", subscriber.id, reason, detail)
        # RFC 8058: answer the POST itself, never with a redirect.
        return page("unsubscribed.html", title=_("You are unsubscribed"))

    # -- preferences: topics and pause ----------------------------------------------------

    prefs = config.preferences
    topic_tags = [tag for tag, _ in prefs.topics]

    def preferences_reader(token: str) -> tuple[Subscriber | None, TokenData] | None:
        """The subscriber a preferences link was made for: None for a forged or altered
        link; (None, data) for a genuine one that names nobody on the list now (a proof
        copy's, or a subscriber since removed, whose id may belong to someone else)."""
        data = signer.verify(token, PREFERENCES_PURPOSE)
        if data is None:
            return None
        ref, _, fingerprint = data.subject.partition(":")
        reader = db().get_subscriber(int(ref)) if ref.isdigit() else None
        if reader is None or fingerprint != address_fingerprint(reader.email):
            return None, data
        return reader, data

    def preferences_page(reader: Subscriber, data: TokenData, saved: str = "") -> Response:
        tags = set(db().tags_of(reader.id))
        # The page's own unsubscribe link: the same reader and issue, signed now.
        unsubscribe_token = signer.make(UNSUBSCRIBE_PURPOSE, data.subject, data.context)
        return page(
            "preferences.html",
            title=_("Your %(newsletter)s preferences", newsletter=news.name),
            email=reader.email,
            topics=[(tag, label, tag in tags) for tag, label in prefs.topics],
            pause=prefs.pause,
            paused=PAUSED in tags,
            saved=saved,
            unsubscribe_link=_url(f"u/{unsubscribe_token}"),
        )

    @app.route("/p/<token>", methods=["GET", "HEAD", "POST"])
    def preferences(token: str) -> Response:
        found = preferences_reader(token)
        if found is None:
            return bad_link(
                _(
                    "This preferences link is incomplete or was changed. Copy the whole link"
                    " from the email, or use the one in a more recent issue."
                )
            )
        reader, data = found
        if reader is None:
            return page(
                "message.html",
                title=_("Your %(newsletter)s preferences", newsletter=news.name),
                message=_(
                    "This link names nobody on the list (it may come from a proof copy),"
                    " so there is nothing to choose here."
                ),
            )
        if reader.status != Status.ACTIVE:
            return page(
                "message.html",
                title=_("Your %(newsletter)s preferences", newsletter=news.name),
                message=_(
                    "%(email)s is not subscribed to %(newsletter)s now, so there is nothing"
                    " to choose. You can subscribe again from the subscription form.",
                    email=reader.email,
                    newsletter=news.name,
                ),
            )
        if request.method != "POST":
            return preferences_page(reader, data)  # a GET only shows
        if not same_origin():
            return page(
                "message.html",
                403,
                title=_("Not allowed"),
                message=_("Please change your preferences on the page the email links to."),
            )
        # Only the topics the editor offers, whatever else the form carries.
        chosen = set(request.form.getlist("topic")) & set(topic_tags)
        add = [tag for tag in topic_tags if tag in chosen]
        remove = [tag for tag in topic_tags if tag not in chosen]
        if prefs.pause:
            (add if request.form.get("pause") == "yes" else remove).append(PAUSED)
        detail = "preferences page" + (f", issue {data.context}" if data.context else "")
        with writing:
            added, removed = db().change_tags(
                reader.id, add, remove, reason="preferences", detail=detail
            )
        if added or removed:
            LOG.info("preferences: subscriber %s (+%s -%s)", reader.id, added, removed)
        paused_now = PAUSED in added
        saved = (
            _("Issues are paused: you will get none until you come back here and resume.")
            if paused_now
            else _("Your choices are saved.")
        )
        return preferences_page(reader, data, saved)

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
            title=_("Subscribe to %(newsletter)s", newsletter=news.name),
            tagline=news.tagline,
            error=error,
            email=address,
            name=name,
            max_name=MAX_NAME,
        )

    @app.get("/subscribe")
    def subscribe_page() -> Response:
        return subscribe_form()

    housekeeping = _Housekeeping(HOUSEKEEPING_SECONDS)

    def tidy() -> None:
        """Drop pending rows nobody confirmed in time, and expired counters."""
        if housekeeping.due():
            with writing:
                pruned = db().prune_pending(ttl)
            storage.expire()
            if pruned:
                LOG.info("pruned %d unconfirmed subscribers older than %s", pruned, ttl)

    def send_confirmation(address: str, name: str, form_page: str) -> None:
        """Record a subscribe request and send its confirmation email (a background job).

        A reservation that cannot be used (a limit, a refusal, a failure) is released,
        so that asking again later sends.
        """
        base = external_base()
        try:
            with writing:
                wanted = db().request_confirmation(
                    address,
                    name,
                    resend_after=resend_after,
                    reason="subscribe-form",
                    page=form_page,
                )
        except StoreError as exc:
            LOG.error("subscribe request not recorded: %s", exc)
            drop_db()
            return
        if wanted.send:
            try:
                sent = deliver(wanted.subscriber, base)
            except Exception:
                LOG.exception("confirmation email not sent")
                sent = False
            if not sent:
                with writing:
                    db().release_confirmation(wanted)
        tidy()

    def deliver(subscriber: Subscriber, base: str) -> bool:
        """Send one confirmation email, within the limits; True if the server took it."""
        over = limiter.mail(subscriber.email)
        if over:
            LOG.warning(
                "confirmation email for subscriber %s not sent: the %s limit is reached",
                subscriber.id,
                over,
            )
            return False
        token = signer.make(
            CONFIRM_PURPOSE, str(subscriber.id), address_fingerprint(subscriber.email)
        )
        link = f"{base}/confirm/{token}"
        data = confirmation_message(
            config, subscriber.email, subscriber.name, link, sign=outbound.sign
        )
        try:
            transport = outbound.make_transport()
            try:
                result = transport.send(envelope_from, subscriber.email, data)
            finally:
                transport.close()
        except TransportError as exc:
            LOG.error("confirmation email not sent: %s", exc)
            return False
        if result.outcome in ("failed", "deferred"):
            LOG.warning("confirmation email refused: %s %s", result.code, result.reply)
            return False
        LOG.info("confirmation email sent to subscriber %s", subscriber.id)
        return True

    def send_welcome(subscriber: Subscriber) -> None:
        """The welcome email (a background job): logged, never retried."""
        from .welcome import welcome_message

        latest = None
        if config.server.welcome_latest_issue:
            listed = entries()
            latest = max(listed, key=lambda e: (e.date, e.number), default=None)
        data = welcome_message(config, subscriber, latest=latest, sign=outbound.sign)
        try:
            transport = outbound.make_transport()
            try:
                result = transport.send(envelope_from, subscriber.email, data)
            finally:
                transport.close()
        except TransportError as exc:
            LOG.error("welcome email not sent: %s", exc)
            return
        if result.outcome in ("failed", "deferred"):
            LOG.warning("welcome email refused: %s %s", result.code, result.reply)
            return
        LOG.info("welcome email sent to subscriber %s", subscriber.id)

    def too_many(retry_after: int) -> Response:
        response = error_page(
            429,
            _("Too many subscription requests came from your network. Please try again later."),
        )
        response.headers["Retry-After"] = str(retry_after)
        return response

    @app.post("/subscribe")
    def subscribe() -> Response:
        if not same_origin():
            return page(
                "message.html",
                403,
                title=_("Not allowed"),
                message=_("Please subscribe through the form on our own site."),
            )
        address = request.form.get("email", "").strip()[:254]
        name = _clean_name(request.form.get("name", ""))
        check_inbox = page("check_inbox.html", title=_("Check your inbox"), email=address)
        if request.form.get("website"):
            return check_inbox  # a bot filled the hidden field: say the usual, do nothing
        try:
            normalize_email(address)
        except StoreError:
            return subscribe_form(
                400,
                error=_("That does not look like an email address. Please check it."),
                address=address,
                name=name,
            )
        # The same work whatever the address's status: one counter, one queued job.
        client = client_address(
            request.remote_addr or "",
            ",".join(request.headers.getlist("X-Forwarded-For")),
            proxies,
        )
        retry_after = limiter.client(client)
        if retry_after:
            return too_many(retry_after)
        # The job starts once the answer is written (or after a second), so that its
        # work, which depends on the address, cannot slow the answer down.
        answered = threading.Event()
        form_page = _form_page(request.headers.get("Referer"), request.path)

        def job() -> None:
            answered.wait(1.0)
            send_confirmation(address, name, form_page)

        if not mail.submit(job):
            LOG.warning("confirmation queue full: a subscribe request was dropped")
        check_inbox.call_on_close(answered.set)
        return check_inbox

    @app.get("/confirm/<token>")
    @app.post("/confirm/<token>")
    def confirm(token: str) -> Response:
        expired = _(
            "This confirmation link has expired or is not valid. Subscribe again to get a new one."
        )
        data = signer.verify(token, CONFIRM_PURPOSE, max_age_seconds=int(ttl.total_seconds()))
        if data is None or not data.subject.isdigit():
            return bad_link(expired)
        store = db()
        subscriber = store.get_subscriber(int(data.subject))
        if subscriber is None or address_fingerprint(subscriber.email) != data.context:
            return bad_link(expired)
        if request.method != "POST":
            # Link scanners fetch GETs (and HEADs): a GET only asks.
            return page(
                "confirm.html",
                title=_("Confirm your subscription to %(newsletter)s", newsletter=news.name),
            )
        issued = datetime.fromtimestamp(data.issued_at, UTC)
        with writing:
            before = store.get_subscriber(subscriber.id)
            confirmed = store.confirm_subscription(
                subscriber.id, issued_at=issued, detail="confirmation link"
            )
        if confirmed is None or confirmed.status != Status.ACTIVE:
            return bad_link(expired)
        if config.server.welcome_email and before is not None and before.status != Status.ACTIVE:
            welcomed = confirmed  # confirmed just now: welcome them, once
            if not mail.submit(lambda: send_welcome(welcomed)):
                LOG.warning("mail queue full: a welcome email was dropped")
        return page(
            "confirmed.html",
            title=_("You are subscribed"),
            archive=bool(publish.visibility(db()).listed),
            archive_url=_url(""),
        )

    # -- archive: BASE/, BASE/feed.xml, BASE/SLUG/ and its images ----------------------------
    # (also under /archive/, where earlier versions put them: old emails keep working)

    def issue_folder(slug: str, *, images_only: bool = False) -> Path | None:
        seen = publish.visibility(db())
        if slug not in (seen.assets if images_only else seen.pages):
            return None
        return publish.issue_folder(config, slug)

    def not_found() -> Response:
        return error_page(404)

    def entries() -> list[publish.ArchiveEntry]:
        return publish.archive_entries(config, publish.visibility(db()).listed)

    @app.get("/")
    def archive_index() -> Response:
        response = Response(publish.index_html(config, entries()), mimetype="text/html")
        origin = _origin(config.public_urls.base)
        response.headers["Content-Security-Policy"] = INDEX_CSP.format(origin=origin)
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @app.get("/feed.xml")
    def archive_feed() -> Response:
        response = Response(publish.feed_xml(config, entries()), mimetype="application/atom+xml")
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @app.get("/archive")
    @app.get("/archive/")
    def old_archive_index() -> Response:
        home = "../" if request.path.endswith("/") else "./"
        return Response(status=308, headers={"Location": home})

    @app.get("/<slug>")
    @app.get("/archive/<slug>")
    def archive_issue_redirect(slug: str) -> Response:
        # The page's images are relative to its folder: SLUG/
        if issue_folder(slug) is None:
            return not_found()
        return Response(status=308, headers={"Location": f"{slug}/"})

    @app.get("/<slug>/")
    @app.get("/archive/<slug>/")
    def archive_issue(slug: str) -> Response:
        folder = issue_folder(slug)
        if folder is None:
            return not_found()
        response = Response(archive.get(folder).html, mimetype="text/html")
        response.headers["Content-Security-Policy"] = ARCHIVE_CSP
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @app.get("/<slug>/<path:asset>")
    @app.get("/archive/<slug>/<path:asset>")
    def archive_asset(slug: str, asset: str) -> Response:
        folder = issue_folder(slug, images_only=True)
        if folder is None:
            return not_found()
        source = archive.get(folder).published_image(asset, config)  # only its own images
        if source is None:
            return not_found()
        response = send_file(source, max_age=3600, conditional=True)
        response.headers["Content-Security-Policy"] = ASSET_CSP
        return response

    # -- the email services' webhooks: POST /hooks/<provider> ------------------------------

    app.config[WEBHOOKS_CONFIG] = enabled_providers(config)
    app.register_blueprint(
        webhook_blueprint(
            config,
            db=db,
            writing=writing,
            proxies=proxies,
            fetch_certificate=fetch_certificate,
            clock=clock or (lambda: datetime.now(UTC)),
        )
    )

    # -- health and errors -----------------------------------------------------------------

    @app.get("/metrics")
    def metrics_page() -> Response:
        """Prometheus text format, computed from the database now (no personal data)."""
        from . import metrics

        return Response(metrics.render(db()), content_type=metrics.CONTENT_TYPE)

    @app.before_request
    def start_clock() -> None:
        request.environ["newsletter.started"] = time.perf_counter()

    @app.get("/healthz")
    def healthz() -> Response:
        db().count(Status.ACTIVE)  # the database answers
        return Response("ok\n", mimetype="text/plain")

    def unavailable(message: str) -> Response:
        response = error_page(503, message + " " + _("Please try again in a few minutes."))
        response.headers["Retry-After"] = "120"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        """Werkzeug's errors (404, 405, 413, ...) as the theme's page in the newsletter's
        language, not Werkzeug's English one; its headers (405's Allow) stay."""
        response = error_page(exc.code or 500)
        for name, value in exc.get_headers(request.environ):
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(NewsletterError)
    def newsletter_error(exc: NewsletterError) -> Response:
        LOG.error("%s", exc)
        if isinstance(exc, StoreError):
            drop_db()  # the next request opens a fresh connection
        return unavailable(_("Something on our side is not working."))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        LOG.exception("unexpected error")
        return error_page(500)

    @app.after_request
    def headers(response: Response) -> Response:
        location = response.headers.get("Location")
        if location is not None:
            # Werkzeug's own redirects (slashes) are absolute, from the Host header.
            parts = urlsplit(location)
            if parts.scheme or parts.netloc:
                query = f"?{parts.query}" if parts.query else ""
                response.headers["Location"] = _url(parts.path.lstrip("/") + query)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # tokens are in our URLs
        response.headers["X-Frame-Options"] = "DENY"
        started = request.environ.get("newsletter.started")
        elapsed = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        path = redact_path(request.path, request.query_string.decode("latin-1"))
        size = response.calculate_content_length()
        ACCESS.info(
            "%s %s %d %s %.1f ms",
            request.method,
            path,
            response.status_code,
            "-" if size is None else f"{size} B",
            elapsed,
            extra={
                "event": "request",
                "method": request.method,
                "path": path,
                "status": response.status_code,
                "bytes": size,
                "ms": round(elapsed, 1),
            },
        )
        return response

    return app


@dataclass(frozen=True)
class _Background:
    """What an app runs beside its requests, for :func:`close_app`."""

    mail: MailQueue
    storage: DatabaseStorage
    pool: PooledConnection | None  # PostgreSQL's connections


class _Housekeeping:
    """True at most once per ``interval`` seconds (and on the first call)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self._interval
            return True


def mail_queue(app: Flask) -> MailQueue:
    """The queue ``app`` sends its confirmation emails from (tests wait on it)."""
    background: _Background = app.extensions[_EXTENSION]
    return background.mail


def close_app(app: Flask, timeout: float = 5.0) -> int:
    """Stop ``app``'s background work: confirmation emails not started are dropped (their
    requests recorded nothing; asking again sends), running ones get ``timeout`` seconds.
    Returns how many were dropped."""
    background: _Background = app.extensions[_EXTENSION]
    dropped = background.mail.close(timeout)
    if background.mail.pending == 0:  # else a job left running may still count
        background.storage.close()
        if background.pool is not None:
            background.pool.close()
    return dropped


# --- serving ----------------------------------------------------------------------------


class _ServerLoop:
    """Runs a waitress server's loop on one thread and stops it in an order that loses no
    answer and leaves no worker writing to a closed pipe.

    waitress's workers wake the loop through a pipe (its trigger) each time they finish
    a request. Closing it under a running worker makes that write fail ("Bad file
    descriptor") or, worse, land in whatever file took the pipe's number meanwhile (the
    SQLite database). So: stop accepting, let the requests running finish and cancel the
    queued ones (waitress's ``task_dispatcher.shutdown``) while the loop keeps sending,
    close each connection once its answer has gone out, and only then the trigger.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.timeout = 5.0  # for the requests running when it stops
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # pulls from other threads against the trigger's closing
        self._closed = False

    def run(self) -> None:
        """Answer until :meth:`stop` (or Ctrl-C on the main thread), then wind down."""
        try:
            while not self._stopping.is_set():
                self._turn(self.server.adj.asyncore_loop_timeout)
        finally:
            self._wind_down(time.monotonic() + self.timeout)

    def stop(self, timeout: float) -> None:
        """From another thread: end :meth:`run`, giving running requests ``timeout`` s."""
        with self._lock:
            if not self._closed:
                self.timeout = timeout
                self._stopping.set()
                self.server.trigger.pull_trigger()  # wakes the loop now

    def _turn(self, timeout: float) -> None:
        from waitress import wasyncore

        server = self.server
        wasyncore.loop(
            timeout=max(timeout, 0.0),
            map=server._map,
            use_poll=server.adj.asyncore_use_poll,
            count=1,
        )

    def _wind_down(self, deadline: float) -> None:
        from waitress import wasyncore

        server = self.server
        # server.close() would close the trigger as well: the listening socket only.
        wasyncore.dispatcher.close(server)

        # Running requests finish (their answers go out through this loop); queued ones
        # are cancelled, their connections closed unanswered (nothing of them ran).
        finished = threading.Event()

        def finish_requests() -> None:
            try:
                server.task_dispatcher.shutdown(
                    cancel_pending=True, timeout=max(deadline - time.monotonic(), 0.0)
                )
            finally:
                # Under the lock the trigger closes under: the loop may run this thunk
                # (woken by a worker) before this write, and go on to close it.
                with self._lock:
                    server.trigger.pull_trigger(finished.set)

        threading.Thread(target=finish_requests, name="newsletter-serve-stop", daemon=True).start()
        while not finished.is_set():
            self._turn(self.server.adj.asyncore_loop_timeout)
        running = len(server.task_dispatcher.threads)  # still busy after the timeout

        # Each connection closes once what it was sent has gone out (or at the deadline).
        for channel in list(server.active_channels.values()):
            channel.close_when_flushed = True
        while server.active_channels:
            self._turn(min(deadline - time.monotonic(), 0.2))
            if time.monotonic() >= deadline:
                break

        with self._lock:
            self._closed = True
            for dispatcher in list(server._map.values()):
                if dispatcher is server.trigger and running:
                    # A worker still busy may yet pull it: left open (two descriptors).
                    dispatcher.del_channel()
                    continue
                with contextlib.suppress(OSError):
                    dispatcher.close()
            server._map.clear()


@dataclass
class RunningService:
    """A waitress server answering in a background thread: ``.url``, ``.stop()``."""

    server: Any
    thread: threading.Thread
    host: str
    port: int
    loop: _ServerLoop

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def app(self) -> Flask:
        app: Flask = self.server.newsletter_app
        return app

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, let the requests being answered finish (``timeout`` seconds),
        close every connection, end the thread, then the app's background work (see
        :func:`close_app`; ``timeout`` again for running emails)."""
        self.loop.stop(timeout)
        self.thread.join(timeout + 5)
        close_app(self.app, timeout)

    def __enter__(self) -> RunningService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Waitress's limits. Reading a request costs no worker thread (waitress buffers it
# first), so slow clients cost only a connection each: allow many, drop idle ones soon,
# and bound what one request may send. poll(), not select(), which stops at 1,024 fds.
SERVER_LIMITS: dict[str, Any] = {
    "connection_limit": 1000,
    "channel_timeout": 10,  # seconds a connection may stay idle between requests
    "cleanup_interval": 2,  # how often idle connections are looked for
    "max_request_header_size": MAX_HEADER_BYTES,
    "max_request_body_size": MAX_REQUEST_BYTES,
    "asyncore_use_poll": True,
    "backlog": 1024,
    # X-Forwarded-For reaches the app, which believes it only from [server] trusted_proxies.
    "clear_untrusted_proxy_headers": False,
}


def make_server(app: Flask, host: str, port: int, *, threads: int = 8) -> Any:
    """A waitress server bound to ``host:port`` (0 picks a free port); not yet running.

    Request bodies are capped at 64 KB, or at the webhooks' 1 MB when one of them is
    enabled (Flask still holds every other route to 64 KB).
    """
    from waitress import create_server

    limits = dict(SERVER_LIMITS)
    if app.config.get(WEBHOOKS_CONFIG):
        limits["max_request_body_size"] = max(MAX_WEBHOOK_BYTES, MAX_REQUEST_BYTES)

    _raise_file_limit(int(SERVER_LIMITS["connection_limit"]) + 100)
    try:
        server = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="newsletter",
            asyncore_loop_timeout=0.2,  # a turn of the loop at most (stop() wakes it)
            **limits,
        )
    except OSError as exc:
        raise ServiceError(
            f"cannot listen: {exc.strerror or exc}",
            where=f"{host}:{port}",
            hint="is something else running there? choose another --port",
        ) from None
    server.newsletter_app = app  # waitress keeps only a wrapper of it
    if hasattr(server, "channel_class"):
        server.channel_class = _themed_channel_class()
    return server


# What every page of ours says about itself (the app's after_request adds the same).
_PAGE_HEADERS = (
    ("Content-Security-Policy", PAGE_CSP),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


@functools.cache
def _themed_channel_class() -> Any:
    """waitress's connection class, answering what it refuses itself (a body or headers
    over the limits, a request it cannot read, a transfer coding it does not know: 413,
    431, 400, 501) with the theme's error page in the newsletter's language. waitress's
    own page is English text naming its limits ("exceeds max_body of 65536") and itself."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class ThemedErrorTask(ErrorTask):  # type: ignore[misc]
        def execute(self) -> None:
            error = self.request.error
            app = getattr(self.channel.server, "newsletter_app", None)
            make_page = app.extensions.get(_ERROR_PAGE) if app is not None else None
            try:
                body = make_page(error.code).encode("utf-8") if make_page else None
                content_type = "text/html; charset=utf-8"
            except Exception:  # a broken workspace template: still no detail
                LOG.exception("the error page could not be rendered")
                body = None
            if body is None:
                body = f"{error.code} {error.reason}\r\n".encode("latin-1")
                content_type = "text/plain; charset=utf-8"
            self.status = f"{error.code} {error.reason}"
            self.response_headers.extend([("Content-Type", content_type), *_PAGE_HEADERS])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class ThemedChannel(HTTPChannel):  # type: ignore[misc]
        error_task_class = ThemedErrorTask

    return ThemedChannel


def _raise_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor: raise the soft limit when it is lower."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def start_server(
    app: Flask, host: str = "127.0.0.1", port: int = 0, *, threads: int = 8
) -> RunningService:
    """Serve ``app`` from a background thread (tests, benchmarks); returns once it listens."""
    server = make_server(app, host, port, threads=threads)
    loop = _ServerLoop(server)
    thread = threading.Thread(target=loop.run, name="newsletter-serve", daemon=True)
    thread.start()
    return RunningService(server, thread, host, int(server.effective_port), loop)


def serve_forever(server: Any) -> None:
    """Run a server from :func:`make_server` until Ctrl-C (or SIGTERM made one), letting
    the requests being answered finish (a few seconds), then stop its app's background
    work (confirmation emails being sent get a few seconds too)."""
    try:
        _ServerLoop(server).run()
    finally:
        close_app(server.newsletter_app)
