"""Reads about pools: freeze state, the capacity snapshot the scheduler places tasks with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.db.models import QuerySet

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.lib.humanize import stamp
from poolsadmin.pools.models import AgentPool, FreezeWindow, Pod, PodPhase, Slot, SlotState


@dataclass(frozen=True)
class FreezeState:
    frozen: bool
    window: FreezeWindow | None = None
    until: datetime | None = None
    unfrozen_until: datetime | None = None


def _window_span(window: FreezeWindow, day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    start = datetime.combine(day, window.start, tzinfo=tz)
    end_day = day if window.end > window.start else day + timedelta(days=1)
    end = datetime.combine(end_day, window.end, tzinfo=tz)
    return start, end


def pool_freeze_state(*, pool: AgentPool, now: datetime) -> FreezeState:
    """Is the pool inside one of its freeze windows at `now`?

    A window crossing midnight belongs to the weekday on which it starts, so yesterday's
    windows are checked too. A one-time unfreeze (`unfrozen_until`) lifts every window until
    then.
    """
    windows = list(pool.freeze_windows.all())
    if not windows:
        return FreezeState(frozen=False)
    tz = ZoneInfo(pool.freeze_timezone or "UTC")
    local = now.astimezone(tz)
    for window in windows:
        for day in (local.date() - timedelta(days=1), local.date()):
            if day.weekday() not in window.weekdays:
                continue
            start, end = _window_span(window, day, tz)
            if start <= local < end:
                if pool.unfrozen_until and now < pool.unfrozen_until:
                    return FreezeState(
                        frozen=False, window=window, until=end, unfrozen_until=pool.unfrozen_until
                    )
                return FreezeState(frozen=True, window=window, until=end)
    return FreezeState(frozen=False)


def end_of_local_day(*, pool: AgentPool, now: datetime) -> datetime:
    tz = ZoneInfo(pool.freeze_timezone or "UTC")
    local = now.astimezone(tz)
    return datetime.combine(local.date() + timedelta(days=1), time(0, 0), tzinfo=tz)


@dataclass
class PodView:
    """One pod of the capacity snapshot, with why it may or may not take work."""

    pod: Pod
    agent: Agent | None
    slots: list[Slot] = field(default_factory=list)
    unavailable_reason: str = ""

    @property
    def eligible(self) -> bool:
        return not self.unavailable_reason

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.state != SlotState.IDLE)

    @property
    def idle_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.state == SlotState.IDLE]

    @property
    def plan_and_apply_slots(self) -> list[Slot]:
        """Running *and* reserved plan_and_apply slots count against the per-pod limit."""
        return [
            s for s in self.slots if s.state != SlotState.IDLE and s.task_type == "plan_and_apply"
        ]


def agent_is_online(*, agent: Agent | None, pool: AgentPool, now: datetime) -> bool:
    """Online means a fresh heartbeat, not just the stored word: the liveness loop may not have
    run yet, and a stale agent must take no work (I-604)."""
    if agent is None or agent.status != AgentStatus.ONLINE or agent.last_ping_at is None:
        return False
    return agent.last_ping_at > now - pool.heartbeat_timeout


def pod_unavailable_reason(*, pod: Pod, agent: Agent | None, pool: AgentPool, now: datetime) -> str:
    if pod.phase != PodPhase.RUNNING:
        return f"pod {pod.name} is {pod.phase}"
    if pod.cordoned:
        return f"pod {pod.name} is draining"
    if agent is None:
        return f"pod {pod.name} has no registered agent yet"
    if agent.status == AgentStatus.DRAINING:
        return f"agent {agent.agent_name} is draining"
    if not agent_is_online(agent=agent, pool=pool, now=now):
        seen = stamp(agent.last_ping_at)
        return f"agent {agent.agent_name} is offline (last heartbeat {seen})"
    return ""


def pool_pods_slots(
    *,
    pool: AgentPool,
    offset: int = 0,
    limit: int | None = None,
    slots: QuerySet[Slot] | None = None,
) -> list[tuple[Pod, list[Slot]]]:
    """The pods of `pool`, oldest first (`limit` of them from `offset`), each with its agent
    and its slots in index order. Two queries, whatever the number of pods. `slots` narrows
    the slot rows read (what a page shows of each slot's task)."""
    rows = Pod.objects.filter(pool=pool).select_related("agent").order_by("created_at", "id")
    pods = list(rows[offset : None if limit is None else offset + limit])
    slots_by_pod: dict[int, list[Slot]] = {p.pk: [] for p in pods}
    # Filter by the pods just read: a pod committed between the two statements (READ
    # COMMITTED) must not show up as slots without a pod.
    for slot in (
        (Slot.objects.all() if slots is None else slots)
        .filter(pod_id__in=list(slots_by_pod))
        .order_by("pod_id", "index")
    ):
        slots_by_pod[slot.pod_id].append(slot)
    return [(p, slots_by_pod[p.pk]) for p in pods]


def pool_capacity(*, pool: AgentPool, now: datetime) -> list[PodView]:
    """Every pod of the pool with its agent and slots, in bin-packing order: busiest pod
    first, ties to the oldest pod (idle pods stay idle so the autoscaler can remove them).
    Two queries, whatever the number of pods."""
    views = [
        PodView(
            pod=p,
            agent=p.agent,
            slots=slots,
            unavailable_reason=pod_unavailable_reason(pod=p, agent=p.agent, pool=pool, now=now),
        )
        for p, slots in pool_pods_slots(pool=pool)
    ]
    # Stable sort keeps the created_at order among pods of equal load.
    views.sort(key=lambda v: -v.busy)
    return views
