"""Every allowed transition of SPEC 3, and a sample of refused ones."""

from __future__ import annotations

import pytest

from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, Forbidden, InvalidInput
from poolsadmin.pools.models import AgentPool, SlotState
from poolsadmin.scheduler.services import DispatchRefused, scheduler_pass, task_dispatch
from poolsadmin.tasks.models import Stage, TaskStatus, Workspace
from poolsadmin.tasks.services import (
    task_accept,
    task_cancel,
    task_confirm_apply,
    task_fail_lost,
    task_report,
    workspace_unlock,
)
from poolsadmin.worker.reconcile import reconcile_pass
from tests.ledger import (
    agent_of,
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


@pytest.fixture
def pool() -> AgentPool:
    pool = make_pool()
    make_agent(pool, "P1")
    return pool


def _kinds(task_id: int) -> list[str]:
    return list(
        Event.objects.filter(task_id=task_id, target_type="task").values_list("kind", flat=True)
    )


def test_submission_creates_a_pending_task(pool: AgentPool) -> None:
    task = submit(make_workspace(pool), "plan")
    assert (task.status, task.stage) == (TaskStatus.PENDING, Stage.PENDING)
    assert _kinds(task.pk) == ["task.submitted"]


def test_dispatch_moves_pending_to_running_planning(pool: AgentPool) -> None:
    task = submit(make_workspace(pool), "plan")
    assert task_dispatch(task_id=task.pk).dispatched
    task = refresh(task)
    assert (task.status, task.stage) == (TaskStatus.RUNNING, Stage.PLANNING)
    assert task.started_at is not None


def test_an_unacknowledged_dispatch_goes_back_to_pending(pool: AgentPool) -> None:
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    clock.advance(31)
    scheduler_pass()
    assert refresh(task).status == TaskStatus.PENDING
    assert "task.dispatch_expired" in _kinds(task.pk)


@pytest.mark.parametrize("task_type", ["plan", "drift_check"])
def test_a_finished_plan_or_drift_check_is_success(pool: AgentPool, task_type: str) -> None:
    task = finish(run(submit(make_workspace(pool), task_type)), TaskStatus.SUCCESS)
    assert (task.status, task.stage) == (TaskStatus.SUCCESS, Stage.COMPLETED)
    assert task.completed_at is not None
    assert slot_states(pod_of(agent_of(task)))[0] == (SlotState.IDLE, None)


def test_a_plan_and_apply_without_changes_is_planned_and_finished(pool: AgentPool) -> None:
    task = finish(run(submit(make_workspace(pool), "plan_and_apply")), "planned_and_finished")
    assert task.status == TaskStatus.PLANNED_AND_FINISHED
    assert slot_states(pod_of(agent_of(task)))[0] == (SlotState.IDLE, None)


def test_a_plan_with_changes_reserves_the_slot_and_locks_the_workspace(pool: AgentPool) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    assert (task.status, task.stage) == (TaskStatus.APPLY_PENDING, Stage.APPLY_PENDING)
    assert (task.plan_pod_name, task.plan_slot_index) == ("P1", 0)
    assert slot_states(pod_of(agent_of(task)))[0] == (SlotState.RESERVED, task.pk)
    workspace = Workspace.objects.get(pk=task.workspace_id)
    assert workspace.is_locked and workspace.locked_by == "system"
    assert workspace.lock_reason == f"Locked for apply (task #{task.pk})"


def test_confirming_keeps_apply_pending_and_records_who(pool: AgentPool) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task = task_confirm_apply(task_id=task.pk, actor="user:alice", description="ship it")
    assert task.status == TaskStatus.APPLY_PENDING
    assert (task.apply_confirmed_by, task.apply_description) == ("user:alice", "ship it")
    assert task.apply_confirmed_at is not None
    with pytest.raises(Conflict, match="already confirmed"):
        task_confirm_apply(task_id=task.pk, actor="user:bob")


def test_a_confirmed_apply_dispatches_to_running_applying_and_ends_applied(pool: AgentPool) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task = run(task)
    assert (task.status, task.stage) == (TaskStatus.RUNNING, Stage.APPLYING)
    task = finish(task, TaskStatus.APPLIED)
    assert task.status == TaskStatus.APPLIED
    assert not Workspace.objects.get(pk=task.workspace_id).is_locked


def test_an_unacknowledged_apply_goes_back_to_confirmed_apply_pending(pool: AgentPool) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task_dispatch(task_id=task.pk)
    clock.advance(31)
    scheduler_pass()
    task = refresh(task)
    assert (task.status, task.apply_confirmed_by) == (TaskStatus.APPLY_PENDING, "user:alice")


def test_an_agent_reported_failure_fails_the_task_and_frees_the_slot(pool: AgentPool) -> None:
    task = run(submit(make_workspace(pool), "plan"))
    task_report(task_id=task.pk, agent=agent_of(task), status="failed", error_message="boom")
    task = refresh(task)
    assert (task.status, task.error_message) == (TaskStatus.FAILED, "boom")
    assert slot_states(pod_of(agent_of(task)))[0] == (SlotState.IDLE, None)


def test_a_failed_apply_keeps_the_workspace_locked_with_a_reason(pool: AgentPool) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task = run(task)
    task_report(task_id=task.pk, agent=agent_of(task), status="failed", error_message="boom")
    workspace = Workspace.objects.get(pk=task.workspace_id)
    assert workspace.is_locked
    assert "failed while applying" in workspace.lock_reason
    assert "partial" in workspace.lock_reason


def test_a_task_on_a_lost_agent_fails_after_the_grace_period(pool: AgentPool) -> None:
    task = run(submit(make_workspace(pool), "plan"))
    clock.advance(pool.heartbeat_timeout_seconds + 1)
    reconcile_pass()
    assert refresh(task).status == TaskStatus.RUNNING  # offline, but inside the grace period
    clock.advance(pool.task_grace_seconds)
    reconcile_pass()
    task = refresh(task)
    assert task.status == TaskStatus.FAILED
    assert "P1" in task.error_message and "stopped heartbeating" in task.error_message


@pytest.mark.parametrize("state", ["pending", "apply_pending", "running"])
def test_a_user_can_cancel_a_waiting_or_running_task(pool: AgentPool, state: str) -> None:
    workspace = make_workspace(pool)
    task = submit(workspace, "plan_and_apply")
    if state == "running":
        task = run(task)
    elif state == "apply_pending":
        task = plan_with_changes(task)
    task = task_cancel(task_id=task.pk, actor="user:alice", reason="not needed")
    assert (task.status, task.stage) == (TaskStatus.CANCELLED, Stage.COMPLETED)
    assert task.completed_at is not None and "alice" in task.error_message
    assert not Workspace.objects.get(pk=workspace.pk).is_locked
    agent = Agent.objects.get(pool=pool, agent_name="P1")
    assert not any(state != "idle" for state, _ in slot_states(pod_of(agent)))


@pytest.mark.parametrize("reason", ["", "  "])
def test_a_cancel_needs_a_reason(pool: AgentPool, reason: str) -> None:
    task = submit(make_workspace(pool), "plan")
    events = Event.objects.count()
    with pytest.raises(InvalidInput, match="reason") as refused:
        task_cancel(task_id=task.pk, actor="user:alice", reason=reason)
    assert refused.value.field == "reason"
    assert refresh(task).status == TaskStatus.PENDING
    assert Event.objects.count() == events


def test_cancelling_an_apply_that_is_applying_needs_force_and_keeps_the_lock(
    pool: AgentPool,
) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task = run(task)
    with pytest.raises(Conflict, match="force"):
        task_cancel(task_id=task.pk, actor="user:alice", reason="stuck")
    assert refresh(task).status == TaskStatus.RUNNING
    task = task_cancel(task_id=task.pk, actor="user:alice", reason="stuck", force=True)
    assert task.status == TaskStatus.CANCELLED
    assert Workspace.objects.get(pk=task.workspace_id).is_locked


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("terminal", ["success", "failed", "cancelled"])
def test_terminal_states_are_sticky(pool: AgentPool, terminal: str) -> None:
    task = run(submit(make_workspace(pool), "plan"))
    agent = agent_of(task)
    if terminal == "cancelled":
        task_cancel(task_id=task.pk, actor="user:alice", reason="not needed")
    else:
        task_report(task_id=task.pk, agent=agent, status=terminal)
    events = Event.objects.count()
    for status in ["running", "success", "failed", "apply_pending"]:
        with pytest.raises(Conflict):
            task_report(task_id=task.pk, agent=agent, status=status, stage="x")
    with pytest.raises(Conflict):
        task_accept(task_id=task.pk, agent=agent)
    with pytest.raises(Conflict):
        task_cancel(task_id=task.pk, actor="user:alice", reason="not needed")
    with pytest.raises(DispatchRefused):
        task_dispatch(task_id=task.pk)
    assert task_fail_lost(task_id=task.pk, message="late", actor="system:reconciler") is None
    assert refresh(task).status == terminal
    assert Event.objects.count() == events


def test_refused_transitions_say_why_and_change_nothing(pool: AgentPool) -> None:
    plan = run(submit(make_workspace(pool), "plan"))
    apply_task = run(submit(make_workspace(pool), "plan_and_apply"))
    agent = agent_of(plan)
    with pytest.raises(Conflict, match="not applying"):
        task_report(task_id=plan.pk, agent=agent, status="applied")
    with pytest.raises(Conflict, match="planned_and_finished or apply_pending"):
        task_report(task_id=apply_task.pk, agent=agent, status="success")
    with pytest.raises(Conflict, match="success or failed"):
        task_report(task_id=plan.pk, agent=agent, status="apply_pending")
    with pytest.raises(Conflict, match="only apply_pending"):
        task_confirm_apply(task_id=plan.pk, actor="user:alice")
    with pytest.raises(InvalidInput):
        task_report(task_id=plan.pk, agent=agent, status="cancelled")
    with pytest.raises(DispatchRefused):
        task_dispatch(task_id=plan.pk)
    assert (refresh(plan).status, refresh(apply_task).status) == ("running", "running")


def test_only_the_assigned_agent_may_report(pool: AgentPool) -> None:
    other = make_agent(pool, "P2")
    task = run(submit(make_workspace(pool), "plan"))
    assert task.agent_id != other.agent_id
    with pytest.raises(Forbidden):
        task_report(task_id=task.pk, agent=other, status="success")
    with pytest.raises(Forbidden):
        task_accept(task_id=task.pk, agent=other)
    assert refresh(task).status == TaskStatus.RUNNING


def test_an_agent_cannot_talk_an_unconfirmed_plan_into_an_apply(pool: AgentPool) -> None:
    task = run(submit(make_workspace(pool), "plan_and_apply"))
    agent = agent_of(task)
    with pytest.raises(Conflict, match="set by the scheduler"):
        task_report(task_id=task.pk, agent=agent, status="running", stage="applying")
    with pytest.raises(Conflict, match="not applying"):
        task_report(task_id=task.pk, agent=agent, status="applied")
    task = task_report(task_id=task.pk, agent=agent, status="running", stage="initializing")
    assert (task.status, task.stage) == (TaskStatus.RUNNING, "initializing")
    with pytest.raises(Conflict, match="not applying"):
        task_report(task_id=task.pk, agent=agent, status="applied")
    assert refresh(task).status == TaskStatus.RUNNING


def test_an_agent_may_report_planning_again_after_its_own_progress_stage(pool: AgentPool) -> None:
    task = run(submit(make_workspace(pool), "plan"))
    agent = agent_of(task)
    task_report(task_id=task.pk, agent=agent, status="running", stage="initializing")
    task = task_report(task_id=task.pk, agent=agent, status="running", stage="planning")
    assert task.stage == "planning"


def test_an_unacknowledged_apply_dispatch_is_cancelled_without_force_and_unlocks(
    pool: AgentPool,
) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task_dispatch(task_id=task.pk)
    task = task_cancel(task_id=task.pk, actor="user:alice", reason="changed my mind")
    assert task.status == TaskStatus.CANCELLED
    assert not Workspace.objects.get(pk=task.workspace_id).is_locked


def test_keeping_the_lock_records_nothing_when_an_admin_already_unlocked(
    pool: AgentPool,
) -> None:
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task = run(task)
    workspace_unlock(workspace_id=task.workspace_id, actor="user:admin", reason="reviewed")
    task_report(task_id=task.pk, agent=agent_of(task), status="failed", error_message="boom")
    assert not Workspace.objects.get(pk=task.workspace_id).is_locked
    assert not Event.objects.filter(task_id=task.pk, kind="workspace.lock_kept").exists()
