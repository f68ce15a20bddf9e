"""I-523: confirm starts the apply, and keeps trying."""

from __future__ import annotations

import pytest

from poolsadmin.lib import clock
from poolsadmin.pools.models import SlotState
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import Stage, TaskStatus
from poolsadmin.tasks.services import task_accept, task_confirm_apply
from tests.ledger import (
    agent_of,
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    refresh,
    slot_states,
    submit,
)

pytestmark = pytest.mark.django_db


def test_confirm_starts_the_apply_within_one_pass_and_a_lost_dispatch_is_retried() -> None:
    pool = make_pool()
    agent = make_agent(pool, "P1")
    pod = pod_of(agent)
    ws_a = make_workspace(pool, "wsA")
    t1 = plan_with_changes(submit(ws_a, "plan_and_apply"))
    t2 = submit(ws_a, "plan")

    first = scheduler_pass()
    assert first.dispatched == [t2.pk]
    task_accept(task_id=t2.pk, agent=agent)
    assert refresh(t1).status == TaskStatus.APPLY_PENDING

    task_confirm_apply(task_id=t1.pk, actor="user:alice")
    assert scheduler_pass().dispatched == [t1.pk]
    t1 = refresh(t1)
    assert (t1.status, t1.stage) == (TaskStatus.RUNNING, Stage.APPLYING)

    # The agent is briefly gone: the dispatch is never acknowledged.
    clock.advance(31)
    assert scheduler_pass().rolled_back == [t1.pk]
    t1 = refresh(t1)
    assert t1.status == TaskStatus.APPLY_PENDING
    assert t1.apply_confirmed_by == "user:alice"
    assert t1.retry_count == 1
    # The plan's slot goes back to being reserved for it: the working directory is still there.
    assert slot_states(pod)[0] == (SlotState.RESERVED, t1.pk)

    assert scheduler_pass().dispatched == []  # back-off: 5 s
    clock.advance(5)
    assert scheduler_pass().dispatched == [t1.pk]
    task_accept(task_id=t1.pk, agent=agent_of(t1))
    t1 = refresh(t1)
    assert (t1.status, t1.stage, t1.retry_count) == (TaskStatus.RUNNING, Stage.APPLYING, 0)
    assert (t1.pod_name, t1.slot_index, t1.reuse_workdir) == ("P1", 0, True)
