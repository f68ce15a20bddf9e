"""The worker's loops, wired together, drive a k8s pool against the fake API server over
HTTP with the real client: autoscaler creates the pod, reconciler adopts it, the agent
named after it registers, the scheduler dispatches to it (I-599 through run_once())."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from poolsadmin.agents.services import agent_register
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.lib import clock
from poolsadmin.pools.models import Pod
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.cluster_access import kube_override
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_acquire_or_renew
from poolsadmin.worker.loops import LOOPS
from tests.autoscaler.helpers import k8s_pool
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
    clock.advance(61)
    _pass("autoscaler")
    assert len(cluster.pods(pool.namespace or "default")) == 2
