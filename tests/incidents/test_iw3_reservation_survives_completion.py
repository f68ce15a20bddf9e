"""I-W3: the reservation survives the plan's completion message, through the agent API.

The agent tells the server two things when a plan_and_apply plan with changes ends: the
outcome (`PUT .../status` apply_pending) and, in its next heartbeat, that it no longer runs
the task. Whichever arrives first, the plan's slot must stay reserved for the apply.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from poolsadmin.agents.services import Registration
from poolsadmin.lib import clock
from poolsadmin.pools.models import Pod, Slot, SlotState
from poolsadmin.pools.services import pool_token_create
from poolsadmin.tasks.models import Stage, TaskStatus, WorkspaceTask
from poolsadmin.worker.reconcile import reconcile_pass
from tests.ledger import (
    ADMIN,
    make_agent_with_secret,
    make_pool,
    make_workspace,
    pod_of,
    refresh,
    run,
    submit,
)

pytestmark = pytest.mark.django_db


class AgentHttp:
    def __init__(self, client: Client, secret: str, registration: Registration) -> None:
        self.client = client
        self.headers = {
            "Authorization": f"Bearer {secret}",
            "X-Agent-Secret": registration.secret,
        }
        self.agent = registration.agent

    def heartbeat(self, running: list[int]) -> dict[str, Any]:
        response = self.client.post(
            f"/api/v1/agents/{self.agent.agent_id}/heartbeat",
            json.dumps({"running_task_ids": running}),
            content_type="application/json",
            headers=self.headers,
        )
        assert response.status_code == 200, response.content
        return response.json()

    def report(self, task: WorkspaceTask, status: str) -> int:
        response = self.client.put(
            f"/api/v1/agents/tasks/{task.pk}/status",
            json.dumps({"agent_id": self.agent.agent_id, "status": status}),
            content_type="application/json",
            headers=self.headers,
        )
        return response.status_code


def planning_on_p1(client: Client) -> tuple[WorkspaceTask, Pod, AgentHttp]:
    pool = make_pool()
    registration = make_agent_with_secret(pool, "P1")
    t1 = run(submit(make_workspace(pool, "wsA"), "plan_and_apply"))
    assert (t1.status, t1.stage, t1.pod_name, t1.slot_index) == ("running", "planning", "P1", 0)
    secret = pool_token_create(pool=pool, name="agent", actor=ADMIN).secret
    return t1, pod_of(registration.agent), AgentHttp(client, secret, registration)


def p1_slot0(pod: Pod) -> tuple[str, int | None]:
    slot = Slot.objects.get(pod=pod, index=0)
    return slot.state, slot.task_id


@pytest.mark.parametrize("finished_first", [False, True], ids=["outcome-first", "finish-first"])
def test_the_plans_slot_stays_reserved_whichever_message_arrives_first(
    client: Client, finished_first: bool
) -> None:
    t1, p1, agent = planning_on_p1(client)

    if finished_first:
        assert agent.heartbeat(running=[]) == {"assignments": [], "cancellations": []}
        assert agent.report(t1, "apply_pending") == 200
    else:
        assert agent.report(t1, "apply_pending") == 200
        assert agent.heartbeat(running=[]) == {"assignments": [], "cancellations": []}

    t1 = refresh(t1)
    assert (t1.status, t1.stage) == (TaskStatus.APPLY_PENDING, Stage.APPLY_PENDING)
    assert t1.unreported_since is None
    assert p1_slot0(p1) == (SlotState.RESERVED, t1.pk)


@pytest.mark.parametrize("finished_first", [False, True], ids=["outcome-first", "finish-first"])
def test_the_reservation_outlives_the_grace_period_for_unreported_tasks(
    client: Client, finished_first: bool
) -> None:
    t1, p1, agent = planning_on_p1(client)
    if finished_first:
        agent.heartbeat(running=[])
    agent.report(t1, "apply_pending")
    agent.heartbeat(running=[])
    grace = t1.pool.task_grace_seconds

    # Past the grace period for tasks an agent stopped reporting, while the agent stays
    # online: only the heartbeat cross-check could take the slot, and it must not.
    clock.advance(grace + 30)
    agent.heartbeat(running=[])
    result = reconcile_pass()

    assert result.tasks_failed == []
    assert result.reservations_dropped == []
    assert refresh(t1).status == TaskStatus.APPLY_PENDING
    assert p1_slot0(p1) == (SlotState.RESERVED, t1.pk)


def test_a_late_completion_report_after_apply_pending_is_refused_and_keeps_the_reservation(
    client: Client,
) -> None:
    t1, p1, agent = planning_on_p1(client)
    agent.report(t1, "apply_pending")

    assert agent.report(t1, "success") == 409
    assert agent.report(t1, "planned_and_finished") == 409

    assert refresh(t1).status == TaskStatus.APPLY_PENDING
    assert p1_slot0(p1) == (SlotState.RESERVED, t1.pk)
