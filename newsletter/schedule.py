"""Scheduled sends: when an issue goes out, and the checks it must pass before it does.

A schedule lives in the database (``schedules``), never in memory: ``newsletter schedule``
writes it, the worker (:mod:`newsletter.worker`) reads it. The checks a ``send`` would
make (the issue renders, every image has alt text, unsubscribe is configured, the SMTP
settings and the DKIM key are usable, ``check`` finds no error) run when the issue is
scheduled and again when its time comes; an issue that fails them then is not sent, and
its schedule says why (``failed``, with the error, in ``status``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import render
from .config import Config
from .content import ISSUE_FILE, Issue
from .errors import NewsletterError, ScheduleError
from .models import ScheduleEntry, ScheduleState
from .segments import require_segment
from .store import Store

FORM = '"2026-12-04 07:00 Europe/Berlin" or ISO 8601 with an offset, e.g. 2026-12-04T07:00+01:00'
# "2026-12-04 07:00 Europe/Berlin", "2026-12-04T07:00:30 UTC"
_NAMED_ZONE = re.compile(
    r"(?P<at>\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(?::\d{2})?)\s+(?P<zone>[A-Za-z][A-Za-z0-9_+\-/]*)"
)


@dataclass(frozen=True)
class When:
    """A moment to send at (aware, UTC) and the zone it was written in, to show it back."""

    at: dt.datetime
    zone: str = ""  # an IANA name ("Europe/Berlin"), or "" for a fixed offset

    def local(self) -> dt.datetime:
        return shown_time(self.at, self.zone)


def shown_time(at: dt.datetime, zone: str) -> dt.datetime:
    """``at`` in the zone it was scheduled in (UTC when that was a fixed offset)."""
    try:
        return at.astimezone(ZoneInfo(zone)) if zone else at.astimezone(dt.UTC)
    except (ZoneInfoNotFoundError, ValueError):
        return at.astimezone(dt.UTC)


def describe(entry: ScheduleEntry) -> str:
    """ "2026-12-04 07:00 CET" for a listing."""
    return f"{shown_time(entry.send_at, entry.zone):%Y-%m-%d %H:%M %Z}"


def parse_when(text: str, *, where: str = "--at") -> When:
    """A send time with its zone; a time without one is an error naming the form wanted."""
    value = " ".join(text.split())
    hint = f"write it as {FORM}"
    if not value:
        raise ScheduleError("no send time given", where=where, hint=hint)
    match = _NAMED_ZONE.fullmatch(value)
    if match is not None:
        name = match["zone"]
        try:
            zone = dt.UTC if name.upper() in ("UTC", "Z") else ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(
                f"unknown time zone {name!r}",
                where=where,
                hint="use an IANA name such as Europe/Berlin, America/New_York or UTC",
            ) from None
        try:
            naive = dt.datetime.fromisoformat(match["at"].replace(" ", "T"))
        except ValueError as exc:
            raise ScheduleError(f"'{value}' is not a valid time: {exc}", where=where) from None
        local = naive.replace(tzinfo=zone)
        # A wall-clock time that the zone skips (the hour clocks go forward) does not exist.
        back = local.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None)
        if back != naive:
            raise ScheduleError(
                f"{match['at']} does not exist in {name} (the clocks go forward then)",
                where=where,
                hint="pick a time an hour later or earlier",
            )
        return When(local.astimezone(dt.UTC), "UTC" if zone is dt.UTC else name)
    try:
        # "2026-12-04 07:00 +01:00" too: the offset may stand apart.
        moment = dt.datetime.fromisoformat(
            re.sub(r"\s+(?=[+-]\d)", "", value).replace("Z", "+00:00")
        )
    except ValueError:
        raise ScheduleError(
            f"'{value}' is not a time with a zone", where=where, hint=hint
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ScheduleError(f"'{value}' has no time zone", where=where, hint=hint)
    return When(moment.astimezone(dt.UTC))


@dataclass(frozen=True)
class Preflight:
    """What the checks found: ``problems`` is empty when the issue may be sent."""

    problems: tuple[str, ...]
    rendered: render.RenderedIssue | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def preflight(config: Config, issue: Issue) -> Preflight:
    """The checks ``send`` makes before anything is recorded, plus ``check``'s errors."""
    from . import check, delivery, publish

    problems: list[str] = []
    try:
        delivery.outbound_from_config(config)  # SMTP settings, the DKIM key readable
    except NewsletterError as exc:
        problems.append(str(exc))
    try:
        rendered = render.render_issue(issue, config)
    except NewsletterError as exc:
        return Preflight((*problems, str(exc)))
    try:
        publish.require_alt_text(rendered)
    except NewsletterError as exc:
        problems.append(str(exc))
    if issue.segment:
        try:
            require_segment(config.segments, issue.segment)
        except NewsletterError as exc:
            problems.append(f"{issue.path / ISSUE_FILE}: segment: {exc}")
    if not (config.unsubscribe.url or config.unsubscribe.mailto):
        problems.append(
            f"{config.path}: no unsubscribe address; set [newsletter] base_url (https) "
            "or [unsubscribe] mailto"
        )
    try:
        report = check.check_issue(config, issue)
    except NewsletterError as exc:
        problems.append(str(exc))
    else:
        known = set(problems)
        for finding in report.errors:
            line = f"{finding.where}: {finding.message}" if finding.where else finding.message
            if line not in known:
                problems.append(f"check: {line}")
    return Preflight(tuple(problems), rendered)


def _refuse(problems: tuple[str, ...], issue: Issue) -> ScheduleError:
    first, rest = problems[0], len(problems) - 1
    more = f" (and {rest} more: `newsletter check {issue.number}`)" if rest else ""
    return ScheduleError(
        f"issue {issue.number} would not be sent: {first}{more}",
        hint="fix it, then schedule again",
    )


def schedule_issue(
    config: Config,
    store: Store,
    issue: Issue,
    when: When | None = None,
    *,
    source: str = "command",
    now: dt.datetime | None = None,
) -> ScheduleEntry:
    """Check ``issue`` as a send would and schedule it for ``when`` (default: its send_at).

    Refused: a time in the past, an issue already sent (``send`` resumes it), an issue
    that fails the checks.
    """
    if when is None:
        if not issue.send_at:
            raise ScheduleError(
                f"issue {issue.number} has no send_at and no --at was given",
                where=str(issue.path / "issue.md"),
                hint=f"give --at {FORM.split(' or ')[0]}, or set send_at in issue.md",
            )
        when = parse_when(issue.send_at, where=issue.send_at_where)
        source = "issue.md"
    moment = now or dt.datetime.now(dt.UTC)
    if when.at <= moment:
        raise ScheduleError(
            f"{when.local():%Y-%m-%d %H:%M %Z} is in the past",
            hint=f"give a later time, or send now with `newsletter send {issue.number}`",
        )
    if store.issue_snapshot(issue.slug) is not None:
        raise ScheduleError(
            f"issue {issue.number} has already been sent (its recipients are fixed)",
            hint=f"`newsletter send {issue.number}` resumes it; `status` shows where it stands",
        )
    checked = preflight(config, issue)
    if not checked.ok:
        raise _refuse(checked.problems, issue)
    return store.set_schedule(issue.slug, when.at, zone=when.zone, source=source)


def cancel(store: Store, issue: Issue) -> ScheduleEntry:
    """Cancel a schedule that has not started; a send in progress is not stopped here."""
    entry = store.get_schedule(issue.slug)
    if entry is None or entry.state == ScheduleState.CANCELLED:
        raise ScheduleError(
            f"issue {issue.number} is not scheduled", hint="`newsletter issue list` shows them"
        )
    if not store.update_schedule(
        issue.slug,
        ScheduleState.CANCELLED,
        only_from=(ScheduleState.SCHEDULED, ScheduleState.FAILED),
    ):
        raise ScheduleError(
            f"issue {issue.number} is {entry.state} and cannot be cancelled",
            hint="a send in progress stops with the worker (SIGTERM); `status` shows it",
        )
    cancelled = store.get_schedule(issue.slug)
    assert cancelled is not None
    return cancelled


__all__ = [
    "FORM",
    "Preflight",
    "ScheduleError",
    "When",
    "cancel",
    "describe",
    "parse_when",
    "preflight",
    "schedule_issue",
    "shown_time",
]
