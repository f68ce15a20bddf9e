"""I-500: an unconfirmed plan is never applied."""

from __future__ import annotations

import pytest

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import Slot
from poolsadmin.scheduler.services import DispatchRefused, task_dispatch
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.tasks.services import task_confirm_apply
from poolsadmin.worker.loops import LOOPS
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, refresh, submit

pytestmark = pytest.mark.django_db


def _apply_dispatches(task_id: int) -> int:
    return Event.objects.filter(
        task_id=task_id, kind="task.dispatched", data__action="apply"
    ).count()


def test_no_scheduler_or_recovery_path_applies_an_unconfirmed_plan() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    t1 = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))

    # A minute of worker passes after a "restart": every loop, every few seconds, with the
    # agent heartbeating (idle) all along.
    for _ in range(20):
        clock.advance(3)
        agent_heartbeat(agent=agent, running_task_ids=[])
        for loop in LOOPS.values():
            loop.run_once()

    assert refresh(t1).status == TaskStatus.APPLY_PENDING
    assert _apply_dispatches(t1.pk) == 0
    assert agent_heartbeat(agent=agent, running_task_ids=[]).assignments == []


def test_dispatching_an_unconfirmed_apply_directly_is_refused_without_side_effects() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    t1 = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    events_before = Event.objects.count()
    slots_before = list(Slot.objects.values_list("id", "state", "task_id", "version"))

    with pytest.raises(DispatchRefused, match="never applied"):
        task_dispatch(task_id=t1.pk)

    assert Event.objects.count() == events_before
    assert list(Slot.objects.values_list("id", "state", "task_id", "version")) == slots_before
    assert refresh(t1).status == TaskStatus.APPLY_PENDING


def test_after_confirmation_exactly_one_apply_is_sent() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    t1 = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=t1.pk, actor="user:alice")

    for _ in range(5):
        for loop in LOOPS.values():
            loop.run_once()
    answers = [agent_heartbeat(agent=agent, running_task_ids=[]) for _ in range(3)]

    assert _apply_dispatches(t1.pk) == 1
    assert refresh(t1).status == TaskStatus.RUNNING
    # The unacknowledged assignment is repeated until accepted, but it is one dispatch.
    assert {a["task_id"] for answer in answers for a in answer.assignments} == {t1.pk}
