"""An outage of poolsadmin itself is not an outage of its agents (SPEC 5, issue 8 item 3).

The web's record that the agent API is listening (`agent-api`) and the reconciler's own
(`reconciler`) say when silence could be heard; every liveness step counts an agent's silence
from the end of the latest outage. `listen(seconds)` plays a healthy web process: it touches
the record every 5 s while the ledger clock moves on.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connections

from poolsadmin.agents.liveness import (
    AGENT_API,
    RECONCILER,
    hearing_keeper_start,
    hearing_touch,
    liveness_read,
)
from poolsadmin.agents.models import Agent, AgentStatus, Hearing
from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass, task_dispatch
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.reconcile import reconcile_pass_leader, reconcile_pool
from tests.ledger import (
    agent_of,
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

TIMEOUT, GRACE = 120, 60


def listen(seconds: int, *, name: str = AGENT_API) -> None:
    """A web process that hears agents for `seconds` (one touch every 5 s)."""
    for _ in range(seconds // 5):
        clock.advance(5)
        hearing_touch(name=name, actor="system:web")


def outage(seconds: int) -> None:
    """Nobody listens for `seconds`, then the web is back."""
    clock.advance(seconds)
    assert hearing_touch(name=AGENT_API, actor="system:web"), "the touch ends the gap"


def pool_with_running_plan():
    pool = make_pool(heartbeat_timeout_seconds=TIMEOUT, task_grace_seconds=GRACE)
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    return pool, agent, task


def test_a_fresh_touch_moves_only_the_time_heard() -> None:
    assert hearing_touch(name=AGENT_API, actor="system:web")  # the first one starts hearing
    first = Hearing.objects.get(pk=AGENT_API)
    listen(15)
    row = Hearing.objects.get(pk=AGENT_API)
    assert row.since == first.since and row.heard_at > first.heard_at
    assert row.deaf_from is None


def test_a_touch_after_a_gap_starts_a_new_stretch_and_records_the_gap() -> None:
    hearing_touch(name=AGENT_API, actor="system:web")
    listen(10)
    before = Hearing.objects.get(pk=AGENT_API).heard_at
    outage(180)
    row = Hearing.objects.get(pk=AGENT_API)
    assert row.deaf_from == before and row.since == row.heard_at
    assert clock.now() - row.since < timedelta(seconds=5)
    event = Event.objects.filter(kind="hearing.resumed").last()
    assert event is not None and "was down from" in event.reason and "(3 min)" in event.reason


def test_an_eight_second_restart_of_the_web_is_not_an_outage() -> None:
    hearing_touch(name=AGENT_API, actor="system:web")
    since = Hearing.objects.get(pk=AGENT_API).since
    clock.advance(8)
    assert not hearing_touch(name=AGENT_API, actor="system:web")
    assert Hearing.objects.get(pk=AGENT_API).since == since


def test_an_agent_silent_in_an_outage_is_neither_offline_nor_failed_when_poolsadmin_returns() -> (
    None
):
    pool, agent, task = pool_with_running_plan()
    hearing_touch(name=AGENT_API, actor="system:web")
    outage(180)  # longer than timeout + grace
    report = reconcile_pool(pool=pool, kube=None)
    assert report.changes == []
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.ONLINE
    assert refresh(task).status == TaskStatus.RUNNING
    # The agent comes back within its timeout, counted from the web's return: nothing ever fails.
    listen(60)
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    listen(TIMEOUT + GRACE)
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert refresh(task).status == TaskStatus.RUNNING


def test_while_nobody_hears_agents_nothing_is_judged() -> None:
    pool, _, task = pool_with_running_plan()
    hearing_touch(name=AGENT_API, actor="system:web")
    clock.advance(TIMEOUT + GRACE + 600)  # the web (or the database) is still down
    assert not liveness_read(now=clock.now()).listening
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert reconcile_pool(pool=pool, kube=None, dry_run=True).changes == []
    assert refresh(task).status == TaskStatus.RUNNING


def test_an_agent_that_stays_silent_after_the_outage_is_failed_a_timeout_and_grace_later() -> None:
    pool, _, task = pool_with_running_plan()
    hearing_touch(name=AGENT_API, actor="system:web")
    outage(180)
    listen(TIMEOUT - 5)
    assert reconcile_pool(pool=pool, kube=None).changes == []
    listen(10)
    changes = reconcile_pool(pool=pool, kube=None).changes
    assert [c.kind for c in changes] == ["agent.offline"]
    listen(GRACE)
    changes = reconcile_pool(pool=pool, kube=None).changes
    assert [c.kind for c in changes] == ["task.fail"]
    assert refresh(task).status == TaskStatus.FAILED


def test_a_reservation_survives_an_outage_longer_than_timeout_and_grace() -> None:
    pool = make_pool(heartbeat_timeout_seconds=TIMEOUT, task_grace_seconds=GRACE)
    make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    hearing_touch(name=AGENT_API, actor="system:web")
    outage(600)
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert slot_states(pod_of(agent_of(task)))[0] == (SlotState.RESERVED, task.pk)


def test_a_task_unreported_before_the_outage_gets_its_grace_again_after_it() -> None:
    pool, agent, task = pool_with_running_plan()
    hearing_touch(name=AGENT_API, actor="system:web")
    agent_heartbeat(agent=agent, running_task_ids=[])  # one heartbeat without it...
    outage(180)  # ...then nobody hears the ones that list it again
    assert reconcile_pool(pool=pool, kube=None).changes == []
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    listen(GRACE + 10)
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert refresh(task).status == TaskStatus.RUNNING


def test_the_leader_after_a_worker_outage_gives_agents_their_grace_again() -> None:
    """Web up, workers down: agents heartbeat normally, but one died meanwhile. The new
    leader does not fail it the moment it starts, but a timeout and grace after."""
    _, agent, task = pool_with_running_plan()
    hearing_touch(name=AGENT_API, actor="system:web")
    hearing_touch(name=RECONCILER, actor="system:reconciler")
    listen(TIMEOUT + GRACE + 120)  # the worker is down throughout; agent P1 died at once
    assert reconcile_pass_leader(holder="w1", kube_factory=lambda p: None) is not None
    assert refresh(task).status == TaskStatus.RUNNING
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.ONLINE
    for _ in range((TIMEOUT + GRACE) // 5 + 1):
        listen(5)
        hearing_touch(name=RECONCILER, actor="system:reconciler")
    reconcile_pass_leader(holder="w1", kube_factory=lambda p: None)
    reconcile_pass_leader(holder="w1", kube_factory=lambda p: None)
    assert refresh(task).status == TaskStatus.FAILED


def test_an_unacknowledged_dispatch_is_not_rolled_back_for_an_outage() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    assert task_dispatch(task_id=task.pk).dispatched
    hearing_touch(name=AGENT_API, actor="system:web")
    outage(120)
    assert scheduler_pass().rolled_back == []
    listen(35)
    assert scheduler_pass().rolled_back == [task.pk]


def test_liveness_words_say_the_checks_wait_out_the_outage() -> None:
    hearing_touch(name=AGENT_API, actor="system:web")
    outage(180)
    allowance = timedelta(seconds=TIMEOUT + GRACE)
    words = liveness_read(now=clock.now()).words(allowance=allowance, now=clock.now())
    assert words.startswith("Liveness checks are waiting out a control-plane outage")
    assert "the agent API was down from" in words and "(3 min)" in words
    listen(TIMEOUT + GRACE + 5)
    assert liveness_read(now=clock.now()).words(allowance=allowance, now=clock.now()) == ""
    clock.advance(60)  # down again
    words = liveness_read(now=clock.now()).words(allowance=allowance, now=clock.now())
    assert words.startswith("Liveness checks are paused")


@pytest.mark.django_db(transaction=True)
def test_the_web_keeper_thread_records_that_the_agent_api_is_listening() -> None:
    stop = hearing_keeper_start(interval=0.05)
    assert stop is not None
    try:
        deadline = time.monotonic() + 10
        while not Hearing.objects.filter(pk=AGENT_API).exists():
            assert time.monotonic() < deadline, "the keeper never touched the record"
            time.sleep(0.05)
        first = Hearing.objects.get(pk=AGENT_API).heard_at
        while Hearing.objects.get(pk=AGENT_API).heard_at == first:
            assert time.monotonic() < deadline, "the keeper touched only once"
            time.sleep(0.05)
        assert hearing_keeper_start() is None  # one keeper per process
    finally:
        stop.set()
        threading.Event().wait(0.2)
        connections.close_all()


def test_the_diagnosis_of_a_task_waiting_for_agents_says_liveness_checks_wait_out_the_outage() -> (
    None
):
    pool = make_pool(heartbeat_timeout_seconds=TIMEOUT, task_grace_seconds=GRACE)
    make_agent(pool, "P1")
    hearing_touch(name=AGENT_API, actor="system:web")
    outage(300)
    task = submit(make_workspace(pool), "plan")
    diagnosis = task_diagnose(task=task)
    assert diagnosis.code == "no_online_agents"
    assert "Liveness checks are waiting out a control-plane outage" in diagnosis.text
