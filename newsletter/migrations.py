"""The database schema: the ordered migration scripts, and the function that applies them."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .addresses import suppression_hash
from .errors import StoreError

# Each script is one schema version (PRAGMA user_version = its 1-based index), applied
# in its own transaction. Append only: never edit a script that has shipped.
MIGRATIONS: tuple[str, ...] = (
    # 1: subscribers and the history of their status.
    """
    CREATE TABLE subscribers (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL,
        email_key TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL DEFAULT '',
        fields TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL
            CHECK (status IN ('active', 'pending', 'unsubscribed', 'bounced', 'complained')),
        soft_bounces INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        status_changed_at TEXT NOT NULL
    );
    CREATE INDEX subscribers_status ON subscribers (status);
    CREATE TABLE subscriber_events (
        id INTEGER PRIMARY KEY,
        subscriber_id INTEGER NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        old_status TEXT,
        new_status TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL
    );
    CREATE INDEX subscriber_events_subscriber ON subscriber_events (subscriber_id);
    """,
    # 2: the delivery ledger.
    """
    CREATE TABLE issue_sends (
        issue_key TEXT PRIMARY KEY,
        snapshot_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE deliveries (
        issue_key TEXT NOT NULL REFERENCES issue_sends (issue_key),
        subscriber_id INTEGER NOT NULL REFERENCES subscribers (id),
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'sending', 'sent', 'failed', 'deferred', 'uncertain', 'cancelled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_reply TEXT NOT NULL DEFAULT '',
        message_id TEXT NOT NULL DEFAULT '',
        claimed_by TEXT NOT NULL DEFAULT '',
        retry_at TEXT,
        updated_at TEXT NOT NULL,
        sent_at TEXT,
        PRIMARY KEY (issue_key, subscriber_id)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_state ON deliveries (issue_key, state);
    CREATE INDEX deliveries_subscriber ON deliveries (subscriber_id);
    """,
    # 3: double opt-in confirmations, bounce reports, and the mail already processed.
    """
    CREATE TABLE confirmations (
        subscriber_id INTEGER PRIMARY KEY REFERENCES subscribers (id) ON DELETE CASCADE,
        requested_at TEXT NOT NULL,
        sent_at TEXT NOT NULL,
        sends INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE processed_messages (
        message_key TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        outcome TEXT NOT NULL,
        processed_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE bounces (
        id INTEGER PRIMARY KEY,
        message_key TEXT NOT NULL,
        subscriber_id INTEGER REFERENCES subscribers (id) ON DELETE CASCADE,
        email TEXT NOT NULL,
        issue_key TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL CHECK (kind IN ('hard', 'soft')),
        status TEXT NOT NULL DEFAULT '',
        diagnostic TEXT NOT NULL DEFAULT '',
        counted INTEGER NOT NULL DEFAULT 0,
        effect TEXT NOT NULL DEFAULT '',
        reported_at TEXT,
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX bounces_issue ON bounces (issue_key);
    CREATE INDEX bounces_subscriber ON bounces (subscriber_id);
    CREATE INDEX deliveries_message_id ON deliveries (message_id) WHERE message_id <> '';
    """,
    # 4: rate-limit counters that every `serve` process shares (newsletter.ratelimit).
    """
    CREATE TABLE rate_limits (
        key TEXT PRIMARY KEY,
        hits INTEGER NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX rate_limits_expiry ON rate_limits (expires_at);
    """,
    # 5: which issues are on the web (`newsletter publish`, and every send, publish first).
    """
    CREATE TABLE publications (
        issue_key TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('published', 'unlisted', 'withdrawn')),
        published_at TEXT NOT NULL,
        changed_at TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # 6: Mailgun webhook tokens already used (a replayed request is refused until they
    # expire), recorded in the transaction that applies the request's feedback.
    """
    CREATE TABLE webhook_tokens (
        source TEXT NOT NULL,
        token TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        PRIMARY KEY (source, token)
    ) WITHOUT ROWID;
    CREATE INDEX webhook_tokens_expiry ON webhook_tokens (expires_at);
    """,
    # 7: scheduled sends (`newsletter schedule`, `send_at` in issue.md), run by the worker.
    """
    CREATE TABLE schedules (
        issue_key TEXT PRIMARY KEY,
        send_at TEXT NOT NULL,
        zone TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL CHECK (source IN ('command', 'issue.md')),
        state TEXT NOT NULL
            CHECK (state IN ('scheduled', 'sending', 'sent', 'failed', 'cancelled')),
        last_error TEXT NOT NULL DEFAULT '',
        not_before TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX schedules_due ON schedules (state, send_at);
    """,
    # 8: suppression (a keyed hash of every address that left, outliving the subscriber),
    # consent records, and the ledger counts of subscribers who were erased or removed.
    # An import's consent (file, line, original sign-up date) is kept on the subscriber's
    # row, written by the same statement that adds it: a row per subscriber in another
    # table made a large import 15% slower.
    # The hash key is random per database (SQLite's randomblob draws from the OS), not
    # derived from NEWSLETTER_SECRET_KEY: imports and `subscribers remove` run without that
    # key, and rotating it would silently empty the suppression list. Needs the SQL
    # function suppression_hash(), which migrate() registers.
    """
    CREATE TABLE suppression_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL CHECK (length(key) = 32)
    );
    INSERT INTO suppression_key (id, key) VALUES (1, randomblob(32));
    CREATE TABLE suppressions (
        address_hash BLOB PRIMARY KEY,
        reason TEXT NOT NULL
            CHECK (reason IN ('unsubscribed', 'bounced', 'complained', 'removed', 'erased')),
        at TEXT NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO suppressions (address_hash, reason, at)
        SELECT suppression_hash((SELECT key FROM suppression_key), email_key), status,
            status_changed_at
        FROM subscribers WHERE status IN ('unsubscribed', 'bounced', 'complained');
    CREATE TABLE consents (
        id INTEGER PRIMARY KEY,
        subscriber_id INTEGER NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        source TEXT NOT NULL,
        origin TEXT NOT NULL DEFAULT '',
        recorded_at TEXT NOT NULL,
        signed_up TEXT NOT NULL DEFAULT '',
        confirmed_at TEXT
    );
    CREATE INDEX consents_subscriber ON consents (subscriber_id);
    INSERT INTO consents (subscriber_id, source, origin, recorded_at, confirmed_at)
        SELECT e.subscriber_id,
            CASE WHEN e.reason IN ('subscribe', 'subscribe-form') THEN 'form' ELSE e.reason END,
            CASE WHEN e.reason = 'import' AND e.detail LIKE 'file %' THEN substr(e.detail, 6)
                ELSE e.detail END,
            e.at,
            (SELECT min(c.at) FROM subscriber_events c
                WHERE c.subscriber_id = e.subscriber_id AND c.reason = 'confirmed')
        FROM subscriber_events e WHERE e.old_status IS NULL ORDER BY e.id;
    CREATE TABLE imports (
        id INTEGER PRIMARY KEY,
        file TEXT NOT NULL,
        imported_at TEXT NOT NULL
    );
    ALTER TABLE subscribers ADD COLUMN import_id INTEGER;
    ALTER TABLE subscribers ADD COLUMN import_line INTEGER;
    ALTER TABLE subscribers ADD COLUMN signed_up TEXT;
    CREATE TABLE erased_deliveries (
        issue_key TEXT NOT NULL,
        state TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (issue_key, state)
    ) WITHOUT ROWID;
    """,
    # 9: the audience: subscribers' tags (segments, reader preferences, pause), the
    # segment an issue went to (its name and its filter as it read at the first send), and
    # when an imported address confirmed (a consent_at column; completes the import's consent).
    """
    CREATE TABLE subscriber_tags (
        subscriber_id INTEGER NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        added_at TEXT NOT NULL,
        PRIMARY KEY (subscriber_id, tag)
    ) WITHOUT ROWID;
    CREATE INDEX subscriber_tags_tag ON subscriber_tags (tag, subscriber_id);
    ALTER TABLE issue_sends ADD COLUMN segment TEXT NOT NULL DEFAULT '';
    ALTER TABLE issue_sends ADD COLUMN segment_filter TEXT NOT NULL DEFAULT '';
    ALTER TABLE subscribers ADD COLUMN import_confirmed_at TEXT;
    """,
)


def _split_statements(script: str) -> list[str]:
    """Split a migration script into statements (trigger bodies stay whole)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]}")
    return statements


def migrate(conn: sqlite3.Connection, migrations: Sequence[str], *, where: str) -> int:
    """Bring the schema to ``len(migrations)``; each step in its own BEGIN IMMEDIATE.

    Also registers the SQL functions the schema and the store use (``suppression_hash``).

    The version is read inside the transaction, so two processes opening a new
    database at once apply each step exactly once. Returns the final version.
    """
    target = len(migrations)
    conn.create_function("suppression_hash", 2, suppression_hash, deterministic=True)
    if conn.execute("PRAGMA user_version").fetchone()[0] == target:
        return target  # the common case takes no write lock
    for version, script in enumerate(migrations, start=1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > target:
                raise StoreError(
                    f"the database has schema version {current}; this newsletter knows {target}",
                    where=where,
                    hint="upgrade newsletter",
                )
            if current < version:
                for statement in _split_statements(script):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return target
