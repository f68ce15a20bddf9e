"""Builders for autoscaler scenarios: a k8s pool, one pass, and "the reconciler adopted the
pod and its agent registered"."""

from __future__ import annotations

from typing import Any

from poolsadmin.agents.services import agent_register
from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.autoscaler.services import autoscale_pool
from poolsadmin.kube.adapter import KubeApi
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.pools.services import pod_create
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_pool

NAMESPACE = "agents"


def k8s_pool(**kwargs: Any) -> AgentPool:
    kwargs.setdefault("max_replicas", 5)
    return make_pool(pool_type="k8s", pod_image="agent:1", namespace=NAMESPACE, **kwargs)


def scale(pool: AgentPool, kube: KubeApi) -> ScaleDecision:
    return autoscale_pool(
        pool=pool,
        kube=kube,
        now=clock.now(),
        server_url="http://poolsadmin.test",
        token_secret_name="pool-token",
    )


def cluster_pods(fake: FakeKubeServer) -> list[str]:
    return [p["metadata"]["name"] for p in fake.pods(NAMESPACE)]


def adopt(pool: AgentPool, name: str) -> Pod:
    """What the reconciler and the pod's agent do: a ledger pod, then its agent registers."""
    pod = pod_create(pool=pool, name=name, phase="Running", actor="system:reconciler")
    agent_register(pool=pool, name=name, version="test")
    pod.refresh_from_db()
    return pod


def adopt_all(pool: AgentPool, fake: FakeKubeServer) -> list[Pod]:
    known = set(Pod.objects.filter(pool=pool).values_list("name", flat=True))
    return [adopt(pool, name) for name in cluster_pods(fake) if name not in known]
