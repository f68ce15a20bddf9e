"""autoscale_pool against the fake API server, over HTTP with the real client."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from time import monotonic, sleep
from typing import Any

import pytest

from poolsadmin.agents.services import agent_heartbeat
from poolsadmin.autoscaler.models import PoolHold, ScaleAction, ScaleDecision
from poolsadmin.autoscaler.services import pool_hold, pool_scale
from poolsadmin.events.models import Event
from poolsadmin.kube.adapter import KubeApi, KubeClient, KubeConfig, KubeError
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput
from poolsadmin.pools.actions import pod_drain
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.pools.services import pool_freeze_window_add, pool_unfreeze_once
from poolsadmin.scheduler.services import scheduler_pass, task_dispatch
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker.cluster import cluster_sync
from tests.autoscaler.helpers import NAMESPACE, adopt_all, cluster_pods, k8s_pool, scale
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import ADMIN, finish, make_workspace, plan_with_changes, refresh, run, submit

pytestmark = pytest.mark.django_db

# A Wednesday noon: freeze windows are weekday-based, so the clock must not wander.
NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _noon() -> Iterator[None]:
    with clock.frozen_at(NOON):
        yield


def _freeze(pool: object) -> None:
    pool_freeze_window_add(
        pool=pool,  # type: ignore[arg-type]
        weekdays=list(range(7)),
        start=time(8, 0),
        end=time(18, 0),
        actor=ADMIN,
        name="release freeze",
    )


def test_i713a_a_pool_with_no_pods_requests_one_in_the_same_pass(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=1, max_replicas=3)
    t1 = submit(make_workspace(pool), "plan")

    decision = scale(pool, kube_client)

    assert (decision.action, decision.desired, decision.actual) == ("scale_up", 1, 0)
    assert len(cluster_pods(fake_kube)) == 1
    adopt_all(pool, fake_kube)
    scheduler_pass()
    assert refresh(t1).status == TaskStatus.RUNNING


def test_several_pods_in_one_pass_capped_at_max(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=3, slots_per_pod=2)
    for _ in range(9):
        submit(make_workspace(pool), "plan")

    decision = scale(pool, kube_client)

    assert (decision.action, decision.desired) == ("scale_up", 3)
    assert len(set(decision.created_pods)) == 3
    assert sorted(decision.created_pods) == cluster_pods(fake_kube)
    assert "capped at max 3 (needs 5)" in decision.reason
    stored = ScaleDecision.objects.get()
    assert stored.created_pods == decision.created_pods
    assert Event.objects.filter(kind="pool.scale_up", pool_id=pool.pk).exists()


def test_pods_in_the_cluster_not_yet_adopted_count(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=2)
    fake_kube.add_pod(NAMESPACE, "by-hand", labels={"poolsadmin/pool": pool.pk}, phase="Running")
    fake_kube.add_pod(NAMESPACE, "failed", labels={"poolsadmin/pool": pool.pk}, phase="Failed")

    decision = scale(pool, kube_client)

    assert (decision.actual, decision.desired, len(decision.created_pods)) == (1, 2, 1)
    assert "not adopted yet (by-hand)" in decision.reason


def test_an_idle_pod_is_removed_only_after_the_idle_delay(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=0)
    task = submit(make_workspace(pool), "plan")
    scale(pool, kube_client)
    [pod] = adopt_all(pool, fake_kube)
    run(task)
    finish(task)

    clock.advance(pool.scale_down_idle_seconds - 10)
    waiting = scale(pool, kube_client)
    assert waiting.action == ScaleAction.NONE
    assert "scale-down waits" in waiting.reason
    assert cluster_pods(fake_kube) == [pod.name]

    clock.advance(10)
    decision = scale(pool, kube_client)
    assert (decision.action, decision.deleted_pods) == ("scale_down", [pod.name])
    assert cluster_pods(fake_kube) == []
    assert Pod.objects.get(pk=pod.pk).cordoned  # no new work until the reconciler drops it


def test_a_pod_with_a_reserved_slot_is_never_removed_and_the_reason_names_the_task(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=0)
    task = submit(make_workspace(pool), "plan_and_apply")
    scale(pool, kube_client)
    [pod] = adopt_all(pool, fake_kube)
    task = plan_with_changes(task)
    pool_hold(pool=pool, pods=0, until=NOON + timedelta(hours=1), actor=ADMIN, reason="test")

    clock.advance(3600 - 1)
    decision = scale(pool, kube_client)

    assert decision.action == ScaleAction.BLOCKED
    assert f"pod {pod.name} holds reserved slot 0 for task #{task.pk}" in decision.reason
    assert cluster_pods(fake_kube) == [pod.name]
    # The same block is stored once, not on every pass.
    scale(pool, kube_client)
    assert ScaleDecision.objects.filter(action=ScaleAction.BLOCKED).count() == 1


def test_a_running_pod_is_kept_and_an_idle_one_goes_down_to_demand(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=2)
    task = submit(make_workspace(pool), "plan")
    scale(pool, kube_client)
    adopt_all(pool, fake_kube)
    task = run(task)
    pool_scale(pool=pool, min_replicas=0, max_replicas=5, actor=ADMIN, reason="quiet week")

    clock.advance(pool.scale_down_idle_seconds)
    decision = scale(pool, kube_client)

    assert (decision.action, decision.desired) == ("scale_down", 1)
    assert cluster_pods(fake_kube) == [task.pod_name]


def test_freeze_no_scale_up_idle_pods_go_even_below_min_busy_ones_stay(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=2)
    busy = submit(make_workspace(pool), "plan")
    scale(pool, kube_client)
    adopt_all(pool, fake_kube)
    busy = run(busy)
    _freeze(pool)
    for _ in range(10):
        submit(make_workspace(pool), "plan")

    clock.advance(pool.scale_down_idle_seconds)
    decision = scale(pool, kube_client)

    assert (decision.action, decision.desired) == ("scale_down", 1)
    assert cluster_pods(fake_kube) == [busy.pod_name]
    assert "1 running + 0 reserved + 0 queued" in decision.reason

    # One-time unfreeze: the queue counts again and the pool scales up.
    pool_unfreeze_once(pool_id=pool.pk, actor=ADMIN, reason="hotfix")
    decision = scale(pool, kube_client)
    assert decision.action == ScaleAction.SCALE_UP
    assert decision.desired == 3  # 11 slots / 4 per pod


def test_freeze_never_scales_up_from_zero(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=1)
    _freeze(pool)
    submit(make_workspace(pool), "plan")

    decision = scale(pool, kube_client)

    assert (decision.action, decision.desired) == ("none", 0)
    assert "0 queued" in decision.reason  # frozen work is not demand
    assert cluster_pods(fake_kube) == []


def test_freeze_refuses_a_hold_above_the_pod_count_and_says_so(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=0)
    _freeze(pool)
    pool_hold(pool=pool, pods=2, until=NOON + timedelta(hours=1), actor=ADMIN, reason="launch")

    decision = scale(pool, kube_client)

    assert (decision.action, decision.desired, decision.actual) == ("blocked", 0, 0)
    assert "no scale-up to 2 during the freeze" in decision.reason
    assert cluster_pods(fake_kube) == []


def test_a_hold_wins_over_demand_while_it_lasts(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=0)
    pool_hold(pool=pool, pods=2, until=NOON + timedelta(minutes=30), actor=ADMIN, reason="demo")

    decision = scale(pool, kube_client)
    assert (decision.action, decision.desired) == ("scale_up", 2)
    assert "held at 2 by user:admin" in decision.reason
    adopt_all(pool, fake_kube)

    clock.advance(31 * 60)
    decision = scale(pool, kube_client)
    assert (decision.action, decision.desired, len(decision.deleted_pods)) == ("scale_down", 0, 2)


def test_a_retryable_cluster_error_blocks_and_changes_nothing(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = k8s_pool(min_replicas=1)
    fake_kube.fail_next(1, 503, method="POST")

    decision = scale(pool, kube_client)

    assert decision.action == ScaleAction.BLOCKED
    assert "will retry" in decision.reason and "503" in decision.reason
    assert cluster_pods(fake_kube) == []
    assert decision.pk is not None
    assert scale(pool, kube_client).action == ScaleAction.SCALE_UP


def _idle_pod_due_to_go(fake: FakeKubeServer, kube: KubeApi) -> tuple[AgentPool, Pod]:
    """A pool of one idle pod that the next autoscaler pass scales down (min 0, idle past
    the delay)."""
    pool = k8s_pool(min_replicas=1)
    scale(pool, kube)
    [pod] = adopt_all(pool, fake)
    pool_scale(pool=pool, min_replicas=0, max_replicas=5, actor=ADMIN, reason="quiet")
    clock.advance(pool.scale_down_idle_seconds)
    return pool, pod


def test_a_failed_delete_lifts_the_cordon(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool, pod = _idle_pod_due_to_go(fake_kube, kube_client)
    fake_kube.fail_next(1, 500, method="DELETE")

    decision = scale(pool, kube_client)

    assert decision.action == ScaleAction.BLOCKED
    assert not Pod.objects.get(pk=pod.pk).cordoned
    assert cluster_pods(fake_kube) == [pod.name]
    assert Event.objects.filter(kind="pod.delete_refused", target_id=pod.name).count() == 1


def test_a_delete_that_timed_out_but_was_carried_out_keeps_the_pod_cordoned(
    fake_kube: FakeKubeServer,
) -> None:
    """The API server deleted the pod after the client gave up waiting: the pod must take no
    new task (it would fail as "vanished"); the next pass finds it gone."""
    with KubeClient(KubeConfig(mode="url", url=fake_kube.url, timeout_seconds=0.5)) as kube:
        pool, pod = _idle_pod_due_to_go(fake_kube, kube)
        fake_kube.delay_next(1, 1.5, method="DELETE")  # answered after the client's timeout

        decision = scale(pool, kube)

        assert decision.action == ScaleAction.BLOCKED
        assert Pod.objects.get(pk=pod.pk).cordoned
        deadline = monotonic() + 10
        while cluster_pods(fake_kube):  # the server carries the delete out after its delay
            assert monotonic() < deadline
            sleep(0.05)
        pod = Pod.objects.select_related("agent").get(pk=pod.pk)
        assert pod.agent is not None
        agent_heartbeat(agent=pod.agent, running_task_ids=[])  # its agent is still online
        outcome = task_dispatch(task_id=submit(make_workspace(pool), "plan").pk)
        assert not outcome.dispatched and outcome.diagnosis is not None
        assert f"pod {pod.name} is draining" in outcome.diagnosis.text


def test_pool_scale_is_validated_and_audited() -> None:
    pool = k8s_pool()
    for low, high in ((-1, 2), (3, 2), (0, 0)):
        with pytest.raises(InvalidInput):
            pool_scale(pool=pool, min_replicas=low, max_replicas=high, actor=ADMIN, reason="x")

    pool_scale(pool=pool, min_replicas=1, max_replicas=4, actor=ADMIN, reason="more room")

    assert (pool.min_replicas, pool.max_replicas) == (1, 4)
    event = Event.objects.get(kind="pool.scaled")
    assert (event.actor, event.reason, event.after) == (
        ADMIN,
        "more room",
        {"min_replicas": 1, "max_replicas": 4},
    )


def test_pool_hold_is_validated_and_audited() -> None:
    pool = k8s_pool(max_replicas=3)
    with pytest.raises(InvalidInput):
        pool_hold(pool=pool, pods=4, until=NOON, actor=ADMIN, reason="too many")

    pool_hold(pool=pool, pods=3, until=NOON + timedelta(hours=1), actor=ADMIN, reason="launch")

    assert PoolHold.objects.get().pods == 3
    assert Event.objects.get(kind="pool.held").reason == "launch"


def test_a_delete_that_timed_out_and_did_not_happen_lifts_the_cordon_once_the_pod_is_listed(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool, pod = _idle_pod_due_to_go(fake_kube, kube_client)
    fake_kube.fail_next(1, 504, method="DELETE")  # a gateway timeout: done or not, who knows
    scale(pool, kube_client)
    assert Pod.objects.get(pk=pod.pk).cordoned

    cluster_sync(pool=pool, kube=kube_client)  # listed at once: the delete could still land
    assert Pod.objects.get(pk=pod.pk).cordoned
    clock.advance(11)  # longer than a request may take (KUBE_TIMEOUT_SECONDS 10)
    changes = cluster_sync(pool=pool, kube=kube_client)

    assert ("pod.uncordon", pod.name) in [(c.kind, c.target) for c in changes]
    pod = Pod.objects.get(pk=pod.pk)
    assert not pod.cordoned and pod.delete_unconfirmed_at is None
    assert Event.objects.filter(kind="pod.delete_not_done", target_id=pod.name).exists()


def test_a_person_s_drain_outlives_a_delete_of_unknown_outcome(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    """The autoscaler may retire a drained idle pod; if that delete times out, the drain a
    person set stays, whatever the cluster later lists."""
    pool, pod = _idle_pod_due_to_go(fake_kube, kube_client)
    pod_drain(pod_id=pod.pk, actor="user:alice", reason="investigating")
    fake_kube.fail_next(1, 504, method="DELETE")
    scale(pool, kube_client)
    clock.advance(11)

    cluster_sync(pool=pool, kube=kube_client)

    pod = Pod.objects.get(pk=pod.pk)
    assert pod.cordoned and pod.cordoned_by == "user:alice" and pod.delete_unconfirmed_at is None


def test_a_refused_delete_the_cluster_cannot_confirm_keeps_the_cordon_until_it_can(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool, pod = _idle_pod_due_to_go(fake_kube, kube_client)
    fake_kube.fail_next(1, 429, method="DELETE")  # the delete is throttled...

    class Throttled:  # ...and so is the look that follows it (the real client otherwise)
        def __getattr__(self, name: str) -> Any:
            return getattr(kube_client, name)

        def get_pod(self, *, namespace: str, name: str) -> Any:
            raise KubeError("get pod: 429 TooManyRequests", retryable=True, status=429)

    scale(pool, Throttled())

    pod = Pod.objects.get(pk=pod.pk)
    assert pod.cordoned and pod.delete_unconfirmed_at is not None
    assert Event.objects.filter(kind="pod.delete_unconfirmed", target_id=pod.name).exists()
    clock.advance(11)
    cluster_sync(pool=pool, kube=kube_client)  # listed: the delete did not happen
    assert not Pod.objects.get(pk=pod.pk).cordoned
