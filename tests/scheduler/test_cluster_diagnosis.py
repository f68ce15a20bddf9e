"""Diagnosis codes that need the cluster (SPEC 9), for k8s pools: `no_pods` and
`no_online_agents` say what the autoscaler last decided (read from the stored ScaleDecision,
never recomputed), and `no_online_agents` names each pod and why it cannot take work."""

from __future__ import annotations

from typing import Any

import pytest

from poolsadmin.agents.services import agent_register
from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import stamp
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pod_create
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.tasks.models import WorkspaceTask
from tests.autoscaler.helpers import k8s_pool
from tests.ledger import make_agent, make_pool, make_workspace, submit

pytestmark = pytest.mark.django_db


def decide(pool: AgentPool, **kwargs: Any) -> ScaleDecision:
    fields: dict[str, Any] = {
        "at": clock.now(),
        "desired": 1,
        "actual": 0,
        "min": pool.min_replicas,
        "max": pool.max_replicas,
        "action": "scale_up",
        "reason": "desired 1: 1 queued",
    }
    fields.update(kwargs)
    return ScaleDecision.objects.create(pool=pool, **fields)


def waiting_plan(pool: AgentPool) -> WorkspaceTask:
    return submit(make_workspace(pool), "plan")


def test_no_pods_says_how_many_pods_the_autoscaler_asked_for_and_when() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=3)
    task = waiting_plan(pool)
    decision = decide(pool, desired=2, reason="desired 2: 2 queued", created_pods=["a-1", "a-2"])

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "no_pods"
    assert diagnosis.blocker == pool.pool_id
    assert f"asked for 2 pods at {stamp(decision.at)} (desired 2: 2 queued)" in diagnosis.text
    # The decision created pods that the reconciler has not adopted yet.
    assert "Scale-up in progress: a-1 (not adopted yet), a-2 (not adopted yet)" in diagnosis.text


def test_the_latest_decision_is_the_one_shown() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=3)
    task = waiting_plan(pool)
    decide(pool, desired=1, reason="desired 1: old")
    clock.advance(10)
    decide(pool, desired=3, reason="desired 3: new")

    text = task_diagnose(task=task).text

    assert "asked for 3 pods" in text and "desired 3: new" in text and "old" not in text


def test_no_pods_says_scale_up_is_blocked_by_a_cluster_error() -> None:
    pool = k8s_pool(min_replicas=1, max_replicas=3)
    task = waiting_plan(pool)
    decide(
        pool,
        action="blocked",
        desired=1,
        actual=0,
        reason="desired 1: 1 queued; scale-up 0 -> 1 failed: create refused (403 Forbidden)",
    )

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "no_pods"
    assert "Scale-up is blocked" in diagnosis.text
    assert "403 Forbidden" in diagnosis.text


def test_a_pool_at_max_replicas_says_so() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=1)
    pod_create(pool=pool, name="only", phase="Pending", actor="test")
    task = waiting_plan(pool)
    decide(pool, action="none", desired=1, actual=1, reason="desired 1: 1 queued")

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "no_online_agents"
    assert "at max replicas 1" in diagnosis.text


def test_no_decision_yet_is_said_in_words() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=3)
    task = waiting_plan(pool)

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "no_pods"
    assert "no decision for this pool yet" in diagnosis.text


def test_no_online_agents_names_each_pod_and_why_it_cannot_take_work() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=5)
    clock.advance(-600)
    pod_create(pool=pool, name="old-pod", phase="Running", actor="test")
    agent_register(pool=pool, name="old-pod")  # its last heartbeat is ten minutes old
    last_ping = clock.now()
    clock.reset()
    pod_create(pool=pool, name="pending-pod", phase="Pending", actor="test")
    pod_create(pool=pool, name="fresh-pod", phase="Running", actor="test")
    task = waiting_plan(pool)

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "no_online_agents"
    assert set(diagnosis.blocker.split(",")) == {"old-pod", "pending-pod", "fresh-pod"}
    assert "pod pending-pod is Pending" in diagnosis.text
    assert "pod fresh-pod: no agent registered yet" in diagnosis.text
    assert f"pod old-pod: agent old-pod offline since {stamp(last_ping)}" in diagnosis.text


def test_scale_up_in_progress_names_the_created_pods_not_running_yet() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=5)
    pod_create(pool=pool, name="new-1", phase="Pending", actor="test")
    pod_create(pool=pool, name="new-2", phase="Running", actor="test")
    task = waiting_plan(pool)
    decision = decide(
        pool, desired=3, reason="desired 3: 3 queued", created_pods=["new-1", "new-2", "new-3"]
    )

    text = task_diagnose(task=task).text

    assert (
        "Scale-up in progress: new-1 (Pending), new-2 (no agent registered yet), "
        f"new-3 (not adopted yet) created at {stamp(decision.at)}, not running yet."
    ) in text


def test_once_the_created_pods_run_with_agents_no_scale_up_is_in_progress() -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=5)
    pod_create(pool=pool, name="new-1", phase="Running", actor="test")
    agent_register(pool=pool, name="new-1")
    task = waiting_plan(pool)
    decide(pool, created_pods=["new-1"])

    diagnosis = task_diagnose(task=task)

    assert diagnosis.code == "dispatchable"
    assert "Scale-up" not in diagnosis.text


def test_static_pools_keep_their_wording() -> None:
    pool = make_pool()
    task = waiting_plan(pool)
    assert (
        task_diagnose(task=task).text == f"Pool {pool.name} has no pods (no agent has registered)."
    )

    clock.advance(-600)
    make_agent(pool, "P1")
    clock.reset()
    diagnosis = task_diagnose(task=task)
    assert diagnosis.code == "no_online_agents"
    assert "agent P1 is offline (last heartbeat" in diagnosis.text
    assert "autoscaler" not in diagnosis.text
