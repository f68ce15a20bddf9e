"""I-515 (autoscaling half): two workspaces' plan_and_apply need two pods, no more, and the
pool keeps both while both run. The one-pod form (max 1) sits with I-606."""

from __future__ import annotations

import pytest

from poolsadmin.autoscaler.models import ScaleAction
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.lib import clock
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from tests.autoscaler.helpers import adopt_all, cluster_pods, k8s_pool, scale
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import agent_of, make_workspace, refresh, submit

pytestmark = pytest.mark.django_db


def test_two_workspaces_plan_and_apply_get_two_pods_and_keep_them_while_running(
    running_cluster: tuple[FakeKubeServer, KubeClient],
) -> None:
    fake, kube = running_cluster
    pool = k8s_pool(min_replicas=0, max_replicas=5)
    t1 = submit(make_workspace(pool, "wsA"), "plan_and_apply")
    t2 = submit(make_workspace(pool, "wsB"), "plan_and_apply")

    decision = scale(pool, kube)

    assert (decision.action, decision.desired, decision.actual) == ("scale_up", 2, 0)
    assert len(set(cluster_pods(fake))) == 2
    assert scale(pool, kube).action == ScaleAction.NONE  # not adopted yet: still two
    assert len(cluster_pods(fake)) == 2

    adopt_all(pool, fake)
    scheduler_pass()
    t1, t2 = refresh(t1), refresh(t2)
    assert (t1.status, t2.status) == (TaskStatus.RUNNING, TaskStatus.RUNNING)
    assert t1.pod_name != t2.pod_name

    clock.advance(pool.scale_down_idle_seconds + 600)
    decision = scale(pool, kube)
    assert decision.action == ScaleAction.NONE
    assert decision.desired == 2
    assert len(cluster_pods(fake)) == 2
    assert agent_of(t1) != agent_of(t2)
