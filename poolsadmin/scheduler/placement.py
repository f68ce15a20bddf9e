"""A pool's capacity, read once per batch and placed against in memory.

The scheduler used to re-read every pod, slot and agent of the pool for each task it
dispatched (issue 9: 77 % of a pass, thousands of rows per dispatch). Now a batch reads the
snapshot once (`pool_capacity_rows`: two queries, rows rather than model instances) and places
its tasks one after the other, in dispatch order, against this object; each placement changes
the snapshot as its claim will change the ledger, so the next task sees the slot taken.

The rule functions (rules.py) still decide every placement: this module only chooses which pod
views to show `placement_candidates`. For most tasks that is the single pod the rules would
pick first (the busiest open pod that fits), which keeps a placement O(1) instead of O(pods);
when that shortlist is empty the rules see every pod, so the diagnosis says what it says for
the whole pool, and any candidate they still find is used.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from datetime import datetime

from poolsadmin.pools.models import AgentPool, SlotState
from poolsadmin.pools.selectors import CapacityView, SlotRow
from poolsadmin.scheduler.rules import Diagnosis, placement_candidates
from poolsadmin.tasks.models import TaskStatus, TaskType, WorkspaceTask


@dataclass(frozen=True)
class Placement:
    task: WorkspaceTask
    view: CapacityView
    slot: SlotRow  # as the snapshot read it: what the claim expects, and the event's "before"
    reuse: bool  # the confirmed apply's own reserved slot (I-598)


class PoolSnapshot:
    """The pool's pods in bin-packing order (`pool_capacity`), plus the open pods (eligible,
    with an idle slot) in the same order, kept current as tasks are placed."""

    def __init__(self, *, pool: AgentPool, views: list[CapacityView], now: datetime) -> None:
        self.pool = pool
        self.views = views
        self.now = now
        self._open = [v for v in views if v.eligible and v.idle_slots]
        self._own: dict[int, tuple[CapacityView, SlotRow]] = {}
        for view in views:
            for slot in view.slots:
                if slot.task_id is not None:
                    self._own[slot.task_id] = (view, slot)

    def place(self, task: WorkspaceTask) -> Placement | Diagnosis:
        """Where `task` goes, by the rules, and take that slot in the snapshot; or why not."""
        own = self._own.get(task.pk) if task.status == TaskStatus.APPLY_PENDING else None
        own_slot = own[1] if own else None
        if own is not None and own_slot is not None and own_slot.state == SlotState.RESERVED:
            shortlist = [own[0]]
        else:
            shortlist = self._first_fit(task)
        candidates, diagnosis = placement_candidates(
            task=task, pool=self.pool, views=shortlist, own_slot=own_slot, now=self.now
        )
        if diagnosis is not None and not shortlist:
            candidates, diagnosis = placement_candidates(
                task=task, pool=self.pool, views=self.views, own_slot=own_slot, now=self.now
            )
        if diagnosis is not None:
            return diagnosis
        view, reserved = candidates[0]
        if reserved is not None and own_slot is not None:  # the rules chose its own slot
            placement = Placement(task=task, view=view, slot=copy(own_slot), reuse=True)
            own_slot.state = SlotState.RUNNING
            return placement
        slot = next(s for s in view.slots if s.state == SlotState.IDLE)
        placement = Placement(task=task, view=view, slot=copy(slot), reuse=False)
        slot.state = SlotState.RUNNING
        slot.task_id = task.pk
        slot.task_type = task.task_type
        self._own[task.pk] = (view, slot)
        self._moved(view)
        return placement

    def _first_fit(self, task: WorkspaceTask) -> list[CapacityView]:
        """The busiest open pod the task may take (rules.placement_candidates' first
        candidate), or nothing."""
        limit = self.pool.plan_and_apply_per_pod
        for view in self._open:
            if task.task_type != TaskType.PLAN_AND_APPLY:
                return [view]
            if len(view.plan_and_apply_slots) < limit:
                return [view]
        return []

    def _moved(self, view: CapacityView) -> None:
        """A slot of `view` was taken: it leaves the open pods when full, else moves ahead of
        the pods it is now busier than (busiest first, ties to the older pod)."""
        i = self._open.index(view)
        del self._open[i]
        if not view.idle_slots:
            return
        key = self._key(view)
        while i > 0 and self._key(self._open[i - 1]) > key:
            i -= 1
        self._open.insert(i, view)

    @staticmethod
    def _key(view: CapacityView) -> tuple[int, datetime, int]:
        # pool_capacity's order: busiest first, ties to the oldest pod.
        return (-view.busy, view.pod.created_at, view.pod.pk)
