"""The reconciler's ledger-side steps (SPEC 5) that need no cluster: agent liveness, lost
tasks, reservations on lost agents, reservation expiry. Cluster sync joins with k8s pools."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.agents.services import agents_mark_offline
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import stamp
from poolsadmin.pools.models import AgentPool, Slot, SlotState
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_fail_lost, task_reservation_drop

RECONCILER = "system:reconciler"


@dataclass
class ReconcileResult:
    agents_offline: list[str] = field(default_factory=list)
    tasks_failed: list[int] = field(default_factory=list)
    reservations_dropped: list[int] = field(default_factory=list)
    reservations_expired: list[int] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return bool(
            self.agents_offline
            or self.tasks_failed
            or self.reservations_dropped
            or self.reservations_expired
        )


def _lost_agents(pool: AgentPool, now: datetime) -> list[Agent]:
    """Offline agents whose last heartbeat is older than timeout + grace."""
    cutoff = now - pool.heartbeat_timeout - timedelta(seconds=pool.task_grace_seconds)
    return list(
        Agent.objects.filter(pool=pool, status=AgentStatus.OFFLINE, last_ping_at__lt=cutoff)
    )


def reconcile_pass(*, actor: str = RECONCILER) -> ReconcileResult:
    """1. agents without a heartbeat for the timeout go offline;
    2. tasks running on an agent offline past the grace period fail, naming the agent;
    3. tasks an agent stopped reporting in its heartbeats fail after the grace period;
    4. reservations on agents offline past the grace period are dropped (the task stays
       apply_pending; its apply will take a fresh slot and re-init);
    5. expired reservations are freed."""
    now = clock.now()
    result = ReconcileResult(agents_offline=agents_mark_offline(now=now, actor=actor))
    for pool in AgentPool.objects.all():
        grace = timedelta(seconds=pool.task_grace_seconds)
        for agent in _lost_agents(pool, now):
            where = f" (pod {agent.agent_name})"
            # Unacknowledged dispatches are not lost work: the scheduler rolls them back.
            for task_id in WorkspaceTask.objects.filter(
                agent=agent, status=TaskStatus.RUNNING, acked_at__isnull=False
            ).values_list("id", flat=True):
                message = (
                    f"Agent {agent.agent_name} ({agent.agent_id}){where} stopped heartbeating at "
                    f"{stamp(agent.last_ping_at)}; task #{task_id} was lost."
                )
                if task_fail_lost(task_id=task_id, message=message, actor=actor):
                    result.tasks_failed.append(task_id)
            for task_id in Slot.objects.filter(
                pod__agent=agent, state=SlotState.RESERVED
            ).values_list("task_id", flat=True):
                assert task_id is not None
                if task_reservation_drop(
                    task_id=task_id,
                    actor=actor,
                    reason=f"agent {agent.agent_name} is offline since {stamp(agent.last_ping_at)}",
                ):
                    result.reservations_dropped.append(task_id)
        unreported = WorkspaceTask.objects.filter(
            pool=pool, status=TaskStatus.RUNNING, unreported_since__lt=now - grace
        ).values_list("id", "agent_id", "unreported_since")
        for task_id, agent_id, since in unreported:
            message = (
                f"Agent {agent_id} stopped reporting task #{task_id} in its heartbeats "
                f"at {stamp(since)}; the task was lost."
            )
            if task_fail_lost(task_id=task_id, message=message, actor=actor):
                result.tasks_failed.append(task_id)
    expired = Slot.objects.filter(state=SlotState.RESERVED, reserved_until__lt=now).values_list(
        "task_id", "reserved_until"
    )
    for task_id, until in expired:
        assert task_id is not None
        if task_reservation_drop(
            task_id=task_id,
            actor=actor,
            reason=f"reservation expired at {stamp(until)}",
            expired_only=True,
        ):
            result.reservations_expired.append(task_id)
    return result
