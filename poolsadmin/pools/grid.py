"""Reads for pages and the API that show pools: the pools overview and a pool's slot grid.

Both run a fixed number of queries whatever the number of pools, pods or slots (pinned by
tests/api/test_admin_api.py): these are the hot pages operators keep open.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, Min, OuterRef, Subquery
from django.db.models.functions import Coalesce

from poolsadmin.agents.models import Agent
from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.lib import clock
from poolsadmin.lib.errors import NotFound
from poolsadmin.pools.models import FINISHED_PHASES, AgentPool, Pod, PodPhase, Slot
from poolsadmin.pools.selectors import agent_is_online, pool_pods_slots
from poolsadmin.tasks.models import QUEUED, WorkspaceTask


@dataclass(frozen=True)
class PoolSummary:
    pool: AgentPool
    pods: int = 0
    pods_running: int = 0
    pods_alive: int = 0  # not finished (any phase but Failed/Succeeded), as the autoscaler counts
    agents: int = 0
    agents_online: int = 0
    slots: Counter[str] = field(default_factory=Counter)
    queue_length: int = 0
    # When the longest-waiting queued task started to wait: its creation, or for a confirmed
    # apply its confirmation (the plan and the wait for a person are not queueing).
    queue_oldest_at: datetime | None = None
    # k8s pools: the pod count of the autoscaler's latest decision (None: no decision yet).
    desired_pods: int | None = None


def pools_overview(*, now: datetime | None = None) -> list[PoolSummary]:
    """Every pool with its counts. Five queries."""
    now = now or clock.now()
    latest = ScaleDecision.objects.filter(pool=OuterRef("pk")).order_by("-at", "-id")
    pools = list(AgentPool.objects.annotate(desired=Subquery(latest.values("desired")[:1])))
    by_id = {pool.pool_id: pool for pool in pools}

    pods: Counter[str] = Counter()
    pods_running: Counter[str] = Counter()
    pods_alive: Counter[str] = Counter()
    for row in Pod.objects.values("pool_id", "phase").annotate(n=Count("id")):
        pods[row["pool_id"]] += row["n"]
        if row["phase"] == PodPhase.RUNNING:
            pods_running[row["pool_id"]] += row["n"]
        if row["phase"] not in FINISHED_PHASES:
            pods_alive[row["pool_id"]] += row["n"]

    # Online is judged from the heartbeat, not the stored word, as the scheduler does.
    agents: Counter[str] = Counter()
    online: Counter[str] = Counter()
    for agent in Agent.objects.only("agent_id", "pool_id", "status", "last_ping_at"):
        agents[agent.pool_id] += 1
        pool = by_id.get(agent.pool_id)
        if pool is not None and agent_is_online(agent=agent, pool=pool, now=now):
            online[agent.pool_id] += 1

    slots: dict[str, Counter[str]] = {pool_id: Counter() for pool_id in by_id}
    for row in Slot.objects.values("pod__pool_id", "state").annotate(n=Count("id")):
        slots.setdefault(row["pod__pool_id"], Counter())[row["state"]] = row["n"]

    queue = {
        row["pool_id"]: (row["n"], row["oldest"])
        for row in WorkspaceTask.objects.filter(QUEUED)
        .values("pool_id")
        .annotate(n=Count("id"), oldest=Min(Coalesce("apply_confirmed_at", "created_at")))
    }
    return [
        PoolSummary(
            pool=pool,
            pods=pods[pool.pool_id],
            pods_running=pods_running[pool.pool_id],
            pods_alive=pods_alive[pool.pool_id],
            agents=agents[pool.pool_id],
            agents_online=online[pool.pool_id],
            slots=slots[pool.pool_id],
            queue_length=queue.get(pool.pool_id, (0, None))[0],
            queue_oldest_at=queue.get(pool.pool_id, (0, None))[1],
            desired_pods=getattr(pool, "desired", None),
        )
        for pool in pools
    ]


@dataclass(frozen=True)
class PodRow:
    """One pod card: the pod, its agent and whether it is online, its slots by index. Each
    busy slot comes with its task (`slot.task`) already loaded."""

    pod: Pod
    agent: Agent | None
    agent_online: bool
    slots: list[Slot]


# The slot columns the API shows (`api.serializers.slot_json`).
SLOT_FIELDS = (
    "id",
    "pod_id",
    "index",
    "state",
    "task_id",
    "task_type",
    "since",
    "reserved_until",
    "version",
)


def pool_slot_grid(
    *, pool: AgentPool, now: datetime | None = None, offset: int = 0, limit: int | None = None
) -> list[PodRow]:
    """The pods of `pool` (oldest first; `limit` of them from `offset`) with agents, slots and
    their tasks: the rows the scheduler's capacity snapshot reads, so the API shows what the
    scheduler sees. Two queries, whatever the number of pods; a page reads only its pods."""
    now = now or clock.now()
    # Of each slot's task only what the API shows: a full task row per slot is most of the
    # cost of a 1,000-pod pool.
    slots = Slot.objects.select_related("task").only(
        *SLOT_FIELDS, "task__status", "task__workspace_id"
    )
    return [
        PodRow(
            pod=p,
            agent=p.agent,
            agent_online=agent_is_online(agent=p.agent, pool=pool, now=now),
            slots=pod_slots,
        )
        for p, pod_slots in pool_pods_slots(pool=pool, offset=offset, limit=limit, slots=slots)
    ]


def pool_pod_count(*, pool: AgentPool) -> int:
    return Pod.objects.filter(pool=pool).count()


def pool_get(*, pool_id: str) -> AgentPool:
    pool = AgentPool.objects.filter(pk=pool_id).first()
    if pool is None:
        raise NotFound(f"pool {pool_id} does not exist")
    return pool
