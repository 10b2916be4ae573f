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


# --- smtp-sink command ---


@main.command("smtp-sink")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (default: [smtp] port of the workspace, else 8025; 0 picks a free one).",
)
@click.option(
    "--maildir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Maildir to store messages in (default: .newsletter/sink/ in the workspace).",
)
@click.option(
    "--outbox", is_flag=True, help="Also write each message as .eml into .newsletter/outbox/."
)
@click.option("--count-only", is_flag=True, help="Store nothing, only count (for benchmarks).")
@click.option("--quiet", "-q", is_flag=True, help="No line per message.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a non-loopback --host (anyone who can reach it can drop mail in it).",
)
@pass_ctx
@handle_errors
def smtp_sink(
    ctx: Context,
    host: str,
    port: int | None,
    maildir: Path | None,
    outbox: bool,
    count_only: bool,
    quiet: bool,
    allow_remote: bool,
) -> None:
    """Run a local SMTP server that keeps every message it receives (Ctrl-C stops it)."""
    from .errors import ConfigError
    from .sink import SinkMessage, format_message_line, start_sink
    from .transport import is_loopback

    needs_workspace = outbox or (maildir is None and not count_only)
    config: Config | None
    try:
        config = ctx.config()
    except ConfigError:
        if needs_workspace:
            raise
        config = None
    if maildir is None and not count_only and config is not None:
        maildir = config.state_dir / "sink"
    if count_only:
        maildir = None
    if port is None:
        port = config.smtp.port if config is not None else 8025
    if not is_loopback(host) and allow_remote:
        click.echo(
            f"Warning: listening on {host}: anyone who can reach it can drop mail here.", err=True
        )

    def show(message: SinkMessage) -> None:
        click.echo(format_message_line(message))

    sink = start_sink(
        maildir,
        host=host,
        port=port,
        outbox=config.outbox_dir if outbox and config is not None else None,
        on_message=None if quiet else show,
        allow_remote=allow_remote,
    )
    stored = f"storing in {maildir}" if maildir else "counting only"
    if outbox and config is not None:
        stored += f" and {config.outbox_dir}"
    click.echo(f"smtp-sink listening on {sink.host}:{sink.port}, {stored} (Ctrl-C to stop)")
    try:
        sink.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    click.echo(f"smtp-sink stopped after {sink.count} messages.")
