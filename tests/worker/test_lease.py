"""The leader lease: one conditional UPDATE, an INSERT on first use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from django.db import connections
from django.db.models.functions import Now

from poolsadmin.lib import clock
from poolsadmin.worker.lease import (
    LeaseLost,
    lease_acquire_or_renew,
    lease_current,
    lease_holder_dead,
    lease_holder_id,
    lease_keep,
    lease_record_pass,
    lease_release,
)
from poolsadmin.worker.models import Lease
from tests.conftest import IS_POSTGRES
from tests.worker.leases import expire_lease

ROUNDS = 10 if IS_POSTGRES else 3


@pytest.mark.django_db
def test_of_two_holders_only_the_first_acquires() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    assert not lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    current = lease_current("reconciler")
    assert current is not None and current.holder == "a"


def _database_now() -> datetime:
    now: datetime = (
        Lease.objects.annotate(db_now=Now()).values_list("db_now", flat=True).get(pk="reconciler")
    )
    return now


@pytest.mark.django_db
def test_the_holder_renews_and_keeps_its_acquisition_time() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    acquired = Lease.objects.get(pk="reconciler").acquired_at
    clock.advance(20)
    # Leases keep the database's time (Now()), not the test clock, and SQLite's has
    # millisecond steps: renew once it has moved on, or both times could be the same.
    while _database_now() <= acquired:
        time.sleep(0.001)
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
    assert not lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    expire_lease("reconciler")
    assert lease_current("reconciler") is None
    assert lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    lease = Lease.objects.get(pk="reconciler")
    assert lease.holder == "b"
    assert lease.acquired_at >= first
    assert not lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)


@pytest.mark.django_db
def test_leases_run_on_the_databases_clock_not_on_a_workers() -> None:
    """A worker whose clock is an hour ahead must not think the leader's lease expired."""
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    clock.advance(3600)
    assert not lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)
    assert lease_current("reconciler") is not None


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _here(pid: int) -> str:
    """A holder id of this host and PID namespace, as lease_holder_id makes them."""
    return f"{socket.gethostname()}:{pid}:0badf00d:{os.stat('/proc/self/ns/pid').st_ino}"


@pytest.mark.django_db
def test_a_holder_whose_process_is_gone_from_this_host_is_taken_over_at_once() -> None:
    dead = _here(_exited_pid())
    assert lease_holder_dead(dead)
    assert lease_acquire_or_renew(name="reconcile:pool-x", holder=dead, ttl_seconds=120)
    assert lease_acquire_or_renew(name="reconcile:pool-x", holder="w2", ttl_seconds=30)
    assert Lease.objects.get(pk="reconcile:pool-x").holder == "w2"


@pytest.mark.django_db
def test_an_earlier_process_with_this_processs_pid_is_dead_but_this_process_is_not() -> None:
    """A worker restarted in its container gets pid 1 again: the lease of the one before it,
    `host:1:<other random>`, is a dead holder's."""
    mine = lease_holder_id()
    earlier = _here(os.getpid())
    assert lease_holder_dead(earlier)
    assert not lease_holder_dead(mine)
    assert not lease_holder_dead(f"user:alice {mine}")
    assert lease_acquire_or_renew(name="reconciler", holder=mine, ttl_seconds=30)
    assert not lease_acquire_or_renew(name="reconciler", holder=earlier, ttl_seconds=30)


@pytest.mark.django_db
def test_live_and_foreign_holders_are_never_taken_for_dead() -> None:
    parent = _here(os.getppid())
    elsewhere = f"another-host:{_exited_pid()}:0badf00d:{os.stat('/proc/self/ns/pid').st_ino}"
    # Another container of the pod: the same hostname, pids of its own.
    sidecar = f"{socket.gethostname()}:{_exited_pid()}:0badf00d:4026531999"
    old_format = f"{socket.gethostname()}:{_exited_pid()}:0badf00d"
    for holder in (parent, elsewhere, sidecar, old_format, "worker-1", "a"):
        assert not lease_holder_dead(holder), holder
    assert lease_acquire_or_renew(name="reconciler", holder=elsewhere, ttl_seconds=30)
    assert not lease_acquire_or_renew(name="reconciler", holder="w2", ttl_seconds=30)


@pytest.mark.django_db
def test_keeping_a_lost_lease_stops_the_work_under_it() -> None:
    assert lease_acquire_or_renew(name="reconcile:p", holder="w1", ttl_seconds=30)
    lease_keep(name="reconcile:p", holder="w1", ttl_seconds=30)
    expire_lease("reconcile:p")
    assert lease_acquire_or_renew(name="reconcile:p", holder="user:alice h:1:a", ttl_seconds=30)
    with pytest.raises(LeaseLost):
        lease_keep(name="reconcile:p", holder="w1", ttl_seconds=30)


@pytest.mark.django_db
def test_a_lapsed_lease_is_not_kept_even_if_nobody_holds_it_now() -> None:
    """Someone took it, did the same work and released it meanwhile: the stale pass stops."""
    assert lease_acquire_or_renew(name="reconcile:p", holder="w1", ttl_seconds=30)
    expire_lease("reconcile:p")
    assert lease_acquire_or_renew(name="reconcile:p", holder="user:bob h:1:a", ttl_seconds=30)
    assert lease_release(name="reconcile:p", holder="user:bob h:1:a")
    with pytest.raises(LeaseLost):
        lease_keep(name="reconcile:p", holder="w1", ttl_seconds=30)


@pytest.mark.django_db
def test_a_released_lease_is_taken_at_once_and_only_its_holder_can_release_it() -> None:
    assert lease_acquire_or_renew(name="reconciler", holder="a", ttl_seconds=30)
    assert not lease_release(name="reconciler", holder="b")
    assert lease_release(name="reconciler", holder="a")
    assert lease_acquire_or_renew(name="reconciler", holder="b", ttl_seconds=30)


def test_holder_ids_name_the_host_process_and_pid_namespace_and_differ() -> None:
    a, b = lease_holder_id(), lease_holder_id()
    assert a != b
    assert a.count(":") == 3 and a.startswith(f"{socket.gethostname()}:{os.getpid()}:")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("expired", [False, True], ids=["first-use", "takeover"])
def test_threads_racing_for_the_lease_leave_exactly_one_holder(expired: bool) -> None:
    for round_ in range(ROUNDS):
        _race(f"lease-{round_}", expired=expired)


def _race(name: str, *, expired: bool) -> None:
    if expired:
        assert lease_acquire_or_renew(name=name, holder="old", ttl_seconds=1)
        expire_lease(name)
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
