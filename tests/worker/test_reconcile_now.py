"""A person's "Reconcile now" and the leader's pass never work on one pool at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from poolsadmin.events.models import Event
from poolsadmin.lib.errors import Conflict
from poolsadmin.worker import reconcile
from poolsadmin.worker.cluster_access import kube_for_pool
from poolsadmin.worker.lease import LeaseLost, lease_acquire_or_renew, lease_current
from poolsadmin.worker.reconcile import (
    RECONCILED,
    pool_lease,
    pool_reconcile_now,
    reconcile_pass_leader,
)
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_pool
from tests.worker.kube_scenarios import cluster_pod, make_k8s_pool
from tests.worker.leases import expire_lease

pytestmark = pytest.mark.django_db


def test_reconcile_now_is_refused_while_a_pass_of_that_pool_runs() -> None:
    pool = make_pool()
    assert lease_acquire_or_renew(name=pool_lease(pool.pk), holder="leader", ttl_seconds=60)

    with pytest.raises(Conflict, match="running right now"):
        pool_reconcile_now(pool_id=pool.pk, actor="user:alice", reason="look")

    assert not Event.objects.filter(kind=RECONCILED).exists()


def test_the_leader_skips_a_pool_a_person_is_reconciling_and_does_the_others() -> None:
    busy, free = make_pool(name="busy"), make_pool(name="free")
    assert lease_acquire_or_renew(name=pool_lease(busy.pk), holder="user:alice", ttl_seconds=60)

    reports = reconcile_pass_leader(holder="leader", kube_factory=lambda p: None)

    assert reports is not None
    assert [r.pool_id for r in reports] == [free.pk]
    # The leader gave back the lease of the pool it did; the person's is untouched.
    assert lease_current(pool_lease(free.pk)) is None
    held = lease_current(pool_lease(busy.pk))
    assert held is not None and held.holder == "user:alice"


def test_a_failed_reconcile_now_is_audited_and_frees_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = make_pool()

    def broken(**kwargs: object) -> None:
        raise RuntimeError("api server exploded")

    monkeypatch.setattr(reconcile, "reconcile_pool", broken)
    with pytest.raises(RuntimeError):
        pool_reconcile_now(pool_id=pool.pk, actor="user:alice", reason="look")

    event = Event.objects.get(kind=RECONCILED)
    assert event.actor == "user:alice"
    assert event.after is not None
    assert "api server exploded" in event.after["cluster_error"]
    assert lease_current(pool_lease(pool.pk)) is None


def _dead_holder() -> str:
    """The holder id of a leader that was killed mid-pass on this host."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    namespace = os.stat("/proc/self/ns/pid").st_ino
    return f"{socket.gethostname()}:{process.pid}:0badf00d:{namespace}"


def test_reconcile_now_takes_over_at_once_from_a_leader_killed_mid_pass_on_this_host() -> None:
    pool = make_pool()
    assert lease_acquire_or_renew(name=pool_lease(pool.pk), holder=_dead_holder(), ttl_seconds=60)

    report = pool_reconcile_now(pool_id=pool.pk, actor="user:alice", reason="look")

    assert report.pool_id == pool.pk
    assert Event.objects.filter(kind=RECONCILED).count() == 1


def test_a_pool_lease_lasts_two_cluster_calls_not_two_minutes(settings: Any) -> None:
    """A leader killed mid-pass on another host holds the pool up for one lease term: as long
    as the longest wait between two renewals of a live pass (one Kubernetes call) needs."""
    assert reconcile.pool_lease_ttl() == 30.0  # KUBE_TIMEOUT_SECONDS 10 (the default)
    # A slow cluster: the term still outlasts two calls, so a live pass never loses it.
    settings.KUBE_CONFIG = replace(settings.KUBE_CONFIG, timeout_seconds=60.0)
    assert reconcile.pool_lease_ttl() > 2 * 60.0


def test_a_pass_renews_its_pool_lease_between_steps_and_before_each_cluster_change(
    worker_cluster: FakeKubeServer,
) -> None:
    pool = make_k8s_pool(min_replicas=0)
    cluster_pod(worker_cluster, pool, "agent-a", phase="Failed")
    cluster_pod(worker_cluster, pool, "agent-b", phase="Succeeded")
    renewals: list[int] = []

    reconcile.reconcile_pool(
        pool=pool, kube=kube_for_pool(pool), keep=lambda: renewals.append(len(renewals))
    )

    # Before cluster sync, two pod deletions, the ledger steps and the ledger check.
    assert len(renewals) == 5
    assert worker_cluster.pods(pool.namespace) == []


def test_a_pass_that_lost_its_pool_lease_stops_before_it_changes_the_cluster(
    worker_cluster: FakeKubeServer,
) -> None:
    pool = make_k8s_pool(min_replicas=0)
    cluster_pod(worker_cluster, pool, "agent-a", phase="Failed")
    assert lease_acquire_or_renew(name=pool_lease(pool.pk), holder="slow-leader", ttl_seconds=30)
    expire_lease(pool_lease(pool.pk))  # the pass stalled past its term...
    assert lease_acquire_or_renew(name=pool_lease(pool.pk), holder="user:bob", ttl_seconds=30)

    with pytest.raises(LeaseLost):  # ...and someone else has the pool now
        reconcile.reconcile_pool(
            pool=pool, kube=kube_for_pool(pool), keep=reconcile._pool_keeper(pool.pk, "slow-leader")
        )

    assert [p["metadata"]["name"] for p in worker_cluster.pods(pool.namespace)] == ["agent-a"]
