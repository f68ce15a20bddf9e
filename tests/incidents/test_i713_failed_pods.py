"""I-713 B: P1 in phase `Failed`, min 1: one reconcile deletes P1 from the cluster and the
ledger, and tasks that were running on P1 are failed with a message naming P1.

The replacement pod is the autoscaler's job (it sees min 1 and no pod), not the reconciler's:
these tests assert only what the reconciler does. (Kubernetes pod names are lowercase: P1 is
`p1` here.)"""

from __future__ import annotations

import pytest

from poolsadmin.events.models import Event
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.pools.models import Pod, Slot
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.cluster_access import kube_override
from poolsadmin.worker.loops import LOOPS
from poolsadmin.worker.reconcile import reconcile_pool
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_workspace, refresh, run, submit
from tests.worker.kube_scenarios import adopted_pod_with_agent, make_k8s_pool

pytestmark = pytest.mark.django_db


def test_one_reconcile_deletes_a_failed_pod_and_fails_its_running_tasks_naming_it(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool(min_replicas=1, slots_per_pod=2)
    adopted_pod_with_agent(fake_kube, kube_client, pool, "p1")
    t1 = run(submit(make_workspace(pool), "plan"))
    t2 = run(submit(make_workspace(pool), "plan"))
    fake_kube.set_phase("p1", "Failed")

    report = reconcile_pool(pool=pool, kube=kube_client)

    assert report.cluster_error == ""
    assert fake_kube.pod("p1") is None
    assert not Pod.objects.filter(pool=pool, name="p1").exists()
    assert not Slot.objects.filter(pod__pool=pool).exists()
    for task in (refresh(t1), refresh(t2)):
        assert task.status == TaskStatus.FAILED
        assert "p1" in task.error_message and "Failed" in task.error_message
    assert Event.objects.filter(kind="pod.removed", target_id="p1").count() == 1
    # A second pass finds nothing left to do.
    assert reconcile_pool(pool=pool, kube=kube_client).changes == []


def test_the_worker_loops_replace_the_failed_pod_in_the_next_autoscaler_pass(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    """The whole of I-713 B through the loops: reconciler removes, autoscaler replaces."""
    pool = make_k8s_pool(min_replicas=1, max_replicas=3)
    adopted_pod_with_agent(fake_kube, kube_client, pool, "p1")
    t1 = run(submit(make_workspace(pool), "plan"))
    fake_kube.set_phase("p1", "Failed")
    kube_override(kube_client)
    try:
        LOOPS["reconciler"].run_once()
        LOOPS["autoscaler"].run_once()
    finally:
        kube_override(None)

    assert refresh(t1).status == TaskStatus.FAILED
    assert "p1" in refresh(t1).error_message
    names = [p["metadata"]["name"] for p in fake_kube.pods(pool.namespace or "default")]
    assert len(names) == 1 and names != ["p1"]
