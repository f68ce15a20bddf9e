"""The pools overview's figures that are not plain counts."""

from __future__ import annotations

from datetime import timedelta

import pytest

from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.autoscaler.services import pool_pods_alive
from poolsadmin.lib import clock
from poolsadmin.pools.grid import pools_overview
from poolsadmin.pools.services import pod_create
from poolsadmin.tasks.services import task_confirm_apply
from tests.ledger import ADMIN, make_agent, make_pool, make_workspace, plan_with_changes, submit

pytestmark = pytest.mark.django_db


def test_a_confirmed_apply_waits_in_the_queue_from_its_confirmation_not_its_creation() -> None:
    pool = make_pool()
    make_agent(pool, "pod-0")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    clock.advance(3 * 3600)  # three hours waiting for a person: not queueing
    confirmed_at = clock.now()
    task_confirm_apply(task_id=task.pk, actor=ADMIN)

    [summary] = pools_overview()

    assert summary.queue_length == 1
    assert summary.queue_oldest_at is not None
    assert abs(summary.queue_oldest_at - confirmed_at) < timedelta(seconds=1)


def test_the_overview_carries_the_autoscalers_latest_desired_pod_count() -> None:
    pool = make_pool()
    assert pools_overview()[0].desired_pods is None
    for desired in (3, 5):
        ScaleDecision.objects.create(
            pool=pool,
            at=clock.now(),
            action="scale_up",
            actual=1,
            desired=desired,
            min=0,
            max=9,
            reason="test",
        )
        clock.advance(1)

    assert pools_overview()[0].desired_pods == 5


def test_finished_pods_are_pods_but_not_alive() -> None:
    pool = make_pool()
    for name, phase in (("a", "Running"), ("b", "Pending"), ("c", "Failed"), ("d", "Succeeded")):
        pod_create(pool=pool, name=name, phase=phase, actor=ADMIN)

    [summary] = pools_overview()

    assert (summary.pods, summary.pods_running, summary.pods_alive) == (4, 1, 2)
    assert pool_pods_alive(pool=pool) == 2
