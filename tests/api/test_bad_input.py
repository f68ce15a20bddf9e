"""Bad input to the agent and admin APIs (issue 8, item 4): every refusal is a 400 that names
the field, never a 500, and a refused request writes nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client

from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, PoolStatus
from poolsadmin.pools.services import pool_token_create
from tests.ledger import ADMIN, make_agent_with_secret, make_pool

pytestmark = pytest.mark.django_db

AGENTS = "/api/v1/agents"


def post(client: Client, url: str, body: Any, **headers: str) -> Any:
    """`body` as JSON, or as it is when it is already text (to send what json.dumps cannot)."""
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(url, data, content_type="application/json", headers=headers)


@pytest.fixture
def pool() -> AgentPool:
    return make_pool(name="p1")


@pytest.fixture
def token(pool: AgentPool) -> dict[str, str]:
    """The pool token's header."""
    secret = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def agent(pool: AgentPool, token: dict[str, str]) -> tuple[Agent, dict[str, str]]:
    """A registered agent and the headers it sends (token, id, secret)."""
    registration = make_agent_with_secret(pool, "P1")
    headers = {**token, "X-Agent-Id": registration.agent.agent_id}
    return registration.agent, {**headers, "X-Agent-Secret": registration.secret}


def agent_row(agent: Agent) -> dict[str, Any]:
    return dict(Agent.objects.filter(pk=agent.pk).values().get())


# --- the body's keys -----------------------------------------------------------------------------


def test_an_empty_json_key_is_a_400_that_still_names_it(admin_client: Client) -> None:
    response = post(admin_client, "/api/v1/pools", {"name": "p", "": 1})

    assert response.status_code == 400
    assert response.json()["field"] == ""
    assert not AgentPool.objects.exists()


# --- text: NUL bytes and lone surrogates in JSON strings and keys -------------------------------


def test_a_nul_byte_in_an_agent_name_is_a_400_naming_name_and_registers_nothing(
    pool: AgentPool, token: dict[str, str]
) -> None:
    events = Event.objects.count()

    response = post(Client(), f"{AGENTS}/register", {"name": "P\x001"}, **token)

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_input",
        "detail": "name contains a NUL byte",
        "field": "name",
    }
    assert not Agent.objects.exists()
    assert Event.objects.count() == events


@pytest.mark.parametrize(
    ("body", "field"),
    [
        # Written out: the wire carries the escape, which json.dumps would write too.
        ('{"name": "P\\ud800"}', "name"),
        # register ignores keys it does not know, but not one that is not clean text.
        ({"name": "P1", "x\x00": 1}, "x\x00"),
        ({"name": "P1", "labels": [{"zone": "eu\x00"}]}, "labels"),
        ({"name": "P1", "labels": {"\x00": "eu"}}, "labels"),
    ],
    ids=["lone surrogate in a value", "NUL in a key", "NUL deep in a value", "NUL deep in a key"],
)
def test_unclean_text_anywhere_in_a_registration_is_a_400_naming_its_top_level_key(
    pool: AgentPool, token: dict[str, str], body: Any, field: str
) -> None:
    response = post(Client(), f"{AGENTS}/register", body, **token)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert not Agent.objects.exists()


def test_a_lone_surrogate_in_a_pool_name_is_a_400_naming_name(admin_client: Client) -> None:
    response = post(admin_client, "/api/v1/pools", '{"name": "blue \\udc00"}')

    assert response.status_code == 400
    assert response.json()["field"] == "name"
    assert not AgentPool.objects.exists()


# --- text in the URL and in the agent headers (lib/input.py InputCheckMiddleware) ---------------


def test_a_nul_byte_in_an_agent_id_is_a_400_naming_agent_id(
    agent: tuple[Agent, dict[str, str]],
) -> None:
    row, headers = agent
    before = agent_row(row)

    response = post(Client(), f"{AGENTS}/%00/heartbeat", {}, **headers)

    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_input",
        "detail": "agent_id contains a NUL byte",
        "field": "agent_id",
    }
    assert agent_row(row) == before


def test_a_nul_byte_in_a_pool_id_is_a_400_naming_pool_id_and_pauses_nothing(
    pool: AgentPool, admin_client: Client
) -> None:
    events = Event.objects.count()

    read = admin_client.get("/api/v1/pools/pool-%00")
    pause = post(admin_client, "/api/v1/pools/pool-%00/pause", {"reason": "maintenance"})

    assert (read.status_code, read.json()["field"]) == (400, "pool_id")
    assert (pause.status_code, pause.json()["field"]) == (400, "pool_id")
    assert Event.objects.count() == events


@pytest.mark.parametrize("header", ["X-Agent-Id", "X-Agent-Secret"])
def test_a_nul_byte_in_an_agent_header_is_a_400_naming_it(
    agent: tuple[Agent, dict[str, str]], header: str
) -> None:
    _, headers = agent
    headers[header] = headers[header] + "\x00"

    response = Client().get(f"{AGENTS}/tasks/1", headers=headers)

    field = {"X-Agent-Id": "agent_id", "X-Agent-Secret": "agent_secret"}[header]
    assert (response.status_code, response.json()["field"]) == (400, field)


# --- nesting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [9, 100_000], ids=["past the limit", "past json's recursion"])
def test_deeply_nested_json_is_a_400_naming_the_body_and_writes_nothing(
    agent: tuple[Agent, dict[str, str]], depth: int
) -> None:
    row, headers = agent
    before = agent_row(row)
    nested = "[" * depth + "]" * depth

    response = post(
        Client(), f"{AGENTS}/{row.agent_id}/heartbeat", f'{{"cpu": {nested}}}', **headers
    )

    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert agent_row(row) == before


# --- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpu",
    ["1" + "0" * 400, "NaN", "Infinity", "-Infinity", "1e999", "-0.5", "1e7"],
    ids=["huge integer", "NaN", "Infinity", "-Infinity", "overflowing float", "negative", "1e7"],
)
def test_a_cpu_figure_that_is_no_sane_number_is_a_400_naming_cpu_and_writes_nothing(
    agent: tuple[Agent, dict[str, str]], cpu: str
) -> None:
    row, headers = agent
    before = agent_row(row)

    response = post(Client(), f"{AGENTS}/{row.agent_id}/heartbeat", f'{{"cpu": {cpu}}}', **headers)

    assert (response.status_code, response.json()["field"]) == (400, "cpu")
    assert agent_row(row) == before


def test_a_memory_figure_past_its_bound_is_a_400_naming_memory(
    agent: tuple[Agent, dict[str, str]],
) -> None:
    row, headers = agent

    response = post(Client(), f"{AGENTS}/{row.agent_id}/heartbeat", {"memory": 1e300}, **headers)

    assert (response.status_code, response.json()["field"]) == (400, "memory")


@pytest.mark.parametrize(
    "ids",
    [[0], [-1], [2**63], [10**30], list(range(1, 1002))],
    ids=["zero", "negative", "past bigint", "huge", "1001 of them"],
)
def test_running_task_ids_that_cannot_be_task_ids_are_a_400_naming_the_list(
    agent: tuple[Agent, dict[str, str]], ids: list[int]
) -> None:
    row, headers = agent
    before = agent_row(row)

    response = post(
        Client(), f"{AGENTS}/{row.agent_id}/heartbeat", {"running_task_ids": ids}, **headers
    )

    assert (response.status_code, response.json()["field"]) == (400, "running_task_ids")
    assert agent_row(row) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"slots_per_pod": 200_000}, "slots_per_pod"),
        ({"slots_per_pod": 65}, "slots_per_pod"),
        ({"slots_per_pod": 2**31}, "slots_per_pod"),
        ({"plan_and_apply_per_pod": 2**31}, "plan_and_apply_per_pod"),
        ({"min_replicas": 3_000_000_000}, "min_replicas"),
        ({"max_replicas": 1001}, "max_replicas"),
        ({"pool_type": "k8s", "pod_image": "i", "max_replicas": 10**20}, "max_replicas"),
    ],
)
def test_a_pool_number_past_its_bound_is_a_400_naming_it_and_creates_no_pool(
    admin_client: Client, body: dict[str, Any], field: str
) -> None:
    response = post(admin_client, "/api/v1/pools", {"name": "big", **body})

    assert (response.status_code, response.json()["field"]) == (400, field)
    assert not AgentPool.objects.exists()


def test_a_pool_at_its_bounds_is_created(admin_client: Client) -> None:
    body = {"name": "big", "slots_per_pod": 64, "plan_and_apply_per_pod": 64}

    response = post(admin_client, "/api/v1/pools", {**body, "max_replicas": 1000})

    assert response.status_code == 201


# --- dates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "until",
    [
        "9999-12-31T23:59:59-05:00",  # year 10000 in UTC, as it is stored
        "0001-01-01T00:00:00+05:00",  # year 0 in UTC
        "9999-12-31T23:59:59Z",  # representable, but no pause lasts 8,000 years
        "10000-01-01T00:00:00Z",
    ],
)
def test_a_pause_until_past_a_year_from_now_or_past_year_9999_is_a_400_naming_until(
    admin_client: Client, pool: AgentPool, until: str
) -> None:
    events = Event.objects.count()

    response = post(
        admin_client, f"/api/v1/pools/{pool.pool_id}/pause", {"reason": "r", "until": until}
    )

    assert (response.status_code, response.json()["field"]) == (400, "until")
    pool.refresh_from_db()
    assert pool.status == PoolStatus.ACTIVE
    assert Event.objects.count() == events


def test_a_pause_until_some_months_ahead_is_accepted(admin_client: Client, pool: AgentPool) -> None:
    until = (clock.now() + timedelta(days=90)).isoformat()

    response = post(
        admin_client, f"/api/v1/pools/{pool.pool_id}/pause", {"reason": "r", "until": until}
    )

    assert response.status_code == 200
    pool.refresh_from_db()
    assert pool.status == PoolStatus.PAUSED


def test_a_hold_until_past_year_9999_is_a_400_naming_until(admin_client: Client) -> None:
    k8s = make_pool(name="k", pool_type="k8s", pod_image="img", max_replicas=3)
    body = {"reason": "r", "pods": 1, "until": "9999-12-31T23:59:59-05:00"}

    response = post(admin_client, f"/api/v1/pools/{k8s.pool_id}/hold", body)

    assert (response.status_code, response.json()["field"]) == (400, "until")
