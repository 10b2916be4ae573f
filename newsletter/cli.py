"""The command line: thin click commands over the library.

This is the only module that imports click. :class:`Newsletter`, the root group, is the one
place where an error becomes an ``Error: ...`` line and an exit code, as click has it: 2 for
a usage error, 1 for a failure (a :class:`~newsletter.errors.NewsletterError`), 0 for success.

Names: a top-level command's function is ``<name>_command``, a group's ``<name>_group`` and a
subcommand's ``<group>_<name>``, so none hides a module of the package.

Imports: the modules every command loads anyway (config, content, render, files, errors) are
imported here; any other module of the package is imported inside the function that uses it.
`--help`, `build` and `issue list` need none of the send, preview and import machinery, whose
imports took a cold `build` from 0.45 to 0.7 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import sys
import threading
import webbrowser
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from . import __version__, content, render
from . import config as config_module
from .config import Config
from .content import Issue
from .errors import ConfigError, NewsletterError, PreviewError
from .files import atomic_open_text
from .models import DeliveryState, PersonRecord, RowError, SenderRun, Status

if TYPE_CHECKING:  # names for annotations only: a command imports the module itself
    from .delivery import DeliveryReport
    from .importers.sources import AddReport
    from .mailboxes import InboxSummary
    from .readers import FeedbackResult
    from .segments import Segment
    from .store import Store

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
EXIT_USAGE = 2  # click's code for a usage error: unknown option, missing argument, bad value
EXIT_DEFERRED = 75  # EX_TEMPFAIL: some recipients are left for the next run
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
ERASED = "(erased)"  # a bounce record's address after `subscribers erase` or `remove`


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one error line and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


class Context:
    """What every command may need: the workspace root and overrides from global flags."""

    def __init__(self, workspace: Path | None, db: str | None) -> None:
        self.workspace = workspace
        self.db = db

    def config(self) -> Config:
        return config_module.load(self.workspace, db=self.db)


pass_ctx = click.make_pass_decorator(Context)


class Newsletter(click.Group):
    """The root group: every error becomes one ``Error:`` line and click's exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # the caller handles errors, as click has it
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # a group alone (`newsletter issue`): its help, and exit 2
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "newsletter"
            fail(f"{exc.format_message().rstrip('.')}; see `{command} --help`", exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):
                click.echo("Interrupted.", err=True)
                sys.exit(EXIT_INTERRUPTED)
            click.echo("Aborted.", err=True)
            sys.exit(EXIT_FAILURE)
        except NewsletterError as exc:
            fail(str(exc))
        # Commands return None; an int is click's exit code (--help, --version: 0).
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    name="newsletter", cls=Newsletter, context_settings={"help_option_names": ["-h", "--help"]}
)
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
    default=None,
    envvar=config_module.ENV_DB,
    metavar="PATH|URL",
    help="The database: a SQLite file (default: .newsletter/newsletter.db) or "
    "postgresql://user@host:5432/name (password from NEWSLETTER_DB_PASSWORD, PGPASSWORD "
    "or ~/.pgpass); env NEWSLETTER_DB.",
)
@click.pass_context
def main(ctx: click.Context, workspace: Path | None, db: str | None) -> None:
    """Compose, render, preview and send a curated newsletter."""
    if ctx.get_parameter_source("db") == click.core.ParameterSource.ENVIRONMENT:
        db = None  # the config reads NEWSLETTER_DB itself, so its errors name the variable
    ctx.obj = Context(workspace, db)


# --- options several commands share ---

date_option = click.option(
    "--date",
    "date",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Issue date, YYYY-MM-DD (default: today).",
)


def host_option(default: str | None, help: str) -> Callable[[F], F]:
    """``--host``: the address a server listens on (preview, serve, smtp-sink)."""
    return click.option("--host", default=default, show_default=default is not None, help=help)


def port_option(help: str) -> Callable[[F], F]:
    """``--port``: the port a server listens on; None means the command's default."""
    return click.option("--port", type=click.IntRange(0, 65535), default=None, help=help)


# --- workspace and issue commands ---


def _issue(cfg: Config, ref: str) -> Issue:
    return content.read_issue(content.find_issue(cfg.issues_dir, ref))


def _kb(size: int) -> str:
    return f"{size / 1024:.1f} KB"


@main.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--name", default="My Newsletter", show_default=True, help="The newsletter's name.")
def init_command(directory: Path, name: str) -> None:
    """Create a newsletter workspace in DIRECTORY."""
    created = config_module.init_workspace(directory, name=name)
    for path in created:
        click.echo(f"created {path}")
    click.echo(f"Next: cd {directory} && newsletter issue new --title 'First issue'")


@main.group("issue")
def issue_group() -> None:
    """Create issues and choose their articles."""


@issue_group.command("new")
@click.option("--title", default="", help="The issue's title (default: 'Issue N').")
@date_option
@pass_ctx
def issue_new(ctx: Context, title: str, date: dt.datetime | None) -> None:
    """Create the next numbered issue; print its folder and number."""
    cfg = ctx.config()
    created = content.new_issue(cfg.issues_dir, title=title, date=date.date() if date else None)
    click.echo(f"{created.path}")
    click.echo(f"Created issue {created.number}: {created.title} ({created.date.isoformat()})")


@issue_group.command("add")
@click.argument("issue_ref", metavar="ISSUE")
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Add it even if an earlier issue has the same URL.")
@click.option(
    "--excerpt",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Web pages and feed items: keep the first N paragraphs and link to the rest.",
)
@pass_ctx
def issue_add(
    ctx: Context, issue_ref: str, sources: tuple[str, ...], force: bool, excerpt: int | None
) -> None:
    """Add articles to ISSUE in order: .md files, .txt drafts, http(s) URLs or feed:ID."""
    from .importers.sources import add_sources

    cfg = ctx.config()
    report = add_sources(cfg, issue_ref, sources, force=force, excerpt=excerpt)
    _print_added(report)


@issue_group.command("remove")
@click.argument("issue_ref", metavar="ISSUE")
@click.argument("article", metavar="ARTICLE")
@pass_ctx
def issue_remove(ctx: Context, issue_ref: str, article: str) -> None:
    """Take ARTICLE (position or file name) out of ISSUE."""
    cfg = ctx.config()
    removed = content.remove_article(content.find_issue(cfg.issues_dir, issue_ref), article)
    click.echo(f"removed {removed} (the file stays in articles/)")


@issue_group.command("move")
@click.argument("issue_ref", metavar="ISSUE")
@click.argument("article", metavar="ARTICLE")
@click.argument("position", type=int)
@pass_ctx
def issue_move(ctx: Context, issue_ref: str, article: str, position: int) -> None:
    """Move ARTICLE to POSITION (1 is first)."""
    cfg = ctx.config()
    order = content.move_article(content.find_issue(cfg.issues_dir, issue_ref), article, position)
    for number, name in enumerate(order, start=1):
        click.echo(f"{number:>3}. {name}")


@issue_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@pass_ctx
def issue_list(ctx: Context, as_json: bool) -> None:
    """List the workspace's issues, with the time of those scheduled."""
    cfg = ctx.config()
    issues = content.list_issues(cfg.issues_dir)
    schedules = _schedules(cfg)
    if as_json:
        rows = []
        for item in issues:
            entry = schedules.get(item.slug)
            rows.append(
                {
                    "number": item.number,
                    "date": item.date.isoformat(),
                    "slug": item.slug,
                    "title": item.title,
                    "articles": len(item.articles),
                    "send_at": item.send_at or None,
                    "schedule": None
                    if entry is None
                    else {
                        "state": entry.state.value,
                        "send_at": entry.send_at.isoformat(),
                        "zone": entry.zone,
                        "source": entry.source,
                        "last_error": entry.last_error,
                    },
                }
            )
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not issues:
        click.echo("No issues yet. Create one with `newsletter issue new`.")
    for item in issues:
        entry = schedules.get(item.slug)
        when = ""
        if entry is not None and entry.state != "cancelled":
            from .schedule import describe

            when = f"  [{entry.state} {describe(entry)}]"
        elif item.send_at:
            when = f"  [send_at {item.send_at}: not scheduled yet]"
        click.echo(
            f"{item.number:>4}  {item.date.isoformat()}  {len(item.articles):>2} articles  "
            f"{item.slug}  {item.title}{when}"
        )


def _schedules(cfg: Config) -> dict[str, Any]:
    """The database's schedules by issue, without creating a database that is not there."""
    if not cfg.database.exists:
        return {}
    from .store import Store

    with Store.open(cfg.database) as store:
        return {entry.issue_key: entry for entry in store.list_schedules()}


@issue_group.command("show")
@click.argument("issue_ref", metavar="ISSUE")
@pass_ctx
def issue_show(ctx: Context, issue_ref: str) -> None:
    """Show ISSUE's articles in order, with word counts and the estimated HTML size."""
    cfg = ctx.config()
    item = _issue(cfg, issue_ref)
    click.echo(f"Issue {item.number} · {item.date.isoformat()} · {item.title}")
    click.echo(f"Folder:    {item.path}")
    click.echo(f"Subject:   {item.subject(cfg.newsletter.subject_max_length)}")
    click.echo(f"Preheader: {item.preheader or '(none)'}")
    for number, article in enumerate(item.articles, start=1):
        line = render.byline(article, cfg.newsletter.date_format)
        click.echo(
            f"{number:>3}. {article.title}  [{article.word_count} words]  {article.path.name}"
        )
        if line:
            click.echo(f"     {line}")
    words = sum(a.word_count for a in item.articles)
    click.echo(f"Total: {len(item.articles)} articles, {words} words")
    if item.articles:
        from . import images

        rendered = render.render_issue(item, cfg)
        if rendered.over_gmail_clip:
            note = "  (over Gmail's ~102 KB clip!)"
        else:
            note = (
                f", {rendered.visible_share:.0%} of it text; about"
                f" {rendered.words_before_clip:,} more words fit before Gmail's ~102 KB clip"
            )
        click.echo(f"Email HTML: {_kb(rendered.html_size)}{note}")
        weight = images.weight(source for source, _ in rendered.assets)
        click.echo(f"Images:     {weight.describe()}")


@main.command("build")
@click.argument("issue_ref", metavar="ISSUE")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: .newsletter/build/<issue>/).",
)
@pass_ctx
def build_command(ctx: Context, issue_ref: str, out_dir: Path | None) -> None:
    """Render ISSUE to email.html, email.txt and web.html, and sample.html and sample.eml
    filled in for an example reader."""
    from . import message
    from .files import atomic_write_bytes

    cfg = ctx.config()
    result = render.build(_issue(cfg, issue_ref), cfg, out_dir)
    rendered = result.rendered
    samples = message.sample_files(rendered, cfg)
    for name, data in samples.items():
        atomic_write_bytes(result.out_dir / name, data)
    click.echo(f"Subject: {rendered.subject}")
    for name, size in {**result.files, **{n: len(d) for n, d in samples.items()}}.items():
        click.echo(f"  {result.out_dir / name}  {_kb(size)}")
    for warning in (*rendered.warnings, *_field_warnings(ctx, rendered)):
        click.echo(f"Warning: {warning}", err=True)


# --- import commands ---


def _print_added(report: AddReport) -> None:
    for added in report.added:
        click.echo(f"added {added.path.name}  {added.title}  [{added.word_count} words]")
        if added.origin != str(added.path) and not added.origin.endswith(".md"):
            click.echo(f"      from {added.origin}")
        byline = ", ".join(
            part
            for part in (added.author, added.source, added.date.isoformat() if added.date else "")
            if part
        )
        if byline:
            click.echo(f"      {byline}")
        if added.missing:
            click.echo(f"      not found: {', '.join(added.missing)} (fill in {added.path})")
        for note in added.notes:
            click.echo(f"      note: {note}")
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)


@issue_group.command("import-digest")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--title", default="", help="The new issue's title (default: 'Issue N').")
@date_option
@pass_ctx
def issue_import_digest(ctx: Context, file: Path, title: str, date: dt.datetime | None) -> None:
    """Split a plain-text digest FILE into a new issue, one article per title and byline."""
    from .importers.sources import import_digest

    cfg = ctx.config()
    report = import_digest(cfg, file, title=title, date=date.date() if date else None)
    created, digest = report.issue, report.digest
    click.echo(f"Created issue {created.number}: {created.title} ({created.date.isoformat()})")
    click.echo(f"Folder:  {created.path}")
    click.echo(f"Subject: {digest.subject or '(none found: the lead titles will be used)'}")
    if digest.intro:
        click.echo(f"Intro:   {len(digest.intro.split())} words before the first article")
    click.echo(f"Tagline: {digest.tagline or '(none found)'} (not an article)")
    click.echo(f"Articles: {len(report.added.added)}")
    for number, added in enumerate(report.added.added, start=1):
        click.echo(f"{number:>3}. {added.title}  [{added.word_count} words]  {added.path.name}")
        byline = ", ".join(
            part
            for part in (added.author, added.source, added.date.isoformat() if added.date else "")
            if part
        )
        click.echo(f"     {byline or '(no byline)'}")
        if added.missing:
            click.echo(f"     not found: {', '.join(added.missing)}")
        for note in added.notes:
            click.echo(f"     note: {note}")
    for note in digest.notes:
        click.echo(f"note: {note}")


@main.group("feed")
def feed_group() -> None:
    """Keep a list of RSS/Atom feeds and pull new items from them."""


@feed_group.command("add")
@click.argument("name")
@click.argument("url")
@pass_ctx
def feed_add(ctx: Context, name: str, url: str) -> None:
    """Add the feed at URL under NAME (kept in feeds.toml)."""
    from .importers import feeds

    cfg = ctx.config()
    added = feeds.add_feed(cfg, name, url)
    click.echo(f"added feed {added.name}: {added.url}")
    click.echo("Next: newsletter feed pull")


@feed_group.command("list")
@pass_ctx
def feed_list(ctx: Context) -> None:
    """List the feeds."""
    from .importers import feeds

    cfg = ctx.config()
    listed = feeds.read_feeds(cfg)
    if not listed:
        click.echo("No feeds yet. Add one with `newsletter feed add NAME URL`.")
    for item in listed:
        click.echo(f"{item.name}  {item.url}")


@feed_group.command("remove")
@click.argument("name")
@pass_ctx
def feed_remove(ctx: Context, name: str) -> None:
    """Remove the feed called NAME."""
    from .importers import feeds

    cfg = ctx.config()
    removed = feeds.remove_feed(cfg, name)
    click.echo(f"removed feed {removed.name}: {removed.url}")


@feed_group.command("pull")
@click.argument("names", metavar="[NAME]...", nargs=-1)
@pass_ctx
def feed_pull(ctx: Context, names: tuple[str, ...]) -> None:
    """Fetch the feeds and list items that no issue has used yet, each with an id."""
    from .importers import feeds

    cfg = ctx.config()
    report = feeds.pull(cfg, names)
    for result in report.results:
        status = "not modified" if result.not_modified else f"{len(result.new_ids)} new"
        used = f", {result.used} already in an issue" if result.used else ""
        click.echo(f"{result.feed.name}: {status}, {len(result.items)} not used yet{used}")
        for item in result.items:
            date = item.published.isoformat() if item.published else "          "
            mark = "  (new)" if item.id in result.new_ids else ""
            click.echo(f"  {item.id}  {date}  {item.title}{mark}")
            click.echo(f"           {item.url}")
    if any(result.items for result in report.results):
        click.echo("Add one with: newsletter issue add ISSUE feed:ID")
    report.raise_for_errors()


# --- deliverability commands ---


@main.command("check")
@click.argument("issue_ref", metavar="ISSUE")
@click.option("--spam", is_flag=True, help="Also score a sample message with SpamAssassin (-L).")
@click.option(
    "--online",
    is_flag=True,
    help="Also request every image and link of the email (HEAD, else GET) and list failures.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def check_command(ctx: Context, issue_ref: str, spam: bool, online: bool, as_json: bool) -> None:
    """Say what would hurt ISSUE's delivery; exit 1 when there are errors."""
    from . import check

    cfg = ctx.config()
    fields: set[str] = set()
    if cfg.database.exists:  # reading the list must not create a database
        with _open_store(ctx) as store:
            fields = store.field_names()
    report = check.check_issue(
        cfg, _issue(cfg, issue_ref), spam=spam, online=online, subscriber_fields=fields
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(f"Issue {report.issue_number}: {report.subject}")
        for finding in report.findings:
            where = f"  [{finding.where}]" if finding.where else ""
            click.echo(f"{finding.level:<8}{finding.code:<26}{finding.message}{where}")
        if report.spam is not None:
            for rule in report.spam.rules:
                click.echo(
                    f"{'':8}{'spam rule':<26}{rule.score:+5.1f}  {rule.name}  {rule.description}"
                )
        click.echo(f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    if not report.ok:
        sys.exit(1)


@main.group("dkim")
def dkim_group() -> None:
    """DKIM keys for signing outgoing mail."""


@dkim_group.command("keygen")
@click.option(
    "--selector", default=None, help="DKIM selector (default: [dkim] selector, or 'newsletter')."
)
@click.option(
    "--domain", default=None, help="Signing domain (default: [dkim] domain, or the sender's)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the key files (default: .newsletter/dkim/, which git ignores).",
)
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size (1024-4096).")
@pass_ctx
def dkim_keygen(
    ctx: Context, selector: str | None, domain: str | None, out_dir: Path | None, bits: int
) -> None:
    """Write a DKIM key pair and print the DNS TXT record to publish."""
    from . import dkim

    cfg = ctx.config() if None in (selector, domain, out_dir) else None
    pair = dkim.generate(
        out_dir or (cfg.state_dir / "dkim" if cfg else Path(".")),
        selector or (cfg.dkim.selector if cfg and cfg.dkim.selector else "newsletter"),
        domain or (cfg.dkim.domain or cfg.sender_domain if cfg else ""),
        bits=bits,
    )
    click.echo(f"private key: {pair.private_path}  (mode 600; keep it out of git)")
    click.echo(f"public key:  {pair.public_path}")
    click.echo("Publish this DNS record:")
    click.echo(pair.zone_line)
    click.echo(
        f'Then set [dkim] selector, domain and key_file = "{pair.private_path}" in newsletter.toml '
        "(or NEWSLETTER_DKIM_KEY_FILE), and run `newsletter check`."
    )


@dkim_group.command("record")
@pass_ctx
def dkim_record(ctx: Context) -> None:
    """Print the DNS TXT record for the configured DKIM key (reads the key, checks the config)."""
    from . import dkim

    cfg = ctx.config()
    signer = dkim.signer_from_config(cfg)
    if signer is None:
        raise ConfigError(
            "DKIM is not configured",
            where=str(cfg.path),
            hint="set [dkim] selector, domain and key_file; `newsletter dkim keygen` makes a key",
        )
    click.echo(signer.zone_line)
    for warning in signer.warnings:
        click.echo(f"Warning: {warning}", err=True)


@main.command("dns")
@pass_ctx
def dns_command(ctx: Context) -> None:
    """Print the SPF, DKIM and DMARC records to publish for the sender's domain."""
    from . import dns

    cfg = ctx.config()
    click.echo(f"; DNS records for mail From {cfg.sender_domain} (zone-file lines)")
    for record in dns.records(cfg):
        click.echo(f"; {record.kind}")
        for note in record.notes:
            click.echo(f";   {note}")
        if record.zone_line:
            click.echo(record.zone_line)


# --- smtp-sink command ---


@main.command("smtp-sink")
@host_option("127.0.0.1", "Address to listen on.")
@port_option("Port (default: [smtp] port of the workspace, else 8025; 0 picks a free one).")
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
def smtp_sink_command(
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
    if not is_loopback(host, resolve=False) and allow_remote:
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
    try:
        # Inside the try: a Ctrl-C right after this line (before wait()) must stop cleanly.
        click.echo(f"smtp-sink listening on {sink.host}:{sink.port}, {stored} (Ctrl-C to stop)")
        sink.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    click.echo(f"smtp-sink stopped after {sink.count} messages.")


# --- preview command ---


@main.command("preview")
@click.argument("issue_ref", metavar="ISSUE")
@host_option(
    "127.0.0.1",  # preview.DEFAULT_HOST; written out so --help need not import preview
    "Address to listen on; anything but loopback lets other machines read the preview.",
)
@port_option("Port to listen on; 0 picks a free one (default: 8765, or a free one if taken).")
@click.option("--no-open", is_flag=True, help="Do not open the page in a browser.")
@pass_ctx
def preview_command(
    ctx: Context, issue_ref: str, port: int | None, host: str, no_open: bool
) -> None:
    """Preview ISSUE in a browser; it rebuilds and reloads on every save."""
    from . import preview

    cfg = ctx.config()
    folder = content.find_issue(cfg.issues_dir, issue_ref)
    warning = preview.host_warning(host)
    if warning:
        click.echo(f"Warning: {warning}", err=True)

    def report(state: preview.PreviewState) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        if state.problem is not None:
            click.echo(f"{stamp} Build error: {state.problem.text}", err=True)
        else:
            click.echo(f"{stamp} Built {state.issue} in {state.seconds:.2f} s")
            for text in state.warnings:
                click.echo(f"{stamp} Warning: {text}", err=True)

    server = preview.PreviewServer(
        cfg, folder, host, preview.DEFAULT_PORT if port is None else port, on_build=report
    )
    try:
        server.start()
    except PreviewError:
        if port is not None:
            raise
        click.echo(f"Port {preview.DEFAULT_PORT} is taken; using a free one.", err=True)
        server = preview.PreviewServer(cfg, folder, host, 0, on_build=report)
        server.start()
    click.echo(f"Preview of {folder.name} at {server.url}  (Ctrl-C to stop)")
    if not no_open:
        webbrowser.open(server.url)
    try:
        server.wait()
    except KeyboardInterrupt:
        click.echo("\nPreview stopped.")
    finally:
        server.stop()


# --- subscriber commands ---


def _field_warnings(ctx: Context, rendered: render.RenderedIssue) -> list[str]:
    """Fields the templates use that no subscriber has (none checked without a database:
    reading one must not create it)."""
    if not any(key.startswith("field.") for key in rendered.placeholders.values()):
        return []
    if not ctx.config().database.exists:
        return render.unknown_fields(rendered, ())
    with _open_store(ctx) as store:
        return render.unknown_fields(rendered, store.field_names())


def _open_store(ctx: Context) -> Store:
    """The workspace's database (imported late: email-validator slows every command's start)."""
    from .store import Store

    return Store.open(ctx.config().database)


_STATUS_CHOICE = click.Choice(["active", "pending", "unsubscribed", "bounced", "complained"])


@main.group("subscribers")
def subscribers_group() -> None:
    """Manage the subscriber list (import, add, unsubscribe, list, export...)."""


@subscribers_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--from",
    "tool",
    type=click.Choice(["mailchimp", "substack", "buttondown", "listmonk", "ghost"]),
    default=None,
    help="The file is that tool's export: its columns and statuses are read its way.",
)
@click.option(
    "--map",
    "column_map",
    default=None,
    metavar="OURS=THEIRS,...",
    help='Name the columns of any other CSV, e.g. "email=Email Address,name=First Name".',
)
@click.option(
    "--dry-run", is_flag=True, help="Show the mapping and what would happen; write nothing."
)
@pass_ctx
def subscribers_import(
    ctx: Context, file: Path, tool: str | None, column_map: str | None, dry_run: bool
) -> None:
    """Import subscribers from a CSV file (columns: email, name, status, tags, created_at;
    any others become fields), or another tool's export with --from or --map.

    Every bad row is reported as FILE:LINE; the good rows are imported all at once.
    Nobody who unsubscribed, bounced or complained is reactivated, and nobody who left
    or was removed is added back (suppressed). A sign-up date column (signup_date,
    created_at, optin_time, Date Added...) is kept as consent, with the file and line.
    Exits 1 when the file itself is unusable, or when it has bad rows and no good one.
    """
    from . import presets

    if tool is not None and column_map is not None:
        raise click.UsageError("use --from or --map, not both")
    mapping = presets.preset(tool) if tool is not None else None
    if column_map is not None:
        mapping = presets.parse_map(column_map)
    shown: list[RowError] = []

    def on_error(error: RowError) -> None:
        if not dry_run:
            click.echo(f"{file}:{error.line}: {error.message}", err=True)
        elif len(shown) < DRY_RUN_BAD_LINES:
            shown.append(error)

    with _open_store(ctx) as store:
        report = store.import_csv(file, on_error=on_error, mapping=mapping, dry_run=dry_run)
    if report.mapping:
        click.echo(f"Mapping ({mapping.name if mapping else 'plain'}):")
        for line in report.mapping:
            click.echo(f"  {line}")
    per_status = ", ".join(f"{n} {status}" for status, n in report.new_by_status.items())
    if dry_run:
        click.echo(
            f"{file}: would add {report.added} ({per_status or 'none'}), update"
            f" {report.updated}, leave {report.unchanged} unchanged and"
            f" {report.skipped_inactive} alone (unsubscribed, bounced or complained);"
            f" {report.duplicates} duplicate rows, {report.error_count} bad rows."
        )
        for error in shown:
            click.echo(f"{file}:{error.line}: {error.message}")
        if report.error_count > len(shown):
            click.echo(f"... and {report.error_count - len(shown)} more bad rows")
        click.echo("Dry run: nothing was written.")
        return
    click.echo(
        f"{file}: {report.added} added"
        + (f" ({per_status})" if per_status else "")
        + f", {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.skipped_inactive} left alone (unsubscribed, bounced or complained), "
        f"{report.suppressed} suppressed (left before: not added back), "
        f"{report.duplicates} duplicate rows merged, {report.error_count} bad rows."
    )
    if report.error_count and not (report.imported or report.skipped_inactive or report.suppressed):
        fail(f"{file}: no row could be imported")


DRY_RUN_BAD_LINES = 10  # the first bad lines `import --dry-run` shows


@subscribers_group.command("tag")
@click.argument("email")
@click.argument("tags", nargs=-1, required=True)
@pass_ctx
def subscribers_tag(ctx: Context, email: str, tags: tuple[str, ...]) -> None:
    """Add TAGS to a subscriber (recorded in their history)."""
    with _open_store(ctx) as store:
        added, _ = store.change_tags(email, add=tags, reason="tag", detail="cli")
    click.echo(f"Tagged {email}: {', '.join(added)}." if added else f"{email} had those tags.")


@subscribers_group.command("untag")
@click.argument("email")
@click.argument("tags", nargs=-1, required=True)
@pass_ctx
def subscribers_untag(ctx: Context, email: str, tags: tuple[str, ...]) -> None:
    """Take TAGS off a subscriber (recorded in their history)."""
    with _open_store(ctx) as store:
        _, removed = store.change_tags(email, remove=tags, reason="untag", detail="cli")
    click.echo(
        f"Untagged {email}: {', '.join(removed)}." if removed else f"{email} had none of those."
    )


@subscribers_group.command("tags")
@pass_ctx
def subscribers_tags(ctx: Context) -> None:
    """Print every tag with how many subscribers carry it."""
    with _open_store(ctx) as store:
        counts = store.tag_counts()
    for tag, number in counts.items():
        click.echo(f"{tag}\t{number}")


@subscribers_group.command("add")
@click.argument("email")
@click.option("--name", default="", help="The subscriber's name.")
@click.option(
    "--field",
    "fields",
    multiple=True,
    metavar="KEY=VALUE",
    help="A personalisation field (repeatable).",
)
@pass_ctx
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


@subscribers_group.command("remove")
@click.argument("email")
@click.option(
    "--force",
    is_flag=True,
    help="Also delete the record of issues sent to them (otherwise refused).",
)
@pass_ctx
def subscribers_remove(ctx: Context, email: str, force: bool) -> None:
    """Delete a subscriber for good (to stop mail, use `unsubscribe`: it keeps the record)."""
    with _open_store(ctx) as store:
        store.remove_subscriber(email, force=force)
    click.echo(f"Removed {email}.")


@subscribers_group.command("unsubscribe")
@click.argument("email")
@pass_ctx
def subscribers_unsubscribe(ctx: Context, email: str) -> None:
    """Mark a subscriber unsubscribed (kept in the list, never sent to again)."""
    with _open_store(ctx) as store:
        subscriber = store.set_status(email, Status.UNSUBSCRIBED, "cli")
    click.echo(f"Unsubscribed {subscriber.email}.")


@subscribers_group.command("list")
@click.option("--status", type=_STATUS_CHOICE, default=None, help="Only this status.")
@click.option("--tag", default=None, help="Only subscribers with this tag.")
@click.option("--segment", default=None, help="Only subscribers in this [segments] entry.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines).")
@pass_ctx
def subscribers_list(
    ctx: Context, status: str | None, tag: str | None, segment: str | None, as_json: bool
) -> None:
    """Print subscribers, one per line: email, status and name, tab-separated."""
    cfg = ctx.config()
    chosen = _segment(cfg, segment)
    with _open_store(ctx) as store:
        for sub in store.list_subscribers(
            None if status is None else Status(status), tag=tag, segment=chosen
        ):
            if as_json:
                row = {
                    "id": sub.id,
                    "email": sub.email,
                    "name": sub.name,
                    "status": sub.status.value,
                    "fields": dict(sub.fields),
                    "created_at": sub.created_at.isoformat(),
                    "status_changed_at": sub.status_changed_at.isoformat(),
                    "soft_bounces": sub.soft_bounces,
                }
                click.echo(json.dumps(row, ensure_ascii=False))
            else:
                click.echo(f"{sub.email}\t{sub.status}\t{sub.name}")


def _segment(cfg: Config, name: str | None) -> Segment | None:
    """The [segments] entry called ``name`` (None for none); an error names the known ones."""
    from .segments import require_segment

    return None if name is None else require_segment(cfg.segments, name)


@subscribers_group.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--status", type=_STATUS_CHOICE, default=None, help="Only this status.")
@pass_ctx
def subscribers_export(ctx: Context, file: Path | None, status: str | None) -> None:
    """Write subscribers as CSV to FILE (replaced atomically) or to standard output."""

    wanted = None if status is None else Status(status)
    if file is not None and not file.parent.is_dir():
        fail(f"{file}: the folder {file.parent} does not exist; create it or fix the path")
    with _open_store(ctx) as store:
        if file is None:
            store.export_csv(sys.stdout, wanted)
            return
        with atomic_open_text(file, newline="") as handle:
            count = store.export_csv(handle, wanted)
    click.echo(f"Wrote {count} subscribers to {file}.", err=True)


def _person(store: Store, email: str) -> PersonRecord:
    record = store.person(email)
    if record is None:
        fail(
            f"nothing is held about {email.strip()}: not on the list, not suppressed,"
            " no bounce recorded; check the spelling"
        )
    return record


@subscribers_group.command("show")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON (as export-person).")
@pass_ctx
def subscribers_show(ctx: Context, email: str, as_json: bool) -> None:
    """Show one person: status, fields, consent, history, deliveries and bounces.

    Works for an address no longer on the list too: its suppression and any bounce
    recorded for it.
    """
    from . import privacy

    with _open_store(ctx) as store:
        record = _person(store, email)
    if as_json:
        click.echo(json.dumps(privacy.person_document(record), indent=2, ensure_ascii=False))
        return
    for line in privacy.describe(record):
        click.echo(line)


@subscribers_group.command("export-person")
@click.argument("email")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON to FILE (replaced atomically) instead of standard output.",
)
@pass_ctx
def subscribers_export_person(ctx: Context, email: str, out: Path | None) -> None:
    """Everything held about one person, as JSON: the answer to an access request.

    The subscriber row and fields, consent, status history, every delivery with its
    Message-ID, bounces, an open confirmation and the suppression entry.
    """
    from . import privacy

    if out is not None and not out.parent.is_dir():
        fail(f"{out}: the folder {out.parent} does not exist; create it or fix the path")
    with _open_store(ctx) as store:
        record = _person(store, email)
    text = json.dumps(privacy.person_document(record), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    with atomic_open_text(out) as handle:
        handle.write(text)
    click.echo(f"Wrote everything held about {record.address} to {out}.", err=True)


@subscribers_group.command("erase")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Erase without asking.")
@pass_ctx
def subscribers_erase(ctx: Context, email: str, yes: bool) -> None:
    """Delete everything held about one person: the answer to an erasure request.

    Their row, fields, consent, history and ledger rows go (old issues keep the counts);
    bounce records lose the address. Only a keyed hash of the address stays, so that
    no import adds them back. Asks first, unless --yes.
    """
    from . import privacy

    with _open_store(ctx) as store:
        record = _person(store, email)
        if not yes:
            if not stdin_is_terminal():
                fail(
                    "not erasing: there is no terminal to confirm with (input is piped or"
                    " absent); run it in a terminal, or add --yes to erase without asking"
                )
            for line in privacy.describe(record):
                click.echo(line)
            try:
                confirmed = click.confirm(
                    f"Erase everything held about {record.address}? This cannot be undone",
                    default=False,
                )
            except click.Abort:
                confirmed = False
                click.echo()
            if not confirmed:
                click.echo("Nothing erased.")
                sys.exit(EXIT_FAILURE)
        erased = store.erase_person(email)
    click.echo(privacy.describe_erasure(erased))


@subscribers_group.command("count")
@click.option("--segment", default=None, help="Count only this [segments] entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@pass_ctx
def subscribers_count(ctx: Context, segment: str | None, as_json: bool) -> None:
    """Print how many subscribers have each status (in a segment, with --segment)."""
    cfg = ctx.config()
    chosen = _segment(cfg, segment)
    with _open_store(ctx) as store:
        if chosen is None:
            counts = store.count_by_status()
        else:
            counts = {state: store.count(state, segment=chosen) for state in Status}
        recipients = store.count_recipients(chosen) if chosen is not None else None
    if as_json:
        data: dict[str, int] = {state.value: number for state, number in counts.items()}
        data["total"] = sum(counts.values())
        if recipients is not None:
            data["recipients"] = recipients
        click.echo(json.dumps(data, indent=2))
        return
    for state, number in counts.items():
        click.echo(f"{state:<13}{number:>9}")
    click.echo(f"{'total':<13}{sum(counts.values()):>9}")
    if recipients is not None:
        click.echo(f"{'recipients':<13}{recipients:>9}  (active and not paused: a send's count)")


# --- publishing ---


@main.command("publish")
@click.argument("issue_ref", metavar="[ISSUE]", required=False)
@click.option(
    "--to",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the whole archive as static files into DIR (index.html, feed.xml, one "
    "folder per issue), for any web server or static host.",
)
@click.option(
    "--undo",
    is_flag=True,
    help="Take ISSUE's page down (its images stay while sent emails point at them).",
)
@pass_ctx
def publish_command(ctx: Context, issue_ref: str | None, out_dir: Path | None, undo: bool) -> None:
    """Put ISSUE's web page and images at their public address ([newsletter] base_url).

    `send` does this first by itself; publishing earlier makes the page and images
    answer before any copy goes out (for proofs, and `check --online`).
    """
    from . import publish

    if issue_ref is None and (undo or out_dir is None):
        fail("name the ISSUE to publish (or to take down with --undo), or give --to DIR")
    cfg = ctx.config()
    urls = cfg.public_urls
    with _open_store(ctx) as store:
        if issue_ref is not None and undo:
            withdrawn = publish.unpublish_issue(cfg, store, _issue(cfg, issue_ref))
            item = withdrawn.issue
            state = "Took down" if withdrawn.was_published else "Was not on the web:"
            click.echo(f"{state} issue {item.number} ({item.slug}): {urls.issue(item.slug)}")
            if withdrawn.images_kept:
                click.echo(
                    f"Its {len(withdrawn.images_kept)} images stay: the issue was sent, and "
                    "those emails show them:"
                )
                for relative in withdrawn.images_kept:
                    click.echo(f"  {urls.asset(item.slug, relative)}")
            else:
                click.echo("Its images are no longer served either (no email was sent with them).")
        elif issue_ref is not None:
            done = publish.publish_issue(cfg, store, _issue(cfg, issue_ref))
            again = " (already published; refreshed)" if done.already else ""
            click.echo(f"Published issue {done.issue.number}{again}: {done.url}")
            click.echo(f"Images:   {done.weight.describe()}")
            click.echo(f"Archive:  {urls.home}   Feed: {urls.feed}")
        if out_dir is not None:
            export = publish.export_archive(cfg, store, out_dir)
            click.echo(
                f"Wrote the archive to {export.out_dir}: {len(export.pages)} issue pages, "
                f"{export.files} files, {_kb(export.bytes)}"
            )
            click.echo(f"Serve that folder at {urls.home} (links inside are relative).")
    if urls.is_placeholder:
        click.echo(f"Warning: {_placeholder_note(cfg)}", err=True)


def _placeholder_mark(cfg: Config) -> str:
    if not cfg.public_urls.is_placeholder:
        return ""
    return (
        f"  ({cfg.public_urls.host} is a placeholder: images and links will not work for readers)"
    )


def _placeholder_note(cfg: Config) -> str:
    return (
        f"the public address {cfg.public_urls.base} is a placeholder: readers' images and "
        "links will not work; set [newsletter] base_url to where `newsletter serve` answers"
    )


# --- sending commands ---


def stdin_is_terminal() -> bool:
    """Whether a person can answer the send prompt (a piped "y" does not count)."""
    return sys.stdin.isatty()


def _print_report(report: DeliveryReport) -> None:

    click.echo(
        f"Sent {report.sent}, failed {report.failed}, deferred {report.deferred}, "
        f"uncertain {report.uncertain} in {report.elapsed:.1f} s ({report.rate:.0f} msgs/s)."
    )
    counts = ", ".join(f"{state} {n}" for state, n in report.counts.items() if n)
    click.echo(f"Ledger for {report.issue_key}: {counts or 'empty'}")
    shown = [e for e in report.problems if e.state != DeliveryState.DEFERRED]
    for entry in shown[:20]:
        click.echo(f"  {entry.state:<9} {entry.email}  {entry.last_reply}")
    deferred = report.counts.get(DeliveryState.DEFERRED, 0)
    if deferred:
        click.echo(
            f"{deferred} deferred: `newsletter send {report.issue_key}` again later sends them."
        )
    if report.counts.get(DeliveryState.UNCERTAIN, 0):
        click.echo(
            "Uncertain recipients may or may not have their copy; "
            "--resend-uncertain sends them another."
        )
    if len(shown) > 20 or deferred:
        click.echo(f"See `newsletter status {report.issue_key}` for every recipient's reply.")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event that Ctrl-C (or SIGTERM) sets while the block runs.

    The send then lets the messages already with the server finish and be recorded,
    so nothing is left uncertain; a second Ctrl-C aborts at once. The previous
    handlers come back when the block ends.
    """
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nStopping after the messages in flight (Ctrl-C again to abort)...", err=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command("send")
@click.argument("issue_ref", metavar="ISSUE")
@click.option("--yes", is_flag=True, help="Send without asking.")
@click.option("--dry-run", is_flag=True, help="Build every message; send and record nothing.")
@click.option(
    "--test",
    "test_addresses",
    multiple=True,
    metavar="ADDR",
    help="Send a [TEST] proof copy to ADDR (repeatable); the ledger is not touched.",
)
@click.option(
    "--as",
    "as_email",
    default=None,
    metavar="SUBSCRIBER_EMAIL",
    help="With --test: the proof is this subscriber's copy (their name and fields).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Send at most N messages in this run."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=None,
    help="At most this many messages per second (0: no limit).",
)
@click.option(
    "--connections",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Parallel SMTP connections (default: [delivery] connections).",
)
@click.option(
    "--resend-uncertain",
    is_flag=True,
    help="Also send to recipients a crashed run left uncertain (they may get two copies).",
)
@click.option(
    "--include-new", is_flag=True, help="Add subscribers who joined after this issue's first send."
)
@click.option(
    "--segment",
    "segment_name",
    default=None,
    metavar="NAME",
    help="Send only to this [segments] entry (or set segment: in issue.md).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="The final report as JSON (the rest goes to stderr)."
)
@pass_ctx
def send_command(
    ctx: Context,
    issue_ref: str,
    yes: bool,
    dry_run: bool,
    test_addresses: tuple[str, ...],
    as_email: str | None,
    limit: int | None,
    rate: float | None,
    connections: int | None,
    resend_uncertain: bool,
    include_new: bool,
    segment_name: str | None,
    as_json: bool,
) -> None:
    """Send ISSUE to every active subscriber (or a segment's), once; re-running resumes.

    Exit status: 0 when every recipient of this run was sent to, 1 when one
    failed or the run stopped, 75 when some were deferred for a later run.
    """
    from . import delivery, publish
    from .progress import ProgressLines

    def echo(message: str = "") -> None:
        click.echo(message, err=as_json)  # with --json, stdout has the report alone

    if as_email is not None and not test_addresses:
        fail("--as works with --test: send --test YOUR_ADDRESS --as SUBSCRIBER_EMAIL")
    cfg = ctx.config()
    outbound = delivery.outbound_from_config(cfg)  # settings and DKIM key, before rendering
    issue_item = _issue(cfg, issue_ref)
    if segment_name and issue_item.segment and segment_name != issue_item.segment:
        fail(
            f"{issue_item.path / content.ISSUE_FILE} says segment: {issue_item.segment};"
            f" --segment {segment_name} disagrees: change one of them"
        )
    chosen = _segment(cfg, segment_name or issue_item.segment or None)
    rendered = render.render_issue(issue_item, cfg)
    if not dry_run and not test_addresses:
        publish.require_alt_text(rendered)  # before anything is recorded
    if test_addresses:
        for missing in rendered.missing_alt:
            click.echo(f"Warning: {missing} has no alt text (a real send refuses)", err=True)
        # The page and images the proof points at answer before it goes out.
        with _open_store(ctx) as store:
            reader = store.get_subscriber(as_email) if as_email is not None else None
            if as_email is not None and reader is None:
                fail(
                    f"--as {as_email}: no such subscriber; `newsletter subscribers list` shows them"
                )
            published = publish.publish_issue(cfg, store, issue_item, listed=False)
        unlisted = "" if published.listed else " (unlisted until sent or published)"
        click.echo(f"Published:  {published.url}{unlisted}{_placeholder_mark(cfg)}")
        results = delivery.prepare_send(cfg, rendered, outbound=outbound).send_test(
            test_addresses, as_subscriber=reader
        )
        for result in results:
            click.echo(
                f"{result.outcome:<9} {result.recipient}  "
                f"{result.code or ''} {result.reply}".rstrip()
            )
        if not all(r.ok for r in results):
            sys.exit(1)
        return
    options = delivery.SendOptions(
        limit=limit,
        rate=rate,
        connections=connections,
        include_new=include_new,
        resend_uncertain=resend_uncertain,
        segment=chosen,
    )
    with _open_store(ctx) as store:
        prepared = delivery.prepare_send(cfg, rendered, store, outbound=outbound)
        if dry_run:
            if chosen is not None:
                click.echo(f"Segment:    {_describe_segment(chosen)}")
            for warning in render.unknown_fields(rendered, store.field_names()):
                click.echo(f"Warning: {warning}", err=True)
            dry = prepared.dry_run(segment=chosen)
            for address in dry.invalid:
                click.echo(f"cannot build a message for {address!r}", err=True)
            click.echo(
                f"Dry run: built {dry.messages} messages, {dry.total_bytes / 1e6:.1f} MB, "
                f"in {dry.elapsed:.2f} s. Nothing was sent or recorded."
            )
            return
        plan = prepared.plan(options)
        echo(f"Subject:    {plan.subject}")
        echo(f"From:       {plan.sender}")
        if chosen is not None:
            echo(f"Segment:    {_describe_segment(chosen)}")
        echo(
            f"Recipients: {plan.recipients}"
            + (f" (already sent: {plan.already_sent})" if plan.already_sent else "")
        )
        if plan.uncertain and not resend_uncertain:
            echo(
                f"Uncertain:  {plan.uncertain} (may have their copy; sent again only with "
                "--resend-uncertain)"
            )
        if plan.new_subscribers and not include_new:
            echo(
                f"New:        {plan.new_subscribers} joined after the first send "
                "(added only with --include-new)"
            )
        echo(f"Size:       {_kb(plan.message_size)} per message")
        echo(f"Transport:  {plan.transport}")
        if outbound.sign is None:
            echo(
                "DKIM:       off! Gmail and Yahoo require DKIM of bulk senders (unless your "
                "mail server signs); `newsletter dns` shows what to publish"
            )
        else:
            echo(f"DKIM:       signed for {cfg.dkim.domain} (selector {cfg.dkim.selector})")
        if plan.warmup_left is not None:
            echo(
                f"Warm-up:    {plan.warmup_left} more messages today; the rest stays queued "
                "for the next days ([delivery] warmup_*)"
            )
        echo(f"Web page:   {cfg.public_urls.issue(issue_item.slug)}{_placeholder_mark(cfg)}")
        if plan.recipients == 0:
            echo("Nothing to send.")
            return
        if not yes:
            if not stdin_is_terminal():
                fail(
                    "not sending: there is no terminal to confirm with (input is piped or absent); "
                    "run it in a terminal, or add --yes to send without asking"
                )
            try:
                confirmed = click.confirm("Send now?", default=False)
            except click.Abort:
                confirmed = False  # no answer (no terminal, end of input): do not send
                echo()
            if not confirmed:
                echo("Not sent.")
                sys.exit(1)
        # The page and images every copy points at answer before the first one goes out.
        publish.publish_issue(cfg, store, issue_item)
        bar: Any = None
        lines = ProgressLines(
            lambda line: click.echo(f"Sending: {line}", err=True),
            every=cfg.worker.progress_seconds,
        )

        def show(progress: delivery.Progress) -> None:
            nonlocal bar
            if not sys.stderr.isatty():
                lines(progress)  # no bar in a log file: a line every few seconds
                return
            if bar is None:
                bar = click.progressbar(
                    length=max(progress.total, 1),
                    label="Sending",
                    show_pos=True,
                    show_eta=True,
                    item_show_func=lambda p: f"{p.rate:.0f}/s" if p is not None else None,
                    file=sys.stderr,
                )
                bar.__enter__()
            bar.update(progress.done - bar.pos, current_item=progress)

        try:
            with _stop_on_signals() as stop:
                report = prepared.run(options, progress=show, stop=stop)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    if report.found_uncertain:
        echo(f"Found {report.found_uncertain} recipients left uncertain by a crashed run.")
    if as_json:
        click.echo(json.dumps(_report_data(report), indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    if report.error is not None:
        fail(str(report.error))
    if report.stopped_by:
        fail(f"the send stopped early ({report.stopped_by}); run it again to resume")
    if not report.ok:
        sys.exit(1)
    if report.counts.get(DeliveryState.DEFERRED):  # the ledger, not this run's tally
        sys.exit(EXIT_DEFERRED)


def _describe_segment(segment: Segment) -> str:
    return f"{segment.name} ({segment.expression}; active subscribers who have not paused)"


@main.command("schedule")
@click.argument("issue_ref", metavar="ISSUE")
@click.option(
    "--at",
    "at",
    default=None,
    metavar="TIME",
    help='When, with its zone: "2026-12-04 07:00 Europe/Berlin" or 2026-12-04T07:00+01:00 '
    "(default: send_at in issue.md).",
)
@click.option("--cancel", is_flag=True, help="Cancel ISSUE's schedule.")
@pass_ctx
def schedule_command(ctx: Context, issue_ref: str, at: str | None, cancel: bool) -> None:
    """Schedule ISSUE to be sent by `newsletter worker` at a time; the checks a send makes
    run now and again at that time."""
    from . import schedule

    if cancel and at is not None:
        fail("--cancel takes no --at", EXIT_USAGE)
    cfg = ctx.config()
    issue_item = _issue(cfg, issue_ref)
    with _open_store(ctx) as store:
        if cancel:
            schedule.cancel(store, issue_item)
            click.echo(f"Cancelled the scheduled send of issue {issue_item.number}.")
            return
        when = schedule.parse_when(at) if at is not None else None
        entry = schedule.schedule_issue(cfg, store, issue_item, when)
    click.echo(
        f"Scheduled issue {issue_item.number} ({issue_item.slug}) for {schedule.describe(entry)}"
        f" ({entry.send_at:%Y-%m-%d %H:%M} UTC)."
    )
    click.echo("`newsletter worker` sends it then; it must be running.")


@main.command("worker")
@click.option("--once", is_flag=True, help="Run one pass and exit (for cron and tests).")
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of plain text.")
@pass_ctx
def worker_command(ctx: Context, once: bool, log_json: bool) -> None:
    """Send scheduled issues, retry deferred recipients, read the inbound mailbox and prune
    unconfirmed sign-ups, until stopped (SIGTERM or Ctrl-C: messages in flight finish).

    Exit status: 0, or 1 when a job of the (last) pass failed.
    """
    from . import logsetup, worker

    cfg = ctx.config()
    with logsetup.logging_to(json_lines=log_json), _open_store(ctx) as store:
        if once:
            report = worker.run(cfg, store, once=True)
        else:
            with _stop_on_signals() as stop:
                report = worker.run(cfg, store, stop=stop)
    if not report.ok:
        sys.exit(EXIT_FAILURE)


@main.command("status")
@click.argument("issue_ref", metavar="ISSUE")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_ctx
def status_command(ctx: Context, issue_ref: str, as_json: bool) -> None:
    """Show ISSUE's delivery counts, the processes sending it now (host, pid, heartbeat,
    rate), and every failed, deferred or uncertain recipient."""
    cfg = ctx.config()
    issue_item = _issue(cfg, issue_ref)
    if as_json:
        with _open_store(ctx) as store:
            data = _status_data(store, issue_item)
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        schedule_state = (data["schedule"] or {}).get("state")
        if schedule_state == "failed" and data["snapshot"] is None:
            sys.exit(EXIT_FAILURE)
        return
    with _open_store(ctx) as store:
        scheduled = store.get_schedule(issue_item.slug)
        if scheduled is not None:
            from .schedule import describe

            click.echo(
                f"Schedule: {scheduled.state} for {describe(scheduled)} (by {scheduled.source})"
            )
            if scheduled.last_error:
                click.echo(f"Last error: {scheduled.last_error}")
        snapshot = store.issue_snapshot(issue_item.slug)
        if snapshot is None:
            click.echo(f"Issue {issue_item.number} ({issue_item.slug}) has not been sent.")
            if scheduled is not None and scheduled.state == "failed":
                sys.exit(EXIT_FAILURE)
            return
        counts = store.ledger_counts(issue_item.slug)
        erased = store.erased_counts(issue_item.slug)
        problems = store.ledger_problems(issue_item.slug)
        bounced = store.bounces_for_issue(issue_item.slug)
        segment = store.issue_segment(issue_item.slug)
        senders = store.senders(issue_item.slug)
    click.echo(
        f"Issue {issue_item.number} ({issue_item.slug}): "
        f"{snapshot.recipients + sum(erased.values())} recipients"
        + (f" in segment {segment}" if segment else "")
        + f", fixed {snapshot.snapshot_at:%Y-%m-%d %H:%M} UTC"
    )
    for state, number in counts.items():
        click.echo(f"  {state:<10}{number + erased.get(state, 0):>8}")
    if erased:
        click.echo(
            f"  ({sum(erased.values())} of these were erased or removed since:"
            " only their counts are kept)"
        )
    _print_senders(senders)
    for entry in problems:
        click.echo(f"{entry.state:<9} {entry.email}  attempts {entry.attempts}  {entry.last_reply}")
    if bounced:
        click.echo(f"Bounces: {len(bounced)}")
    for record in bounced:
        click.echo(
            f"bounce {record.kind:<4} {record.status or '?':<7} {record.email or ERASED}"
            f"  {record.effect}"
        )


def _print_senders(senders: Sequence[SenderRun]) -> None:
    """The processes sending the issue now, one line each."""
    if not senders:
        return
    click.echo(f"Sending now: {len(senders)} process{'es' if len(senders) > 1 else ''}")
    for run in senders:
        where = f"  {run.host} pid {run.pid} (run {run.run_id}), since {run.started_at:%H:%M:%S}"
        if run.responding:
            click.echo(
                f"{where}, heartbeat {run.heartbeat_age:.0f} s ago: sent {run.sent:,},"
                f" {run.rate:,.1f} msgs/s over the last minute"
            )
        else:
            click.echo(
                f"{where}: not responding since {run.heartbeat_at:%H:%M:%S} (sent {run.sent:,});"
                " its unrecorded rows become uncertain when a sender notices"
            )


def _sender_data(run: SenderRun) -> dict[str, Any]:
    return {
        "run": run.run_id,
        "host": run.host,
        "pid": run.pid,
        "started_at": run.started_at.isoformat(),
        "heartbeat_at": run.heartbeat_at.isoformat(),
        "lease_until": run.lease_until.isoformat(),
        "responding": run.responding,
        "claimed": run.claimed,
        "sent": run.sent,
        "failed": run.failed,
        "deferred": run.deferred,
        "uncertain": run.uncertain,
        "rate": round(run.rate, 1),
    }


def _status_data(store: Store, issue_item: Issue) -> dict[str, Any]:
    """``status --json``: the schedule, the ledger's counts, its problem rows, bounces."""
    key = issue_item.slug
    scheduled = store.get_schedule(key)
    snapshot = store.issue_snapshot(key)
    return {
        "issue": issue_item.number,
        "slug": key,
        "schedule": None
        if scheduled is None
        else {
            "state": scheduled.state.value,
            "send_at": scheduled.send_at.isoformat(),
            "zone": scheduled.zone,
            "source": scheduled.source,
            "last_error": scheduled.last_error,
        },
        "snapshot": None
        if snapshot is None
        else {"at": snapshot.snapshot_at.isoformat(), "recipients": snapshot.recipients},
        "counts": {state.value: n for state, n in store.ledger_counts(key).items()},
        "senders": [_sender_data(run) for run in store.senders(key)],
        "problems": [
            {
                "state": entry.state.value,
                "email": entry.email,
                "attempts": entry.attempts,
                "last_reply": entry.last_reply,
                "retry_at": entry.retry_at.isoformat() if entry.retry_at else None,
            }
            for entry in store.ledger_problems(key)
        ],
        "bounces": [
            {"kind": b.kind.value, "status": b.status, "email": b.email, "effect": b.effect}
            for b in store.bounces_for_issue(key)
        ],
    }


def _report_data(report: DeliveryReport) -> dict[str, Any]:
    """``send --json``: the run's final report."""
    return {
        "issue": report.issue_key,
        "ok": report.ok,
        "sent": report.sent,
        "failed": report.failed,
        "deferred": report.deferred,
        "uncertain": report.uncertain,
        "attempts": report.attempts,
        "retried": report.retried,
        "slowed": report.slowed,
        "elapsed": round(report.elapsed, 3),
        "rate": round(report.rate, 1),
        "found_uncertain": report.found_uncertain,
        "stopped_by": report.stopped_by or None,
        "error": str(report.error) if report.error is not None else None,
        "warmup_left": report.warmup_left,
        "counts": {state.value: n for state, n in report.counts.items()},
        "problems": [
            {"state": e.state.value, "email": e.email, "last_reply": e.last_reply}
            for e in report.problems
        ],
    }


@main.command("demo")
@pass_ctx
def demo_command(ctx: Context) -> None:
    """Send the bundled example issue to the example list through a local SMTP sink."""
    from .demo import run_demo

    cfg = ctx.config()
    result = run_demo(cfg)
    click.echo(f"Built issue {result.issue.number}: {result.build.rendered.subject}")
    for name, size in result.build.files.items():
        click.echo(f"  {result.build.out_dir / name}  {_kb(size)}")
    click.echo(f"Read {result.imported.rows} example subscribers into {result.db_path}")
    _print_report(result.report)
    if result.received:
        click.echo(
            f"The SMTP sink received {result.received} messages; "
            f"open them in {result.sink_dir}/new/"
        )
    if result.report.sent == 0 and result.report.counts.get(DeliveryState.SENT):
        click.echo("Everyone already has this issue: nobody gets a second copy.")
    click.echo(
        f"Next: newsletter preview {result.issue.number}   "
        f"(or open {result.build.out_dir / 'web.html'})"
    )


# --- database commands ---


@main.group("db")
def db_group() -> None:
    """The database as a whole: its schema version, and a verified copy to another one."""


@db_group.command("migrate")
@pass_ctx
def db_migrate(ctx: Context) -> None:
    """Apply the schema migrations the database lacks.

    Every command applies them when it opens the database; this does it now, and says
    from which version to which (e.g. before starting several services)."""
    from . import dbcopy

    change = dbcopy.migrate(ctx.config().database)
    if change.changed:
        click.echo(f"{change.database}: schema version {change.before} -> {change.after}.")
    else:
        click.echo(f"{change.database}: schema version {change.after}, up to date.")


@db_group.command("status")
@pass_ctx
def db_status(ctx: Context) -> None:
    """Show the schema version and the rows per table (changes nothing)."""
    from . import dbcopy

    found = dbcopy.status(ctx.config().database)
    click.echo(f"Database: {found.database} ({found.database.engine})")
    if found.version == found.target:
        state = "up to date"
    elif found.version < found.target:
        state = f"this newsletter writes {found.target}: run `newsletter db migrate`"
    else:
        state = f"newer than this newsletter's {found.target}: upgrade newsletter"
    click.echo(f"Schema version: {found.version} ({state})")
    for name, rows in found.rows:
        click.echo(f"  {name:<22} {rows:>12,}")


@db_group.command("copy")
@click.argument("source", metavar="SRC")
@click.argument("target", metavar="DST")
@click.option(
    "--replace", is_flag=True, help="Delete what DST holds first (in the copy's transaction)."
)
def db_copy(source: str, target: str, replace: bool) -> None:
    """Copy a list and its whole history from SRC to DST, verified.

    SRC and DST are each a SQLite file or a postgresql:// URL (password from
    NEWSLETTER_DB_PASSWORD, PGPASSWORD or ~/.pgpass). Both are migrated first; every
    table is copied in one transaction on DST and verified (rows and a SHA-256 per table,
    read back from DST) before it commits: a failure or a difference leaves DST as it
    was. DST must hold no data, unless --replace. Stop the services and senders on SRC
    first: what they write during the copy is not copied."""
    from . import dbcopy
    from .db import Database

    src = Database.parse(source, where="SRC")
    dst = Database.parse(target, where="DST")

    def show(table: dbcopy.TableCopy) -> None:
        shown = table.checksum[: dbcopy.SHOWN_CHECKSUM]
        verdict = "ok"
        if not table.ok:
            verdict = (
                f"DIFFERS: DST has {table.copied_rows:,} rows,"
                f" sha256 {table.copied_checksum[: dbcopy.SHOWN_CHECKSUM]}"
            )
        click.echo(f"  {table.name:<22} {table.rows:>12,} rows  sha256 {shown}  {verdict}")

    click.echo(f"Copying {src} -> {dst}")
    report = dbcopy.copy_database(src, dst, replace=replace, on_table=show)
    if not report.ok:
        fail(
            f"{dst}: {len(report.differing)} tables differ from SRC after the copy"
            f" ({', '.join(report.differing)}); it was rolled back, DST is as it was"
        )
    rate = report.rows / report.seconds if report.seconds > 0 else 0.0
    click.echo(
        f"Copied {report.rows:,} rows in {len(report.tables)} tables in {report.seconds:.1f} s"
        f" ({rate:,.0f} rows/s); schema version {report.version}; every table verified."
    )


# --- service commands ---


@main.command("serve")
@host_option(None, "Address to listen on (default: [server] host).")
@port_option("Port (default: [server] port; 0 picks a free one).")
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of plain text.")
@pass_ctx
def serve_command(ctx: Context, host: str | None, port: int | None, log_json: bool) -> None:
    """Run the subscription web service: unsubscribe, subscribe, archive (Ctrl-C stops it).

    Logs each request (tokens redacted) and what the service does to stderr."""
    from . import logsetup, server

    with logsetup.logging_to(json_lines=log_json):
        cfg = ctx.config()
        app = server.create_app(cfg)
        host = host or cfg.server.host
        running = server.make_server(
            app, host, cfg.server.port if port is None else port, threads=cfg.server.threads
        )
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"Serving on http://{shown}:{running.effective_port}  (Ctrl-C to stop)")
        click.echo(f"Database: {cfg.database}")
        click.echo(f"Public address: {cfg.public_urls.base}/{_placeholder_mark(cfg)}")
        if not cfg.unsubscribe.url:
            click.echo(
                "Warning: [unsubscribe] url is not set: issues will not link to this service.",
                err=True,
            )

        def stop(_signum: int, _frame: object) -> None:
            raise KeyboardInterrupt  # SIGTERM (systemd, docker stop) ends it like Ctrl-C

        signal.signal(signal.SIGTERM, stop)
        with contextlib.suppress(KeyboardInterrupt):  # waitress itself may swallow it
            server.serve_forever(running)
    click.echo("Stopped.")


def _inbox_line(result: FeedbackResult) -> list[str]:
    """What one message did, for the terminal: a line per report acted on, or why not."""
    from .readers import Outcome

    if result.outcome == Outcome.UNREADABLE:
        return [f"unreadable  {result.name}: {result.reason}"]
    lines = []
    for decision in result.acted:
        item, reference = decision.feedback, decision.reference
        assert reference is not None
        issue = f" issue {reference.issue_key}" if reference.issue_key else ""
        named = item.recipient or reference.email
        lines.append(
            f"{item.kind.value:<12} {item.status or '-':<7} {named} -> {reference.email}{issue}"
            f" (by {reference.by}): {decision.effect or 'would ' + decision.action}"
        )
    if result.outcome == Outcome.UNMATCHED:
        lines.append(f"unmatched   {result.name}: {result.reason}")
    return lines


def _print_inbox_summary(summary: InboxSummary, *, err: bool = False) -> None:
    from .feedback import FeedbackKind
    from .readers import Outcome

    outcomes, acted = summary.outcomes, summary.acted
    would = "would be " if summary.dry_run else ""
    click.echo(
        f"{summary.messages} messages: {acted[FeedbackKind.HARD_BOUNCE]} hard and "
        f"{acted[FeedbackKind.SOFT_BOUNCE]} soft bounces, {acted[FeedbackKind.COMPLAINT]} "
        f"complaints and {acted[FeedbackKind.UNSUBSCRIBE]} unsubscribes {would}acted on; "
        f"{outcomes[Outcome.UNMATCHED]} unmatched, {outcomes[Outcome.NO_ACTION]} with nothing"
        f" to do, {outcomes[Outcome.IGNORED]} ignored, {outcomes[Outcome.UNREADABLE]}"
        f" unreadable, {outcomes[Outcome.ALREADY_PROCESSED]} already processed.",
        err=err,
    )
    if not summary.dry_run:
        click.echo(
            f"Subscribers changed: {summary.marked_bounced} bounced, "
            f"{summary.marked_complained} complained, {summary.unsubscribed} unsubscribed.",
            err=err,
        )
    else:
        click.echo("Dry run: nothing was changed.", err=err)


def _inbox_printer(as_json: bool) -> Callable[[FeedbackResult], None]:
    def show(result: FeedbackResult) -> None:
        if as_json:
            click.echo(json.dumps(result.as_json(), ensure_ascii=False, sort_keys=True))
            return
        for line in _inbox_line(result):
            click.echo(line)

    return show


dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Say what each message would do; change nothing."
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="One JSON line per message (the summary: stderr)."
)


@main.group("inbox")
def inbox_group() -> None:
    """Read the bounce mailbox: bounces, complaints, unsubscribes (checked, then acted on)."""


@inbox_group.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@dry_run_option
@json_option
@pass_ctx
def inbox_import(ctx: Context, path: Path, dry_run: bool, as_json: bool) -> None:
    """Process every message in PATH (an mbox file or a Maildir folder; it is not changed)."""
    from . import mailboxes

    cfg = ctx.config()
    with _open_store(ctx) as store:
        summary = mailboxes.import_path(
            store, cfg, path, dry_run=dry_run, on_message=_inbox_printer(as_json)
        )
    _print_inbox_summary(summary, err=as_json)


@inbox_group.command("fetch")
@click.option("--all", "include_seen", is_flag=True, help="Also messages already marked read.")
@dry_run_option
@json_option
@pass_ctx
def inbox_fetch(ctx: Context, include_seen: bool, dry_run: bool, as_json: bool) -> None:
    """Process new messages of the [bounces] IMAP folder and flag them read
    (password: NEWSLETTER_IMAP_PASSWORD)."""
    from . import mailboxes

    cfg = ctx.config()
    with _open_store(ctx) as store:
        summary = mailboxes.fetch_imap(
            store,
            cfg,
            include_seen=include_seen,
            dry_run=dry_run,
            on_message=_inbox_printer(as_json),
        )
    _print_inbox_summary(summary, err=as_json)


@main.group("bounces")
def bounces_group() -> None:
    """The bounce mailbox (import and fetch are `inbox import` and `inbox fetch`)."""


bounces_group.add_command(inbox_import, "import")
bounces_group.add_command(inbox_fetch, "fetch")


@bounces_group.command("list")
@click.argument("issue_ref", metavar="[ISSUE]", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@pass_ctx
def bounces_list(ctx: Context, issue_ref: str | None, limit: int) -> None:
    """List recorded bounces: all (newest first), or those of ISSUE."""
    from . import mailboxes

    cfg = ctx.config()
    with _open_store(ctx) as store:
        if issue_ref is None:
            records = store.list_bounces(limit)
        else:
            key = content.find_issue(cfg.issues_dir, issue_ref).name
            records = mailboxes.bounces_for_issue(store, key)
    if not records:
        click.echo("No bounces recorded.")
    for record in records:
        when = (record.reported_at or record.recorded_at).strftime("%Y-%m-%d %H:%M")
        issue = record.issue_key or "-"
        click.echo(
            f"{when}  {record.kind:<4}  {record.status or '?':<7}  {issue:<24}"
            f"  {record.email or ERASED}  {record.effect}"
        )
