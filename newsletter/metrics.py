"""``GET /metrics``: Prometheus text format, computed from the database on each scrape.

Computed on scrape (not counted in memory), so that every `serve` process, the worker
and a `send` at the terminal all show in the same numbers, and a restart loses nothing.
Labels are issue folder names, states and kinds: no address, name or token.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .models import DeliveryState, ScheduleState, Status
from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_WAITING = (DeliveryState.QUEUED, DeliveryState.SENDING, DeliveryState.DEFERRED)


class StoreCollector(Collector):
    """The newsletter's numbers, read from one database at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        data = self.store.metric_counts()
        messages = CounterMetricFamily(
            "newsletter_messages",
            "Ledger rows by final outcome: sent, failed (5xx), uncertain, cancelled",
            labels=["outcome"],
        )
        deferred = GaugeMetricFamily(
            "newsletter_messages_deferred", "Recipients deferred (4xx), waiting for a retry"
        )
        queue = GaugeMetricFamily(
            "newsletter_queue_depth",
            "Recipients of an issue not yet sent to (queued, sending or deferred)",
            labels=["issue"],
        )
        totals = dict.fromkeys(DeliveryState, 0)
        waiting: dict[str, int] = {}
        for issue, state, rows in data["ledger"]:
            totals[DeliveryState(state)] += int(rows)
            if DeliveryState(state) in _WAITING:
                waiting[issue] = waiting.get(issue, 0) + int(rows)
        for state in (
            DeliveryState.SENT,
            DeliveryState.FAILED,
            DeliveryState.UNCERTAIN,
            DeliveryState.CANCELLED,
        ):
            messages.add_metric([state.value], totals[state])
        deferred.add_metric([], totals[DeliveryState.DEFERRED])
        for issue, count in sorted(waiting.items()):
            queue.add_metric([issue], count)
        yield messages
        yield deferred
        yield queue

        subscribers = GaugeMetricFamily(
            "newsletter_subscribers", "Subscribers by status", labels=["status"]
        )
        by_status = dict.fromkeys((s.value for s in Status), 0)
        for status, rows in data["subscribers"]:
            by_status[status] = int(rows)
        for status, number in by_status.items():
            subscribers.add_metric([status], number)
        yield subscribers

        subscriptions = CounterMetricFamily(
            "newsletter_subscriptions", "Subscribers who became active (confirmed, added, imported)"
        )
        unsubscribes = CounterMetricFamily(
            "newsletter_unsubscribes", "Subscribers who unsubscribed (links, mail, the editor)"
        )
        complaints = CounterMetricFamily(
            "newsletter_complaints", "Subscribers marked complained (spam reports)"
        )
        counted = {"active": 0, "unsubscribed": 0, "complained": 0}
        for new, _old, rows in data["events"]:
            if new in counted:
                counted[new] += int(rows)
        subscriptions.add_metric([], counted["active"])
        unsubscribes.add_metric([], counted["unsubscribed"])
        complaints.add_metric([], counted["complained"])
        yield subscriptions
        yield unsubscribes
        yield complaints

        inbound = CounterMetricFamily(
            "newsletter_inbound_messages",
            "Inbound mail and webhook events processed, by where they came from and outcome",
            labels=["source", "kind"],
        )
        by_source: dict[tuple[str, str], int] = {}
        for source, kind, rows in data["inbound"]:
            # "file bounces.mbox", "imap INBOX": the kind of source, not its name.
            label = (source.replace(":", " ").split(" ", 1)[0], kind)
            by_source[label] = by_source.get(label, 0) + int(rows)
        for (source, kind), number in sorted(by_source.items()):
            inbound.add_metric([source, kind], number)
        yield inbound
        bounces = CounterMetricFamily(
            "newsletter_bounces", "Bounces recorded, hard or soft", labels=["kind"]
        )
        by_kind = {"hard": 0, "soft": 0}
        for kind, rows in data["bounces"]:
            by_kind[kind] = int(rows)
        for kind, number in by_kind.items():
            bounces.add_metric([kind], number)
        yield bounces

        schedules = GaugeMetricFamily(
            "newsletter_schedules", "Scheduled sends by state", labels=["state"]
        )
        by_state = dict.fromkeys((s.value for s in ScheduleState), 0)
        for state, rows in data["schedules"]:
            by_state[state] = int(rows)
        for state, number in by_state.items():
            schedules.add_metric([state], number)
        yield schedules


def render(store: Store) -> bytes:
    """The metrics page for ``store``, in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "StoreCollector", "render"]
