"""One bad row never stops a loop for everyone else (SPEC 5, issue 8 item 5).

The row that did it in practice: an agent name of 253 characters (what Kubernetes allows for a
pod name, and what registration accepts) in a slot's event label, and a "no pod can take
work" blocker naming ten such pods. Both run on PostgreSQL, which enforces column lengths.
"""

from __future__ import annotations

from typing import Any

import pytest

from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools import services as pool_services
from poolsadmin.scheduler import diagnosis as diagnosis_module
from poolsadmin.scheduler import services as scheduler
from poolsadmin.scheduler.diagnosis import diagnosis_record_all, task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus, WaitReason
from poolsadmin.tasks.services import task_accept
from poolsadmin.worker import reconcile
from poolsadmin.worker.reconcile import reconcile_pool
from tests.ledger import (
    agent_of,
    finish,
    make_agent,
    make_pool,
    make_workspace,
    refresh,
    run,
    submit,
)

pytestmark = pytest.mark.django_db

LONGEST = 253  # a Kubernetes pod name, and the longest agent name registration accepts


def test_an_agent_with_the_longest_name_registration_accepts_runs_tasks() -> None:
    pool = make_pool()
    agent = make_agent(pool, "a" * LONGEST)
    task = submit(make_workspace(pool), "plan")
    assert scheduler_pass().dispatched == [task.pk]
    task_accept(task_id=task.pk, agent=agent_of(task))
    finish(task)
    assert refresh(task).status == TaskStatus.SUCCESS
    assert Event.objects.filter(kind="slot.taken", target_id=f"{agent.agent_name}[0]").exists()


def test_a_task_whose_dispatch_raises_waits_out_a_back_off_and_the_pass_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = make_pool(name="a-pool"), make_pool(name="b-pool")
    make_agent(first, "A1")
    make_agent(second, "B1")
    broken = submit(make_workspace(first), "plan")
    fine = submit(make_workspace(first), "plan")
    elsewhere = submit(make_workspace(second), "plan")
    real = pool_services.slots_take

    def slots_take(**kwargs: Any) -> Any:
        if any(claim.task_id == broken.pk for claim in kwargs["claims"]):
            raise ValueError("a row no column can hold")
        return real(**kwargs)

    monkeypatch.setattr(scheduler, "slots_take", slots_take)

    result = scheduler_pass()

    assert sorted(result.dispatched) == sorted([fine.pk, elsewhere.pk])
    broken = refresh(broken)
    assert broken.status == TaskStatus.PENDING and broken.slot_index is None
    assert "ValueError: a row no column can hold" in broken.last_dispatch_error
    assert broken.next_attempt_at is not None and broken.next_attempt_at > clock.now()
    diagnosis = task_diagnose(task=broken)
    assert diagnosis.code == "retry_backoff" and "a row no column can hold" in diagnosis.text
    assert Event.objects.filter(kind="task.dispatch_failed", task_id=broken.pk).count() == 1
    # Not retried at every pass: the back-off holds it until its next attempt.
    assert broken.pk not in scheduler_pass().dispatched
    assert Event.objects.filter(kind="task.dispatch_failed", task_id=broken.pk).count() == 1


def test_a_pool_whose_pass_raises_does_not_stop_the_pools_sorting_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = make_pool(pool_id="pool-aaaaaaaaaaaaaaaa"), make_pool(name="p2")
    make_agent(first, "A1")
    make_agent(second, "B1")
    submit(make_workspace(first), "plan")
    task = submit(make_workspace(second), "plan")
    real = scheduler.dispatch_candidates

    def candidates(*, pool_id: str, **kwargs: Any) -> Any:
        if pool_id == first.pool_id:
            raise RuntimeError("broken pool")
        return real(pool_id=pool_id, **kwargs)

    monkeypatch.setattr(scheduler, "dispatch_candidates", candidates)

    assert scheduler_pass().dispatched == [task.pk]


def test_a_blocker_naming_ten_of_the_longest_pod_names_is_recorded() -> None:
    pool = make_pool(heartbeat_timeout_seconds=120)
    for i in range(11):
        make_agent(pool, f"{i:02d}" + "p" * (LONGEST - 2))
    clock.advance(121)  # every agent is offline: no pod can take work
    task = submit(make_workspace(pool), "plan")

    assert diagnosis_record_all() == 1

    reason = WaitReason.objects.get(task=task)
    assert reason.code == "no_online_agents"
    assert len(reason.blocker) > 10 * LONGEST


def test_a_task_whose_diagnosis_raises_leaves_the_others_diagnosed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool()
    broken, fine = (submit(make_workspace(pool), "plan") for _ in range(2))
    real = diagnosis_module.task_diagnose

    def diagnose(*, task: Any, **kwargs: Any) -> Any:
        if task.pk == broken.pk:
            raise ValueError("broken task")
        return real(task=task, **kwargs)

    monkeypatch.setattr(diagnosis_module, "task_diagnose", diagnose)

    assert diagnosis_record_all() == 1
    assert WaitReason.objects.filter(task=fine).exists()
    assert not WaitReason.objects.filter(task=broken).exists()


def test_a_task_whose_repair_raises_does_not_stop_the_repairs_of_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool(heartbeat_timeout_seconds=120, task_grace_seconds=60)
    make_agent(pool, "P1")
    make_agent(pool, "P2")
    broken = run(submit(make_workspace(pool), "plan"))
    other = run(submit(make_workspace(pool), "plan"))
    real = reconcile.task_fail_lost

    def fail_lost(*, task_id: int, **kwargs: Any) -> Any:
        if task_id == broken.pk:
            raise ValueError("broken task")
        return real(task_id=task_id, **kwargs)

    monkeypatch.setattr(reconcile, "task_fail_lost", fail_lost)
    clock.advance(181)  # both agents lost

    reconcile_pool(pool=pool, kube=None)

    assert refresh(other).status == TaskStatus.FAILED
    assert refresh(broken).status == TaskStatus.RUNNING  # the next pass tries again
