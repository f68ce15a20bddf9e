"""The long-poll heartbeat (issue 9, item 5; agents/nudge.py): `"wait": seconds` holds a
heartbeat that has nothing for the agent until work is dispatched to it or the wait ends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from poolsadmin.agents import nudge
from poolsadmin.agents import services as agent_services
from poolsadmin.agents.models import Agent
from poolsadmin.agents.services import Registration
from poolsadmin.lib.wake import notify
from poolsadmin.pools.services import pool_token_create
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import WorkspaceTask
from poolsadmin.tasks.services import task_cancel
from tests.ledger import ADMIN, make_agent_with_secret, make_pool, make_workspace, run, submit

# Longer than any wait these tests need: only work for the agent ends the wait in time.
LONG_WAIT = 20
# How long a test waits for a thread to get somewhere before it gives up (not a measurement).
PATIENCE_SECONDS = 30.0


def _heartbeat(
    token: str, registration: Registration, body: dict[str, Any], *, client: Client | None = None
) -> Any:
    return (client or Client()).post(
        f"/api/v1/agents/{registration.agent.agent_id}/heartbeat",
        json.dumps({"running_task_ids": [], **body}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {token}", "X-Agent-Secret": registration.secret},
    )


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []

    def run() -> None:
        try:
            answers.append(call())
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answers


def _answered(thread: threading.Thread, answers: list[Any]) -> Any:
    thread.join(PATIENCE_SECONDS)
    assert answers, "the heartbeat did not answer"
    assert answers[0].status_code == 200, answers[0].content
    return answers[0].json()


def _waiting_for_work(agent: Agent, cpu: float) -> Callable[[], bool]:
    """The heartbeat sent with `cpu` has committed (so it read the ledger) and waits."""

    def check() -> bool:
        recorded = Agent.objects.filter(pk=agent.pk).values_list("cpu", flat=True).get()
        return recorded == cpu and nudge.agents_waiting(agent_id=agent.agent_id) == 1

    return check


@pytest.fixture
def setup() -> tuple[str, Registration, WorkspaceTask]:
    pool = make_pool(name="p1")
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    registration = make_agent_with_secret(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    return token, registration, task


@pytest.mark.django_db(transaction=True)
def test_a_waiting_heartbeat_answers_with_the_work_dispatched_during_its_wait(
    setup: tuple[str, Registration, WorkspaceTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, registration, task = setup
    # The heartbeat is recorded once: after the nudge only its answer is read again (the
    # heartbeat is the API's hottest request, issue 9).
    recorded: list[dict[str, Any]] = []
    record = agent_services.agent_heartbeat

    def recording(**kwargs: Any) -> Any:
        recorded.append(kwargs)
        return record(**kwargs)

    monkeypatch.setattr(agent_services, "agent_heartbeat", recording)
    thread, answers = _in_thread(
        lambda: _heartbeat(token, registration, {"wait": LONG_WAIT, "cpu": 0.75})
    )
    _until(_waiting_for_work(registration.agent, 0.75))

    task_dispatch(task_id=task.pk)

    body = _answered(thread, answers)
    assert [a["task_id"] for a in body["assignments"]] == [task.pk]
    assert body["woken"] is True  # the wait ended because the work came, not because it ran out
    assert len(recorded) == 1


@pytest.mark.django_db(transaction=True)
def test_a_waiting_heartbeat_answers_with_the_cancel_of_a_task_its_agent_runs(
    setup: tuple[str, Registration, WorkspaceTask],
) -> None:
    token, registration, task = setup
    task = run(task)
    body = {"running_task_ids": [task.pk], "wait": LONG_WAIT, "cpu": 0.25}
    thread, answers = _in_thread(lambda: _heartbeat(token, registration, body))
    _until(_waiting_for_work(registration.agent, 0.25))

    task_cancel(task_id=task.pk, actor=ADMIN, reason="not needed")

    answer = _answered(thread, answers)
    # Only the nudge can end this wait early: looking at the ledger finds new work, not cancels.
    assert [c["task_id"] for c in answer["cancellations"]] == [task.pk]
    assert answer["woken"] is True


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_notice_from_another_process_wakes_the_waiting_heartbeat(
    setup: tuple[str, Registration, WorkspaceTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, registration, task = setup

    # Neither this process's own delivery nor the waiter's looks at the ledger: only the
    # dispatch's notice, as another process's dispatch sends it (pg_notify, no delivery in
    # the process), can wake the wait.
    def notice_only(*, agent_ids: Any) -> None:
        notify(nudge.AGENTS_CHANNEL, [a for a in agent_ids if a], fanout=None)

    monkeypatch.setattr("poolsadmin.scheduler.services.agents_nudge", notice_only)
    # The waiter's looks at the ledger (before the connection listens, and at the end of the
    # wait) find nothing: without the notice the answer would say `woken: false`.
    monkeypatch.setattr(nudge, "_has_assignment", lambda agent_id: False)
    thread, answers = _in_thread(
        lambda: _heartbeat(token, registration, {"wait": LONG_WAIT, "cpu": 0.5})
    )
    _until(_waiting_for_work(registration.agent, 0.5))
    _until(nudge._fanout.listening.is_set)
    task_dispatch(task_id=task.pk)

    body = _answered(thread, answers)
    assert [a["task_id"] for a in body["assignments"]] == [task.pk]
    assert body["woken"] is True


@pytest.mark.django_db
def test_a_waiting_heartbeat_without_work_answers_empty_when_its_wait_ends(
    setup: tuple[str, Registration, WorkspaceTask],
) -> None:
    token, registration, _ = setup

    response = _heartbeat(token, registration, {"wait": 0.3})

    assert response.status_code == 200
    assert response.json() == {"assignments": [], "cancellations": [], "woken": False}


@pytest.mark.django_db
def test_a_waiting_heartbeat_with_work_already_dispatched_answers_it_without_waiting(
    setup: tuple[str, Registration, WorkspaceTask],
) -> None:
    token, registration, task = setup
    task_dispatch(task_id=task.pk)

    body = _heartbeat(token, registration, {"wait": LONG_WAIT}).json()

    assert [a["task_id"] for a in body["assignments"]] == [task.pk]
    assert body["woken"] is False


@pytest.mark.django_db
def test_a_heartbeat_that_asks_no_wait_gets_the_answer_it_always_got(
    setup: tuple[str, Registration, WorkspaceTask],
) -> None:
    token, registration, _ = setup

    body = _heartbeat(token, registration, {}).json()

    assert body == {"assignments": [], "cancellations": []}


@pytest.mark.django_db
@pytest.mark.parametrize("wait", ["soon", -1, 21, True, [5], 1e400])
def test_a_bad_wait_is_a_400_naming_it_and_writes_nothing(
    setup: tuple[str, Registration, WorkspaceTask], wait: Any
) -> None:
    token, registration, _ = setup
    before = Agent.objects.filter(pk=registration.agent.pk).values().get()

    response = _heartbeat(token, registration, {"wait": wait})

    assert response.status_code == 400
    assert response.json()["field"] == "wait"
    assert Agent.objects.filter(pk=registration.agent.pk).values().get() == before


@pytest.mark.django_db(transaction=True)
def test_past_long_polls_max_a_heartbeat_that_asks_to_wait_is_answered_at_once(
    setup: tuple[str, Registration, WorkspaceTask], settings: Any
) -> None:
    """Each waiting heartbeat holds a thread of the web process: past LONG_POLLS_MAX a wait is
    not held (the dashboard, the API and the probes keep their threads). The answer has no
    `woken`, as for an agent that asked no wait, so the agent paces itself by its interval."""
    settings.LONG_POLLS_MAX = 1
    token, registration, task = setup
    other = make_agent_with_secret(registration.agent.pool, "P2")
    thread, answers = _in_thread(
        lambda: _heartbeat(token, registration, {"wait": LONG_WAIT, "cpu": 0.5})
    )
    _until(_waiting_for_work(registration.agent, 0.5))

    second = _heartbeat(token, other, {"wait": LONG_WAIT})

    # Not held: a held wait would have ended after LONG_WAIT with `woken: false`.
    assert second.status_code == 200
    assert second.json() == {"assignments": [], "cancellations": []}
    # The first still waits, and its place is given back when it is answered.
    task_dispatch(task_id=task.pk)
    assert _answered(thread, answers)["woken"] is True
    third = _heartbeat(token, other, {"wait": 0.2})
    assert third.json() == {"assignments": [], "cancellations": [], "woken": False}


@pytest.mark.django_db
def test_with_long_polls_max_0_no_heartbeat_waits(
    setup: tuple[str, Registration, WorkspaceTask], settings: Any
) -> None:
    settings.LONG_POLLS_MAX = 0
    token, registration, _ = setup

    body = _heartbeat(token, registration, {"wait": LONG_WAIT}).json()

    assert body == {"assignments": [], "cancellations": []}
    assert nudge.agents_waiting(agent_id=registration.agent.agent_id) == 0
