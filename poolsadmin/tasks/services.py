"""Task and workspace writes: every transition of SPEC 3 is a function here.

Each one locks the task row, checks the transition, applies it as a conditional update
(`WHERE status = <expected>`, so of two writers only one can win), frees or keeps the slot
keyed by task, and writes events, all in one transaction. Terminal states are sticky.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Q

from poolsadmin.agents.models import Agent
from poolsadmin.agents.nudge import agents_nudge
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, Forbidden, InvalidInput, NotFound
from poolsadmin.lib.humanize import stamp
from poolsadmin.lib.ids import WORKSPACE_ID_RE, random_id
from poolsadmin.lib.wake import wake
from poolsadmin.pools.models import AgentPool, PoolAllowedWorkspace, SlotState
from poolsadmin.pools.services import slot_free_for_task, slot_reserve_for_task
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import (
    TERMINAL_STATUSES,
    ExecutionMode,
    Stage,
    TaskStatus,
    TaskType,
    Workspace,
    WorkspaceTask,
)

SYSTEM = "system"


def _snapshot(task: WorkspaceTask) -> dict[str, Any]:
    return {
        "status": task.status,
        "stage": task.stage,
        "agent_id": task.agent_id,
        "pod": task.pod_name or None,
        "slot": task.slot_index,
    }


def _locked_task(task_id: int) -> WorkspaceTask:
    task = (
        WorkspaceTask.objects.select_for_update(of=("self",))
        .select_related("workspace", "pool")
        .filter(pk=task_id)
        .first()
    )
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    return task


def _transition(
    task: WorkspaceTask,
    *,
    expected: str,
    actor: str,
    kind: str,
    reason: str = "",
    data: dict[str, Any] | None = None,
    **changes: Any,
) -> WorkspaceTask:
    """Apply `changes` only if the task is still in `expected`; record the event."""
    before = _snapshot(task)
    updated = WorkspaceTask.objects.filter(pk=task.pk, status=expected).update(**changes)
    if updated != 1:
        current = WorkspaceTask.objects.filter(pk=task.pk).values_list("status", flat=True).first()
        raise Conflict(f"task #{task.pk} is {current}, not {expected}; nothing changed")
    for name, value in changes.items():
        setattr(task, name, value)
    event_record(
        actor=actor,
        kind=kind,
        target_type="task",
        target_id=task.pk,
        pool_id=task.pool_id,
        workspace_id=task.workspace_id,
        task_id=task.pk,
        before=before,
        after=_snapshot(task),
        reason=reason,
        data=data,
    )
    broadcast_pool_changed(
        pool_id=task.pool_id, kind="task", payload={"task_id": task.pk, "status": task.status}
    )
    return task


def _refuse_terminal(task: WorkspaceTask) -> None:
    if task.status in TERMINAL_STATUSES:
        raise Conflict(f"task #{task.pk} is {task.status}, a terminal state; nothing changed")


# --- workspaces --------------------------------------------------------------------------------


def workspace_create(
    *,
    name: str,
    pool: AgentPool | None,
    actor: str,
    workspace_id: str | None = None,
    execution_mode: str = ExecutionMode.AGENT,
) -> Workspace:
    if not name.strip() or len(name.strip()) > 200:
        raise InvalidInput("name is required (at most 200 characters)", field="name")
    if workspace_id is not None and not WORKSPACE_ID_RE.match(workspace_id):
        raise InvalidInput("workspace_id must be 'ws-' and 6-32 of [a-z0-9]", field="workspace_id")
    if execution_mode not in ExecutionMode.values:
        raise InvalidInput(
            f"execution_mode must be one of {ExecutionMode.values}", field="execution_mode"
        )
    now = clock.now()
    with transaction.atomic():
        workspace_id = workspace_id or random_id("ws-", 10)
        if Workspace.objects.filter(pk=workspace_id).exists():
            raise Conflict(f"workspace {workspace_id} already exists", field="workspace_id")
        workspace = Workspace.objects.create(
            workspace_id=workspace_id,
            name=name.strip(),
            execution_mode=execution_mode,
            current_pool=pool,
            created_at=now,
        )
        if pool is not None:
            PoolAllowedWorkspace.objects.create(pool=pool, workspace=workspace, created_at=now)
        event_record(
            actor=actor,
            kind="workspace.created",
            target_type="workspace",
            target_id=workspace.workspace_id,
            pool_id=pool.pool_id if pool else "",
            workspace_id=workspace.workspace_id,
            after={"name": workspace.name, "pool_id": pool.pool_id if pool else None},
        )
    return workspace


def _workspace_lock_for_apply(*, task: WorkspaceTask) -> None:
    now = clock.now()
    Workspace.objects.filter(pk=task.workspace_id).update(
        is_locked=True,
        locked_by=SYSTEM,
        locked_at=now,
        lock_reason=f"Locked for apply (task #{task.pk})",
        lock_task_id=task.pk,
    )
    event_record(
        actor=SYSTEM,
        kind="workspace.locked",
        target_type="workspace",
        target_id=task.workspace_id,
        pool_id=task.pool_id,
        workspace_id=task.workspace_id,
        task_id=task.pk,
        after={"is_locked": True, "lock_reason": f"Locked for apply (task #{task.pk})"},
    )


def _workspace_release_apply_lock(*, task: WorkspaceTask, actor: str, why: str) -> None:
    """Release the lock only if this task still owns it."""
    released = Workspace.objects.filter(
        pk=task.workspace_id, is_locked=True, lock_task_id=task.pk
    ).update(is_locked=False, locked_by="", locked_at=None, lock_reason="", lock_task=None)
    if released:
        event_record(
            actor=actor,
            kind="workspace.unlocked",
            target_type="workspace",
            target_id=task.workspace_id,
            pool_id=task.pool_id,
            workspace_id=task.workspace_id,
            task_id=task.pk,
            before={"is_locked": True},
            after={"is_locked": False},
            reason=why,
        )


def _workspace_keep_lock_after_partial_apply(*, task: WorkspaceTask, what: str) -> None:
    reason = (
        f"Apply of task #{task.pk} {what} while applying; state may be partial. "
        "Review the workspace, then unlock it from the dashboard."
    )
    kept = Workspace.objects.filter(
        pk=task.workspace_id, is_locked=True, lock_task_id=task.pk
    ).update(lock_reason=reason)
    if not kept:  # an admin already unlocked it: nothing is kept, nothing to record
        return
    event_record(
        actor=SYSTEM,
        kind="workspace.lock_kept",
        target_type="workspace",
        target_id=task.workspace_id,
        pool_id=task.pool_id,
        workspace_id=task.workspace_id,
        task_id=task.pk,
        reason=reason,
    )


def workspace_unlock(*, workspace_id: str, actor: str, reason: str) -> Workspace:
    if not reason.strip():
        raise InvalidInput("a reason is required to unlock a workspace", field="reason")
    with transaction.atomic():
        workspace = Workspace.objects.select_for_update().filter(pk=workspace_id).first()
        if workspace is None:
            raise NotFound(f"workspace {workspace_id} does not exist")
        if not workspace.is_locked:
            raise Conflict(f"workspace {workspace_id} is not locked")
        before = {"is_locked": True, "lock_reason": workspace.lock_reason}
        Workspace.objects.filter(pk=workspace_id, is_locked=True).update(
            is_locked=False, locked_by="", locked_at=None, lock_reason="", lock_task=None
        )
        event_record(
            actor=actor,
            kind="workspace.unlocked",
            target_type="workspace",
            target_id=workspace_id,
            pool_id=workspace.current_pool_id or "",
            workspace_id=workspace_id,
            before=before,
            after={"is_locked": False},
            reason=reason,
        )
        workspace.refresh_from_db()
    return workspace


# --- submission, confirmation, cancellation (users) -------------------------------------------


def task_submit(
    *, workspace: Workspace, task_type: str, actor: str, description: str = ""
) -> WorkspaceTask:
    if task_type not in TaskType.values:
        raise InvalidInput(f"task_type must be one of {TaskType.values}", field="task_type")
    pool = workspace.current_pool
    if pool is None:
        raise Conflict(f"workspace {workspace.workspace_id} has no pool", field="workspace_id")
    allowed = PoolAllowedWorkspace.objects.filter(
        pool=pool, workspace=workspace, status=PoolAllowedWorkspace.Status.ACTIVE
    ).exists()
    if not allowed:
        raise Forbidden(f"workspace {workspace.workspace_id} may not use pool {pool.pool_id}")
    with transaction.atomic():
        task = WorkspaceTask.objects.create(
            workspace=workspace,
            pool=pool,
            task_type=task_type,
            status=TaskStatus.PENDING,
            stage=Stage.PENDING,
            created_at=clock.now(),
            created_by=actor,
            description=description,
        )
        event_record(
            actor=actor,
            kind="task.submitted",
            target_type="task",
            target_id=task.pk,
            pool_id=pool.pool_id,
            workspace_id=workspace.workspace_id,
            task_id=task.pk,
            after=_snapshot(task),
        )
        broadcast_pool_changed(
            pool_id=pool.pool_id, kind="task", payload={"task_id": task.pk, "status": task.status}
        )
        wake()  # the scheduler dispatches it now, not at its next poll
    return task


def task_confirm_apply(*, task_id: int, actor: str, description: str = "") -> WorkspaceTask:
    """apply_pending -> apply_pending + confirmation. The scheduler does the rest (I-523)."""
    with transaction.atomic():
        task = _locked_task(task_id)
        _refuse_terminal(task)
        if task.status != TaskStatus.APPLY_PENDING:
            raise Conflict(f"task #{task_id} is {task.status}; only apply_pending can be confirmed")
        if task.apply_confirmed_by:
            raise Conflict(
                f"task #{task_id} was already confirmed by {task.apply_confirmed_by} "
                f"at {stamp(task.apply_confirmed_at)}"
            )
        wake()  # the apply is dispatchable: the scheduler sends it now (I-523)
        return _transition(
            task,
            expected=TaskStatus.APPLY_PENDING,
            actor=actor,
            kind="task.apply_confirmed",
            reason=description,
            apply_confirmed_by=actor,
            apply_confirmed_at=clock.now(),
            apply_description=description,
            next_attempt_at=None,
        )


def task_cancel(*, task_id: int, actor: str, reason: str, force: bool = False) -> WorkspaceTask:
    """pending | apply_pending | running -> cancelled, with a reason (SPEC 8: destructive
    actions need one).

    The agent running it hears of it in its next heartbeat answer (at once if that heartbeat
    waits): it still reports the task, which the ledger no longer assigns to it (I-510).
    Cancelling an apply that is applying needs `force`, and then keeps the workspace lock:
    the apply may have changed things.
    """
    if not reason.strip():
        raise InvalidInput("a reason is required to cancel a task", field="reason")
    with transaction.atomic():
        task = _locked_task(task_id)
        _refuse_terminal(task)
        # Only an apply the agent acknowledged may have changed anything; an unacknowledged
        # apply dispatch is cancelled like a waiting one.
        applying = task.apply_started
        if applying and not force:
            raise Conflict(
                f"task #{task_id} is applying; cancelling it may leave partial state. "
                "Repeat with force to cancel anyway."
            )
        message = f"Cancelled by {actor}: {reason}"
        # The agent that runs it hears the cancel now if its heartbeat waits (agents/nudge.py).
        agents_nudge(agent_ids=[task.agent_id])
        task = _transition(
            task,
            expected=task.status,
            actor=actor,
            kind="task.cancelled",
            reason=reason,
            data={"force": force},
            status=TaskStatus.CANCELLED,
            stage=Stage.COMPLETED,
            completed_at=clock.now(),
            error_message=message,
        )
        slot_free_for_task(
            task_id=task.pk, actor=actor, reason=f"task #{task.pk} cancelled", pool_id=task.pool_id
        )
        if applying:
            _workspace_keep_lock_after_partial_apply(task=task, what="was force-cancelled")
        else:
            _workspace_release_apply_lock(task=task, actor=actor, why=f"task #{task.pk} cancelled")
    return task


# --- agent reports -----------------------------------------------------------------------------

AGENT_STATUSES = {
    TaskStatus.RUNNING,
    TaskStatus.SUCCESS,
    TaskStatus.PLANNED_AND_FINISHED,
    TaskStatus.APPLY_PENDING,
    TaskStatus.APPLIED,
    TaskStatus.FAILED,
}


def _check_agent_owns(task: WorkspaceTask, agent: Agent) -> None:
    _refuse_terminal(task)
    if task.agent_id is not None and task.agent_id != agent.agent_id:
        raise Forbidden(f"task #{task.pk} is assigned to another agent, not {agent.agent_id}")
    if task.agent_id is None:
        raise Conflict(
            f"task #{task.pk} is {task.status} and assigned to no agent "
            "(its dispatch was rolled back or it has not been dispatched)"
        )


def task_accept(*, task_id: int, agent: Agent) -> WorkspaceTask:
    """The agent acknowledges a dispatch. Idempotent for the same agent."""
    with transaction.atomic():
        task = _locked_task(task_id)
        _check_agent_owns(task, agent)
        if task.status != TaskStatus.RUNNING:
            raise Conflict(f"task #{task_id} is {task.status}; only a dispatched task is accepted")
        if task.acked_at is not None:
            return task
        return _transition(
            task,
            expected=TaskStatus.RUNNING,
            actor=f"agent:{agent.agent_id}",
            kind="task.accepted",
            acked_at=clock.now(),
            retry_count=0,
            next_attempt_at=None,
            last_dispatch_error="",
        )


def task_report(
    *,
    task_id: int,
    agent: Agent,
    status: str,
    stage: str = "",
    error_message: str = "",
) -> WorkspaceTask:
    """An agent reports progress or an outcome (PUT /agents/tasks/<id>/status)."""
    if status not in AGENT_STATUSES:
        raise InvalidInput(f"status must be one of {sorted(AGENT_STATUSES)}", field="status")
    if len(stage) > 64:
        raise InvalidInput("stage is longer than 64 characters", field="stage")
    actor = f"agent:{agent.agent_id}"
    now = clock.now()
    with transaction.atomic():
        task = _locked_task(task_id)
        _check_agent_owns(task, agent)
        if task.status != TaskStatus.RUNNING:
            raise Conflict(
                f"task #{task_id} is {task.status}; an agent can only report on a running task"
            )
        applying = task.is_applying
        common: dict[str, Any] = {"expected": TaskStatus.RUNNING, "actor": actor}
        ack: dict[str, Any] = {} if task.acked_at else {"acked_at": now, "retry_count": 0}

        if status == TaskStatus.RUNNING:
            if not stage:
                raise InvalidInput("stage is required with status running", field="stage")
            phase = Stage.APPLYING if task.is_applying else Stage.PLANNING
            if stage in Stage.values and stage != phase:
                # The lifecycle stages are the ledger's to set; an agent reports progress
                # within them (e.g. "initializing"), not a jump from planning to applying.
                raise Conflict(f"stage {stage!r} is set by the scheduler, not by an agent")
            return _transition(task, kind="task.stage", stage=stage, **common, **ack)

        if status == TaskStatus.FAILED:
            message = error_message or "agent reported failure"
            task = _transition(
                task,
                kind="task.failed",
                reason=message,
                status=TaskStatus.FAILED,
                stage=Stage.COMPLETED,
                completed_at=now,
                error_message=message,
                **common,
            )
            slot_free_for_task(
                task_id=task.pk, actor=actor, reason=f"task #{task.pk} failed", pool_id=task.pool_id
            )
            if applying:
                _workspace_keep_lock_after_partial_apply(task=task, what="failed")
            else:
                _workspace_release_apply_lock(task=task, actor=actor, why="plan failed")
            return task

        if status == TaskStatus.APPLIED:
            if not applying:
                raise Conflict(f"task #{task_id} is planning, not applying; cannot be applied")
            task = _transition(
                task,
                kind="task.applied",
                status=TaskStatus.APPLIED,
                stage=Stage.COMPLETED,
                completed_at=now,
                **common,
            )
            slot_free_for_task(
                task_id=task.pk, actor=actor, reason="apply finished", pool_id=task.pool_id
            )
            _workspace_release_apply_lock(task=task, actor=actor, why="apply finished")
            return task

        # The remaining outcomes end a plan.
        if applying:
            raise Conflict(f"task #{task_id} is applying; it can end as applied or failed")
        if status == TaskStatus.SUCCESS:
            if task.task_type == TaskType.PLAN_AND_APPLY:
                raise Conflict(
                    "a plan_and_apply plan ends as planned_and_finished or apply_pending"
                )
            task = _transition(
                task,
                kind="task.succeeded",
                status=TaskStatus.SUCCESS,
                stage=Stage.COMPLETED,
                completed_at=now,
                planned_at=now,
                **common,
            )
            slot_free_for_task(
                task_id=task.pk, actor=actor, reason="plan finished", pool_id=task.pool_id
            )
            return task

        if task.task_type != TaskType.PLAN_AND_APPLY:
            raise Conflict(f"a {task.task_type} task ends as success or failed, not {status}")
        if status == TaskStatus.PLANNED_AND_FINISHED:
            task = _transition(
                task,
                kind="task.planned_no_changes",
                status=TaskStatus.PLANNED_AND_FINISHED,
                stage=Stage.COMPLETED,
                completed_at=now,
                planned_at=now,
                **common,
            )
            slot_free_for_task(
                task_id=task.pk, actor=actor, reason="plan found no changes", pool_id=task.pool_id
            )
            return task

        # apply_pending: keep the slot for the apply (reserved), lock the workspace.
        task = _transition(
            task,
            kind="task.apply_pending",
            status=TaskStatus.APPLY_PENDING,
            stage=Stage.APPLY_PENDING,
            planned_at=now,
            unreported_since=None,
            **common,
            **ack,
        )
        slot_reserve_for_task(
            task_id=task.pk,
            until=now + task.pool.reservation_ttl,
            actor=actor,
            pool_id=task.pool_id,
        )
        _workspace_lock_for_apply(task=task)
        return task


# --- system (reconciler) -----------------------------------------------------------------------


def task_fail_lost(*, task_id: int, message: str, actor: str) -> WorkspaceTask | None:
    """running -> failed because its agent, pod or heartbeat report was lost past the grace
    period. Returns None if the task is no longer running (someone else won)."""
    with transaction.atomic():
        task = _locked_task(task_id)
        if task.status != TaskStatus.RUNNING:
            return None
        applying = task.apply_started
        task = _transition(
            task,
            expected=TaskStatus.RUNNING,
            actor=actor,
            kind="task.lost",
            reason=message,
            status=TaskStatus.FAILED,
            stage=Stage.COMPLETED,
            completed_at=clock.now(),
            error_message=message,
        )
        slot_free_for_task(task_id=task.pk, actor=actor, reason=message, pool_id=task.pool_id)
        if applying:
            _workspace_keep_lock_after_partial_apply(task=task, what="was lost")
        else:
            _workspace_release_apply_lock(task=task, actor=actor, why=message)
    return task


def task_reservation_drop(
    *, task_id: int, actor: str, reason: str, expired_only: bool = False
) -> bool:
    """Drop the reservation of an apply_pending task: the slot is freed, the task stays
    apply_pending, and its apply will take a fresh slot and re-init."""
    with transaction.atomic():
        task = _locked_task(task_id)
        if task.status != TaskStatus.APPLY_PENDING:
            return False
        if expired_only:
            slot = task.slot if hasattr(task, "slot") else None
            if slot is None or slot.reserved_until is None or slot.reserved_until > clock.now():
                return False
        freed = slot_free_for_task(
            task_id=task.pk,
            actor=actor,
            reason=reason,
            pool_id=task.pool_id,
            only_state=SlotState.RESERVED,
        )
        if freed is None:
            return False
        _transition(
            task,
            expected=TaskStatus.APPLY_PENDING,
            actor=actor,
            kind="task.reservation_lost",
            reason=reason,
            agent=None,
            pod=None,
            slot_index=None,
            pod_name="",
        )
    return True


def tasks_waiting_filter() -> Q:
    return Q(status__in=[TaskStatus.PENDING, TaskStatus.APPLY_PENDING]) | Q(
        status=TaskStatus.RUNNING, acked_at__isnull=True
    )
