"""The batch pass (issue 9): one capacity snapshot per pool and pass, placements in memory by
the rule functions, claims that each still check the ledger.

What must hold: a batch places exactly as dispatching the same tasks one at a time would; its
queries do not grow with the pool; a claim that the ledger no longer agrees with (a slot taken,
a task cancelled, a workspace locked since the snapshot) leaves that task for the next pass and
the rest of the batch dispatched; a pool another scheduler holds is skipped, not waited for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod, Slot
from poolsadmin.pools.services import SlotClaim, pool_claim, slots_take
from poolsadmin.scheduler import services as scheduler
from poolsadmin.scheduler.services import scheduler_pass, task_dispatch
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_cancel, task_confirm_apply, task_report
from tests.fleet import fleet_build, tasks_queue
from tests.ledger import (
    ADMIN,
    agent_of,
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    refresh,
    run,
    submit,
)

pytestmark = pytest.mark.django_db


def _queries_of_a_pass(pods: int) -> tuple[int, int]:
    fleet = fleet_build(
        pools=1, pods_per_pool=pods, slots_per_pod=2, workspaces=10, prefix=f"q{pods}"
    )
    tasks_queue(fleet, count=pods * 2)
    with CaptureQueriesContext(connection) as queries:
        result = scheduler_pass()
    assert len(result.dispatched) == pods * 2
    return len(queries), len(result.dispatched)


def test_queries_per_dispatch_stay_the_same_whatever_the_size_of_the_pool() -> None:
    small, small_dispatched = _queries_of_a_pass(pods=5)
    big, big_dispatched = _queries_of_a_pass(pods=40)

    # A batch costs a constant number of queries, whatever the number of pods and tasks:
    # the snapshot, the locks, one statement each for the slots, the tasks and the events
    # (one parameter each, lib/rowsets.py, so SQLite does not split them either).
    assert big == small <= 20
    assert small / small_dispatched <= 3  # issue 9: at most 3 per dispatch, amortised
    assert big / big_dispatched <= 0.25


def _world(prefix: str) -> tuple[AgentPool, list[WorkspaceTask]]:
    """A pool in a state every rule has a say in: a busier pod, a reservation, a running
    plan_and_apply, a confirmed apply, serial plan_and_apply, drift checks."""
    pool = make_pool(name=prefix, slots_per_pod=3, plan_and_apply_per_pod=1)
    for i in range(4):
        make_agent(pool, f"{prefix}-pod-{i}")
    ws_a, ws_b, ws_c = (make_workspace(pool, f"{prefix}-ws-{n}") for n in "abc")
    run(submit(ws_a, "plan"))  # makes the first pod the busiest
    confirmed = plan_with_changes(submit(ws_b, "plan_and_apply"))
    task_confirm_apply(task_id=confirmed.pk, actor=ADMIN)
    plan_with_changes(submit(ws_c, "plan_and_apply"))  # reserved, not confirmed
    waiting = [
        submit(ws_a, "drift_check"),
        submit(ws_a, "plan_and_apply"),
        submit(ws_a, "plan_and_apply"),  # serial behind the one before
        submit(ws_b, "plan"),
        submit(ws_c, "plan_and_apply"),  # behind the reserved one
        submit(ws_a, "plan"),
        submit(ws_b, "plan_and_apply"),  # behind the confirmed apply
        *(submit(make_workspace(pool, f"{prefix}-ws-{n}"), "plan_and_apply") for n in "defg"),
        *(submit(ws_a, "plan") for _ in range(3)),
    ]
    return pool, [refresh(confirmed), *waiting]


def _placed(pool: AgentPool, tasks: list[WorkspaceTask]) -> list[tuple[int, str, int | None]]:
    pods = {p.pk: p.name.rsplit("-", 1)[1] for p in Pod.objects.filter(pool=pool)}
    return [
        (
            i,
            refresh(t).status,
            None if t.pod_id is None else int(pods[t.pod_id]) * 10 + (t.slot_index or 0),
        )
        for i, t in enumerate(tasks)
    ]


def test_a_batch_places_every_task_where_one_dispatch_at_a_time_would() -> None:
    batch_pool, batch_tasks = _world("batch")
    single_pool, single_tasks = _world("single")
    AgentPool.objects.filter(pk=single_pool.pk).update(status="paused")  # not in the pass

    scheduler_pass()
    AgentPool.objects.filter(pk=single_pool.pk).update(status="active")
    in_order = scheduler.dispatch_candidates(pool_id=single_pool.pk, now=clock.now(), limit=500)
    for task in in_order:
        task_dispatch(task_id=task.pk)

    assert _placed(batch_pool, batch_tasks) == _placed(single_pool, single_tasks)
    statuses = [s for _, s, _ in _placed(batch_pool, batch_tasks)]
    assert statuses.count(TaskStatus.RUNNING) >= 6 and TaskStatus.PENDING in statuses


def _after_the_snapshot(monkeypatch: pytest.MonkeyPatch, change: Callable[[], object]) -> None:
    """Run `change` once, between the batch's capacity snapshot and its claims: what a
    concurrent transaction that commits meanwhile does."""
    real = scheduler.pool_capacity_rows

    def capacity(**kwargs: Any) -> Any:
        views = real(**kwargs)
        change()
        return views

    monkeypatch.setattr(scheduler, "pool_capacity_rows", capacity)


def test_a_slot_taken_since_the_snapshot_leaves_its_task_for_the_next_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool(slots_per_pod=2)
    make_agent(pool, "P1")
    make_agent(pool, "P2")
    first, second = (submit(make_workspace(pool), "plan") for _ in range(2))
    intruder = submit(make_workspace(pool), "plan")
    slot = Slot.objects.filter(pod__pool=pool).select_related("pod").order_by("pod_id", "index")[0]

    # Another scheduler takes the first idle slot for a task of its own.
    _after_the_snapshot(
        monkeypatch,
        lambda: slots_take(
            claims=[SlotClaim(slot=slot, task_id=intruder.pk, task_type="plan")],
            actor=ADMIN,
            pool_id=pool.pk,
            batch=[],
        ),
    )
    monkeypatch.setattr(scheduler, "dispatch_candidates", _only([first, second]))

    result = scheduler_pass()

    assert result.dispatched == [second.pk]
    assert refresh(first).status == TaskStatus.PENDING and refresh(first).slot_index is None
    monkeypatch.undo()
    task_cancel(task_id=intruder.pk, actor=ADMIN, reason="the other scheduler's test task")
    assert scheduler_pass().dispatched == [first.pk]


def _only(tasks: list[WorkspaceTask]) -> Callable[..., list[WorkspaceTask]]:
    def candidates(**kwargs: Any) -> list[WorkspaceTask]:
        return [refresh(t) for t in tasks]

    return candidates


def test_a_task_cancelled_since_the_snapshot_is_not_dispatched_and_keeps_no_slot(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    cancelled, kept = (submit(make_workspace(pool), "plan") for _ in range(2))
    _after_the_snapshot(
        monkeypatch,
        lambda: task_cancel(task_id=cancelled.pk, actor=ADMIN, reason="not needed"),
    )

    assert scheduler_pass().dispatched == [kept.pk]
    assert refresh(cancelled).status == TaskStatus.CANCELLED
    assert not Slot.objects.filter(task_id=cancelled.pk).exists()
    # The claim itself left the cancelled task out: the batch was not rolled back and retried
    # one task at a time (which would also end so).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_workspace_locked_for_an_apply_since_the_snapshot_runs_no_drift_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    make_agent(pool, "P2")
    workspace = make_workspace(pool)
    planning = run(submit(workspace, "plan_and_apply"))
    drift = submit(workspace, "drift_check")
    plan = submit(workspace, "plan")
    # The plan finds changes while the batch places: the workspace is locked for its apply.
    _after_the_snapshot(
        monkeypatch,
        lambda: task_report(
            task_id=planning.pk, agent=agent_of(planning), status=TaskStatus.APPLY_PENDING
        ),
    )

    result = scheduler_pass()

    assert result.dispatched == [plan.pk]  # rule 3: a plan only reads state
    assert refresh(drift).status == TaskStatus.PENDING
    assert result.waiting[drift.pk].code == "workspace_locked"


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_pool_another_scheduler_holds_is_skipped_and_the_other_pools_dispatch() -> None:
    held, free = make_pool(name="held"), make_pool(name="free")
    make_agent(held, "H1")
    make_agent(free, "F1")
    waiting = submit(make_workspace(held), "plan")
    other = submit(make_workspace(free), "plan")
    claimed, release = threading.Event(), threading.Event()

    def other_scheduler() -> None:
        try:
            with transaction.atomic():
                assert pool_claim(pool_id=held.pk, wait=False) is not None
                claimed.set()
                release.wait(30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=other_scheduler)
    holder.start()
    try:
        assert claimed.wait(30)
        assert scheduler_pass().dispatched == [other.pk]
    finally:
        release.set()
        holder.join(30)
    assert scheduler_pass().dispatched == [waiting.pk]


@pytest.mark.sqlite_only
def test_a_batch_writes_its_times_as_the_orm_does() -> None:
    """SQLite keeps times as text, and the ORM writes naive UTC ("2026-12-01 17:00:00.5"):
    the batch's raw statements write the same, not an aware "...+00:00" that compares
    differently as text at the same instant."""
    pool = make_pool()
    make_agent(pool, "a1")
    task = submit(make_workspace(pool))
    assert scheduler_pass().dispatched == [task.pk]
    with connection.cursor() as cursor:
        cursor.execute("SELECT CAST(since AS TEXT) FROM slots WHERE task_id = %s", [task.pk])
        (since,) = cursor.fetchone()
        cursor.execute(
            "SELECT CAST(dispatched_at AS TEXT), CAST(started_at AS TEXT) "
            "FROM workspace_tasks WHERE id = %s",
            [task.pk],
        )
        times = cursor.fetchone()
    for value in (since, *times):
        assert isinstance(value, str) and "+" not in value, value
