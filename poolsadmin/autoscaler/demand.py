"""How many pods a pool needs now (SPEC 6), read from the ledger.

Dispatchability is decided by the scheduler's own rule functions (`pool_block`,
`workspace_block`, `backoff_block`), so the autoscaler never adds a pod for work the scheduler
would not run: locked, blocked (serial plan_and_apply), unconfirmed, backing-off, paused and
frozen work does not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from math import ceil

from poolsadmin.pools.models import AgentPool, Slot, SlotState
from poolsadmin.scheduler.rules import backoff_block, pool_block, serial_heads, workspace_block
from poolsadmin.tasks.models import QUEUED, TaskStatus, TaskType, WorkspaceTask


@dataclass(frozen=True)
class Demand:
    running: int
    reserved: int
    queued: int  # dispatchable pending tasks
    applies: int  # confirmed applies without a slot
    plan_and_apply: int  # running + reserved plan_and_apply slots + dispatchable ones
    needed: int  # pods, before min/max
    blocked_reason: str = ""  # why queued work does not count (pool paused or frozen)

    @property
    def slots(self) -> int:
        return self.running + self.reserved + self.queued + self.applies

    def text(self) -> str:
        parts = [f"{self.running} running", f"{self.reserved} reserved", f"{self.queued} queued"]
        if self.applies:
            parts.append(f"{self.applies} confirmed apply without a slot")
        words = " + ".join(parts)
        if self.plan_and_apply:
            words += f" ({self.plan_and_apply} plan_and_apply)"
        return words


def pool_demand(*, pool: AgentPool, now: datetime) -> Demand:
    """Slot and plan_and_apply demand of `pool` and the pods it needs.

    Queries: one for the busy slots, one for the freeze windows, one for the waiting tasks,
    and, when one of those is a pending plan_and_apply, one for rule 2's heads of their
    workspaces (`serial_heads`), whatever their number."""
    running = reserved = busy_pa = 0
    holding: set[int] = set()
    for state, task_type, task_id in (
        Slot.objects.filter(pod__pool=pool)
        .exclude(state=SlotState.IDLE)
        .values_list("state", "task_type", "task_id")
    ):
        holding.add(task_id)
        if state == SlotState.RUNNING:
            running += 1
        else:
            reserved += 1
        if task_type == TaskType.PLAN_AND_APPLY:
            busy_pa += 1

    queued = applies = waiting_pa = 0
    block = pool_block(pool=pool, now=now)
    if block is None:
        tasks = list(WorkspaceTask.objects.filter(QUEUED, pool=pool).select_related("workspace"))
        heads = serial_heads(tasks=tasks)
        for task in tasks:
            if task.pk in holding:  # a confirmed apply with its reservation: counted above
                continue
            if backoff_block(task=task, now=now) or workspace_block(
                task=task, workspace=task.workspace, heads=heads
            ):
                continue
            if task.status == TaskStatus.APPLY_PENDING:
                applies += 1
            else:
                queued += 1
            if task.task_type == TaskType.PLAN_AND_APPLY:
                waiting_pa += 1

    slots = running + reserved + queued + applies
    plan_and_apply = busy_pa + waiting_pa
    needed = max(
        ceil(slots / max(pool.slots_per_pod, 1)),
        ceil(plan_and_apply / max(pool.plan_and_apply_per_pod, 1)),
    )
    return Demand(
        running=running,
        reserved=reserved,
        queued=queued,
        applies=applies,
        plan_and_apply=plan_and_apply,
        needed=needed,
        blocked_reason=block.text if block else "",
    )
