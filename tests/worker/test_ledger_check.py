"""The ledger check repairs drift. Drift cannot be reached through the services, so these
tests create it with direct UPDATEs (test-only) and check the repair and its drift event."""

from __future__ import annotations

import pytest

from poolsadmin.events.models import Event
from poolsadmin.pools.models import Slot, SlotState
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.worker.reconcile import ledger_check
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


def test_a_consistent_ledger_has_no_drift() -> None:
    pool = make_pool(slots_per_pod=2, plan_and_apply_per_pod=2)
    make_agent(pool, "P1")
    run(submit(make_workspace(pool), "plan"))
    plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    assert ledger_check(pool=pool) == []


def test_a_running_slot_whose_task_finished_is_freed_with_a_drift_event() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    WorkspaceTask.objects.filter(pk=task.pk).update(status=TaskStatus.SUCCESS)  # drift

    changes = ledger_check(pool=pool)

    assert [(c.kind, c.target) for c in changes] == [("drift.slot_mismatch", "P1[0]")]
    assert slot_states(pod_of(agent))[0] == (SlotState.IDLE, None)
    event = Event.objects.get(kind="drift.slot_mismatch")
    assert event.task_id == task.pk and event.target_id == "P1[0]"
    assert "success" in event.reason
    assert ledger_check(pool=pool) == []


def test_a_reserved_slot_whose_task_is_not_apply_pending_is_freed() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    WorkspaceTask.objects.filter(pk=task.pk).update(status=TaskStatus.CANCELLED)  # drift

    assert [c.kind for c in ledger_check(pool=pool)] == ["drift.slot_mismatch"]
    assert slot_states(pod_of(agent))[0] == (SlotState.IDLE, None)


def test_a_running_task_that_holds_no_slot_is_failed_with_a_drift_event() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    Slot.objects.filter(task=task).update(state=SlotState.IDLE, task=None)  # drift

    changes = ledger_check(pool=pool)

    assert [(c.kind, c.target) for c in changes] == [
        ("drift.task_without_slot", f"task #{task.pk}")
    ]
    task = refresh(task)
    assert task.status == TaskStatus.FAILED
    assert "held no slot" in task.error_message and "P1" in task.error_message
    assert Event.objects.filter(kind="drift.task_without_slot", task_id=task.pk).count() == 1


def test_a_dry_run_lists_the_drift_and_repairs_nothing() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    WorkspaceTask.objects.filter(pk=task.pk).update(status=TaskStatus.SUCCESS)
    events = Event.objects.count()

    assert [c.kind for c in ledger_check(pool=pool, dry_run=True)] == ["drift.slot_mismatch"]
    assert Event.objects.count() == events
    assert slot_states(pod_of(agent))[0] == (SlotState.RUNNING, task.pk)
