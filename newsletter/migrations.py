"""The database schema: the ordered migration scripts, and the function that applies them."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .addresses import suppression_hash
from .db import Connection, PostgresConnection, SqliteConnection
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
    # 10: the runs sending an issue (one at a time on SQLite, any number on PostgreSQL):
    # where each runs, its lease (its `sending` rows are its own while the lease lasts),
    # and its counts so far, for `status`.
    """
    CREATE TABLE senders (
        run_id TEXT PRIMARY KEY,
        issue_key TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'finished', 'expired')),
        started_at TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL,
        lease_until TEXT NOT NULL,
        finished_at TEXT,
        claimed INTEGER NOT NULL DEFAULT 0,
        sent INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        deferred INTEGER NOT NULL DEFAULT 0,
        uncertain INTEGER NOT NULL DEFAULT 0,
        rate REAL NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE INDEX senders_issue ON senders (issue_key, state);
    """,
)


# PostgreSQL support began at schema version 9: its first script creates that whole
# schema at once (column order as SQLite's after its ALTERs, so `db copy` maps columns
# by name either way). From version 10 on, every version is a pair: one script per engine.
# Types: text for times (ISO 8601 UTC, compared as text on both engines), bytea for
# hashes, bigint identities (BY DEFAULT: `db copy` keeps ids, then moves the sequences).
# Every text column collates "C" (byte order, as SQLite compares), whatever locale the
# database was created with: tags, exports and times sort the same on both engines.
POSTGRES_BASELINE = 9
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    # 9: the schema of SQLite's versions 1-9, and the SQL functions the store uses.
    """
    CREATE FUNCTION nl_json_patch(target text, patch text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT '{' || coalesce(string_agg(to_json(k)::text || ':' || v, ',' ORDER BY o), '')
            || '}'
        FROM (
            SELECT t.key AS k, coalesce((patch::json -> t.key)::text, t.value::text) AS v,
                t.o AS o
            FROM json_each(target::json) WITH ORDINALITY AS t (key, value, o)
            UNION ALL
            SELECT p.key, p.value::text, 1000000000 + p.o
            FROM json_each(patch::json) WITH ORDINALITY AS p (key, value, o)
            WHERE NOT jsonb_exists(target::jsonb, p.key)
        ) AS merged
    $$;
    CREATE TABLE subscribers (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        email TEXT COLLATE "C" NOT NULL,
        email_key TEXT COLLATE "C" NOT NULL UNIQUE,
        name TEXT COLLATE "C" NOT NULL DEFAULT '',
        fields TEXT COLLATE "C" NOT NULL DEFAULT '{}',
        status TEXT COLLATE "C" NOT NULL
            CHECK (status IN ('active', 'pending', 'unsubscribed', 'bounced', 'complained')),
        soft_bounces INTEGER NOT NULL DEFAULT 0,
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL,
        status_changed_at TEXT COLLATE "C" NOT NULL,
        import_id BIGINT,
        import_line BIGINT,
        signed_up TEXT COLLATE "C",
        import_confirmed_at TEXT COLLATE "C"
    );
    CREATE INDEX subscribers_status ON subscribers (status);
    CREATE TABLE subscriber_events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        subscriber_id BIGINT NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        old_status TEXT COLLATE "C",
        new_status TEXT COLLATE "C" NOT NULL,
        reason TEXT COLLATE "C" NOT NULL,
        detail TEXT COLLATE "C" NOT NULL DEFAULT '',
        at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX subscriber_events_subscriber ON subscriber_events (subscriber_id);
    CREATE TABLE issue_sends (
        issue_key TEXT COLLATE "C" PRIMARY KEY,
        snapshot_at TEXT COLLATE "C" NOT NULL,
        segment TEXT COLLATE "C" NOT NULL DEFAULT '',
        segment_filter TEXT COLLATE "C" NOT NULL DEFAULT ''
    );
    CREATE TABLE deliveries (
        issue_key TEXT COLLATE "C" NOT NULL REFERENCES issue_sends (issue_key),
        subscriber_id BIGINT NOT NULL REFERENCES subscribers (id),
        state TEXT COLLATE "C" NOT NULL CHECK (state IN
            ('queued', 'sending', 'sent', 'failed', 'deferred', 'uncertain', 'cancelled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_reply TEXT COLLATE "C" NOT NULL DEFAULT '',
        message_id TEXT COLLATE "C" NOT NULL DEFAULT '',
        claimed_by TEXT COLLATE "C" NOT NULL DEFAULT '',
        retry_at TEXT COLLATE "C",
        updated_at TEXT COLLATE "C" NOT NULL,
        sent_at TEXT COLLATE "C",
        PRIMARY KEY (issue_key, subscriber_id)
    );
    CREATE INDEX deliveries_state ON deliveries (issue_key, state);
    CREATE INDEX deliveries_subscriber ON deliveries (subscriber_id);
    CREATE INDEX deliveries_message_id ON deliveries (message_id) WHERE message_id <> '';
    CREATE TABLE confirmations (
        subscriber_id BIGINT PRIMARY KEY REFERENCES subscribers (id) ON DELETE CASCADE,
        requested_at TEXT COLLATE "C" NOT NULL,
        sent_at TEXT COLLATE "C" NOT NULL,
        sends INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE processed_messages (
        message_key TEXT COLLATE "C" PRIMARY KEY,
        source TEXT COLLATE "C" NOT NULL,
        outcome TEXT COLLATE "C" NOT NULL,
        processed_at TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE bounces (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        message_key TEXT COLLATE "C" NOT NULL,
        subscriber_id BIGINT REFERENCES subscribers (id) ON DELETE CASCADE,
        email TEXT COLLATE "C" NOT NULL,
        issue_key TEXT COLLATE "C" NOT NULL DEFAULT '',
        kind TEXT COLLATE "C" NOT NULL CHECK (kind IN ('hard', 'soft')),
        status TEXT COLLATE "C" NOT NULL DEFAULT '',
        diagnostic TEXT COLLATE "C" NOT NULL DEFAULT '',
        counted INTEGER NOT NULL DEFAULT 0,
        effect TEXT COLLATE "C" NOT NULL DEFAULT '',
        reported_at TEXT COLLATE "C",
        recorded_at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX bounces_issue ON bounces (issue_key);
    CREATE INDEX bounces_subscriber ON bounces (subscriber_id);
    CREATE TABLE rate_limits (
        key TEXT COLLATE "C" PRIMARY KEY,
        hits BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX rate_limits_expiry ON rate_limits (expires_at);
    CREATE TABLE publications (
        issue_key TEXT COLLATE "C" PRIMARY KEY,
        state TEXT COLLATE "C" NOT NULL CHECK (state IN ('published', 'unlisted', 'withdrawn')),
        published_at TEXT COLLATE "C" NOT NULL,
        changed_at TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE webhook_tokens (
        source TEXT COLLATE "C" NOT NULL,
        token TEXT COLLATE "C" NOT NULL,
        expires_at TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (source, token)
    );
    CREATE INDEX webhook_tokens_expiry ON webhook_tokens (expires_at);
    CREATE TABLE schedules (
        issue_key TEXT COLLATE "C" PRIMARY KEY,
        send_at TEXT COLLATE "C" NOT NULL,
        zone TEXT COLLATE "C" NOT NULL DEFAULT '',
        source TEXT COLLATE "C" NOT NULL CHECK (source IN ('command', 'issue.md')),
        state TEXT COLLATE "C" NOT NULL
            CHECK (state IN ('scheduled', 'sending', 'sent', 'failed', 'cancelled')),
        last_error TEXT COLLATE "C" NOT NULL DEFAULT '',
        not_before TEXT COLLATE "C",
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX schedules_due ON schedules (state, send_at);
    CREATE TABLE suppression_key (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        key BYTEA NOT NULL CHECK (length(key) = 32)
    );
    -- 32 bytes from two version-4 UUIDs: PostgreSQL draws them from the OS's strong source.
    INSERT INTO suppression_key (id, key) VALUES (1, decode(
        replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
    CREATE TABLE suppressions (
        address_hash BYTEA PRIMARY KEY,
        reason TEXT COLLATE "C" NOT NULL
            CHECK (reason IN ('unsubscribed', 'bounced', 'complained', 'removed', 'erased')),
        at TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE consents (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        subscriber_id BIGINT NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        source TEXT COLLATE "C" NOT NULL,
        origin TEXT COLLATE "C" NOT NULL DEFAULT '',
        recorded_at TEXT COLLATE "C" NOT NULL,
        signed_up TEXT COLLATE "C" NOT NULL DEFAULT '',
        confirmed_at TEXT COLLATE "C"
    );
    CREATE INDEX consents_subscriber ON consents (subscriber_id);
    CREATE TABLE imports (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        file TEXT COLLATE "C" NOT NULL,
        imported_at TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE erased_deliveries (
        issue_key TEXT COLLATE "C" NOT NULL,
        state TEXT COLLATE "C" NOT NULL,
        count BIGINT NOT NULL,
        PRIMARY KEY (issue_key, state)
    );
    CREATE TABLE subscriber_tags (
        subscriber_id BIGINT NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
        tag TEXT COLLATE "C" NOT NULL,
        added_at TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (subscriber_id, tag)
    );
    CREATE INDEX subscriber_tags_tag ON subscriber_tags (tag, subscriber_id);
    """,
    # 10: the runs sending an issue (see SQLite's 10). The claim's index also orders by
    # subscriber, as SQLite's does (its index entries end with the primary key): the
    # claim takes the first queued rows in that order without sorting every queued row.
    """
    CREATE TABLE senders (
        run_id TEXT PRIMARY KEY,
        issue_key TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'finished', 'expired')),
        started_at TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL,
        lease_until TEXT NOT NULL,
        finished_at TEXT,
        claimed BIGINT NOT NULL DEFAULT 0,
        sent BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0,
        deferred BIGINT NOT NULL DEFAULT 0,
        uncertain BIGINT NOT NULL DEFAULT 0,
        rate DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX senders_issue ON senders (issue_key, state);
    DROP INDEX deliveries_state;
    CREATE INDEX deliveries_state ON deliveries (issue_key, state, subscriber_id);
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


# Taken by a PostgreSQL migration's transaction: two processes starting on a new database
# at once apply each version once (the version is read under the lock).
MIGRATION_LOCK = 0x6E6C_6D67  # "nlmg"


def schema_target() -> int:
    """The schema version this code writes (the same on both engines)."""
    return len(MIGRATIONS)


def schema_version(conn: Connection) -> int:
    """The version the database's schema is at (0: empty)."""
    if isinstance(conn, SqliteConnection):
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
        return 0
    return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)


def migrate_database(conn: Connection) -> int:
    """Bring either engine's schema to :func:`schema_target`; the final version."""
    where = str(conn.database)
    if isinstance(conn, SqliteConnection):
        try:
            return migrate(conn.raw, MIGRATIONS, where=where)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot use the database: {exc}",
                where=where,
                hint="is this a newsletter database? Point --db elsewhere",
            ) from None
    assert isinstance(conn, PostgresConnection)
    return migrate_postgres(conn, POSTGRES_MIGRATIONS, where=where)


def migrate_postgres(conn: PostgresConnection, migrations: Sequence[str], *, where: str) -> int:
    """Apply the PostgreSQL scripts past the database's version, each in one transaction.

    ``migrations[0]`` is version :data:`POSTGRES_BASELINE`. DDL is transactional in
    PostgreSQL, so a failed step leaves the previous version whole.
    """
    target = POSTGRES_BASELINE + len(migrations) - 1
    if target != schema_target():
        raise AssertionError("the PostgreSQL migrations must reach SQLite's version")
    if schema_version(conn) == target:
        return target
    conn.begin(exclusive=False)
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = schema_version(conn)
        if current > target:
            raise StoreError(
                f"the database has schema version {current}; this newsletter knows {target}",
                where=where,
                hint="upgrade newsletter",
            )
        if 0 < current < POSTGRES_BASELINE:
            raise StoreError(
                f"the database has schema version {current}, older than PostgreSQL support",
                where=where,
                hint="drop it and run `newsletter db copy` from the SQLite file",
            )
        for version, script in enumerate(migrations, start=POSTGRES_BASELINE):
            if current < version:
                conn.raw.execute(script)  # several statements, no parameters
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return target
