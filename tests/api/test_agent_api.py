"""The agent API (SPEC 7): every endpoint allowed, and every way it refuses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.test.client import MULTIPART_CONTENT

from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, PoolToken, Slot
from poolsadmin.pools.services import pool_token_create, pool_token_revoke
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import Stage, TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply
from tests.ledger import (
    ADMIN,
    finish,
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    refresh,
    run,
    slot_states,
    submit,
)

pytestmark = pytest.mark.django_db

API = "/api/v1/agents"


@dataclass
class Caller:
    """An HTTP client holding one pool token."""

    client: Client
    pool: AgentPool
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def post(self, path: str, body: Any = None) -> Any:
        return self.client.post(
            API + path,
            json.dumps(body or {}),
            content_type="application/json",
            headers=self.headers,
        )

    def put(self, path: str, body: Any) -> Any:
        return self.client.put(
            API + path, json.dumps(body), content_type="application/json", headers=self.headers
        )

    def get(self, path: str) -> Any:
        return self.client.get(API + path, headers=self.headers)

    def raw(self, method: str, path: str, data: str) -> Any:
        send = getattr(self.client, method)
        return send(API + path, data, content_type="application/json", headers=self.headers)


def caller_for(client: Client, pool: AgentPool) -> Caller:
    issued = pool_token_create(pool=pool, name="agents", actor=ADMIN)
    return Caller(client=client, pool=pool, secret=issued.secret)


@pytest.fixture
def pool() -> AgentPool:
    return make_pool(name="p1")


@pytest.fixture
def api(client: Client, pool: AgentPool) -> Caller:
    return caller_for(client, pool)


@pytest.fixture
def other_api(client: Client) -> Caller:
    return caller_for(client, make_pool(name="p2"))


def task_row(task: WorkspaceTask) -> dict[str, Any]:
    return dict(WorkspaceTask.objects.filter(pk=task.pk).values().get())


def ledger_snapshot(task: WorkspaceTask) -> tuple[dict[str, Any], list[Any], int]:
    """What a refused request must leave unchanged: the task row, the slots, the event log."""
    slots = list(Slot.objects.order_by("pk").values())
    return task_row(task), slots, Event.objects.count()


def running_plan(pool: AgentPool, agent_name: str = "P1") -> tuple[WorkspaceTask, Agent]:
    agent = make_agent(pool, agent_name)
    task = run(submit(make_workspace(pool), "plan"))
    return task, agent


# --- authentication ----------------------------------------------------------------------------


def test_a_request_without_a_token_is_unauthenticated(client: Client, pool: AgentPool) -> None:
    response = client.post(
        f"{API}/register", json.dumps({"name": "P1"}), content_type="application/json"
    )

    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert not Agent.objects.exists()


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-pool-token",
        "Bearer apt_pool-aaaaaaaaaaaaaaaa_" + "0" * 64,
    ],
)
def test_a_malformed_or_unknown_token_is_unauthenticated(
    client: Client, api: Caller, header: str
) -> None:
    response = client.post(
        f"{API}/register",
        json.dumps({"name": "P1"}),
        content_type="application/json",
        headers={"Authorization": header},
    )

    assert response.status_code == 401
    assert not Agent.objects.exists()


def test_a_revoked_token_is_unauthenticated(api: Caller) -> None:
    for token in PoolToken.objects.filter(pool=api.pool):
        pool_token_revoke(token_id=token.pk, actor=ADMIN)

    response = api.post("/register", {"name": "P1"})

    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_an_expired_token_is_unauthenticated(client: Client, pool: AgentPool) -> None:
    issued = pool_token_create(
        pool=pool, name="short", actor=ADMIN, expires_at=clock.now() + timedelta(minutes=1)
    )
    clock.advance(61)

    response = Caller(client, pool, issued.secret).post("/register", {"name": "P1"})

    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


# --- register ----------------------------------------------------------------------------------


def test_an_agent_registers_into_the_pool_of_its_token(api: Caller) -> None:
    response = api.post("/register", {"name": "P1", "version": "1.2.3"})

    assert response.status_code == 200
    body = response.json()
    agent = Agent.objects.get(pk=body["agent_id"])
    assert body["pool_id"] == api.pool.pool_id
    assert (agent.pool_id, agent.agent_name, agent.version) == (api.pool.pool_id, "P1", "1.2.3")
    assert agent.ip == "127.0.0.1"


def test_registering_again_with_the_same_name_reuses_the_agent(api: Caller) -> None:
    first = api.post("/register", {"name": "P1"}).json()
    second = api.post("/register", {"name": "P1", "version": "2"}).json()

    assert first["agent_id"] == second["agent_id"]
    assert Agent.objects.count() == 1


def test_register_without_a_name_names_the_missing_field(api: Caller) -> None:
    response = api.post("/register", {"version": "1"})

    assert response.status_code == 400
    assert response.json()["field"] == "name"


def test_register_with_a_name_that_is_not_a_string_names_the_field(api: Caller) -> None:
    response = api.post("/register", {"name": 42})

    assert response.status_code == 400
    assert response.json()["field"] == "name"


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '"P1"'])
def test_a_body_that_is_not_a_json_object_names_the_body(api: Caller, body: str) -> None:
    response = api.raw("post", "/register", body)

    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert not Agent.objects.exists()


def test_the_agent_api_needs_no_csrf_token(api: Caller) -> None:
    strict = Client(enforce_csrf_checks=True)

    response = strict.post(
        f"{API}/register",
        json.dumps({"name": "P1"}),
        content_type="application/json",
        headers=api.headers,
    )

    assert response.status_code == 200


def test_register_refuses_get(api: Caller) -> None:
    assert api.get("/register").status_code == 405


# --- heartbeat ---------------------------------------------------------------------------------


def test_a_heartbeat_records_liveness_and_answers_with_the_dispatched_work(
    api: Caller, pool: AgentPool
) -> None:
    agent = make_agent(pool, "P1")
    registered_at = agent.last_ping_at
    assert registered_at is not None
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    clock.advance(5)

    response = api.post(
        f"/{agent.agent_id}/heartbeat", {"running_task_ids": [], "cpu": 0.5, "memory": 512}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["cancellations"] == []
    assert body["assignments"] == [
        {
            "task_id": task.pk,
            "workspace_id": task.workspace_id,
            "task_type": "plan",
            "action": "plan",
            "pod": "P1",
            "slot": 0,
            "reuse_workdir": False,
        }
    ]
    agent.refresh_from_db()
    assert agent.last_ping_at is not None
    assert agent.last_ping_at >= registered_at + timedelta(seconds=5)
    assert (agent.cpu, agent.memory) == (0.5, 512.0)


def test_a_heartbeat_listing_a_task_the_ledger_does_not_assign_gets_a_cancel(
    api: Caller, pool: AgentPool
) -> None:
    agent = make_agent(pool, "P1")

    response = api.post(f"/{agent.agent_id}/heartbeat", {"running_task_ids": [424242]})

    assert response.status_code == 200
    assert [c["task_id"] for c in response.json()["cancellations"]] == [424242]


def test_a_heartbeat_for_an_agent_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller
) -> None:
    stranger = make_agent(other_api.pool, "Q1")
    before = Agent.objects.filter(pk=stranger.pk).values().get()

    response = api.post(f"/{stranger.agent_id}/heartbeat", {"running_task_ids": []})

    assert response.status_code == 403
    assert Agent.objects.filter(pk=stranger.pk).values().get() == before


def test_a_heartbeat_for_an_unknown_agent_is_not_found(api: Caller) -> None:
    response = api.post("/agent-doesnotexist000/heartbeat", {"running_task_ids": []})

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"running_task_ids": "1,2"}, "running_task_ids"),
        ({"running_task_ids": [1, "2"]}, "running_task_ids"),
        ({"running_task_ids": [True]}, "running_task_ids"),
        ({"running_task_ids": [], "cpu": "high"}, "cpu"),
        ({"running_task_ids": [], "memory": [1]}, "memory"),
    ],
)
def test_a_heartbeat_with_a_wrongly_typed_field_names_it(
    api: Caller, pool: AgentPool, body: dict[str, Any], field: str
) -> None:
    agent = make_agent(pool, "P1")
    before = Agent.objects.filter(pk=agent.pk).values().get()
    clock.advance(5)

    response = api.post(f"/{agent.agent_id}/heartbeat", body)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert Agent.objects.filter(pk=agent.pk).values().get() == before


def test_heartbeat_refuses_get(api: Caller, pool: AgentPool) -> None:
    agent = make_agent(pool, "P1")

    assert api.get(f"/{agent.agent_id}/heartbeat").status_code == 405


# --- accept ------------------------------------------------------------------------------------


def test_the_assigned_agent_accepts_its_dispatch(api: Caller, pool: AgentPool) -> None:
    agent = make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id})

    assert response.status_code == 200
    assert response.json()["status"] == "running"
    assert refresh(task).acked_at is not None
    heartbeat = api.post(f"/{agent.agent_id}/heartbeat", {"running_task_ids": [task.pk]})
    assert heartbeat.json() == {"assignments": [], "cancellations": []}


def test_accepting_a_task_assigned_to_another_agent_is_forbidden_and_writes_nothing(
    api: Caller, pool: AgentPool
) -> None:
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    other = make_agent(pool, "P2")
    before = ledger_snapshot(task)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": other.agent_id})

    assert response.status_code == 403
    assert ledger_snapshot(task) == before


def test_accepting_a_task_that_was_never_dispatched_is_a_conflict(
    api: Caller, pool: AgentPool
) -> None:
    agent = make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    before = ledger_snapshot(task)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id})

    assert response.status_code == 409
    assert ledger_snapshot(task) == before


def test_accepting_a_task_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller, pool: AgentPool
) -> None:
    mine = make_agent(pool, "P1")
    task, _ = running_plan(other_api.pool, "Q1")

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": mine.agent_id})

    assert response.status_code == 403


def test_accepting_an_unknown_task_is_not_found(api: Caller, pool: AgentPool) -> None:
    agent = make_agent(pool, "P1")

    response = api.post("/tasks/999999/accept", {"agent_id": agent.agent_id})

    assert response.status_code == 404


def test_accept_without_an_agent_id_names_the_field(api: Caller, pool: AgentPool) -> None:
    task, _ = running_plan(pool)

    response = api.post(f"/tasks/{task.pk}/accept", {})

    assert response.status_code == 400
    assert response.json()["field"] == "agent_id"


def test_accept_refuses_put(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(pool)

    assert api.put(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id}).status_code == 405


# --- status ------------------------------------------------------------------------------------


def test_the_assigned_agent_reports_a_plan_as_success_and_frees_its_slot(
    api: Caller, pool: AgentPool
) -> None:
    task, agent = running_plan(pool)

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": agent.agent_id, "status": "success"}
    )

    assert response.status_code == 200
    assert response.json()["status"] == "success"
    task = refresh(task)
    assert (task.status, task.stage) == (TaskStatus.SUCCESS, Stage.COMPLETED)
    assert task.completed_at is not None
    assert slot_states(pod_of(agent))[0] == ("idle", None)


def test_a_stage_report_updates_a_running_task(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(pool)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "running", "stage": "planning"},
    )

    assert response.status_code == 200
    assert refresh(task).status == TaskStatus.RUNNING


def test_a_plan_and_apply_plan_with_changes_keeps_its_slot_reserved(
    api: Caller, pool: AgentPool
) -> None:
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan_and_apply"))

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": agent.agent_id, "status": "apply_pending"}
    )

    assert response.status_code == 200
    assert refresh(task).status == TaskStatus.APPLY_PENDING
    assert slot_states(pod_of(agent))[0] == ("reserved", task.pk)


def test_a_failure_report_keeps_the_error_message(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(pool)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "failed", "error_message": "provider crashed"},
    )

    assert response.status_code == 200
    task = refresh(task)
    assert (task.status, task.error_message) == (TaskStatus.FAILED, "provider crashed")


def test_an_apply_is_reported_applied(api: Caller, pool: AgentPool) -> None:
    agent = make_agent(pool, "P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task_dispatch(task_id=task.pk)
    api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id})

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": agent.agent_id, "status": "applied"}
    )

    assert response.status_code == 200
    assert refresh(task).status == TaskStatus.APPLIED


def test_a_report_from_an_agent_the_task_is_not_assigned_to_is_forbidden_and_writes_nothing(
    api: Caller, pool: AgentPool
) -> None:
    task, _ = running_plan(pool, "P1")
    other = make_agent(pool, "P2")
    before = ledger_snapshot(task)

    response = api.put(f"/tasks/{task.pk}/status", {"agent_id": other.agent_id, "status": "failed"})

    assert response.status_code == 403
    assert ledger_snapshot(task) == before


def test_applied_during_planning_is_an_invalid_transition_and_writes_nothing(
    api: Caller, pool: AgentPool
) -> None:
    agent = make_agent(pool, "P1")
    task = run(submit(make_workspace(pool), "plan_and_apply"))
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": agent.agent_id, "status": "applied"}
    )

    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert ledger_snapshot(task) == before


@pytest.mark.parametrize("status", ["success", "failed", "running", "apply_pending"])
def test_writes_to_a_terminal_task_are_conflicts_and_write_nothing(
    api: Caller, pool: AgentPool, status: str
) -> None:
    task, agent = running_plan(pool)
    task = finish(task, TaskStatus.SUCCESS)
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": status, "stage": "planning"},
    )

    assert response.status_code == 409
    assert ledger_snapshot(task) == before


def test_accepting_a_terminal_task_is_a_conflict(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(pool)
    finish(task, TaskStatus.SUCCESS)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id})

    assert response.status_code == 409


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "success"}, "agent_id"),
        ({"agent_id": None, "status": "success"}, "agent_id"),
        ({"agent_id": "AGENT"}, "status"),
        ({"agent_id": "AGENT", "status": 1}, "status"),
        ({"agent_id": "AGENT", "status": "done"}, "status"),
        ({"agent_id": "AGENT", "status": "pending"}, "status"),
        ({"agent_id": "AGENT", "status": "running", "stage": 3}, "stage"),
        ({"agent_id": "AGENT", "status": "running"}, "stage"),
        ({"agent_id": "AGENT", "status": "failed", "error_message": ["x"]}, "error_message"),
    ],
)
def test_a_status_report_with_a_missing_or_wrong_field_names_it_and_writes_nothing(
    api: Caller, pool: AgentPool, body: dict[str, Any], field: str
) -> None:
    task, agent = running_plan(pool)
    body = {k: agent.agent_id if v == "AGENT" else v for k, v in body.items()}
    before = ledger_snapshot(task)

    response = api.put(f"/tasks/{task.pk}/status", body)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert ledger_snapshot(task) == before


def test_a_status_report_with_malformed_json_names_the_body(api: Caller, pool: AgentPool) -> None:
    task, _ = running_plan(pool)
    before = ledger_snapshot(task)

    response = api.raw("put", f"/tasks/{task.pk}/status", '{"status": "success"')

    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert ledger_snapshot(task) == before


def test_a_status_report_on_a_task_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller
) -> None:
    task, stranger = running_plan(other_api.pool, "Q1")
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": stranger.agent_id, "status": "success"}
    )

    assert response.status_code == 403
    assert ledger_snapshot(task) == before


def test_a_status_report_naming_an_agent_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller, pool: AgentPool
) -> None:
    task, _ = running_plan(pool)
    stranger = make_agent(other_api.pool, "Q1")

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": stranger.agent_id, "status": "success"}
    )

    assert response.status_code == 403


def test_status_refuses_post(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(pool)

    response = api.post(f"/tasks/{task.pk}/status", {"agent_id": agent.agent_id})

    assert response.status_code == 405


def test_a_form_encoded_status_report_is_refused_as_a_body_that_is_not_json(
    api: Caller, pool: AgentPool
) -> None:
    task, agent = running_plan(pool)

    response = api.client.put(
        f"{API}/tasks/{task.pk}/status",
        f"agent_id={agent.agent_id}&status=success",
        content_type=MULTIPART_CONTENT,
        headers=api.headers,
    )

    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert refresh(task).status == TaskStatus.RUNNING


# --- task detail -------------------------------------------------------------------------------


def test_an_agent_reads_a_task_of_its_pool(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(pool)

    response = api.get(f"/tasks/{task.pk}")

    assert response.status_code == 200
    assert response.json() == {
        "task_id": task.pk,
        "workspace_id": task.workspace_id,
        "task_type": "plan",
        "status": "running",
        "stage": "planning",
        "action": "plan",
        "agent_id": agent.agent_id,
        "pod": "P1",
        "slot": 0,
        "reuse_workdir": False,
    }


def test_reading_a_task_of_another_pool_is_forbidden(api: Caller, other_api: Caller) -> None:
    task, _ = running_plan(other_api.pool, "Q1")

    assert api.get(f"/tasks/{task.pk}").status_code == 403


def test_reading_an_unknown_task_is_not_found(api: Caller) -> None:
    assert api.get("/tasks/999999").status_code == 404


def test_reading_a_task_without_a_token_is_unauthenticated(client: Client, pool: AgentPool) -> None:
    task, _ = running_plan(pool)

    assert client.get(f"{API}/tasks/{task.pk}").status_code == 401


def test_task_detail_refuses_delete(api: Caller, pool: AgentPool) -> None:
    task, _ = running_plan(pool)

    response = api.client.delete(f"{API}/tasks/{task.pk}", headers=api.headers)

    assert response.status_code == 405
