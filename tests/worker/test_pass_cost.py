"""What one round of the cluster loops costs, in queries and API calls, at N and at 2N pods.

Issue 9: the reconciler and the autoscaler run every few seconds over pools of 1,000 pods, so
a round must cost the same whatever the pool's size, and a round that changes many pods (a
cold start adopts them all, a node loss takes them all away) must change them in bulk, not
with a few queries per pod. Each round runs the worker's loops (worker/loops.py) against the
fake API server over HTTP with the real client; queries are counted with Django's
CaptureQueriesContext and API calls in the fake server's request log. The only calls that
grow with the change are those Kubernetes has no bulk form of: one create per new pod, one
delete per pod to remove.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from poolsadmin.agents.services import agent_register
from poolsadmin.kube.adapter import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POOL_LABEL,
    TEMPLATE_HASH_LABEL,
    template_hash,
)
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.worker.loops import LOOPS
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import agent_of, make_workspace, submit
from tests.worker.kube_scenarios import make_k8s_pool

pytestmark = pytest.mark.django_db

N = 3
_serial = itertools.count()


def _cost(cluster: FakeKubeServer, step: Callable[[], object]) -> tuple[int, int]:
    """(queries, API calls) of one step."""
    calls = len(cluster.requests_log)
    with CaptureQueriesContext(connection) as queries:
        step()
    return len(queries), len(cluster.requests_log) - calls


def _round() -> None:
    """The cluster loops of one round of the worker."""
    LOOPS["reconciler"].run_once()
    LOOPS["autoscaler"].run_once()


def _pool(**kwargs: object) -> AgentPool:
    # No idle pod is due for scale-down during a test: the rounds measured change nothing
    # but what the test makes happen.
    kwargs.setdefault("scale_down_idle_seconds", 3600)
    kwargs.setdefault("max_replicas", 100)
    pool = make_k8s_pool(slots_per_pod=2, **kwargs)
    _round()  # the first round creates the loops' lease rows: a cost paid once, not per round
    return pool


def _add_pods(cluster: FakeKubeServer, pool: AgentPool, count: int, phase: str) -> list[str]:
    """`count` more pods of `pool` in the cluster, as the autoscaler makes them."""
    labels = {
        POOL_LABEL: pool.pool_id,
        MANAGED_BY_LABEL: MANAGED_BY,
        TEMPLATE_HASH_LABEL: template_hash(pool),
    }
    names = [f"agent-{next(_serial):03d}" for _ in range(count)]
    for name in names:
        cluster.add_pod(pool.namespace, name, labels=labels, phase=phase)
    return names


def _grow(cluster: FakeKubeServer, pool: AgentPool, count: int) -> None:
    """`count` more running pods, adopted, each with its agent registered."""
    for name in _add_pods(cluster, pool, count, "Running"):
        LOOPS["reconciler"].run_once()
        agent_register(pool=pool, name=name, version="test")


def test_a_steady_round_costs_the_same_at_n_and_at_2n_pods(
    worker_cluster: FakeKubeServer,
) -> None:
    pool = _pool()
    _grow(worker_cluster, pool, N)
    # Work in the pool: the autoscaler counts it, the reconciler checks its slots.
    for _ in range(2):
        task = submit(make_workspace(pool))
        LOOPS["scheduler"].run_once()
        assert agent_of(task) is not None
    _round()
    at_n = _cost(worker_cluster, _round)

    _grow(worker_cluster, pool, N)
    _round()
    at_2n = _cost(worker_cluster, _round)

    assert at_2n == at_n
    assert at_n[1] == 2  # one listing for cluster sync, one for the autoscaler


def test_adopting_n_or_2n_new_pods_costs_the_same(worker_cluster: FakeKubeServer) -> None:
    pool = _pool()
    _add_pods(worker_cluster, pool, N, "Running")
    adopt_n = _cost(worker_cluster, LOOPS["reconciler"].run_once)
    _add_pods(worker_cluster, pool, 2 * N, "Running")
    adopt_2n = _cost(worker_cluster, LOOPS["reconciler"].run_once)

    assert Pod.objects.filter(pool=pool).count() == 3 * N
    assert adopt_2n == adopt_n


def test_n_or_2n_pods_starting_to_run_cost_the_same(worker_cluster: FakeKubeServer) -> None:
    pool = _pool()

    def start(count: int) -> tuple[int, int]:
        names = _add_pods(worker_cluster, pool, count, "Pending")
        LOOPS["reconciler"].run_once()  # adopted while pending
        for name in names:
            worker_cluster.set_phase(name, "Running")
        return _cost(worker_cluster, LOOPS["reconciler"].run_once)

    assert start(N) == start(2 * N)
    assert set(Pod.objects.filter(pool=pool).values_list("phase", flat=True)) == {"Running"}


def test_n_or_2n_pods_vanishing_cost_the_same(worker_cluster: FakeKubeServer) -> None:
    pool = _pool()

    def vanish(count: int) -> tuple[int, int]:
        before = {p["metadata"]["name"] for p in worker_cluster.pods(pool.namespace)}
        _grow(worker_cluster, pool, count)
        new = {p["metadata"]["name"] for p in worker_cluster.pods(pool.namespace)} - before
        for name in new:
            worker_cluster.delete_behind_back(name)
        return _cost(worker_cluster, LOOPS["reconciler"].run_once)

    assert vanish(N) == vanish(2 * N)
    assert not Pod.objects.filter(pool=pool).exists()


def test_scaling_up_by_n_or_2n_pods_costs_one_create_per_pod_and_the_same_queries(
    worker_cluster: FakeKubeServer,
) -> None:
    pool = _pool(min_replicas=N)
    LOOPS["reconciler"].run_once()  # the N pods made by the first round, adopted

    def scale_up(to: int) -> tuple[int, int]:
        AgentPool.objects.filter(pk=pool.pk).update(min_replicas=to)
        cost = _cost(worker_cluster, LOOPS["autoscaler"].run_once)
        LOOPS["reconciler"].run_once()
        return cost

    up_n, up_2n = scale_up(2 * N), scale_up(4 * N)
    assert len(worker_cluster.pods(pool.namespace)) == 4 * N
    assert (up_n[1], up_2n[1]) == (1 + N, 1 + 2 * N)  # one listing, one create per pod
    assert up_2n[0] == up_n[0]
