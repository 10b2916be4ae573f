"""The welcome mail a subscriber gets once they confirm (``[server] welcome_email``, off by
default): a short note from the theme's ``welcome_email.txt`` and ``.html`` (a workspace
may override them), with a link to the latest issue (``welcome_latest_issue``) and an
unsubscribe link and List-Unsubscribe header of its own, as every mail to a reader has.
Its words, subject and dates are in the newsletter's language, through the theme's
message catalogs and Babel, as the confirmation's and the issues' are."""

from __future__ import annotations

import email.policy
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import quote

from . import render
from .config import Config
from .message import first_name_of, rfc5322_date, with_to_line
from .models import Subscriber
from .publish import ArchiveEntry
from .tokens import UNSUBSCRIBE_PURPOSE, TokenSigner, address_fingerprint

TEXT_TEMPLATE = "welcome_email.txt"
HTML_TEMPLATE = "welcome_email.html"


def welcome_message(
    config: Config,
    subscriber: Subscriber,
    *,
    latest: ArchiveEntry | None = None,
    sign: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """The welcome email for ``subscriber``: text and HTML, signed if DKIM is on."""
    news = config.newsletter
    urls = config.public_urls
    token = TokenSigner(config.secrets.secret_key).make(
        UNSUBSCRIBE_PURPOSE, f"{subscriber.id}:{address_fingerprint(subscriber.email)}"
    )
    links = []
    if config.unsubscribe.url:
        links.append(f"{config.unsubscribe.url.rstrip('/')}/{token}")
    if config.unsubscribe.mailto:
        links.append(f"mailto:{config.unsubscribe.mailto}?subject={quote('unsubscribe ' + token)}")
    _ = render.theme_gettext(config)
    subject = _("Welcome to %(newsletter)s", newsletter=news.name)
    values = {
        "greeting": first_name_of(subscriber.name, subscriber.fields),
        "email": subscriber.email,
        "newsletter": news.name,
        "tagline": news.tagline,
        "subject": subject,
        "locale": news.locale,
        "archive_url": urls.home,
        "unsubscribe_url": links[0] if links else "",
        "latest": None
        if latest is None
        else {
            "title": latest.title,
            "date": render.format_date(latest.date, news.issue_date_format, news.locale),
            "url": urls.issue(latest.slug),
        },
    }
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = news.sender
    msg["Subject"] = subject
    msg["Date"] = rfc5322_date()
    msg["Message-ID"] = make_msgid(domain=config.sender_domain)
    if news.reply_to:
        msg["Reply-To"] = news.reply_to
    msg["List-Id"] = config.list_id
    if links:
        msg["List-Unsubscribe"] = ", ".join(f"<{link}>" for link in links)
    if config.unsubscribe.url:
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        render.render_theme_template(config, TEXT_TEMPLATE, values), cte="quoted-printable"
    )
    msg.add_alternative(
        render.render_theme_template(config, HTML_TEMPLATE, values),
        subtype="html",
        cte="quoted-printable",
    )
    data = with_to_line(msg.as_bytes(), subscriber.name, subscriber.email)
    return sign(data) if sign is not None else data


__all__ = ["HTML_TEMPLATE", "TEXT_TEMPLATE", "welcome_message"]
