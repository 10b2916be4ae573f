"""One logging setup for the long-running commands (`serve`, `worker`, a send without a
terminal): plain lines by default, JSON lines (one object a line) with ``--log-json``.

Everything the package logs goes through the ``newsletter`` logger; a record's ``extra``
fields (``event``, ``issue``, counts) become keys of the JSON object. Nothing personal
or secret is logged by design: subscribers by id, paths with tokens redacted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

ROOT = "newsletter"
# The attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class PlainLines(logging.Formatter):
    """``2026-12-04 06:00:01 INFO worker: message``, times in UTC."""

    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(short)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.removeprefix(f"{ROOT}.")
        return super().format(record)


def setup(
    *, json_lines: bool = False, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send the package's log records to ``stream`` (stderr) in the chosen format.

    Idempotent: a second call replaces the handler the first one installed.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else PlainLines())
    handler.set_name("newsletter-logsetup")
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if h.get_name() == "newsletter-logsetup"]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


@contextlib.contextmanager
def logging_to(
    *, json_lines: bool = False, level: int = logging.INFO, stream: TextIO | None = None
) -> Iterator[logging.Handler]:
    """:func:`setup` for the length of a command; the logger is as it was afterwards."""
    logger = logging.getLogger(ROOT)
    before = (logger.level, logger.propagate)
    handler = setup(json_lines=json_lines, level=level, stream=stream)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


__all__ = ["JsonLines", "PlainLines", "logging_to", "setup"]
