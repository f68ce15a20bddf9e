"""The reconciler's ledger-side steps, through reconcile_pass() one pass at a time."""

from __future__ import annotations

import pytest

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.lib import clock
from poolsadmin.pools.models import SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.reconcile import reconcile_pass
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    refresh,
    run,
    slot_states,
    submit,
)

pytestmark = pytest.mark.django_db


def test_an_agent_without_heartbeat_for_the_timeout_goes_offline_and_is_kept() -> None:
    pool = make_pool(heartbeat_timeout_seconds=120)
    agent = make_agent(pool, "P1")
    clock.advance(119)
    assert reconcile_pass().agents_offline == []
    clock.advance(2)
    assert reconcile_pass().agents_offline == [agent.agent_id]
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.OFFLINE
    agent_heartbeat(agent=agent, running_task_ids=[])
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.ONLINE


def test_a_task_the_agent_stops_reporting_fails_after_the_grace_period() -> None:
    pool = make_pool(task_grace_seconds=60)
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    clock.advance(10)
    agent_heartbeat(agent=agent, running_task_ids=[])  # gone from the report
    clock.advance(30)
    agent_heartbeat(agent=agent, running_task_ids=[])
    assert reconcile_pass().tasks_failed == []
    clock.advance(31)
    agent_heartbeat(agent=agent, running_task_ids=[])
    assert reconcile_pass().tasks_failed == [task.pk]
    task = refresh(task)
    assert task.status == TaskStatus.FAILED
    assert "stopped reporting" in task.error_message
    assert slot_states(pod_of(agent))[0] == (SlotState.IDLE, None)


def test_a_task_reported_again_within_the_grace_period_survives() -> None:
    pool = make_pool(task_grace_seconds=60)
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    agent_heartbeat(agent=agent, running_task_ids=[])
    clock.advance(30)
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    clock.advance(60)
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    reconcile_pass()
    assert refresh(task).status == TaskStatus.RUNNING


def test_a_heartbeat_listing_a_task_the_ledger_does_not_assign_gets_a_cancel() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    answer = agent_heartbeat(agent=agent, running_task_ids=[424242])
    assert [c["task_id"] for c in answer.cancellations] == [424242]


def test_reservations_on_an_agent_lost_past_the_grace_period_are_dropped() -> None:
    pool = make_pool(heartbeat_timeout_seconds=120, task_grace_seconds=60)
    agent = make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    clock.advance(150)
    assert reconcile_pass().reservations_dropped == []
    clock.advance(40)
    assert reconcile_pass().reservations_dropped == [task.pk]
    task = refresh(task)
    assert task.status == TaskStatus.APPLY_PENDING
    assert slot_states(pod_of(agent))[0] == (SlotState.IDLE, None)
    assert task_diagnose(task=task).code == "reservation_lost"
