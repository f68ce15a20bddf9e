"""I-606 placement rules and I-CAP: one plan and one plan_and_apply need one pod."""

from __future__ import annotations

import pytest

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.lib import clock
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from tests.ledger import (
    finish,
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


def test_a_reserved_slot_leaves_room_for_plans_but_not_for_another_plan_and_apply() -> None:
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    t1 = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    t2 = submit(make_workspace(pool), "plan")
    t3 = submit(make_workspace(pool), "plan_and_apply")

    scheduler_pass()

    assert slot_states(p1)[:2] == [("reserved", t1.pk), ("running", t2.pk)]
    assert refresh(t3).status == TaskStatus.PENDING
    diagnosis = task_diagnose(task=refresh(t3))
    assert diagnosis.code == "plan_and_apply_capacity"
    assert f"#{t1.pk}" in diagnosis.text

    # Another pod: T3 goes there.
    p2 = pod_of(make_agent(pool, "P2"))
    scheduler_pass()
    assert slot_states(p2)[0] == ("running", t3.pk)


def test_a_running_plan_and_apply_leaves_room_for_plans_only() -> None:
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    t1 = run(submit(make_workspace(pool), "plan_and_apply"))
    plans = [submit(make_workspace(pool), "plan") for _ in range(3)]
    other = submit(make_workspace(pool), "plan_and_apply")

    scheduler_pass()

    assert slot_states(p1) == [("running", t1.pk)] + [("running", t.pk) for t in plans]
    assert refresh(other).status == TaskStatus.PENDING


def test_running_plans_do_not_count_against_the_plan_and_apply_limit() -> None:
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    run(submit(make_workspace(pool), "plan"))
    run(submit(make_workspace(pool), "plan"))
    t3 = submit(make_workspace(pool), "plan_and_apply")

    scheduler_pass()

    assert slot_states(p1)[2] == ("running", t3.pk)


def test_one_plan_and_apply_and_three_plans_fill_one_pod_and_a_fifth_waits() -> None:
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    t1 = submit(make_workspace(pool), "plan_and_apply")
    plans = [submit(make_workspace(pool), "plan") for _ in range(3)]
    fifth = submit(make_workspace(pool), "plan")

    result = scheduler_pass()

    assert sorted(result.dispatched) == sorted([t1.pk] + [t.pk for t in plans])
    assert {task_id for _, task_id in slot_states(p1)} == {t1.pk} | {t.pk for t in plans}
    assert refresh(fifth).status == TaskStatus.PENDING
    assert task_diagnose(task=refresh(fifth)).code == "no_free_slot"


def test_one_plan_and_one_plan_and_apply_of_a_workspace_share_one_pod() -> None:
    """I-CAP."""
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    ws_a = make_workspace(pool, "wsA")
    t1 = submit(ws_a, "plan")
    t2 = submit(ws_a, "plan_and_apply")

    scheduler_pass()

    assert slot_states(p1)[:2] == [("running", t1.pk), ("running", t2.pk)]


def test_the_busiest_pod_is_filled_first_even_when_an_older_pod_is_idle() -> None:
    pool = make_pool()
    clock.advance(-300)
    p1 = pod_of(make_agent(pool, "P1"))  # the older pod; its heartbeat is stale for now
    clock.reset()
    p2 = pod_of(make_agent(pool, "P2"))
    first = run(submit(make_workspace(pool), "plan"))
    assert first.pod_name == "P2"
    agent_heartbeat(agent=p1.agent, running_task_ids=[])  # type: ignore[arg-type]

    nxt = run(submit(make_workspace(pool), "plan"))

    assert nxt.pod_name == "P2"  # busier beats older
    assert all(state == "idle" for state, _ in slot_states(p1))
    assert slot_states(p2)[:2] == [("running", first.pk), ("running", nxt.pk)]


def test_between_equally_busy_pods_the_oldest_wins() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    make_agent(pool, "P2")
    assert run(submit(make_workspace(pool), "plan")).pod_name == "P1"


def test_two_plan_and_applies_of_two_workspaces_on_one_pod_pool_run_one_after_the_other() -> None:
    """I-515 with room for one: T2 waits until T1 is terminal and its slot free."""
    pool = make_pool()
    make_agent(pool, "P1")
    t1 = submit(make_workspace(pool, "wsA"), "plan_and_apply")
    t2 = submit(make_workspace(pool, "wsB"), "plan_and_apply")

    scheduler_pass()
    t1 = refresh(t1)
    assert t1.status == TaskStatus.RUNNING
    assert refresh(t2).status == TaskStatus.PENDING
    diagnosis = task_diagnose(task=refresh(t2))
    assert diagnosis.code == "plan_and_apply_capacity"
    assert f"#{t1.pk}" in diagnosis.text

    finish(t1, TaskStatus.PLANNED_AND_FINISHED)
    scheduler_pass()
    assert refresh(t2).status == TaskStatus.RUNNING
