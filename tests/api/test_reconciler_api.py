"""The reconciler lease and the latest autoscaler decision in the admin API (SPEC 5, 6):
`GET /api/v1/reconciler` and the pool page's `autoscaler` object."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client

from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.lib import clock
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_acquire_or_renew
from poolsadmin.worker.models import Lease
from tests.autoscaler.helpers import k8s_pool
from tests.ledger import make_pool
from tests.worker.leases import expire_lease

pytestmark = pytest.mark.django_db

URL = "/api/v1/reconciler"


def test_a_viewer_sees_who_holds_the_reconciler_lease(viewer_client: Client) -> None:
    assert lease_acquire_or_renew(name=RECONCILER_LEASE, holder="host:42:ab", ttl_seconds=30)
    lease = Lease.objects.get(name=RECONCILER_LEASE)

    response = viewer_client.get(URL)

    assert response.status_code == 200
    body = response.json()
    assert body["leader"] == "host:42:ab"
    assert body["acquired_at"] == lease.acquired_at.isoformat()
    assert body["renewed_at"] == lease.renewed_at.isoformat()
    assert body["expires_at"] == lease.expires_at.isoformat()
    assert lease.expires_at - lease.renewed_at == timedelta(seconds=30)


def test_an_expired_or_missing_lease_shows_no_leader(viewer_client: Client) -> None:
    empty = {"leader": None, "acquired_at": None, "renewed_at": None, "expires_at": None}
    assert viewer_client.get(URL).json() == empty

    assert lease_acquire_or_renew(name=RECONCILER_LEASE, holder="gone", ttl_seconds=30)
    expire_lease(RECONCILER_LEASE)
    assert viewer_client.get(URL).json() == empty


def test_an_anonymous_caller_gets_401(client: Client) -> None:
    assert client.get(URL).status_code == 401


def test_a_wrong_method_gets_405_naming_get(viewer_client: Client) -> None:
    response = viewer_client.delete(URL)
    assert response.status_code == 405
    assert "GET" in response["Allow"]


def test_the_pool_page_shows_the_latest_scale_decision(viewer_client: Client) -> None:
    pool = k8s_pool(min_replicas=0, max_replicas=3)
    url = f"/api/v1/pools/{pool.pool_id}"
    assert viewer_client.get(url).json()["autoscaler"] is None

    for desired, reason in [(1, "desired 1: 1 queued"), (2, "desired 2: 2 queued")]:
        ScaleDecision.objects.create(
            pool=pool,
            at=clock.now(),
            desired=desired,
            actual=desired - 1,
            min=0,
            max=3,
            action="scale_up",
            created_pods=[f"pod-{desired}"],
            reason=reason,
        )
        clock.advance(5)

    autoscaler = viewer_client.get(url).json()["autoscaler"]
    assert autoscaler["desired"] == 2 and autoscaler["actual"] == 1
    assert (autoscaler["action"], autoscaler["reason"]) == ("scale_up", "desired 2: 2 queued")
    assert autoscaler["at"] is not None


def test_a_static_pool_has_no_autoscaler(viewer_client: Client) -> None:
    pool = make_pool()
    assert viewer_client.get(f"/api/v1/pools/{pool.pool_id}").json()["autoscaler"] is None
