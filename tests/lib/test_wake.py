"""Work wakes the scheduler (lib/wake.py): a committed submission is a notice on PostgreSQL, a
rolled-back one is not, and the worker's scheduler loop runs at the notice instead of at its
next poll."""

from __future__ import annotations

import threading

import pytest
from django.db import connections, transaction

from poolsadmin.lib.wake import Fanout, Listener, _payloads
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.loops import Loop
from poolsadmin.worker.management.commands.worker import run_loops
from tests.ledger import make_agent, make_pool, make_workspace, refresh, submit

LONG = 30.0  # longer than any test here waits: only a notice can make the loop run in time


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_committed_submission_wakes_the_listener_and_a_rolled_back_one_does_not() -> None:
    pool = make_pool()
    workspace = make_workspace(pool)
    listener, stop = Listener(), threading.Event()
    try:
        assert not listener.wait(0.2, stop)  # LISTEN is set up, nothing pending
        with transaction.atomic():
            submit(workspace, "plan")
            transaction.set_rollback(True)
        assert not listener.wait(0.5, stop)
        submit(workspace, "plan")
        assert listener.wait(LONG, stop)
        assert not listener.wait(0.2, stop)  # the notices of one commit fold into one
    finally:
        listener.close()


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_an_idle_scheduler_loop_dispatches_a_submitted_task_at_the_notice() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    workspace = make_workspace(pool)
    dispatched = threading.Event()

    def scheduler() -> bool:
        did = scheduler_pass().did_work
        if did:
            dispatched.set()
        return did

    stop, listener = threading.Event(), Listener()

    def worker() -> None:
        try:
            run_loops(
                [Loop("scheduler", scheduler, interval_seconds=LONG)], stop=stop, listener=listener
            )
        finally:
            listener.close()
            connections.close_all()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert not dispatched.wait(1.0)  # its first pass found nothing: now it idles
        task = submit(workspace, "plan")
        assert dispatched.wait(LONG - 5)
        assert refresh(task).status == TaskStatus.RUNNING
    finally:
        stop.set()
        thread.join(LONG)


@pytest.mark.sqlite_only
def test_on_sqlite_the_listener_only_waits() -> None:
    # Its whole timeout (stop is not set), with nothing to listen on and nothing raised.
    assert Listener().wait(0.2, threading.Event()) is False


def test_many_keys_go_in_several_notices_each_under_the_servers_payload_limit() -> None:
    keys = [f"agent-{i:016d}" for i in range(1000)]  # 22 bytes each: 22,000 in all

    payloads = list(_payloads(keys))

    assert len(payloads) > 1
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert [key for p in payloads for key in p.split(",")] == keys


def test_a_fanout_registers_no_waiter_past_most_and_counts_the_ones_that_leave() -> None:
    fanout = Fanout("poolsadmin_test_most")
    with fanout.waiter("a", most=2) as first, fanout.waiter("b", most=2) as second:
        assert first is not None and second is not None
        with fanout.waiter("a", most=2) as third:
            assert third is None
            assert fanout.waiting("a") == 1
    with fanout.waiter("a", most=1) as again:  # the two left: there is room again
        assert again is not None
    fanout.stop()
