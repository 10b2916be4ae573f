"""The bundled example, end to end, with nothing external: `newsletter demo`.

Starts the embedded SMTP sink on loopback, imports the example subscribers into
a demo database, and sends the example issue through the real send loop.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path

from . import content, delivery, render
from .config import Config, SmtpSettings
from .errors import ContentError
from .models import ImportReport
from .sink import start_sink
from .store import Store
from .transport import transport_from_config

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
    """Build and send the example issue to the example list through a local sink."""
    csv_path = subscribers_csv or config.root / "examples" / "subscribers.csv"
    if not csv_path.is_file():
        raise ContentError(
            "no example subscriber list",
            where=str(csv_path),
            hint="run the demo from the repository root",
        )
    demo_dir = config.state_dir / DEMO_DIR
    sink_dir = demo_dir / "sink"
    db_path = demo_dir / "demo.db"
    issue = content.read_issue(content.find_issue(config.issues_dir, issue_ref))
    built = render.build(issue, config)
    with start_sink(sink_dir) as sink:
        demo_config = dataclasses.replace(
            config,
            smtp=SmtpSettings(host=sink.host, port=sink.port, security="none"),
            db_override=db_path,
            # The demo signs unsubscribe links with a throwaway key unless one is exported.
            secrets=config.secrets.replace(
                secret_key=config.secrets.secret_key or secrets.token_hex(32)
            ),
        )
        with Store.open(db_path) as store:
            imported = store.import_csv(csv_path)
            report = delivery.send_issue(
                demo_config,
                built.rendered,
                store,
                lambda: transport_from_config(demo_config),
            )
        received = sink.count
    return DemoResult(issue, built, imported, report, sink_dir, db_path, received)
