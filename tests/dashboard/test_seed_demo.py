"""seed_demo: the founding incident, reproducible, idempotent, and fixable by a confirm."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from poolsadmin.agents.models import Agent
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_AGENT_NAMES,
    DEMO_NAMESPACE,
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    INCIDENT_WORKSPACE_ID,
    demo_ledger_outdated,
)
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, Pod, PodPhase, PoolToken, PoolType, Slot, SlotState
from poolsadmin.pools.services import pool_create, pool_token_authenticate
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import Stage, TaskStatus, TaskType, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path
    return tmp_path


def seed(*args: str) -> None:
    call_command("seed_demo", *args, stdout=open("/dev/null", "w"))  # noqa: SIM115


def ledger_counts() -> dict[str, int]:
    models = (AgentPool, PoolToken, Pod, Slot, Agent, Workspace, WorkspaceTask, Event, User)
    return {model.__name__: model.objects.count() for model in models}


def test_seed_demo_creates_the_pool_the_workspace_and_task_598_on_its_reserved_slot() -> None:
    seed()

    pool = AgentPool.objects.get(pk=DEMO_POOL_ID)
    assert (pool.slots_per_pod, pool.plan_and_apply_per_pod) == (4, 1)
    assert (pool.pool_type, pool.namespace, pool.min_replicas, pool.max_replicas) == (
        PoolType.K8S,
        DEMO_NAMESPACE,
        2,
        4,
    )
    assert pool.pod_image
    # The pool's first pods, each linked to the agent named after it (the pod name is the
    # agent name).
    pods = {p.name: p for p in Pod.objects.filter(pool=pool).select_related("agent")}
    assert set(pods) == set(DEMO_AGENT_NAMES)
    for name, pod in pods.items():
        assert pod.phase == PodPhase.RUNNING
        assert pod.agent is not None and pod.agent.agent_name == name
    assert set(Agent.objects.filter(pool=pool).values_list("agent_name", flat=True)) == set(
        DEMO_AGENT_NAMES
    )
    workspace = Workspace.objects.get(pk=INCIDENT_WORKSPACE_ID)
    task = WorkspaceTask.objects.get(pk=INCIDENT_TASK_ID)
    assert (task.workspace_id, task.task_type) == (INCIDENT_WORKSPACE_ID, TaskType.PLAN_AND_APPLY)
    assert (task.status, task.stage, task.apply_confirmed_by) == (
        TaskStatus.APPLY_PENDING,
        Stage.APPLY_PENDING,
        "",
    )
    slot = Slot.objects.select_related("pod").get(task_id=INCIDENT_TASK_ID)
    assert slot.state == SlotState.RESERVED
    assert slot.pod.name == task.plan_pod_name == DEMO_AGENT_NAMES[0]
    assert workspace.is_locked and workspace.lock_task_id == INCIDENT_TASK_ID
    # The queue behind it is pending, for the scheduler and the simulated agents to run.
    later = WorkspaceTask.objects.filter(pk__gt=INCIDENT_TASK_ID)
    assert later.exists()
    assert set(later.values_list("status", flat=True)) == {TaskStatus.PENDING}
    assert User.objects.get(username="admin").groups.filter(name="admin").exists()
    assert User.objects.get(username="viewer").groups.filter(name="viewer").exists()


def test_seed_demo_writes_a_working_pool_token_for_the_simulated_agents(var_dir: Path) -> None:
    seed()
    secret = (var_dir / "demo-token").read_text().strip()
    assert pool_token_authenticate(secret=secret).pool_id == DEMO_POOL_ID


def test_seed_demo_run_twice_changes_nothing(var_dir: Path) -> None:
    seed()
    before = ledger_counts()
    token = (var_dir / "demo-token").read_text()

    seed()

    assert ledger_counts() == before
    assert (var_dir / "demo-token").read_text() == token


def test_seed_demo_makes_a_new_token_when_the_file_is_gone(var_dir: Path) -> None:
    seed()
    (var_dir / "demo-token").unlink()
    seed()
    secret = (var_dir / "demo-token").read_text().strip()
    assert pool_token_authenticate(secret=secret).pool_id == DEMO_POOL_ID
    assert PoolToken.objects.filter(pool_id=DEMO_POOL_ID).count() == 2


def test_seed_demo_reset_replays_the_incident_after_it_was_resolved() -> None:
    seed()
    task_confirm_apply(task_id=INCIDENT_TASK_ID, actor="user:alice")

    seed("--reset")

    task = WorkspaceTask.objects.get(pk=INCIDENT_TASK_ID)
    assert (task.status, task.apply_confirmed_by) == (TaskStatus.APPLY_PENDING, "")
    assert Slot.objects.get(task_id=INCIDENT_TASK_ID).state == SlotState.RESERVED
    assert User.objects.filter(username__in=["admin", "viewer"]).count() == 2


def test_task_598_waits_for_confirmation_and_names_its_reserved_slot() -> None:
    seed()
    task = WorkspaceTask.objects.select_related("pool", "workspace").get(pk=INCIDENT_TASK_ID)

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "awaiting_confirmation"
    assert f"{DEMO_AGENT_NAMES[0]}[0] stays reserved" in diagnosis.text


def test_confirmed_task_598_is_dispatched_to_its_own_reserved_slot() -> None:
    seed()
    slot = Slot.objects.select_related("pod").get(task_id=INCIDENT_TASK_ID)

    task_confirm_apply(task_id=INCIDENT_TASK_ID, actor="user:alice")
    task = WorkspaceTask.objects.select_related("pool", "workspace").get(pk=INCIDENT_TASK_ID)
    assert task_diagnose(task=task).code == "dispatchable"
    result = scheduler_pass()

    assert INCIDENT_TASK_ID in result.dispatched
    assert INCIDENT_TASK_ID not in result.waiting
    task.refresh_from_db()
    assert (task.status, task.stage) == (TaskStatus.RUNNING, Stage.APPLYING)
    assert (task.pod_name, task.slot_index, task.reuse_workdir) == (
        slot.pod.name,
        slot.index,
        True,
    )
    slot.refresh_from_db()
    assert (slot.state, slot.task_id) == (SlotState.RUNNING, INCIDENT_TASK_ID)


def test_a_static_demo_pool_of_an_earlier_seed_is_outdated_and_reset_replaces_it() -> None:
    pool_create(pool_id=DEMO_POOL_ID, name="prod-agents", actor="user:test")
    assert demo_ledger_outdated()

    seed("--reset")

    assert not demo_ledger_outdated()
    assert AgentPool.objects.get(pk=DEMO_POOL_ID).pool_type == PoolType.K8S
    assert Slot.objects.get(task_id=INCIDENT_TASK_ID).state == SlotState.RESERVED
