"""I-599: a k8s pool with no pods starts exactly the pods its work needs, and min_replicas."""

from __future__ import annotations

import pytest

from poolsadmin.autoscaler.models import ScaleAction
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.lib import clock
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from tests.autoscaler.helpers import adopt_all, cluster_pods, k8s_pool, scale
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_workspace, refresh, submit

pytestmark = pytest.mark.django_db


def test_one_pending_plan_starts_exactly_one_pod_and_runs_when_its_agent_is_up(
    running_cluster: tuple[FakeKubeServer, KubeClient],
) -> None:
    fake, kube = running_cluster
    pool = k8s_pool(min_replicas=0, max_replicas=3)
    t1 = submit(make_workspace(pool), "plan")

    decision = scale(pool, kube)

    assert decision.action == ScaleAction.SCALE_UP
    assert len(cluster_pods(fake)) == 1
    assert decision.created_pods == cluster_pods(fake)
    assert "1 queued" in decision.reason
    # The pod is not adopted yet: a second pass must not create another one.
    assert scale(pool, kube).action == ScaleAction.NONE
    assert len(cluster_pods(fake)) == 1

    adopt_all(pool, fake)
    scheduler_pass()
    assert refresh(t1).status == TaskStatus.RUNNING
    assert refresh(t1).pod_name == cluster_pods(fake)[0]
    assert scale(pool, kube).action == ScaleAction.NONE


def test_min_two_starts_two_pods(running_cluster: tuple[FakeKubeServer, KubeClient]) -> None:
    fake, kube = running_cluster
    pool = k8s_pool(min_replicas=2, max_replicas=3)
    submit(make_workspace(pool), "plan")

    decision = scale(pool, kube)

    assert (decision.action, decision.desired, decision.actual) == ("scale_up", 2, 0)
    assert len(set(cluster_pods(fake))) == 2


def test_no_task_and_min_zero_starts_no_pod(
    running_cluster: tuple[FakeKubeServer, KubeClient],
) -> None:
    fake, kube = running_cluster
    pool = k8s_pool(min_replicas=0, max_replicas=3)

    decision = scale(pool, kube)

    assert decision.action == ScaleAction.NONE
    assert decision.pk is None  # nothing to do is not stored
    assert cluster_pods(fake) == []


def test_min_one_and_no_task_keeps_one_pod(
    running_cluster: tuple[FakeKubeServer, KubeClient],
) -> None:
    fake, kube = running_cluster
    pool = k8s_pool(min_replicas=1, max_replicas=3)

    assert scale(pool, kube).action == ScaleAction.SCALE_UP
    adopt_all(pool, fake)
    clock.advance(3600)
    assert scale(pool, kube).action == ScaleAction.NONE
    assert len(cluster_pods(fake)) == 1
