"""Files that ship with the package: the default theme and the demo's subscriber list.

An installed wheel carries them inside the package (pyproject.toml force-includes
``templates/`` as ``newsletter/_theme`` and ``examples/subscribers.csv`` as
``newsletter/_examples/subscribers.csv``); a checkout, and an editable install of
one, has them at the repository's top level. :data:`SHIPPED` is that mapping, a
test holds it equal to pyproject.toml, and :func:`shipped` is the one lookup.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

# Path inside the installed package -> path in a checkout, both as pyproject.toml says.
SHIPPED = {
    "_theme": "templates",
    "_examples/subscribers.csv": "examples/subscribers.csv",
}

_PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """Where the shipped file or folder ``name`` (a key of :data:`SHIPPED`) is.

    Inside the package when installed from a wheel, else the checkout's copy. Neither
    is an installation problem, named with both places looked at.
    """
    inside = _PACKAGE / name
    if inside.exists():
        return inside
    checkout = _PACKAGE.parent / SHIPPED[name]
    if checkout.exists():
        return checkout
    raise ConfigError(
        f"the package's {SHIPPED[name]} is missing (looked in {inside} and {checkout})",
        where=str(_PACKAGE),
        hint="reinstall newsletter (pip install --force-reinstall newsletter)",
    )


def default_theme_dir() -> Path:
    """The packaged theme that a workspace's templates/ overrides file by file."""
    return shipped("_theme")


def example_subscribers() -> Path:
    """The example subscriber list (CSV) that `newsletter demo` imports."""
    return shipped("_examples/subscribers.csv")
