"""Small helpers several test files share (fixtures live in conftest.py)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

from newsletter import content
from newsletter.config import Config
from newsletter.content import Issue

EXAMPLE_SLUG = "001-trams-ferries-benches"


def example_issue(cfg: Config) -> Issue:
    return content.read_issue(cfg.issues_dir / EXAMPLE_SLUG)


def parse_message(data: bytes) -> tuple[EmailMessage, str, str]:
    """The message as the stdlib parses it, and its decoded text and HTML parts."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    text_part, html_part = message.iter_parts()
    assert isinstance(text_part, EmailMessage) and isinstance(html_part, EmailMessage)
    # Line ends are CRLF on the wire, and the stdlib keeps them in the decoded text.
    text, markup = (
        str(part.get_content()).replace("\r\n", "\n") for part in (text_part, html_part)
    )
    return message, text, markup


def write_template(cfg: Config, name: str, text: str) -> Path:
    """A workspace template that overrides the theme's file of the same name."""
    path = cfg.templates_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
