"""I-604 with a k8s pool, through run_once() of the worker's loops against the fake API
server: a pod whose agent is not up yet takes no work, the diagnosis names the pod and its
missing agent, and the task goes to the pod's agent within one pass after it registers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from poolsadmin.agents.services import agent_register
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod, Slot, SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.tasks.models import TaskStatus, WaitReason
from poolsadmin.worker.cluster_access import kube_override
from poolsadmin.worker.loops import LOOPS
from tests.autoscaler.helpers import NAMESPACE, cluster_pods, k8s_pool
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_workspace, refresh, submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def cluster(fake_kube: FakeKubeServer, kube_client: KubeClient) -> Iterator[FakeKubeServer]:
    fake_kube.auto_run = True
    kube_override(kube_client)
    yield fake_kube
    kube_override(None)


def _pass(*names: str) -> None:
    for name in names:
        LOOPS[name].run_once()


def _pods_created_30s_ago(pool: AgentPool, cluster: FakeKubeServer) -> list[str]:
    """The autoscaler creates `min_replicas` pods, the reconciler adopts them, 30 s pass."""
    _pass("autoscaler", "reconciler")
    names = sorted(cluster_pods(cluster))
    assert len(names) == pool.min_replicas
    assert set(Pod.objects.filter(pool=pool).values_list("name", flat=True)) == set(names)
    clock.advance(30)
    return names


def test_a_plan_goes_to_the_pod_whose_agent_is_online_not_to_the_new_one(
    cluster: FakeKubeServer,
) -> None:
    pool = k8s_pool(min_replicas=2, max_replicas=2)
    p1, p2 = _pods_created_30s_ago(pool, cluster)
    agent_register(pool=pool, name=p2)
    t1 = submit(make_workspace(pool), "plan")

    _pass("scheduler")

    t1 = refresh(t1)
    assert (t1.status, t1.pod_name) == (TaskStatus.RUNNING, p2)
    assert not Slot.objects.filter(pod__name=p1).exclude(state=SlotState.IDLE).exists()


def test_with_only_the_new_pod_the_plan_waits_names_its_agent_and_runs_once_it_registers(
    cluster: FakeKubeServer,
) -> None:
    pool = k8s_pool(min_replicas=1, max_replicas=1)
    [p1] = _pods_created_30s_ago(pool, cluster)
    t1 = submit(make_workspace(pool), "plan")

    _pass("scheduler", "autoscaler", "reconciler", "diagnosis")

    t1 = refresh(t1)
    assert t1.status == TaskStatus.PENDING
    assert not Slot.objects.exclude(state=SlotState.IDLE).exists()
    assert cluster_pods(cluster) == [p1]  # at max replicas: no second pod
    diagnosis = task_diagnose(task=t1)
    assert diagnosis.code == "no_online_agents"
    assert diagnosis.blocker == p1
    assert f"pod {p1}: no agent registered yet" in diagnosis.text
    recorded = WaitReason.objects.get(task=t1, ended_at__isnull=True)
    assert (recorded.code, recorded.blocker) == ("no_online_agents", p1)

    agent = agent_register(pool=pool, name=p1).agent
    _pass("scheduler")

    t1 = refresh(t1)
    assert (t1.status, t1.agent_id, t1.pod_name) == (TaskStatus.RUNNING, agent.agent_id, p1)
    assert Slot.objects.filter(pod__name=p1, state=SlotState.RUNNING, task=t1).count() == 1
    assert cluster_pods(cluster) == [p1]
    assert pool.namespace == NAMESPACE
