"""The worker's loops, wired together, drive a k8s pool against the fake API server over
HTTP with the real client: autoscaler creates the pod, reconciler adopts it, the agent
named after it registers, the scheduler dispatches to it (I-599 through run_once())."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from poolsadmin.agents.services import agent_register
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.pools.models import Pod
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.cluster_access import kube_override
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_acquire_or_renew
from poolsadmin.worker.loops import LOOPS
from tests.autoscaler.helpers import k8s_pool
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_workspace, refresh, submit
from tests.worker.leases import expire_lease

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


def test_a_pending_plan_in_an_empty_k8s_pool_runs_after_one_round_of_loops(
    cluster: FakeKubeServer,
) -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=3)
    task = submit(make_workspace(pool), "plan")

    _pass("scheduler", "autoscaler")
    [pod] = cluster.pods(pool.namespace or "default")
    _pass("reconciler")
    name = pod["metadata"]["name"]
    assert Pod.objects.filter(pool=pool, name=name).exists()
    agent_register(pool=pool, name=name)
    _pass("scheduler")

    task = refresh(task)
    assert (task.status, task.pod_name) == (TaskStatus.RUNNING, name)
    _pass("autoscaler")
    assert len(cluster.pods(pool.namespace or "default")) == 1  # no second pod


def test_only_the_lease_holder_scales_and_a_dead_holder_is_taken_over(
    cluster: FakeKubeServer,
) -> None:
    pool = k8s_pool(min_replicas=2, max_replicas=3)
    assert lease_acquire_or_renew(name=RECONCILER_LEASE, holder="other-worker", ttl_seconds=60)

    _pass("autoscaler", "reconciler")
    assert cluster.pods(pool.namespace or "default") == []

    # The other worker dies: its lease runs out and this worker takes over.
    expire_lease(RECONCILER_LEASE)
    _pass("autoscaler")
    assert len(cluster.pods(pool.namespace or "default")) == 2


def _adopt_and_register(pool: Any, cluster: FakeKubeServer) -> list[str]:
    """Reconciler adopts the pods the autoscaler created; each pod's agent registers."""
    _pass("reconciler")
    names = [p["metadata"]["name"] for p in cluster.pods(pool.namespace or "default")]
    for name in names:
        agent_register(pool=pool, name=name)
    return names


def test_i515_two_workspaces_plan_and_apply_get_two_pods_through_the_loops(
    cluster: FakeKubeServer,
) -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=5)
    t1 = submit(make_workspace(pool, "wsA"), "plan_and_apply")
    t2 = submit(make_workspace(pool, "wsB"), "plan_and_apply")

    _pass("scheduler", "autoscaler")
    names = _adopt_and_register(pool, cluster)
    _pass("scheduler", "autoscaler", "reconciler", "autoscaler")

    assert len(names) == 2
    t1, t2 = refresh(t1), refresh(t2)
    assert (t1.status, t2.status) == (TaskStatus.RUNNING, TaskStatus.RUNNING)
    assert {t1.pod_name, t2.pod_name} == set(names)
    assert len(cluster.pods(pool.namespace or "default")) == 2  # no shrink while both run


def test_i599_min_replicas_through_the_loops(cluster: FakeKubeServer) -> None:
    idle = k8s_pool(min_replicas=0, max_replicas=3)
    two = k8s_pool(min_replicas=2, max_replicas=3)

    _pass("autoscaler", "reconciler", "autoscaler")

    pods = cluster.pods(two.namespace or "default")
    by_pool = [p["metadata"]["labels"]["poolsadmin/pool"] for p in pods]
    assert by_pool.count(two.pool_id) == 2
    assert by_pool.count(idle.pool_id) == 0
