"""SQLite store: subscribers, their status history, and the delivery ledger.

One file, the standard library's ``sqlite3``, WAL mode. The ledger is the truth
about who got what: a row is committed as ``sending`` (with a full fsync) before
its message goes to the server, and a row still ``sending`` when the next run
takes the issue's send lock belongs to a dead run, so it becomes ``uncertain``.

The send lock is an OS advisory lock (``flock``) on a file beside the database.
The kernel drops it when its process dies, even by ``kill -9``, so "rows in
``sending`` + nobody holds the lock" means exactly "crashed run".

The records it hands out live in ``models``, the address rules in ``addresses``
and the schema in ``migrations``.

One store, one module per topic: ``base`` (opening, transactions, shared helpers),
``subscribers``, ``imports``, ``ledger``, ``service``, ``feedback``, ``schedules`` and
``privacy``, each a mixin that :class:`Store` puts together.
"""

from __future__ import annotations

from ..db import MEMORY
from .base import BUSY_TIMEOUT_MS, StoreBase
from .feedback import FeedbackMixin
from .imports import (
    IMPORT_CHUNK,
    MAX_IMPORTED_NAME,
    MAX_KEPT_ROW_ERRORS,
    SIGNUP_DATE_COLUMNS,
    ImportsMixin,
)
from .ledger import LedgerMixin
from .privacy import PrivacyMixin
from .schedules import SchedulesMixin
from .service import FORM_REASONS, ServiceMixin
from .subscribers import PAGE, SubscribersMixin

__all__ = [
    "BUSY_TIMEOUT_MS",
    "FORM_REASONS",
    "IMPORT_CHUNK",
    "MAX_IMPORTED_NAME",
    "MAX_KEPT_ROW_ERRORS",
    "MEMORY",
    "PAGE",
    "SIGNUP_DATE_COLUMNS",
    "Store",
]


class Store(
    SubscribersMixin,
    ImportsMixin,
    LedgerMixin,
    ServiceMixin,
    FeedbackMixin,
    SchedulesMixin,
    PrivacyMixin,
    StoreBase,
):
    """One connection to the database; safe to share between threads (calls are serialised)."""
