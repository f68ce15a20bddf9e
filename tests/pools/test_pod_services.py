"""Pods: names are unique per pool, and every change of a pod's agent is an event."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, Pod, PodPhase, PoolType
from poolsadmin.pools.services import pod_create, pod_link_agent
from tests.ledger import ADMIN, make_agent, make_pool

pytestmark = pytest.mark.django_db


def test_two_pools_may_each_have_a_pod_of_the_same_name() -> None:
    blue, green = make_pool(name="blue"), make_pool(name="green")

    pod_create(pool=blue, name="agent-1", phase=PodPhase.RUNNING, actor=ADMIN)
    pod_create(pool=green, name="agent-1", phase=PodPhase.RUNNING, actor=ADMIN)

    assert Pod.objects.filter(name="agent-1").count() == 2


def test_a_pool_cannot_have_two_pods_of_the_same_name() -> None:
    pool = make_pool()
    pod_create(pool=pool, name="agent-1", phase=PodPhase.RUNNING, actor=ADMIN)

    with pytest.raises(IntegrityError), transaction.atomic():
        pod_create(pool=pool, name="agent-1", phase=PodPhase.RUNNING, actor=ADMIN)


def k8s_pool() -> AgentPool:
    return make_pool(name="k8s", pool_type=PoolType.K8S, pod_image="agent:1", max_replicas=3)


def test_linking_a_pod_to_an_agent_records_the_change_once() -> None:
    pool = k8s_pool()
    pod = pod_create(pool=pool, name="agent-abc12", phase=PodPhase.RUNNING, actor="kube")
    agent = make_agent(pool, "agent-other")  # a k8s agent without a pod of its name

    changed = pod_link_agent(pod=pod, agent_id=agent.agent_id, actor="agent:x")
    unchanged = pod_link_agent(pod=pod, agent_id=agent.agent_id, actor="agent:x")

    assert (changed, unchanged) == (True, False)
    assert Pod.objects.get(pk=pod.pk).agent_id == agent.agent_id
    event = Event.objects.get(kind="pod.agent_linked")
    assert (event.actor, event.target_id, event.pool_id) == ("agent:x", "agent-abc12", pool.pool_id)
    assert (event.before, event.after) == ({"agent_id": None}, {"agent_id": agent.agent_id})


def test_a_stale_pod_link_changes_nothing() -> None:
    pool = k8s_pool()
    pod = pod_create(pool=pool, name="agent-abc12", phase=PodPhase.RUNNING, actor="kube")
    first, second = make_agent(pool, "agent-a"), make_agent(pool, "agent-b")
    stale = Pod.objects.get(pk=pod.pk)
    assert pod_link_agent(pod=pod, agent_id=first.agent_id, actor=ADMIN)

    # `stale` still believes the pod has no agent: the conditional update refuses it.
    assert not pod_link_agent(pod=stale, agent_id=second.agent_id, actor=ADMIN)

    assert Pod.objects.get(pk=pod.pk).agent_id == first.agent_id
    assert Event.objects.filter(kind="pod.agent_linked").count() == 1
