"""A changed pod template replaces idle pods only, one pass at a time; busy pods are replaced
when they become idle. Against the fake API server, over HTTP with the real client."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from poolsadmin.autoscaler.models import ScaleAction
from poolsadmin.autoscaler.services import pool_scale
from poolsadmin.events.models import Event
from poolsadmin.kube.adapter import POOL_LABEL, TEMPLATE_HASH_LABEL, KubeClient, template_hash
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.cluster import cluster_sync
from tests.autoscaler.helpers import NAMESPACE, adopt_all, cluster_pods, k8s_pool, scale
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import ADMIN, finish, make_workspace, refresh, run, submit

pytestmark = pytest.mark.django_db

NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _noon() -> Iterator[None]:
    with clock.frozen_at(NOON):
        yield


def _new_image(pool: AgentPool, image: str = "agent:2") -> AgentPool:
    AgentPool.objects.filter(pk=pool.pk).update(pod_image=image)
    pool.refresh_from_db()
    return pool


def _hashes(fake: FakeKubeServer) -> dict[str, str]:
    return {
        p["metadata"]["name"]: p["metadata"]["labels"].get(TEMPLATE_HASH_LABEL, "")
        for p in fake.pods(NAMESPACE)
    }


def test_the_template_hash_follows_the_template_fields_only() -> None:
    pool = k8s_pool(pod_env={"A": "1", "B": 2})
    first = template_hash(pool)
    assert len(first) == 12 and first.isalnum()
    pool.pod_env = {"B": 2, "A": "1"}
    pool.min_replicas = 3
    assert template_hash(pool) == first
    pool.pod_image = "agent:2"
    assert template_hash(pool) != first


def test_created_pods_carry_the_template_hash(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=1)
    [created] = scale(pool, kube_client).created_pods
    assert _hashes(fake_kube) == {created: template_hash(pool)}


def test_idle_outdated_pods_are_replaced_one_per_pass(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=2)
    scale(pool, kube_client)
    first, second = sorted(adopt_all(pool, fake_kube), key=lambda p: (p.created_at, p.pk))
    old = template_hash(pool)
    pool = _new_image(pool)
    new = template_hash(pool)

    decision = scale(pool, kube_client)

    assert decision.action == ScaleAction.SCALE_UP
    assert decision.deleted_pods == [first.name]
    [replacement] = decision.created_pods
    assert f"replacing pod {first.name}: template changed" in decision.reason
    assert _hashes(fake_kube) == {second.name: old, replacement: new}
    assert Pod.objects.get(pk=first.pk).cordoned  # until cluster sync removes it
    event = Event.objects.get(kind="pod.replace", target_id=first.name)
    assert "template changed" in event.reason

    # The replacement is not adopted yet: the rolling replacement waits for it.
    waiting = scale(pool, kube_client)
    assert waiting.action == ScaleAction.NONE
    assert "waits for new pods to be adopted" in waiting.reason
    assert len(cluster_pods(fake_kube)) == 2

    # The reconciler drops the deleted pod and adopts its replacement; then the second goes.
    cluster_sync(pool=pool, kube=kube_client)
    assert set(Pod.objects.filter(pool=pool).values_list("name", flat=True)) == {
        second.name,
        replacement,
    }
    decision = scale(pool, kube_client)
    assert decision.deleted_pods == [second.name]
    assert len(decision.created_pods) == 1
    assert set(_hashes(fake_kube).values()) == {new}

    cluster_sync(pool=pool, kube=kube_client)
    assert scale(pool, kube_client).action == ScaleAction.NONE
    assert len(cluster_pods(fake_kube)) == 2


def test_a_busy_outdated_pod_is_kept_until_it_is_idle(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=1)
    task = submit(make_workspace(pool), "plan")
    scale(pool, kube_client)
    [pod] = adopt_all(pool, fake_kube)
    task = run(task)
    pool = _new_image(pool)

    decision = scale(pool, kube_client)

    assert decision.action == ScaleAction.NONE
    assert f"{pod.name} keep(s) the old template until idle" in decision.reason
    assert cluster_pods(fake_kube) == [pod.name]
    assert refresh(task).status == TaskStatus.RUNNING
    assert not Pod.objects.get(pk=pod.pk).cordoned

    finish(task)
    decision = scale(pool, kube_client)
    assert decision.deleted_pods == [pod.name]
    [replacement] = decision.created_pods
    assert _hashes(fake_kube) == {replacement: template_hash(pool)}


def test_pods_without_a_template_hash_are_left_alone(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=1)
    fake_kube.add_pod(NAMESPACE, "by-hand", labels={POOL_LABEL: pool.pk}, phase="Running")
    cluster_sync(pool=pool, kube=kube_client)
    pool = _new_image(pool)

    decision = scale(pool, kube_client)

    assert decision.action == ScaleAction.NONE
    assert cluster_pods(fake_kube) == ["by-hand"]


def test_scale_down_takes_an_outdated_pod_before_a_longer_idle_new_one(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=2)
    scale(pool, kube_client)
    first, second = sorted(adopt_all(pool, fake_kube), key=lambda p: (p.created_at, p.pk))
    pool = _new_image(pool)
    clock.advance(10)
    [replacement] = scale(pool, kube_client).created_pods
    cluster_sync(pool=pool, kube=kube_client)
    # The old pod runs a task and becomes idle later than the new one.
    clock.advance(10)
    task = run(submit(make_workspace(pool), "plan"))
    assert task.pod_name == second.name
    finish(task)
    pool_scale(pool=pool, min_replicas=1, max_replicas=5, actor=ADMIN, reason="quiet")
    clock.advance(pool.scale_down_idle_seconds)

    decision = scale(pool, kube_client)

    assert (decision.action, decision.deleted_pods) == (ScaleAction.SCALE_DOWN, [second.name])
    assert cluster_pods(fake_kube) == [replacement]
    assert first.name not in cluster_pods(fake_kube)
