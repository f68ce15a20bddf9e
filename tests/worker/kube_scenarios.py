"""Builders for reconciler scenarios on a k8s pool backed by the fake API server."""

from __future__ import annotations

from poolsadmin.agents.models import Agent
from poolsadmin.kube.adapter import POOL_LABEL, KubeApi
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.worker.cluster import cluster_sync
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_agent, make_pool

NAMESPACE = "agents"


def make_k8s_pool(**kwargs: object) -> AgentPool:
    kwargs.setdefault("pool_type", "k8s")
    kwargs.setdefault("pod_image", "registry.example/agent:1")
    kwargs.setdefault("namespace", NAMESPACE)
    kwargs.setdefault("max_replicas", 3)
    return make_pool(**kwargs)


def cluster_pod(server: FakeKubeServer, pool: AgentPool, name: str, phase: str = "Running") -> None:
    """A pod of `pool` in the cluster (as the autoscaler or a human would have made it)."""
    server.add_pod(pool.namespace, name, labels={POOL_LABEL: pool.pool_id}, phase=phase)


def adopted_pod_with_agent(
    server: FakeKubeServer, kube: KubeApi, pool: AgentPool, name: str
) -> tuple[Pod, Agent]:
    """A running pod in the cluster and the ledger, with its agent online."""
    cluster_pod(server, pool, name)
    cluster_sync(pool=pool, kube=kube)
    agent = make_agent(pool, name)
    return Pod.objects.get(pool=pool, name=name), agent
