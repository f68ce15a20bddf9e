"""Cluster sync against the fake API server over HTTP with the real client, one pass at a
time."""

from __future__ import annotations

import pytest

from poolsadmin.events.models import Event
from poolsadmin.kube.adapter import KubeClient, KubeConfig
from poolsadmin.pools.models import Pod, PodPhase, Slot, SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.worker.cluster import ClusterUnavailable, cluster_sync, pod_remove
from poolsadmin.worker.reconcile import reconcile_pool
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    refresh,
    run,
    submit,
)
from tests.worker.kube_scenarios import adopted_pod_with_agent, cluster_pod, make_k8s_pool

pytestmark = pytest.mark.django_db


def test_a_new_pod_is_adopted_with_idle_slots(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool(slots_per_pod=3)
    cluster_pod(fake_kube, pool, "agent-a", phase="Pending")
    changes = cluster_sync(pool=pool, kube=kube_client)
    assert [(c.kind, c.target) for c in changes] == [("pod.adopt", "agent-a")]
    pod = Pod.objects.get(pool=pool, name="agent-a")
    assert pod.phase == PodPhase.PENDING
    assert pod.agent_id is None
    assert list(Slot.objects.filter(pod=pod).values_list("state", flat=True)) == ["idle"] * 3
    assert cluster_sync(pool=pool, kube=kube_client) == []


def test_pods_of_other_pools_are_not_adopted(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    other = make_k8s_pool(name="other")
    cluster_pod(fake_kube, other, "theirs")
    fake_kube.add_pod(pool.namespace, "unlabelled", phase="Running")
    assert cluster_sync(pool=pool, kube=kube_client) == []
    assert not Pod.objects.filter(pool=pool).exists()


def test_an_adopted_pod_is_linked_to_the_agent_that_registered_first(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    agent = make_agent(pool, "agent-a")  # the agent was quicker than the reconciler
    cluster_pod(fake_kube, pool, "agent-a")
    cluster_sync(pool=pool, kube=kube_client)
    assert Pod.objects.get(pool=pool, name="agent-a").agent_id == agent.agent_id


def test_a_phase_change_is_followed_with_an_event(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    cluster_pod(fake_kube, pool, "agent-a", phase="Pending")
    cluster_sync(pool=pool, kube=kube_client)
    fake_kube.set_phase("agent-a", "Running")
    changes = cluster_sync(pool=pool, kube=kube_client)
    assert [(c.kind, c.target) for c in changes] == [("pod.phase", "agent-a")]
    assert Pod.objects.get(pool=pool, name="agent-a").phase == PodPhase.RUNNING
    event = Event.objects.get(kind="pod.phase_changed", target_id="agent-a")
    assert (event.before, event.after) == ({"phase": "Pending"}, {"phase": "Running"})


def test_a_succeeded_pod_is_deleted_from_the_cluster_and_the_ledger(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    adopted_pod_with_agent(fake_kube, kube_client, pool, "agent-a")
    fake_kube.set_phase("agent-a", "Succeeded")
    changes = cluster_sync(pool=pool, kube=kube_client)
    assert {c.kind for c in changes} == {"pod.delete", "pod.remove"}
    assert fake_kube.pod("agent-a") is None
    assert not Pod.objects.filter(pool=pool).exists()
    assert Event.objects.filter(kind="pod.removed", target_id="agent-a").count() == 1


def test_a_pod_deleted_behind_our_back_is_noticed_in_one_pass(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool(slots_per_pod=2, plan_and_apply_per_pod=2)
    pod, _agent = adopted_pod_with_agent(fake_kube, kube_client, pool, "agent-a")
    running = run(submit(make_workspace(pool), "plan"))
    reserved = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    assert Slot.objects.filter(pod=pod, state=SlotState.RESERVED, task=reserved).exists()

    fake_kube.delete_behind_back("agent-a")
    changes = cluster_sync(pool=pool, kube=kube_client)

    assert [c.kind for c in changes] == ["task.fail", "reservation.drop", "pod.remove"]
    running = refresh(running)
    assert running.status == TaskStatus.FAILED
    assert "agent-a" in running.error_message and "vanished" in running.error_message
    reserved = refresh(reserved)
    assert reserved.status == TaskStatus.APPLY_PENDING
    assert task_diagnose(task=reserved).code == "reservation_lost"
    assert not Pod.objects.filter(pool=pool).exists()
    assert not Slot.objects.filter(pod__pool=pool).exists()


def test_a_pod_being_deleted_is_released_and_not_adopted_again() -> None:
    pool = make_k8s_pool()
    with FakeKubeServer(graceful_delete=True) as server:
        client = KubeClient(KubeConfig(mode="url", url=server.url, timeout_seconds=5.0))
        with client:
            adopted_pod_with_agent(server, client, pool, "agent-a")
            task = run(submit(make_workspace(pool), "plan"))
            client.delete_pod(namespace=pool.namespace, name="agent-a")  # terminating
            changes = cluster_sync(pool=pool, kube=client)
            assert [c.kind for c in changes] == ["task.fail", "pod.remove"]
            assert "being deleted" in refresh(task).error_message
            assert cluster_sync(pool=pool, kube=client) == []
            assert not Pod.objects.filter(pool=pool).exists()


def test_static_pools_have_no_cluster_to_sync(kube_client: KubeClient) -> None:
    pool = make_pool()
    make_agent(pool, "agent-a")
    assert cluster_sync(pool=pool, kube=kube_client) == []
    assert Pod.objects.filter(pool=pool).count() == 1


def _ledger_rows() -> tuple[int, int, int, int]:
    return (
        Pod.objects.count(),
        Slot.objects.exclude(state=SlotState.IDLE).count(),
        WorkspaceTask.objects.filter(status=TaskStatus.RUNNING).count(),
        Event.objects.count(),
    )


def test_server_errors_change_nothing_and_the_next_pass_recovers(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    adopted_pod_with_agent(fake_kube, kube_client, pool, "agent-a")
    task = run(submit(make_workspace(pool), "plan"))
    fake_kube.set_phase("agent-a", "Failed")
    cluster_pod(fake_kube, pool, "agent-b")
    before = _ledger_rows()

    fake_kube.fail_next(3, 500)
    for _ in range(3):
        report = reconcile_pool(pool=pool, kube=kube_client)
        assert report.cluster_error
        assert _ledger_rows() == before
    assert refresh(task).status == TaskStatus.RUNNING
    assert fake_kube.pod("agent-a") is not None

    report = reconcile_pool(pool=pool, kube=kube_client)
    assert report.cluster_error == ""
    assert refresh(task).status == TaskStatus.FAILED
    assert list(Pod.objects.filter(pool=pool).values_list("name", flat=True)) == ["agent-b"]


def test_a_failing_delete_keeps_the_pod_in_the_ledger_until_a_later_pass(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    adopted_pod_with_agent(fake_kube, kube_client, pool, "agent-a")
    task = run(submit(make_workspace(pool), "plan"))
    fake_kube.set_phase("agent-a", "Failed")
    fake_kube.fail_next(1, 503, method="DELETE")
    with pytest.raises(ClusterUnavailable):
        cluster_sync(pool=pool, kube=kube_client)
    assert refresh(task).status == TaskStatus.RUNNING
    assert Pod.objects.filter(pool=pool, name="agent-a").exists()
    cluster_sync(pool=pool, kube=kube_client)
    assert refresh(task).status == TaskStatus.FAILED
    assert not Pod.objects.filter(pool=pool).exists()


def test_timeouts_change_nothing_and_the_next_pass_recovers(fake_kube: FakeKubeServer) -> None:
    pool = make_k8s_pool()
    with KubeClient(KubeConfig(mode="url", url=fake_kube.url, timeout_seconds=0.3)) as client:
        adopted_pod_with_agent(fake_kube, client, pool, "agent-a")
        task = run(submit(make_workspace(pool), "plan"))
        fake_kube.delete_behind_back("agent-a")
        before = _ledger_rows()
        fake_kube.delay_next(2, 1.5, method="GET")
        for _ in range(2):
            report = reconcile_pool(pool=pool, kube=client)
            assert report.cluster_error
            assert _ledger_rows() == before
        assert refresh(task).status == TaskStatus.RUNNING
        reconcile_pool(pool=pool, kube=client)
        assert refresh(task).status == TaskStatus.FAILED


def test_a_pod_whose_slot_holds_a_task_is_not_removed(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool(slots_per_pod=2)
    pod, _ = adopted_pod_with_agent(fake_kube, kube_client, pool, "agent-a")
    task = run(submit(make_workspace(pool), "plan"))  # e.g. dispatched after the release
    assert not pod_remove(pod=pod, actor="test", reason="gone")
    assert Slot.objects.filter(pod=pod).count() == 2
    assert Slot.objects.get(task=task).state == SlotState.RUNNING
    assert not Event.objects.filter(kind="pod.removed").exists()


def test_a_pod_adopted_before_uids_were_kept_learns_its_uid_once_with_an_event(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    cluster_pod(fake_kube, pool, "agent-a")
    cluster_sync(pool=pool, kube=kube_client)
    Pod.objects.filter(pool=pool).update(uid="")  # as a ledger from before this column has it

    cluster_sync(pool=pool, kube=kube_client)
    cluster_sync(pool=pool, kube=kube_client)

    uid = fake_kube.pod("agent-a", pool.namespace)["metadata"]["uid"]  # type: ignore[index]
    assert Pod.objects.get(pool=pool, name="agent-a").uid == uid
    assert Event.objects.filter(kind="pod.uid_learned", target_id="agent-a").count() == 1
