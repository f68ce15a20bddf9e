"""The agent API (SPEC 7): every endpoint allowed, and every way it refuses."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.test.client import MULTIPART_CONTENT

from poolsadmin.agents.models import Agent
from poolsadmin.api import agent_auth
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.ids import sha256_hex
from poolsadmin.pools.models import AgentPool, Pod, PoolToken, Slot
from poolsadmin.pools.services import pool_token_create, pool_token_revoke
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import Stage, TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply
from poolsadmin.worker.reconcile import reconcile_pool
from tests.ledger import (
    ADMIN,
    finish,
    make_agent_with_secret,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    refresh,
    run,
    slot_states,
    submit,
)
from tests.worker.kube_scenarios import cluster_pod, make_k8s_pool

pytestmark = pytest.mark.django_db

API = "/api/v1/agents"


@dataclass
class Caller:
    """An HTTP client holding one pool token, and the secrets of the agents it registered.
    A request made `as_agent` carries that agent's X-Agent-Id and X-Agent-Secret (or
    `agent_secret` instead, to present a wrong one)."""

    client: Client
    pool: AgentPool
    secret: str
    agent_secrets: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def agent(self, name: str) -> Agent:
        """Register an agent in the caller's pool, keeping its secret."""
        registration = make_agent_with_secret(self.pool, name)
        self.agent_secrets[registration.agent.agent_id] = registration.secret
        return registration.agent

    def headers_as(self, agent: Agent | None, agent_secret: str | None = None) -> dict[str, str]:
        if agent is None:
            return self.headers
        if agent_secret is None:
            agent_secret = self.agent_secrets[agent.agent_id]
        return {**self.headers, "X-Agent-Id": agent.agent_id, "X-Agent-Secret": agent_secret}

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        as_agent: Agent | None = None,
        agent_secret: str | None = None,
    ) -> Any:
        return self.client.post(
            API + path,
            json.dumps(body or {}),
            content_type="application/json",
            headers=self.headers_as(as_agent, agent_secret),
        )

    def put(
        self,
        path: str,
        body: Any,
        *,
        as_agent: Agent | None = None,
        agent_secret: str | None = None,
    ) -> Any:
        return self.client.put(
            API + path,
            json.dumps(body),
            content_type="application/json",
            headers=self.headers_as(as_agent, agent_secret),
        )

    def get(
        self, path: str, *, as_agent: Agent | None = None, agent_secret: str | None = None
    ) -> Any:
        return self.client.get(API + path, headers=self.headers_as(as_agent, agent_secret))

    def raw(self, method: str, path: str, data: str, *, as_agent: Agent | None = None) -> Any:
        send = getattr(self.client, method)
        return send(
            API + path, data, content_type="application/json", headers=self.headers_as(as_agent)
        )


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


def running_plan(caller: Caller, agent_name: str = "P1") -> tuple[WorkspaceTask, Agent]:
    agent = caller.agent(agent_name)
    task = run(submit(make_workspace(caller.pool), "plan"))
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


def test_a_token_whose_pool_went_meanwhile_is_unauthenticated_with_the_scheme(
    api: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool deleted between the token's read and register's read of the pool.
    monkeypatch.setattr(agent_auth, "request_pool_id", lambda request: "pool-gone")

    response = api.post("/register", {"name": "P1"})

    assert response.status_code == 401
    assert "no longer exists" in response.json()["detail"]
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert not Agent.objects.exists()


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


def _register(api: Caller, body: dict[str, Any], secret: str = "") -> Any:
    headers = {**api.headers, **({"X-Agent-Secret": secret} if secret else {})}
    return api.client.post(
        API + "/register", json.dumps(body), content_type="application/json", headers=headers
    )


def test_registering_again_with_its_secret_reuses_the_agent(api: Caller) -> None:
    first = api.post("/register", {"name": "P1"}).json()
    second = _register(api, {"name": "P1", "version": "2"}, first["agent_secret"]).json()

    assert first["agent_id"] == second["agent_id"]
    assert Agent.objects.count() == 1


def test_registering_under_another_agents_name_without_its_secret_is_a_409(api: Caller) -> None:
    """The takeover: any holder of the pool token got the victim's agent_id and a fresh
    secret, reported its running task as failed, and locked it out."""
    victim = api.agent("P1")
    task = run(submit(make_workspace(api.pool)))
    before = Agent.objects.get(pk=victim.pk).secret_hash

    for secret in ("", "ags_" + "0" * 64):
        refused = _register(api, {"name": "P1"}, secret)
        assert refused.status_code == 409
        assert refused.json()["field"] == "name"
        assert "agent_secret" not in refused.json()
    heartbeat = api.post(f"/{victim.agent_id}/heartbeat", {}, as_agent=victim)

    assert Agent.objects.get(pk=victim.pk).secret_hash == before
    assert heartbeat.status_code == 200  # the victim's own secret still works
    assert refresh(task).status == TaskStatus.RUNNING
    assert not Event.objects.filter(kind="agent.reregistered").exists()


def test_a_new_pod_of_the_same_name_retires_the_old_identity(
    client: Client, fake_kube: Any, kube_client: Any
) -> None:
    """k8s: the name is taken over only by a pod the cluster reports under that name with a
    uid that is not the old agent's; the old identity is retired and its work failed."""
    pool = make_k8s_pool()
    k8s = caller_for(client, pool)
    cluster_pod(fake_kube, pool, "agent-a")
    reconcile_pool(pool=pool, kube=kube_client)
    old_uid = Pod.objects.get(pool=pool, name="agent-a").uid
    first = _register(k8s, {"name": "agent-a", "pod_uid": old_uid}).json()
    # The pod is deleted and a new one made under the same name (a StatefulSet, by hand).
    fake_kube.delete_behind_back("agent-a", pool.namespace)
    cluster_pod(fake_kube, pool, "agent-a")
    new_uid = str(fake_kube.pod("agent-a", pool.namespace)["metadata"]["uid"])

    too_early = _register(k8s, {"name": "agent-a", "pod_uid": new_uid})  # not adopted yet
    reconcile_pool(pool=pool, kube=kube_client)  # the old pod is gone, the new one adopted
    made_up = _register(k8s, {"name": "agent-a", "pod_uid": "0" * 36})
    same_pod = _register(k8s, {"name": "agent-a", "pod_uid": old_uid})
    second = _register(k8s, {"name": "agent-a", "pod_uid": new_uid})

    assert [r.status_code for r in (too_early, made_up, same_pod)] == [409, 409, 409]
    assert second.status_code == 200, second.json()
    assert second.json()["agent_id"] != first["agent_id"]
    old = Agent.objects.get(pk=first["agent_id"])
    assert old.retired_at is not None and old.status == "offline"
    assert "replaced by a new pod" in old.retired_reason
    assert Pod.objects.get(pool=pool, name="agent-a").agent_id == second.json()["agent_id"]
    stale = k8s.client.post(
        API + f"/{old.agent_id}/heartbeat",
        "{}",
        content_type="application/json",
        headers={
            **k8s.headers,
            "X-Agent-Id": old.agent_id,
            "X-Agent-Secret": first["agent_secret"],
        },
    )
    assert (stale.status_code, stale.json()["field"]) == (403, "agent_secret")
    assert "retired" in stale.json()["detail"]


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


# --- agent identity: the pool token says which pool, the agent secret says which agent --------


def test_register_returns_an_agent_secret_that_is_stored_only_as_its_hash(api: Caller) -> None:
    response = api.post("/register", {"name": "P1"})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"agent_id", "pool_id", "agent_secret"}
    assert re.fullmatch(r"ags_[0-9a-f]{64}", body["agent_secret"])
    assert response["Cache-Control"] == "no-store"
    agent = Agent.objects.get(pk=body["agent_id"])
    assert agent.secret_hash == sha256_hex(body["agent_secret"])
    events = json.dumps(list(Event.objects.values("before", "after", "data", "reason")))
    assert body["agent_secret"] not in events


def test_registering_again_rotates_the_secret_and_the_old_one_is_refused(api: Caller) -> None:
    first = api.post("/register", {"name": "P1"}).json()
    second = _register(api, {"name": "P1"}, first["agent_secret"]).json()
    agent = Agent.objects.get(pk=first["agent_id"])

    old = api.post(
        f"/{agent.agent_id}/heartbeat", {}, as_agent=agent, agent_secret=first["agent_secret"]
    )
    new = api.post(
        f"/{agent.agent_id}/heartbeat", {}, as_agent=agent, agent_secret=second["agent_secret"]
    )

    assert second["agent_id"] == first["agent_id"]
    assert second["agent_secret"] != first["agent_secret"]
    assert (old.status_code, old.json()["field"]) == (403, "agent_secret")
    assert "replaced it" in old.json()["detail"]
    assert new.status_code == 200
    rotated = Event.objects.get(kind="agent.reregistered", target_id=agent.agent_id)
    assert rotated.after is not None and rotated.after["secret_rotated"] is True


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


@pytest.mark.parametrize("secret", ["missing", "wrong", "another agent's"])
def test_a_heartbeat_without_the_agents_own_secret_is_forbidden_and_writes_nothing(
    api: Caller, pool: AgentPool, secret: str
) -> None:
    agent, other = api.agent("P1"), api.agent("P2")
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    headers = {
        "missing": _without(api.headers_as(agent), "X-Agent-Secret"),
        "wrong": api.headers_as(agent, "ags_" + "0" * 64),
        "another agent's": api.headers_as(agent, api.agent_secrets[other.agent_id]),
    }[secret]
    before = Agent.objects.filter(pk=agent.pk).values().get(), ledger_snapshot(task)
    clock.advance(5)

    response = api.client.post(
        f"{API}/{agent.agent_id}/heartbeat",
        json.dumps({"running_task_ids": [424242]}),
        content_type="application/json",
        headers=headers,
    )

    assert response.status_code == 403
    assert response.json()["field"] == "agent_secret"
    assert "assignments" not in response.json()  # the dispatch is not handed to an impostor
    assert (Agent.objects.filter(pk=agent.pk).values().get(), ledger_snapshot(task)) == before


@pytest.mark.parametrize("secret", ["missing", "another agent's"])
def test_accepting_as_the_assigned_agent_without_its_secret_is_forbidden_and_writes_nothing(
    api: Caller, pool: AgentPool, secret: str
) -> None:
    assigned = api.agent("P1")
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    impostor = api.agent("P2")
    headers = {
        "missing": _without(api.headers_as(assigned), "X-Agent-Secret"),
        "another agent's": api.headers_as(assigned, api.agent_secrets[impostor.agent_id]),
    }[secret]
    before = ledger_snapshot(task)

    response = api.client.post(
        f"{API}/tasks/{task.pk}/accept",
        json.dumps({"agent_id": assigned.agent_id}),
        content_type="application/json",
        headers=headers,
    )

    assert response.status_code == 403
    assert response.json()["field"] == "agent_secret"
    assert ledger_snapshot(task) == before
    assert refresh(task).acked_at is None


@pytest.mark.parametrize("secret", ["missing", "another agent's"])
def test_reporting_as_the_assigned_agent_without_its_secret_is_forbidden_and_writes_nothing(
    api: Caller, secret: str
) -> None:
    task, assigned = running_plan(api, "P1")
    impostor = api.agent("P2")
    headers = {
        "missing": _without(api.headers_as(assigned), "X-Agent-Secret"),
        "another agent's": api.headers_as(assigned, api.agent_secrets[impostor.agent_id]),
    }[secret]
    before = ledger_snapshot(task)

    response = api.client.put(
        f"{API}/tasks/{task.pk}/status",
        json.dumps({"agent_id": assigned.agent_id, "status": "failed", "error_message": "x"}),
        content_type="application/json",
        headers=headers,
    )

    assert response.status_code == 403
    assert response.json()["field"] == "agent_secret"
    assert ledger_snapshot(task) == before


@pytest.mark.parametrize(
    ("missing", "field"), [("X-Agent-Id", "agent_id"), ("X-Agent-Secret", "agent_secret")]
)
def test_reading_a_task_needs_the_agent_id_and_secret_headers(
    api: Caller, missing: str, field: str
) -> None:
    task, agent = running_plan(api)

    response = api.client.get(
        f"{API}/tasks/{task.pk}", headers=_without(api.headers_as(agent), missing)
    )

    assert response.status_code == 403
    assert response.json()["field"] == field
    assert missing in response.json()["detail"]


def test_reading_a_task_with_a_wrong_agent_secret_is_forbidden(api: Caller) -> None:
    task, agent = running_plan(api)

    response = api.get(f"/tasks/{task.pk}", as_agent=agent, agent_secret="ags_" + "0" * 64)

    assert response.status_code == 403


def test_an_agent_without_a_stored_secret_is_refused_until_an_admin_retires_it(
    api: Caller,
) -> None:
    agent = api.agent("P1")
    # A row from before agent secrets existed: the migration leaves its secret_hash empty.
    Agent.objects.filter(pk=agent.pk).update(secret_hash="")

    refused = api.post(f"/{agent.agent_id}/heartbeat", {}, as_agent=agent)
    taken = api.post("/register", {"name": "P1"})
    call_command("agent_retire", pool=api.pool.pool_id, name="P1", reason="lost its secret")
    again = api.post("/register", {"name": "P1"}).json()
    accepted = api.post(
        f"/{again['agent_id']}/heartbeat",
        {},
        as_agent=Agent.objects.get(pk=again["agent_id"]),
        agent_secret=again["agent_secret"],
    )

    assert (refused.status_code, refused.json()["field"]) == (403, "agent_secret")
    assert (taken.status_code, taken.json()["field"]) == (409, "name")
    assert again["agent_id"] != agent.agent_id
    assert accepted.status_code == 200
    assert Pod.objects.get(pool=api.pool, name="P1").agent_id == again["agent_id"]


def test_agents_with_the_same_name_register_in_two_static_pools(
    api: Caller, other_api: Caller
) -> None:
    mine = api.post("/register", {"name": "agent-1"})
    theirs = other_api.post("/register", {"name": "agent-1"})

    assert (mine.status_code, theirs.status_code) == (200, 200)
    assert mine.json()["agent_id"] != theirs.json()["agent_id"]
    pods = {pod.pool_id: pod for pod in Pod.objects.filter(name="agent-1")}
    assert set(pods) == {api.pool.pool_id, other_api.pool.pool_id}
    assert pods[api.pool.pool_id].agent_id == mine.json()["agent_id"]
    assert pods[other_api.pool.pool_id].agent_id == theirs.json()["agent_id"]


# --- heartbeat ---------------------------------------------------------------------------------


def test_a_heartbeat_records_liveness_and_answers_with_the_dispatched_work(
    api: Caller, pool: AgentPool
) -> None:
    agent = api.agent("P1")
    registered_at = agent.last_ping_at
    assert registered_at is not None
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    clock.advance(5)

    response = api.post(
        f"/{agent.agent_id}/heartbeat",
        {"running_task_ids": [], "cpu": 0.5, "memory": 512},
        as_agent=agent,
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
    agent = api.agent("P1")

    response = api.post(
        f"/{agent.agent_id}/heartbeat", {"running_task_ids": [424242]}, as_agent=agent
    )

    assert response.status_code == 200
    assert [c["task_id"] for c in response.json()["cancellations"]] == [424242]


def test_a_heartbeat_for_an_agent_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller
) -> None:
    stranger = other_api.agent("Q1")
    before = Agent.objects.filter(pk=stranger.pk).values().get()

    # Even with the stranger's own secret: a token only reaches its own pool.
    response = api.post(
        f"/{stranger.agent_id}/heartbeat",
        {"running_task_ids": []},
        as_agent=stranger,
        agent_secret=other_api.agent_secrets[stranger.agent_id],
    )

    assert response.status_code == 403
    assert Agent.objects.filter(pk=stranger.pk).values().get() == before


def test_a_heartbeat_for_an_unknown_agent_is_not_found(api: Caller) -> None:
    response = api.client.post(
        f"{API}/agent-doesnotexist000/heartbeat",
        json.dumps({"running_task_ids": []}),
        content_type="application/json",
        headers={**api.headers, "X-Agent-Secret": "ags_" + "0" * 64},
    )

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
    agent = api.agent("P1")
    before = Agent.objects.filter(pk=agent.pk).values().get()
    clock.advance(5)

    response = api.post(f"/{agent.agent_id}/heartbeat", body, as_agent=agent)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert Agent.objects.filter(pk=agent.pk).values().get() == before


def test_heartbeat_refuses_get(api: Caller, pool: AgentPool) -> None:
    agent = api.agent("P1")

    assert api.get(f"/{agent.agent_id}/heartbeat", as_agent=agent).status_code == 405


# --- accept ------------------------------------------------------------------------------------


def test_the_assigned_agent_accepts_its_dispatch(api: Caller, pool: AgentPool) -> None:
    agent = api.agent("P1")
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id}, as_agent=agent)

    assert response.status_code == 200
    assert response.json()["status"] == "running"
    assert refresh(task).acked_at is not None
    heartbeat = api.post(
        f"/{agent.agent_id}/heartbeat", {"running_task_ids": [task.pk]}, as_agent=agent
    )
    assert heartbeat.json() == {"assignments": [], "cancellations": []}


def test_accepting_a_task_assigned_to_another_agent_is_forbidden_and_writes_nothing(
    api: Caller, pool: AgentPool
) -> None:
    api.agent("P1")
    task = submit(make_workspace(pool), "plan")
    task_dispatch(task_id=task.pk)
    other = api.agent("P2")
    before = ledger_snapshot(task)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": other.agent_id}, as_agent=other)

    assert response.status_code == 403
    assert ledger_snapshot(task) == before


def test_accepting_a_task_that_was_never_dispatched_is_a_conflict(
    api: Caller, pool: AgentPool
) -> None:
    agent = api.agent("P1")
    task = submit(make_workspace(pool), "plan")
    before = ledger_snapshot(task)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id}, as_agent=agent)

    assert response.status_code == 409
    assert ledger_snapshot(task) == before


def test_accepting_a_task_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller, pool: AgentPool
) -> None:
    mine = api.agent("P1")
    task, _ = running_plan(other_api, "Q1")

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": mine.agent_id}, as_agent=mine)

    assert response.status_code == 403


def test_accepting_an_unknown_task_is_not_found(api: Caller, pool: AgentPool) -> None:
    agent = api.agent("P1")

    response = api.post("/tasks/999999/accept", {"agent_id": agent.agent_id}, as_agent=agent)

    assert response.status_code == 404


def test_accept_without_an_agent_id_names_the_field(api: Caller, pool: AgentPool) -> None:
    task, _ = running_plan(api)

    response = api.post(f"/tasks/{task.pk}/accept", {})

    assert response.status_code == 400
    assert response.json()["field"] == "agent_id"


def test_accept_refuses_put(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(api)

    response = api.put(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id}, as_agent=agent)

    assert response.status_code == 405


# --- status ------------------------------------------------------------------------------------


def test_the_assigned_agent_reports_a_plan_as_success_and_frees_its_slot(
    api: Caller, pool: AgentPool
) -> None:
    task, agent = running_plan(api)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "success"},
        as_agent=agent,
    )

    assert response.status_code == 200
    assert response.json()["status"] == "success"
    task = refresh(task)
    assert (task.status, task.stage) == (TaskStatus.SUCCESS, Stage.COMPLETED)
    assert task.completed_at is not None
    assert slot_states(pod_of(agent))[0] == ("idle", None)


def test_a_stage_report_updates_a_running_task(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(api)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "running", "stage": "planning"},
        as_agent=agent,
    )

    assert response.status_code == 200
    assert refresh(task).status == TaskStatus.RUNNING


def test_a_plan_and_apply_plan_with_changes_keeps_its_slot_reserved(
    api: Caller, pool: AgentPool
) -> None:
    agent = api.agent("P1")
    task = run(submit(make_workspace(pool), "plan_and_apply"))

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "apply_pending"},
        as_agent=agent,
    )

    assert response.status_code == 200
    assert refresh(task).status == TaskStatus.APPLY_PENDING
    assert slot_states(pod_of(agent))[0] == ("reserved", task.pk)


def test_a_failure_report_keeps_the_error_message(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(api)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "failed", "error_message": "provider crashed"},
        as_agent=agent,
    )

    assert response.status_code == 200
    task = refresh(task)
    assert (task.status, task.error_message) == (TaskStatus.FAILED, "provider crashed")


def test_an_apply_is_reported_applied(api: Caller, pool: AgentPool) -> None:
    agent = api.agent("P1")
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task_confirm_apply(task_id=task.pk, actor="user:alice")
    task_dispatch(task_id=task.pk)
    api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id}, as_agent=agent)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "applied"},
        as_agent=agent,
    )

    assert response.status_code == 200
    assert refresh(task).status == TaskStatus.APPLIED


def test_a_report_from_an_agent_the_task_is_not_assigned_to_is_forbidden_and_writes_nothing(
    api: Caller, pool: AgentPool
) -> None:
    task, _ = running_plan(api, "P1")
    other = api.agent("P2")
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status", {"agent_id": other.agent_id, "status": "failed"}, as_agent=other
    )

    assert response.status_code == 403
    assert ledger_snapshot(task) == before


def test_applied_during_planning_is_an_invalid_transition_and_writes_nothing(
    api: Caller, pool: AgentPool
) -> None:
    agent = api.agent("P1")
    task = run(submit(make_workspace(pool), "plan_and_apply"))
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": "applied"},
        as_agent=agent,
    )

    assert response.status_code == 409
    assert response.json()["error"] == "conflict"
    assert ledger_snapshot(task) == before


@pytest.mark.parametrize("status", ["success", "failed", "running", "apply_pending"])
def test_writes_to_a_terminal_task_are_conflicts_and_write_nothing(
    api: Caller, pool: AgentPool, status: str
) -> None:
    task, agent = running_plan(api)
    task = finish(task, TaskStatus.SUCCESS)
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": agent.agent_id, "status": status, "stage": "planning"},
        as_agent=agent,
    )

    assert response.status_code == 409
    assert ledger_snapshot(task) == before


def test_accepting_a_terminal_task_is_a_conflict(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(api)
    finish(task, TaskStatus.SUCCESS)

    response = api.post(f"/tasks/{task.pk}/accept", {"agent_id": agent.agent_id}, as_agent=agent)

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
    task, agent = running_plan(api)
    body = {k: agent.agent_id if v == "AGENT" else v for k, v in body.items()}
    before = ledger_snapshot(task)

    response = api.put(f"/tasks/{task.pk}/status", body, as_agent=agent)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert ledger_snapshot(task) == before


def test_a_status_report_with_malformed_json_names_the_body(api: Caller, pool: AgentPool) -> None:
    task, _ = running_plan(api)
    before = ledger_snapshot(task)

    response = api.raw("put", f"/tasks/{task.pk}/status", '{"status": "success"')

    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert ledger_snapshot(task) == before


def test_a_status_report_on_a_task_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller
) -> None:
    task, stranger = running_plan(other_api, "Q1")
    before = ledger_snapshot(task)

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": stranger.agent_id, "status": "success"},
        as_agent=stranger,
        agent_secret=other_api.agent_secrets[stranger.agent_id],
    )

    assert response.status_code == 403
    assert ledger_snapshot(task) == before


def test_a_status_report_naming_an_agent_of_another_pool_is_forbidden(
    api: Caller, other_api: Caller, pool: AgentPool
) -> None:
    task, _ = running_plan(api)
    stranger = other_api.agent("Q1")

    response = api.put(
        f"/tasks/{task.pk}/status",
        {"agent_id": stranger.agent_id, "status": "success"},
        as_agent=stranger,
        agent_secret=other_api.agent_secrets[stranger.agent_id],
    )

    assert response.status_code == 403


def test_status_refuses_post(api: Caller, pool: AgentPool) -> None:
    task, agent = running_plan(api)

    response = api.post(f"/tasks/{task.pk}/status", {"agent_id": agent.agent_id}, as_agent=agent)

    assert response.status_code == 405


def test_a_form_encoded_status_report_is_refused_as_a_body_that_is_not_json(
    api: Caller, pool: AgentPool
) -> None:
    task, agent = running_plan(api)

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
    task, agent = running_plan(api)

    response = api.get(f"/tasks/{task.pk}", as_agent=agent)

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
    mine = api.agent("P1")
    task, _ = running_plan(other_api, "Q1")

    assert api.get(f"/tasks/{task.pk}", as_agent=mine).status_code == 403


def test_reading_an_unknown_task_is_not_found(api: Caller) -> None:
    agent = api.agent("P1")

    assert api.get("/tasks/999999", as_agent=agent).status_code == 404


def test_reading_a_task_without_a_token_is_unauthenticated(client: Client, api: Caller) -> None:
    task, agent = running_plan(api)
    agent_only = {k: v for k, v in api.headers_as(agent).items() if k != "Authorization"}

    assert client.get(f"{API}/tasks/{task.pk}", headers=agent_only).status_code == 401


def test_task_detail_refuses_delete(api: Caller, pool: AgentPool) -> None:
    task, _ = running_plan(api)

    response = api.client.delete(f"{API}/tasks/{task.pk}", headers=api.headers)

    assert response.status_code == 405


# --- wrong methods and unknown URLs: JSON like every other answer --------------------------------


@pytest.mark.parametrize(
    ("wrong", "path", "allowed"),
    [
        ("GET", "/register", "POST"),
        ("PUT", "/{agent}/heartbeat", "POST"),
        ("POST", "/tasks/{task}", "GET"),
        ("DELETE", "/tasks/{task}", "GET"),
        ("GET", "/tasks/{task}/accept", "POST"),
        ("POST", "/tasks/{task}/status", "PUT"),
    ],
)
def test_a_wrong_method_is_a_json_405_naming_the_allowed_one_and_never_a_csrf_403(
    api: Caller, wrong: str, path: str, allowed: str
) -> None:
    task, agent = running_plan(api)
    # A browser-like client: CSRF is enforced, as it is for a real agent.
    strict = Client(enforce_csrf_checks=True)
    url = API + path.format(agent=agent.agent_id, task=task.pk)

    response = strict.generic(wrong, url, "{}", "application/json", headers=api.headers_as(agent))

    assert response.status_code == 405
    assert response["Allow"] == allowed
    assert response.json() == {
        "error": "method_not_allowed",
        "detail": f"{wrong} is not allowed here; use {allowed}",
    }
