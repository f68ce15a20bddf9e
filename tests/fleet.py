"""Bulk data for fleet-size tests and benchmarks: pools of registered agents (through the
services: each pod and its slots are what registration makes) and thousands of waiting tasks
(straight into the table: a factory, not a scenario, as in the I-W4 test)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from poolsadmin.agents.services import agent_register
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_create
from poolsadmin.tasks.models import TaskStatus, TaskType, Workspace, WorkspaceTask
from poolsadmin.tasks.services import workspace_create

ACTOR = "user:fleet"


@dataclass(frozen=True)
class Fleet:
    pools: list[AgentPool]
    workspaces: dict[str, list[Workspace]]  # by pool id

    @property
    def pool_ids(self) -> list[str]:
        return [p.pool_id for p in self.pools]


def fleet_build(
    *,
    pools: int,
    pods_per_pool: int,
    slots_per_pod: int = 4,
    workspaces: int = 500,
    plan_and_apply_per_pod: int = 1,
    prefix: str = "fleet",
    heartbeat_timeout_seconds: int = 3600,
) -> Fleet:
    """`pools` static pools of `pods_per_pool` online agents each; `workspaces` in all, spread
    evenly over the pools. The agents never heartbeat after registering: the long heartbeat
    timeout keeps the first of a thousand online while the last registers."""
    built: list[AgentPool] = []
    spaces: dict[str, list[Workspace]] = {}
    per_pool = max(1, workspaces // pools)
    for p in range(pools):
        pool = pool_create(
            actor=ACTOR,
            name=f"{prefix}-{p:02d}",
            slots_per_pod=slots_per_pod,
            plan_and_apply_per_pod=plan_and_apply_per_pod,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
        for i in range(pods_per_pool):
            agent_register(pool=pool, name=f"{prefix}-{p:02d}-pod-{i:04d}", version="fleet")
        spaces[pool.pool_id] = [
            workspace_create(name=f"{prefix}-{p:02d}-ws-{w:03d}", pool=pool, actor=ACTOR)
            for w in range(per_pool)
        ]
        built.append(pool)
    return Fleet(pools=built, workspaces=spaces)


def tasks_queue(fleet: Fleet, *, count: int, kinds: tuple[str, ...] = (TaskType.PLAN,)) -> int:
    """`count` pending tasks, round-robin over the pools and their workspaces, in FIFO order
    of creation; returns how many were made."""
    now = clock.now()
    rows = []
    for i in range(count):
        pool = fleet.pools[i % len(fleet.pools)]
        spaces = fleet.workspaces[pool.pool_id]
        rows.append(
            WorkspaceTask(
                workspace=spaces[(i // len(fleet.pools)) % len(spaces)],
                pool=pool,
                task_type=kinds[i % len(kinds)],
                status=TaskStatus.PENDING,
                created_at=now + timedelta(microseconds=i),
            )
        )
    WorkspaceTask.objects.bulk_create(rows, batch_size=1000)
    return len(rows)
