"""I-604 (static pools): an agent whose heartbeat is stale takes no work."""

from __future__ import annotations

import pytest

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.lib import clock
from poolsadmin.pools.models import Slot, SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from tests.ledger import make_agent, make_pool, make_workspace, refresh, submit

pytestmark = pytest.mark.django_db


def test_a_stale_agent_takes_no_work_and_the_task_goes_to_an_online_agent() -> None:
    pool = make_pool()
    clock.advance(-300)
    make_agent(pool, "P1")  # last heartbeat five minutes ago
    clock.reset()
    make_agent(pool, "P2")
    t1 = submit(make_workspace(pool), "plan")

    scheduler_pass()

    assert refresh(t1).pod_name == "P2"


def test_with_only_a_stale_agent_the_task_waits_names_it_and_runs_once_it_is_back() -> None:
    pool = make_pool()
    clock.advance(-300)
    stale = make_agent(pool, "P1")
    clock.reset()
    t1 = submit(make_workspace(pool), "plan")

    scheduler_pass()

    t1 = refresh(t1)
    assert t1.status == TaskStatus.PENDING
    assert not Slot.objects.exclude(state=SlotState.IDLE).exists()
    diagnosis = task_diagnose(task=t1)
    assert diagnosis.code == "no_online_agents"
    assert "P1" in diagnosis.text and "offline" in diagnosis.text

    agent_heartbeat(agent=stale, running_task_ids=[])
    scheduler_pass()
    assert (refresh(t1).status, refresh(t1).agent_id) == (TaskStatus.RUNNING, stale.agent_id)
