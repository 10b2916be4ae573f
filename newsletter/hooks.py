"""The email services' webhooks in ``newsletter serve``: ``POST /hooks/<provider>``.

``/hooks/ses`` (Amazon SES through SNS), ``/hooks/postmark``, ``/hooks/mailgun`` and
``/hooks/sendgrid`` answer only when their secret or config is set (else 404). Each
request is verified by :mod:`webhooks` (the provider's own signature scheme), then its
events go through :func:`readers.apply_webhook`, the same checks and actions as bounce
mail: an event changes a subscriber only when it names one we sent to. Answers are short
and neutral: 200 ``ok`` when the request was authentic (whatever it changed), 400
``refused`` when it was not (unsigned, wrongly signed, stale, replayed, unreadable), 503
when a retry may work (the SNS certificate could not be fetched, the database is busy).

An SNS SubscriptionConfirmation is answered 200 and its SubscribeURL logged, not visited:
the operator confirms the subscription by opening it (or in the SNS console).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from .config import Config
from .readers import FeedbackResult, Outcome, apply_webhook, matcher_for
from .store import Store
from .webhooks import (
    MAX_BODY_BYTES,
    TIMESTAMP_TOLERANCE,
    SnsCertificates,
    WebhookError,
    WebhookResult,
    mailgun_feedback,
    postmark_feedback,
    sendgrid_feedback,
    ses_feedback,
)

__all__ = ["PROVIDERS", "enabled_providers", "webhook_blueprint"]

PROVIDERS = ("ses", "postmark", "mailgun", "sendgrid")
LOG = logging.getLogger("newsletter.hooks")
# Mailgun tokens are kept well past the window in which their timestamp is accepted.
REPLAY_TTL = 4 * TIMESTAMP_TOLERANCE

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def enabled_providers(config: Config) -> tuple[str, ...]:
    """The providers whose route answers: those whose secret (or SNS topic) is set."""
    settings, secrets = config.webhooks, config.secrets
    on = {
        "ses": bool(settings.ses_topic_arns),
        "postmark": bool(secrets.postmark_password),
        "mailgun": bool(secrets.mailgun_signing_key),
        "sendgrid": bool(secrets.sendgrid_public_key),
    }
    return tuple(name for name in PROVIDERS if on[name])


class _Fetcher:
    """The SNS certificate fetcher, noting whether a fetch failed (then SNS should retry)."""

    def __init__(self, fetch: Callable[[str], bytes]) -> None:
        self._fetch = fetch
        self._local = threading.local()

    def reset(self) -> None:
        self._local.failed = False

    @property
    def failed(self) -> bool:
        return bool(getattr(self._local, "failed", False))

    def __call__(self, url: str) -> bytes:
        try:
            return self._fetch(url)
        except Exception:
            self._local.failed = True
            raise


def _text(status: int, text: str) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")


def _peer(remote_addr: str, forwarded_for: str, proxies: Sequence[IPNetwork]) -> str:
    """The client's address: the peer, or behind trusted proxies the right-most hop of
    X-Forwarded-For that is not one of them (as :func:`ratelimit.client_address` reads it)."""
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    current = remote_addr
    while hops:
        try:
            address = ipaddress.ip_address(current.strip())
        except ValueError:
            break
        if not any(address in network for network in proxies):
            break
        current = hops.pop()
    return current.strip()


def webhook_blueprint(
    config: Config,
    *,
    db: Callable[[], Store],
    writing: threading.Lock,
    proxies: Sequence[IPNetwork] = (),
    fetch_certificate: Callable[[str], bytes] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Blueprint:
    """The ``/hooks/<provider>`` routes, sharing the service's database and write lock.

    ``fetch_certificate`` fetches SNS signing certificates (default: over verified https,
    cached); ``clock`` is for tests that sign requests at a fixed time.
    """
    blueprint = Blueprint("hooks", __name__)
    enabled = set(enabled_providers(config))
    certificates = _Fetcher(fetch_certificate or SnsCertificates())
    settings, secrets = config.webhooks, config.secrets

    def verify(
        provider: str, body: bytes, headers: Mapping[str, str], now: datetime
    ) -> WebhookResult:
        if provider == "ses":
            return ses_feedback(
                body,
                headers,
                now=now,
                topic_arns=settings.ses_topic_arns,
                fetch_certificate=certificates,
            )
        if provider == "postmark":
            return postmark_feedback(
                body,
                headers,
                username=settings.postmark_username,
                password=secrets.postmark_password,
                remote_addr=_peer(
                    request.remote_addr or "",
                    ",".join(request.headers.getlist("X-Forwarded-For")),
                    proxies,
                ),
                allowed_networks=settings.postmark_networks,
            )
        if provider == "mailgun":
            return mailgun_feedback(
                body,
                headers,
                now=now,
                signing_key=secrets.mailgun_signing_key,
                seen=lambda token: db().webhook_token_seen("mailgun", token, now=now),
            )
        return sendgrid_feedback(body, headers, now=now, public_key=secrets.sendgrid_public_key)

    @blueprint.post("/hooks/<provider>")
    def hook(provider: str) -> Response:
        if provider not in enabled:
            return _text(404, "not found")
        request.max_content_length = MAX_BODY_BYTES
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            return _text(413, "too large")
        headers = dict(request.headers.items())
        now = clock()
        certificates.reset()
        try:
            result = verify(provider, body, headers, now)
        except WebhookError as exc:
            LOG.warning("%s webhook refused: %s", provider, exc)
            if certificates.failed:
                return _text(503, "try again later")
            return _text(400, "refused")
        if result.subscribe_url is not None:
            LOG.warning(
                "SNS asks to confirm the subscription of /hooks/ses to its topic: open %s"
                " (nothing was visited)",
                result.subscribe_url,
            )
            return _text(200, "ok")
        for why in result.skipped:
            LOG.info("%s webhook: skipped %s", provider, why)
        with writing:
            store = db()
            results = apply_webhook(
                store,
                result.feedback,
                source=provider,
                matcher=matcher_for(store, secrets.secret_key),
                soft_limit=config.bounces.soft_limit,
                replay_token=result.replay_token,
                replay_ttl=REPLAY_TTL,
                now=now,
            )
        if results is None:
            LOG.warning("%s webhook refused: its token was used before (a replay)", provider)
            return _text(400, "refused")
        for one in results:
            _log_result(provider, one)
        return _text(200, "ok")

    return blueprint


def _log_result(provider: str, result: FeedbackResult) -> None:
    if result.outcome == Outcome.APPLIED:
        for decision in result.acted:
            reference = decision.reference
            who = f"subscriber {reference.subscriber_id}" if reference is not None else "?"
            LOG.info(
                "%s webhook %s: %s %s (%s)",
                provider,
                result.event_id,
                decision.feedback.kind.value,
                who,
                decision.effect,
            )
    elif result.outcome != Outcome.ALREADY_PROCESSED:
        LOG.info("%s webhook %s: %s (%s)", provider, result.event_id, result.outcome, result.reason)
