"""The reader's language: the theme's words through gettext catalogs, dates through Babel.

The English words are the message ids, so English needs no catalog. The theme ships
``locale/<lang>/LC_MESSAGES/newsletter.po`` for German and French; a workspace adds or
overrides one at ``templates/locale/<lang>/LC_MESSAGES/newsletter.po`` (its messages win,
the theme's fill in the rest). Catalogs are read from the ``.po`` files when first used
(Babel compiles them in memory), so there is no build step and an edited catalog is seen.
"""

from __future__ import annotations

import datetime as dt
import gettext
import io
from functools import lru_cache
from pathlib import Path
from typing import Literal

from .errors import ConfigError
from .package_data import default_theme_dir

DOMAIN = "newsletter"
LOCALE_DIR = "locale"


def babel_locale(locale: str) -> str:
    """``fr-CA`` and ``fr_CA`` as Babel spells them; raises ValueError for an unknown one."""
    from babel import Locale, UnknownLocaleError

    try:
        return str(Locale.parse(locale.strip().replace("-", "_")))
    except (UnknownLocaleError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown locale {locale!r} ({exc})") from None


def _candidates(locale: str) -> list[str]:
    """``de_CH`` is looked for as de_CH, then de."""
    try:
        name = babel_locale(locale)
    except ValueError:
        return []
    names = [name]
    while "_" in name:
        name = name.rsplit("_", 1)[0]
        names.append(name)
    return names


def catalog_files(locale: str, templates_dir: Path | None) -> list[Path]:
    """The catalogs for ``locale``, the first one's messages winning: the workspace's, then
    the theme's, each for the full locale before its language."""
    roots = [templates_dir] if templates_dir is not None else []
    roots.append(default_theme_dir())
    found = []
    for root in roots:
        for name in _candidates(locale):
            path = root / LOCALE_DIR / name / "LC_MESSAGES" / f"{DOMAIN}.po"
            if path.is_file():
                found.append(path)
    return found


def translations(locale: str, templates_dir: Path | None = None) -> gettext.NullTranslations:
    """The messages for ``locale`` (English, the message ids, when there is no catalog)."""
    files = catalog_files(locale, templates_dir)
    stamps = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    return _translations(stamps)


@lru_cache(maxsize=32)
def _translations(stamps: tuple[tuple[str, int, int], ...]) -> gettext.NullTranslations:
    chain: gettext.NullTranslations | None = None
    for path, _mtime, _size in reversed(stamps):
        loaded = _read_po(Path(path))
        if chain is not None:
            loaded.add_fallback(chain)
        chain = loaded
    return chain or gettext.NullTranslations()


def _read_po(path: Path) -> gettext.GNUTranslations:
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import PoFileError, read_po

    try:
        with path.open("rb") as source:
            catalog = read_po(source, abort_invalid=True)
    except PoFileError as exc:
        line = getattr(exc, "lineno", -1) + 1  # Babel counts from 0
        problem = str(exc).split(" on ", 1)[0]
        raise ConfigError(
            f"cannot read this message catalog: {problem}",
            where=f"{path}:{max(line, 1)}",
            hint="fix the .po file (msgid and msgstr lines in double quotes)",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read this message catalog ({exc.strerror})", where=str(path)
        ) from None
    for entry, errors in catalog.check():
        # A translation that names a value its message does not have would fail mid-render.
        if errors:
            raise ConfigError(
                f"the translation of {entry.id!r} does not fit it: {errors[0]}",
                where=f"{path}:{entry.lineno or 1}",
                hint="use the same %(name)s values as the msgid",
            )
    compiled = io.BytesIO()
    write_mo(compiled, catalog, use_fuzzy=False)
    compiled.seek(0)
    return gettext.GNUTranslations(compiled)


def month_names(locale: str, width: Literal["wide", "abbreviated"] = "wide") -> dict[int, str]:
    """The month names of ``locale`` as dates use them (1 = January)."""
    from babel.dates import get_month_names

    return dict(get_month_names(width, context="format", locale=babel_locale(locale)))


def weekday_name(date: dt.date, locale: str) -> str:
    from babel.dates import format_date

    return str(format_date(date, "EEEE", locale=babel_locale(locale)))


def locale_date(date: dt.date, length: str, locale: str) -> str:
    """``date`` as ``locale`` writes it: ``long`` (November 20, 2026; 20 novembre 2026) or
    ``short`` (11/20/26; 20/11/2026)."""
    from babel.dates import format_date

    return str(format_date(date, length, locale=babel_locale(locale)))
