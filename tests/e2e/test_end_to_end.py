"""End to end over HTTP: a live server, two reference agents in threads, the admin API for
submission and confirmation, and the worker's scheduler loop driven from the test.

A plan and a plan_and_apply go all the way: the plan succeeds, the plan_and_apply plan finds
changes and holds its slot reserved, a user confirms, and the apply runs on the plan's own
slot with its warm working directory (I-598).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User
from pytest_django.live_server_helper import LiveServer

from poolsadmin.agents.models import Agent
from poolsadmin.agents.reference import ReferenceAgent, Simulation
from poolsadmin.api.services import api_token_create
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, Slot, SlotState
from poolsadmin.pools.services import pool_token_create
from poolsadmin.tasks.models import TaskStatus, Workspace, WorkspaceTask
from poolsadmin.worker.loops import LOOPS
from tests.ledger import ADMIN, make_pool, make_workspace

pytestmark = pytest.mark.django_db(transaction=True)

DEADLINE_SECONDS = 30.0


def admin_call(live_server: LiveServer, secret: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{live_server.url}/api/v1/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def work_until(condition: Callable[[], bool], what: str) -> None:
    """Run scheduler passes, as the worker does, until `condition` holds or the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {DEADLINE_SECONDS} s")
        LOOPS["scheduler"].run_once()
        time.sleep(0.05)


def status(task_id: int) -> str:
    return WorkspaceTask.objects.get(pk=task_id).status


@pytest.fixture
def pool() -> AgentPool:
    return make_pool(name="e2e")


@pytest.fixture
def agents(live_server: LiveServer, pool: AgentPool) -> Iterator[list[ReferenceAgent]]:
    """Two reference agents running in threads, stopped (and joined) after the test."""
    secret = pool_token_create(pool=pool, name="e2e", actor=ADMIN).secret
    stop = threading.Event()
    running = [
        ReferenceAgent(
            url=live_server.url,
            token=secret,
            name=name,
            heartbeat_interval=0.05,
            simulation=Simulation(duration_seconds=0.1, changes_ratio=1.0),
        )
        for name in ("agent-a", "agent-b")
    ]
    threads = [threading.Thread(target=agent.run, args=(stop,)) for agent in running]
    for thread in threads:
        thread.start()
    yield running
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)


@pytest.fixture
def admin_secret() -> str:
    user = User.objects.create_superuser("alice", "alice@example.com", "x")
    return api_token_create(user=user, name="e2e")[1]


def test_a_plan_and_a_plan_and_apply_run_to_the_end_with_the_apply_on_the_reserved_slot(
    live_server: LiveServer, pool: AgentPool, agents: list[ReferenceAgent], admin_secret: str
) -> None:
    ws_plan = make_workspace(pool, "wsA")
    ws_apply = make_workspace(pool, "wsB")
    work_until(lambda: Agent.objects.filter(pool=pool).count() == 2, "agents registered")

    plan = admin_call(
        live_server, admin_secret, f"workspaces/{ws_plan.pk}/tasks", {"task_type": "plan"}
    )
    pa = admin_call(
        live_server,
        admin_secret,
        f"workspaces/{ws_apply.pk}/tasks",
        {"task_type": "plan_and_apply"},
    )
    work_until(
        lambda: (
            status(plan["id"]) == TaskStatus.SUCCESS
            and status(pa["id"]) == TaskStatus.APPLY_PENDING
        ),
        "plan success and plan_and_apply apply_pending",
    )
    reserved = Slot.objects.get(task_id=pa["id"])
    assert reserved.state == SlotState.RESERVED
    assert Workspace.objects.get(pk=ws_apply.pk).is_locked

    admin_call(live_server, admin_secret, f"tasks/{pa['id']}/confirm-apply", {})
    work_until(lambda: status(pa["id"]) == TaskStatus.APPLIED, "apply finished")

    applied = WorkspaceTask.objects.get(pk=pa["id"])
    assert applied.reuse_workdir
    assert (applied.pod_name, applied.slot_index) == (
        applied.plan_pod_name,
        applied.plan_slot_index,
    )
    assert (applied.pod_name, applied.slot_index) == (reserved.pod.name, reserved.index)
    dispatches = Event.objects.filter(task_id=pa["id"], kind="task.dispatched").order_by("id")
    assert [(e.data["action"], e.data["reuse_workdir"]) for e in dispatches] == [
        ("plan", False),
        ("apply", True),
    ]
    assert not Workspace.objects.get(pk=ws_apply.pk).is_locked
    assert not Slot.objects.exclude(state=SlotState.IDLE).exists()
    assert WorkspaceTask.objects.get(pk=plan["id"]).status == TaskStatus.SUCCESS
