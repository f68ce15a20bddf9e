"""SPEC 8's `/metrics`: the ledger's state per pool, and the serving process's own figures, in
the Prometheus text exposition format, version 0.0.4.

`LedgerCollector` reads every ledger value from the database on each scrape, in a fixed
number of queries whatever the number of pools, pods or slots, so any web replica answers the
same; prometheus_client writes the format and adds the process (`process_*`: CPU, memory,
open files of this web process) and `python_*` collectors. One module-level registry holds
them: the ledger collector keeps no state between scrapes, so nothing needs multiprocess
mode, and the process figures are those of the replica that answered.

Choices:

* `pool` labels hold the pool id, which never changes; `poolsadmin_pool_info` carries the name.
* Dispatch latency is measured per `task.dispatched` event of the last `DISPATCH_WINDOW`, from
  the task's latest earlier queue entry in the event log: submitted, apply confirmed, or put
  back after an unacknowledged dispatch. Windowed quantiles go up and down, so they are
  gauges, not a summary whose `_count` Prometheus would take for a counter.
* The actual pod count is the ledger's pods that have not finished, as on the pool page; the
  autoscaler also counts pods the cluster has and the reconciler has not adopted yet, which
  only the worker can see.
* Reconcile duration is the leader's latest pass over every pool, as it recorded it on its
  lease row (`lease_record_pass`), with the time that pass ended: a stuck leader shows as a
  last pass that grows old.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

from django.db.models import Count, OuterRef, Subquery
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from poolsadmin.agents.liveness import liveness_read
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.grid import PoolSummary, pools_overview
from poolsadmin.pools.models import PoolType, SlotState
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_record

DISPATCH_WINDOW = timedelta(minutes=15)
QUANTILES = (0.5, 0.9, 0.99)
# The events after which a task waits for a slot (tasks.models.QUEUED): a plan from its
# submission, an apply from its confirmation, either again after a dispatch the agent did not
# acknowledge in time (scheduler.services.task_dispatch_rollback).
QUEUE_ENTRY_KINDS = ("task.submitted", "task.apply_confirmed", "task.dispatch_expired")
DRIFT_PREFIX = "drift."


# --- reads -------------------------------------------------------------------------------------


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _dispatch_latencies(*, since: datetime) -> dict[str, list[float]]:
    """Seconds from queue entry to dispatch, per pool, for the dispatches since `since`, in
    one query. A dispatch without an earlier queue entry in the log is left out."""
    entry = (
        Event.objects.filter(
            task_id=OuterRef("task_id"), kind__in=QUEUE_ENTRY_KINDS, id__lt=OuterRef("id")
        )
        .order_by("-id")
        .values("at")[:1]
    )
    latencies: dict[str, list[float]] = defaultdict(list)
    rows = (
        Event.objects.filter(kind="task.dispatched", at__gte=since)
        .annotate(entered_at=Subquery(entry))
        .values_list("pool_id", "at", "entered_at")
    )
    for pool_id, at, entered_at in rows:
        if entered_at is not None:
            latencies[pool_id].append(max(0.0, (at - entered_at).total_seconds()))
    return latencies


def _pool_families(summaries: list[PoolSummary], now: datetime) -> list[Metric]:
    info = GaugeMetricFamily(
        "poolsadmin_pool_info", "A pool's name and type; always 1.", labels=["pool", "name", "type"]
    )
    slots = GaugeMetricFamily(
        "poolsadmin_slots", "Slots per pool and state.", labels=["pool", "state"]
    )
    queue = GaugeMetricFamily(
        "poolsadmin_queue_length",
        "Tasks waiting for a slot: pending tasks and confirmed applies.",
        labels=["pool"],
    )
    oldest = GaugeMetricFamily(
        "poolsadmin_queue_oldest_wait_seconds",
        "Age of the oldest task waiting for a slot, from its creation (a confirmed apply: its "
        "confirmation), as on the pools page; "
        "0 when none waits.",
        labels=["pool"],
    )
    for s in summaries:
        pool_id = s.pool.pool_id
        info.add_metric([pool_id, s.pool.name, s.pool.pool_type], 1)
        for state in SlotState.values:
            slots.add_metric([pool_id, state], s.slots[state])
        queue.add_metric([pool_id], s.queue_length)
        waited = (now - s.queue_oldest_at).total_seconds() if s.queue_oldest_at else 0.0
        oldest.add_metric([pool_id], max(0.0, waited))
    return [info, slots, queue, oldest]


def _dispatch_families(summaries: list[PoolSummary], now: datetime) -> list[Metric]:
    minutes = int(DISPATCH_WINDOW.total_seconds() // 60)
    latency = GaugeMetricFamily(
        "poolsadmin_dispatch_latency_seconds",
        "Seconds from a task entering the queue (submitted, apply confirmed, or put back after "
        f"an unacknowledged dispatch) to its dispatch: nearest-rank quantiles over the "
        f"dispatches of the last {minutes} minutes.",
        labels=["pool", "quantile"],
    )
    count = GaugeMetricFamily(
        "poolsadmin_dispatch_latency_window_dispatches",
        f"Dispatches in the last {minutes} minutes that the latency quantiles are taken over.",
        labels=["pool"],
    )
    latencies = _dispatch_latencies(since=now - DISPATCH_WINDOW)
    for s in summaries:
        pool_id = s.pool.pool_id
        ordered = sorted(latencies.get(pool_id, []))
        for q in QUANTILES:
            if ordered:
                latency.add_metric([pool_id, str(q)], _quantile(ordered, q))
        count.add_metric([pool_id], len(ordered))
    return [latency, count]


def _autoscaler_families(summaries: list[PoolSummary]) -> list[Metric]:
    desired = GaugeMetricFamily(
        "poolsadmin_autoscaler_desired_pods",
        "Pods the latest autoscaler decision wanted (k8s pools with a decision).",
        labels=["pool"],
    )
    actual = GaugeMetricFamily(
        "poolsadmin_autoscaler_actual_pods",
        "Pods of the pool in the ledger that have not finished (k8s pools), as the autoscaler "
        "and the pool page count them.",
        labels=["pool"],
    )
    for s in summaries:
        if s.pool.pool_type != PoolType.K8S:
            continue
        pool_id = s.pool.pool_id
        if s.desired_pods is not None:
            desired.add_metric([pool_id], s.desired_pods)
        actual.add_metric([pool_id], s.pods_alive)
    return [desired, actual]


def _drift_family() -> Metric:
    drift = CounterMetricFamily(
        "poolsadmin_drift_repairs_total",
        "Ledger drift the reconciler repaired, per pool and drift.* event kind.",
        labels=["pool", "kind"],
    )
    rows = (
        Event.objects.filter(kind__startswith=DRIFT_PREFIX)
        .values("pool_id", "kind")
        .annotate(n=Count("id"))
        .order_by("pool_id", "kind")
    )
    for row in rows:
        drift.add_metric([row["pool_id"], row["kind"]], row["n"])
    return drift


def _reconciler_families() -> list[Metric]:
    leader = GaugeMetricFamily(
        "poolsadmin_reconciler_leader_info",
        "The worker holding the reconciler lease now; always 1, absent when nobody leads.",
        labels=["holder"],
    )
    renewed = GaugeMetricFamily(
        "poolsadmin_reconciler_lease_renewed_timestamp_seconds",
        "Unix time the reconciler lease was last renewed; every reconciler and autoscaler pass "
        "of the leader renews it.",
        labels=[],
    )
    duration = GaugeMetricFamily(
        "poolsadmin_reconcile_duration_seconds",
        "How long the leader's latest reconcile pass over every pool took.",
        labels=[],
    )
    last_pass = GaugeMetricFamily(
        "poolsadmin_reconcile_last_pass_timestamp_seconds",
        "Unix time the leader's latest reconcile pass ended.",
        labels=[],
    )
    changes = GaugeMetricFamily(
        "poolsadmin_reconcile_last_pass_changes",
        "Changes the leader's latest reconcile pass made, over every pool.",
        labels=[],
    )
    lease, held = lease_record(RECONCILER_LEASE)
    if lease is not None:
        if held:
            leader.add_metric([lease.holder], 1)
        renewed.add_metric([], lease.renewed_at.timestamp())
        if lease.last_pass_at is not None and lease.last_pass_seconds is not None:
            duration.add_metric([], lease.last_pass_seconds)
            last_pass.add_metric([], lease.last_pass_at.timestamp())
            changes.add_metric([], lease.last_pass_changes)
    return [leader, renewed, duration, last_pass, changes]


def _liveness_families() -> list[Metric]:
    """Whether poolsadmin can hear its agents (agents/liveness.py): a record gone stale for
    good (a keeper that cannot reach the agent API) pauses liveness checks, and must page."""
    listening = GaugeMetricFamily(
        "poolsadmin_liveness_listening",
        "1 if the agent API proved lately that agents can reach it; 0: liveness checks pause.",
        labels=[],
    )
    listening_for = GaugeMetricFamily(
        "poolsadmin_liveness_listening_seconds",
        "How long poolsadmin has heard agents without a gap (since its latest outage).",
        labels=[],
    )
    liveness = liveness_read()
    if liveness.listening_for is not None:
        listening.add_metric([], 1 if liveness.listening else 0)
        listening_for.add_metric([], liveness.listening_for.total_seconds())
    return [listening, listening_for]


def metrics_collect(*, now: datetime | None = None) -> list[Metric]:
    """Every metric family for `/metrics`. Nine queries, whatever the number of pools."""
    now = now or clock.now()
    summaries = pools_overview(now=now)
    return [
        *_pool_families(summaries, now),
        *_dispatch_families(summaries, now),
        *_autoscaler_families(summaries),
        _drift_family(),
        *_reconciler_families(),
        *_liveness_families(),
    ]


class LedgerCollector(Collector):
    """The ledger's families, read anew on every scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from metrics_collect()

    def describe(self) -> Iterator[Metric]:
        # Nothing to describe ahead: registering must not query a database that may not be
        # there yet (the registry is built at import).
        return iter(())


def metrics_registry() -> CollectorRegistry:
    """The ledger and the serving process: prometheus_client's own process, platform
    (`python_info`) and garbage-collector collectors, which read this process only."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, LedgerCollector()):
        registry.register(collector)
    return registry


REGISTRY = metrics_registry()
