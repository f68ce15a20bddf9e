"""An outage of poolsadmin itself is not an outage of its agents (SPEC 5, issue 8 item 3).

The web's record that agents can be heard (agents/liveness.py) says when silence could be
heard; every liveness step counts an agent's silence only once poolsadmin has been listening
for the whole allowance. The record runs on the database's clock, which a test cannot move:
the helpers move the ledger clock (agents' heartbeats) and age the record by as much.
`listen(seconds)` plays a healthy web process; `outage(seconds)` nobody listening, then the
web back.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from pytest_django.live_server_helper import LiveServer

from poolsadmin.agents.liveness import (
    AGENT_API,
    HEARING_HEADER,
    hearing_keeper_start,
    hearing_proof,
    hearing_touch,
    liveness_read,
)
from poolsadmin.agents.models import Agent, AgentStatus, Hearing
from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.events.models import Event
from poolsadmin.lib.errors import InvalidInput
from poolsadmin.pools.models import SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass, task_dispatch
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.reconcile import reconcile_pool
from tests.hearing import down, listen, outage
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


def pool_with_running_plan():
    pool = make_pool(heartbeat_timeout_seconds=TIMEOUT, task_grace_seconds=GRACE)
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan"))
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    return pool, agent, task


def test_a_fresh_touch_moves_only_the_time_heard() -> None:
    assert hearing_touch(actor="system:web")  # the first one starts hearing
    first = Hearing.objects.get(pk=AGENT_API)
    assert not hearing_touch(actor="system:web")
    row = Hearing.objects.get(pk=AGENT_API)
    assert row.since == first.since and row.heard_at >= first.heard_at
    assert row.deaf_from is None


def test_a_touch_after_a_gap_starts_a_new_stretch_and_records_the_gap() -> None:
    hearing_touch(actor="system:web")
    listen(10)
    down(180)
    before = Hearing.objects.get(pk=AGENT_API).heard_at
    assert hearing_touch(actor="system:web")
    row = Hearing.objects.get(pk=AGENT_API)
    assert row.deaf_from == before and row.since == row.heard_at
    event = Event.objects.filter(kind="hearing.resumed").last()
    assert event is not None and "could not hear agents from" in event.reason
    assert "(3 min)" in event.reason


def test_an_eight_second_restart_of_the_web_is_not_an_outage() -> None:
    hearing_touch(actor="system:web")
    down(8)
    since = Hearing.objects.get(pk=AGENT_API).since
    assert not hearing_touch(actor="system:web")
    assert Hearing.objects.get(pk=AGENT_API).since == since


def test_an_agent_silent_in_an_outage_is_neither_offline_nor_failed_when_poolsadmin_returns() -> (
    None
):
    pool, agent, task = pool_with_running_plan()
    hearing_touch(actor="system:web")
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
    hearing_touch(actor="system:web")
    down(TIMEOUT + GRACE + 600)  # the web (or the database, or the agents' route) is still down
    assert not liveness_read().listening
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert reconcile_pool(pool=pool, kube=None, dry_run=True).changes == []
    assert refresh(task).status == TaskStatus.RUNNING


def test_an_agent_that_stays_silent_after_the_outage_is_failed_a_timeout_and_grace_later() -> None:
    pool, _, task = pool_with_running_plan()
    hearing_touch(actor="system:web")
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
    hearing_touch(actor="system:web")
    outage(600)
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert slot_states(pod_of(agent_of(task)))[0] == (SlotState.RESERVED, task.pk)


def test_a_task_unreported_before_the_outage_gets_its_grace_again_after_it() -> None:
    pool, agent, task = pool_with_running_plan()
    hearing_touch(actor="system:web")
    agent_heartbeat(agent=agent, running_task_ids=[])  # one heartbeat without it...
    outage(180)  # ...then nobody hears the ones that list it again
    assert reconcile_pool(pool=pool, kube=None).changes == []
    agent_heartbeat(agent=agent, running_task_ids=[task.pk])
    listen(GRACE + 10)
    assert reconcile_pool(pool=pool, kube=None).changes == []
    assert refresh(task).status == TaskStatus.RUNNING


def test_a_worker_outage_alone_hides_nothing_the_web_kept_listening() -> None:
    """Web up, workers down: agents heartbeat as always, so their last heartbeats are true;
    one that died meanwhile is judged as soon as the reconciler runs again."""
    pool, agent, task = pool_with_running_plan()
    hearing_touch(actor="system:web")
    listen(TIMEOUT + GRACE + 120)  # agent P1 died at once; the reconciler did not run

    reconcile_pool(pool=pool, kube=None)

    assert refresh(task).status == TaskStatus.FAILED
    assert Agent.objects.get(pk=agent.pk).status == AgentStatus.OFFLINE


def test_an_unacknowledged_dispatch_is_not_rolled_back_for_an_outage() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    assert task_dispatch(task_id=task.pk).dispatched
    hearing_touch(actor="system:web")
    outage(120)
    assert scheduler_pass().rolled_back == []
    listen(35)
    assert scheduler_pass().rolled_back == [task.pk]


def test_liveness_words_say_the_checks_wait_out_the_outage() -> None:
    hearing_touch(actor="system:web")
    outage(180)
    allowance = timedelta(seconds=TIMEOUT + GRACE)
    words = liveness_read().words(allowance=allowance)
    assert words.startswith("Liveness checks are waiting out a control-plane outage")
    assert "could not hear agents from" in words and "(3 min)" in words
    listen(TIMEOUT + GRACE + 5)
    assert liveness_read().words(allowance=allowance) == ""
    down(60)
    assert liveness_read().words(allowance=allowance).startswith("Liveness checks are paused")


@pytest.mark.django_db(transaction=True)
def test_the_web_keeper_records_hearing_through_the_agent_api(live_server: LiveServer) -> None:
    """By the agents' route: the keeper asks the agent API, which records it."""
    stop = hearing_keeper_start(interval=0.05, url=f"{live_server.url}/api/v1/agents/hearing")
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


@pytest.mark.django_db(transaction=True)
def test_a_keeper_that_cannot_reach_the_agent_api_records_nothing() -> None:
    """The agents' route is broken (or the web cannot answer): this process writing to the
    database proves nothing about whether agents can be heard."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    stop = hearing_keeper_start(
        interval=0.05, url=f"http://127.0.0.1:{closed}/api/v1/agents/hearing"
    )
    assert stop is not None
    try:
        time.sleep(0.5)
        assert not Hearing.objects.exists()
    finally:
        stop.set()
        threading.Event().wait(0.2)
        connections.close_all()


def test_only_poolsadmin_itself_may_say_it_is_listening(client: Any) -> None:
    refused = client.post("/api/v1/agents/hearing", headers={HEARING_HEADER: "guess"})
    assert (refused.status_code, refused.json()["field"]) == (403, HEARING_HEADER)
    assert not Hearing.objects.exists()

    done = client.post("/api/v1/agents/hearing", headers={HEARING_HEADER: hearing_proof()})

    assert done.status_code == 204
    assert liveness_read().listening and Hearing.objects.count() == 1


def test_the_diagnosis_of_a_task_waiting_for_agents_says_liveness_checks_wait_out_the_outage() -> (
    None
):
    pool = make_pool(heartbeat_timeout_seconds=TIMEOUT, task_grace_seconds=GRACE)
    make_agent(pool, "P1")
    hearing_touch(actor="system:web")
    outage(300)
    task = submit(make_workspace(pool), "plan")
    diagnosis = task_diagnose(task=task)
    assert diagnosis.code == "no_online_agents"
    assert "Liveness checks are waiting out a control-plane outage" in diagnosis.text


def test_the_touch_after_a_gap_is_the_only_one_that_says_so() -> None:
    hearing_touch(actor="system:web")
    outage(60)
    listen(30)
    listen(30)
    assert Hearing.objects.get(pk=AGENT_API).deaf_from is not None
    kinds = list(Event.objects.filter(kind="hearing.resumed").values_list("reason", flat=True))
    assert len(kinds) == 2 and "started listening" in kinds[0] and "could not hear" in kinds[1]


def test_a_pools_heartbeat_timeout_must_outlast_a_gap() -> None:
    """An outage shorter than the gap (20 s) is not on record: a 15 s timeout would fail work
    for a 16 s restart of the web."""
    with pytest.raises(InvalidInput) as refused:
        make_pool(heartbeat_timeout_seconds=15)
    assert refused.value.field == "heartbeat_timeout_seconds"
    assert make_pool(heartbeat_timeout_seconds=21).heartbeat_timeout_seconds == 21


def test_a_scheduler_pass_with_nothing_to_roll_back_does_not_read_the_record(
    django_assert_num_queries: Any,
) -> None:
    """The pass runs twice a second: what liveness allows matters only to a dispatch that is
    late to be acknowledged."""
    with django_assert_num_queries(2):  # the late dispatches, the pools with waiting work
        assert not scheduler_pass().did_work
