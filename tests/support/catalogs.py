"""The theme's messages, as Babel extracts them from its templates and from the package's
Python, and the catalogs that translate them.

Run it to see what a catalog lacks: ``python -m tests.support.catalogs de``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

REPO = Path(__file__).resolve().parents[2]
THEME = REPO / "templates"
LOCALES = ("de", "fr")
# Python modules whose words readers see (the service's pages, the archive, the email).
PYTHON = ("server.py", "publish.py", "render.py", "message.py", "welcome.py")
_JINJA = {"extensions": "jinja2.ext.i18n", "trim_blocks": "true", "lstrip_blocks": "true"}


def extract() -> dict[str, tuple[str, ...]]:
    """msgid -> where it is used (``file:line``), for every message readers can see."""
    found: dict[str, list[str]] = {}

    def add(root: Path, method_map: list[tuple[str, str]], options: dict[str, dict[str, str]]):
        for filename, line, message, _comments, _context in extract_from_dir(
            root, method_map, options_map=options
        ):
            msgid = message[0] if isinstance(message, tuple) else message
            found.setdefault(msgid, []).append(f"{filename}:{line}")

    add(
        THEME,
        [("**.mjml", "jinja2"), ("**.txt", "jinja2"), ("**.html", "jinja2")],
        {"**.mjml": _JINJA, "**.txt": _JINJA, "**.html": _JINJA},
    )
    add(REPO / "newsletter", [(name, "python") for name in PYTHON], {})
    return {msgid: tuple(places) for msgid, places in found.items()}


def catalog(locale: str) -> Catalog:
    path = THEME / "locale" / locale / "LC_MESSAGES" / "newsletter.po"
    with path.open("rb") as source:
        return read_po(source, locale=locale)


def missing(locale: str) -> list[str]:
    """Messages the locale's catalog does not translate (or marks fuzzy)."""
    translated = catalog(locale)
    out = []
    for msgid in extract():
        entry = translated.get(msgid)
        if entry is None or entry.fuzzy or not entry.string or not all(entry.string):
            out.append(msgid)
    return out


if __name__ == "__main__":
    for locale in sys.argv[1:] or LOCALES:
        for msgid in missing(locale):
            print(f"{locale}: {msgid!r}")
