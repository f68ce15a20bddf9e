"""Why is this task waiting? (SPEC 9)

`task_diagnose` computes a code and a sentence that names the blocker from the ledger, with
the very rule functions the scheduler dispatches by. `diagnosis_record_all` keeps the history:
one row per change of (code, blocker).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction

from poolsadmin.agents.liveness import Liveness, liveness_read
from poolsadmin.agents.models import Agent
from poolsadmin.autoscaler.models import ScaleAction, ScaleDecision
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import duration, stamp
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool, PodPhase, PoolType, Slot, SlotState
from poolsadmin.pools.selectors import PodView, SlotRow, pool_capacity_rows
from poolsadmin.scheduler.rules import (
    Diagnosis,
    backoff_block,
    placement_candidates,
    pool_block,
    serial_heads,
    workspace_block,
)
from poolsadmin.scheduler.services import ack_timeout
from poolsadmin.tasks.models import (
    TERMINAL_STATUSES,
    TaskStatus,
    WaitReason,
    WorkspaceTask,
)
from poolsadmin.tasks.services import tasks_waiting_filter

logger = logging.getLogger(__name__)

# Rows (`pool_capacity_rows`) or, from the pool page that read them already, model views.
CapacityCache = dict[str, list[PodView]]
DecisionCache = dict[str, ScaleDecision | None]
# Where a task without a reservation of its own would go, or why nowhere, by (pool, type):
# within one diagnosis pass the answer is the same for every such task of a pool and type,
# so a pass of 2,000 waiting tasks asks the rules once per shape, not once per task over
# every pod of the pool (issue 9: that was seconds per pass at 1,250 pods).
Placed = tuple[list[tuple[PodView, Slot | SlotRow | None]], Diagnosis | None]
PlacementCache = dict[tuple[str, str], Placed]


def held_slots(tasks: Iterable[WorkspaceTask]) -> dict[int, Slot]:
    """The slot each apply_pending task of `tasks` holds (its reservation), with its pod, by
    task id: `task_diagnose`'s `own_slots`. One query for any number of tasks, none when
    none is apply_pending."""
    ids = [t.pk for t in tasks if t.status == TaskStatus.APPLY_PENDING]
    if not ids:
        return {}
    held = Slot.objects.select_related("pod").filter(task_id__in=ids)
    return {s.task_id: s for s in held if s.task_id is not None}


def planner_names(
    tasks: Iterable[WorkspaceTask], *, known: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Agent id -> name of the agents that planned `tasks` (an unconfirmed apply's diagnosis
    names its planner), with `known` (names already read: not read again): `task_diagnose`'s
    `agent_names`. One query at most."""
    names = dict(known or {})
    missing = {t.plan_agent_id for t in tasks if t.plan_agent_id} - names.keys()
    if missing:
        names.update(Agent.objects.filter(pk__in=missing).values_list("agent_id", "agent_name"))
    return names


def _capacity(pool: AgentPool, now: datetime, cache: CapacityCache | None) -> list[PodView]:
    if cache is None:
        return pool_capacity_rows(pool=pool, now=now)
    if pool.pool_id not in cache:
        cache[pool.pool_id] = pool_capacity_rows(pool=pool, now=now)
    return cache[pool.pool_id]


def _latest_decision(pool: AgentPool, cache: DecisionCache | None) -> ScaleDecision | None:
    if cache is None:
        return ScaleDecision.objects.filter(pool=pool).order_by("-at", "-id").first()
    if pool.pool_id not in cache:
        cache[pool.pool_id] = ScaleDecision.objects.filter(pool=pool).order_by("-at", "-id").first()
    return cache[pool.pool_id]


def _scale_up_in_progress(decision: ScaleDecision, views: list[PodView]) -> str:
    """Pods the latest decision created that are not adopted or not running yet."""
    by_name = {v.pod.name: v for v in views}
    waiting = []
    for name in decision.created_pods or []:
        view = by_name.get(name)
        if view is None:
            waiting.append(f"{name} (not adopted yet)")
        elif view.pod.phase != PodPhase.RUNNING:
            waiting.append(f"{name} ({view.pod.phase})")
        elif view.agent is None:
            waiting.append(f"{name} (no agent registered yet)")
    if not waiting:
        return ""
    return (
        f" Scale-up in progress: {', '.join(waiting[:10])} created at {stamp(decision.at)}, "
        "not running yet."
    )


def autoscaler_words(
    *, pool: AgentPool, views: list[PodView], decision: ScaleDecision | None
) -> str:
    """What the autoscaler last decided for a k8s pool, read from its stored decision (never
    recomputed): the pods it asked for and why, or why scale-up is blocked."""
    if decision is None:
        return " The autoscaler has made no decision for this pool yet."
    if decision.action == ScaleAction.BLOCKED:
        return (
            f" Scale-up is blocked since {stamp(decision.at)} ({decision.actual} of "
            f"{decision.desired} pods): {decision.reason}."
        )
    text = (
        f" The autoscaler asked for {decision.desired} pods at {stamp(decision.at)} "
        f"({decision.reason})."
    )
    if decision.desired <= decision.actual and decision.actual >= decision.max:
        text += f" Scale-up is blocked: the pool is at max replicas {decision.max}."
    return text + _scale_up_in_progress(decision, views)


def _liveness_words(*, now: datetime, liveness: Liveness | None, allowance: timedelta) -> str:
    """ " Liveness checks are waiting out ..." while an outage of poolsadmin keeps agents'
    silence from being judged (agents/liveness.py), else ""."""
    liveness = liveness or liveness_read()
    words = liveness.words(allowance=allowance)
    return f" {words}" if words else ""


def _placed(
    *,
    task: WorkspaceTask,
    own_slot: Slot | None,
    now: datetime,
    cache: CapacityCache | None,
    decisions: DecisionCache | None,
    liveness: Liveness | None,
) -> Placed:
    """The rules' placement of `task` on its pool's snapshot, with the autoscaler's and the
    liveness checks' words added to a diagnosis about pods or agents."""
    views = _capacity(task.pool, now, cache)
    candidates, blocked = placement_candidates(
        task=task, pool=task.pool, views=views, own_slot=own_slot, now=now
    )
    if (
        blocked is not None
        and own_slot is None  # an apply waiting for its own reserved slot needs no new pod
        and blocked.code in {"no_pods", "no_online_agents"}
        and task.pool.pool_type == PoolType.K8S
    ):
        words = autoscaler_words(
            pool=task.pool, views=views, decision=_latest_decision(task.pool, decisions)
        )
        blocked = Diagnosis(blocked.code, blocked.text + words, blocker=blocked.blocker)
    if blocked is not None and blocked.code == "no_online_agents":
        # Agents offline because nobody could hear them: say so, and that nothing is
        # failed for it (their heartbeats are what is missing, not the agents).
        outage = _liveness_words(now=now, liveness=liveness, allowance=task.pool.heartbeat_timeout)
        blocked = Diagnosis(blocked.code, blocked.text + outage, blocker=blocked.blocker)
    return candidates, blocked


def task_diagnose(
    *,
    task: WorkspaceTask,
    now: datetime | None = None,
    cache: CapacityCache | None = None,
    decisions: DecisionCache | None = None,
    liveness: Liveness | None = None,
    heads: dict[str, WorkspaceTask] | None = None,
    agent_names: dict[str, str] | None = None,
    own_slots: dict[int, Slot] | None = None,
    placements: PlacementCache | None = None,
) -> Diagnosis:
    """Why `task` waits, or what it does. The caches, `heads` (rule 2's, `serial_heads`),
    `agent_names` (agent id -> name), `own_slots` (`held_slots`) and
    `placements` are for a caller that diagnoses many tasks at one instant: each is then
    read or worked out once, not once per task."""
    now = now or clock.now()
    if task.status in TERMINAL_STATUSES:
        return Diagnosis("finished", f"Task #{task.pk} is {task.status}.")
    if task.status == TaskStatus.RUNNING:
        where = f"{task.pod_name}[{task.slot_index}]"
        if task.acked_at is None:
            assert task.dispatched_at is not None
            outage = _liveness_words(now=now, liveness=liveness, allowance=ack_timeout())
            return Diagnosis(
                "dispatched",
                f"Sent to agent {task.agent_id} ({where}) at {stamp(task.dispatched_at)}, "
                "waiting for its acknowledgement (rolled back at "
                f"{stamp(task.dispatched_at + ack_timeout())} if none comes).{outage}",
                blocker=f"agent:{task.agent_id}",
            )
        return Diagnosis(
            "running",
            f"Running ({task.stage}) on agent {task.agent_id} in {where} since "
            f"{stamp(task.apply_started_at or task.started_at)}.",
        )

    own_slot: Slot | None = None
    if task.status == TaskStatus.APPLY_PENDING:
        if own_slots is not None:
            own_slot = own_slots.get(task.pk)
        else:
            own_slot = Slot.objects.select_related("pod").filter(task_id=task.pk).first()
    lost = task.status == TaskStatus.APPLY_PENDING and own_slot is None and bool(task.plan_pod_name)
    lost_text = (
        f"The reserved slot {task.plan_pod_name}[{task.plan_slot_index}] of this apply is "
        "gone; the apply will take a fresh slot, re-init and restore the stored plan."
    )

    if task.status == TaskStatus.APPLY_PENDING and not task.apply_confirmed_by:
        if lost:
            return Diagnosis(
                "reservation_lost",
                lost_text + " It is also still waiting for someone to confirm the apply.",
                blocker=f"task:{task.pk}",
            )
        base = workspace_block(
            task=task, workspace=task.workspace, heads=heads, agent_names=agent_names
        )
        assert base is not None
        if own_slot is not None and own_slot.state == SlotState.RESERVED:
            until = own_slot.reserved_until
            left = f", for {duration(until - now)} more" if until else ""
            return Diagnosis(
                base.code,
                f"{base.text} Its slot {own_slot.pod.name}[{own_slot.index}] stays reserved "
                f"for it{left}: once confirmed, the apply runs there and reuses the plan's "
                "working directory.",
                blocker=base.blocker,
            )
        return base

    backoff = backoff_block(task=task, now=now)
    if backoff:
        return backoff
    blocked = pool_block(pool=task.pool, now=now) or workspace_block(
        task=task, workspace=task.workspace, heads=heads, agent_names=agent_names
    )
    if blocked is None:
        shape = (task.pool_id, task.task_type)
        if own_slot is None and placements is not None and shape in placements:
            candidates, blocked = placements[shape]
        else:
            candidates, blocked = _placed(
                task=task,
                own_slot=own_slot,
                now=now,
                cache=cache,
                decisions=decisions,
                liveness=liveness,
            )
            if own_slot is None and placements is not None:
                placements[shape] = (candidates, blocked)
        if blocked is None:
            view, reserved = candidates[0]
            if reserved is not None:
                return Diagnosis(
                    "dispatchable",
                    f"Confirmed; the next scheduler pass sends the apply to its own reserved "
                    f"slot {view.pod.name}[{reserved.index}], reusing the plan's working "
                    "directory.",
                )
            if lost:
                return Diagnosis("reservation_lost", lost_text, blocker=f"task:{task.pk}")
            return Diagnosis(
                "dispatchable",
                f"The next scheduler pass places it on {view.pod.name} "
                f"({len(view.idle_slots)} free slots).",
            )
    if lost:
        return Diagnosis(blocked.code, f"{blocked.text} {lost_text}", blocker=blocked.blocker)
    return blocked


def task_wait_history(*, task: WorkspaceTask) -> list[WaitReason]:
    return list(WaitReason.objects.filter(task=task).order_by("id"))


def diagnosis_record(
    *,
    task: WorkspaceTask,
    diagnosis: Diagnosis,
    now: datetime,
    open_rows: dict[int, WaitReason] | None = None,
) -> bool:
    """Open a new history row if (code, blocker) changed; close the previous one.
    `open_rows`: the open row of each task, read for many tasks at once (`_open_rows`)."""
    if open_rows is None:
        current = (
            WaitReason.objects.filter(task=task, ended_at__isnull=True).order_by("-id").first()
        )
    else:
        current = open_rows.get(task.pk)
    if current and current.code == diagnosis.code and current.blocker == diagnosis.blocker:
        return False
    try:
        with transaction.atomic():
            if current:
                closed = WaitReason.objects.filter(pk=current.pk, ended_at__isnull=True).update(
                    ended_at=now
                )
                if not closed:
                    return False  # another diagnosis loop got here first
            if diagnosis.code not in {"running", "finished"}:
                WaitReason.objects.create(
                    task=task,
                    code=diagnosis.code,
                    text=diagnosis.text,
                    blocker=diagnosis.blocker,
                    started_at=now,
                )
    except IntegrityError:
        return False  # another loop opened the row for this change; one row is enough
    return True


def _open_rows(tasks: list[WorkspaceTask]) -> dict[int, WaitReason]:
    """The open history row of each task (the latest, should there be two), in one query."""
    rows = WaitReason.objects.filter(task__in=[t.pk for t in tasks], ended_at__isnull=True)
    return {row.task_id: row for row in rows.order_by("id")}


def diagnosis_record_all(*, limit: int = 2000) -> int:
    """One pass of the diagnosis loop: 1. diagnose every waiting task and record changes;
    2. close the open history rows of tasks that stopped waiting. Returns rows changed.

    Its cost follows the changes, not the tasks times the pods (issue 9): each pool is read
    once (with its freeze windows), the open history rows in one query, each (pool, task
    type) placed once (`PlacementCache`); a task whose diagnosis did not change costs no
    query of its own."""
    now = clock.now()
    cache: CapacityCache = {}
    decisions: DecisionCache = {}
    placements: PlacementCache = {}
    liveness = liveness_read()
    changed = 0
    waiting = list(
        WorkspaceTask.objects.filter(tasks_waiting_filter())
        .select_related("workspace")
        .order_by("id")[:limit]
    )
    pools = AgentPool.objects.prefetch_related("freeze_windows").in_bulk(
        list({t.pool_id for t in waiting})
    )
    for task in waiting:
        task.pool = pools[task.pool_id]
    heads = serial_heads(tasks=waiting)
    own_slots = held_slots(waiting)
    agent_names = planner_names(waiting)
    open_rows = _open_rows(waiting)
    for task in waiting:
        try:
            diagnosis = task_diagnose(
                task=task,
                now=now,
                cache=cache,
                decisions=decisions,
                liveness=liveness,
                heads=heads,
                agent_names=agent_names,
                own_slots=own_slots,
                placements=placements,
            )
            if diagnosis_record(task=task, diagnosis=diagnosis, now=now, open_rows=open_rows):
                changed += 1
        except Exception:  # one broken task must not leave every other undiagnosed
            logger.exception(
                "diagnosing task %s failed", task.pk, extra=log_ids(task=task.pk, pool=task.pool_id)
            )
    stale = WaitReason.objects.filter(ended_at__isnull=True).exclude(
        task__in=WorkspaceTask.objects.filter(tasks_waiting_filter())
    )
    changed += stale.update(ended_at=now)
    return changed
