"""I-510: a cancel reaches the agent that runs the task, and only that one, through the agent
API's heartbeat answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.agents.services import Registration
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, SlotState
from poolsadmin.pools.services import pool_token_create
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import Stage, TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_cancel
from poolsadmin.worker.reconcile import reconcile_pass
from tests.ledger import (
    ADMIN,
    make_agent_with_secret,
    make_pool,
    make_workspace,
    pod_of,
    refresh,
    run,
    slot_states,
    submit,
)

pytestmark = pytest.mark.django_db


def heartbeat(
    client: Client, secret: str, agent: Registration, running: list[int]
) -> dict[str, Any]:
    response = client.post(
        f"/api/v1/agents/{agent.agent.agent_id}/heartbeat",
        json.dumps({"running_task_ids": running}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {secret}", "X-Agent-Secret": agent.secret},
    )
    assert response.status_code == 200, response.content
    return response.json()


def cancelled_ids(answer: dict[str, Any]) -> list[int]:
    return [c["task_id"] for c in answer["cancellations"]]


def agents_a_and_b(pool: AgentPool) -> tuple[Registration, Registration]:
    # B registers first: its pod is the oldest, so bin-packing puts T1 on B's slot P2[0].
    b = make_agent_with_secret(pool, "P2")
    a = make_agent_with_secret(pool, "P1")
    return a, b


def test_cancel_reaches_only_the_agent_running_the_task_and_the_next_task_runs(
    client: Client,
) -> None:
    pool = make_pool()
    secret = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    a, b = agents_a_and_b(pool)
    ws_a = make_workspace(pool, "wsA")
    t1 = run(submit(ws_a, "plan"))
    assert (t1.agent_id, t1.pod_name, t1.slot_index) == (b.agent.agent_id, "P2", 0)
    t2 = submit(ws_a, "plan")

    task_cancel(task_id=t1.pk, actor="user:alice", reason="wrong branch")

    t1 = refresh(t1)
    assert (t1.status, t1.stage) == (TaskStatus.CANCELLED, Stage.COMPLETED)
    assert t1.completed_at is not None
    assert t1.error_message == "Cancelled by user:alice: wrong branch"
    assert cancelled_ids(heartbeat(client, secret, b, running=[t1.pk])) == [t1.pk]
    assert cancelled_ids(heartbeat(client, secret, a, running=[])) == []
    reconcile_pass()
    assert slot_states(pod_of(b.agent))[0] == (SlotState.IDLE, None)

    result = scheduler_pass()

    assert result.dispatched == [t2.pk]
    assert refresh(t2).status == TaskStatus.RUNNING


def test_cancelling_a_plan_and_apply_lets_the_workspaces_next_plan_and_apply_run(
    client: Client,
) -> None:
    pool = make_pool()
    secret = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    a, b = agents_a_and_b(pool)
    ws_a = make_workspace(pool, "wsA")
    t1 = run(submit(ws_a, "plan_and_apply"))
    t2 = submit(ws_a, "plan_and_apply")
    assert t2.pk in scheduler_pass().waiting  # strictly serial behind T1

    task_cancel(task_id=t1.pk, actor="user:alice", reason="wrong branch")

    assert cancelled_ids(heartbeat(client, secret, b, running=[t1.pk])) == [t1.pk]
    assert cancelled_ids(heartbeat(client, secret, a, running=[])) == []
    assert scheduler_pass().dispatched == [t2.pk]
    assert not Workspace.objects.get(pk=ws_a.pk).is_locked


def test_a_cancel_while_the_agent_is_offline_is_recorded_and_delivered_when_it_returns(
    client: Client,
) -> None:
    pool = make_pool()
    secret = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    _, b = agents_a_and_b(pool)
    t1 = run(submit(make_workspace(pool, "wsA"), "plan"))
    # Past the heartbeat timeout, short of timeout + grace (when the task would be failed
    # as lost instead of being cancelled).
    clock.advance(pool.heartbeat_timeout_seconds + 1)
    reconcile_pass()
    assert Agent.objects.get(pk=b.agent.pk).status == AgentStatus.OFFLINE

    task_cancel(task_id=t1.pk, actor="user:alice", reason="not needed")

    t1 = refresh(t1)
    assert t1.status == TaskStatus.CANCELLED
    assert t1.completed_at is not None
    assert Event.objects.filter(task_id=t1.pk, kind="task.cancelled").count() == 1
    assert slot_states(pod_of(b.agent))[0] == (SlotState.IDLE, None)
    assert cancelled_ids(heartbeat(client, secret, b, running=[t1.pk])) == [t1.pk]
    assert WorkspaceTask.objects.get(pk=t1.pk).status == TaskStatus.CANCELLED
