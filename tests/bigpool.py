"""The demo pool grown to a fleet: task 598's reserved slot in the middle of 1,000 pods.

The demo seed (`seed_demo`, through the services) gives the founding incident on its first
pod. Bulk rows (a factory, not services: a thousand registrations would take a minute) then
add pods around it, half of them older than the incident's pod and half younger, so in the
pool's oldest-first order its reserved slot sits in the middle of the map. Each added pod has
an online agent; every third one runs two plans, so the map is not a sea of idle cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_AGENT_NAMES,
    DemoSeed,
    demo_seed,
)
from poolsadmin.lib import clock
from poolsadmin.lib.ids import random_id
from poolsadmin.pools.models import Pod, PodPhase, Slot, SlotState
from poolsadmin.tasks.models import Stage, TaskStatus, TaskType, Workspace, WorkspaceTask


@dataclass(frozen=True)
class BigPool:
    seed: DemoSeed
    pods: int
    incident_position: int  # 0-based, in the pool's oldest-first order


def demo_big_pool_seed(*, pods: int = 1000) -> BigPool:
    seed = demo_seed()
    pool = seed.pool
    now = clock.now()
    incident_pod = Pod.objects.get(pool=pool, name=DEMO_AGENT_NAMES[0])
    workspace = Workspace.objects.filter(current_pool=pool).order_by("workspace_id").first()
    assert workspace is not None
    extra = pods - Pod.objects.filter(pool=pool).count()
    before = extra // 2
    agents, new_pods = [], []
    for i in range(extra):
        # Seconds apart, around the incident's pod: `before` of them older than it.
        created = incident_pod.created_at + timedelta(seconds=i - before + (i >= before))
        name = f"prod-agents-b{i:04d}"
        agent = Agent(
            agent_id=random_id("agent-"),
            agent_name=name,
            pool=pool,
            status=AgentStatus.ONLINE,
            version="demo",
            last_ping_at=now,
            registered_at=created,
        )
        agents.append(agent)
        new_pods.append(
            Pod(
                pool=pool,
                name=name,
                phase=PodPhase.RUNNING,
                agent=agent,
                created_at=created,
                last_seen_at=now,
            )
        )
    Agent.objects.bulk_create(agents)
    Pod.objects.bulk_create(new_pods)
    created_pods = list(Pod.objects.filter(pool=pool, name__startswith="prod-agents-b"))
    busy = created_pods[::3]
    tasks = WorkspaceTask.objects.bulk_create(
        [
            WorkspaceTask(
                workspace=workspace,
                pool=pool,
                task_type=TaskType.PLAN,
                status=TaskStatus.RUNNING,
                stage=Stage.PLANNING,
                agent_id=pod.agent_id,
                pod=pod,
                pod_name=pod.name,
                slot_index=index,
                created_at=now - timedelta(minutes=5),
                started_at=now - timedelta(minutes=4),
                dispatched_at=now - timedelta(minutes=4),
                acked_at=now - timedelta(minutes=4),
                created_by="user:ci",
            )
            for pod in busy
            for index in (0, 1)
        ]
    )
    task_of = {(t.pod_id, t.slot_index): t for t in tasks}
    Slot.objects.bulk_create(
        [
            Slot(
                pod=pod,
                index=index,
                since=now - timedelta(minutes=4) if (pod.pk, index) in task_of else now,
                state=SlotState.RUNNING if (pod.pk, index) in task_of else SlotState.IDLE,
                task=task_of.get((pod.pk, index)),
                task_type=TaskType.PLAN if (pod.pk, index) in task_of else "",
            )
            for pod in created_pods
            for index in range(pool.slots_per_pod)
        ]
    )
    order = list(Pod.objects.filter(pool=pool).order_by("created_at", "id"))
    return BigPool(seed=seed, pods=len(order), incident_position=order.index(incident_pod))
