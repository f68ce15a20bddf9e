"""A k8s pod whose agent is lost (offline past heartbeat timeout + task grace) is deleted from
the cluster once its lost tasks were failed, removed from the ledger, and replaced by the
autoscaler. Against the fake API server over HTTP with the real client."""

from __future__ import annotations

import pytest

from poolsadmin.agents.liveness import hearing_touch
from poolsadmin.agents.models import AgentStatus
from poolsadmin.agents.services import agent_register
from poolsadmin.events.models import Event
from poolsadmin.kube.adapter import KubeClient
from poolsadmin.lib import clock
from poolsadmin.pools.models import Pod, Slot, SlotState
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.reconcile import reconcile_pool
from tests.autoscaler.helpers import cluster_pods, k8s_pool, scale
from tests.hearing import listen, outage
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_workspace, plan_with_changes, refresh, run, submit

pytestmark = pytest.mark.django_db


def _pool_with_one_pod(fake: FakeKubeServer, kube: KubeClient, **kwargs: object) -> Pod:
    fake.auto_run = True
    pool = k8s_pool(min_replicas=1, **kwargs)
    [name] = scale(pool, kube).created_pods
    reconcile_pool(pool=pool, kube=kube)  # adopts it
    agent_register(pool=pool, name=name, version="test")
    return Pod.objects.select_related("agent", "pool").get(pool=pool, name=name)


def _past_the_cutoff(pod: Pod) -> None:
    pool = pod.pool
    clock.advance(pool.heartbeat_timeout_seconds + pool.task_grace_seconds + 1)


def test_a_pod_whose_agent_is_lost_is_deleted_and_replaced(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _pool_with_one_pod(fake_kube, kube_client)
    pool = pod.pool
    agent = pod.agent
    assert agent is not None
    task = run(submit(make_workspace(pool), "plan"))
    assert task.pod_name == pod.name

    _past_the_cutoff(pod)  # the agent stops heartbeating
    first = reconcile_pool(pool=pool, kube=kube_client)
    # The pod still held the running slot when cluster sync ran: the ledger step failed the
    # task, naming the agent; the pod is deleted on the next pass.
    task = refresh(task)
    assert task.status == TaskStatus.FAILED
    assert agent.agent_name in task.error_message and "stopped heartbeating" in task.error_message
    assert cluster_pods(fake_kube) == [pod.name]
    assert ("pod.delete", pod.name) not in [(c.kind, c.target) for c in first.changes]

    second = reconcile_pool(pool=pool, kube=kube_client)

    kinds = [(c.kind, c.target) for c in second.changes]
    assert ("pod.delete", pod.name) in kinds and ("pod.remove", pod.name) in kinds
    assert cluster_pods(fake_kube) == []
    assert not Pod.objects.filter(pool=pool).exists()
    event = Event.objects.get(kind="pod.agent_lost", target_id=pod.name)
    assert agent.agent_name in event.reason and agent.agent_id in event.reason
    removed = Event.objects.get(kind="pod.removed", target_id=pod.name)
    assert "agent" in removed.reason and "lost" in removed.reason
    agent.refresh_from_db()
    assert agent.status == AgentStatus.OFFLINE  # kept for history

    decision = scale(pool, kube_client)
    [replacement] = decision.created_pods
    assert replacement != pod.name
    assert cluster_pods(fake_kube) == [replacement]
    reconcile_pool(pool=pool, kube=kube_client)
    assert list(Pod.objects.filter(pool=pool).values_list("name", flat=True)) == [replacement]


def test_reservations_on_a_lost_agent_pod_are_dropped_and_the_pod_goes_in_one_pass(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _pool_with_one_pod(fake_kube, kube_client)
    pool = pod.pool
    reserved = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    assert Slot.objects.filter(pod=pod, state=SlotState.RESERVED).exists()

    _past_the_cutoff(pod)
    report = reconcile_pool(pool=pool, kube=kube_client)

    kinds = [c.kind for c in report.changes]
    assert kinds.index("pod.delete") < kinds.index("reservation.drop") < kinds.index("pod.remove")
    reserved = refresh(reserved)
    assert reserved.status == TaskStatus.APPLY_PENDING
    assert task_diagnose(task=reserved).code == "reservation_lost"
    assert cluster_pods(fake_kube) == []
    assert not Pod.objects.filter(pool=pool).exists()


def test_a_pod_with_a_live_agent_or_within_the_grace_period_is_kept(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _pool_with_one_pod(fake_kube, kube_client)
    pool = pod.pool
    reconcile_pool(pool=pool, kube=kube_client)
    clock.advance(pool.heartbeat_timeout_seconds + 1)  # offline, but not lost yet
    reconcile_pool(pool=pool, kube=kube_client)
    assert cluster_pods(fake_kube) == [pod.name]
    assert Pod.objects.filter(pk=pod.pk).exists()


def test_a_dry_run_lists_the_delete_and_changes_nothing(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _pool_with_one_pod(fake_kube, kube_client)
    _past_the_cutoff(pod)
    report = reconcile_pool(pool=pod.pool, kube=kube_client, dry_run=True)
    assert ("pod.delete", pod.name) in [(c.kind, c.target) for c in report.changes]
    assert cluster_pods(fake_kube) == [pod.name]
    assert not Pod.objects.get(pk=pod.pk).cordoned


def test_a_failed_delete_lifts_the_cordon_and_a_later_pass_deletes(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pod = _pool_with_one_pod(fake_kube, kube_client)
    _past_the_cutoff(pod)
    fake_kube.fail_next(1, 503, method="DELETE")
    report = reconcile_pool(pool=pod.pool, kube=kube_client)
    assert report.cluster_error
    assert Pod.objects.filter(pk=pod.pk, cordoned=False).exists()
    assert cluster_pods(fake_kube) == [pod.name]

    reconcile_pool(pool=pod.pool, kube=kube_client)
    assert cluster_pods(fake_kube) == []
    assert not Pod.objects.filter(pk=pod.pk).exists()


def test_no_pod_is_deleted_for_silence_during_an_outage_of_poolsadmin(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    """The pod of an idle agent that nobody could hear for longer than timeout + grace (web
    down) is kept, and so is the pod of a busy one: deleting a pod kills its terraform."""
    pod = _pool_with_one_pod(fake_kube, kube_client)
    pool = pod.pool
    allowance = pool.heartbeat_timeout_seconds + pool.task_grace_seconds
    hearing_touch(actor="system:web")
    outage(2 * allowance)  # the web was down; the agent's silence then was nobody's to hear

    for _ in range(3):
        report = reconcile_pool(pool=pool, kube=kube_client)
        assert report.changes == []
    assert cluster_pods(fake_kube) == [pod.name]
    assert Pod.objects.filter(pool=pool, name=pod.name, cordoned=False).exists()

    # The agent stays silent after poolsadmin is back: its pod goes a timeout and grace later.
    listen(allowance + 5)
    reconcile_pool(pool=pool, kube=kube_client)
    assert cluster_pods(fake_kube) == []
