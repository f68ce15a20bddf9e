"""Reads for the server-rendered dashboard pages.

The pool page is the hot one (operators keep it open, every change of the pool re-renders it
for the live push), so it runs a fixed number of queries whatever the number of pods and of
waiting tasks: the capacity snapshot the scheduler places tasks with, as rows
(`pool_capacity_rows`, two queries), the pods that get a card as model instances (two more),
one batched lookup of the tasks in the cards and the reserved slots, the queue, and what the
queue's diagnoses share (rule 2's heads, the planners' names, the liveness).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import prefetch_related_objects
from django.utils.safestring import SafeString, mark_safe

from poolsadmin.agents.liveness import liveness_read
from poolsadmin.agents.models import Agent
from poolsadmin.dashboard.pool_view import (
    CardSelection,
    Owner,
    PoolView,
    pod_cards_select,
    pod_is_draining,
    slot_map_html,
)
from poolsadmin.lib import clock
from poolsadmin.lib.errors import NotFound
from poolsadmin.pools.grid import PoolSummary, pools_overview
from poolsadmin.pools.models import AgentPool, PoolStatus, Slot, SlotState
from poolsadmin.pools.selectors import (
    PodView,
    agent_is_online,
    pool_capacity,
    pool_capacity_rows,
    pool_freeze_state,
)
from poolsadmin.scheduler.diagnosis import (
    DecisionCache,
    held_slots,
    planner_names,
    task_diagnose,
)
from poolsadmin.scheduler.rules import Diagnosis, in_dispatch_order, serial_heads
from poolsadmin.tasks.detail import TaskDetail, task_detail
from poolsadmin.tasks.models import QUEUED, TaskStatus, WorkspaceTask

# Rows of the queue shown on the pool page: each costs its diagnosis queries.
QUEUE_LIMIT = 50


# --- pools list ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRow:
    summary: PoolSummary
    health: str  # healthy | saturated | degraded | frozen | paused | no capacity

    @property
    def pool(self) -> AgentPool:
        return self.summary.pool

    @property
    def slots_total(self) -> int:
        return sum(self.summary.slots.values())

    def _percent(self, state: str) -> int:
        total = self.slots_total
        return round(100 * self.summary.slots[state] / total) if total else 0

    @property
    def running_percent(self) -> int:
        return self._percent(SlotState.RUNNING)

    @property
    def reserved_percent(self) -> int:
        return self._percent(SlotState.RESERVED)


def _health(summary: PoolSummary, now: datetime) -> str:
    pool = summary.pool
    if pool.status == PoolStatus.PAUSED:
        return "paused"
    if pool_freeze_state(pool=pool, now=now).frozen:
        return "frozen"
    if summary.agents_online == 0 or summary.pods_running == 0:
        return "no capacity"
    if summary.slots[SlotState.IDLE] == 0:
        return "saturated"
    if summary.agents_online < summary.agents or summary.pods_running < summary.pods:
        return "degraded"
    return "healthy"


def dashboard_pools(*, now: datetime | None = None) -> list[PoolRow]:
    """Every pool with its counts and a health word. A fixed number of queries."""
    now = now or clock.now()
    summaries = pools_overview(now=now)
    # One query for every pool's freeze windows, instead of one per pool.
    prefetch_related_objects([s.pool for s in summaries], "freeze_windows")
    return [PoolRow(summary=s, health=_health(s, now)) for s in summaries]


# --- pool page -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotCell:
    slot: Slot
    task: WorkspaceTask | None
    plan_agent_name: str  # who planned a reserved slot's task

    @property
    def state(self) -> str:
        return self.slot.state


@dataclass(frozen=True)
class PodCard:
    view: PodView
    cells: list[SlotCell]


@dataclass(frozen=True)
class QueueEntry:
    position: int | None  # None: not queued for a slot (waits for a person)
    task: WorkspaceTask
    diagnosis: Diagnosis


@dataclass(frozen=True)
class PoolPage:
    pool: AgentPool
    now: datetime
    view: PoolView  # what was asked for (`selection.view` has the defaults filled in)
    pods_total: int
    slot_counts: dict[str, int]  # every slot of the pool, by state
    draining: int  # pods draining
    offline: int  # pods whose agent is offline or missing
    slot_map: SafeString  # one cell per slot of every pod (`pool_view.slot_map_html`)
    cards: list[PodCard]  # the pods `view` shows a card for, this page of them
    selection: CardSelection  # how many match, pages, labels
    pinned: PodCard | None  # one pod's card on demand (`?pod=`)
    queue: list[QueueEntry]
    queue_length: int
    awaiting_confirmation: list[QueueEntry]


def dashboard_pool(
    *, pool_id: str, view: PoolView | None = None, now: datetime | None = None
) -> PoolPage:
    """The pool page: the slot map of every pod, full cards for the pods `view` selects, the
    queue. A fixed number of queries whatever the number of pods (pinned by a test); only
    the cards and the reserved cells read their tasks."""
    now = now or clock.now()
    view = view or PoolView()
    pool = AgentPool.objects.filter(pk=pool_id).prefetch_related("freeze_windows").first()
    if pool is None:
        raise NotFound(f"pool {pool_id} does not exist")
    # The map, the counts, the filters and the queue's diagnoses read rows (a model instance
    # costs five times as much to build, and a pool has thousands of slots); only the pods
    # that get a card are read again as model instances, for everything a card shows.
    views = pool_capacity_rows(pool=pool, now=now)
    # The scheduler's order is by load; the map and the cards keep a stable order (oldest pod
    # first) so they do not jump around between refreshes.
    views.sort(key=lambda v: (v.pod.created_at, v.pod.pk))
    selection = pod_cards_select(views=views, pool=pool, view=view, now=now)
    carded = selection.shown + ([selection.pinned] if selection.pinned else [])
    full = {
        v.pod.pk: v for v in pool_capacity(pool=pool, now=now, pod_ids=[v.pod.pk for v in carded])
    }

    # Tasks of the cards' slots, and of every reserved slot (its map cell names its owner).
    task_ids = {s.task_id for v in full.values() for s in v.slots if s.task_id is not None}
    task_ids |= {
        s.task_id
        for v in views
        for s in v.slots
        if s.state == SlotState.RESERVED and s.task_id is not None
    }
    tasks = {
        t.pk: t for t in WorkspaceTask.objects.filter(pk__in=task_ids).select_related("workspace")
    }

    owners = {
        t.pk: Owner(task_id=t.pk, workspace_id=t.workspace_id, workspace_name=t.workspace.name)
        for t in tasks.values()
    }
    counts = {state: 0 for state in SlotState.values}
    for v in views:
        for s in v.slots:
            counts[s.state] += 1

    # The queue's diagnoses reuse this page's capacity snapshot and pool instance, in the
    # scheduler's order (busiest first, ties to the oldest: a stable sort of the page's
    # oldest-first order), so they name the pod the scheduler would take.
    cache = {pool.pool_id: sorted(views, key=lambda v: -v.busy)}
    waiting = WorkspaceTask.objects.filter(pool=pool).select_related("workspace")
    queued = list(in_dispatch_order(waiting.filter(QUEUED))[:QUEUE_LIMIT])
    unconfirmed = list(
        waiting.filter(status=TaskStatus.APPLY_PENDING, apply_confirmed_by="").order_by(
            "planned_at", "id"
        )[:QUEUE_LIMIT]
    )
    for task in queued + unconfirmed:
        task.pool = pool
    # Who planned the reserved slots' tasks (their cells and cards say) and the unconfirmed
    # applies (their diagnoses say); the pool's own agents are known from the snapshot.
    agent_names = planner_names(
        [*tasks.values(), *unconfirmed],
        known={v.agent.agent_id: v.agent.agent_name for v in views if v.agent is not None},
    )
    # What the diagnoses would otherwise read once per task.
    decisions: DecisionCache = {}
    liveness = liveness_read()
    heads = serial_heads(tasks=queued + unconfirmed)
    own_slots = held_slots(queued + unconfirmed)

    def card(row: PodView) -> PodCard | None:
        v = full.get(row.pod.pk)
        if v is None:
            return None  # deleted between the two reads: the next refresh drops it
        return PodCard(
            view=v,
            cells=[
                SlotCell(
                    slot=s,
                    task=tasks.get(s.task_id) if s.task_id is not None else None,
                    plan_agent_name=_plan_agent(tasks.get(s.task_id or 0), agent_names),
                )
                for s in v.slots
            ],
        )

    def diagnose(task: WorkspaceTask) -> Diagnosis:
        return task_diagnose(
            task=task,
            now=now,
            cache=cache,
            decisions=decisions,
            liveness=liveness,
            heads=heads,
            agent_names=agent_names,
            own_slots=own_slots,
        )

    return PoolPage(
        pool=pool,
        now=now,
        view=view,
        pods_total=len(views),
        slot_counts=counts,
        draining=sum(1 for v in views if pod_is_draining(v)),
        offline=sum(1 for v in views if not agent_is_online(agent=v.agent, pool=pool, now=now)),
        # slot_map_html escapes every name and label it writes.
        slot_map=mark_safe(slot_map_html(views=views, pool=pool, owners=owners, now=now)),
        cards=[c for c in map(card, selection.shown) if c is not None],
        selection=selection,
        pinned=card(selection.pinned) if selection.pinned else None,
        queue=[QueueEntry(position, t, diagnose(t)) for position, t in enumerate(queued, start=1)],
        queue_length=waiting.filter(QUEUED).count(),
        awaiting_confirmation=[QueueEntry(None, t, diagnose(t)) for t in unconfirmed],
    )


def _plan_agent(task: WorkspaceTask | None, names: dict[str, str]) -> str:
    if task is None or not task.plan_agent_id:
        return ""
    return names.get(task.plan_agent_id, task.plan_agent_id)


# --- task page -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskPage:
    detail: TaskDetail
    slot: Slot | None  # the slot the task holds now (running or reserved)
    agent_name: str
    plan_agent_name: str

    @property
    def task(self) -> WorkspaceTask:
        return self.detail.task


def dashboard_task(*, task_id: int) -> TaskPage:
    detail = task_detail(task_id=task_id)
    task = detail.task
    slot = Slot.objects.select_related("pod").filter(task_id=task.pk).first()
    ids = {i for i in (task.agent_id, task.plan_agent_id) if i}
    names = dict(Agent.objects.filter(pk__in=ids).values_list("agent_id", "agent_name"))
    return TaskPage(
        detail=detail,
        slot=slot,
        agent_name=names.get(task.agent_id or "", task.agent_id or ""),
        plan_agent_name=names.get(task.plan_agent_id, task.plan_agent_id),
    )
