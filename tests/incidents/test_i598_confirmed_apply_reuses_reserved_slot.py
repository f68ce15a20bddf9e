"""I-598: the confirmed apply finds its own reserved slot (the founding incident)."""

from __future__ import annotations

import pytest

from poolsadmin.pools.models import Pod, SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import Stage, TaskStatus, Workspace
from poolsadmin.tasks.services import task_confirm_apply
from tests.ledger import (
    finish,
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


def test_confirmed_apply_reuses_its_reserved_slot_when_every_other_slot_is_busy() -> None:
    pool = make_pool(max_replicas=1)
    p1 = pod_of(make_agent(pool, "P1"))
    ws_a = make_workspace(pool, "wsA")
    t1 = plan_with_changes(submit(ws_a, "plan_and_apply"))
    others = [run(submit(make_workspace(pool), "plan")) for _ in range(3)]
    assert slot_states(p1) == [
        ("reserved", t1.pk),
        ("running", others[0].pk),
        ("running", others[1].pk),
        ("running", others[2].pk),
    ]
    assert refresh(t1).status == TaskStatus.APPLY_PENDING

    task_confirm_apply(task_id=t1.pk, actor="user:alice")
    assert task_diagnose(task=refresh(t1)).code == "dispatchable"
    result = scheduler_pass()

    t1 = refresh(t1)
    assert result.dispatched == [t1.pk]
    assert (t1.status, t1.stage) == (TaskStatus.RUNNING, Stage.APPLYING)
    assert (t1.pod_name, t1.slot_index, t1.reuse_workdir) == ("P1", 0, True)
    assert slot_states(p1)[0] == (SlotState.RUNNING, t1.pk)

    finish(t1, TaskStatus.APPLIED)
    assert slot_states(p1)[0] == (SlotState.IDLE, None)
    assert not Workspace.objects.get(pk=ws_a.pk).is_locked


def test_confirmed_apply_prefers_its_reserved_slot_over_idle_slots_and_idle_pods() -> None:
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    t1 = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    p2 = pod_of(make_agent(pool, "P2"))
    task_confirm_apply(task_id=t1.pk, actor="user:alice")

    scheduler_pass()

    t1 = refresh(t1)
    assert (t1.pod_name, t1.slot_index) == ("P1", 0)
    assert slot_states(p1)[0] == ("running", t1.pk)
    assert slot_states(p1)[1] == ("idle", None)
    assert all(state == "idle" for state, _ in slot_states(p2))


def test_a_confirmed_apply_still_resumes_its_reserved_slot_on_a_draining_pod() -> None:
    pool = make_pool()
    p1 = pod_of(make_agent(pool, "P1"))
    make_agent(pool, "P2")
    t1 = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    # Draining: the pod takes no new work (there is no drain service yet; issue 4 adds it).
    Pod.objects.filter(pk=p1.pk).update(cordoned=True)
    task_confirm_apply(task_id=t1.pk, actor="user:alice")
    plan = submit(make_workspace(pool), "plan")

    scheduler_pass()

    assert (refresh(t1).pod_name, refresh(t1).slot_index) == ("P1", 0)
    assert refresh(plan).pod_name == "P2"  # new work avoids the draining pod
