"""Dispatch: pending task -> slot, written to the ledger before the agent hears of it.

A pass works in batches, one per pool (issue 9): read the pool's capacity once, place its
waiting tasks against it in memory with the rule functions (placement.py, rules.py), then
claim every placement in the same transaction. Queries per dispatch stay constant whatever
the size of the pool.

Concurrency (SPEC 4, I-W4). Any number of scheduler processes may run `scheduler_pass` at once:
* a batch holds its pool's row (`pool_claim`: `FOR NO KEY UPDATE`, `SKIP LOCKED` in a pass)
  from the snapshot to the commit, so nobody else places tasks into the pool's slots or
  retires one of its pods meanwhile; another scheduler takes another pool instead;
* each task row is locked (`FOR UPDATE SKIP LOCKED`) and changed by a conditional update on
  its expected status, so a task is dispatched once;
* the workspace rows are locked (blocking, in key order) and rule 1 checked again on them: a
  task cannot slip in while another transaction locks its workspace for an apply;
* each slot moves idle -> running by a conditional update (idle and empty), and `Slot.task`
  is unique: a slot never holds two tasks, even if the snapshot were wrong;
* on SQLite every transaction is IMMEDIATE, so writers are serialised by the database lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import Q

from poolsadmin.agents.liveness import liveness_read
from poolsadmin.agents.nudge import agents_nudge
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record, events_write
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, NotFound
from poolsadmin.lib.humanize import stamp
from poolsadmin.lib.logs import log_ids
from poolsadmin.lib.rowsets import rowset_param, rowset_sql
from poolsadmin.pools.models import AgentPool, Slot
from poolsadmin.pools.selectors import pool_capacity_rows
from poolsadmin.pools.services import (
    SlotClaim,
    pool_claim,
    slot_free_for_task,
    slot_reserve_for_task,
    slot_resume_reserved,
    slots_take,
)
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.scheduler.placement import Placement, PoolSnapshot
from poolsadmin.scheduler.rules import (
    POOL_EXHAUSTED,
    Diagnosis,
    backoff_block,
    in_dispatch_order,
    pool_block,
    serial_heads,
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
    pod: str = ""
    agent_id: str = ""


def ack_timeout() -> timedelta:
    return timedelta(seconds=settings.POOLSADMIN_ACK_TIMEOUT_SECONDS)


def retry_delay(retry_count: int) -> timedelta:
    steps: tuple[int, ...] = tuple(settings.POOLSADMIN_RETRY_BACKOFF_SECONDS)
    return timedelta(seconds=steps[min(max(retry_count, 1), len(steps)) - 1])


def _refusal(task: WorkspaceTask) -> DispatchRefused | None:
    """Rule 5 and the state machine: only pending tasks and confirmed applies dispatch."""
    if task.status == TaskStatus.PENDING:
        return None
    if task.status == TaskStatus.APPLY_PENDING:
        if task.apply_confirmed_by:
            return None
        return DispatchRefused(
            f"task #{task.pk} is apply_pending without a confirmation; "
            "an unconfirmed plan is never applied"
        )
    return DispatchRefused(f"task #{task.pk} is {task.status}; only waiting tasks dispatch")


def task_dispatch(*, task_id: int, actor: str = SCHEDULER) -> DispatchOutcome:
    """Dispatch one task if the rules and capacity allow, in one transaction: a batch of one
    (`_dispatch_batch`), after waiting for a scheduler that holds the pool to finish.

    Raises DispatchRefused (and changes nothing) for a task that may never be dispatched in
    its state, such as an apply_pending task nobody confirmed (I-500).
    """
    now = clock.now()
    with transaction.atomic():
        task = WorkspaceTask.objects.select_related("pool").filter(pk=task_id).first()
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        refusal = _refusal(task)
        if refusal is not None:
            raise refusal
        backoff = backoff_block(task=task, now=now)
        if backoff:
            return DispatchOutcome(task_id=task_id, dispatched=False, diagnosis=backoff)
        pool = pool_claim(pool_id=task.pool_id, wait=True)
        assert pool is not None  # the task's foreign key keeps its pool
        outcomes = _dispatch_batch(pool=pool, tasks=[task], now=now, actor=actor)
    return outcomes[0]


def _dispatch_batch(
    *, pool: AgentPool, tasks: list[WorkspaceTask], now: datetime, actor: str
) -> list[DispatchOutcome]:
    """Place `tasks` (waiting tasks of `pool`, in dispatch order) and claim the placements, in
    the caller's transaction, which holds the pool row (`pool_claim`). One outcome per task
    tried; once the pool has no room for a kind of task, later tasks of that kind are skipped
    (confirmed applies are still tried: they may own a reserved slot, I-598).

    Cost: a constant number of queries for the batch, whatever the number of tasks and pods:
    pool state, workspaces, rule 2's heads, the capacity snapshot, the row locks, one
    statement for the slots and one for the tasks (a confirmed apply's own reservation is one
    more each), the events."""
    blocked = pool_block(pool=pool, now=now)
    if blocked:
        return [DispatchOutcome(task_id=tasks[0].pk, dispatched=False, diagnosis=blocked)]
    workspaces = Workspace.objects.in_bulk(list({t.workspace_id for t in tasks}))
    heads = serial_heads(tasks=tasks)
    snapshot = PoolSnapshot(pool=pool, views=pool_capacity_rows(pool=pool, now=now), now=now)

    outcomes: list[DispatchOutcome] = []
    placements: list[Placement] = []
    exhausted = no_plan_and_apply_room = False
    for task in tasks:
        if task.status == TaskStatus.PENDING and (
            exhausted or (task.task_type == TaskType.PLAN_AND_APPLY and no_plan_and_apply_room)
        ):
            continue
        placed = workspace_block(
            task=task, workspace=workspaces[task.workspace_id], heads=heads
        ) or snapshot.place(task)
        if isinstance(placed, Placement):
            placements.append(placed)
            continue
        outcomes.append(DispatchOutcome(task_id=task.pk, dispatched=False, diagnosis=placed))
        if placed.code in POOL_EXHAUSTED and task.status == TaskStatus.PENDING:
            exhausted = True
        elif placed.code == "plan_and_apply_capacity":
            no_plan_and_apply_room = True
    if placements:
        outcomes.extend(_claim(placements=placements, heads=heads, actor=actor, now=now))
        # On commit: the agents' heartbeats that wait for work answer now (agents/nudge.py).
        agents_nudge(agent_ids=[o.agent_id for o in outcomes if o.dispatched])
    return outcomes


def _claim(
    *, placements: list[Placement], heads: dict[str, WorkspaceTask], actor: str, now: datetime
) -> list[DispatchOutcome]:
    """Write the placements, each only where the ledger still agrees with the snapshot:

    1. lock the tasks (`SKIP LOCKED`: one that another transaction holds, say a cancel, waits
       for the next pass) and keep those still in the status they were placed in;
    2. lock their workspaces (blocking, in key order: batches of other pools lock them in the
       same order) and check rule 1 again on the committed rows: a workspace locked for an
       apply since it was read runs nothing new;
    3. the slots' conditional updates (idle -> running where still idle and empty, in one
       statement; a confirmed apply's own reservation -> running); a slot lost to a race
       leaves its task waiting for the next pass;
    4. the tasks' conditional update on their expected status, in one statement;
    5. the batch's events in one INSERT, and one realtime publish for the pool."""
    task_ids = [p.task.pk for p in placements]
    statuses = dict(
        WorkspaceTask.objects.select_for_update(skip_locked=True)
        .filter(pk__in=task_ids)
        .values_list("id", "status")
    )
    outcomes = [
        DispatchOutcome(task_id=p.task.pk, dispatched=False, contended=True)
        for p in placements
        if statuses.get(p.task.pk) != p.task.status
    ]
    still = [p for p in placements if statuses.get(p.task.pk) == p.task.status]
    locked = Workspace.objects.select_for_update(no_key=True).filter(
        pk__in={p.task.workspace_id for p in still}
    )
    workspaces = {w.pk: w for w in locked.order_by("pk")}
    pool_id = placements[0].task.pool_id
    events: list[Event] = []
    allowed: list[Placement] = []
    for placement in still:
        task = placement.task
        blocked = workspace_block(task=task, workspace=workspaces[task.workspace_id], heads=heads)
        if blocked:
            outcomes.append(DispatchOutcome(task_id=task.pk, dispatched=False, diagnosis=blocked))
        else:
            allowed.append(placement)
    won = {
        claim.task_id
        for claim in slots_take(
            claims=[
                SlotClaim(slot=p.slot, task_id=p.task.pk, task_type=p.task.task_type)
                for p in allowed
                if not p.reuse
            ],
            actor=actor,
            pool_id=pool_id,
            batch=events,
        )
    }
    for placement in allowed:
        if placement.reuse and slot_resume_reserved(
            task_id=placement.task.pk,
            actor=actor,
            pool_id=pool_id,
            slot=placement.slot,
            batch=events,
        ):
            won.add(placement.task.pk)
    taken = [p for p in allowed if p.task.pk in won]
    outcomes.extend(
        DispatchOutcome(task_id=p.task.pk, dispatched=False, contended=True)
        for p in allowed
        if p.task.pk not in won
    )
    _tasks_running(taken, now=now)
    for placement in taken:
        outcomes.append(_dispatch_recorded(placement, actor=actor, batch=events))
    events_write(events)
    dispatched = [p.task.pk for p in taken]
    if dispatched:
        broadcast_pool_changed(pool_id=pool_id, kind="task", payload={"dispatched": dispatched})
    return outcomes


# The dispatch's task update, for a batch in one statement: running, on the pod and slot it
# was placed on, written before the agent hears of it (I-644). An apply keeps the plan's
# fields; a plan starts now and records where it planned. Each row only from the status it
# was placed in (the batch holds the row locks, so all of them change or none). The rows
# travel as one JSON parameter (lib/rowsets.py), not nine parameters per task.
TASKS_RUNNING_COLUMNS = (
    ("id", "bigint"),
    ("expected", "text"),
    ("stage", "text"),
    ("agent", "text"),
    ("pod", "bigint"),
    ("pod_name", "text"),
    ("slot", "integer"),
    ("reuse", "boolean"),
    ("apply", "boolean"),
)
TASKS_RUNNING_SQL = """
UPDATE workspace_tasks SET
    status = 'running',
    stage = v.stage,
    agent_id = v.agent,
    pod_id = v.pod,
    pod_name = v.pod_name,
    slot_index = v.slot,
    dispatched_at = %s,
    acked_at = NULL,
    reuse_workdir = v.reuse,
    unreported_since = NULL,
    apply_started_at = CASE WHEN v.apply THEN %s ELSE apply_started_at END,
    started_at = CASE WHEN v.apply THEN started_at ELSE %s END,
    plan_agent_id = CASE WHEN v.apply THEN plan_agent_id ELSE v.agent END,
    plan_pod_name = CASE WHEN v.apply THEN plan_pod_name ELSE v.pod_name END,
    plan_slot_index = CASE WHEN v.apply THEN plan_slot_index ELSE v.slot END
FROM {rows}
WHERE workspace_tasks.id = v.id AND workspace_tasks.status = v.expected
RETURNING workspace_tasks.id
"""


def _tasks_running(placements: list[Placement], *, now: datetime) -> None:
    if not placements:
        return
    rows = []
    for p in placements:
        is_apply = p.task.status == TaskStatus.APPLY_PENDING
        rows.append(
            (
                p.task.pk,
                p.task.status,
                Stage.APPLYING if is_apply else Stage.PLANNING,
                p.view.pod.agent_id,
                p.view.pod.pk,
                p.view.pod.name,
                p.slot.index,
                p.reuse,
                is_apply,
            )
        )
    sql = TASKS_RUNNING_SQL.format(rows=rowset_sql(TASKS_RUNNING_COLUMNS))
    connection = transaction.get_connection()
    at = connection.ops.adapt_datetimefield_value(now)  # as the ORM writes a time
    with connection.cursor() as cursor:
        cursor.execute(sql, [at, at, at, rowset_param(TASKS_RUNNING_COLUMNS, rows)])
        updated = len(cursor.fetchall())
    if updated != len(placements):
        # Unreachable while the batch holds the row locks; if it happens, roll back the batch.
        raise Conflict(f"{len(placements) - updated} tasks changed during their dispatch")


def _dispatch_recorded(placement: Placement, *, actor: str, batch: list[Event]) -> DispatchOutcome:
    task, pod, slot, reuse = placement.task, placement.view.pod, placement.slot, placement.reuse
    is_apply = task.status == TaskStatus.APPLY_PENDING
    event_record(
        actor=actor,
        kind="task.dispatched",
        target_type="task",
        target_id=task.pk,
        pool_id=task.pool_id,
        workspace_id=task.workspace_id,
        task_id=task.pk,
        before={"status": task.status, "stage": task.stage},
        after={
            "status": TaskStatus.RUNNING,
            "stage": Stage.APPLYING if is_apply else Stage.PLANNING,
            "agent_id": pod.agent_id,
            "pod": pod.name,
            "slot": slot.index,
        },
        data={"reuse_workdir": reuse, "action": "apply" if is_apply else "plan"},
        batch=batch,
    )
    return DispatchOutcome(
        task_id=task.pk,
        dispatched=True,
        slot=f"{pod.name}[{slot.index}]",
        reuse_workdir=reuse,
        pod=pod.name,
        agent_id=pod.agent_id or "",
    )


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
        logger.exception(
            "recording the failed dispatch of task %s failed too",
            task_id,
            extra=log_ids(task=task_id),
        )
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


def dispatch_candidates(*, pool_id: str, now: datetime, limit: int) -> list[WorkspaceTask]:
    """A pool's waiting tasks in dispatch order (rules 4 and 7): confirmed applies first, then
    FIFO by creation, drift checks last."""
    rows = in_dispatch_order(WorkspaceTask.objects.filter(_waiting(now), pool_id=pool_id))
    return list(rows[:limit])


def scheduler_pass(*, actor: str = SCHEDULER, limit_per_pool: int = 500) -> PassResult:
    """One pass: 1. roll back unacknowledged dispatches; 2. per pool with waiting work that no
    other scheduler holds, dispatch a batch of its waiting tasks, as many as fit, in priority
    order, in one transaction.

    Pools are independent (their capacity is their own), so each is walked separately: a
    long queue in one pool never starves another, and several scheduler processes take
    different pools (`pool_claim`, SKIP LOCKED) rather than queue on the same rows. Once a
    pool has no free slot for anyone, its remaining pending tasks are not tried in this pass
    (confirmed applies still are: they may own a reserved slot, I-598)."""
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
            logger.exception(
                "rolling back the dispatch of task %s failed", task_id, extra=log_ids(task=task_id)
            )

    # order_by() clears the model's default ordering, which would make DISTINCT per row.
    pool_ids = (
        WorkspaceTask.objects.filter(_waiting(now))
        .order_by()
        .values_list("pool_id", flat=True)
        .distinct()
    )
    for pool_id in sorted(pool_ids):
        try:
            outcomes = _pass_pool(pool_id=pool_id, now=now, limit=limit_per_pool, actor=actor)
        except Exception:  # one broken pool must not stop every pool sorting after it
            logger.exception(
                "scheduler pass of pool %s failed", pool_id, extra=log_ids(pool=pool_id)
            )
            continue
        for outcome in outcomes:
            if outcome.dispatched:
                result.dispatched.append(outcome.task_id)
                logger.info(
                    "dispatched task %s to %s (agent %s)",
                    outcome.task_id,
                    outcome.slot,
                    outcome.agent_id,
                    extra=log_ids(
                        task=outcome.task_id, pool=pool_id, pod=outcome.pod, agent=outcome.agent_id
                    ),
                )
            elif outcome.diagnosis is not None:
                result.waiting[outcome.task_id] = outcome.diagnosis
    return result


def _pass_pool(*, pool_id: str, now: datetime, limit: int, actor: str) -> list[DispatchOutcome]:
    """One batch for the pool, unless another scheduler holds it. If the batch raises, its
    transaction is rolled back and its tasks go one at a time, so that a bad row (say, a name
    no column can hold) fails only its own task's dispatch: that task waits out a back-off,
    and its diagnosis says why."""
    try:
        with transaction.atomic():
            pool = pool_claim(pool_id=pool_id, wait=False)
            if pool is None:  # another scheduler is placing this pool's tasks
                return []
            tasks = dispatch_candidates(pool_id=pool_id, now=now, limit=limit)
            return _dispatch_batch(pool=pool, tasks=tasks, now=now, actor=actor) if tasks else []
    except (OperationalError, InterfaceError):
        raise  # the database, not a row: the next pass tries again
    except Exception:
        logger.exception(
            "the dispatch batch of pool %s failed; dispatching one at a time",
            pool_id,
            extra=log_ids(pool=pool_id),
        )
    outcomes: list[DispatchOutcome] = []
    exhausted = False
    for task in dispatch_candidates(pool_id=pool_id, now=now, limit=limit):
        if exhausted and task.status == TaskStatus.PENDING:
            continue
        try:
            outcome = task_dispatch(task_id=task.pk, actor=actor)
        except (DispatchRefused, NotFound) as exc:  # changed under us since the listing
            logger.debug(
                "not dispatching task %s: %s",
                task.pk,
                exc,
                extra=log_ids(task=task.pk, pool=pool_id),
            )
            continue
        except Exception as exc:
            logger.exception(
                "dispatching task %s failed", task.pk, extra=log_ids(task=task.pk, pool=pool_id)
            )
            task_dispatch_failed(task_id=task.pk, error=exc, actor=actor)
            continue
        outcomes.append(outcome)
        code = outcome.diagnosis.code if outcome.diagnosis else ""
        if code in {"pool_paused", "pool_frozen"}:
            break
        exhausted = exhausted or (code in POOL_EXHAUSTED and task.status == TaskStatus.PENDING)
    return outcomes
