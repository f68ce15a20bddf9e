"""I-W4: no double dispatch, proven with real concurrency.

Several scheduler passes start at the same instant in separate threads, each with its own
database connection. On PostgreSQL this exercises the row locks (`FOR UPDATE SKIP LOCKED`) and
the conditional updates; on SQLite the IMMEDIATE transactions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from django.db import connection, connections

from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, PoolStatus, Slot, SlotState
from poolsadmin.scheduler.services import PassResult, scheduler_pass
from poolsadmin.tasks.models import TaskStatus, TaskType, Workspace, WorkspaceTask
from tests.conftest import IS_POSTGRES
from tests.fleet import fleet_build, tasks_queue
from tests.ledger import make_agent, make_pool, make_workspace, submit

ROUNDS = 20 if IS_POSTGRES else 5


def _concurrently(n: int, work: Callable[[], PassResult]) -> list[PassResult]:
    barrier = threading.Barrier(n)
    results: list[PassResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def body() -> None:
        try:
            barrier.wait()
            result = work()
            with lock:
                results.append(result)
        except BaseException as exc:  # surfaced below: a thread must not fail silently
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == n
    return results


def _bulk_pending(pool: AgentPool, workspaces: list[Workspace], count: int) -> list[int]:
    """Bulk data: 200 pending tasks straight into the table (a factory, not a scenario)."""
    now = clock.now()
    kinds = [TaskType.PLAN] * 7 + [TaskType.PLAN_AND_APPLY, TaskType.DRIFT_CHECK]
    rows = [
        WorkspaceTask(
            workspace=workspaces[i % len(workspaces)],
            pool=pool,
            task_type=kinds[i % len(kinds)],
            status=TaskStatus.PENDING,
            created_at=now,
        )
        for i in range(count)
    ]
    WorkspaceTask.objects.bulk_create(rows)
    return list(WorkspaceTask.objects.filter(pool=pool).values_list("id", flat=True))


def _retire(pool: AgentPool) -> None:
    """Take a finished round out of later rounds' way: its dispatches count as acknowledged
    (no ack-timeout rollbacks later) and the pool stops dispatching. Bulk test cleanup."""
    WorkspaceTask.objects.filter(pool=pool, status=TaskStatus.RUNNING).update(acked_at=clock.now())
    AgentPool.objects.filter(pk=pool.pk).update(status=PoolStatus.PAUSED)


def _assert_ledger_consistent(pool: AgentPool, results: list[PassResult]) -> None:
    mine = set(WorkspaceTask.objects.filter(pool=pool).values_list("id", flat=True))
    dispatched = [task_id for r in results for task_id in r.dispatched if task_id in mine]
    assert len(dispatched) == len(set(dispatched)), "a task was dispatched by two passes"
    per_task = Counter(
        Event.objects.filter(pool_id=pool.pool_id, kind="task.dispatched").values_list(
            "task_id", flat=True
        )
    )
    assert all(n == 1 for n in per_task.values()), "a task was dispatched twice"
    per_slot = Counter(
        Event.objects.filter(pool_id=pool.pool_id, kind="slot.taken").values_list(
            "target_id", flat=True
        )
    )
    assert all(n == 1 for n in per_slot.values()), "a slot was filled twice"
    running = set(
        WorkspaceTask.objects.filter(pool=pool, status=TaskStatus.RUNNING).values_list(
            "id", flat=True
        )
    )
    assert running == set(dispatched) == set(per_task)
    held = list(
        Slot.objects.filter(pod__pool=pool, state=SlotState.RUNNING).values_list(
            "task_id", flat=True
        )
    )
    assert sorted(held) == sorted(running), "every running task holds exactly one slot"
    per_pod = Counter(
        Slot.objects.filter(pod__pool=pool, task_type=TaskType.PLAN_AND_APPLY).values_list(
            "pod_id", flat=True
        )
    )
    assert all(n <= pool.plan_and_apply_per_pod for n in per_pod.values())


@pytest.mark.django_db(transaction=True)
def test_four_concurrent_passes_over_200_tasks_and_50_slots_dispatch_each_task_once() -> None:
    for round_ in range(ROUNDS):
        pool = make_pool(name=f"iw4-{round_}", slots_per_pod=5)
        for i in range(10):
            make_agent(pool, f"iw4-{round_}-pod-{i}")
        workspaces = [make_workspace(pool) for _ in range(40)]
        _bulk_pending(pool, workspaces, 200)

        results = _concurrently(4, scheduler_pass)

        _assert_ledger_consistent(pool, results)
        # 50 slots, plenty of plans: every slot is filled.
        assert Slot.objects.filter(pod__pool=pool, state=SlotState.IDLE).count() == 0
        _retire(pool)


@pytest.mark.django_db(transaction=True)
def test_two_passes_at_the_same_instant_dispatch_a_single_task_once() -> None:
    for round_ in range(ROUNDS * 2):
        pool = make_pool(name=f"iw4-single-{round_}")
        make_agent(pool, f"single-{round_}-pod")
        task = submit(make_workspace(pool, "wsA"), "plan")

        results = _concurrently(2, scheduler_pass)

        assert sorted(t for r in results for t in r.dispatched) == [task.pk]
        _assert_ledger_consistent(pool, results)
        _retire(pool)
    assert connection.vendor in {"postgresql", "sqlite"}


# Four scheduler processes, each with its own connections, as four workers run them.
SCHEDULER_PROCESS = """
import sys, time
import django
django.setup()
from poolsadmin.scheduler.services import scheduler_pass
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
idle = 0
while idle < 20:  # another process may hold the pools that are left: look again a while
    idle = 0 if scheduler_pass().dispatched else idle + 1
    time.sleep(0.01 * idle)
"""


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_four_scheduler_processes_over_5000_tasks_dispatch_each_task_once() -> None:
    """The batch claim (issue 9) under real concurrency: 4 processes, 5,000 waiting tasks of
    every kind in 10 pools of 5,000 slots, all passes started at the same instant."""
    fleet = fleet_build(pools=10, pods_per_pool=25, slots_per_pod=20, workspaces=500)
    kinds = (TaskType.PLAN,) * 6 + (TaskType.PLAN_AND_APPLY, TaskType.DRIFT_CHECK)
    tasks_queue(fleet, count=5000, kinds=kinds)
    database = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}"
        f"/{database['NAME']}",
        "POOLSADMIN_HEARING_KEEPER": "false",
        "POOLSADMIN_ACK_TIMEOUT_SECONDS": "86400",  # nothing acknowledges: roll nothing back
    }
    start = time.time() + 5  # every process has imported Django and connected by then
    processes = [
        subprocess.Popen([sys.executable, "-c", SCHEDULER_PROCESS, str(start)], env=env)
        for _ in range(4)
    ]
    try:
        assert [p.wait(timeout=600) for p in processes] == [0, 0, 0, 0]
    finally:
        for p in processes:
            p.kill()

    for pool in fleet.pools:
        dispatched = [
            task_id
            for task_id in Event.objects.filter(
                pool_id=pool.pool_id, kind="task.dispatched"
            ).values_list("task_id", flat=True)
            if task_id is not None
        ]
        _assert_ledger_consistent(pool, [PassResult(dispatched=dispatched)])
        # Rule 2 held across processes: one open plan_and_apply per workspace at a time.
        serial = Counter(
            WorkspaceTask.objects.filter(
                pool=pool, task_type=TaskType.PLAN_AND_APPLY, status=TaskStatus.RUNNING
            ).values_list("workspace_id", flat=True)
        )
        assert all(n == 1 for n in serial.values())
    # Every slot that could take a task took one: plans alone outnumber the slots left.
    left = WorkspaceTask.objects.filter(status=TaskStatus.PENDING, task_type=TaskType.PLAN)
    assert not left.exists() or not Slot.objects.filter(state=SlotState.IDLE).exists()
    assert (
        Event.objects.filter(kind="task.dispatched").count()
        == WorkspaceTask.objects.filter(status=TaskStatus.RUNNING).count()
    )
