"""Builders for ledger scenarios. They go through the services, never around them, so a
scenario is a state the product itself can reach."""

from __future__ import annotations

from poolsadmin.agents.models import Agent
from poolsadmin.agents.services import Registration, agent_register
from poolsadmin.lib.ids import random_id
from poolsadmin.pools.models import AgentPool, Pod, Slot
from poolsadmin.pools.services import pool_create
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_accept, task_report, task_submit, workspace_create

ADMIN = "user:admin"


def make_pool(**kwargs: object) -> AgentPool:
    kwargs.setdefault("name", "p1")
    return pool_create(actor=ADMIN, **kwargs)  # type: ignore[arg-type]


def make_workspace(
    pool: AgentPool, name: str | None = None, workspace_id: str | None = None
) -> Workspace:
    return workspace_create(
        name=name or random_id("ws", 4), pool=pool, actor=ADMIN, workspace_id=workspace_id
    )


def make_agent(pool: AgentPool, name: str) -> Agent:
    """An online agent; in a static pool also its pod with idle slots."""
    return make_agent_with_secret(pool, name).agent


def make_agent_with_secret(pool: AgentPool, name: str) -> Registration:
    """As make_agent, with the agent secret an agent API call needs (X-Agent-Secret)."""
    return agent_register(pool=pool, name=name, version="test")


def pod_of(agent: Agent) -> Pod:
    return Pod.objects.get(agent=agent)


def slots_of(pod: Pod) -> list[Slot]:
    return list(Slot.objects.filter(pod=pod).order_by("index"))


def submit(workspace: Workspace, task_type: str = "plan") -> WorkspaceTask:
    return task_submit(workspace=workspace, task_type=task_type, actor=ADMIN)


def refresh(task: WorkspaceTask) -> WorkspaceTask:
    task.refresh_from_db()
    return task


def agent_of(task: WorkspaceTask) -> Agent:
    task = refresh(task)
    assert task.agent is not None, f"task #{task.pk} has no agent"
    return task.agent


def run(task: WorkspaceTask) -> WorkspaceTask:
    """Dispatch and acknowledge: the task is running on some agent."""
    outcome = task_dispatch(task_id=task.pk)
    assert outcome.dispatched, outcome.diagnosis
    task_accept(task_id=task.pk, agent=agent_of(task))
    return refresh(task)


def plan_with_changes(task: WorkspaceTask) -> WorkspaceTask:
    """Run a plan_and_apply plan that finds changes: apply_pending with a reserved slot."""
    task = run(task)
    task_report(task_id=task.pk, agent=agent_of(task), status=TaskStatus.APPLY_PENDING)
    return refresh(task)


def finish(task: WorkspaceTask, status: str = TaskStatus.SUCCESS) -> WorkspaceTask:
    task_report(task_id=task.pk, agent=agent_of(task), status=status)
    return refresh(task)


def slot_states(pod: Pod) -> list[tuple[str, int | None]]:
    return [(s.state, s.task_id) for s in slots_of(pod)]
