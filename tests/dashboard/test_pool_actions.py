"""Reconcile now (confirm page with a dry run), scale and hold (confirm pages with numbers)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.autoscaler.models import PoolHold
from poolsadmin.autoscaler.services import pool_active_hold
from poolsadmin.dashboard.views_actions import ACTION_DONE
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.pools.services import pod_create
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_agent, make_pool
from tests.worker.kube_scenarios import cluster_pod, make_k8s_pool

if TYPE_CHECKING:
    # The stubs' name for what the test client returns.
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db

NOON = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)


def _text(response: Response) -> str:
    return html.unescape(response.content.decode())


def _message(response: Response) -> str:
    [message] = list(get_messages(response.wsgi_request))
    return str(message)


@pytest.fixture
def cluster(worker_cluster: FakeKubeServer) -> FakeKubeServer:
    return worker_cluster


@pytest.fixture
def k8s_pool(cluster: FakeKubeServer) -> AgentPool:
    """min 0, max 3, no pods; its cluster is `cluster`."""
    return make_k8s_pool(min_replicas=0, max_replicas=3)


@pytest.fixture
def stale_pool() -> AgentPool:
    """A static pool whose one agent, P1, has not heartbeated for longer than the timeout."""
    pool = make_pool(heartbeat_timeout_seconds=120)
    make_agent(pool, "P1")
    clock.advance(121)
    return pool


def _writes(server: FakeKubeServer) -> list[str]:
    return [r.method for r in server.requests_log if r.method != "GET"]


# --- what each of the three answers -------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    name: str
    url: Callable[[AgentPool], str]
    data: dict[str, str]  # a valid POST
    done: Callable[[AgentPool], bool]


ACTIONS = [
    Action(
        "reconcile",
        lambda p: reverse("pools-reconcile", args=[p.pk]),
        {"reason": "after the incident"},
        lambda p: Event.objects.filter(kind="pool.reconciled").exists(),
    ),
    Action(
        "scale",
        lambda p: reverse("pools-scale", args=[p.pk]),
        {"min_replicas": "1", "max_replicas": "2", "reason": "load test"},
        lambda p: AgentPool.objects.get(pk=p.pk).max_replicas == 2,
    ),
    Action(
        "hold",
        lambda p: reverse("pools-hold", args=[p.pk]),
        {"pods": "2", "minutes": "30", "reason": "load test"},
        lambda p: PoolHold.objects.filter(pool=p).exists(),
    ),
]
IDS = [a.name for a in ACTIONS]


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_an_admin_post_acts_writes_an_event_and_goes_back_to_the_pool(
    admin_client: Client, k8s_pool: AgentPool, action: Action
) -> None:
    before = Event.objects.count()
    response = admin_client.post(action.url(k8s_pool), action.data)
    assert response.status_code == 302
    assert response["Location"] == reverse("pools-detail", args=[k8s_pool.pk])
    assert action.done(k8s_pool)
    assert Event.objects.filter(actor="user:alice").count() == Event.objects.count() - before == 1
    assert len(list(get_messages(response.wsgi_request))) == 1


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_viewer_sees_the_confirm_page_with_the_button_disabled(
    viewer_client: Client, k8s_pool: AgentPool, action: Action
) -> None:
    response = viewer_client.get(action.url(k8s_pool))
    assert response.status_code == 200
    assert 'disabled title="needs pools.manage_pool"' in response.content.decode()


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_viewer_post_is_forbidden_and_changes_nothing(
    viewer_client: Client, k8s_pool: AgentPool, action: Action
) -> None:
    before = Event.objects.count()
    assert viewer_client.post(action.url(k8s_pool), action.data).status_code == 403
    assert not action.done(k8s_pool)
    assert Event.objects.count() == before


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_an_anonymous_visitor_is_sent_to_the_login(
    client: Client, k8s_pool: AgentPool, action: Action
) -> None:
    url = action.url(k8s_pool)
    for response in (client.get(url), client.post(url, action.data)):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
    assert not action.done(k8s_pool)


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_put_and_delete_are_405(admin_client: Client, k8s_pool: AgentPool, action: Action) -> None:
    assert admin_client.put(action.url(k8s_pool)).status_code == 405
    assert admin_client.delete(action.url(k8s_pool)).status_code == 405
    assert not action.done(k8s_pool)


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_post_without_a_csrf_token_is_refused(
    admin: User, k8s_pool: AgentPool, action: Action
) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    assert client.post(action.url(k8s_pool), action.data).status_code == 403
    assert not action.done(k8s_pool)


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_htmx_gets_the_messages_and_a_trigger_that_closes_the_dialog(
    admin_client: Client, k8s_pool: AgentPool, action: Action
) -> None:
    response = admin_client.post(action.url(k8s_pool), action.data, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert response["HX-Trigger"] == ACTION_DONE
    assert action.done(k8s_pool)
    assert 'class="message message-success' in response.content.decode()


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_an_unknown_pool_is_404(admin_client: Client, action: Action) -> None:
    missing = AgentPool(pool_id="pool-nope")
    assert admin_client.get(action.url(missing)).status_code == 404
    assert admin_client.post(action.url(missing), action.data).status_code == 404


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_htmx_gets_only_the_form_for_the_dialog(
    admin_client: Client, k8s_pool: AgentPool, action: Action
) -> None:
    page = admin_client.get(action.url(k8s_pool), HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in page
    assert 'id="dialog-title"' in page
    assert f'hx-post="{action.url(k8s_pool)}"' in page


# --- reconcile now -------------------------------------------------------------------------------


def test_reconcile_now_without_a_reason_changes_nothing(
    admin_client: Client, stale_pool: AgentPool
) -> None:
    before = Event.objects.count()
    response = admin_client.post(reverse("pools-reconcile", args=[stale_pool.pk]), {"reason": ""})
    assert response.status_code == 400
    assert "A reason is required" in response.content.decode()
    assert Event.objects.count() == before


def test_the_reconcile_page_lists_the_dry_run_and_changes_nothing(
    admin_client: Client, stale_pool: AgentPool
) -> None:
    events = Event.objects.count()
    response = admin_client.get(reverse("pools-reconcile", args=[stale_pool.pk]))
    assert response.status_code == 200
    text = _text(response)
    assert "a dry run would make 1 change:" in text
    assert "agent.offline</code> P1 (" in text
    assert Event.objects.count() == events
    assert Agent.objects.get(pool=stale_pool).status == AgentStatus.ONLINE


def test_the_reconcile_page_says_when_there_is_nothing_to_change(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    text = _text(admin_client.get(reverse("pools-reconcile", args=[k8s_pool.pk])))
    assert "a dry run finds nothing to change" in text


def test_the_dry_run_of_a_k8s_pool_lists_the_cluster_and_writes_nowhere(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    cluster_pod(cluster, k8s_pool, "agent-a")
    events = Event.objects.count()
    text = _text(admin_client.get(reverse("pools-reconcile", args=[k8s_pool.pk])))
    assert "pod.adopt</code> agent-a" in text
    assert not Pod.objects.filter(pool=k8s_pool).exists()
    assert Event.objects.count() == events
    assert _writes(cluster) == []


def test_the_reconcile_page_shows_a_cluster_error(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    cluster.fail_next(1, 500)
    text = _text(admin_client.get(reverse("pools-reconcile", args=[k8s_pool.pk])))
    assert "the cluster could not be read" in text
    assert "cluster sync would be skipped" in text


def test_reconcile_now_makes_the_changes_and_counts_them(
    admin_client: Client, stale_pool: AgentPool
) -> None:
    response = admin_client.post(
        reverse("pools-reconcile", args=[stale_pool.pk]), {"reason": "check"}
    )
    assert response.status_code == 302
    assert Agent.objects.get(pool=stale_pool).status == AgentStatus.OFFLINE
    assert _message(response) == "Reconciled pool p1: 1 change made."
    event = Event.objects.get(kind="pool.reconciled")
    assert (event.actor, event.pool_id, event.after) == (
        "user:alice",
        stale_pool.pk,
        {"changes": 1, "cluster_error": ""},
    )
    assert event.data["changes"][0].startswith("agent.offline P1")
    # The change itself is logged too, in the admin's name.
    assert Event.objects.filter(kind="agent.offline", actor="user:alice").exists()


def test_reconcile_now_with_nothing_to_change_still_writes_its_audit_event(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    before = Event.objects.count()
    response = admin_client.post(
        reverse("pools-reconcile", args=[k8s_pool.pk]), {"reason": "after the incident"}
    )
    assert _message(response) == "Reconciled pool p1: nothing to change."
    assert Event.objects.count() == before + 1
    event = Event.objects.get(kind="pool.reconciled")
    assert (event.reason, event.after) == (
        "after the incident",
        {"changes": 0, "cluster_error": ""},
    )


def test_reconcile_now_adopts_a_new_cluster_pod(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    cluster_pod(cluster, k8s_pool, "agent-a")
    response = admin_client.post(
        reverse("pools-reconcile", args=[k8s_pool.pk]), {"reason": "check"}
    )
    assert response.status_code == 302
    assert Pod.objects.filter(pool=k8s_pool, name="agent-a").exists()
    assert _message(response) == "Reconciled pool p1: 1 change made."


def test_reconcile_now_without_a_cluster_says_cluster_sync_was_skipped(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    cluster.fail_next(1, 500)
    response = admin_client.post(
        reverse("pools-reconcile", args=[k8s_pool.pk]), {"reason": "check"}
    )
    assert response.status_code == 302
    assert "Cluster sync was skipped" in _message(response)
    after = Event.objects.get(kind="pool.reconciled").after
    assert after is not None and "500" in after["cluster_error"]


def test_a_viewer_may_see_the_dry_run(viewer_client: Client, stale_pool: AgentPool) -> None:
    text = _text(viewer_client.get(reverse("pools-reconcile", args=[stale_pool.pk])))
    assert "agent.offline" in text
    assert Agent.objects.get(pool=stale_pool).status == AgentStatus.ONLINE


# --- scale ---------------------------------------------------------------------------------------


def test_the_scale_page_has_the_current_bounds_in_its_form(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    page = admin_client.get(reverse("pools-scale", args=[k8s_pool.pk])).content.decode()
    assert "now min 0, max 3" in page
    assert 'name="min_replicas" value="0"' in page
    assert 'name="max_replicas" value="3"' in page
    assert '<label for="id_max_replicas">Max pods</label>' in page


def test_scaling_sets_the_bounds_and_says_so(admin_client: Client, k8s_pool: AgentPool) -> None:
    response = admin_client.post(
        reverse("pools-scale", args=[k8s_pool.pk]),
        {"min_replicas": "1", "max_replicas": "4", "reason": "quarter end"},
    )
    assert response.status_code == 302
    pool = AgentPool.objects.get(pk=k8s_pool.pk)
    assert (pool.min_replicas, pool.max_replicas) == (1, 4)
    event = Event.objects.get(kind="pool.scaled")
    assert (event.actor, event.reason) == ("user:alice", "quarter end")
    assert event.after == {"min_replicas": 1, "max_replicas": 4}
    assert (
        _message(response) == "Pool p1 scales between 1 and 4 pods from the autoscaler's next pass."
    )


@pytest.mark.parametrize("name", ["pools-scale", "pools-hold"])
def test_a_static_pool_has_no_replicas_to_scale_or_hold(admin_client: Client, name: str) -> None:
    pool = make_pool()
    before = Event.objects.count()
    url = reverse(name, args=[pool.pk])
    response = admin_client.get(url)
    assert response.status_code == 400
    assert "only k8s pools have replicas" in response.content.decode()
    data = {"min_replicas": "1", "max_replicas": "2", "pods": "1", "minutes": "5", "reason": "r"}
    response = admin_client.post(url, data)
    assert response.status_code == 400
    assert "only k8s pools have replicas" in response.content.decode()
    assert AgentPool.objects.get(pk=pool.pk).max_replicas == pool.max_replicas
    assert not PoolHold.objects.exists()
    assert Event.objects.count() == before


# --- hold ----------------------------------------------------------------------------------------


def test_a_hold_of_zero_minutes_ends_the_current_hold(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    url = reverse("pools-hold", args=[k8s_pool.pk])
    admin_client.post(url, {"pods": "2", "minutes": "90", "reason": "migration"})
    assert pool_active_hold(pool=k8s_pool, now=clock.now()) is not None

    response = admin_client.post(url, {"pods": "2", "minutes": "0", "reason": "migration done"})

    assert response.status_code == 302
    assert pool_active_hold(pool=k8s_pool, now=clock.now()) is None
    assert Event.objects.filter(kind="pool.hold_ended", actor="user:alice").count() == 1
    assert "no longer held" in str(list(get_messages(response.wsgi_request))[-1])


def test_holding_keeps_the_pool_at_n_pods_for_the_minutes_given(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    with clock.frozen_at(NOON):
        response = admin_client.post(
            reverse("pools-hold", args=[k8s_pool.pk]),
            {"pods": "2", "minutes": "90", "reason": "migration"},
        )
    assert response.status_code == 302
    hold = PoolHold.objects.get(pool=k8s_pool)
    assert (hold.pods, hold.until, hold.by) == (2, NOON + timedelta(minutes=90), "user:alice")
    assert Event.objects.get(kind="pool.held").reason == "migration"
    assert _message(response) == "Pool p1 is held at 2 pods until 2025-03-05 13:30:00 UTC."


def test_the_hold_page_names_the_hold_it_replaces(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    admin_client.post(
        reverse("pools-hold", args=[k8s_pool.pk]), {"pods": "2", "minutes": "90", "reason": "r"}
    )
    page = admin_client.get(reverse("pools-hold", args=[k8s_pool.pk])).content.decode()
    assert "it replaces the hold at 2 pods by user:alice" in page
    assert 'name="pods" value="2"' in page


# --- bad input, for both forms --------------------------------------------------------------------

BAD_INPUT = [
    (
        "pools-scale",
        {"min_replicas": "two", "max_replicas": "3"},
        "Min pods must be a whole number",
    ),
    ("pools-scale", {"min_replicas": "", "max_replicas": "3"}, "Min pods must be a whole number"),
    (
        "pools-scale",
        {"min_replicas": "1", "max_replicas": "2.5"},
        "Max pods must be a whole number",
    ),
    ("pools-scale", {"min_replicas": "-1", "max_replicas": "3"}, "Min pods must be between 0 and"),
    ("pools-scale", {"min_replicas": "0", "max_replicas": "0"}, "Max pods must be between 1 and"),
    ("pools-scale", {"min_replicas": "0", "max_replicas": "1001"}, "between 1 and 1000"),
    ("pools-scale", {"min_replicas": "3", "max_replicas": "2"}, "Min pods (3) must not be more"),
    ("pools-scale", {"min_replicas": "1", "max_replicas": "2", "reason": " "}, "A reason is"),
    ("pools-hold", {"pods": "4", "minutes": "30"}, "Pods must be between 0 and 3"),
    ("pools-hold", {"pods": "-1", "minutes": "30"}, "Pods must be between 0 and 3"),
    ("pools-hold", {"pods": "x", "minutes": "30"}, "Pods must be a whole number"),
    ("pools-hold", {"pods": "1", "minutes": "-1"}, "For (minutes) must be between 0 and 1440"),
    ("pools-hold", {"pods": "1", "minutes": "1441"}, "For (minutes) must be between 0 and 1440"),
    ("pools-hold", {"pods": "1", "minutes": "1.5"}, "For (minutes) must be a whole number"),
    ("pools-hold", {"pods": "1", "minutes": "5", "reason": " "}, "A reason is required"),
]


@pytest.mark.parametrize(("name", "data", "error"), BAD_INPUT)
def test_bad_input_shows_the_form_again_and_changes_nothing(
    admin_client: Client, k8s_pool: AgentPool, name: str, data: dict[str, str], error: str
) -> None:
    before = Event.objects.count()
    response = admin_client.post(reverse(name, args=[k8s_pool.pk]), {"reason": "r", **data})
    assert response.status_code == 400
    text = _text(response)
    assert error in text
    # What was typed stays in the form, and the field in question is marked.
    for field, value in data.items():
        if field != "reason":
            assert f'name="{field}" value="{value}"' in text
    assert 'aria-invalid="true"' in text
    pool = AgentPool.objects.get(pk=k8s_pool.pk)
    assert (pool.min_replicas, pool.max_replicas) == (0, 3)
    assert not PoolHold.objects.exists()
    assert Event.objects.count() == before


def test_the_hold_form_opens_at_the_pods_the_pool_has_now(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    for name in ("a", "b", "c"):
        pod_create(pool=k8s_pool, name=name, phase="Running", actor="user:alice")
    html = admin_client.get(reverse("pools-hold", args=[k8s_pool.pk])).content.decode()
    assert re.search(r'name="pods"[^>]*value="3"', html)
