"""Reads about pools: freeze state, the capacity snapshot the scheduler places tasks with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Generic, TypeVar
from zoneinfo import ZoneInfo

from django.db.models import Case, F, QuerySet, Value, When

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


@dataclass(slots=True)
class PodRow:
    """The fields of a Pod that placement reads: the scheduler's snapshot builds thousands of
    these per pass, and a model instance costs ten times as much to build (issue 9)."""

    pk: int
    name: str
    phase: str
    cordoned: bool
    created_at: datetime
    agent_id: str | None


@dataclass(slots=True)
class AgentRow:
    agent_id: str
    agent_name: str
    status: str
    last_ping_at: datetime | None


@dataclass(slots=True)
class SlotRow:
    """A Slot as placement reads it; `since` only for a busy slot (an idle slot's is never
    shown or compared, and parsing five thousand timestamps is a tenth of a batch)."""

    pk: int
    pod: PodRow
    index: int
    state: str
    task_id: int | None
    task_type: str
    since: datetime | None
    reserved_until: datetime | None
    version: int

    @property
    def pod_id(self) -> int:
        return self.pod.pk


SLOT_ROW_HEAD = ("id", "pod_id", "index", "state", "task_id", "task_type")

PodT = TypeVar("PodT", Pod, PodRow)
AgentT = TypeVar("AgentT", Agent, AgentRow)
SlotT = TypeVar("SlotT", Slot, SlotRow)


@dataclass
class PodView(Generic[PodT, AgentT, SlotT]):
    """One pod of the capacity snapshot, with why it may or may not take work: model
    instances for the pages (`pool_capacity`), rows for placement (`pool_capacity_rows`)."""

    pod: PodT
    agent: AgentT | None
    slots: list[SlotT] = field(default_factory=list)
    unavailable_reason: str = ""

    @property
    def eligible(self) -> bool:
        return not self.unavailable_reason

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.state != SlotState.IDLE)

    @property
    def idle_slots(self) -> list[SlotT]:
        return [s for s in self.slots if s.state == SlotState.IDLE]

    @property
    def plan_and_apply_slots(self) -> list[SlotT]:
        """Running *and* reserved plan_and_apply slots count against the per-pod limit."""
        return [
            s for s in self.slots if s.state != SlotState.IDLE and s.task_type == "plan_and_apply"
        ]


# The scheduler's and the diagnosis' snapshot.
CapacityView = PodView[PodRow, AgentRow, SlotRow]


def agent_is_online(*, agent: Agent | AgentRow | None, pool: AgentPool, now: datetime) -> bool:
    """Online means a fresh heartbeat, not just the stored word: the liveness loop may not have
    run yet, and a stale agent must take no work (I-604)."""
    if agent is None or agent.status != AgentStatus.ONLINE or agent.last_ping_at is None:
        return False
    return agent.last_ping_at > now - pool.heartbeat_timeout


def pod_unavailable_reason(
    *, pod: Pod | PodRow, agent: Agent | AgentRow | None, pool: AgentPool, now: datetime
) -> str:
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
    pod_ids: Iterable[int] | None = None,
) -> list[tuple[Pod, list[Slot]]]:
    """The pods of `pool`, oldest first (`limit` of them from `offset`; only `pod_ids` when
    given), each with its agent and its slots in index order. Two queries, whatever the
    number of pods. `slots` narrows the slot rows read (what a page shows of each slot's
    task)."""
    rows = Pod.objects.filter(pool=pool).select_related("agent").order_by("created_at", "id")
    if pod_ids is not None:
        rows = rows.filter(pk__in=list(pod_ids))
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


def pool_capacity(
    *, pool: AgentPool, now: datetime, pod_ids: Iterable[int] | None = None
) -> list[PodView[Pod, Agent, Slot]]:
    """Every pod of the pool (or only `pod_ids`) with its agent and slots, as model
    instances, in bin-packing order: busiest pod first, ties to the oldest pod (idle pods
    stay idle so the autoscaler can remove them). Two queries, whatever the number of pods;
    `pool_capacity_rows` reads the same for a fifth of the time, where rows will do."""
    views = [
        PodView(
            pod=p,
            agent=p.agent,
            slots=slots,
            unavailable_reason=pod_unavailable_reason(pod=p, agent=p.agent, pool=pool, now=now),
        )
        for p, slots in pool_pods_slots(pool=pool, pod_ids=pod_ids)
    ]
    # Stable sort keeps the created_at order among pods of equal load.
    views.sort(key=lambda v: -v.busy)
    return views


def pool_capacity_rows(*, pool: AgentPool, now: datetime) -> list[CapacityView]:
    """`pool_capacity` as rows, not model instances, for placing tasks (the scheduler, the
    diagnosis): the same pods in the same order with the same reasons. Two queries, whatever
    the number of pods."""
    pods: dict[int, tuple[PodRow, AgentRow | None]] = {}
    for pk, name, phase, cordoned, created_at, agent_id, a_name, a_status, a_ping in (
        Pod.objects.filter(pool=pool)
        .order_by("created_at", "id")
        .values_list(
            "id",
            "name",
            "phase",
            "cordoned",
            "created_at",
            "agent_id",
            "agent__agent_name",
            "agent__status",
            "agent__last_ping_at",
        )
    ):
        agent = None if agent_id is None else AgentRow(agent_id, a_name, a_status, a_ping)
        pods[pk] = (PodRow(pk, name, phase, cordoned, created_at, agent_id), agent)
    slots_by_pod: dict[int, list[SlotRow]] = {pk: [] for pk in pods}
    idle_none = Case(When(state=SlotState.IDLE, then=Value(None)), default=F("since"))
    rows = (
        Slot.objects.filter(pod__pool=pool)
        .order_by("pod_id", "index")
        .values_list(*SLOT_ROW_HEAD, idle_none, "reserved_until", "version")
    )
    for pk, pod_id, index, state, task_id, task_type, since, until, version in rows:
        # Only the pods just read: one committed between the two statements (READ
        # COMMITTED) must not show up as slots without a pod.
        if pod_id in pods:
            pod = pods[pod_id][0]
            slots_by_pod[pod_id].append(
                SlotRow(pk, pod, index, state, task_id, task_type, since, until, version)
            )
    views = [
        CapacityView(
            pod=pod,
            agent=agent,
            slots=slots_by_pod[pk],
            unavailable_reason=pod_unavailable_reason(pod=pod, agent=agent, pool=pool, now=now),
        )
        for pk, (pod, agent) in pods.items()
    ]
    views.sort(key=lambda v: -v.busy)
    return views
