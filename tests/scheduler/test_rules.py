"""Scheduler rules 1-7 (SPEC 4) and freeze windows."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

import pytest

from poolsadmin.lib import clock
from poolsadmin.lib.errors import Forbidden
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.selectors import pool_freeze_state
from poolsadmin.pools.services import (
    pool_freeze_window_add,
    pool_pause,
    pool_resume,
    pool_unfreeze_once,
)
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.tasks.services import task_confirm_apply, task_submit, workspace_unlock
from tests.ledger import (
    finish,
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    refresh,
    run,
    submit,
)

pytestmark = pytest.mark.django_db


def test_a_locked_workspace_runs_no_plan_and_apply_or_drift_check_but_plans_run() -> None:
    pool = make_pool(slots_per_pod=8)
    make_agent(pool, "P1")
    ws = make_workspace(pool)
    owner = plan_with_changes(submit(ws, "plan_and_apply"))
    task_confirm_apply(task_id=owner.pk, actor="user:alice")
    owner = run(owner)
    # The apply fails while applying: the lock stays (state may be partial), and no later
    # plan_and_apply of the workspace may run, though none is blocked by rule 2 any more.
    finish(owner, TaskStatus.FAILED)
    later = submit(ws, "plan_and_apply")
    drift = submit(ws, "drift_check")
    plan = submit(ws, "plan")

    scheduler_pass()

    assert refresh(plan).status == TaskStatus.RUNNING  # speculative plans are independent
    assert refresh(later).status == TaskStatus.PENDING
    assert task_diagnose(task=refresh(later)).code == "workspace_locked"
    assert refresh(drift).status == TaskStatus.PENDING
    diagnosis = task_diagnose(task=refresh(drift))
    assert diagnosis.code == "workspace_locked"
    assert f"task #{owner.pk}" in diagnosis.text

    workspace_unlock(workspace_id=ws.pk, actor="user:admin", reason="reviewed")
    scheduler_pass()
    assert refresh(drift).status == TaskStatus.RUNNING
    assert refresh(later).status == TaskStatus.RUNNING


def test_plan_and_apply_tasks_of_a_workspace_are_strictly_serial() -> None:
    pool = make_pool(slots_per_pod=4, plan_and_apply_per_pod=4)
    make_agent(pool, "P1")
    ws = make_workspace(pool)
    first, second = submit(ws, "plan_and_apply"), submit(ws, "plan_and_apply")

    scheduler_pass()

    assert refresh(first).status == TaskStatus.RUNNING
    assert refresh(second).status == TaskStatus.PENDING
    diagnosis = task_diagnose(task=refresh(second))
    assert (diagnosis.code, diagnosis.blocker) == ("blocked_by_task", f"task:{first.pk}")

    finish(refresh(first), TaskStatus.PLANNED_AND_FINISHED)
    scheduler_pass()
    assert refresh(second).status == TaskStatus.RUNNING


def test_drift_checks_go_last_and_confirmed_applies_first() -> None:
    pool = make_pool(slots_per_pod=2, plan_and_apply_per_pod=2)
    agent = make_agent(pool, "P1")
    ws_apply = make_workspace(pool)
    apply_task = plan_with_changes(submit(ws_apply, "plan_and_apply"))
    finish_slot_holder = run(submit(make_workspace(pool), "plan"))
    # The pod now has one reserved and one running slot. Queue, in creation order:
    drift = submit(make_workspace(pool), "drift_check")
    plan_a = submit(make_workspace(pool), "plan")
    plan_b = submit(make_workspace(pool), "plan")
    task_confirm_apply(task_id=apply_task.pk, actor="user:alice")
    finish(finish_slot_holder)  # one slot frees up

    result = scheduler_pass()

    # The confirmed apply reuses its reserved slot; the freed slot goes to the oldest plan.
    assert result.dispatched == [apply_task.pk, plan_a.pk]
    assert refresh(plan_b).status == TaskStatus.PENDING
    assert refresh(drift).status == TaskStatus.PENDING
    assert agent.pool_id == pool.pool_id


def test_a_paused_pool_dispatches_nothing_new_until_resumed() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    pool_pause(pool_id=pool.pk, actor="user:admin", reason="maintenance")

    scheduler_pass()

    assert refresh(task).status == TaskStatus.PENDING
    diagnosis = task_diagnose(task=refresh(task))
    assert diagnosis.code == "pool_paused"
    assert "maintenance" in diagnosis.text and "user:admin" in diagnosis.text
    pool_resume(pool_id=pool.pk, actor="user:admin")
    scheduler_pass()
    assert refresh(task).status == TaskStatus.RUNNING


def test_a_frozen_pool_dispatches_nothing_until_an_admin_unfreezes_it_once() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    pool_freeze_window_add(
        pool=pool, weekdays=list(range(7)), start=time(0, 0), end=time(23, 59), actor="user:a"
    )
    task = submit(make_workspace(pool), "plan")

    scheduler_pass()
    assert refresh(task).status == TaskStatus.PENDING
    assert task_diagnose(task=refresh(task)).code == "pool_frozen"

    pool_unfreeze_once(pool_id=pool.pk, actor="user:admin", reason="hotfix")
    scheduler_pass()
    assert refresh(task).status == TaskStatus.RUNNING


def _at(pool: AgentPool, iso: str) -> bool:
    return pool_freeze_state(pool=pool, now=datetime.fromisoformat(iso)).frozen


def test_a_window_crossing_midnight_belongs_to_the_weekday_it_starts_on() -> None:
    pool = make_pool(freeze_timezone="Europe/Berlin")
    # Fridays 22:00 - 02:00 Berlin time.
    pool_freeze_window_add(pool=pool, weekdays=[4], start=time(22), end=time(2), actor="user:a")
    # 2026-11-27 is a Friday; Berlin is UTC+1 in November.
    assert not _at(pool, "2026-11-27T20:59:00+00:00")  # Fri 21:59 Berlin
    assert _at(pool, "2026-11-27T21:00:00+00:00")  # Fri 22:00 Berlin
    assert _at(pool, "2026-11-28T00:59:00+00:00")  # Sat 01:59 Berlin: still Friday's window
    assert not _at(pool, "2026-11-28T01:00:00+00:00")  # Sat 02:00 Berlin
    assert not _at(pool, "2026-11-28T21:30:00+00:00")  # Sat 22:30 Berlin: no Saturday window


def test_a_same_day_window_uses_the_pool_time_zone() -> None:
    pool = make_pool(freeze_timezone="America/New_York")
    pool_freeze_window_add(pool=pool, weekdays=[0], start=time(9), end=time(17), actor="user:a")
    # 2026-11-30 is a Monday; New York is UTC-5.
    assert not _at(pool, "2026-11-30T13:59:00+00:00")  # 08:59 local
    assert _at(pool, "2026-11-30T14:00:00+00:00")  # 09:00 local
    assert not _at(pool, "2026-11-30T22:00:00+00:00")  # 17:00 local


def test_a_one_time_unfreeze_lasts_until_the_end_of_the_local_day() -> None:
    pool = make_pool(freeze_timezone="Europe/Berlin")
    pool_freeze_window_add(pool=pool, weekdays=[4, 5], start=time(8), end=time(20), actor="u")
    friday_noon = datetime(2026, 11, 27, 11, 0, tzinfo=UTC)
    with clock.frozen_at(friday_noon):
        pool = pool_unfreeze_once(pool_id=pool.pk, actor="user:admin", reason="hotfix")
    assert not _at(pool, "2026-11-27T18:00:00+00:00")  # Friday 19:00 Berlin: unfrozen
    assert _at(pool, "2026-11-28T09:00:00+00:00")  # Saturday 10:00 Berlin: frozen again


def test_a_workspace_without_permission_for_the_pool_cannot_submit() -> None:
    pool = make_pool()
    ws = make_workspace(make_pool(name="other"))
    ws.current_pool = pool
    with pytest.raises(Forbidden):
        task_submit(workspace=ws, task_type="plan", actor="user:a")


def test_a_pass_walks_each_pool_once_and_stops_trying_a_full_pool(
    django_assert_max_num_queries: Any,
) -> None:
    pool = make_pool(slots_per_pod=2)
    make_agent(pool, "P1")
    for _ in range(30):
        submit(make_workspace(pool), "plan")
    # 2 dispatches (~13 queries each) + 1 attempt that finds the pool full + listings.
    with django_assert_max_num_queries(45):
        result = scheduler_pass()
    assert len(result.dispatched) == 2
