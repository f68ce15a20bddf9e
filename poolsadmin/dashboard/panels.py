"""Reads for the pool page's side panels (SPEC 8 "Pool"): the autoscaler (desired/actual/min/
max, last decision and its reason, hold, freeze), the reconciler (leader, last pass, recent
changes) and the pool's recent events.

The pool page refreshes every few seconds, so each panel costs a fixed number of queries,
whatever the number of decisions, events or pods: autoscaler 3 (plus 1 for the freeze windows
unless the pool was read with `prefetch_related("freeze_windows")`, as `dashboard_pool`
does; none for a static pool), reconciler 4, events 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q

from poolsadmin.agents.liveness import liveness_read
from poolsadmin.autoscaler.models import PoolHold, ScaleDecision
from poolsadmin.autoscaler.services import pool_active_hold, pool_pods_alive
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, PoolType
from poolsadmin.pools.selectors import FreezeState, pool_freeze_state
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_record
from poolsadmin.worker.models import Lease
from poolsadmin.worker.reconcile import RECONCILED, RECONCILER

# Rows of the reconciler's "recent changes" and of "recent events".
RECONCILER_CHANGES_LIMIT = 10
EVENTS_LIMIT = 15


@dataclass(frozen=True)
class AutoscalerPanel:
    pool: AgentPool
    # Static pools have no autoscaler: their pods are the machines whose agents registered.
    static: bool
    actual: int = 0  # pods in the ledger that are not finished (as the autoscaler counts)
    decision: ScaleDecision | None = None  # the latest stored decision
    hold: PoolHold | None = None  # the hold in force, if any
    freeze: FreezeState = field(default_factory=lambda: FreezeState(frozen=False))

    @property
    def desired(self) -> int | None:
        """What the autoscaler aims for: a hold's count, else the latest decision's."""
        if self.hold is not None:
            return self.hold.pods
        return self.decision.desired if self.decision is not None else None

    @property
    def min_replicas(self) -> int:
        return self.pool.min_replicas

    @property
    def max_replicas(self) -> int:
        return self.pool.max_replicas


def pool_autoscaler_panel(*, pool: AgentPool, now: datetime) -> AutoscalerPanel:
    if pool.pool_type != PoolType.K8S:
        return AutoscalerPanel(pool=pool, static=True)
    # Decisions are stored only when the pod count changed or could not change, so the
    # latest one is the autoscaler's last word, however long ago it was.
    decision = ScaleDecision.objects.filter(pool=pool).order_by("-at", "-id").first()
    return AutoscalerPanel(
        pool=pool,
        static=False,
        actual=pool_pods_alive(pool=pool),
        decision=decision,
        hold=pool_active_hold(pool=pool, now=now),
        freeze=pool_freeze_state(pool=pool, now=now),
    )


@dataclass(frozen=True)
class ReconcilerPanel:
    pool: AgentPool
    # The `reconciler` lease if a worker holds it now (SPEC 5: "the dashboard shows who holds
    # it"), else None: no worker reconciles.
    lease: Lease | None
    # The lease row whether or not anyone holds it now: it keeps the last recorded pass,
    # which matters most when the leader is stuck or gone (the pass then grows old).
    record: Lease | None
    # Repairs (`drift.*`) and whatever the reconciler did in this pool, newest first.
    changes: list[Event]
    # The latest "Reconcile now" of this pool (who, when, how many changes), if any.
    last_manual: Event | None
    # Why agents' silence is not judged right now (an outage of poolsadmin), or "".
    liveness: str = ""

    @property
    def leader(self) -> str:
        return self.lease.holder if self.lease is not None else ""

    @property
    def last_pass_at(self) -> datetime | None:
        """When the leader's latest pass over every pool ended (recorded on its lease)."""
        return self.record.last_pass_at if self.record is not None else None


def pool_reconciler_panel(*, pool: AgentPool, now: datetime) -> ReconcilerPanel:
    events = Event.objects.filter(pool_id=pool.pk)
    changes = events.filter(Q(kind__startswith="drift.") | Q(actor=RECONCILER)).order_by("-id")
    record, held = lease_record(RECONCILER_LEASE)
    return ReconcilerPanel(
        pool=pool,
        lease=record if held else None,
        record=record,
        changes=list(changes[:RECONCILER_CHANGES_LIMIT]),
        last_manual=events.filter(kind=RECONCILED).order_by("-id").first(),
        # Until a task could be failed or a pod deleted for silence.
        liveness=liveness_read().words(allowance=pool.lost_after),
    )


@dataclass(frozen=True)
class RecentEvents:
    pool: AgentPool
    events: list[Event]  # newest first
    limit: int


def pool_recent_events(*, pool: AgentPool, limit: int = EVENTS_LIMIT) -> RecentEvents:
    events = Event.objects.filter(pool_id=pool.pk).order_by("-id")[:limit]
    return RecentEvents(pool=pool, events=list(events), limit=limit)
