"""Why is this task waiting? (SPEC 9): codes that need no cluster, and their history."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.lib import clock
from poolsadmin.scheduler.diagnosis import diagnosis_record_all, task_diagnose, task_wait_history
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import WaitReason, WorkspaceTask
from poolsadmin.tasks.services import task_accept, task_confirm_apply
from poolsadmin.worker.reconcile import reconcile_pass
from tests.fleet import fleet_build, tasks_queue
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    refresh,
    run,
    submit,
)

pytestmark = pytest.mark.django_db


def test_an_unconfirmed_apply_says_who_planned_it_and_that_its_slot_waits_for_it() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    diagnosis = task_diagnose(task=task)
    assert diagnosis.code == "awaiting_confirmation"
    assert f"by agent {agent.agent_name};" in diagnosis.text
    assert "P1[0] stays reserved" in diagnosis.text


def test_no_pods_when_no_agent_ever_registered() -> None:
    pool = make_pool()
    task = submit(make_workspace(pool), "plan")
    assert task_diagnose(task=task).code == "no_pods"


def test_no_free_slot_names_the_reservations_that_hold_slots() -> None:
    pool = make_pool(slots_per_pod=2)
    make_agent(pool, "P1")
    reserved = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    run(submit(make_workspace(pool), "plan"))
    waiting = submit(make_workspace(pool), "plan")
    diagnosis = task_diagnose(task=waiting)
    assert diagnosis.code == "no_free_slot"
    assert "2 slots" in diagnosis.text and "1 running" in diagnosis.text
    assert f"1 reserved by #{reserved.pk}" in diagnosis.text


def test_a_lost_reservation_is_named_and_the_apply_takes_a_fresh_slot_with_re_init() -> None:
    pool = make_pool(reservation_ttl_seconds=60)
    make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    clock.advance(61)
    agent_heartbeat(agent=refresh(task).agent, running_task_ids=[])  # type: ignore[arg-type]
    assert reconcile_pass().reservations_expired == [task.pk]
    task = refresh(task)
    assert task.status == "apply_pending"
    assert task_diagnose(task=task).code == "reservation_lost"

    task_confirm_apply(task_id=task.pk, actor="user:alice")
    assert task_diagnose(task=refresh(task)).code == "reservation_lost"
    assert scheduler_pass().dispatched == [task.pk]
    task = refresh(task)
    assert task.stage == "applying" and task.reuse_workdir is False


def test_the_history_keeps_each_change_of_diagnosis() -> None:
    pool = make_pool()
    task = submit(make_workspace(pool), "plan")
    diagnosis_record_all()
    diagnosis_record_all()  # unchanged: no new row
    make_agent(pool, "P1")
    diagnosis_record_all()
    scheduler_pass()
    diagnosis_record_all()

    history = task_wait_history(task=task)
    assert [h.code for h in history] == ["no_pods", "dispatchable", "dispatched"]
    assert all(h.ended_at is not None for h in history[:-1])
    assert history[-1].ended_at is None
    run_task = refresh(task)
    task_accept(task_id=run_task.pk, agent=run_task.agent)  # type: ignore[arg-type]
    diagnosis_record_all()
    assert all(h.ended_at is not None for h in task_wait_history(task=task))


def _diagnosis_pass_queries(pods: int) -> tuple[int, int]:
    """Queries of the first diagnosis pass (every waiting task gets its first row) and of the
    second (nothing changed), over a pool of `pods` pods and 4 x `pods` waiting tasks."""
    fleet = fleet_build(
        pools=1, pods_per_pool=pods, slots_per_pod=2, workspaces=8, prefix=f"d{pods}"
    )
    tasks_queue(fleet, count=pods * 4, kinds=("plan", "plan_and_apply", "drift_check"))
    with CaptureQueriesContext(connection) as first:
        assert diagnosis_record_all() == pods * 4
    with CaptureQueriesContext(connection) as second:
        assert diagnosis_record_all() == 0
    # Out of the way of the next measure (test data: straight out of the tables).
    WaitReason.objects.all().delete()
    WorkspaceTask.objects.all().delete()
    return len(first), len(second)


def test_a_diagnosis_pass_costs_queries_for_its_changes_only_whatever_the_pool() -> None:
    small_first, small_second = _diagnosis_pass_queries(pods=5)
    big_first, big_second = _diagnosis_pass_queries(pods=20)
    # Nothing changed: the same few queries at 20 tasks and at 80, at 5 pods and at 20.
    assert big_second == small_second <= 10
    # Every task's first diagnosis is one new row: its INSERT (in a savepoint, which is two
    # statements more) and nothing else per task.
    assert big_first - small_first <= 3 * (80 - 20)


def test_a_pass_diagnoses_each_task_as_diagnosing_it_alone_would() -> None:
    pool = make_pool(slots_per_pod=2, plan_and_apply_per_pod=1)
    make_agent(pool, "P1")
    ws_a, ws_b = make_workspace(pool, "a"), make_workspace(pool, "b")
    run(submit(ws_a, "plan_and_apply"))  # P1 holds its plan_and_apply
    waiting = [
        submit(ws_b, "plan"),
        submit(ws_b, "plan_and_apply"),  # no pod may take another plan_and_apply
        submit(ws_a, "plan_and_apply"),  # serial behind the running one
        submit(ws_b, "drift_check"),
        submit(ws_a, "plan"),
    ]
    diagnosis_record_all()
    for task in waiting:
        alone = task_diagnose(task=refresh(task))
        (row,) = task_wait_history(task=task)
        assert (row.code, row.text, row.blocker) == (alone.code, alone.text, alone.blocker)
    codes = [task_wait_history(task=t)[0].code for t in waiting]
    assert codes == [
        "dispatchable",
        "plan_and_apply_capacity",
        "blocked_by_task",
        "dispatchable",
        "dispatchable",
    ]


def test_a_diagnosis_pass_reads_applies_slots_and_planners_once_not_per_task() -> None:
    """Applies waiting for confirmation (a nightly run leaves hundreds) and confirmed applies
    cost the unchanged pass no query each: their reserved slots and their planners' names
    are read once for the pass."""
    pool = make_pool(slots_per_pod=2, plan_and_apply_per_pod=1)
    for i in range(8):
        make_agent(pool, f"P{i}")

    def add_applies(n: int) -> None:
        for _ in range(n):
            plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
            confirmed = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
            task_confirm_apply(task_id=confirmed.pk, actor="user:test")

    def unchanged_pass() -> int:
        diagnosis_record_all()
        with CaptureQueriesContext(connection) as unchanged:
            assert diagnosis_record_all() == 0
        return len(unchanged)

    add_applies(1)
    few = unchanged_pass()
    add_applies(3)
    assert unchanged_pass() == few
