"""The command line: thin click commands over the library.

This is the only module that imports click, and the only place where a
:class:`~newsletter.errors.NewsletterError` becomes ``Error: ...`` and exit code 1.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from . import config as config_module
from .config import Config
from .errors import NewsletterError

if TYPE_CHECKING:
    from . import store as store_module

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


# --- subscriber commands ---


def _open_store(ctx: Context) -> store_module.Store:
    """The workspace's database (imported late: email-validator slows every command's start)."""
    from . import store

    return store.Store.open(ctx.config().db_path)


_STATUS_CHOICE = click.Choice(["active", "pending", "unsubscribed", "bounced", "complained"])


@main.group()
def subscribers() -> None:
    """Manage the subscriber list (import, add, unsubscribe, list, export...)."""


@subscribers.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
@handle_errors
def subscribers_import(ctx: Context, file: Path) -> None:
    """Import subscribers from a CSV file (columns: email, name, any others become fields).

    Every bad row is reported as FILE:LINE; the good rows are imported all at once.
    Nobody who unsubscribed, bounced or complained is reactivated. Exits 1 when the
    file itself is unusable, or when it has bad rows and no good one.
    """
    from .store import RowError

    def on_error(error: RowError) -> None:
        click.echo(f"{file}:{error.line}: {error.message}", err=True)

    with _open_store(ctx) as store:
        report = store.import_csv(file, on_error=on_error)
    click.echo(
        f"{file}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.skipped_inactive} left alone (unsubscribed, bounced or complained), "
        f"{report.duplicates} duplicate rows merged, {report.error_count} bad rows."
    )
    if report.error_count and not report.imported and not report.skipped_inactive:
        fail(f"{file}: no row could be imported")


@subscribers.command("add")
@click.argument("email")
@click.option("--name", default="", help="The subscriber's name.")
@click.option("--field", "fields", multiple=True, metavar="KEY=VALUE",
              help="A personalisation field (repeatable).")
@pass_ctx
@handle_errors
def subscribers_add(ctx: Context, email: str, name: str, fields: tuple[str, ...]) -> None:
    """Add one active subscriber."""
    values: dict[str, str] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--field {item!r}: write it as KEY=VALUE")
        values[key.strip()] = value
    with _open_store(ctx) as store:
        subscriber = store.add_subscriber(email, name, values)
    click.echo(f"Added {subscriber.email}.")


@subscribers.command("remove")
@click.argument("email")
@click.option("--force", is_flag=True,
              help="Also delete the record of issues sent to them (otherwise refused).")
@pass_ctx
@handle_errors
def subscribers_remove(ctx: Context, email: str, force: bool) -> None:
    """Delete a subscriber for good (to stop mail, use `unsubscribe`: it keeps the record)."""
    with _open_store(ctx) as store:
        store.remove_subscriber(email, force=force)
    click.echo(f"Removed {email}.")


@subscribers.command("unsubscribe")
@click.argument("email")
@pass_ctx
@handle_errors
def subscribers_unsubscribe(ctx: Context, email: str) -> None:
    """Mark a subscriber unsubscribed (kept in the list, never sent to again)."""
    from .store import Status

    with _open_store(ctx) as store:
        subscriber = store.set_status(email, Status.UNSUBSCRIBED, "cli")
    click.echo(f"Unsubscribed {subscriber.email}.")


@subscribers.command("list")
@click.option("--status", type=_STATUS_CHOICE, default=None, help="Only this status.")
@pass_ctx
@handle_errors
def subscribers_list(ctx: Context, status: str | None) -> None:
    """Print subscribers, one per line: email, status and name, tab-separated."""
    from .store import Status

    with _open_store(ctx) as store:
        for sub in store.list_subscribers(None if status is None else Status(status)):
            click.echo(f"{sub.email}\t{sub.status}\t{sub.name}")


@subscribers.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--status", type=_STATUS_CHOICE, default=None, help="Only this status.")
@pass_ctx
@handle_errors
def subscribers_export(ctx: Context, file: Path | None, status: str | None) -> None:
    """Write subscribers as CSV to FILE (replaced atomically) or to standard output."""
    from .files import atomic_open_text
    from .store import Status

    wanted = None if status is None else Status(status)
    with _open_store(ctx) as store:
        if file is None:
            store.export_csv(sys.stdout, wanted)
            return
        with atomic_open_text(file, newline="") as handle:
            count = store.export_csv(handle, wanted)
    click.echo(f"Wrote {count} subscribers to {file}.", err=True)


@subscribers.command("count")
@pass_ctx
@handle_errors
def subscribers_count(ctx: Context) -> None:
    """Print how many subscribers have each status."""
    with _open_store(ctx) as store:
        counts = store.count_by_status()
    for state, number in counts.items():
        click.echo(f"{state:<13}{number:>9}")
    click.echo(f"{'total':<13}{sum(counts.values()):>9}")
