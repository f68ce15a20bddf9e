"""The admin-action endpoints of the JSON API (SPEC 8 "Actions"): release a slot (with its
preview and undo), drain/undrain a pod, pause/resume/unfreeze a pool. Each one allowed,
refused to a viewer with nothing written, to an anonymous caller, to a wrong method, and its
404, 409 and 400 answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from poolsadmin.api import roles
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.actions import slot_release
from poolsadmin.pools.models import AgentPool, Pod, PoolStatus, Slot, SlotState
from poolsadmin.pools.services import pool_pause
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, pod_of, submit

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
