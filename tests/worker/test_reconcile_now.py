"""A person's "Reconcile now" and the leader's pass never work on one pool at once."""

from __future__ import annotations

import pytest

from poolsadmin.events.models import Event
from poolsadmin.lib.errors import Conflict
from poolsadmin.worker import reconcile
from poolsadmin.worker.lease import lease_acquire_or_renew, lease_current
from poolsadmin.worker.reconcile import (
    RECONCILED,
    pool_lease,
    pool_reconcile_now,
    reconcile_pass_leader,
)
from tests.ledger import make_pool

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
