"""Dates from outside (a CSV's sign-up column): the common spellings, read into ISO 8601.

Lists exported from other tools write dates many ways: ISO 8601 (Substack, most APIs),
``2019-03-04 12:34:56`` (Mailchimp, MailerLite), ``... UTC`` (ConvertKit), RFC 2822,
``03/04/2019``, ``4 Mar 2019``, Unix seconds. A date that could be read two ways
(``03/04/2019``: March or April?) is refused rather than guessed.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime

EARLIEST_YEAR = 1970
# "2019-03-04 12:34:56 UTC" and the like: a zone name after the time means UTC.
_UTC_SUFFIX = re.compile(r"\s*(?:UTC|GMT)$", re.IGNORECASE)
# D/M/Y or M/D/Y with slashes (or D.M.Y with dots, always day first), optional time.
_NUMERIC = re.compile(
    r"(\d{1,2})([/.])(\d{1,2})\2(\d{4})"
    r"(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s*([AaPp][Mm]))?)?"
)
_YEAR_FIRST = re.compile(r"(\d{4})/(\d{1,2})/(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?")
_NAMED_MONTH_FORMATS = tuple(
    f"{day_part}{time_part}"
    for day_part in ("%B %d, %Y", "%b %d, %Y", "%d %B %Y", "%d %b %Y", "%d-%b-%Y", "%b %d %Y")
    for time_part in ("", " %H:%M", " %H:%M:%S", " %I:%M %p", " %I:%M:%S %p")
)


def _clock(
    hour: str | None, minute: str | None, second: str | None, ampm: str | None
) -> tuple[int, int, int]:
    if hour is None:
        return 0, 0, 0
    h = int(hour)
    if ampm:
        if not 1 <= h <= 12:
            raise ValueError("an hour with AM/PM is 1 to 12")
        h = h % 12 + (12 if ampm.lower() == "pm" else 0)
    return h, int(minute or 0), int(second or 0)


def _numeric(text: str) -> datetime | date | None:
    match = _YEAR_FIRST.fullmatch(text)
    if match:
        year, month, day, hour, minute, second = match.groups()
        if hour is None:
            return date(int(year), int(month), int(day))
        return datetime(int(year), int(month), int(day), *_clock(hour, minute, second, None))
    match = _NUMERIC.fullmatch(text)
    if match is None:
        return None
    first, separator, second_part, year, hour, minute, second, ampm = match.groups()
    a, b = int(first), int(second_part)
    if separator == ".":
        day, month = a, b  # 04.03.2019 is written day first wherever dots are used
    elif a > 12 >= b:
        day, month = a, b
    elif b > 12 >= a:
        month, day = a, b
    elif a == b:
        day = month = a
    else:
        raise ValueError("it could be day/month or month/day")
    if hour is None:
        return date(int(year), month, day)
    return datetime(int(year), month, day, *_clock(hour, minute, second, ampm))


def _read(text: str) -> datetime | date:
    if text.isdigit():
        if len(text) == 8:
            return date.fromisoformat(text)  # 20190304
        if 9 <= len(text) <= 10:
            return datetime.fromtimestamp(int(text), UTC)  # Unix seconds
        raise ValueError("not a date this tool can read")
    try:
        moment = datetime.fromisoformat(text)  # the common case, in C
    except ValueError:
        pass
    else:
        return moment.date() if len(text) == 10 else moment
    text = " ".join(text.split())
    utc = _UTC_SUFFIX.search(text) is not None
    bare = _UTC_SUFFIX.sub("", text)
    if utc:
        try:
            return datetime.fromisoformat(bare).replace(tzinfo=UTC)
        except ValueError:
            pass
    found = _numeric(bare)
    if found is not None:
        return found.replace(tzinfo=UTC) if utc and isinstance(found, datetime) else found
    for pattern in _NAMED_MONTH_FORMATS:
        try:
            moment = datetime.strptime(bare, pattern)
        except ValueError:
            continue
        if "%H" not in pattern and "%I" not in pattern:
            return moment.date()
        return moment.replace(tzinfo=UTC) if utc else moment
    if "," in text or re.search(r"[+-]\d{4}$", text):
        try:
            return parsedate_to_datetime(text)  # RFC 2822: "Mon, 04 Mar 2019 12:34:56 +0000"
        except (TypeError, ValueError):
            pass
    raise ValueError("not a date this tool can read")


class SignupDates:
    """Reads one file's sign-up dates: the plausible range is fixed once, and a date seen
    before (lists repeat them) is not read again."""

    def __init__(self, now: datetime | None = None) -> None:
        self.earliest = date(EARLIEST_YEAR, 1, 1)
        self.latest = (now or datetime.now(UTC)).date() + timedelta(days=1)
        self._seen: dict[str, str] = {}

    def read(self, text: str) -> str:
        """The date ``text`` names, as ISO 8601 with the precision it had; ValueError
        saying why not. A date alone stays a date (``2019-03-04``); a time without a zone
        stays without one (we do not know it); a time with a zone is given in UTC. Dates
        before 1970 or after tomorrow are not sign-up dates (a spreadsheet's zero date,
        a typo)."""
        known = self._seen.get(text)
        if known is not None:
            return known
        try:
            found = _read(text.strip())
        except (ValueError, OverflowError, OSError) as exc:
            message = str(exc)
            if "day/month" in message:
                raise ValueError(message) from None
            raise ValueError("not a date this tool can read") from None
        day = found.date() if isinstance(found, datetime) else found
        if not self.earliest <= day <= self.latest:
            raise ValueError(f"{day.isoformat()} is not a plausible sign-up date")
        if isinstance(found, datetime):
            if found.tzinfo is not None:
                found = found.astimezone(UTC)
            result = found.replace(microsecond=0).isoformat()
        else:
            result = found.isoformat()
        if len(self._seen) < 100_000:
            self._seen[text] = result
        return result


def parse_signup_date(text: str, *, now: datetime | None = None) -> str:
    """:meth:`SignupDates.read` for one date."""
    return SignupDates(now).read(text)
