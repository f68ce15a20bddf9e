"""The admin JSON API: every endpoint with an allowed, a forbidden, an anonymous and a
wrong-method call, plus the 400/404/409 answers and CSRF for session callers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.middleware.csrf import get_token
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext

from poolsadmin.api import roles
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, Pod, PoolToken, Slot, SlotState
from poolsadmin.pools.services import pool_token_authenticate, pool_token_create
from poolsadmin.scheduler.diagnosis import diagnosis_record_all
from poolsadmin.tasks.models import Stage, TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    refresh,
    run,
    submit,
)

if TYPE_CHECKING:
    # The stubs' name for what the test client returns (a response with .json()).
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

pytestmark = pytest.mark.django_db


@dataclass
class World:
    pool: AgentPool
    workspace: Workspace
    planned: WorkspaceTask  # plan_and_apply, apply_pending, its slot reserved, workspace locked
    pending: WorkspaceTask  # a plan waiting in the queue


@pytest.fixture
def world() -> World:
    pool = make_pool(name="blue", pool_id="pool-blue000000000001")
    make_agent(pool, "P1")
    workspace = make_workspace(pool, "infra", workspace_id="ws-infra01")
    planned = plan_with_changes(submit(workspace, "plan_and_apply"))
    pending = submit(workspace, "plan")
    return World(pool=pool, workspace=workspace, planned=planned, pending=pending)


def post(client: Client, url: str, body: Any = None, **headers: str) -> Response:
    data = "" if body is None else json.dumps(body)
    return client.post(url, data, content_type="application/json", headers=headers)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def writes(world: World) -> tuple[int, ...]:
    """Everything an action could write, to prove a refused one wrote nothing."""
    task = refresh(world.planned)
    return (
        Event.objects.count(),
        AgentPool.objects.count(),
        PoolToken.objects.count(),
        Workspace.objects.count(),
        WorkspaceTask.objects.count(),
        WorkspaceTask.objects.filter(status=TaskStatus.CANCELLED).count(),
        int(bool(task.apply_confirmed_by)),
        Workspace.objects.filter(is_locked=True).count(),
    )


# (method, url template, body, wrong method, permission needed)
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, str, str]] = [
    ("GET", "/api/v1/pools", None, "DELETE", roles.PERM_VIEW),
    ("POST", "/api/v1/pools", {"name": "green"}, "DELETE", roles.PERM_MANAGE_POOL),
    ("GET", "/api/v1/pools/{pool}", None, "POST", roles.PERM_VIEW),
    ("POST", "/api/v1/pools/{pool}/tokens", {"name": "t"}, "GET", roles.PERM_MANAGE_POOL),
    (
        "POST",
        "/api/v1/workspaces",
        {"name": "w", "pool_id": "{pool}"},
        "GET",
        roles.PERM_SUBMIT_TASK,
    ),
    ("GET", "/api/v1/workspaces/{ws}", None, "POST", roles.PERM_VIEW),
    (
        "POST",
        "/api/v1/workspaces/{ws}/tasks",
        {"task_type": "plan"},
        "GET",
        roles.PERM_SUBMIT_TASK,
    ),
    (
        "POST",
        "/api/v1/workspaces/{ws}/unlock",
        {"reason": "reviewed"},
        "GET",
        roles.PERM_UNLOCK_WORKSPACE,
    ),
    ("GET", "/api/v1/tasks/{task}", None, "POST", roles.PERM_VIEW),
    ("POST", "/api/v1/tasks/{task}/confirm-apply", {}, "GET", roles.PERM_CONFIRM_APPLY),
    (
        "POST",
        "/api/v1/tasks/{task}/cancel",
        {"reason": "not needed"},
        "GET",
        roles.PERM_CANCEL_TASK,
    ),
]
ACTIONS = [e for e in ENDPOINTS if e[0] == "POST"]
READS = [e for e in ENDPOINTS if e[0] == "GET"]


def ids(endpoint: tuple[Any, ...]) -> str:
    return f"{endpoint[0]} {endpoint[1]}"


def fill(world: World, template: str) -> str:
    return template.format(
        pool=world.pool.pool_id, ws=world.workspace.workspace_id, task=world.planned.pk
    )


def call(
    client: Client, world: World, method: str, url: str, body: Any, **headers: str
) -> Response:
    url = fill(world, url)
    if method == "POST":
        payload = {k: fill(world, v) if isinstance(v, str) else v for k, v in (body or {}).items()}
        return post(client, url, payload, **headers)
    return client.generic(method, url, headers=headers)


# --- the table: 401, 403, 405 for every endpoint -----------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_every_endpoint_refuses_an_anonymous_caller_with_401(world: World, endpoint: Any) -> None:
    method, url, body, _, _ = endpoint
    before = writes(world)
    response = call(Client(), world, method, url, body)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert writes(world) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_every_endpoint_refuses_an_unknown_bearer_token_with_401(
    world: World, endpoint: Any
) -> None:
    method, url, body, _, _ = endpoint
    response = call(Client(), world, method, url, body, **bearer("pat_" + "0" * 64))
    assert response.status_code == 401
    assert response.json()["detail"] == "unknown API token"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_every_endpoint_answers_a_wrong_method_with_405_naming_the_allowed_ones(
    world: World, admin_client: Client, endpoint: Any
) -> None:
    method, url, _, wrong, _ = endpoint
    response = admin_client.generic(wrong, fill(world, url))
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert method in response["Allow"]


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/api/v1/nope"),
        ("POST", "/api/v1/pools/pool-blue000000000001/nope"),
        ("GET", "/api/v1/tasks/not-a-number"),
        ("GET", "/api/v1/"),
        ("PUT", "/api/v1/agents/nope"),
    ],
)
def test_an_unknown_url_under_the_api_is_a_json_404(
    world: World, admin_client: Client, method: str, url: str
) -> None:
    response = admin_client.generic(method, url)

    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": f"no API endpoint at {url}"}


@pytest.mark.parametrize("endpoint", ACTIONS, ids=ids)
def test_a_viewer_posting_an_action_gets_403_naming_the_permission_and_nothing_is_written(
    world: World, viewer_client: Client, endpoint: Any
) -> None:
    method, url, body, _, perm = endpoint
    before = writes(world)
    response = call(viewer_client, world, method, url, body)
    assert response.status_code == 403
    assert response.json()["permission"] == perm
    assert perm in response.json()["detail"]
    assert writes(world) == before


@pytest.mark.parametrize("endpoint", ACTIONS, ids=ids)
def test_a_viewer_bearer_token_is_refused_actions_too(
    world: World, viewer_token: str, endpoint: Any
) -> None:
    method, url, body, _, perm = endpoint
    response = call(Client(), world, method, url, body, **bearer(viewer_token))
    assert (response.status_code, response.json()["permission"]) == (403, perm)


@pytest.mark.parametrize("endpoint", READS, ids=ids)
def test_a_user_without_a_role_may_not_read(world: World, endpoint: Any) -> None:
    client = Client()
    client.force_login(User.objects.create_user("nobody"))
    method, url, body, _, perm = endpoint
    response = call(client, world, method, url, body)
    assert (response.status_code, response.json()["permission"]) == (403, perm)


@pytest.mark.parametrize("endpoint", READS, ids=ids)
def test_a_viewer_may_read_every_page(world: World, viewer_client: Client, endpoint: Any) -> None:
    method, url, body, _, _ = endpoint
    assert call(viewer_client, world, method, url, body).status_code == 200


# --- pools -------------------------------------------------------------------------------------


def test_pools_list_counts_pods_agents_slots_and_queue(world: World, viewer_client: Client) -> None:
    make_pool(name="empty")
    response = viewer_client.get("/api/v1/pools")
    assert response.status_code == 200
    pools = {p["name"]: p for p in response.json()["pools"]}
    blue = pools["blue"]
    assert blue["pool_id"] == world.pool.pool_id
    assert (blue["pods_total"], blue["pods_running"]) == (1, 1)
    assert (blue["agents_total"], blue["agents_online"]) == (1, 1)
    assert blue["slots"] == {"total": 4, "running": 0, "reserved": 1, "idle": 3}
    # The pending plan queues; the unconfirmed apply waits for a person, not for a slot.
    assert blue["queue"]["length"] == 1
    assert blue["queue"]["oldest_created_at"] == world.pending.created_at.isoformat()
    assert pools["empty"]["slots"]["total"] == 0
    assert pools["empty"]["queue"] == {"length": 0, "oldest_created_at": None}


def test_an_admin_creates_a_pool(admin_client: Client) -> None:
    response = post(
        admin_client,
        "/api/v1/pools",
        {
            "name": "k8s-east",
            "pool_type": "k8s",
            "description": "east cluster",
            "slots_per_pod": 2,
            "plan_and_apply_per_pod": 1,
            "min_replicas": 1,
            "max_replicas": 3,
            "pod_image": "registry/agent:1",
            "namespace": "agents",
        },
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    pool = AgentPool.objects.get(pk=body["pool_id"])
    assert (pool.name, pool.pool_type, pool.max_replicas, pool.pod_image) == (
        "k8s-east",
        "k8s",
        3,
        "registry/agent:1",
    )
    event = Event.objects.get(kind="pool.created", target_id=pool.pool_id)
    assert event.actor == "user:alice"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": 5}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "p", "pool_type": "vm"}, "pool_type"),
        ({"name": "p", "slots_per_pod": "4"}, "slots_per_pod"),
        ({"name": "p", "slots_per_pod": 0}, "slots_per_pod"),
        ({"name": "p", "min_replicas": -1}, "min_replicas"),
        ({"name": "p", "pool_type": "k8s", "max_replicas": 2}, "pod_image"),
        ({"name": "p", "pool_type": "k8s", "pod_image": "i", "min_replicas": 3}, "min_replicas"),
        ({"name": "p", "pool_id": "pool-UPPER"}, "pool_id"),
        ({"name": "p", "slots": 4}, "slots"),
    ],
)
def test_creating_a_pool_with_bad_input_is_400_naming_the_field(
    admin_client: Client, body: dict[str, Any], field: str
) -> None:
    response = post(admin_client, "/api/v1/pools", body)
    assert response.status_code == 400
    assert response.json()["field"] == field
    assert not AgentPool.objects.exists()


def test_a_body_that_is_not_a_json_object_is_400(admin_client: Client) -> None:
    response = admin_client.post("/api/v1/pools", "{nope", content_type="application/json")
    assert (response.status_code, response.json()["field"]) == (400, "body")
    response = post(admin_client, "/api/v1/pools", ["name"])
    assert (response.status_code, response.json()["field"]) == (400, "body")


def test_creating_a_pool_whose_id_exists_is_409(world: World, admin_client: Client) -> None:
    response = post(admin_client, "/api/v1/pools", {"name": "b", "pool_id": world.pool.pool_id})
    assert response.status_code == 409
    assert world.pool.pool_id in response.json()["detail"]


def test_the_pool_page_lists_pods_agents_and_slots_with_their_owners(
    world: World, viewer_client: Client
) -> None:
    response = viewer_client.get(f"/api/v1/pools/{world.pool.pool_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "blue"
    [pod] = body["pods"]
    assert (pod["name"], pod["phase"], pod["cordoned"]) == ("P1", "Running", False)
    assert pod["agent"]["agent_name"] == "P1"
    assert (pod["agent"]["status"], pod["agent"]["online"]) == ("online", True)
    reserved = pod["slots"][0]
    assert reserved["index"] == 0
    assert reserved["state"] == SlotState.RESERVED
    assert reserved["task_id"] == world.planned.pk
    assert reserved["task_type"] == "plan_and_apply"
    assert reserved["workspace_id"] == world.workspace.workspace_id
    assert reserved["reserved_until"] is not None
    assert reserved["version"] >= 2
    assert [s["state"] for s in pod["slots"][1:]] == ["idle", "idle", "idle"]
    assert pod["slots"][1]["task_id"] is None
    # The ids the admin actions take (release a slot, drain a pod).
    assert pod["id"] == Pod.objects.get(name="P1", pool=world.pool).pk
    assert reserved["id"] == Slot.objects.get(task_id=world.planned.pk).pk


def test_an_unknown_pool_is_404(viewer_client: Client) -> None:
    response = viewer_client.get("/api/v1/pools/pool-doesnotexist0000")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def _pool_with_pods(name: str, pods: int) -> AgentPool:
    pool = make_pool(name=name)
    for i in range(pods):
        make_agent(pool, f"{name}-{i}")
    workspace = make_workspace(pool)
    run(submit(workspace, "plan"))
    plan_with_changes(submit(workspace, "plan_and_apply"))
    return pool


def test_the_pool_page_costs_the_same_queries_for_2_pods_as_for_20(
    viewer_client: Client,
) -> None:
    small = _pool_with_pods("small", 2)
    large = _pool_with_pods("large", 20)
    counts = []
    for pool, pods in ((small, 2), (large, 20)):
        with CaptureQueriesContext(connection) as queries:
            response = viewer_client.get(f"/api/v1/pools/{pool.pool_id}")
        assert response.status_code == 200
        assert len(response.json()["pods"]) == pods
        counts.append(len(queries))
    # session, user, user and group permissions, pool, pods with agents, slots with tasks
    assert counts == [7, 7]


def test_the_pools_list_costs_the_same_queries_for_one_pool_as_for_five(
    viewer_client: Client,
) -> None:
    _pool_with_pods("first", 2)
    with CaptureQueriesContext(connection) as one:
        viewer_client.get("/api/v1/pools")
    for i in range(4):
        _pool_with_pods(f"more{i}", 3)
    with CaptureQueriesContext(connection) as five:
        response = viewer_client.get("/api/v1/pools")
    assert len(response.json()["pools"]) == 5
    assert len(one) == len(five)


def test_an_admin_creates_a_pool_token_shown_once(world: World, admin_client: Client) -> None:
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/tokens", {"name": "ci"})
    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token"].startswith(f"apt_{world.pool.pool_id}_")
    assert body["name"] == "ci"
    assert body["created_at"]
    assert pool_token_authenticate(secret=body["token"]).pool_id == world.pool.pool_id
    token = PoolToken.objects.get(pool=world.pool)
    assert token.created_by == "user:alice"
    assert body["token"] not in token.token_hash


def test_a_pool_token_needs_a_name_and_a_pool(world: World, admin_client: Client) -> None:
    response = post(admin_client, f"/api/v1/pools/{world.pool.pool_id}/tokens", {})
    assert (response.status_code, response.json()["field"]) == (400, "name")
    response = post(admin_client, "/api/v1/pools/pool-doesnotexist0000/tokens", {"name": "t"})
    assert response.status_code == 404


# --- workspaces --------------------------------------------------------------------------------


def test_an_admin_creates_a_workspace_on_a_pool(world: World, admin_client: Client) -> None:
    response = post(
        admin_client,
        "/api/v1/workspaces",
        {"name": "network", "pool_id": world.pool.pool_id, "workspace_id": "ws-network1"},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["workspace_id"] == "ws-network1"
    assert (body["name"], body["pool_id"], body["is_locked"]) == (
        "network",
        world.pool.pool_id,
        False,
    )
    assert Workspace.objects.get(pk="ws-network1").current_pool_id == world.pool.pool_id


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"pool_id": "{pool}"}, "name", 400),
        ({"name": "w"}, "pool_id", 400),
        ({"name": "w", "pool_id": "pool-doesnotexist0000"}, "pool_id", 400),
        ({"name": "w", "pool_id": "{pool}", "workspace_id": "WS 1"}, "workspace_id", 400),
        ({"name": "w", "pool_id": "{pool}", "workspace_id": "ws-infra01"}, "workspace_id", 409),
    ],
)
def test_creating_a_workspace_with_bad_input_names_the_field(
    world: World, admin_client: Client, body: dict[str, str], field: str, status: int
) -> None:
    body = {k: fill(world, v) for k, v in body.items()}
    response = post(admin_client, "/api/v1/workspaces", body)
    assert (response.status_code, response.json()["field"]) == (status, field)
    assert Workspace.objects.count() == 1


def test_the_workspace_page_lists_its_tasks_and_its_lock(
    world: World, viewer_client: Client
) -> None:
    response = viewer_client.get(f"/api/v1/workspaces/{world.workspace.workspace_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["is_locked"] is True
    assert body["lock_reason"] == f"Locked for apply (task #{world.planned.pk})"
    assert body["lock_task_id"] == world.planned.pk
    assert [(t["id"], t["status"]) for t in body["tasks"]] == [
        (world.planned.pk, "apply_pending"),
        (world.pending.pk, "pending"),
    ]


def test_an_unknown_workspace_is_404(viewer_client: Client, admin_client: Client) -> None:
    assert viewer_client.get("/api/v1/workspaces/ws-nothere").status_code == 404
    response = post(admin_client, "/api/v1/workspaces/ws-nothere/tasks", {"task_type": "plan"})
    assert response.status_code == 404
    response = post(admin_client, "/api/v1/workspaces/ws-nothere/unlock", {"reason": "r"})
    assert response.status_code == 404


def test_an_admin_submits_a_task(world: World, admin_client: Client) -> None:
    url = f"/api/v1/workspaces/{world.workspace.workspace_id}/tasks"
    response = post(admin_client, url, {"task_type": "drift_check", "description": "nightly"})
    assert response.status_code == 201
    body = response.json()
    task = WorkspaceTask.objects.get(pk=body["id"])
    assert (task.task_type, task.status, task.description, task.created_by) == (
        "drift_check",
        "pending",
        "nightly",
        "user:alice",
    )
    assert (body["status"], body["stage"], body["pool_id"]) == (
        "pending",
        "pending",
        world.pool.pool_id,
    )


def test_submitting_an_unknown_task_type_is_400(world: World, admin_client: Client) -> None:
    url = f"/api/v1/workspaces/{world.workspace.workspace_id}/tasks"
    response = post(admin_client, url, {"task_type": "destroy"})
    assert (response.status_code, response.json()["field"]) == (400, "task_type")


def test_an_admin_unlocks_a_workspace_with_a_reason(world: World, admin_client: Client) -> None:
    url = f"/api/v1/workspaces/{world.workspace.workspace_id}/unlock"
    response = post(admin_client, url, {"reason": "state reviewed"})
    assert response.status_code == 200
    assert response.json()["is_locked"] is False
    event = Event.objects.filter(kind="workspace.unlocked").latest("id")
    assert (event.actor, event.reason) == ("user:alice", "state reviewed")


def test_unlocking_needs_a_reason_and_a_locked_workspace(
    world: World, admin_client: Client
) -> None:
    url = f"/api/v1/workspaces/{world.workspace.workspace_id}/unlock"
    assert post(admin_client, url, {}).json()["field"] == "reason"
    assert post(admin_client, url, {"reason": "  "}).status_code == 400
    assert post(admin_client, url, {"reason": "first"}).status_code == 200
    response = post(admin_client, url, {"reason": "again"})
    assert response.status_code == 409
    assert "not locked" in response.json()["detail"]


# --- tasks -------------------------------------------------------------------------------------


def test_the_task_page_has_diagnosis_history_and_events(
    world: World, viewer_client: Client
) -> None:
    response = viewer_client.get(f"/api/v1/tasks/{world.planned.pk}")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["status"], body["stage"]) == (
        world.planned.pk,
        "apply_pending",
        "apply_pending",
    )
    assert body["workspace_id"] == world.workspace.workspace_id
    assert body["pool_id"] == world.pool.pool_id
    assert body["task_type"] == "plan_and_apply"
    assert (body["plan_pod"], body["plan_slot"]) == ("P1", 0)
    assert body["plan_agent_id"] == body["agent_id"]
    assert body["apply_confirmed_by"] is None
    assert body["diagnosis"]["code"] == "awaiting_confirmation"
    assert "P1[0]" in body["diagnosis"]["text"]
    assert isinstance(body["diagnosis_history"], list)
    kinds = [event["kind"] for event in body["events"]]
    assert kinds[0] == "task.submitted"
    assert "task.apply_pending" in kinds
    assert "slot.reserved" in kinds
    assert [e["id"] for e in body["events"]] == sorted(e["id"] for e in body["events"])


def test_the_task_page_shows_the_diagnosis_history(world: World, viewer_client: Client) -> None:
    diagnosis_record_all()
    response = viewer_client.get(f"/api/v1/tasks/{world.pending.pk}")
    [entry] = response.json()["diagnosis_history"]
    assert entry["code"] == response.json()["diagnosis"]["code"]
    assert entry["from"] is not None
    assert entry["to"] is None


def test_an_unknown_task_is_404(viewer_client: Client, admin_client: Client) -> None:
    assert viewer_client.get("/api/v1/tasks/999999").status_code == 404
    assert post(admin_client, "/api/v1/tasks/999999/confirm-apply", {}).status_code == 404
    missing = post(admin_client, "/api/v1/tasks/999999/cancel", {"reason": "not needed"})
    assert missing.status_code == 404


def test_an_admin_confirms_an_apply(world: World, admin_client: Client) -> None:
    url = f"/api/v1/tasks/{world.planned.pk}/confirm-apply"
    response = post(admin_client, url, {"description": "ticket OPS-1"})
    assert response.status_code == 200
    body = response.json()
    assert body["apply_confirmed_by"] == "user:alice"
    assert body["apply_confirmed_at"] is not None
    task = refresh(world.planned)
    assert (task.apply_confirmed_by, task.apply_description) == ("user:alice", "ticket OPS-1")


def test_confirming_a_task_that_is_not_apply_pending_is_409(
    world: World, admin_client: Client
) -> None:
    response = post(admin_client, f"/api/v1/tasks/{world.pending.pk}/confirm-apply", {})
    assert response.status_code == 409
    assert "only apply_pending can be confirmed" in response.json()["detail"]
    assert not refresh(world.pending).apply_confirmed_by


def test_confirming_twice_is_409(world: World, admin_client: Client) -> None:
    url = f"/api/v1/tasks/{world.planned.pk}/confirm-apply"
    assert post(admin_client, url, {}).status_code == 200
    response = post(admin_client, url, {})
    assert response.status_code == 409
    assert "already confirmed by user:alice" in response.json()["detail"]


def test_an_admin_cancels_a_pending_task(world: World, admin_client: Client) -> None:
    url = f"/api/v1/tasks/{world.pending.pk}/cancel"
    response = post(admin_client, url, {"reason": "not needed"})
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert refresh(world.pending).error_message == "Cancelled by user:alice: not needed"


def test_cancelling_an_applying_task_needs_force(world: World, admin_client: Client) -> None:
    task_confirm_apply(task_id=world.planned.pk, actor="user:alice")
    applying = run(refresh(world.planned))
    assert (applying.status, applying.stage) == (TaskStatus.RUNNING, Stage.APPLYING)
    url = f"/api/v1/tasks/{applying.pk}/cancel"

    response = post(admin_client, url, {"reason": "stuck"})
    assert response.status_code == 409
    assert "force" in response.json()["detail"]
    assert refresh(applying).status == TaskStatus.RUNNING

    response = post(admin_client, url, {"reason": "stuck", "force": True})
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    # The apply may have changed things: the lock stays for a person to review.
    assert Workspace.objects.get(pk=world.workspace.pk).is_locked


def test_cancel_fields_are_typed(world: World, admin_client: Client) -> None:
    url = f"/api/v1/tasks/{world.pending.pk}/cancel"
    response = post(admin_client, url, {"reason": "x", "force": "yes"})
    assert (response.status_code, response.json()["field"]) == (400, "force")
    response = post(admin_client, url, {"reason": "x", "forced": True})
    assert (response.status_code, response.json()["field"]) == (400, "forced")
    assert refresh(world.pending).status == TaskStatus.PENDING


@pytest.mark.parametrize("body", [{}, {"reason": " "}, {"reason": None}, {"force": True}])
def test_cancelling_without_a_reason_is_400_naming_it(
    world: World, admin_client: Client, body: dict[str, Any]
) -> None:
    before = writes(world)
    response = post(admin_client, f"/api/v1/tasks/{world.pending.pk}/cancel", body)
    assert (response.status_code, response.json()["field"]) == (400, "reason")
    assert writes(world) == before


def test_cancelling_a_finished_task_is_409(world: World, admin_client: Client) -> None:
    url = f"/api/v1/tasks/{world.pending.pk}/cancel"
    assert post(admin_client, url, {"reason": "not needed"}).status_code == 200
    response = post(admin_client, url, {"reason": "not needed"})
    assert response.status_code == 409
    assert "terminal" in response.json()["detail"]


# --- bearer tokens and CSRF --------------------------------------------------------------------


def test_a_bearer_post_is_accepted_without_a_csrf_token(world: World, admin_token: str) -> None:
    client = Client(enforce_csrf_checks=True)
    response = post(client, "/api/v1/pools", {"name": "green"}, **bearer(admin_token))
    assert response.status_code == 201
    assert Event.objects.get(kind="pool.created", target_id=response.json()["pool_id"]).actor == (
        "user:alice"
    )


def test_a_session_post_without_a_csrf_token_is_refused(world: World, admin: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    before = writes(world)
    response = post(client, f"/api/v1/tasks/{world.pending.pk}/cancel", {"reason": "x"})
    assert response.status_code == 403
    assert response.json()["error"] == "csrf_failed"
    assert writes(world) == before


def test_a_session_post_with_the_csrf_token_is_accepted(world: World, admin: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    request = RequestFactory().get("/")
    token = get_token(request)
    client.cookies["csrftoken"] = request.META["CSRF_COOKIE"]
    url = f"/api/v1/tasks/{world.pending.pk}/cancel"
    response = post(client, url, {"reason": "not needed"}, X_CSRFToken=token)
    assert response.status_code == 200
    assert refresh(world.pending).status == TaskStatus.CANCELLED


def test_a_session_get_needs_no_csrf_token(world: World, viewer: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(viewer)
    assert client.get("/api/v1/pools").status_code == 200


def test_an_authorization_header_that_is_not_bearer_is_401(world: World, admin: User) -> None:
    client = Client()
    client.force_login(admin)  # a header, when present, decides: the session is not used
    response = client.get("/api/v1/pools", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert response.status_code == 401
    assert "Bearer" in response.json()["detail"]


def test_a_pool_token_is_not_a_user_token(world: World) -> None:
    issued = pool_token_create(pool=world.pool, name="agent", actor="user:alice")
    response = Client().get("/api/v1/pools", headers=bearer(issued.secret))
    assert response.status_code == 401
