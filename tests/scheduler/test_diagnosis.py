"""Why is this task waiting? (SPEC 9): codes that need no cluster, and their history."""

from __future__ import annotations

import pytest

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.lib import clock
from poolsadmin.scheduler.diagnosis import diagnosis_record_all, task_diagnose, task_wait_history
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.services import task_accept, task_confirm_apply
from poolsadmin.worker.reconcile import reconcile_pass
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
