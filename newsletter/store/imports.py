"""The CSV import: rows are streamed into a temporary table, then merged in one transaction.

Written once for both engines: the staging table is loaded the engine's fastest way
(:meth:`Connection.load_rows`: SQLite's executemany, PostgreSQL's COPY), duplicates of an
address are folded into its first row in SQL, and the merge is a handful of
INSERT ... SELECT statements, whatever the size of the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from email_validator import EmailNotValidError

from ..addresses import fast_normalize, full_normalize, suppression_hasher
from ..dates import SignupDates
from ..db import Connection, DatabaseError, IntegrityError, OperationalError
from ..errors import StoreError
from ..models import INACTIVE, ImportReport, RowError, Status
from ..presets import EXTRA_FIELDS, ColumnMapping, RowProblem, parse_moment, recognise
from ..segments import TagError, split_tags
from .base import (
    _EVENT_COLUMNS,
    _SUPPRESSING,
    StoreBase,
    _hash_key,
    _now,
    _restore,
    _to_json,
)

IMPORT_CHUNK = 5_000
SCAN_CHUNK = 1 << 20  # bytes read at a time looking for NUL characters
MAX_KEPT_ROW_ERRORS = 1_000  # ImportReport.errors keeps this many; on_error sees them all
MAX_IMPORTED_NAME = 200  # characters; a longer "name" is a mistake, e.g. a swallowed row


# Words other tools write in a `status` column (Mailchimp: subscribed, cleaned).
_STATUS_SYNONYMS = {"subscribed": "active", "cleaned": "bounced"}


# Columns that carry the original sign-up date, first found first (lower case, spaces and
# hyphens as underscores: Mailchimp's "Date Added" is date_added). Not kept as fields.
SIGNUP_DATE_COLUMNS = (
    "signup_date",
    "sign_up_date",
    "subscribed_at",
    "optin_time",
    "opt_in_time",
    "confirm_time",
    "date_added",
    "created_at",
)


def _column_key(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def _first_bad_utf8_line(path: Path) -> int:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


_PLUS = "' +'"  # between the tags of a history line, as an SQL literal


def _holds_nul(raw: io.BufferedReader) -> bool:
    """Whether the file may hold a NUL byte (read from the start; left at the start).

    No text column of PostgreSQL can hold one, so a row with one is a bad row on both
    engines; a file without any (nearly all) then costs no check per row. A pipe cannot
    be read twice: its rows are all checked."""
    if not raw.seekable():
        return True
    try:
        while chunk := raw.read(SCAN_CHUNK):
            if b"\x00" in chunk:
                return True
        return False
    finally:
        raw.seek(0)


def _unstorable(text: str) -> bool:
    """Text no engine can store as it is: a NUL, or half a surrogate pair (only a JSON
    escape can make either; a UTF-8 file cannot hold a lone surrogate)."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# The staging table. Rows go in as read, duplicates and all (COPY cannot upsert); its
# indexes are built after the load, which is faster than keeping them up to date.
# ``address_hash``: the keyed suppression hash, computed in Python while staging (the same
# bytes on both engines), for every row while anything is suppressed, else only for rows
# whose status suppresses them.
_STAGING = (
    "CREATE TEMP TABLE import_rows (line {line}, email_key TEXT NOT NULL, email TEXT NOT NULL,"
    " name TEXT NOT NULL, fields TEXT NOT NULL, status TEXT NOT NULL,"
    " tags TEXT NOT NULL DEFAULT '[]', signed_up TEXT, consent_at TEXT, address_hash {blob})"
)


def _drop_staging(conn: Connection) -> None:
    with contextlib.suppress(DatabaseError):
        conn.execute("DROP TABLE IF EXISTS import_dups")
        conn.execute("DROP TABLE IF EXISTS import_rows")


def _anything_suppressed(conn: Connection) -> bool:
    return conn.execute("SELECT 1 FROM suppressions LIMIT 1").fetchone() is not None


def _fill_hashes(conn: Connection) -> None:
    """Hash the staged rows that have no hash yet: something was suppressed between the
    staging (when nothing was) and the merge. Rare; a chunk at a time."""
    digest = suppression_hasher(_hash_key(conn))
    last = -1
    while rows := conn.execute(
        "SELECT line, email_key FROM import_rows WHERE address_hash IS NULL AND line > ?"
        " ORDER BY line LIMIT ?",
        (last, IMPORT_CHUNK),
    ).fetchall():
        conn.executemany(
            "UPDATE import_rows SET address_hash = ? WHERE line = ?",
            [(digest(key), line) for line, key in rows],
        )
        last = rows[-1][0]


def _unsuppressed(conn: Connection, hashed: bool) -> str:
    """`` AND ...`` leaving out import rows (``i``) whose address is suppressed; "" while
    nothing is. ``hashed``: every staged row has its hash (else the missing ones are
    computed now)."""
    if not _anything_suppressed(conn):
        return ""
    if not hashed:
        _fill_hashes(conn)
    return " AND NOT EXISTS (SELECT 1 FROM suppressions p WHERE p.address_hash = i.address_hash)"


def _analyze(conn: Connection, table: str) -> None:
    """PostgreSQL: statistics for a temporary table (autovacuum never sees one; without
    them the planner guesses at a table of a million rows). SQLite plans well without."""
    if conn.dialect.engine == "postgresql":
        conn.execute(f"ANALYZE {table}")


def _index_staged(conn: Connection) -> None:
    """Index the loaded staging table, one row per address. Outside a transaction: each
    statement commits on its own (a temporary table needs no atomicity), so PostgreSQL
    can prune the row versions a deep fold leaves behind (else every UPDATE of a row
    changed a thousand times in one transaction walks a thousand versions of it).

    The unique index is tried first: nearly every file has no duplicate, and then that
    is all; where it fails, duplicates are folded first."""
    if conn.dialect.engine == "postgresql":  # SQLite's line is its rowid
        conn.execute("CREATE UNIQUE INDEX import_rows_line ON import_rows (line)")
    _analyze(conn, "import_rows")
    try:
        conn.execute("CREATE UNIQUE INDEX import_rows_key ON import_rows (email_key)")
    except IntegrityError:
        conn.execute("CREATE INDEX import_rows_dups ON import_rows (email_key)")
        _fold_duplicates(conn)
        conn.execute("DROP INDEX import_rows_dups")
        conn.execute("CREATE UNIQUE INDEX import_rows_key ON import_rows (email_key)")


def _fold_duplicates(conn: Connection) -> None:
    """Fold the later rows of an address into its first, by the rules of the import:
    later non-empty cells win (fields key by key, in the order they first came), the
    first status that stops mail stays, tags add up, the first dates stay.

    Each rule is associative (fields are flat objects of strings), so the rows of an
    address are merged in pairs of neighbours, round after round (1+2, 3+4...; then
    1+3, 5+7...): an address repeated k times takes log2(k) statements, and no row is
    changed twice in one (a row changed thousands of times in one transaction would drag
    its old versions along on PostgreSQL)."""
    conn.execute(
        "CREATE TEMP TABLE import_dups AS SELECT r.line AS line,"
        " min(r.line) OVER (PARTITION BY r.email_key) AS first,"
        " row_number() OVER (PARTITION BY r.email_key ORDER BY r.line) AS rank"
        " FROM import_rows r WHERE r.email_key IN"
        " (SELECT email_key FROM import_rows GROUP BY email_key HAVING count(*) > 1)"
    )
    conn.execute("CREATE INDEX import_dups_pair ON import_dups (first, rank)")
    _analyze(conn, "import_dups")
    d = conn.dialect
    # With a step s, the row ranked r (r - 1 = s modulo 2s) holds the rows r .. r+s-1 and
    # goes into the row ranked r - s, which holds the s rows before and keeps its line.
    merge_pairs = (
        "UPDATE import_rows SET"
        " name = CASE WHEN d.name <> '' THEN d.name ELSE import_rows.name END,"
        " fields = CASE WHEN d.fields = '{}' THEN import_rows.fields"
        f" ELSE {d.json_patch('import_rows.fields', 'd.fields')} END,"
        " status = CASE WHEN import_rows.status = 'active' THEN d.status"
        " ELSE import_rows.status END,"
        " tags = CASE WHEN d.tags = '[]' THEN import_rows.tags"
        " WHEN import_rows.tags = '[]' THEN d.tags"
        f" ELSE (SELECT {d.json_array_agg('u.value')} FROM"
        f" (SELECT a.value FROM {d.json_array_values('import_rows.tags', 'a')}"
        f" UNION SELECT b.value FROM {d.json_array_values('d.tags', 'b')}) AS u) END,"
        " signed_up = coalesce(import_rows.signed_up, d.signed_up),"
        " consent_at = coalesce(import_rows.consent_at, d.consent_at),"
        " address_hash = coalesce(import_rows.address_hash, d.address_hash)"
        " FROM (SELECT left_row.line AS target, r.name AS name, r.fields AS fields,"
        " r.status AS status, r.tags AS tags, r.signed_up AS signed_up,"
        " r.consent_at AS consent_at, r.address_hash AS address_hash"
        " FROM import_dups x JOIN import_rows r ON r.line = x.line"
        " JOIN import_dups left_row ON left_row.first = x.first AND left_row.rank = x.rank - ?2"
        " WHERE (x.rank - 1) % ?1 = ?2) AS d"
        " WHERE import_rows.line = d.target"
    )
    deepest = int(conn.execute("SELECT max(rank) FROM import_dups").fetchone()[0])
    step = 1
    while step < deepest:
        conn.execute(merge_pairs, (2 * step, step))
        step *= 2
    conn.execute(
        "DELETE FROM import_rows WHERE line IN (SELECT line FROM import_dups WHERE rank > 1)"
    )
    conn.execute("DROP TABLE import_dups")


def _staged_matches(conn: Connection, inactive: str) -> tuple[int, int, int]:
    """(distinct rows, rows of inactive subscribers, rows of other known subscribers) in
    the staging table: what both an import and its dry run count first (one join)."""
    distinct = conn.execute("SELECT count(*) FROM import_rows").fetchone()[0]
    known, skipped = conn.execute(
        "SELECT count(*), coalesce(sum(CASE WHEN s.status IN"
        f" ({inactive}) THEN 1 ELSE 0 END), 0)"
        " FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
    ).fetchone()
    return int(distinct), int(skipped), int(known) - int(skipped)


class ImportsMixin(StoreBase):
    """Importing subscribers from CSV."""

    def import_csv(
        self,
        path: Path,
        *,
        on_error: Callable[[RowError], None] | None = None,
        mapping: ColumnMapping | None = None,
        dry_run: bool = False,
    ) -> ImportReport:
        """Import subscribers from a CSV file; all good rows land in one transaction.

        Columns: ``email`` (required), ``name``, ``status`` (active or subscribed, pending,
        unsubscribed, bounced or cleaned, complained; honoured only for new rows, so an
        exported list keeps its unsubscribes), ``tags`` (separated by ``;`` or ``,``; added,
        never removed), a sign-up date (``signup_date``, ``created_at``, ``optin_time``... see
        SIGNUP_DATE_COLUMNS: recorded with the consent, with the file and line),
        ``consent_at`` (when the address confirmed: the consent's confirmation),
        ``updated_at``/``status_changed_at`` (ignored); any other column becomes a field.
        UTF-8 (with or without Excel's BOM), separated by ``,`` ``;`` or tabs. Duplicates
        merge (later non-empty cells win); existing subscribers get new names/fields/tags but
        never a new status, so an import never reactivates anyone, and a suppressed address
        is never added back (``ImportReport.suppressed``). Each bad row goes to ``on_error``;
        a row holding a NUL character is one (no PostgreSQL text can hold it).

        ``mapping`` (:mod:`.presets`) first turns another tool's columns into these.
        ``dry_run`` reads and checks everything, counts what would happen, writes nothing.
        """
        path = Path(path)
        try:
            raw = path.open("rb")
        except OSError as exc:
            raise StoreError(
                f"cannot read the file: {exc.strerror}", where=str(path), hint="check the path"
            ) from None
        with raw, self._lock:
            conn = self._conn
            try:
                has_nul = _holds_nul(raw)
                handle = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
                _drop_staging(conn)
                postgres = conn.dialect.engine == "postgresql"
                # SQLite: the line is the rowid (free); PostgreSQL: indexed after the load.
                conn.execute(
                    _STAGING.format(
                        line="BIGINT NOT NULL" if postgres else "INTEGER PRIMARY KEY",
                        blob="BYTEA" if postgres else "BLOB",
                    )
                )
                # Staging writes only the temporary table: other writers are not blocked.
                conn.begin(exclusive=False)
                try:
                    staged = self._stage(conn, handle, path, on_error, mapping, has_nul)
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                _index_staged(conn)
                hashed = staged[5]
                if dry_run:
                    counts = self._count_staged(conn, hashed)
                else:
                    with self._transaction() as tx:
                        counts = self._merge_staged(tx, path.name, hashed)
            except UnicodeDecodeError:
                raise StoreError(
                    "not UTF-8 text",
                    where=f"{path}:{_first_bad_utf8_line(path)}",
                    hint="save the file as UTF-8 (in Excel: 'CSV UTF-8')",
                ) from None
            except OSError as exc:
                raise StoreError(
                    f"cannot read the file: {exc.strerror}", where=str(path), hint="check the path"
                ) from None
            except OperationalError as exc:
                raise self._db_error(exc) from None
            finally:
                _drop_staging(conn)
        rows, good, errors, error_count, description, _ = staged
        added, updated, matched, skipped, distinct, suppressed, new_by_status = counts
        return ImportReport(
            path=path,
            rows=rows,
            added=added,
            updated=updated,
            unchanged=matched - updated,
            skipped_inactive=skipped,
            duplicates=good - distinct,
            error_count=error_count,
            errors=tuple(errors),
            suppressed=suppressed,
            new_by_status=MappingProxyType(new_by_status),
            mapping=description,
            dry_run=dry_run,
        )

    def _stage(
        self,
        conn: Connection,
        handle: TextIO,
        path: Path,
        on_error: Callable[[RowError], None] | None,
        mapping: ColumnMapping | None = None,
        has_nul: bool = True,
    ) -> tuple[int, int, list[RowError], int, tuple[str, ...], bool]:
        """Stream the CSV into the staging table; returns (rows, good rows, errors, error
        count, the mapping's description, whether every row was hashed). ``has_nul``: the
        file may hold NUL characters (each row is then checked)."""
        first = handle.readline()
        if not first.strip():
            raise StoreError(
                "the file is empty",
                where=f"{path}:1",
                hint="the first line must name the columns, e.g. email,name",
            )
        delimiter = max((",", ";", "\t"), key=first.count)
        reader = csv.reader(itertools.chain([first], handle), delimiter=delimiter)
        try:
            header = [_restore(cell.strip()) for cell in next(reader)]
            if has_nul and any("\x00" in cell for cell in header):
                raise StoreError(
                    "a column name holds a NUL character",
                    where=f"{path}:1",
                    hint="save the file again as CSV text (UTF-8)",
                )
            file_header = header
            lowered = [cell.lower() for cell in header]
            named = [cell for cell in lowered if cell]
            if len(set(named)) != len(named):
                duplicate = next(cell for cell in named if named.count(cell) > 1)
                raise StoreError(
                    f"the column {duplicate!r} appears twice",
                    where=f"{path}:1",
                    hint="rename or remove one of them",
                )
            convert: Callable[[Sequence[str]], list[str]] | None = None
            description: tuple[str, ...] = ()
            if mapping is not None:
                bound = mapping.bind(header, path)
                convert, description = bound.convert, bound.description
                header = list(bound.header)
                lowered = [cell.lower() for cell in header]
            else:
                known = recognise(header)
                if known is not None:
                    # Its own status flags would be read as fields: readers that tool does
                    # not mail would become active.
                    preset_name, tool, column = known
                    raise StoreError(
                        f"this is a {tool} export (it has {column!r})",
                        where=f"{path}:1",
                        hint=f"import it with --from {preset_name}, which reads its columns"
                        " and statuses (add --dry-run to see how)",
                    )
            if "email" not in lowered:
                raise StoreError(
                    f"no 'email' column (columns: {', '.join(header) or 'none'})",
                    where=f"{path}:1",
                    hint="the first line must name the columns; call the address column 'email'",
                )
            email_i = lowered.index("email")
            name_i = lowered.index("name") if "name" in lowered else None
            status_i = lowered.index("status") if "status" in lowered else None
            keyed = [_column_key(cell) for cell in header]
            date_cols = sorted(
                (i for i, key in enumerate(keyed) if key in SIGNUP_DATE_COLUMNS),
                key=lambda i: SIGNUP_DATE_COLUMNS.index(keyed[i]),
            )
            tags_i = lowered.index("tags") if "tags" in lowered else None
            consent_i = lowered.index("consent_at") if "consent_at" in lowered else None
            extra_i = header.index(EXTRA_FIELDS) if EXTRA_FIELDS in header else None
            ignored = {
                "email",
                "name",
                "status",
                "tags",
                "consent_at",
                "updated_at",
                "status_changed_at",
                EXTRA_FIELDS,
            }
            field_cols = [
                (i, header[i])
                for i, key in enumerate(lowered)
                if key and key not in ignored and i not in date_cols
            ]
            width = len(header)
            signup_dates = SignupDates()
            statuses = {s.value: s.value for s in Status} | _STATUS_SYNONYMS

            errors: list[RowError] = []
            error_count = rows = good = 0

            def bad(line: int, message: str) -> None:
                nonlocal error_count
                error_count += 1
                error = RowError(line, message)
                if len(errors) < MAX_KEPT_ROW_ERRORS:
                    errors.append(error)
                if on_error is not None:
                    on_error(error)

            def cell(row: Sequence[str], i: int | None) -> str:
                return _restore(row[i].strip()) if i is not None and i < len(row) else ""

            # While anything is suppressed every row is hashed (a new one is checked
            # against the list); else only rows whose status suppresses them.
            hash_all = _anything_suppressed(conn)
            hash_some = hash_all or status_i is not None
            digest = suppression_hasher(_hash_key(conn))
            suppressing = _SUPPRESSING

            # Only the columns this file needs are loaded: each one costs 0.2 µs a row.
            columns = ["line", "email_key", "email", "name", "fields", "status"]
            columns += ["tags"] if tags_i is not None else []
            columns += ["signed_up"] if date_cols else []
            columns += ["consent_at"] if consent_i is not None else []
            columns += ["address_hash"] if hash_some else []
            load = conn.load_rows
            batch: list[tuple[Any, ...]] = []
            fast = fast_normalize
            dumps = _to_json
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num
                if end != line:
                    # A quote that never closes reads every later row into one value: the
                    # file cannot be split into rows we can trust, so none of it is imported.
                    raise StoreError(
                        f"a double quote opens a value that runs on to line {end} (a stray quote?)",
                        where=f"{path}:{line}",
                        hint="a value cannot span lines: close or remove that quote;"
                        " nothing was imported",
                    )
                if not row:
                    continue
                if (
                    has_nul
                    and (nul := next((i for i, value in enumerate(row) if "\x00" in value), None))
                    is not None
                ):
                    rows += 1
                    column = repr(file_header[nul]) if nul < len(file_header) else f"{nul + 1}"
                    bad(line, f"column {column} holds a NUL character: remove it")
                    continue
                if convert is not None and any(value.strip() for value in row):
                    try:
                        row = convert(row)
                    except RowProblem as exc:
                        rows += 1
                        bad(line, str(exc))
                        continue
                email = _restore(row[email_i].strip()) if email_i < len(row) else ""
                if not email:
                    if any(value.strip() for value in row):
                        rows += 1
                        bad(line, "no email address")
                    continue
                rows += 1
                if len(row) > width and any(value.strip() for value in row[width:]):
                    bad(line, f"{len(row)} cells but the header names {width} columns")
                    continue
                normalized = fast(email)
                if normalized is None:
                    try:
                        normalized = full_normalize(email)
                    except EmailNotValidError as exc:
                        bad(line, f"invalid email address {email!r}: {exc}")
                        continue
                status = "active"
                if status_i is not None and status_i < len(row):
                    given = row[status_i].strip().lower()
                    if given and given not in statuses:
                        bad(
                            line,
                            f"unknown status {row[status_i].strip()!r}"
                            f" (use one of: {', '.join(sorted(statuses))})",
                        )
                        continue
                    status = statuses.get(given, "active")
                name = (
                    _restore(row[name_i].strip())
                    if name_i is not None and name_i < len(row)
                    else ""
                )
                if len(name) > MAX_IMPORTED_NAME:
                    bad(line, f"the name has {len(name)} characters (at most {MAX_IMPORTED_NAME})")
                    continue
                tags_json = "[]"
                if tags_i is not None and (tags_cell := cell(row, tags_i)):
                    try:
                        tags_json = dumps(split_tags(tags_cell))
                    except TagError as exc:
                        bad(line, f"tags: {exc.message}")
                        continue
                signed_up: str | None = None
                if date_cols:
                    given_date, date_i = next(
                        ((row[i].strip(), i) for i in date_cols if i < len(row) and row[i].strip()),
                        ("", -1),
                    )
                    if given_date:
                        try:
                            signed_up = signup_dates.read(given_date)
                        except ValueError as exc:
                            bad(
                                line,
                                f"unreadable date {given_date!r} in column {header[date_i]!r}:"
                                f" {exc}; write it as YYYY-MM-DD (ISO 8601)",
                            )
                            continue
                consent_at: str | None = None
                if consent_i is not None and (consent_cell := cell(row, consent_i)):
                    try:
                        consent_at = parse_moment(consent_cell)
                    except ValueError:
                        bad(
                            line, f"consent_at {consent_cell!r} is not a date (use e.g. 2026-01-31)"
                        )
                        continue
                fields_json = "{}"
                if field_cols or extra_i is not None:
                    values = {
                        key: _restore(value)
                        for i, key in field_cols
                        if i < len(row) and (value := row[i].strip())
                    }
                    if extra_i is not None and (extra := cell(row, extra_i)):
                        attributes: dict[str, str] = json.loads(extra)
                        if any(_unstorable(k) or _unstorable(v) for k, v in attributes.items()):
                            bad(line, "the attributes hold a NUL character or broken text")
                            continue
                        values.update(attributes)
                    if values:
                        fields_json = dumps(values)
                key = normalized.lower()
                staged: tuple[Any, ...] = (line, key, normalized, name, fields_json, status)
                if tags_i is not None:
                    staged += (tags_json,)
                if date_cols:
                    staged += (signed_up,)
                if consent_i is not None:
                    staged += (consent_at,)
                if hash_some:
                    staged += (digest(key) if hash_all or status in suppressing else None,)
                batch.append(staged)
                good += 1
                if len(batch) >= IMPORT_CHUNK:
                    load("import_rows", columns, batch)
                    batch.clear()
            if batch:
                load("import_rows", columns, batch)
        except csv.Error as exc:
            raise StoreError(
                f"unreadable CSV: {exc}",
                where=f"{path}:{reader.line_num}",
                hint="check the quoting on that line",
            ) from None
        return rows, good, errors, error_count, description, hash_all

    @staticmethod
    def _count_staged(
        conn: Connection, hashed: bool
    ) -> tuple[int, int, int, int, int, int, dict[str, int]]:
        """What merging the staging table would do, without doing it (a dry run)."""
        d = conn.dialect
        inactive = ", ".join(f"'{s.value}'" for s in INACTIVE)
        distinct, skipped, matched = _staged_matches(conn, inactive)
        updated = conn.execute(
            "SELECT count(*) FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f" WHERE s.status NOT IN ({inactive}) AND ("
            " (i.name <> '' AND i.name IS DISTINCT FROM s.name)"
            f" OR (i.fields <> '{{}}' AND {d.json_patch('s.fields', 'i.fields')}"
            "  IS DISTINCT FROM s.fields)"
            f" OR EXISTS (SELECT 1 FROM {d.json_array_values('i.tags', 'j')} WHERE NOT EXISTS"
            "  (SELECT 1 FROM subscriber_tags t WHERE t.subscriber_id = s.id AND t.tag = j.value)))"
        ).fetchone()[0]
        new_by_status = {
            status: int(count)
            for status, count in conn.execute(
                "SELECT i.status, count(*) FROM import_rows i WHERE NOT EXISTS"
                " (SELECT 1 FROM subscribers s WHERE s.email_key = i.email_key)"
                f"{_unsuppressed(conn, hashed)} GROUP BY i.status ORDER BY i.status"
            )
        }
        added = sum(new_by_status.values())
        suppressed = distinct - skipped - matched - added
        return added, int(updated), matched, skipped, distinct, suppressed, new_by_status

    @staticmethod
    def _merge_staged(
        conn: Connection, file_name: str, hashed: bool
    ) -> tuple[int, int, int, int, int, int, dict[str, int]]:
        """Merge the staging table into subscribers; (added, updated, matched, skipped,
        distinct, suppressed, added per status). ``hashed``: every staged row has its
        suppression hash."""
        d = conn.dialect
        now = _now()
        detail = f"file {file_name}"
        inactive = ", ".join(f"'{s.value}'" for s in INACTIVE)
        distinct, skipped, matched = _staged_matches(conn, inactive)
        # A subscriber gaining a tag counts as updated too.
        new_tags = (
            f"EXISTS (SELECT 1 FROM {d.json_array_values('upd.tags', 'j')} WHERE NOT EXISTS"
            " (SELECT 1 FROM subscriber_tags t WHERE t.subscriber_id = subscribers.id"
            "  AND t.tag = j.value))"
        )
        updated = conn.execute(
            "UPDATE subscribers SET name = upd.name, fields = upd.fields, updated_at = ?"
            " FROM (SELECT s.id AS id,"
            "   CASE WHEN i.name <> '' THEN i.name ELSE s.name END AS name,"
            "   CASE WHEN i.fields = '{}' THEN s.fields"
            f"  ELSE {d.json_patch('s.fields', 'i.fields')} END AS fields, i.tags AS tags"
            "   FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
            f"  WHERE s.status NOT IN ({inactive})) AS upd"
            " WHERE subscribers.id = upd.id"
            " AND (subscribers.name IS DISTINCT FROM upd.name"
            "  OR subscribers.fields IS DISTINCT FROM upd.fields"
            f"  OR (upd.tags <> '[]' AND {new_tags}))",
            (now,),
        ).rowcount
        before = conn.execute("SELECT coalesce(max(id), 0) FROM subscribers").fetchone()[0]
        # A new row whose address is suppressed is left out (its hash was staged with it;
        # none while nothing is suppressed).
        unsuppressed = _unsuppressed(conn, hashed)
        import_id = conn.execute(
            "INSERT INTO imports (file, imported_at) VALUES (?, ?) RETURNING id", (file_name, now)
        ).fetchone()[0]
        tagged = bool(
            conn.execute("SELECT 1 FROM import_rows WHERE tags <> '[]' LIMIT 1").fetchone()
        )
        # Tags new to subscribers already in the list: one history line each, the tags in
        # byte order (the same text on both engines).
        if tagged:
            conn.execute(
                f"INSERT INTO {_EVENT_COLUMNS}"
                " SELECT n.id, n.status, n.status, 'tag',"
                f" CAST(? AS TEXT) || ': +' || {d.group_concat_sorted('n.tag', _PLUS)}, ?"
                " FROM (SELECT s.id AS id, s.status AS status, j.value AS tag"
                "  FROM import_rows i JOIN subscribers s ON s.email_key = i.email_key"
                f"  CROSS JOIN {d.json_array_values('i.tags', 'j')}"
                f"  WHERE i.tags <> '[]' AND s.status NOT IN ({inactive}) AND NOT EXISTS"
                "  (SELECT 1 FROM subscriber_tags t"
                "   WHERE t.subscriber_id = s.id AND t.tag = j.value)"
                "  ORDER BY s.id, j.value) AS n"
                " GROUP BY n.id, n.status ORDER BY n.id",
                (detail, now),
            )
        # The consent of each row added (the file, its line, a sign-up date, a
        # confirmation time) is written with it.
        added = conn.execute(
            "INSERT INTO subscribers (email, email_key, name, fields, status, created_at,"
            " updated_at, status_changed_at, import_id, import_line, signed_up,"
            " import_confirmed_at)"
            " SELECT i.email, i.email_key, i.name, i.fields, i.status, ?1, ?1, ?1, ?2, i.line,"
            " i.signed_up, i.consent_at FROM import_rows i"
            " WHERE NOT EXISTS (SELECT 1 FROM subscribers s WHERE s.email_key = i.email_key)"
            f"{unsuppressed} ORDER BY i.line",
            (now, import_id),
        ).rowcount
        suppressed = distinct - skipped - matched - added
        if tagged:
            conn.execute(
                "INSERT INTO subscriber_tags (subscriber_id, tag, added_at)"
                " SELECT s.id, j.value, ? FROM import_rows i"
                " JOIN subscribers s ON s.email_key = i.email_key"
                f" CROSS JOIN {d.json_array_values('i.tags', 'j')}"
                f" WHERE i.tags <> '[]' AND (s.id > ? OR s.status NOT IN ({inactive}))"
                " ON CONFLICT DO NOTHING",
                (now, before),
            )
        # New ids are all above the old maximum: we hold the write lock.
        # One statement for all the subscribers the import added (it may be a million).
        conn.execute(
            f"INSERT INTO {_EVENT_COLUMNS}"
            " SELECT id, NULL, status, 'import', ?, ? FROM subscribers WHERE id > ?",
            (detail, now, before),
        )
        # Every row whose status suppresses it was hashed while staging.
        conn.execute(
            "INSERT INTO suppressions (address_hash, reason, at)"
            " SELECT i.address_hash, s.status, ?1 FROM subscribers s"
            " JOIN import_rows i ON i.email_key = s.email_key"
            f" WHERE s.id > ?2 AND s.status IN ({inactive})"
            " ON CONFLICT (address_hash) DO NOTHING",
            (now, before),
        )
        new_by_status = {
            status: int(count)
            for status, count in conn.execute(
                "SELECT status, count(*) FROM subscribers WHERE id > ?"
                " GROUP BY status ORDER BY status",
                (before,),
            )
        }
        return added, updated, matched, skipped, distinct, suppressed, new_by_status
