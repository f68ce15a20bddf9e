"""The reference agent against a live server: simulated and command mode, cancellations,
refused reports and an unreachable server. Steps are driven one at a time, so each test
decides when the agent talks to the server."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from pytest_django.live_server_helper import LiveServer

from poolsadmin.agents.models import Agent
from poolsadmin.agents.nudge import agents_waiting
from poolsadmin.agents.reference import (
    AgentApiError,
    AgentTransportError,
    ReferenceAgent,
    Simulation,
)
from poolsadmin.agents.services import agent_retire
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, Slot, SlotState
from poolsadmin.pools.services import pool_token_create
from poolsadmin.scheduler.services import scheduler_pass, task_dispatch
from poolsadmin.tasks.models import Stage, TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_cancel, task_confirm_apply
from tests.ledger import (
    ADMIN,
    make_agent_with_secret,
    make_pool,
    make_workspace,
    refresh,
    submit,
)

pytestmark = pytest.mark.django_db(transaction=True)

DEADLINE_SECONDS = 15.0
AgentFactory = Callable[..., ReferenceAgent]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def status_of(task: WorkspaceTask) -> str:
    return refresh(task).status


@pytest.fixture
def pool() -> AgentPool:
    return make_pool(name="p1")


@pytest.fixture
def workspace(pool: AgentPool) -> Workspace:
    return make_workspace(pool, "wsA")


@pytest.fixture
def new_agent(live_server: LiveServer, pool: AgentPool) -> Iterator[AgentFactory]:
    """Reference agents for the live server; their work is abandoned after the test, so no
    thread of one test talks to the server during the next."""
    secret = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    agents: list[ReferenceAgent] = []

    def build(
        name: str = "P1",
        *,
        duration: float = 0.05,
        changes_ratio: float = 0.5,
        failure_ratio: float = 0.0,
        command: str | None = None,
        state_file: Path | None = None,
        long_poll: float = 0.0,
    ) -> ReferenceAgent:
        agent = ReferenceAgent(
            url=live_server.url,
            token=secret,
            name=name,
            heartbeat_interval=0.05,
            command=command,
            simulation=Simulation(
                duration_seconds=duration,
                changes_ratio=changes_ratio,
                failure_ratio=failure_ratio,
            ),
            state_file=state_file,
            long_poll=long_poll,
        )
        agents.append(agent)
        return agent

    yield build
    for agent in agents:
        agent.abandon_all()


def dispatch_to(agent: ReferenceAgent, task: WorkspaceTask) -> None:
    """The scheduler dispatches the task, and one step of the agent accepts and starts it."""
    assert scheduler_pass().dispatched == [task.pk]
    agent.step()
    assert refresh(task).acked_at is not None
    assert agent.running_task_ids == [task.pk]


def test_the_agent_registers_once_and_heartbeats_into_its_pool(
    new_agent: AgentFactory, pool: AgentPool
) -> None:
    agent = new_agent("P1")

    agent.step()
    agent.step()

    row = Agent.objects.get(agent_name="P1")
    assert agent.agent_id == row.agent_id
    assert (row.pool_id, row.version, row.reported_task_ids) == (pool.pool_id, "reference-1", [])
    assert Slot.objects.filter(pod__agent=row).count() == pool.slots_per_pod


def test_a_long_polling_agent_gets_the_work_dispatched_during_its_heartbeat(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent(long_poll=20, duration=60)
    agent.register()
    assert agent.agent_id is not None
    task = submit(workspace, "plan")
    stepping = threading.Thread(target=agent.step, daemon=True)
    stepping.start()
    wait_for(lambda: agents_waiting(agent_id=str(agent.agent_id)) == 1, "the heartbeat to wait")
    # The heartbeat committed (its usage figures are recorded; registering records none), so
    # it read the ledger before the dispatch below: the work can reach the agent in this step
    # only through the wait.
    wait_for(
        lambda: Agent.objects.filter(pk=agent.agent_id, memory__isnull=False).exists(),
        "the heartbeat to have read the ledger",
    )

    assert task_dispatch(task_id=task.pk).dispatched

    stepping.join(DEADLINE_SECONDS)
    # One step: the heartbeat that was waiting answered with the work, and the agent took it.
    assert agent.running_task_ids == [task.pk]
    assert refresh(task).acked_at is not None


def test_a_simulated_plan_ends_in_success_and_frees_the_slot(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent()
    agent.register()
    task = submit(workspace, "plan")

    dispatch_to(agent, task)

    wait_for(lambda: status_of(task) == TaskStatus.SUCCESS, "the plan to succeed")
    assert not Slot.objects.filter(task_id=task.pk).exists()
    wait_for(lambda: agent.running_task_ids == [], "the agent to drop the reported task")


def test_a_simulated_plan_with_changes_is_reserved_and_its_apply_reuses_the_slot(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent(changes_ratio=1.0)
    agent.register()
    task = submit(workspace, "plan_and_apply")
    dispatch_to(agent, task)
    wait_for(lambda: status_of(task) == TaskStatus.APPLY_PENDING, "the plan to find changes")
    wait_for(lambda: agent.running_task_ids == [], "the agent to drop the plan")
    agent.step()  # the "execution finished" heartbeat: must not free the reservation (I-W3)
    assert Slot.objects.get(task_id=task.pk).state == SlotState.RESERVED

    task_confirm_apply(task_id=task.pk, actor="user:alice")
    dispatch_to(agent, task)

    wait_for(lambda: status_of(task) == TaskStatus.APPLIED, "the apply to finish")
    task = refresh(task)
    assert task.reuse_workdir
    assert (task.pod_name, task.slot_index) == (task.plan_pod_name, task.plan_slot_index)


def test_a_simulated_plan_without_changes_ends_planned_and_finished(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent(changes_ratio=0.0)
    agent.register()
    task = submit(workspace, "plan_and_apply")

    dispatch_to(agent, task)

    wait_for(lambda: status_of(task) == TaskStatus.PLANNED_AND_FINISHED, "the plan without changes")


def test_a_simulated_failure_is_reported_with_a_message(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent(failure_ratio=1.0)
    agent.register()
    task = submit(workspace, "drift_check")

    dispatch_to(agent, task)

    wait_for(lambda: status_of(task) == TaskStatus.FAILED, "the failure report")
    assert "simulated failure" in refresh(task).error_message


def test_a_cancelled_task_is_abandoned_and_never_reported(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent(duration=0.5)
    agent.register()
    task = submit(workspace, "plan")
    dispatch_to(agent, task)

    task_cancel(task_id=task.pk, actor="user:alice", reason="not needed")
    agent.step()

    assert agent.running_task_ids == []
    time.sleep(1.0)  # past the simulated duration: a report would have been sent by now
    assert status_of(task) == TaskStatus.CANCELLED
    actors = set(Event.objects.filter(task_id=task.pk).values_list("actor", flat=True))
    assert f"agent:{agent.agent_id}" in actors  # it accepted
    assert not Event.objects.filter(task_id=task.pk, kind__in=["task.succeeded", "task.failed"])


def test_a_report_the_server_refuses_with_409_is_dropped(
    new_agent: AgentFactory, workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolsadmin.agent")
    agent = new_agent(duration=0.3)
    agent.register()
    task = submit(workspace, "plan")
    dispatch_to(agent, task)

    # Cancelled while the agent works, before any heartbeat could tell it.
    task_cancel(task_id=task.pk, actor="user:alice", reason="not needed")

    wait_for(lambda: agent.running_task_ids == [], "the refused report to be dropped")
    assert status_of(task) == TaskStatus.CANCELLED
    assert f"task #{task.pk}: the server already decided (HTTP 409" in caplog.text


def test_a_command_exiting_2_for_a_plan_and_apply_plan_means_changes(
    new_agent: AgentFactory, workspace: Workspace, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    command = (
        f'echo "$TASK_ID $WORKSPACE_ID $ACTION $TASK_TYPE $REUSE_WORKDIR" >> {log}; '
        'if [ "$ACTION" = plan ]; then exit 2; fi'
    )
    agent = new_agent(command=command)
    agent.register()
    task = submit(workspace, "plan_and_apply")

    dispatch_to(agent, task)
    wait_for(lambda: status_of(task) == TaskStatus.APPLY_PENDING, "exit 2 -> apply_pending")
    wait_for(lambda: agent.running_task_ids == [], "the agent to drop the plan")
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    dispatch_to(agent, task)
    wait_for(lambda: status_of(task) == TaskStatus.APPLIED, "exit 0 -> applied")

    assert log.read_text().splitlines() == [
        f"{task.pk} {workspace.workspace_id} plan plan_and_apply false",
        f"{task.pk} {workspace.workspace_id} apply plan_and_apply true",
    ]


def test_a_failing_command_reports_the_tail_of_its_stderr(
    new_agent: AgentFactory, workspace: Workspace
) -> None:
    agent = new_agent(command="echo 'Error: provider crashed' >&2; exit 1")
    agent.register()
    task = submit(workspace, "plan")

    dispatch_to(agent, task)

    wait_for(lambda: status_of(task) == TaskStatus.FAILED, "the command's failure")
    message = refresh(task).error_message
    assert message.startswith("command exited with 1")
    assert "Error: provider crashed" in message


def test_cancelling_a_task_kills_its_command(
    new_agent: AgentFactory, workspace: Workspace, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    agent = new_agent(command=f"echo $$ > {pid_file}; exec sleep 30")
    agent.register()
    task = submit(workspace, "plan")
    dispatch_to(agent, task)
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the command")
    pid = int(pid_file.read_text())

    task_cancel(task_id=task.pk, actor="user:alice", reason="not needed")
    agent.step()

    wait_for(lambda: not _alive(pid), "the command to be killed", timeout=5)
    assert agent.running_task_ids == []
    assert status_of(task) == TaskStatus.CANCELLED
    assert refresh(task).stage == Stage.COMPLETED


def test_a_second_agent_under_the_same_name_is_refused_and_the_first_keeps_working(
    new_agent: AgentFactory, pool: AgentPool
) -> None:
    """A restarted twin without the identity, or an impostor with the pool token: the name is
    not handed over, and the agent that holds it is not locked out."""
    agent = new_agent("P1")
    agent.step()
    twin = new_agent("P1")

    with pytest.raises(AgentApiError) as refused:
        twin.step()

    assert (refused.value.status, refused.value.field) == (409, "name")
    agent.step()
    row = Agent.objects.get(agent_name="P1")
    assert agent.agent_id == row.agent_id
    assert kinds_of(row) == ["agent.registered"]


def test_an_agent_restarted_with_its_state_file_registers_again_as_itself(
    new_agent: AgentFactory, tmp_path: Path
) -> None:
    state = tmp_path / "agent" / "identity.json"
    first = new_agent("P1", state_file=state)
    first.step()
    assert oct(state.stat().st_mode & 0o777) == "0o600"  # a secret: this user's only

    restarted = new_agent("P1", state_file=state)
    restarted.register()

    row = Agent.objects.get(agent_name="P1")
    assert restarted.agent_id == first.agent_id == row.agent_id
    assert kinds_of(row) == ["agent.registered", "agent.reregistered"]
    assert json.loads(state.read_text())["agent_id"] == row.agent_id


def test_an_agent_retired_by_an_admin_registers_anew_and_drops_its_old_identitys_work(
    new_agent: AgentFactory, workspace: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolsadmin.agent")
    agent = new_agent(duration=30)
    agent.register()
    task = submit(workspace, "plan")
    dispatch_to(agent, task)
    old = Agent.objects.get(agent_name="P1")

    agent_retire(agent=old, actor="user:alice", reason="lost its disk")
    agent.step()  # refused for its identity: registers again, under the free name

    assert agent.agent_id != old.agent_id
    assert status_of(task) == TaskStatus.FAILED  # the retired identity's work
    agent.step()  # the server does not assign that task to the new agent: cancelled here
    assert agent.running_task_ids == []
    assert "registering again" in caplog.text


def kinds_of(agent: Agent) -> list[str]:
    events = Event.objects.filter(target_type="agent", target_id=agent.agent_id).order_by("id")
    return list(events.values_list("kind", flat=True))


def test_run_survives_a_refused_connection_and_stops_on_request() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = ReferenceAgent(
        url=f"http://127.0.0.1:{port}", token="apt_x", name="P1", heartbeat_interval=0.01
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()

    stop.set()
    thread.join(timeout=5)

    assert not thread.is_alive()
    assert agent.agent_id is None


def test_run_keeps_going_after_the_server_refuses_its_token(
    live_server: LiveServer, pool: AgentPool
) -> None:
    agent = ReferenceAgent(
        url=live_server.url, token="apt_wrong_token", name="P1", heartbeat_interval=0.01
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    time.sleep(0.3)

    stop.set()
    thread.join(timeout=5)

    assert not thread.is_alive()
    assert not Agent.objects.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_agent_command_once_runs_the_assigned_work_and_exits(
    live_server: LiveServer, pool: AgentPool, workspace: Workspace, tmp_path: Path
) -> None:
    secret = pool_token_create(pool=pool, name="cli", actor=ADMIN).secret
    registered = make_agent_with_secret(pool, "P1")
    # The identity the agent kept when it registered before (it restarted since).
    state = tmp_path / "identity.json"
    state.write_text(
        json.dumps(
            {"name": "P1", "agent_id": registered.agent.agent_id, "agent_secret": registered.secret}
        )
    )
    task = submit(workspace, "plan")
    assert scheduler_pass().dispatched == [task.pk]
    before = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()

    call_command(
        "agent",
        f"--url={live_server.url}",
        f"--token={secret}",
        "--name=P1",
        "--interval=0.05",
        "--duration=0.05",
        f"--state-file={state}",
        "--once",
        stdout=out,
    )

    assert status_of(task) == TaskStatus.SUCCESS
    # It went on as the agent it was: the identity is unchanged, and nothing registered.
    assert json.loads(state.read_text())["agent_id"] == registered.agent.agent_id
    assert kinds_of(registered.agent) == ["agent.registered"]
    assert "agent P1: stopped" in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_agent_command_needs_a_token(live_server: LiveServer) -> None:
    with pytest.raises(CommandError, match="token"):
        call_command("agent", f"--url={live_server.url}", "--token=", "--once")


def test_an_agent_whose_registration_answer_was_lost_registers_on_retry_as_itself(
    new_agent: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server committed the registration, the answer never arrived (a timeout): without
    its own proposed secret the retry would find its own name taken, for good."""
    agent = new_agent("P1")
    real = agent._call
    lost: list[str] = []

    def call(method: str, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        answer = real(method, path, *args, **kwargs)
        if path.endswith("/register") and not lost:
            lost.append(path)
            raise AgentTransportError("the answer timed out")
        return answer

    monkeypatch.setattr(agent, "_call", call)
    with pytest.raises(AgentTransportError):
        agent.step()

    agent.step()

    row = Agent.objects.get(agent_name="P1")
    assert agent.agent_id == row.agent_id
    assert kinds_of(row) == ["agent.registered", "agent.reregistered"]
