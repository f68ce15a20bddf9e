"""The pool page's panels: autoscaler, reconciler and recent events (selectors and templates)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from django.contrib.auth.context_processors import PermWrapper
from django.contrib.auth.models import User
from django.template.loader import render_to_string
from django.urls import reverse

from poolsadmin.agents.liveness import hearing_touch
from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.autoscaler.services import pool_hold
from poolsadmin.dashboard.panels import (
    AutoscalerPanel,
    RecentEvents,
    ReconcilerPanel,
    pool_autoscaler_panel,
    pool_recent_events,
    pool_reconciler_panel,
)
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pod_create, pool_freeze_window_add
from poolsadmin.worker.cluster import RECONCILER
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_acquire_or_renew
from poolsadmin.worker.models import Lease
from poolsadmin.worker.reconcile import reconcile_pass_leader
from tests.hearing import down, listen
from tests.ledger import ADMIN, make_pool
from tests.worker.kube_scenarios import make_k8s_pool
from tests.worker.leases import expire_lease

pytestmark = pytest.mark.django_db

NOON = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)  # a Wednesday


@pytest.fixture(autouse=True)
def _noon() -> Iterator[None]:
    with clock.frozen_at(NOON):
        yield


def _decisions(pool: AgentPool, n: int) -> list[ScaleDecision]:
    """n decisions, a minute apart, the last one the newest."""
    return [
        ScaleDecision.objects.create(
            pool=pool,
            at=NOON - timedelta(minutes=n - i),
            desired=i + 1,
            actual=i,
            min=pool.min_replicas,
            max=pool.max_replicas,
            action="scale_up",
            reason=f"desired {i + 1}: {i + 1} queued",
        )
        for i in range(n)
    ]


def _event(pool: AgentPool, kind: str, actor: str = RECONCILER, **fields: Any) -> Event:
    fields.setdefault("target_type", "slot")
    fields.setdefault("target_id", "pod-a[0]")
    return event_record(actor=actor, kind=kind, pool_id=pool.pk, **fields)


def _fresh(pool: AgentPool) -> AgentPool:
    """The pool as a page reads it, without its freeze windows prefetched."""
    return AgentPool.objects.get(pk=pool.pk)


# --- autoscaler --------------------------------------------------------------------------------


def test_a_static_pool_has_no_autoscaler_and_costs_no_query(
    django_assert_num_queries: Any,
) -> None:
    pool = _fresh(make_pool())
    with django_assert_num_queries(0):
        panel = pool_autoscaler_panel(pool=pool, now=NOON)
    assert panel.static
    assert panel.decision is None


def test_the_autoscaler_panel_has_counts_bounds_and_the_latest_decision() -> None:
    pool = make_k8s_pool(min_replicas=1, max_replicas=4)
    pod_create(pool=pool, name="agent-a", phase="Running", actor=ADMIN)
    pod_create(pool=pool, name="agent-b", phase="Pending", actor=ADMIN)
    pod_create(pool=pool, name="agent-c", phase="Failed", actor=ADMIN)  # finished: not counted
    latest = _decisions(pool, 3)[-1]

    panel = pool_autoscaler_panel(pool=_fresh(pool), now=NOON)

    assert not panel.static
    assert (panel.actual, panel.min_replicas, panel.max_replicas) == (2, 1, 4)
    assert panel.decision == latest
    assert panel.desired == latest.desired == 3
    assert panel.hold is None
    assert not panel.freeze.frozen


def test_a_hold_in_force_sets_the_desired_count_until_it_ends() -> None:
    pool = make_k8s_pool(max_replicas=4)
    _decisions(pool, 1)
    pool_hold(pool=pool, pods=3, until=NOON + timedelta(hours=1), actor=ADMIN, reason="migration")

    panel = pool_autoscaler_panel(pool=_fresh(pool), now=NOON)
    assert panel.hold is not None and panel.hold.reason == "migration"
    assert panel.desired == 3

    later = pool_autoscaler_panel(pool=_fresh(pool), now=NOON + timedelta(hours=1, seconds=1))
    assert later.hold is None
    assert later.desired == 1


def test_the_autoscaler_panel_shows_a_freeze() -> None:
    pool = make_k8s_pool()
    pool_freeze_window_add(
        pool=pool, weekdays=[2], start=time(8, 0), end=time(18, 0), actor=ADMIN, name="release"
    )
    panel = pool_autoscaler_panel(pool=_fresh(pool), now=NOON)
    assert panel.freeze.frozen
    assert panel.freeze.until == datetime(2025, 3, 5, 18, 0, tzinfo=UTC)


def test_a_pool_without_decisions_has_no_desired_count() -> None:
    panel = pool_autoscaler_panel(pool=_fresh(make_k8s_pool()), now=NOON)
    assert panel.decision is None
    assert panel.desired is None


@pytest.mark.parametrize("n", [1, 10])
def test_the_autoscaler_panel_reads_a_fixed_number_of_queries(
    django_assert_num_queries: Any, n: int
) -> None:
    pool = make_k8s_pool(max_replicas=n)
    _decisions(pool, n)
    for i in range(n):
        pod_create(pool=pool, name=f"agent-{i}", phase="Running", actor=ADMIN)
        pool_hold(pool=pool, pods=i, until=NOON + timedelta(hours=1), actor=ADMIN, reason="r")
    fresh = _fresh(pool)
    with django_assert_num_queries(4):  # decision, pod count, hold, freeze windows
        pool_autoscaler_panel(pool=fresh, now=NOON)
    prefetched = AgentPool.objects.prefetch_related("freeze_windows").get(pk=pool.pk)
    with django_assert_num_queries(3):  # as the pool page reads its pool
        pool_autoscaler_panel(pool=prefetched, now=NOON)


# --- reconciler --------------------------------------------------------------------------------


def test_without_a_leader_the_reconciler_panel_says_so() -> None:
    panel = pool_reconciler_panel(pool=make_pool(), now=NOON)
    assert panel.lease is None
    assert panel.leader == ""
    assert panel.last_pass_at is None


def test_the_reconciler_panel_names_the_leader_and_its_last_pass() -> None:
    pool = make_pool()
    assert reconcile_pass_leader(holder="worker-1", kube_factory=lambda p: None) is not None
    passed = Lease.objects.get(name=RECONCILER_LEASE)
    assert lease_acquire_or_renew(name=RECONCILER_LEASE, holder="worker-1", ttl_seconds=30)

    panel = pool_reconciler_panel(pool=pool, now=clock.now())

    assert panel.leader == "worker-1"
    assert panel.lease is not None and panel.lease.acquired_at == passed.acquired_at
    # The later renewal (an autoscaler pass, say) is not a pass.
    assert panel.last_pass_at == passed.last_pass_at is not None
    assert panel.lease.last_pass_seconds is not None and panel.lease.last_pass_seconds >= 0
    assert panel.lease.last_pass_changes == 0


def test_an_expired_lease_has_no_leader() -> None:
    assert lease_acquire_or_renew(name=RECONCILER_LEASE, holder="worker-1", ttl_seconds=30)
    expire_lease(RECONCILER_LEASE)
    assert pool_reconciler_panel(pool=make_pool(), now=clock.now()).lease is None


def test_a_stuck_leaders_last_pass_stays_shown_and_grows_old() -> None:
    pool = make_pool()
    assert reconcile_pass_leader(holder="worker-1", kube_factory=lambda p: None) is not None
    passed_at = Lease.objects.get(name=RECONCILER_LEASE).last_pass_at
    expire_lease(RECONCILER_LEASE)  # and nobody renews it

    panel = pool_reconciler_panel(pool=pool, now=clock.now())

    assert panel.lease is None
    assert panel.last_pass_at == passed_at


def test_the_recent_changes_are_drift_and_the_reconcilers_own_in_this_pool() -> None:
    pool, other = make_pool(), make_pool(name="p2")
    drift = _event(pool, "drift.slot_mismatch")
    offline = _event(pool, "agent.offline", target_type="agent", target_id="agent-1")
    repaired_by_hand = _event(pool, "drift.task_without_slot", actor="user:alice")
    _event(pool, "slot.released", actor="user:alice")
    _event(other, "drift.slot_mismatch")

    panel = pool_reconciler_panel(pool=pool, now=NOON)

    assert panel.changes == [repaired_by_hand, offline, drift]
    assert panel.last_manual is None


def test_the_recent_changes_are_the_ten_newest() -> None:
    pool = make_pool()
    events = [_event(pool, "drift.slot_mismatch", target_id=f"pod-a[{i}]") for i in range(12)]
    panel = pool_reconciler_panel(pool=pool, now=NOON)
    assert panel.changes == events[::-1][:10]


def test_the_reconciler_panel_has_the_last_reconcile_now() -> None:
    pool = make_pool()
    _event(pool, "pool.reconciled", actor="user:alice", after={"changes": 1})
    last = _event(pool, "pool.reconciled", actor="user:bob", after={"changes": 0})
    assert pool_reconciler_panel(pool=pool, now=NOON).last_manual == last


@pytest.mark.parametrize("n", [1, 10])
def test_the_reconciler_panel_reads_a_fixed_number_of_queries(
    django_assert_num_queries: Any, n: int
) -> None:
    pool = make_pool()
    lease_acquire_or_renew(name=RECONCILER_LEASE, holder="worker-1", ttl_seconds=30)
    for _ in range(n):
        _event(pool, "drift.slot_mismatch")
        _event(pool, "pool.reconciled", actor="user:alice", after={"changes": 0})
    with django_assert_num_queries(4):  # lease, changes, last reconcile now, hearing
        pool_reconciler_panel(pool=pool, now=NOON)


# --- recent events -----------------------------------------------------------------------------


def test_recent_events_are_this_pools_newest_first() -> None:
    pool, other = make_pool(), make_pool(name="p2")
    events = [_event(pool, "slot.released", actor="user:alice") for _ in range(20)]
    _event(other, "slot.released")
    recent = pool_recent_events(pool=pool)
    assert recent.events == events[::-1][:15]
    assert pool_recent_events(pool=pool, limit=3).events == events[::-1][:3]


@pytest.mark.parametrize("n", [1, 10])
def test_recent_events_take_one_query(django_assert_num_queries: Any, n: int) -> None:
    pool = make_pool()
    for _ in range(n):
        _event(pool, "slot.released")
    with django_assert_num_queries(1):
        pool_recent_events(pool=pool)


# --- templates -----------------------------------------------------------------------------------


def _render(template: str, user: User, **context: Any) -> str:
    return render_to_string(f"dashboard/{template}", {**context, "perms": PermWrapper(user)})


def _k8s_autoscaler() -> AutoscalerPanel:
    pool = make_k8s_pool(max_replicas=4)
    _decisions(pool, 2)
    pool_hold(pool=pool, pods=2, until=NOON + timedelta(hours=1), actor=ADMIN, reason="migration")
    return pool_autoscaler_panel(pool=_fresh(pool), now=NOON)


def test_the_autoscaler_panel_shows_the_decision_the_hold_and_the_buttons(admin: User) -> None:
    panel = _k8s_autoscaler()
    html = _render("_autoscaler_panel.html", admin, autoscaler=panel)
    assert '<section class="card panel" id="autoscaler-panel"' in html
    assert '<h2 id="autoscaler-title">Autoscaler</h2>' in html
    assert "desired 2: 2 queued" in html  # the latest decision's reason
    assert "at 2 pods for 60 min more" in html
    assert "by user:admin: migration" in html
    assert f'href="{reverse("pools-scale", args=[panel.pool.pk])}"' in html
    assert f'href="{reverse("pools-hold", args=[panel.pool.pk])}"' in html


def test_a_viewer_sees_the_scale_buttons_disabled(viewer: User) -> None:
    panel = _k8s_autoscaler()
    html = _render("_autoscaler_panel.html", viewer, autoscaler=panel)
    assert reverse("pools-scale", args=[panel.pool.pk]) not in html
    assert html.count('disabled title="needs pools.manage_pool"') == 2


def test_a_static_pools_panel_has_no_scale_buttons(admin: User) -> None:
    pool = make_pool()
    html = _render(
        "_autoscaler_panel.html", admin, autoscaler=pool_autoscaler_panel(pool=pool, now=NOON)
    )
    assert "Static pool: no autoscaler" in html
    assert reverse("pools-scale", args=[pool.pk]) not in html
    assert reverse("pools-hold", args=[pool.pk]) not in html


def test_the_reconciler_panel_shows_the_leader_changes_and_reconcile_now(admin: User) -> None:
    pool = make_pool()
    lease_acquire_or_renew(name=RECONCILER_LEASE, holder="worker-1", ttl_seconds=30)
    _event(pool, "drift.slot_mismatch", reason="slot pod-a[0] is running for task #7")
    _event(pool, "pool.reconciled", actor="user:alice", after={"changes": 2})
    panel: ReconcilerPanel = pool_reconciler_panel(pool=pool, now=NOON)
    html = _render("_reconciler_panel.html", admin, reconciler=panel)
    assert '<section class="card panel" id="reconciler-panel"' in html
    assert "worker-1" in html
    assert "drift.slot_mismatch" in html
    assert "slot pod-a[0] is running for task #7" in html
    assert "user:alice" in html and "2 changes" in html
    assert f'href="{reverse("pools-reconcile", args=[pool.pk])}"' in html


def test_the_reconciler_panel_without_leader_or_changes_says_so(viewer: User) -> None:
    pool = make_pool()
    html = _render(
        "_reconciler_panel.html", viewer, reconciler=pool_reconciler_panel(pool=pool, now=NOON)
    )
    assert "no worker holds the lease" in html
    assert "No drift repaired" in html
    assert "never run" in html
    assert 'disabled title="needs pools.manage_pool"' in html


def test_the_events_panel_lists_events_and_links_the_audit_log(viewer: User) -> None:
    pool = make_pool()
    _event(pool, "slot.released", actor="user:alice", task_id=7, reason="stuck apply")
    events: RecentEvents = pool_recent_events(pool=pool)
    html = _render("_events_panel.html", viewer, events=events)
    assert '<section class="card panel" id="events-panel"' in html
    assert "slot.released" in html and "stuck apply" in html
    assert f'href="{reverse("tasks-detail", args=[7])}"' in html
    assert f'href="{reverse("audit-list")}?pool={pool.pk}"' in html


def test_the_reconciler_panel_says_liveness_checks_wait_out_an_outage_of_poolsadmin(
    admin_client: Any,
) -> None:
    pool = make_pool(heartbeat_timeout_seconds=120, task_grace_seconds=60)
    hearing_touch(actor="system:web")
    down(300)  # the web was down for five minutes
    assert (
        "Liveness checks are paused" in pool_reconciler_panel(pool=pool, now=clock.now()).liveness
    )
    hearing_touch(actor="system:web")

    page = admin_client.get(f"/pools/{pool.pool_id}/").content.decode()

    assert "Liveness checks are waiting out a control-plane outage" in page
    assert "could not hear agents from" in page
    listen(185)  # the web hears agents again for three minutes
    assert pool_reconciler_panel(pool=pool, now=clock.now()).liveness == ""
