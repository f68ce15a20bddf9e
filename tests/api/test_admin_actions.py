"""The admin-action endpoints of the JSON API (SPEC 8 "Actions"): release a slot (with its
preview and undo), drain/undrain a pod, pause/resume/unfreeze a pool, reconcile it now (with a
dry run), scale and hold it. Each one allowed, refused to a viewer with nothing written, to an
anonymous caller, to a wrong method, and its 404, 409 and 400 answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.api import roles
from poolsadmin.autoscaler.models import PoolHold
from poolsadmin.autoscaler.services import pool_active_hold, pool_hold
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.actions import slot_release
from poolsadmin.pools.models import AgentPool, Pod, PoolStatus, Slot, SlotState
from poolsadmin.pools.services import pool_pause
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, pod_of, submit
from tests.worker.kube_scenarios import cluster_pod, make_k8s_pool

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db


@dataclass
class World:
    pool: AgentPool
    pod: Pod
    planned: WorkspaceTask  # apply_pending, its slot reserved
    slot: Slot  # the reserved slot


@pytest.fixture
def world() -> World:
    pool = make_pool(name="blue", pool_id="pool-blue000000000001")
    pod = pod_of(make_agent(pool, "P1"))
    workspace = make_workspace(pool, "infra", workspace_id="ws-infra01")
    planned = plan_with_changes(submit(workspace, "plan_and_apply"))
    return World(pool=pool, pod=pod, planned=planned, slot=Slot.objects.get(task=planned))


@pytest.fixture
def released(world: World) -> int:
    """The id of the release event of the world's reserved slot."""
    result = slot_release(
        slot_id=world.slot.pk,
        actor="user:alice",
        reason="stuck",
        expected_version=world.slot.version,
    )
    return result.event.pk


def post(client: Client, url: str, body: Any = None) -> Response:
    data = "" if body is None else json.dumps(body)
    return client.post(url, data, content_type="application/json")


def writes() -> tuple[Any, ...]:
    """Everything these actions could write, to prove a refused one wrote nothing."""
    return (
        Event.objects.count(),
        list(Slot.objects.order_by("pk").values_list("state", "task_id", "version")),
        list(Pod.objects.values_list("cordoned", "cordoned_by")),
        list(AgentPool.objects.values_list("status", "unfrozen_until")),
        list(AgentPool.objects.values_list("min_replicas", "max_replicas")),
        list(PoolHold.objects.values_list("pods", "until")),
        list(Agent.objects.values_list("status", flat=True)),
        list(WorkspaceTask.objects.values_list("status", "pod_id")),
    )


# (url template, body, permission)
ACTIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "/api/v1/slots/{slot}/release",
        {"reason": "stuck", "expected_version": "{version}"},
        roles.PERM_RELEASE_SLOT,
    ),
    ("/api/v1/events/{event}/undo-release", {}, roles.PERM_RELEASE_SLOT),
    ("/api/v1/pods/{pod}/drain", {"reason": "maintenance"}, roles.PERM_MANAGE_POOL),
    ("/api/v1/pods/{pod}/undrain", {"reason": "done"}, roles.PERM_MANAGE_POOL),
    ("/api/v1/pools/{pool}/pause", {"reason": "incident"}, roles.PERM_MANAGE_POOL),
    ("/api/v1/pools/{pool}/resume", {}, roles.PERM_MANAGE_POOL),
    ("/api/v1/pools/{pool}/unfreeze", {"reason": "hotfix"}, roles.PERM_MANAGE_POOL),
    ("/api/v1/pools/{pool}/reconcile", {"dry_run": False, "reason": "x"}, roles.PERM_MANAGE_POOL),
    (
        "/api/v1/pools/{pool}/scale",
        {"min_replicas": 1, "max_replicas": 2, "reason": "load test"},
        roles.PERM_MANAGE_POOL,
    ),
    (
        "/api/v1/pools/{pool}/hold",
        {"pods": 1, "minutes": 30, "reason": "load test"},
        roles.PERM_MANAGE_POOL,
    ),
]
PREVIEW = "/api/v1/slots/{slot}/release-preview"


def fill(world: World, template: str, event: int = 0) -> str:
    return template.format(
        slot=world.slot.pk, pod=world.pod.pk, pool=world.pool.pool_id, event=event
    )


def payload(world: World, body: dict[str, Any]) -> dict[str, Any]:
    return {k: world.slot.version if v == "{version}" else v for k, v in body.items()}


# --- the table: 401, 403, 405 ------------------------------------------------------------------


@pytest.mark.parametrize(("url", "body", "perm"), ACTIONS, ids=[a[0] for a in ACTIONS])
def test_every_action_refuses_an_anonymous_caller_with_401(
    world: World, released: int, url: str, body: dict[str, Any], perm: str
) -> None:
    before = writes()
    response = post(Client(), fill(world, url, released), payload(world, body))
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    assert writes() == before


@pytest.mark.parametrize(("url", "body", "perm"), ACTIONS, ids=[a[0] for a in ACTIONS])
def test_a_viewer_posting_an_action_gets_403_naming_the_permission_and_nothing_is_written(
    world: World,
    released: int,
    viewer_client: Client,
    url: str,
    body: dict[str, Any],
    perm: str,
) -> None:
    before = writes()
    response = post(viewer_client, fill(world, url, released), payload(world, body))
    assert (response.status_code, response.json()["permission"]) == (403, perm)
    assert writes() == before


@pytest.mark.parametrize(("url", "body", "perm"), ACTIONS, ids=[a[0] for a in ACTIONS])
def test_every_action_answers_get_with_405(
    world: World, released: int, admin_client: Client, url: str, body: Any, perm: str
) -> None:
    response = admin_client.get(fill(world, url, released))
    assert response.status_code == 405
    assert response["Allow"] == "POST"


def test_the_preview_refuses_an_anonymous_caller_with_401(world: World) -> None:
    response = Client().get(fill(world, PREVIEW))
    assert (response.status_code, response.json()["error"]) == (401, "unauthenticated")


def test_a_viewer_may_preview_but_an_admin_posting_to_the_preview_gets_405(
    world: World, viewer_client: Client, admin_client: Client
) -> None:
    assert viewer_client.get(fill(world, PREVIEW)).status_code == 200
    response = post(admin_client, fill(world, PREVIEW), {})
    assert (response.status_code, response["Allow"]) == (405, "GET")


# --- release, preview, undo --------------------------------------------------------------------


def test_the_preview_describes_the_impact_and_the_version_it_describes(
    world: World, viewer_client: Client
) -> None:
    clock.advance(3 * 3600)
    response = viewer_client.get(fill(world, PREVIEW))
    assert response.status_code == 200
    body = response.json()
    assert body["impact"] == (
        f"frees the reservation of task #{world.planned.pk}, apply_pending for 3 h; "
        "its apply will need a fresh slot and a re-init"
    )
    assert (body["state"], body["version"], body["task_id"]) == (
        "reserved",
        world.slot.version,
        world.planned.pk,
    )


def test_an_admin_releases_a_slot_and_undoes_it(world: World, admin_client: Client) -> None:
    response = post(
        admin_client,
        fill(world, "/api/v1/slots/{slot}/release"),
        {"reason": "stuck", "expected_version": world.slot.version},
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["slot"]["state"] == SlotState.IDLE
    assert body["task"]["status"] == TaskStatus.APPLY_PENDING
    assert body["task"]["pod"] is None
    assert body["task_failed"] is False
    assert body["undo_until"] is not None
    event = Event.objects.get(pk=body["event_id"])
    assert (event.kind, event.actor, event.reason) == ("slot.released", "user:alice", "stuck")

    response = post(admin_client, f"/api/v1/events/{body['event_id']}/undo-release")
    assert response.status_code == 200, response.json()
    undone = response.json()
    assert (undone["slot"]["state"], undone["slot"]["task_id"]) == ("reserved", world.planned.pk)
    assert undone["task"]["pod"] == "P1"
    assert Event.objects.filter(kind="slot.release_undone", actor="user:alice").count() == 1


def test_a_stale_version_is_409_with_the_current_state_and_nothing_is_written(
    world: World, admin_client: Client
) -> None:
    before = writes()
    response = post(
        admin_client,
        fill(world, "/api/v1/slots/{slot}/release"),
        {"reason": "stuck", "expected_version": world.slot.version - 1},
    )
    assert response.status_code == 409
    body = response.json()
    assert "this slot changed" in body["detail"]
    assert body["field"] == "expected_version"
    assert body["current"]["state"] == "reserved"
    assert body["current"]["version"] == world.slot.version
    assert writes() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expected_version": 1}, "reason"),
        ({"reason": "", "expected_version": 1}, "reason"),
        ({"reason": "stuck"}, "expected_version"),
        ({"reason": "stuck", "expected_version": "3"}, "expected_version"),
        ({"reason": "stuck", "expected_version": 1, "force": True}, "force"),
    ],
)
def test_a_release_with_bad_input_is_400_naming_the_field(
    world: World, admin_client: Client, body: dict[str, Any], field: str
) -> None:
    if "expected_version" in body and body["expected_version"] == 1:
        body = {**body, "expected_version": world.slot.version}
    before = writes()
    response = post(admin_client, fill(world, "/api/v1/slots/{slot}/release"), body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert writes() == before


def test_unknown_slots_pods_pools_and_events_are_404(
    world: World, admin_client: Client, viewer_client: Client
) -> None:
    missing = [
        ("/api/v1/slots/999999/release", {"reason": "x", "expected_version": 1}),
        ("/api/v1/events/999999/undo-release", {}),
        ("/api/v1/pods/999999/drain", {"reason": "x"}),
        ("/api/v1/pods/999999/undrain", {"reason": "x"}),
        ("/api/v1/pools/pool-doesnotexist0000/pause", {"reason": "x"}),
        ("/api/v1/pools/pool-doesnotexist0000/resume", {}),
        ("/api/v1/pools/pool-doesnotexist0000/unfreeze", {"reason": "x"}),
        ("/api/v1/pools/pool-doesnotexist0000/reconcile", {"dry_run": True}),
        ("/api/v1/pools/pool-doesnotexist0000/reconcile", {"dry_run": False, "reason": "x"}),
        (
            "/api/v1/pools/pool-doesnotexist0000/scale",
            {"min_replicas": 1, "max_replicas": 2, "reason": "x"},
        ),
        ("/api/v1/pools/pool-doesnotexist0000/hold", {"pods": 1, "minutes": 5, "reason": "x"}),
    ]
    for url, body in missing:
        response = post(admin_client, url, body)
        assert (url, response.status_code) == (url, 404)
        assert response.json()["error"] == "not_found"
    assert viewer_client.get("/api/v1/slots/999999/release-preview").status_code == 404


def test_an_undo_after_60_seconds_is_409(world: World, released: int, admin_client: Client) -> None:
    clock.advance(61)
    before = writes()
    response = post(admin_client, f"/api/v1/events/{released}/undo-release")
    assert response.status_code == 409
    assert "within 60 s" in response.json()["detail"]
    assert writes() == before


# --- pods --------------------------------------------------------------------------------------


def test_an_admin_drains_and_undrains_a_pod(world: World, admin_client: Client) -> None:
    response = post(admin_client, f"/api/v1/pods/{world.pod.pk}/drain", {"reason": "node swap"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert (body["name"], body["cordoned"], body["cordoned_by"], body["cordoned_reason"]) == (
        "P1",
        True,
        "user:alice",
        "node swap",
    )
    again = post(admin_client, f"/api/v1/pods/{world.pod.pk}/drain", {"reason": "again"})
    assert again.status_code == 409

    response = post(admin_client, f"/api/v1/pods/{world.pod.pk}/undrain", {"reason": "swapped"})
    assert response.status_code == 200
    assert response.json()["cordoned"] is False
    assert [e.kind for e in Event.objects.filter(target_type="pod").order_by("id")][-2:] == [
        "pod.drained",
        "pod.undrained",
    ]


@pytest.mark.parametrize("action", ["drain", "undrain"])
@pytest.mark.parametrize(("body", "field"), [({}, "reason"), ({"reason": 5}, "reason")])
def test_drain_and_undrain_need_a_reason(
    world: World, admin_client: Client, action: str, body: dict[str, Any], field: str
) -> None:
    before = writes()
    response = post(admin_client, f"/api/v1/pods/{world.pod.pk}/{action}", body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert writes() == before


# --- pools -------------------------------------------------------------------------------------


def test_an_admin_pauses_and_resumes_a_pool(world: World, admin_client: Client) -> None:
    until = clock.now().replace(microsecond=0) + timedelta(hours=2)
    response = post(
        admin_client,
        f"/api/v1/pools/{world.pool.pool_id}/pause",
        {"reason": "incident 42", "until": until.isoformat()},
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert (body["status"], body["paused_by"], body["paused_reason"]) == (
        "paused",
        "user:alice",
        "incident 42",
    )
    assert body["paused_until"] == until.isoformat()
    assert (
        post(
            admin_client, f"/api/v1/pools/{world.pool.pool_id}/pause", {"reason": "again"}
        ).status_code
        == 409
    )

    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/resume")
    assert response.status_code == 200
    assert response.json()["status"] == PoolStatus.ACTIVE
    assert post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/resume").status_code == 409


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "reason"),
        ({"reason": " "}, "reason"),
        ({"reason": "x", "until": "tomorrow"}, "until"),
        ({"reason": "x", "until": "2000-01-01T00:00:00+00:00"}, "until"),
        ({"reason": "x", "for": "1h"}, "for"),
    ],
)
def test_pausing_with_bad_input_is_400_naming_the_field(
    world: World, admin_client: Client, body: dict[str, Any], field: str
) -> None:
    before = writes()
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/pause", body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert writes() == before


def test_resume_takes_an_optional_reason(world: World, admin_client: Client) -> None:
    pool_pause(pool_id=world.pool.pool_id, actor="user:alice", reason="x")
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/resume", {"reason": 5})
    assert (response.status_code, response.json()["field"]) == (400, "reason")
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/resume", {"reason": "ok"})
    assert response.status_code == 200
    assert Event.objects.get(kind="pool.resumed").reason == "ok"


def test_an_admin_unfreezes_a_pool_once(world: World, admin_client: Client) -> None:
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/unfreeze", {"reason": "x"})
    assert response.status_code == 200, response.json()
    assert response.json()["unfrozen_until"] is not None
    assert AgentPool.objects.get(pk=world.pool.pool_id).unfrozen_by == "user:alice"
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/unfreeze", {})
    assert (response.status_code, response.json()["field"]) == (400, "reason")


def test_a_user_without_a_role_may_not_preview(world: World) -> None:
    client = Client()
    client.force_login(User.objects.create_user("nobody"))
    response = client.get(fill(world, PREVIEW))
    assert (response.status_code, response.json()["permission"]) == (403, roles.PERM_VIEW)


def test_an_undo_with_an_unknown_field_is_400_naming_it(
    world: World, released: int, admin_client: Client
) -> None:
    before = writes()
    response = post(admin_client, f"/api/v1/events/{released}/undo-release", {"force": True})
    assert (response.status_code, response.json()["field"]) == (400, "force")
    assert writes() == before


# --- reconcile now, scale, hold ------------------------------------------------------------------

NOON = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
def cluster(worker_cluster: FakeKubeServer) -> FakeKubeServer:
    return worker_cluster


@pytest.fixture
def k8s_pool(cluster: FakeKubeServer) -> AgentPool:
    """min 0, max 3, no pods; its cluster is `cluster`."""
    return make_k8s_pool(name="k8s", min_replicas=0, max_replicas=3)


@pytest.fixture
def stale_pool() -> AgentPool:
    """A static pool whose one agent, S1, has not heartbeated for longer than the timeout."""
    pool = make_pool(name="stale", heartbeat_timeout_seconds=120)
    make_agent(pool, "S1")
    clock.advance(121)
    return pool


def reconcile(client: Client, pool: AgentPool, body: Any) -> Response:
    return post(client, f"/api/v1/pools/{pool.pk}/reconcile", body)


def test_a_dry_run_lists_what_a_pass_would_change_and_writes_nothing(
    admin_client: Client, stale_pool: AgentPool
) -> None:
    before = writes()
    response = reconcile(admin_client, stale_pool, {"dry_run": True, "reason": "look first"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert (body["pool_id"], body["dry_run"], body["cluster_error"]) == (stale_pool.pk, True, None)
    agent = Agent.objects.get(pool=stale_pool)
    assert body["changes"] == [
        {"kind": "agent.offline", "target": f"S1 ({agent.agent_id})", "detail": ""}
    ]
    assert writes() == before


def test_reconcile_now_makes_the_changes_and_writes_its_audit_event(
    admin_client: Client, stale_pool: AgentPool
) -> None:
    response = reconcile(admin_client, stale_pool, {"dry_run": False, "reason": "incident 7"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["dry_run"] is False
    assert [c["kind"] for c in body["changes"]] == ["agent.offline"]
    assert Agent.objects.get(pool=stale_pool).status == AgentStatus.OFFLINE
    event = Event.objects.get(kind="pool.reconciled")
    assert (event.actor, event.reason, event.after) == (
        "user:alice",
        "incident 7",
        {"changes": 1, "cluster_error": ""},
    )


def test_the_dry_run_of_a_k8s_pool_lists_the_cluster_and_writes_nowhere(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    cluster_pod(cluster, k8s_pool, "agent-a")
    before = writes()
    response = reconcile(admin_client, k8s_pool, {"dry_run": True})
    assert response.status_code == 200, response.json()
    assert [(c["kind"], c["target"]) for c in response.json()["changes"]] == [
        ("pod.adopt", "agent-a")
    ]
    assert writes() == before
    assert [r.method for r in cluster.requests_log if r.method != "GET"] == []

    response = reconcile(admin_client, k8s_pool, {"dry_run": False, "reason": "adopt"})
    assert response.status_code == 200
    assert Pod.objects.filter(pool=k8s_pool, name="agent-a").exists()


def test_reconcile_now_answers_the_cluster_error(
    admin_client: Client, k8s_pool: AgentPool, cluster: FakeKubeServer
) -> None:
    cluster.fail_next(1, 500)
    response = reconcile(admin_client, k8s_pool, {"dry_run": False, "reason": "check"})
    assert response.status_code == 200
    body = response.json()
    assert "500" in body["cluster_error"]
    assert body["changes"] == []
    assert Event.objects.filter(kind="pool.reconciled").count() == 1


def test_a_viewer_may_see_the_dry_run_but_not_run_the_pass(
    viewer_client: Client, stale_pool: AgentPool
) -> None:
    before = writes()
    assert reconcile(viewer_client, stale_pool, {"dry_run": True}).status_code == 200
    response = reconcile(viewer_client, stale_pool, {"dry_run": False, "reason": "x"})
    assert response.status_code == 403
    assert roles.PERM_MANAGE_POOL in response.json()["detail"]
    assert writes() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "dry_run"),
        ({"reason": "x"}, "dry_run"),
        ({"dry_run": "false"}, "dry_run"),
        ({"dry_run": False, "reason": 5}, "reason"),
        ({"dry_run": False}, "reason"),
        ({"dry_run": False, "reason": "  "}, "reason"),
        ({"dry_run": False, "force": True}, "force"),
        (["dry_run"], "body"),
    ],
)
def test_reconcile_with_bad_input_is_400_naming_the_field(
    admin_client: Client, stale_pool: AgentPool, body: Any, field: str
) -> None:
    before = writes()
    response = reconcile(admin_client, stale_pool, body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert writes() == before


def test_an_admin_scales_a_k8s_pool(admin_client: Client, k8s_pool: AgentPool) -> None:
    response = post(
        admin_client,
        f"/api/v1/pools/{k8s_pool.pk}/scale",
        {"min_replicas": 1, "max_replicas": 4, "reason": "quarter end"},
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert (body["pool_id"], body["min_replicas"], body["max_replicas"]) == (k8s_pool.pk, 1, 4)
    pool = AgentPool.objects.get(pk=k8s_pool.pk)
    assert (pool.min_replicas, pool.max_replicas) == (1, 4)
    event = Event.objects.get(kind="pool.scaled")
    assert (event.actor, event.reason, event.after) == (
        "user:alice",
        "quarter end",
        {"min_replicas": 1, "max_replicas": 4},
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_replicas": 3, "reason": "r"}, "min_replicas"),
        ({"min_replicas": "1", "max_replicas": 3, "reason": "r"}, "min_replicas"),
        ({"min_replicas": 1.5, "max_replicas": 3, "reason": "r"}, "min_replicas"),
        ({"min_replicas": -1, "max_replicas": 3, "reason": "r"}, "min_replicas"),
        ({"min_replicas": 3, "max_replicas": 2, "reason": "r"}, "min_replicas"),
        ({"min_replicas": 0, "max_replicas": 0, "reason": "r"}, "max_replicas"),
        ({"min_replicas": 0, "max_replicas": 2**31, "reason": "r"}, "max_replicas"),
        ({"min_replicas": 0, "max_replicas": True, "reason": "r"}, "max_replicas"),
        ({"min_replicas": 1, "max_replicas": 3}, "reason"),
        ({"min_replicas": 1, "max_replicas": 3, "reason": " "}, "reason"),
        ({"min": 1, "max_replicas": 3, "reason": "r"}, "min"),
        ("scale", "body"),
    ],
)
def test_scaling_with_bad_input_is_400_naming_the_field(
    admin_client: Client, k8s_pool: AgentPool, body: Any, field: str
) -> None:
    before = writes()
    response = post(admin_client, f"/api/v1/pools/{k8s_pool.pk}/scale", body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert writes() == before


def test_an_admin_holds_a_k8s_pool_for_some_minutes(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    with clock.frozen_at(NOON):
        response = post(
            admin_client,
            f"/api/v1/pools/{k8s_pool.pk}/hold",
            {"pods": 2, "minutes": 90, "reason": "migration"},
        )
    assert response.status_code == 200, response.json()
    assert response.json() == {
        "pool_id": k8s_pool.pk,
        "pods": 2,
        "until": "2025-03-05T13:30:00+00:00",
        "by": "user:alice",
        "reason": "migration",
    }
    hold = PoolHold.objects.get(pool=k8s_pool)
    assert (hold.pods, hold.until) == (2, NOON + timedelta(minutes=90))
    assert Event.objects.get(kind="pool.held").actor == "user:alice"


def test_a_hold_may_run_until_a_given_time(admin_client: Client, k8s_pool: AgentPool) -> None:
    with clock.frozen_at(NOON):
        response = post(
            admin_client,
            f"/api/v1/pools/{k8s_pool.pk}/hold",
            {"pods": 0, "until": "2025-03-05T14:00:00+01:00", "reason": "quiet hour"},
        )
    assert response.status_code == 200, response.json()
    assert PoolHold.objects.get(pool=k8s_pool).until == NOON + timedelta(hours=1)


def test_a_hold_of_zero_minutes_ends_the_current_hold(
    admin_client: Client, k8s_pool: AgentPool
) -> None:
    with clock.frozen_at(NOON):
        pool_hold(
            pool=k8s_pool,
            pods=3,
            until=NOON + timedelta(hours=2),
            actor="user:bob",
            reason="load test",
        )
        response = post(
            admin_client,
            f"/api/v1/pools/{k8s_pool.pk}/hold",
            {"minutes": 0, "reason": "load test over"},
        )
        assert response.status_code == 200, response.json()
        assert response.json()["until"] == NOON.isoformat()
        assert pool_active_hold(pool=k8s_pool, now=clock.now()) is None
    # The audit log says the hold ended, not that the pool was held at some count.
    ended = Event.objects.get(actor="user:alice")
    assert ended.kind == "pool.hold_ended"
    assert ended.after == {"until": NOON.isoformat()}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"minutes": 30, "reason": "r"}, "pods"),
        ({"pods": "1", "minutes": 30, "reason": "r"}, "pods"),
        ({"pods": 4, "minutes": 30, "reason": "r"}, "pods"),
        ({"pods": -1, "minutes": 30, "reason": "r"}, "pods"),
        ({"pods": 1, "reason": "r"}, "minutes"),
        ({"pods": 1, "minutes": -1, "reason": "r"}, "minutes"),
        ({"pods": 1, "minutes": 1441, "reason": "r"}, "minutes"),
        ({"pods": 1, "minutes": "30", "reason": "r"}, "minutes"),
        ({"pods": 1, "minutes": 30, "until": "2025-03-05T13:00:00+00:00", "reason": "r"}, "until"),
        ({"pods": 1, "until": "tomorrow", "reason": "r"}, "until"),
        ({"pods": 1, "until": "", "reason": "r"}, "until"),
        ({"pods": 1, "until": "2025-03-05T11:00:00+00:00", "reason": "r"}, "until"),
        ({"pods": 1, "until": "2025-03-06T12:01:00+00:00", "reason": "r"}, "until"),
        ({"pods": 1, "minutes": 30}, "reason"),
        ({"pods": 1, "minutes": 30, "reason": ""}, "reason"),
        ({"pods": 1, "hours": 1, "reason": "r"}, "hours"),
        ([1], "body"),
    ],
)
def test_holding_with_bad_input_is_400_naming_the_field(
    admin_client: Client, k8s_pool: AgentPool, body: Any, field: str
) -> None:
    before = writes()
    with clock.frozen_at(NOON):
        response = post(admin_client, f"/api/v1/pools/{k8s_pool.pk}/hold", body)
    assert (response.status_code, response.json()["field"]) == (400, field)
    assert writes() == before


@pytest.mark.parametrize(
    ("action", "body"),
    [
        ("scale", {"min_replicas": 1, "max_replicas": 2, "reason": "r"}),
        ("hold", {"pods": 1, "minutes": 5, "reason": "r"}),
    ],
)
def test_a_static_pool_cannot_be_scaled_or_held(
    world: World, admin_client: Client, action: str, body: dict[str, Any]
) -> None:
    before = writes()
    response = post(admin_client, f"/api/v1/pools/{world.pool.pk}/{action}", body)
    assert (response.status_code, response.json()["field"]) == (400, "pool_type")
    assert "only k8s pools" in response.json()["detail"]
    assert writes() == before


@pytest.mark.parametrize("action", ["reconcile", "scale", "hold"])
def test_a_session_post_to_a_pool_action_without_a_csrf_token_is_refused(
    admin: User, k8s_pool: AgentPool, action: str
) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    before = writes()
    body = {"dry_run": False, "min_replicas": 1, "max_replicas": 2, "pods": 1, "minutes": 5}
    response = post(client, f"/api/v1/pools/{k8s_pool.pk}/{action}", body)
    assert (response.status_code, response.json()["error"]) == (403, "csrf_failed")
    assert writes() == before


def test_a_bearer_token_scales_without_a_csrf_token(k8s_pool: AgentPool, admin_token: str) -> None:
    client = Client(enforce_csrf_checks=True)
    response = client.post(
        f"/api/v1/pools/{k8s_pool.pk}/scale",
        json.dumps({"min_replicas": 0, "max_replicas": 5, "reason": "script"}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {admin_token}"},
    )
    assert response.status_code == 200, response.json()
    assert Event.objects.get(kind="pool.scaled").actor == "user:alice"
