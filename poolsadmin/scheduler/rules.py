"""The scheduler's rules, as functions the scheduler, the diagnosis and (later) the autoscaler
share, so the three can never disagree about why a task does or does not run.

Nothing here writes. `placement_candidates` is pure: it works on a capacity snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Case, IntegerField, QuerySet, Value, When

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.lib.humanize import duration, stamp
from poolsadmin.pools.models import AgentPool, PodPhase, PoolStatus, PoolType, Slot, SlotState
from poolsadmin.pools.selectors import PodView, SlotRow, pool_freeze_state
from poolsadmin.tasks.models import TaskStatus, TaskType, Workspace, WorkspaceTask


@dataclass(frozen=True)
class Diagnosis:
    code: str
    text: str
    blocker: str = ""


# Codes that mean "the pool has no idle slot for anyone": later tasks of the pool need not try.
POOL_EXHAUSTED = frozenset({"no_pods", "no_online_agents", "no_free_slot"})


def in_dispatch_order(tasks: QuerySet[WorkspaceTask]) -> QuerySet[WorkspaceTask]:
    """Rules 4 and 7: confirmed applies first, then FIFO by creation, drift checks last. The
    scheduler dispatches in this order and the queue panel shows it."""
    return tasks.annotate(
        dispatch_priority=Case(
            When(status=TaskStatus.APPLY_PENDING, then=Value(0)),
            When(task_type=TaskType.DRIFT_CHECK, then=Value(2)),
            default=Value(1),
            output_field=IntegerField(),
        )
    ).order_by("dispatch_priority", "created_at", "id")


def pool_block(*, pool: AgentPool, now: datetime) -> Diagnosis | None:
    """Rule 6: a paused or frozen pool dispatches nothing new."""
    if pool.status == PoolStatus.PAUSED:
        until = f" until {stamp(pool.paused_until)}" if pool.paused_until else ""
        why = f": {pool.paused_reason}" if pool.paused_reason else ""
        return Diagnosis(
            "pool_paused",
            f"Pool {pool.name} is paused{until} by {pool.paused_by or 'an admin'}{why}.",
            blocker=pool.pool_id,
        )
    freeze = pool_freeze_state(pool=pool, now=now)
    if freeze.frozen and freeze.window is not None:
        return Diagnosis(
            "pool_frozen",
            f"Pool {pool.name} is inside the change freeze "
            f"'{freeze.window.name or 'freeze window'}' until {stamp(freeze.until)} "
            f"({pool.freeze_timezone} {freeze.window.start:%H:%M}-{freeze.window.end:%H:%M}).",
            blocker=pool.pool_id,
        )
    return None


def backoff_block(*, task: WorkspaceTask, now: datetime) -> Diagnosis | None:
    """Retries are rows: a task waits until `next_attempt_at` after unacknowledged dispatches."""
    if task.next_attempt_at is None or task.next_attempt_at <= now:
        return None
    return Diagnosis(
        "retry_backoff",
        f"Next attempt at {stamp(task.next_attempt_at)} after {task.retry_count} failed "
        f"dispatches (last error: {task.last_dispatch_error or 'no acknowledgement'}).",
        blocker=f"task:{task.pk}",
    )


def _since(task: WorkspaceTask) -> datetime | None:
    if task.status == TaskStatus.APPLY_PENDING:
        return task.planned_at
    if task.status == TaskStatus.RUNNING:
        return task.started_at
    return task.created_at


OPEN_STATUSES = (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.APPLY_PENDING)


def _waits_for_rule_2(task: WorkspaceTask) -> bool:
    return task.task_type == TaskType.PLAN_AND_APPLY and task.status == TaskStatus.PENDING


def serial_heads(*, tasks: Iterable[WorkspaceTask]) -> dict[str, WorkspaceTask]:
    """Rule 2's reference for `tasks`: the earliest plan_and_apply that is pending, running or
    apply_pending of each workspace where one of them is a pending plan_and_apply (the only
    tasks rule 2 asks about). One query for any number of tasks (a scheduler batch, a
    diagnosis pass), none when no task is a pending plan_and_apply."""
    workspace_ids = {task.workspace_id for task in tasks if _waits_for_rule_2(task)}
    if not workspace_ids:
        return {}
    heads: dict[str, WorkspaceTask] = {}
    rows = WorkspaceTask.objects.filter(
        workspace_id__in=list(workspace_ids),
        task_type=TaskType.PLAN_AND_APPLY,
        status__in=OPEN_STATUSES,
    ).only("id", "workspace_id", "status", "created_at", "planned_at", "started_at")
    for task in rows.order_by("workspace_id", "id"):
        heads.setdefault(task.workspace_id, task)
    return heads


def workspace_block(
    *,
    task: WorkspaceTask,
    workspace: Workspace,
    heads: dict[str, WorkspaceTask] | None = None,
    agent_names: dict[str, str] | None = None,
) -> Diagnosis | None:
    """Rules 1, 2 and 5 for one task of one workspace. `heads` is `serial_heads` of tasks that
    include this one, and `agent_names` names agents by id (the planner of an unconfirmed
    apply), when the caller read them for many tasks at once."""
    if task.status == TaskStatus.APPLY_PENDING and not task.apply_confirmed_by:
        # Rule 5: no path may apply an unconfirmed plan.
        if agent_names is not None and task.plan_agent_id in agent_names:
            planner = agent_names[task.plan_agent_id]
        else:
            planner = (
                Agent.objects.filter(pk=task.plan_agent_id)
                .values_list("agent_name", flat=True)
                .first()
                or task.plan_agent_id
                or "?"
            )
        return Diagnosis(
            "awaiting_confirmation",
            f"Planned at {stamp(task.planned_at)} by agent {planner}; "
            "waiting for someone to confirm the apply.",
            blocker=f"task:{task.pk}",
        )
    if _waits_for_rule_2(task):
        # Rule 2: plan_and_apply tasks of one workspace are strictly serial: a pending one
        # waits while an earlier one of its workspace is open.
        if heads is None:
            heads = serial_heads(tasks=[task])
        earlier = heads.get(workspace.pk)
        if earlier is not None and earlier.pk < task.pk:
            return Diagnosis(
                "blocked_by_task",
                f"plan_and_apply #{earlier.pk} of this workspace is {earlier.status} "
                f"since {stamp(_since(earlier))}; plan_and_apply tasks of a workspace run "
                "one at a time.",
                blocker=f"task:{earlier.pk}",
            )
    if workspace.is_locked and task.task_type != TaskType.PLAN:
        owns_lock = workspace.lock_task_id == task.pk and task.status == TaskStatus.APPLY_PENDING
        if not owns_lock:
            # Rule 1: a locked workspace runs nothing but the apply that owns the lock.
            # Speculative `plan` tasks are the exception (rule 3, I-523): they only read
            # state, so they stay independent of plan_and_apply and of its apply lock.
            owner = f"; owning task #{workspace.lock_task_id}" if workspace.lock_task_id else ""
            reason = workspace.lock_reason.rstrip(". ")
            return Diagnosis(
                "workspace_locked",
                f"Workspace {workspace.name} is locked by {workspace.locked_by} since "
                f"{stamp(workspace.locked_at)} ({reason}{owner}).",
                blocker=f"workspace:{workspace.pk}",
            )
    return None


def _slot_owner(slot: Slot | SlotRow, now: datetime) -> str:
    return f"#{slot.task_id} ({duration(now - (slot.since or now))})"


def _can_resume_while_draining(view: PodView, pool: AgentPool, now: datetime) -> bool:
    return (
        view.pod.phase == PodPhase.RUNNING
        and view.agent is not None
        and view.agent.last_ping_at is not None
        and view.agent.status in (AgentStatus.ONLINE, AgentStatus.DRAINING)
        and view.agent.last_ping_at > now - pool.heartbeat_timeout
    )


def pod_blocker_words(view: PodView) -> str:
    """Why one pod of a k8s pool cannot take work, naming the pod (SPEC 9 `no_online_agents`):
    "pod X is Pending", "pod X: no agent registered yet", "pod X: agent A offline since T"."""
    pod, agent = view.pod, view.agent
    if pod.phase != PodPhase.RUNNING or pod.cordoned:
        return view.unavailable_reason
    if agent is None:
        return f"pod {pod.name}: no agent registered yet"
    if agent.status != AgentStatus.DRAINING and view.unavailable_reason.startswith("agent "):
        since = stamp(agent.last_ping_at) if agent.last_ping_at else "never seen"
        return f"pod {pod.name}: agent {agent.agent_name} offline since {since}"
    return f"pod {pod.name}: {view.unavailable_reason}"


def placement_candidates(
    *,
    task: WorkspaceTask,
    pool: AgentPool,
    views: list[PodView],
    own_slot: Slot | SlotRow | None,
    now: datetime,
) -> tuple[list[tuple[PodView, Slot | SlotRow | None]], Diagnosis | None]:
    """Where the task may go, best first, or why nowhere.

    Each candidate is (pod view, own reserved slot or None for "any idle slot of this pod").
    * a confirmed apply reuses its own reserved slot when it still exists (I-598);
    * plan and drift_check: any idle slot of an eligible pod;
    * plan_and_apply (new, or an apply whose reservation was lost): only a pod that holds
      fewer than `plan_and_apply_per_pod` plan_and_apply tasks, running and reserved;
    * among eligible pods the busiest first, ties to the oldest (`pool_capacity_rows` order).
    """
    if own_slot is not None and own_slot.state == SlotState.RESERVED:
        view = next((v for v in views if v.pod.pk == own_slot.pod_id), None)
        label = f"{view.pod.name}[{own_slot.index}]" if view else f"slot {own_slot.pk}"
        # Draining means "take no new work": the reserved apply is the pod's current work,
        # so its owner may still resume there as long as the pod runs and its agent is online.
        if view is not None and (view.eligible or _can_resume_while_draining(view, pool, now)):
            return [(view, own_slot)], None
        reason = view.unavailable_reason if view else "its pod is gone"
        return [], Diagnosis(
            "no_online_agents",
            f"The apply waits for its reserved slot {label}: {reason}.",
            blocker=view.pod.name if view else "",
        )
    if not views:
        return [], Diagnosis(
            "no_pods",
            f"Pool {pool.name} has no pods"
            + (" (no agent has registered)." if pool.pool_type == PoolType.STATIC else "."),
            blocker=pool.pool_id,
        )
    eligible = [v for v in views if v.eligible]
    if not eligible:
        if pool.pool_type == PoolType.K8S:
            reasons = "; ".join(pod_blocker_words(v) for v in views[:10])
        else:
            reasons = "; ".join(v.unavailable_reason for v in views[:10])
        more = f" and {len(views) - 10} more" if len(views) > 10 else ""
        return [], Diagnosis(
            "no_online_agents",
            f"No pod of pool {pool.name} can take work: {reasons}{more}.",
            blocker=",".join(v.pod.name for v in views[:10]),
        )
    with_idle = [v for v in eligible if v.idle_slots]
    if not with_idle:
        busy = [s for v in eligible for s in v.slots]
        running = [s for s in busy if s.state == SlotState.RUNNING]
        reserved = [s for s in busy if s.state == SlotState.RESERVED]
        text = f"All {len(busy)} slots of the online pods are busy, {len(running)} running"
        if reserved:
            owners = ", ".join(_slot_owner(s, now) for s in reserved[:5])
            text += f", {len(reserved)} reserved by {owners}"
        return [], Diagnosis("no_free_slot", text + ".", blocker=pool.pool_id)
    if task.task_type == TaskType.PLAN_AND_APPLY:
        fitting = [
            v for v in with_idle if len(v.plan_and_apply_slots) < pool.plan_and_apply_per_pod
        ]
        if not fitting:
            holders = ", ".join(
                f"{v.pod.name}: " + ", ".join(_slot_owner(s, now) for s in v.plan_and_apply_slots)
                for v in with_idle[:5]
            )
            first = with_idle[0].plan_and_apply_slots[0].task_id
            if pool.pool_type == PoolType.K8S:
                advice = (
                    f"at max replicas {pool.max_replicas}: raise max or resolve #{first}"
                    if len(views) >= pool.max_replicas
                    else "waiting for the autoscaler to add a pod"
                )
            else:
                advice = f"add an agent or resolve #{first}"
            return [], Diagnosis(
                "plan_and_apply_capacity",
                f"Every pod with a free slot already holds {pool.plan_and_apply_per_pod} "
                f"plan_and_apply ({holders}); {advice}.",
                blocker=f"task:{first}",
            )
        with_idle = fitting
    return [(v, None) for v in with_idle], None
