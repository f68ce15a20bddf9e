"""pool_demand counts only work the scheduler would run (its own rules decide)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from poolsadmin.autoscaler.demand import pool_demand
from poolsadmin.lib import clock
from poolsadmin.pools.services import pool_pause, slot_free_for_task
from poolsadmin.tasks.services import task_confirm_apply
from tests.ledger import (
    ADMIN,
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    run,
    submit,
)

pytestmark = pytest.mark.django_db


def test_running_reserved_and_queued_work_make_the_demand() -> None:
    pool = make_pool(slots_per_pod=2)
    make_agent(pool, "P1")
    make_agent(pool, "P2")
    run(submit(make_workspace(pool), "plan"))
    plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    for _ in range(3):
        submit(make_workspace(pool), "plan")

    demand = pool_demand(pool=pool, now=clock.now())

    assert (demand.running, demand.reserved, demand.queued) == (1, 1, 3)
    assert demand.plan_and_apply == 1
    assert demand.needed == 3  # 5 slots / 2 per pod
    assert demand.text().startswith("1 running + 1 reserved + 3 queued")


def test_plan_and_apply_demand_needs_a_pod_each() -> None:
    pool = make_pool()
    for name in ("wsA", "wsB", "wsC"):
        submit(make_workspace(pool, name), "plan_and_apply")

    demand = pool_demand(pool=pool, now=clock.now())

    assert (demand.queued, demand.plan_and_apply, demand.needed) == (3, 3, 3)


def test_serial_plan_and_apply_of_one_workspace_counts_once() -> None:
    pool = make_pool()
    workspace = make_workspace(pool)
    submit(workspace, "plan_and_apply")
    submit(workspace, "plan_and_apply")
    submit(workspace, "plan_and_apply")

    demand = pool_demand(pool=pool, now=clock.now())

    assert (demand.queued, demand.needed) == (1, 1)


def test_locked_workspace_work_does_not_count_but_its_speculative_plans_do() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    workspace = make_workspace(pool)
    plan_with_changes(submit(workspace, "plan_and_apply"))  # locks the workspace
    submit(workspace, "drift_check")
    submit(workspace, "plan")

    demand = pool_demand(pool=pool, now=clock.now())

    assert (demand.reserved, demand.queued, demand.applies) == (1, 1, 0)


def test_an_unconfirmed_apply_without_a_slot_does_not_count_and_a_confirmed_one_does() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    slot_free_for_task(task_id=task.pk, actor=ADMIN, reason="expired", pool_id=pool.pk)

    assert pool_demand(pool=pool, now=clock.now()).slots == 0

    task_confirm_apply(task_id=task.pk, actor=ADMIN)
    demand = pool_demand(pool=pool, now=clock.now())
    assert (demand.applies, demand.plan_and_apply, demand.needed) == (1, 1, 1)


def test_a_paused_pool_has_no_queued_demand() -> None:
    pool = make_pool()
    submit(make_workspace(pool), "plan")
    pool = pool_pause(pool_id=pool.pk, actor=ADMIN, reason="maintenance")

    demand = pool_demand(pool=pool, now=clock.now())

    assert (demand.queued, demand.needed) == (0, 0)
    assert "paused" in demand.blocked_reason


def test_demand_reads_a_fixed_number_of_queries(django_assert_num_queries: Any) -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    run(submit(make_workspace(pool), "plan"))
    for _ in range(20):
        submit(make_workspace(pool), "plan")

    with django_assert_num_queries(3):  # busy slots, freeze windows, waiting tasks
        pool_demand(pool=pool, now=clock.now())


def _queries_of_demand_with_serial_work(workspaces: int) -> int:
    pool = make_pool(name=f"serial-{workspaces}")
    make_agent(pool, f"serial-{workspaces}-P1")
    for _ in range(workspaces):
        workspace = make_workspace(pool)
        submit(workspace, "plan_and_apply")
        submit(workspace, "plan_and_apply")  # rule 2: behind the one before
    with CaptureQueriesContext(connection) as queries:
        demand = pool_demand(pool=pool, now=clock.now())
    assert demand.queued == workspaces  # the first of each workspace only
    return len(queries)


def test_rule_2_costs_one_query_however_many_workspaces_wait() -> None:
    # busy slots, freeze windows, waiting tasks, rule 2's heads: not one per workspace.
    assert _queries_of_demand_with_serial_work(2) == _queries_of_demand_with_serial_work(6) == 4
