"""The reconciler (SPEC 5): ledger-side steps (agent liveness, lost tasks, reservations on lost
agents, reservation expiry), cluster sync for k8s pools (worker/cluster.py) and the ledger
check, per pool, with a dry run; and the leader-only pass over every pool."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction

from poolsadmin.agents.liveness import Liveness, agents_lost, liveness_read
from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.agents.services import agents_mark_offline
from poolsadmin.events.services import event_record
from poolsadmin.kube.adapter import KubeApi
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, InvalidInput, NotFound
from poolsadmin.lib.humanize import stamp
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool, PoolType, Slot, SlotState
from poolsadmin.pools.services import slot_free_for_task, slot_label
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_fail_lost, task_reservation_drop
from poolsadmin.worker.cluster import RECONCILER, Change, ClusterUnavailable, cluster_sync
from poolsadmin.worker.cluster_access import kube_for_pool
from poolsadmin.worker.lease import (
    RECONCILER_LEASE,
    lease_acquire_or_renew,
    lease_holder_id,
    lease_keep,
    lease_record_pass,
    lease_release,
)

logger = logging.getLogger("poolsadmin.worker.reconcile")

__all__ = [
    "RECONCILER",
    "Change",
    "ReconcileReport",
    "ReconcileResult",
    "ledger_check",
    "reconcile_pass",
    "reconcile_pass_leader",
    "reconcile_pool",
]

# Renewed every pass (a few seconds); a leader that dies is replaced within this time.
LEASE_TTL_SECONDS = 30.0
# What a slot's state requires of its task's status.
SLOT_TASK_STATUS = {
    SlotState.RUNNING: TaskStatus.RUNNING,
    SlotState.RESERVED: TaskStatus.APPLY_PENDING,
}


@dataclass
class ReconcileResult:
    agents_offline: list[str] = field(default_factory=list)
    tasks_failed: list[int] = field(default_factory=list)
    reservations_dropped: list[int] = field(default_factory=list)
    reservations_expired: list[int] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(
            self.agents_offline
            or self.tasks_failed
            or self.reservations_dropped
            or self.reservations_expired
        )


@dataclass
class ReconcileReport:
    """One pool's pass: what changed (or, in a dry run, what would have)."""

    pool_id: str
    dry_run: bool
    changes: list[Change] = field(default_factory=list)
    # Why cluster sync was skipped this pass (a cluster error), else "".
    cluster_error: str = ""

    @property
    def did_work(self) -> bool:
        return bool(self.changes) and not self.dry_run


def _isolated(what: str, step: Callable[[], object], *, ids: dict[str, object]) -> bool:
    """Run one task's repair: whether it changed something. If it raises, log it and go on
    with the next (SPEC 5: one bad row never stops a loop for everyone else); its transaction
    was rolled back, and the next pass tries again."""
    try:
        return bool(step())
    except Exception:
        logger.exception("reconciler: %s failed", what, extra=ids)
        return False


def _ledger_steps(
    *,
    pool: AgentPool,
    now: datetime,
    actor: str,
    result: ReconcileResult,
    liveness: Liveness,
    dry_run: bool = False,
) -> list[Change]:
    """Steps 2-5 of reconcile_pass for one pool."""
    changes: list[Change] = []
    grace = timedelta(seconds=pool.task_grace_seconds)
    for agent in agents_lost(pool=pool, now=now, liveness=liveness, dry_run=dry_run):
        where = f" (pod {agent.agent_name})"
        # Unacknowledged dispatches are not lost work: the scheduler rolls them back.
        for task_id in WorkspaceTask.objects.filter(
            agent=agent, status=TaskStatus.RUNNING, acked_at__isnull=False
        ).values_list("id", flat=True):
            message = (
                f"Agent {agent.agent_name} ({agent.agent_id}){where} stopped heartbeating at "
                f"{stamp(agent.last_ping_at)}; task #{task_id} was lost."
            )
            if dry_run or _isolated(
                f"failing task #{task_id}",
                functools.partial(task_fail_lost, task_id=task_id, message=message, actor=actor),
                ids=log_ids(task=task_id, pool=pool.pool_id, agent=agent.agent_id),
            ):
                result.tasks_failed.append(task_id)
                changes.append(Change("task.fail", f"task #{task_id}", message))
        for task_id in Slot.objects.filter(pod__agent=agent, state=SlotState.RESERVED).values_list(
            "task_id", flat=True
        ):
            assert task_id is not None
            reason = f"agent {agent.agent_name} is offline since {stamp(agent.last_ping_at)}"
            if dry_run or _isolated(
                f"dropping the reservation of task #{task_id}",
                functools.partial(
                    task_reservation_drop, task_id=task_id, actor=actor, reason=reason
                ),
                ids=log_ids(task=task_id, pool=pool.pool_id, agent=agent.agent_id),
            ):
                result.reservations_dropped.append(task_id)
                changes.append(Change("reservation.drop", f"task #{task_id}", reason))
    # A task the agent stopped reporting before an outage of poolsadmin gets its grace again
    # from when poolsadmin could hear the agent's next heartbeat.
    unreported = WorkspaceTask.objects.filter(
        pool=pool, status=TaskStatus.RUNNING, unreported_since__lt=now - grace
    ).values_list("id", "agent_id", "unreported_since")
    if not liveness.judges(grace):
        unreported = unreported.none()
    for task_id, agent_id, since in unreported:
        message = (
            f"Agent {agent_id} stopped reporting task #{task_id} in its heartbeats "
            f"at {stamp(since)}; the task was lost."
        )
        if task_id in result.tasks_failed:
            continue
        if dry_run or _isolated(
            f"failing task #{task_id}",
            functools.partial(task_fail_lost, task_id=task_id, message=message, actor=actor),
            ids=log_ids(task=task_id, pool=pool.pool_id, agent=agent_id),
        ):
            result.tasks_failed.append(task_id)
            changes.append(Change("task.fail", f"task #{task_id}", message))
    expired = Slot.objects.filter(
        pod__pool=pool, state=SlotState.RESERVED, reserved_until__lt=now
    ).values_list("task_id", "reserved_until")
    for task_id, until in expired:
        assert task_id is not None
        if task_id in result.reservations_dropped:
            continue
        reason = f"reservation expired at {stamp(until)}"
        if dry_run or _isolated(
            f"expiring the reservation of task #{task_id}",
            functools.partial(
                task_reservation_drop,
                task_id=task_id,
                actor=actor,
                reason=reason,
                expired_only=True,
            ),
            ids=log_ids(task=task_id, pool=pool.pool_id),
        ):
            result.reservations_expired.append(task_id)
            changes.append(Change("reservation.expire", f"task #{task_id}", reason))
    return changes


def reconcile_pass(*, actor: str = RECONCILER) -> ReconcileResult:
    """1. agents without a heartbeat for the timeout go offline;
    2. tasks running on an agent offline past the grace period fail, naming the agent;
    3. tasks an agent stopped reporting in its heartbeats fail after the grace period;
    4. reservations on agents offline past the grace period are dropped (the task stays
       apply_pending; its apply will take a fresh slot and re-init);
    5. expired reservations are freed."""
    now = clock.now()
    liveness = liveness_read()
    result = ReconcileResult(
        agents_offline=agents_mark_offline(now=now, actor=actor, liveness=liveness)
    )
    for pool in AgentPool.objects.all():
        _ledger_steps(pool=pool, now=now, actor=actor, result=result, liveness=liveness)
    return result


# --- ledger check ------------------------------------------------------------------------------


def _drift_event(
    *,
    pool: AgentPool,
    kind: str,
    target_type: str,
    target_id: str,
    task_id: int | None,
    before: dict[str, object],
    reason: str,
    actor: str,
) -> None:
    event_record(
        actor=actor,
        kind=kind,
        target_type=target_type,
        target_id=target_id,
        pool_id=pool.pool_id,
        task_id=task_id,
        before=before,
        reason=reason,
    )


def ledger_check(
    *,
    pool: AgentPool,
    dry_run: bool = False,
    actor: str = RECONCILER,
    skip_pods: frozenset[str] = frozenset(),
) -> list[Change]:
    """1. every non-idle slot holds a live task in the status its state requires (running slot:
          task running; reserved slot: task apply_pending); a slot that does not is freed;
    2. every running task holds a slot (one at most: Slot.task is unique); a running task
       that holds none is failed, since nothing can ever finish it on an agent.
    `skip_pods`: pods a dry run of cluster sync already plans to release, so their slots are
    not listed twice.
    Each repair is re-checked under the task's row lock, so a task that moves on between the
    read and the repair is left alone, and is logged as a `drift.*` event."""
    changes: list[Change] = []
    busy = (
        Slot.objects.filter(pod__pool=pool)
        .exclude(state=SlotState.IDLE)
        .exclude(pod__name__in=skip_pods)
        .select_related("pod", "task")
        .order_by("pod__name", "index")
    )
    for slot in busy:
        assert slot.task is not None  # the slot_state_matches_task constraint
        expected = SLOT_TASK_STATUS[SlotState(slot.state)]
        if slot.task.status == expected:
            continue
        label = slot_label(slot)
        task_id = slot.task.pk
        reason = (
            f"slot {label} is {slot.state} for task #{task_id}, which is {slot.task.status} "
            f"(expected {expected}); the slot was freed"
        )
        if dry_run:
            changes.append(Change("drift.slot_mismatch", label, reason))
            continue
        with transaction.atomic():
            status = (
                WorkspaceTask.objects.select_for_update()
                .filter(pk=task_id)
                .values_list("status", flat=True)
                .first()
            )
            if status == expected:
                continue
            freed = slot_free_for_task(
                task_id=task_id,
                actor=actor,
                reason=reason,
                pool_id=pool.pool_id,
                only_state=slot.state,
            )
            if freed is None:
                continue
            _drift_event(
                pool=pool,
                kind="drift.slot_mismatch",
                target_type="slot",
                target_id=label,
                task_id=task_id,
                before={"state": slot.state, "task_id": task_id, "task_status": status},
                reason=reason,
                actor=actor,
            )
        changes.append(Change("drift.slot_mismatch", label, reason))

    slotless = WorkspaceTask.objects.filter(
        pool=pool, status=TaskStatus.RUNNING, slot__isnull=True
    ).values_list("id", "pod_name")
    for task_id, pod_name in slotless:
        message = (
            f"Task #{task_id} was running"
            + (f" on pod {pod_name}" if pod_name else "")
            + " but held no slot in the ledger (drift); it was failed."
        )
        if dry_run:
            changes.append(Change("drift.task_without_slot", f"task #{task_id}", message))
            continue
        with transaction.atomic():
            locked = WorkspaceTask.objects.select_for_update().filter(pk=task_id).first()
            if locked is None or locked.status != TaskStatus.RUNNING:
                continue
            if Slot.objects.filter(task_id=task_id).exists():
                continue
            if task_fail_lost(task_id=task_id, message=message, actor=actor) is None:
                continue
            _drift_event(
                pool=pool,
                kind="drift.task_without_slot",
                target_type="task",
                target_id=str(task_id),
                task_id=task_id,
                before={"status": TaskStatus.RUNNING, "pod": pod_name or None},
                reason=message,
                actor=actor,
            )
        changes.append(Change("drift.task_without_slot", f"task #{task_id}", message))
    return changes


# --- one pool, and the leader's pass over all pools --------------------------------------------


def reconcile_pool(
    *,
    pool: AgentPool,
    kube: KubeApi | None,
    dry_run: bool = False,
    actor: str = RECONCILER,
    liveness: Liveness | None = None,
    keep: Callable[[], None] = lambda: None,
) -> ReconcileReport:
    """One pass for one pool: the dashboard's "Reconcile now" (SPEC 5), and each pool of the
    leader's pass:
    1. agents without a heartbeat for the timeout go offline;
    2. cluster sync (k8s pools, when a client is given); a cluster error skips only this step;
    3. the ledger-side steps (lost agents' tasks and reservations, unreported tasks, expired
       reservations);
    4. the ledger check.
    A dry run returns the changes it would make and writes nothing.
    Silence is judged only as far as poolsadmin could hear (`liveness`, read now if not
    given): after an outage of poolsadmin nobody is taken offline, failed or deleted until
    agents have had their timeout and grace to be heard again (SPEC 5).
    `keep()` renews the caller's lease on the pool between steps (and before each change to
    the cluster); it raises LeaseLost if the lease expired and someone else took it."""
    now = clock.now()
    liveness = liveness or liveness_read()
    report = ReconcileReport(pool_id=pool.pool_id, dry_run=dry_run)
    if dry_run:
        stale = Agent.objects.filter(
            pool=pool,
            status__in=[AgentStatus.ONLINE, AgentStatus.DRAINING],
            last_ping_at__lt=now - pool.heartbeat_timeout,
        ).values_list("agent_name", "agent_id")
        if not liveness.judges(pool.heartbeat_timeout):
            stale = stale.none()
    else:
        offline = agents_mark_offline(now=now, actor=actor, only=pool, liveness=liveness)
        stale = Agent.objects.filter(agent_id__in=offline).values_list("agent_name", "agent_id")
    report.changes += [
        Change("agent.offline", f"{n} ({i})") for n, i in stale.order_by("agent_name")
    ]
    if pool.pool_type == PoolType.K8S and kube is not None:
        keep()
        try:
            report.changes += cluster_sync(
                pool=pool, kube=kube, dry_run=dry_run, actor=actor, liveness=liveness, keep=keep
            )
        except ClusterUnavailable as exc:
            # Retryable or not, nothing was changed for this pool's pods: the next pass
            # starts again from the list. Non-retryable errors are worth a human's look.
            log = logger.warning if exc.error.retryable else logger.error
            log(
                "cluster sync of %s skipped: %s",
                pool.pool_id,
                exc.error.message,
                extra=log_ids(pool=pool.pool_id),
            )
            report.cluster_error = exc.error.message
    result = ReconcileResult()
    keep()
    report.changes += _ledger_steps(
        pool=pool, now=now, actor=actor, result=result, liveness=liveness, dry_run=dry_run
    )
    removed = frozenset(c.target for c in report.changes if c.kind == "pod.remove")
    keep()
    report.changes += ledger_check(pool=pool, dry_run=dry_run, actor=actor, skip_pods=removed)
    if dry_run:
        report.changes = _first_per_task(report.changes)
    return report


def _first_per_task(changes: list[Change]) -> list[Change]:
    """A dry run changes nothing, so two steps may both plan to fail or free one task (a task
    on a vanished pod whose agent is also lost); the real pass does it once."""
    seen: set[str] = set()
    kept = []
    for change in changes:
        if change.target.startswith("task #"):
            if change.target in seen:
                continue
            seen.add(change.target)
        kept.append(change)
    return kept


# One pass over a pool at a time, whoever runs it (the leader, or a person's "Reconcile now"
# from any web process): a lease row per pool, renewed between the steps of the pass and before
# each change to the cluster, and released at its end. Its term outlasts the longest wait
# between two renewals (one Kubernetes call, at most KUBE_TIMEOUT_SECONDS), so a live pass
# keeps it, and a pass that died (leader killed mid-pass) holds the pool up for that long at
# most; less if it died on this host (worker/lease.py takes over a dead holder at once).
POOL_LEASE_MIN_TTL_SECONDS = 30.0


def pool_lease(pool_id: str) -> str:
    return f"reconcile:{pool_id}"


def pool_lease_ttl() -> float:
    return max(POOL_LEASE_MIN_TTL_SECONDS, 2 * settings.KUBE_CONFIG.timeout_seconds + 10)


def _pool_keeper(pool_id: str, holder: str) -> Callable[[], None]:
    return functools.partial(
        lease_keep, name=pool_lease(pool_id), holder=holder, ttl_seconds=pool_lease_ttl()
    )


def reconcile_pass_leader(
    *,
    holder: str,
    kube_factory: Callable[[AgentPool], KubeApi | None],
    ttl_seconds: float = LEASE_TTL_SECONDS,
) -> list[ReconcileReport] | None:
    """One reconcile pass over every pool, by the leader only. None when another worker holds
    the `reconciler` lease. `kube_factory(pool)` gives the client for a k8s pool (None: no
    cluster sync for it)."""
    if not lease_acquire_or_renew(name=RECONCILER_LEASE, holder=holder, ttl_seconds=ttl_seconds):
        return None
    # Wall time, not the ledger clock: tests move the ledger clock, and a duration is real.
    started = time.monotonic()
    reports = []
    for pool in AgentPool.objects.all():
        # Read per pool: an outage can begin or end in the middle of a pass.
        liveness = liveness_read()
        # A person's "Reconcile now" of this pool runs right now: skip it this pass, rather
        # than adopt or remove the same pods twice at once.
        if not lease_acquire_or_renew(
            name=pool_lease(pool.pool_id), holder=holder, ttl_seconds=pool_lease_ttl()
        ):
            continue
        try:
            kube = kube_factory(pool) if pool.pool_type == PoolType.K8S else None
            reports.append(
                reconcile_pool(
                    pool=pool,
                    kube=kube,
                    actor=RECONCILER,
                    liveness=liveness,
                    keep=_pool_keeper(pool.pool_id, holder),
                )
            )
        except Exception:
            # One broken pool must not stop the others; the next pass tries it again.
            logger.exception(
                "reconcile of %s failed", pool.pool_id, extra=log_ids(pool=pool.pool_id)
            )
        finally:
            lease_release(name=pool_lease(pool.pool_id), holder=holder)
    lease_record_pass(
        name=RECONCILER_LEASE,
        holder=holder,
        seconds=time.monotonic() - started,
        changes=sum(len(report.changes) for report in reports),
    )
    return reports


# --- "Reconcile now" from the dashboard --------------------------------------------------------

RECONCILED = "pool.reconciled"
NO_CLUSTER_CLIENT = "no Kubernetes client is configured (KUBE_*); cluster sync is skipped"


def _pool_kube(pool: AgentPool) -> tuple[KubeApi | None, str]:
    """The worker's client for the pool, and why cluster sync cannot run without one."""
    kube = kube_for_pool(pool)
    if pool.pool_type == PoolType.K8S and kube is None:
        return None, NO_CLUSTER_CLIENT
    return kube, ""


def pool_reconcile_preview(*, pool: AgentPool) -> ReconcileReport:
    """The dry run the "Reconcile now" confirm page shows: what a pass would change now. It
    reads the ledger and lists the cluster's pods; it writes nothing."""
    kube, missing = _pool_kube(pool)
    report = reconcile_pool(pool=pool, kube=kube, dry_run=True)
    report.cluster_error = report.cluster_error or missing
    return report


def pool_reconcile_now(*, pool_id: str, actor: str, reason: str) -> ReconcileReport:
    """The dashboard's "Reconcile now" (SPEC 5, 8): one pass for one pool, run by a person,
    with the worker's cluster client, then one `pool.reconciled` audit event naming who ran
    it, why and what it changed.

    Each change of the pass already writes its own event with `actor`, but a pass that finds
    nothing writes none, and the audit log must show every admin action. The event is written
    after the pass, not around it: the pass commits each repair on its own and talks to the
    API server between them, so one transaction around it would hold row locks across HTTP
    calls."""
    if not reason.strip():
        # It may fail tasks, drop reservations and delete pods: destructive (SPEC 8).
        raise InvalidInput("a reason is required to reconcile a pool now", field="reason")
    pool = AgentPool.objects.filter(pk=pool_id).first()
    if pool is None:
        raise NotFound(f"pool {pool_id} does not exist")
    holder = f"{actor} {lease_holder_id()}"
    if not lease_acquire_or_renew(
        name=pool_lease(pool.pk), holder=holder, ttl_seconds=pool_lease_ttl()
    ):
        raise Conflict(
            f"a reconcile pass of pool {pool.pk} is running right now; try again in a few seconds"
        )
    kube, missing = _pool_kube(pool)
    try:
        report = reconcile_pool(
            pool=pool, kube=kube, actor=actor, keep=_pool_keeper(pool.pk, holder)
        )
    except Exception as exc:
        # The repairs made before the failure are committed, each with its event; the audit
        # log still shows who ran the pass and that it failed.
        _record_reconcile(pool=pool, actor=actor, reason=reason, changes=[], error=repr(exc))
        raise
    finally:
        lease_release(name=pool_lease(pool.pk), holder=holder)
    report.cluster_error = report.cluster_error or missing
    _record_reconcile(
        pool=pool,
        actor=actor,
        reason=reason,
        changes=[str(change) for change in report.changes],
        error=report.cluster_error,
    )
    return report


def _record_reconcile(
    *, pool: AgentPool, actor: str, reason: str, changes: list[str], error: str
) -> None:
    with transaction.atomic():
        event_record(
            actor=actor,
            kind=RECONCILED,
            target_type="pool",
            target_id=pool.pk,
            pool_id=pool.pk,
            after={"changes": len(changes), "cluster_error": error},
            reason=reason,
            data={"changes": changes},
        )
        broadcast_pool_changed(pool_id=pool.pk, kind="pool", payload={"reconciled": len(changes)})
