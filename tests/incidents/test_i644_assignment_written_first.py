"""I-644: the assignment is written before the agent hears of it."""

from __future__ import annotations

import pytest

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.lib import clock
from poolsadmin.pools.models import SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import Stage, TaskStatus
from poolsadmin.tasks.services import task_accept
from tests.ledger import make_agent, make_pool, make_workspace, pod_of, refresh, slot_states, submit

pytestmark = pytest.mark.django_db


def test_the_task_shows_its_agent_before_the_agent_hears_of_it() -> None:
    pool = make_pool()
    agent = make_agent(pool, "A")
    t1 = submit(make_workspace(pool), "plan")

    scheduler_pass()
    answer = agent_heartbeat(agent=agent, running_task_ids=[])
    seen_by_agent = refresh(t1)

    assert [a["task_id"] for a in answer.assignments] == [t1.pk]
    assert seen_by_agent.agent_id == agent.agent_id
    assert (seen_by_agent.status, seen_by_agent.stage) == (TaskStatus.RUNNING, Stage.PLANNING)
    assert seen_by_agent.started_at is not None
    assert task_diagnose(task=seen_by_agent).code == "dispatched"


def test_unacknowledged_dispatches_roll_back_with_backoff_and_success_resets_the_count() -> None:
    pool = make_pool()
    agent = make_agent(pool, "A")
    pod = pod_of(agent)
    t1 = submit(make_workspace(pool), "plan")
    delays = []

    for attempt in range(1, 7):
        assert scheduler_pass().dispatched == [t1.pk]
        clock.advance(30.5)
        agent_heartbeat(agent=agent, running_task_ids=[])  # alive, but never accepts
        rolled_back_at = clock.now()
        assert scheduler_pass().rolled_back == [t1.pk]
        t1 = refresh(t1)
        assert (t1.status, t1.stage, t1.agent_id, t1.started_at) == (
            TaskStatus.PENDING,
            Stage.PENDING,
            None,
            None,
        )
        assert t1.retry_count == attempt
        assert slot_states(pod)[0] == (SlotState.IDLE, None)
        assert task_diagnose(task=t1).code == "retry_backoff"
        assert t1.next_attempt_at is not None
        delay = t1.next_attempt_at - rolled_back_at
        delays.append(round(delay.total_seconds()))
        clock.advance(delay.total_seconds() - 0.5)
        assert scheduler_pass().dispatched == []  # not before its time
        clock.advance(0.5)

    assert delays == [5, 10, 20, 40, 60, 60]
    assert scheduler_pass().dispatched == [t1.pk]
    task_accept(task_id=t1.pk, agent=agent)
    assert refresh(t1).retry_count == 0
    assert refresh(t1).next_attempt_at is None
