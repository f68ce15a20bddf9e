"""The JSON pool detail of a big pool: a page of pods at a time, or chosen fields (issue 9)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from poolsadmin.api.serializers import POOL_DETAIL_FIELDS
from poolsadmin.pools.models import AgentPool
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, submit

pytestmark = pytest.mark.django_db

PODS = 7


@pytest.fixture
def pool() -> AgentPool:
    pool = make_pool()
    for i in range(PODS):
        make_agent(pool, f"pod-{i}")
    plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    return pool


def _get(client: Client, pool: AgentPool, query: str = "") -> dict[str, Any]:
    response = client.get(f"/api/v1/pools/{pool.pool_id}" + (f"?{query}" if query else ""))
    assert response.status_code == 200, response.content
    body: dict[str, Any] = response.json()
    return body


def test_without_parameters_the_detail_keeps_its_shape_with_every_pod(
    viewer_client: Client, pool: AgentPool
) -> None:
    body = _get(viewer_client, pool)
    assert list(body) == list(POOL_DETAIL_FIELDS)
    assert [p["name"] for p in body["pods"]] == [f"pod-{i}" for i in range(PODS)]
    assert body["pods_total"] == PODS
    assert "pods_page" not in body
    reserved = body["pods"][0]["slots"][0]
    assert (reserved["state"], reserved["task_type"]) == ("reserved", "plan_and_apply")
    assert reserved["task_status"] == "apply_pending"


def test_the_pods_come_a_page_at_a_time_until_there_is_no_next_page(
    viewer_client: Client, pool: AgentPool
) -> None:
    names, page = [], 1
    while page is not None:
        body = _get(viewer_client, pool, f"pods_limit=3&pods_page={page}")
        assert body["pods_total"] == PODS
        assert len(body["pods"]) <= 3
        names += [p["name"] for p in body["pods"]]
        assert body["pods_page"]["page"] == page
        page = body["pods_page"]["next_page"]
    assert names == [f"pod-{i}" for i in range(PODS)]


def test_fields_choose_the_keys_and_without_pods_no_pod_is_read(
    viewer_client: Client, pool: AgentPool
) -> None:
    with CaptureQueriesContext(connection) as queries:
        body = _get(viewer_client, pool, "fields=name,pods_total")
    assert body == {"name": pool.name, "pods_total": PODS}
    assert not any('"slots"' in q["sql"] for q in queries.captured_queries)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("pods_limit=0", "pods_limit"),
        ("pods_limit=1001", "pods_limit"),
        ("pods_limit=ten", "pods_limit"),
        ("pods_limit=5&pods_page=0", "pods_page"),
        ("pods_page=2", "pods_page"),
        ("fields=name,secrets", "fields"),
        ("fields=", "fields"),
    ],
)
def test_a_bad_page_or_field_is_a_json_400_naming_it(
    viewer_client: Client, pool: AgentPool, query: str, field: str
) -> None:
    response = viewer_client.get(f"/api/v1/pools/{pool.pool_id}?{query}")
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_a_page_costs_one_query_more_than_every_pod_its_count(
    viewer_client: Client, pool: AgentPool
) -> None:
    counts = []
    for query in ("", "pods_limit=2&pods_page=2"):
        with CaptureQueriesContext(connection) as queries:
            _get(viewer_client, pool, query)
        counts.append(len(queries))
    # A page adds the count of the pool's pods.
    assert counts[1] == counts[0] + 1
