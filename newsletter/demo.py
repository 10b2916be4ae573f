"""The bundled example, end to end, with nothing external: `newsletter demo`.

Starts the embedded SMTP sink on loopback, imports the example subscribers (shipped
with the package) into a demo database, and sends the workspace's issue 1 through
the real send loop.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path

from . import content, delivery, render
from .config import Config, SmtpSettings
from .db import Database
from .errors import ContentError
from .models import ImportReport
from .package_data import example_subscribers
from .sink import start_sink
from .store import Store

DEMO_DIR = "demo"


@dataclass(frozen=True)
class DemoResult:
    """Where everything went, for the CLI to print."""

    issue: content.Issue
    build: render.BuildResult
    imported: ImportReport
    report: delivery.DeliveryReport
    sink_dir: Path
    db_path: Path
    received: int


def run_demo(
    config: Config, *, issue_ref: str = "1", subscribers_csv: Path | None = None
) -> DemoResult:
    """Build and send the workspace's issue ``issue_ref`` to the example list (shipped
    with the package) through a local sink."""
    csv_path = subscribers_csv or example_subscribers()
    demo_dir = config.state_dir / DEMO_DIR
    sink_dir = demo_dir / "sink"
    db_path = demo_dir / "demo.db"
    if next(content.iter_issue_folders(config.issues_dir), None) is None:
        raise ContentError(
            "the demo sends an issue of this workspace, and it has none",
            where=str(config.issues_dir),
            hint="run it in a checkout of newsletter (its issues/ holds the example issue), "
            "or write an issue first (`newsletter issue new`, `newsletter issue add`)",
        )
    issue = content.read_issue(content.find_issue(config.issues_dir, issue_ref))
    built = render.build(issue, config)
    with start_sink(sink_dir) as sink:
        demo_config = dataclasses.replace(
            config,
            smtp=SmtpSettings(host=sink.host, port=sink.port, security="none"),
            db_override=Database("sqlite", db_path),
            # The demo signs unsubscribe links with a throwaway key unless one is exported.
            secrets=config.secrets.replace(
                secret_key=config.secrets.secret_key or secrets.token_hex(32)
            ),
        )
        with Store.open(db_path) as store:
            imported = store.import_csv(csv_path)
            report = delivery.prepare_send(demo_config, built.rendered, store).run()
        received = sink.count
    return DemoResult(issue, built, imported, report, sink_dir, db_path, received)
