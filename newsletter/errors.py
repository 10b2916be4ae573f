"""Errors a user can fix.

Every module raises one of these for bad input; only ``cli`` turns them into
``Error: ...`` lines and exit codes, so the library stays usable from Python.
"""

from __future__ import annotations

import re


class NewsletterError(Exception):
    """A problem the user can fix: where it is, what is wrong, what to do."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text = f"{text.rstrip('.')}; {self.hint}"
        # One line, always: the CLI prints this as-is. Messages quote what servers and
        # files said: a control character in them is shown, never sent to the terminal.
        return printable(" ".join(text.split()))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _shown(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def printable(text: str) -> str:
    """``text`` with every control character shown as ``\\xNN``: safe on one line of a
    terminal or a log, whoever wrote it (a server's reply, a request's path)."""
    return _CONTROL.sub(_shown, text)


class ConfigError(NewsletterError):
    """The workspace config or the environment is wrong."""


class ContentError(NewsletterError):
    """An article or issue file is wrong."""


class RenderError(NewsletterError):
    """A template or the MJML it produced is wrong."""


class StoreError(NewsletterError):
    """The database or a subscriber file is wrong."""


class TransportError(NewsletterError):
    """The mail server or outbox could not be reached or refused us."""


class DeliveryError(NewsletterError):
    """A send cannot start or go on (another send running, nothing to send...)."""


class ImportSourceError(NewsletterError):
    """A URL, feed or draft could not be turned into an article."""


class PreviewError(NewsletterError):
    """The preview server cannot start (port taken, address not available...)."""


class ServiceError(NewsletterError):
    """The subscription web service cannot start (port taken, address not available...)."""


class BounceError(NewsletterError):
    """A bounce mailbox (mbox, Maildir or IMAP folder) cannot be read."""


class ScheduleError(NewsletterError):
    """A send time that cannot be used, or an issue that cannot be scheduled."""
