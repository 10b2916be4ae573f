"""The command line: thin click commands over the library.

This is the only module that imports click, and the only place where a
:class:`~newsletter.errors.NewsletterError` becomes ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from . import config as config_module
from .config import Config
from .errors import NewsletterError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print one error line and exit 1."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def handle_errors(func: F) -> F:
    """Turn library errors into one line and exit code 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NewsletterError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class Context:
    """What every command may need: the workspace root and overrides from global flags."""

    def __init__(self, workspace: Path | None, db: Path | None) -> None:
        self.workspace = workspace
        self.db = db

    def config(self) -> Config:
        return config_module.load(self.workspace, db=self.db)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="newsletter")
@click.option(
    "-C",
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Workspace folder (default: the nearest folder with newsletter.toml).",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar=config_module.ENV_DB,
    help="SQLite database (default: .newsletter/newsletter.db; env NEWSLETTER_DB).",
)
@click.pass_context
def main(ctx: click.Context, workspace: Path | None, db: Path | None) -> None:
    """Compose, render, preview and send a curated newsletter."""
    ctx.obj = Context(workspace, db)
