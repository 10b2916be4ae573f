"""Subscribers: adding, looking up, status changes, tags, listing, removal, the CSV export."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from ..addresses import email_key, normalize_email
from ..db import Dialect
from ..errors import StoreError
from ..models import Status, Subscriber, SubscriberEvent, Suppression
from ..segments import Segment, TagError, join_tags, normalize_tag
from .base import (
    _SUBSCRIBER_COLUMNS,
    _SUPPRESSING,
    StoreBase,
    _dt,
    _fields_json,
    _forget,
    _neutralise,
    _now,
    _recipient_filter,
    _record_consent,
    _record_event,
    _refuse_nul,
    _subscriber,
    _suppress,
    _suppression,
)

PAGE = 1_000  # rows per query when streaming subscribers


def _suppressed_error(address: str, found: Suppression, where: str) -> StoreError:
    return StoreError(
        f"{address} is suppressed ({found.reason} on {found.at:%Y-%m-%d})",
        where=where,
        hint="only they can subscribe again, through the subscribe form (double opt-in)",
    )


def _audience_filter(
    status: Status | None, tag: str | None, segment: Segment | None, dialect: Dialect
) -> tuple[str, list[Any]]:
    """`` AND ...`` conditions on ``s`` for a status, a tag and a segment (bound values)."""
    where = ""
    params: list[Any] = []
    if status is not None:
        where += " AND s.status = ?"
        params.append(Status(status).value)
    if tag is not None:
        try:
            normalized = normalize_tag(tag)
        except TagError as exc:
            raise StoreError(exc.message, hint=exc.hint) from None
        where += " AND s.id IN (SELECT t.subscriber_id FROM subscriber_tags t WHERE t.tag = ?)"
        params.append(normalized)
    if segment is not None:
        sql, values = segment.sql(dialect)
        where += f" AND ({sql})"
        params.extend(values)
    return where, params


class SubscribersMixin(StoreBase):
    """Subscribers and their tags."""

    def add_subscriber(
        self,
        email: str,
        name: str = "",
        fields: Mapping[str, str] | None = None,
        *,
        status: Status = Status.ACTIVE,
        reason: str = "added",
    ) -> Subscriber:
        """Add a new subscriber; an address already in the list (any status) or suppressed
        (see :meth:`suppression`) is refused."""
        normalized = normalize_email(email)
        _refuse_nul(
            {
                "name": name,
                **{f"field name {key!r}": key for key in fields or {}},
                **{f"field {key!r}": value for key, value in (fields or {}).items()},
            },
            self._where,
        )
        now = _now()
        with self._transaction() as conn:
            existing = conn.execute(
                "SELECT status FROM subscribers WHERE email_key = ?", (normalized.lower(),)
            ).fetchone()
            if existing is not None:
                raise StoreError(
                    f"{normalized} is already in the list ({existing[0]})",
                    where=self._where,
                    hint="an address that unsubscribed or bounced is never re-added silently",
                )
            suppressed = _suppression(conn, normalized.lower())
            if suppressed is not None:
                raise _suppressed_error(normalized, suppressed, self._where)
            cursor = conn.execute(
                "INSERT INTO subscribers (email, email_key, name, fields, status, created_at,"
                " updated_at, status_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    normalized,
                    normalized.lower(),
                    name.strip(),
                    _fields_json(fields or {}),
                    Status(status).value,
                    now,
                    now,
                    now,
                ),
            )
            subscriber_id = int(cursor.fetchone()[0])
            _record_event(conn, subscriber_id, None, Status(status).value, reason, "", now)
            _record_consent(conn, subscriber_id, "added", "", now)
            if Status(status).value in _SUPPRESSING:
                _suppress(conn, subscriber_id, Status(status).value, now)
            return self._get(conn, subscriber_id)

    def get_subscriber(self, email_or_id: str | int) -> Subscriber | None:
        """The subscriber with this address (any case) or id, or None."""
        param: str | int
        if isinstance(email_or_id, int):
            where, param = "s.id = ?", email_or_id
        else:
            where, param = "s.email_key = ?", email_key(email_or_id)
        row = self._one(f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE {where}", (param,))
        return None if row is None else _subscriber(row)

    def set_status(
        self, email_or_id: str | int, status: Status, reason: str, detail: str = ""
    ) -> Subscriber:
        """Change a subscriber's status and record why (no event when it is unchanged).

        Making a suppressed address active is refused: only the person's own
        confirmation (:meth:`confirm_subscription`) lifts a suppression.
        """
        status = Status(status)
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
            if status == Status.ACTIVE:
                current = self._get(conn, subscriber_id)
                found = _suppression(conn, current.email.lower())
                if current.status != Status.ACTIVE and found is not None:
                    raise _suppressed_error(current.email, found, self._where)
            self._change_status(conn, subscriber_id, status, reason, detail, _now())
            return self._get(conn, subscriber_id)

    def subscriber_events(self, email_or_id: str | int) -> list[SubscriberEvent]:
        """A subscriber's status history, oldest first."""
        with self._reading() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
        rows = self._all(
            "SELECT subscriber_id, old_status, new_status, reason, detail, at"
            " FROM subscriber_events WHERE subscriber_id = ? ORDER BY id",
            (subscriber_id,),
        )
        return [
            SubscriberEvent(
                r[0], None if r[1] is None else Status(r[1]), Status(r[2]), r[3], r[4], _dt(r[5])
            )
            for r in rows
        ]

    def list_subscribers(
        self,
        status: Status | None = None,
        *,
        tag: str | None = None,
        segment: Segment | None = None,
    ) -> Iterator[Subscriber]:
        """All subscribers (or those with ``status``, ``tag`` and in ``segment``) by id,
        fetched a page at a time."""
        where, params = _audience_filter(status, tag, segment, self._conn.dialect)
        return self._pages(where, params)

    def count(
        self,
        status: Status | None = None,
        *,
        tag: str | None = None,
        segment: Segment | None = None,
    ) -> int:
        """How many subscribers (with ``status``, ``tag`` and in ``segment``, or all)."""
        where, params = _audience_filter(status, tag, segment, self._conn.dialect)
        return int(self._one(f"SELECT count(*) FROM subscribers s WHERE TRUE{where}", params)[0])

    def count_recipients(self, segment: Segment | None = None) -> int:
        """Who a send would go to now: active, not paused, in ``segment`` (when given)."""
        where, params = _recipient_filter(segment, self._conn.dialect)
        return int(self._one(f"SELECT count(*) FROM subscribers s WHERE {where}", params)[0])

    def list_recipients(self, segment: Segment | None = None) -> Iterator[Subscriber]:
        """The subscribers :meth:`count_recipients` counts, by id (a dry run builds theirs)."""
        where, params = _recipient_filter(segment, self._conn.dialect)
        return self._pages(f" AND {where}", params)

    def _pages(self, where: str, params: Sequence[Any]) -> Iterator[Subscriber]:
        """Subscribers matching `` AND ...`` conditions on ``s``, by id, a page at a time."""
        last = 0
        while True:
            rows = self._all(
                f"SELECT {_SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id > ?{where}"
                f" ORDER BY s.id LIMIT {PAGE}",
                (last, *params),
            )
            for row in rows:
                yield _subscriber(row)
            if len(rows) < PAGE:
                return
            last = rows[-1][0]

    # -- tags ------------------------------------------------------------------------------

    def tags_of(self, email_or_id: str | int) -> list[str]:
        """A subscriber's tags, in alphabetical order."""
        with self._reading() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
        rows = self._all(
            "SELECT tag FROM subscriber_tags WHERE subscriber_id = ? ORDER BY tag",
            (subscriber_id,),
        )
        return [row[0] for row in rows]

    def change_tags(
        self,
        email_or_id: str | int,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
        *,
        reason: str = "tag",
        detail: str = "",
    ) -> tuple[list[str], list[str]]:
        """Add and remove tags in one transaction; returns (added, removed), only what changed.

        Each change is one line in the subscriber's history (``+europe -paused``), with
        ``reason`` (``tag``, ``preferences``...). A bad tag is a StoreError, nothing changed.
        """
        try:
            wanted = list(dict.fromkeys(normalize_tag(tag) for tag in add))
            unwanted = list(dict.fromkeys(normalize_tag(tag) for tag in remove))
        except TagError as exc:
            raise StoreError(exc.message, where=self._where, hint=exc.hint) from None
        now = _now()
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
            added: list[str] = []
            removed: list[str] = []
            for tag in (t for t in wanted if t not in unwanted):
                if conn.execute(
                    "INSERT INTO subscriber_tags (subscriber_id, tag, added_at)"
                    " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (subscriber_id, tag, now),
                ).rowcount:
                    added.append(tag)
            for tag in unwanted:
                if conn.execute(
                    "DELETE FROM subscriber_tags WHERE subscriber_id = ? AND tag = ?",
                    (subscriber_id, tag),
                ).rowcount:
                    removed.append(tag)
            if added or removed:
                status = conn.execute(
                    "SELECT status FROM subscribers WHERE id = ?", (subscriber_id,)
                ).fetchone()[0]
                change = " ".join([*(f"+{t}" for t in added), *(f"-{t}" for t in removed)])
                conn.execute(
                    "UPDATE subscribers SET updated_at = ? WHERE id = ?", (now, subscriber_id)
                )
                _record_event(
                    conn,
                    subscriber_id,
                    status,
                    status,
                    reason,
                    f"{detail}: {change}" if detail else change,
                    now,
                )
            return added, removed

    def tag_counts(self) -> dict[str, int]:
        """Subscribers per tag (any status), by tag."""
        return dict(
            self._all("SELECT tag, count(*) FROM subscriber_tags GROUP BY tag ORDER BY tag")
        )

    def count_by_status(self) -> dict[Status, int]:
        """Subscribers per status, every status present (zero when none)."""
        counts = dict.fromkeys(Status, 0)
        for status, number in self._all("SELECT status, count(*) FROM subscribers GROUP BY status"):
            counts[Status(status)] = number
        return counts

    def remove_subscriber(self, email_or_id: str | int, *, force: bool = False) -> None:
        """Delete a subscriber and their history, for good; their address stays suppressed.

        Refused when the ledger records deliveries to them, unless ``force`` (their
        ledger rows go too, kept as counts). To stop mail, unsubscribe instead: that keeps
        the record. A suppression entry (reason ``removed`` unless they had left before)
        keeps any later import from adding them back.
        """
        with self._transaction() as conn:
            subscriber_id = self._subscriber_id(conn, email_or_id)
            deliveries = conn.execute(
                "SELECT count(*) FROM deliveries WHERE subscriber_id = ?", (subscriber_id,)
            ).fetchone()[0]
            if deliveries and not force:
                raise StoreError(
                    f"{email_or_id} has {deliveries} delivery record(s)",
                    where=self._where,
                    hint="unsubscribe them instead, or use --force to delete those records too",
                )
            _suppress(conn, subscriber_id, "removed", _now())
            _forget(conn, subscriber_id)

    def field_names(self) -> set[str]:
        """The names of the free fields (lower-cased) that any subscriber has."""
        return {
            str(row[0]).lower()
            for row in self._all(
                "SELECT DISTINCT j.key FROM subscribers s,"
                f" {self._conn.dialect.json_object_keys('s.fields', 'j')}"
            )
        }

    def export_csv(self, out: TextIO, status: Status | None = None) -> int:
        """Write subscribers as CSV (email, name, status, created_at, tags, then fields);
        returns rows.

        ``import_csv`` reads this back: ``status`` suppresses new rows, ``created_at`` is the
        sign-up date of new rows, ``tags`` are separated by ``;``. A cell a spreadsheet would
        run (``=``, ``+``, ``-``, ``@``, tab, CR first) gets a leading apostrophe, which the
        import takes off again.
        """
        where = "" if status is None else " WHERE s.status = ?"
        params: tuple[Any, ...] = () if status is None else (Status(status).value,)
        keys = [
            row[0]
            for row in self._all(
                "SELECT DISTINCT j.key FROM subscribers s,"
                f" {self._conn.dialect.json_object_keys('s.fields', 'j')}{where} ORDER BY 1",
                params,
            )
        ]
        writer = csv.writer(out)
        writer.writerow(["email", "name", "status", "created_at", "tags", *map(_neutralise, keys)])
        count = 0
        for sub, tags in self._with_tags(self.list_subscribers(status)):
            writer.writerow(
                [
                    _neutralise(sub.email),
                    _neutralise(sub.name),
                    sub.status.value,
                    sub.created_at.isoformat(),
                    _neutralise(join_tags(tags)),
                    *(_neutralise(sub.fields.get(key, "")) for key in keys),
                ]
            )
            count += 1
        return count

    def _with_tags(
        self, subscribers: Iterable[Subscriber]
    ) -> Iterator[tuple[Subscriber, list[str]]]:
        """Each subscriber with their tags, looked up a page at a time."""
        source = iter(subscribers)
        while page := list(itertools.islice(source, PAGE)):
            ids = [sub.id for sub in page]
            found: dict[int, list[str]] = {}
            for subscriber_id, tag in self._all(
                "SELECT subscriber_id, tag FROM subscriber_tags WHERE subscriber_id IN"
                f" ({', '.join('?' * len(ids))}) ORDER BY subscriber_id, tag",
                ids,
            ):
                found.setdefault(subscriber_id, []).append(tag)
            for sub in page:
                yield sub, found.get(sub.id, [])
