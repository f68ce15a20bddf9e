"""The leader lease: one conditional UPDATE, an INSERT on first use."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connections

from poolsadmin.lib import clock
from poolsadmin.worker.lease import (
    lease_acquire_or_renew,
    lease_current,
    lease_holder_id,
    lease_record_pass,
    lease_release,
)
from poolsadmin.worker.models import Lease
from tests.conftest import IS_POSTGRES

ROUNDS = 10 if IS_POSTGRES else 3


@pytest.mark.django_db
def test_of_two_holders_only_the_first_acquires() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    assert not lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    current = lease_current("reconciler")
    assert current is not None and current.holder == "a"


@pytest.mark.django_db
def test_the_holder_renews_and_keeps_its_acquisition_time() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    acquired = Lease.objects.get(pk="reconciler").acquired_at
    clock.advance(20)
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    clock.advance(20)  # past the first term, within the renewed one
    assert not lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    lease = Lease.objects.get(pk="reconciler")
    assert lease.holder == "a"
    assert lease.acquired_at == acquired
    assert lease.renewed_at > acquired


@pytest.mark.django_db
def test_another_holder_takes_over_after_expiry() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    first = Lease.objects.get(pk="reconciler").acquired_at
    clock.advance(29)
    assert not lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    clock.advance(2)
    assert lease_current("reconciler") is None
    assert lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    lease = Lease.objects.get(pk="reconciler")
    assert lease.holder == "b"
    assert lease.acquired_at >= first + timedelta(seconds=31)
    assert not lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)


@pytest.mark.django_db
def test_a_released_lease_is_taken_at_once_and_only_its_holder_can_release_it() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    assert not lease_release(name="reconciler", holder="b")
    assert lease_release(name="reconciler", holder="a")
    assert lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)


def test_holder_ids_name_the_host_and_process_and_differ() -> None:
    a, b = lease_holder_id(), lease_holder_id()
    assert a != b
    assert a.count(":") == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("expired", [False, True], ids=["first-use", "takeover"])
def test_threads_racing_for_the_lease_leave_exactly_one_holder(expired: bool) -> None:
    for round_ in range(ROUNDS):
        _race(f"lease-{round_}", expired=expired)


def _race(name: str, *, expired: bool) -> None:
    if expired:
        assert lease_acquire_or_renew(name=name, holder="old", ttl_seconds=1)
        clock.advance(5)
    n = 6
    barrier = threading.Barrier(n)
    won: dict[str, bool] = {}
    errors: list[BaseException] = []

    def body(holder: str) -> None:
        try:
            barrier.wait()
            won[holder] = lease_acquire_or_renew(name=name, holder=holder, ttl_seconds=30)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body, args=(f"w{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    winners = [h for h, ok in won.items() if ok]
    assert len(won) == n and len(winners) == 1
    assert Lease.objects.get(pk=name).holder == winners[0]


@pytest.mark.django_db
def test_only_the_holder_records_its_pass_on_the_lease() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="w1", ttl_seconds=30)

    assert not lease_record_pass(name="reconciler", holder="w2", seconds=9.0, changes=9)
    assert lease_record_pass(name="reconciler", holder="w1", seconds=0.25, changes=3)

    lease = Lease.objects.get(name="reconciler")
    assert (lease.last_pass_seconds, lease.last_pass_changes) == (0.25, 3)
    assert lease.last_pass_at is not None and lease.last_pass_at <= clock.now()
