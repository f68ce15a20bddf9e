"""Dispatch: pending task -> slot, written to the ledger before the agent hears of it.

Concurrency (SPEC 4, I-W4). Any number of scheduler processes may run `scheduler_pass` at once:
* the task row is claimed with `SELECT ... FOR UPDATE SKIP LOCKED` (PostgreSQL) and changed
  by a conditional update on its expected status, so a task is dispatched once;
* the workspace row is locked (blocking) so the workspace rules are checked against committed
  state: a plan cannot slip in while another transaction locks the workspace for an apply;
* the chosen pod row is locked (`SKIP LOCKED`: a busy pod is skipped, not waited for) before
  its slots are re-read, so the plan_and_apply-per-pod limit holds across schedulers; the slot
  itself moves idle -> running by a conditional update, and `Slot.task` is unique;
* on SQLite every transaction is IMMEDIATE, so writers are serialised by the database lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from poolsadmin.agents.liveness import liveness_read
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, NotFound
from poolsadmin.lib.humanize import stamp
from poolsadmin.pools.models import Pod, Slot, SlotState
from poolsadmin.pools.selectors import pool_capacity
from poolsadmin.pools.services import (
    slot_free_for_task,
    slot_reserve_for_task,
    slot_resume_reserved,
    slot_take,
)
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.scheduler.rules import (
    POOL_EXHAUSTED,
    Diagnosis,
    backoff_block,
    in_dispatch_order,
    placement_candidates,
    pool_block,
    workspace_block,
)
from poolsadmin.tasks.models import (
    QUEUED,
    Stage,
    TaskStatus,
    TaskType,
    Workspace,
    WorkspaceTask,
)

logger = logging.getLogger(__name__)

SCHEDULER = "system:scheduler"


class DispatchRefused(Conflict):
    """The task may not be dispatched at all (e.g. an unconfirmed apply), as opposed to
    "not now" (no capacity), which is an outcome with a diagnosis."""


@dataclass(frozen=True)
class DispatchOutcome:
    task_id: int
    dispatched: bool
    diagnosis: Diagnosis | None = None
    slot: str = ""
    reuse_workdir: bool = False
    contended: bool = False  # another scheduler holds the task row


class _Abort(Exception):
    def __init__(self, diagnosis: Diagnosis) -> None:
        self.diagnosis = diagnosis


def ack_timeout() -> timedelta:
    return timedelta(seconds=settings.POOLSADMIN_ACK_TIMEOUT_SECONDS)


def retry_delay(retry_count: int) -> timedelta:
    steps: tuple[int, ...] = tuple(settings.POOLSADMIN_RETRY_BACKOFF_SECONDS)
    return timedelta(seconds=steps[min(max(retry_count, 1), len(steps)) - 1])


def task_dispatch(*, task_id: int, actor: str = SCHEDULER) -> DispatchOutcome:
    """Dispatch one task if the rules and capacity allow, in one transaction.

    Raises DispatchRefused (and changes nothing) for a task that may never be dispatched in
    its state, such as an apply_pending task nobody confirmed (I-500).
    """
    try:
        with transaction.atomic():
            return _dispatch_locked(task_id=task_id, actor=actor)
    except _Abort as abort:
        return DispatchOutcome(task_id=task_id, dispatched=False, diagnosis=abort.diagnosis)


def _dispatch_locked(*, task_id: int, actor: str) -> DispatchOutcome:
    now = clock.now()
    task = (
        WorkspaceTask.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("pool")
        .filter(pk=task_id)
        .first()
    )
    if task is None:
        if not WorkspaceTask.objects.filter(pk=task_id).exists():
            raise NotFound(f"task {task_id} does not exist")
        return DispatchOutcome(task_id=task_id, dispatched=False, contended=True)

    if task.status == TaskStatus.PENDING:
        is_apply = False
    elif task.status == TaskStatus.APPLY_PENDING:
        if not task.apply_confirmed_by:
            raise DispatchRefused(
                f"task #{task_id} is apply_pending without a confirmation; "
                "an unconfirmed plan is never applied"
            )
        is_apply = True
    else:
        raise DispatchRefused(f"task #{task_id} is {task.status}; only waiting tasks dispatch")
    backoff = backoff_block(task=task, now=now)
    if backoff:
        raise _Abort(backoff)

    pool = task.pool
    blocked = pool_block(pool=pool, now=now)
    if blocked:
        raise _Abort(blocked)
    workspace = Workspace.objects.select_for_update().get(pk=task.workspace_id)
    blocked = workspace_block(task=task, workspace=workspace)
    if blocked:
        raise _Abort(blocked)

    own_slot = Slot.objects.filter(task_id=task.pk).first() if is_apply else None
    views = pool_capacity(pool=pool, now=now)
    candidates, diagnosis = placement_candidates(
        task=task, pool=pool, views=views, own_slot=own_slot, now=now
    )
    if diagnosis:
        raise _Abort(diagnosis)

    for view, reserved in candidates:
        if reserved is not None:
            slot = slot_resume_reserved(task_id=task.pk, actor=actor, pool_id=pool.pool_id)
            if slot is None:
                continue
            return _record_dispatch(task, view.pod, slot, reuse=True, actor=actor, now=now)
        # Lock the pod, then re-read its slots: the per-pod plan_and_apply count must be
        # checked against what other schedulers have committed, not against the snapshot.
        locked = Pod.objects.select_for_update(skip_locked=True).filter(pk=view.pod.pk).first()
        if locked is None:
            continue
        slots = list(Slot.objects.filter(pod_id=locked.pk).order_by("index"))
        if task.task_type == TaskType.PLAN_AND_APPLY:
            held = sum(
                1 for s in slots if s.state != SlotState.IDLE and s.task_type == "plan_and_apply"
            )
            if held >= pool.plan_and_apply_per_pod:
                continue
        for slot in slots:
            if slot.state != SlotState.IDLE:
                continue
            slot.pod = view.pod
            if slot_take(
                slot=slot,
                task_id=task.pk,
                task_type=task.task_type,
                actor=actor,
                pool_id=pool.pool_id,
            ):
                return _record_dispatch(task, view.pod, slot, reuse=False, actor=actor, now=now)
    # Every candidate was taken by a concurrent scheduler between snapshot and lock.
    raise _Abort(Diagnosis("no_free_slot", "Every free slot was taken by a concurrent dispatch."))


def _record_dispatch(
    task: WorkspaceTask, pod: Pod, slot: Slot, *, reuse: bool, actor: str, now: datetime
) -> DispatchOutcome:
    is_apply = task.status == TaskStatus.APPLY_PENDING
    changes: dict[str, Any] = {
        "status": TaskStatus.RUNNING,
        "stage": Stage.APPLYING if is_apply else Stage.PLANNING,
        "agent_id": pod.agent_id,
        "pod_id": pod.pk,
        "pod_name": pod.name,
        "slot_index": slot.index,
        "dispatched_at": now,
        "acked_at": None,
        "reuse_workdir": reuse,
        "unreported_since": None,
    }
    if is_apply:
        changes["apply_started_at"] = now
    else:
        changes.update(
            started_at=now,
            plan_agent_id=pod.agent_id or "",
            plan_pod_name=pod.name,
            plan_slot_index=slot.index,
        )
    before = {"status": task.status, "stage": task.stage}
    updated = WorkspaceTask.objects.filter(pk=task.pk, status=task.status).update(**changes)
    if updated != 1:
        # Unreachable while we hold the row lock; if it happens, roll back everything.
        raise Conflict(f"task #{task.pk} changed during dispatch")
    label = f"{pod.name}[{slot.index}]"
    event_record(
        actor=actor,
        kind="task.dispatched",
        target_type="task",
        target_id=task.pk,
        pool_id=task.pool_id,
        workspace_id=task.workspace_id,
        task_id=task.pk,
        before=before,
        after={
            "status": TaskStatus.RUNNING,
            "stage": changes["stage"],
            "agent_id": pod.agent_id,
            "pod": pod.name,
            "slot": slot.index,
        },
        data={"reuse_workdir": reuse, "action": "apply" if is_apply else "plan"},
    )
    broadcast_pool_changed(
        pool_id=task.pool_id, kind="task", payload={"task_id": task.pk, "status": "running"}
    )
    return DispatchOutcome(task_id=task.pk, dispatched=True, slot=label, reuse_workdir=reuse)


def task_dispatch_rollback(*, task_id: int, actor: str = SCHEDULER) -> bool:
    """A dispatch the agent did not acknowledge in time goes back to waiting (I-644, I-523):
    slot freed (or returned to the apply's reservation), retry count + 1, next attempt after
    the back-off. A confirmed apply keeps its confirmation."""
    now = clock.now()
    with transaction.atomic():
        task = (
            WorkspaceTask.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("pool")
            .filter(pk=task_id, status=TaskStatus.RUNNING, acked_at__isnull=True)
            .first()
        )
        if task is None or task.dispatched_at is None:
            return False
        if task.dispatched_at > now - ack_timeout():
            return False
        retry_count = task.retry_count + 1
        error = (
            f"agent {task.agent_id} did not acknowledge the dispatch to {task.pod_name}"
            f"[{task.slot_index}] within {settings.POOLSADMIN_ACK_TIMEOUT_SECONDS} s"
        )
        changes: dict[str, Any] = {
            "dispatched_at": None,
            "retry_count": retry_count,
            "next_attempt_at": now + retry_delay(retry_count),
            "last_dispatch_error": error,
            "reuse_workdir": False,
        }
        keep_reservation = False
        if task.is_applying:
            slot = Slot.objects.filter(task_id=task.pk).first()
            keep_reservation = bool(
                slot and slot.reserved_until is not None and slot.reserved_until > now
            )
            changes.update(status=TaskStatus.APPLY_PENDING, stage=Stage.APPLY_PENDING)
            changes["apply_started_at"] = None
        else:
            changes.update(
                status=TaskStatus.PENDING,
                stage=Stage.PENDING,
                started_at=None,
                plan_agent_id="",
                plan_pod_name="",
                plan_slot_index=None,
            )
        if keep_reservation and slot is not None:
            assert slot.reserved_until is not None
            slot_reserve_for_task(
                task_id=task.pk, until=slot.reserved_until, actor=actor, pool_id=task.pool_id
            )
        else:
            slot_free_for_task(task_id=task.pk, actor=actor, reason=error, pool_id=task.pool_id)
            changes.update(agent_id=None, pod_id=None, pod_name="", slot_index=None)
        before = {"status": task.status, "stage": task.stage, "agent_id": task.agent_id}
        updated = WorkspaceTask.objects.filter(
            pk=task.pk, status=TaskStatus.RUNNING, acked_at__isnull=True
        ).update(**changes)
        if updated != 1:
            raise Conflict(f"task #{task.pk} changed during rollback")
        event_record(
            actor=actor,
            kind="task.dispatch_expired",
            target_type="task",
            target_id=task.pk,
            pool_id=task.pool_id,
            workspace_id=task.workspace_id,
            task_id=task.pk,
            before=before,
            after={"status": changes["status"], "stage": changes["stage"]},
            reason=error,
            data={"retry_count": retry_count, "next_attempt_at": stamp(changes["next_attempt_at"])},
        )
        broadcast_pool_changed(
            pool_id=task.pool_id, kind="task", payload={"task_id": task.pk, "status": task.status}
        )
    return True


def task_dispatch_failed(*, task_id: int, error: Exception, actor: str = SCHEDULER) -> bool:
    """Record that dispatching a waiting task raised (its transaction was rolled back): retry
    count + 1, next attempt after the back-off, the error as the last dispatch error, an event.
    Conditional on the task still waiting; never raises (the pass goes on either way)."""
    now = clock.now()
    message = f"dispatch failed: {type(error).__name__}: {error}"[:2000]
    try:
        with transaction.atomic():
            task = WorkspaceTask.objects.select_for_update().filter(QUEUED, pk=task_id).first()
            if task is None:
                return False
            retry_count = task.retry_count + 1
            next_attempt = now + retry_delay(retry_count)
            WorkspaceTask.objects.filter(pk=task_id, status=task.status).update(
                retry_count=retry_count, next_attempt_at=next_attempt, last_dispatch_error=message
            )
            event_record(
                actor=actor,
                kind="task.dispatch_failed",
                target_type="task",
                target_id=task_id,
                pool_id=task.pool_id,
                workspace_id=task.workspace_id,
                task_id=task_id,
                reason=message,
                data={"retry_count": retry_count, "next_attempt_at": stamp(next_attempt)},
            )
    except Exception:
        logger.exception("recording the failed dispatch of task %s failed too", task_id)
        return False
    return True


@dataclass
class PassResult:
    dispatched: list[int] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)
    waiting: dict[int, Diagnosis] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return bool(self.dispatched or self.rolled_back)


def _waiting(now: datetime) -> Q:
    """Queued and due: retries wait for their `next_attempt_at`."""
    return QUEUED & (Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))


def dispatch_candidates(*, pool_id: str, now: datetime, limit: int) -> list[tuple[int, str, str]]:
    """A pool's waiting tasks in dispatch order (rules 4 and 7): confirmed applies first, then
    FIFO by creation, drift checks last."""
    rows = in_dispatch_order(WorkspaceTask.objects.filter(_waiting(now), pool_id=pool_id))
    return list(rows.values_list("id", "task_type", "status")[:limit])


def scheduler_pass(*, actor: str = SCHEDULER, limit_per_pool: int = 500) -> PassResult:
    """One pass: 1. roll back unacknowledged dispatches; 2. per pool with waiting work,
    dispatch as many waiting tasks as fit, in priority order.

    Pools are independent (their capacity is their own), so each is walked separately: a
    long queue in one pool never starves another. Once a pool has no free slot for anyone,
    its remaining pending tasks are not tried in this pass (confirmed applies still are: they
    may own a reserved slot, I-598)."""
    result = PassResult()
    now = clock.now()
    expired = list(
        WorkspaceTask.objects.filter(
            status=TaskStatus.RUNNING,
            acked_at__isnull=True,
            dispatched_at__lt=now - ack_timeout(),
        ).values_list("id", flat=True)
    )
    # An agent cannot acknowledge while poolsadmin cannot hear it: after an outage the ack
    # timeout counts from when it could again (agents/liveness.py). Read only when there is
    # something to roll back: the pass runs twice a second.
    if expired and not liveness_read().judges(ack_timeout()):
        expired = []
    for task_id in expired:
        try:
            if task_dispatch_rollback(task_id=task_id, actor=actor):
                result.rolled_back.append(task_id)
        except Exception:  # one broken task must not stop the pass for every other
            logger.exception("rolling back the dispatch of task %s failed", task_id)

    # order_by() clears the model's default ordering, which would make DISTINCT per row.
    pool_ids = (
        WorkspaceTask.objects.filter(_waiting(now))
        .order_by()
        .values_list("pool_id", flat=True)
        .distinct()
    )
    for pool_id in sorted(pool_ids):
        try:
            _pass_pool(pool_id=pool_id, now=now, limit=limit_per_pool, actor=actor, result=result)
        except Exception:  # one broken pool must not stop every pool sorting after it
            logger.exception("scheduler pass of pool %s failed", pool_id)
    if result.dispatched:
        logger.info("dispatched %s", result.dispatched)
    return result


def _pass_pool(*, pool_id: str, now: datetime, limit: int, actor: str, result: PassResult) -> None:
    exhausted = False
    no_plan_and_apply_room = False
    for task_id, task_type, status in dispatch_candidates(pool_id=pool_id, now=now, limit=limit):
        if status == TaskStatus.PENDING:
            if exhausted:
                continue
            if task_type == TaskType.PLAN_AND_APPLY and no_plan_and_apply_room:
                continue
        try:
            outcome = task_dispatch(task_id=task_id, actor=actor)
        except (DispatchRefused, NotFound) as exc:  # changed under us since the listing
            logger.debug("not dispatching task %s: %s", task_id, exc)
            continue
        except Exception as exc:
            # A bad row (say, a name no column can hold) fails this task's dispatch, not the
            # pass: the dispatch was rolled back; the task waits out a back-off, and its
            # diagnosis says why.
            logger.exception("dispatching task %s failed", task_id)
            task_dispatch_failed(task_id=task_id, error=exc, actor=actor)
            continue
        if outcome.dispatched:
            result.dispatched.append(task_id)
            continue
        if outcome.diagnosis is None:
            continue
        result.waiting[task_id] = outcome.diagnosis
        code = outcome.diagnosis.code
        if code in {"pool_paused", "pool_frozen"}:
            return
        if code in POOL_EXHAUSTED and status == TaskStatus.PENDING:
            exhausted = True
        elif code == "plan_and_apply_capacity":
            no_plan_and_apply_room = True
