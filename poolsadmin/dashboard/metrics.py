"""SPEC 8's `/metrics`: the ledger's state per pool in the Prometheus text exposition format,
version 0.0.4.

Every value is read from the database on each scrape, in a fixed number of queries whatever
the number of pools, pods or slots, so any web replica answers the same. The format is written
here by hand: a dozen families read from the ledger need no registry, collectors or
multiprocess mode, which is what prometheus_client adds.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from django.db.models import Count, OuterRef, Subquery

from poolsadmin.agents.liveness import liveness_read
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.grid import PoolSummary, pools_overview
from poolsadmin.pools.models import PoolType, SlotState
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_record

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DISPATCH_WINDOW = timedelta(minutes=15)
QUANTILES = (0.5, 0.9, 0.99)
# The events after which a task waits for a slot (tasks.models.QUEUED): a plan from its
# submission, an apply from its confirmation, either again after a dispatch the agent did not
# acknowledge in time (scheduler.services.task_dispatch_rollback).
QUEUE_ENTRY_KINDS = ("task.submitted", "task.apply_confirmed", "task.dispatch_expired")
DRIFT_PREFIX = "drift."

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Family:
    """One metric family: its `# HELP` and `# TYPE` lines and its samples."""

    name: str
    type: Literal["gauge", "counter"]
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((tuple(labels.items()), value))


# --- the text format -----------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def exposition(families: Iterable[Family]) -> str:
    """The families in the text format: each family's lines together, after its HELP and TYPE."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            pairs = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels)
            selector = f"{{{pairs}}}" if pairs else ""
            lines.append(f"{family.name}{selector} {_number(value)}")
    return "\n".join(lines) + "\n"


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


def _pool_families(summaries: list[PoolSummary], now: datetime) -> list[Family]:
    info = Family("poolsadmin_pool_info", "gauge", "A pool's name and type; always 1.")
    slots = Family("poolsadmin_slots", "gauge", "Slots per pool and state.")
    queue = Family(
        "poolsadmin_queue_length",
        "gauge",
        "Tasks waiting for a slot: pending tasks and confirmed applies.",
    )
    oldest = Family(
        "poolsadmin_queue_oldest_wait_seconds",
        "gauge",
        "Age of the oldest task waiting for a slot, from its creation (a confirmed apply: its "
        "confirmation), as on the pools page; "
        "0 when none waits.",
    )
    for s in summaries:
        pool_id = s.pool.pool_id
        info.add(1, pool=pool_id, name=s.pool.name, type=s.pool.pool_type)
        for state in SlotState.values:
            slots.add(s.slots[state], pool=pool_id, state=state)
        queue.add(s.queue_length, pool=pool_id)
        waited = (now - s.queue_oldest_at).total_seconds() if s.queue_oldest_at else 0.0
        oldest.add(max(0.0, waited), pool=pool_id)
    return [info, slots, queue, oldest]


def _dispatch_families(summaries: list[PoolSummary], now: datetime) -> list[Family]:
    minutes = int(DISPATCH_WINDOW.total_seconds() // 60)
    latency = Family(
        "poolsadmin_dispatch_latency_seconds",
        "gauge",
        "Seconds from a task entering the queue (submitted, apply confirmed, or put back after "
        f"an unacknowledged dispatch) to its dispatch: nearest-rank quantiles over the "
        f"dispatches of the last {minutes} minutes.",
    )
    count = Family(
        "poolsadmin_dispatch_latency_window_dispatches",
        "gauge",
        f"Dispatches in the last {minutes} minutes that the latency quantiles are taken over.",
    )
    latencies = _dispatch_latencies(since=now - DISPATCH_WINDOW)
    for s in summaries:
        pool_id = s.pool.pool_id
        ordered = sorted(latencies.get(pool_id, []))
        for q in QUANTILES:
            if ordered:
                latency.add(_quantile(ordered, q), pool=pool_id, quantile=str(q))
        count.add(len(ordered), pool=pool_id)
    return [latency, count]


def _autoscaler_families(summaries: list[PoolSummary]) -> list[Family]:
    desired = Family(
        "poolsadmin_autoscaler_desired_pods",
        "gauge",
        "Pods the latest autoscaler decision wanted (k8s pools with a decision).",
    )
    actual = Family(
        "poolsadmin_autoscaler_actual_pods",
        "gauge",
        "Pods of the pool in the ledger that have not finished (k8s pools), as the autoscaler "
        "and the pool page count them.",
    )
    for s in summaries:
        if s.pool.pool_type != PoolType.K8S:
            continue
        pool_id = s.pool.pool_id
        if s.desired_pods is not None:
            desired.add(s.desired_pods, pool=pool_id)
        actual.add(s.pods_alive, pool=pool_id)
    return [desired, actual]


def _drift_family() -> Family:
    drift = Family(
        "poolsadmin_drift_repairs_total",
        "counter",
        "Ledger drift the reconciler repaired, per pool and drift.* event kind.",
    )
    rows = (
        Event.objects.filter(kind__startswith=DRIFT_PREFIX)
        .values("pool_id", "kind")
        .annotate(n=Count("id"))
        .order_by("pool_id", "kind")
    )
    for row in rows:
        drift.add(row["n"], pool=row["pool_id"], kind=row["kind"])
    return drift


def _reconciler_families() -> list[Family]:
    leader = Family(
        "poolsadmin_reconciler_leader_info",
        "gauge",
        "The worker holding the reconciler lease now; always 1, absent when nobody leads.",
    )
    renewed = Family(
        "poolsadmin_reconciler_lease_renewed_timestamp_seconds",
        "gauge",
        "Unix time the reconciler lease was last renewed; every reconciler and autoscaler pass "
        "of the leader renews it.",
    )
    duration = Family(
        "poolsadmin_reconcile_duration_seconds",
        "gauge",
        "How long the leader's latest reconcile pass over every pool took.",
    )
    last_pass = Family(
        "poolsadmin_reconcile_last_pass_timestamp_seconds",
        "gauge",
        "Unix time the leader's latest reconcile pass ended.",
    )
    changes = Family(
        "poolsadmin_reconcile_last_pass_changes",
        "gauge",
        "Changes the leader's latest reconcile pass made, over every pool.",
    )
    lease, held = lease_record(RECONCILER_LEASE)
    if lease is not None:
        if held:
            leader.add(1, holder=lease.holder)
        renewed.add(lease.renewed_at.timestamp())
        if lease.last_pass_at is not None and lease.last_pass_seconds is not None:
            duration.add(lease.last_pass_seconds)
            last_pass.add(lease.last_pass_at.timestamp())
            changes.add(lease.last_pass_changes)
    return [leader, renewed, duration, last_pass, changes]


def _liveness_families() -> list[Family]:
    """Whether poolsadmin can hear its agents (agents/liveness.py): a record gone stale for
    good (a keeper that cannot reach the agent API) pauses liveness checks, and must page."""
    listening = Family(
        "poolsadmin_liveness_listening",
        "gauge",
        "1 if the agent API proved lately that agents can reach it; 0: liveness checks pause.",
    )
    listening_for = Family(
        "poolsadmin_liveness_listening_seconds",
        "gauge",
        "How long poolsadmin has heard agents without a gap (since its latest outage).",
    )
    liveness = liveness_read()
    if liveness.listening_for is not None:
        listening.add(1 if liveness.listening else 0)
        listening_for.add(liveness.listening_for.total_seconds())
    return [listening, listening_for]


def metrics_collect(*, now: datetime | None = None) -> list[Family]:
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
