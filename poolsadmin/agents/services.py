"""Agent writes: registration, heartbeats, liveness."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput
from poolsadmin.lib.ids import random_id
from poolsadmin.pools.models import AgentPool, Pod, PoolType
from poolsadmin.pools.services import pod_for_static_agent
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask

MAX_NAME = 253


def agent_register(
    *, pool: AgentPool, name: str, version: str = "", ip: str | None = None
) -> Agent:
    """Register (or re-register: same name, same pool reuses the agent). In a static pool the
    agent is its own execution host; in a k8s pool the name is the pod name, and the agent is
    matched to that pod."""
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidInput(f"name is required (at most {MAX_NAME} characters)", field="name")
    if len(version) > 64:
        raise InvalidInput("version is longer than 64 characters", field="version")
    now = clock.now()
    with transaction.atomic():
        agent = Agent.objects.select_for_update().filter(pool=pool, agent_name=name).first()
        if agent is None:
            agent = Agent.objects.create(
                agent_id=random_id("agent-"),
                agent_name=name,
                pool=pool,
                status=AgentStatus.ONLINE,
                version=version,
                ip=ip,
                last_ping_at=now,
                registered_at=now,
            )
            kind, before = "agent.registered", None
        else:
            before = {"status": agent.status, "version": agent.version}
            status = AgentStatus.DRAINING if agent.status == AgentStatus.DRAINING else "online"
            Agent.objects.filter(pk=agent.pk).update(
                status=status, version=version, ip=ip, last_ping_at=now, registered_at=now
            )
            agent.refresh_from_db()
            kind = "agent.reregistered"
        event_record(
            actor=f"agent:{agent.agent_id}",
            kind=kind,
            target_type="agent",
            target_id=agent.agent_id,
            pool_id=pool.pool_id,
            before=before,
            after={"status": agent.status, "name": name, "version": version},
        )
        if pool.pool_type == PoolType.STATIC:
            pod_for_static_agent(
                pool=pool, agent_id=agent.agent_id, name=name, actor=f"agent:{agent.agent_id}"
            )
        else:
            Pod.objects.filter(pool=pool, name=name).exclude(agent_id=agent.agent_id).update(
                agent_id=agent.agent_id
            )
        broadcast_pool_changed(pool_id=pool.pool_id, kind="agent", payload={"agent": name})
    return agent


@dataclass
class HeartbeatAnswer:
    assignments: list[dict[str, Any]] = field(default_factory=list)
    cancellations: list[dict[str, Any]] = field(default_factory=list)


def agent_heartbeat(
    *,
    agent: Agent,
    running_task_ids: list[int],
    cpu: float | None = None,
    memory: float | None = None,
) -> HeartbeatAnswer:
    """Record liveness, cross-check what the agent runs against the ledger, and answer with
    new assignments and cancellations.

    * A task the ledger has running on this agent that the agent does not report gets
      `unreported_since`; the reconciler fails it after the grace period.
    * A task the agent reports that the ledger does not assign to it (cancelled, failed,
      reassigned, unknown) gets a cancel instruction: this is how a cancel reaches the agent
      that runs the task, and only that one (I-510).
    * Assignments are dispatches not yet acknowledged: the ledger was written first (I-644),
      and they are repeated until the agent accepts them.
    """
    now = clock.now()
    reported = sorted(set(running_task_ids))
    answer = HeartbeatAnswer()
    with transaction.atomic():
        was = Agent.objects.filter(pk=agent.pk).values_list("status", flat=True).first()
        status = AgentStatus.DRAINING if was == AgentStatus.DRAINING else AgentStatus.ONLINE
        Agent.objects.filter(pk=agent.pk).update(
            last_ping_at=now,
            status=status,
            reported_task_ids=reported,
            cpu=cpu,
            memory=memory,
        )
        if was == AgentStatus.OFFLINE:
            event_record(
                actor=f"agent:{agent.agent_id}",
                kind="agent.online",
                target_type="agent",
                target_id=agent.agent_id,
                pool_id=agent.pool_id,
                before={"status": AgentStatus.OFFLINE},
                after={"status": AgentStatus.ONLINE},
            )
            broadcast_pool_changed(
                pool_id=agent.pool_id, kind="agent", payload={"agent": agent.agent_name}
            )
        mine = {
            t.pk: t
            for t in WorkspaceTask.objects.filter(
                agent_id=agent.agent_id,
                status__in=[TaskStatus.RUNNING, TaskStatus.APPLY_PENDING],
            ).select_related("workspace")
        }
        running_acked = [
            t for t in mine.values() if t.status == TaskStatus.RUNNING and t.acked_at is not None
        ]
        missing = [t.pk for t in running_acked if t.pk not in reported]
        present = [t.pk for t in running_acked if t.pk in reported]
        if missing:
            WorkspaceTask.objects.filter(
                pk__in=missing, status=TaskStatus.RUNNING, unreported_since__isnull=True
            ).update(unreported_since=now)
        if present:
            WorkspaceTask.objects.filter(pk__in=present, unreported_since__isnull=False).update(
                unreported_since=None
            )
        for task_id in reported:
            if task_id not in mine:
                answer.cancellations.append(
                    {"task_id": task_id, "reason": "the ledger does not assign it to this agent"}
                )
        for task in sorted(mine.values(), key=lambda t: t.pk):
            if task.status == TaskStatus.RUNNING and task.acked_at is None:
                answer.assignments.append(
                    {
                        "task_id": task.pk,
                        "workspace_id": task.workspace_id,
                        "task_type": task.task_type,
                        "action": "apply" if task.is_applying else "plan",
                        "pod": task.pod_name,
                        "slot": task.slot_index,
                        "reuse_workdir": task.reuse_workdir,
                    }
                )
    return answer


def agents_mark_offline(*, now: datetime, actor: str) -> list[str]:
    """Online or draining agents without a heartbeat for their pool's timeout -> offline."""
    changed: list[str] = []
    for pool in AgentPool.objects.all():
        stale = Agent.objects.filter(
            pool=pool,
            status__in=[AgentStatus.ONLINE, AgentStatus.DRAINING],
            last_ping_at__lt=now - pool.heartbeat_timeout,
        )
        for agent in stale:
            with transaction.atomic():
                updated = Agent.objects.filter(
                    pk=agent.pk, status=agent.status, last_ping_at=agent.last_ping_at
                ).update(status=AgentStatus.OFFLINE)
                if not updated:
                    continue
                event_record(
                    actor=actor,
                    kind="agent.offline",
                    target_type="agent",
                    target_id=agent.agent_id,
                    pool_id=pool.pool_id,
                    before={"status": agent.status},
                    after={"status": AgentStatus.OFFLINE},
                    reason=f"no heartbeat since {agent.last_ping_at:%Y-%m-%d %H:%M:%S} UTC",
                )
                broadcast_pool_changed(
                    pool_id=pool.pool_id, kind="agent", payload={"agent": agent.agent_name}
                )
                changed.append(agent.agent_id)
    return changed
