"""What one heartbeat costs the database (issue 9, item 6: 1,000 agents heartbeating every 5 s
against one web process). The number of queries of a heartbeat, through the whole request
(token, agent secret, the heartbeat's transaction), must not grow with the pool's size, with
the work running on other agents, or with the tasks the agent itself runs."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from poolsadmin.agents.models import Agent
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_token_create
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_accept
from tests.fleet import fleet_build, tasks_queue
from tests.ledger import ADMIN, make_agent_with_secret, make_pool, make_workspace, run, submit

pytestmark = pytest.mark.django_db

# The token, the agent and its secret, the agent's conditional update, the agent's tasks; in
# a test, the transaction's savepoint and its release (on a server, BEGIN and COMMIT).
STEADY_HEARTBEAT_QUERIES = 6


def _heartbeat_queries(client: Client, *, token: str, agent: Agent, secret: str) -> list[str]:
    """The SQL of the second of two identical heartbeats: the steady state of an agent that
    heartbeats every few seconds (the first may bring it online and touch the token)."""
    running = list(
        WorkspaceTask.objects.filter(
            agent_id=agent.agent_id, status=TaskStatus.RUNNING
        ).values_list("id", flat=True)
    )
    body = json.dumps({"running_task_ids": running, "cpu": 0.5, "memory": 64})
    headers = {"Authorization": f"Bearer {token}", "X-Agent-Secret": secret}
    path = f"/api/v1/agents/{agent.agent_id}/heartbeat"
    first = client.post(path, body, content_type="application/json", headers=headers)
    assert first.status_code == 200
    with CaptureQueriesContext(connection) as queries:
        response = client.post(path, body, content_type="application/json", headers=headers)
    assert response.status_code == 200
    assert response.json()["cancellations"] == []
    return [query["sql"] for query in queries.captured_queries]


def _busy_pool(pods: int, *, prefix: str) -> tuple[AgentPool, str]:
    """A pool of `pods` online agents, work running on as many of them as there are pods, and
    its token."""
    fleet = fleet_build(pools=1, pods_per_pool=pods, workspaces=pods, prefix=prefix)
    pool = fleet.pools[0]
    tasks_queue(fleet, count=pods)
    scheduler_pass()
    for task in WorkspaceTask.objects.filter(pool=pool, status=TaskStatus.RUNNING):
        assert task.agent is not None
        task_accept(task_id=task.pk, agent=task.agent)
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    return pool, token


def test_a_heartbeat_costs_as_many_queries_in_a_pool_of_200_busy_pods_as_in_one_of_2(
    client: Client,
) -> None:
    counts = []
    for pods, prefix in ((2, "small"), (200, "big")):
        pool, token = _busy_pool(pods, prefix=prefix)
        registration = make_agent_with_secret(pool, f"{prefix}-newcomer")
        counts.append(
            len(
                _heartbeat_queries(
                    client, token=token, agent=registration.agent, secret=registration.secret
                )
            )
        )

    assert counts == [STEADY_HEARTBEAT_QUERIES, STEADY_HEARTBEAT_QUERIES]


def test_a_heartbeat_costs_as_many_queries_with_four_running_tasks_as_with_none(
    client: Client,
) -> None:
    pool = make_pool(name="p1")  # static: each agent is a pod of 4 slots
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    busy = make_agent_with_secret(pool, "P1")
    idle = make_agent_with_secret(pool, "P2")
    # Busiest pod first: all four plans fill P1.
    tasks = [run(submit(make_workspace(pool), "plan")) for _ in range(4)]
    assert {t.agent_id for t in tasks} == {busy.agent.agent_id}

    idle_count = len(_heartbeat_queries(client, token=token, agent=idle.agent, secret=idle.secret))
    busy_count = len(_heartbeat_queries(client, token=token, agent=busy.agent, secret=busy.secret))

    assert idle_count == busy_count == STEADY_HEARTBEAT_QUERIES


def test_a_heartbeat_reads_the_token_row_alone_not_its_pool(client: Client) -> None:
    # The pool's row is wide; the agent API needs only its id, which the token row has.
    pool = make_pool(name="p1")
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    registration = make_agent_with_secret(pool, "P1")

    queries = _heartbeat_queries(
        client, token=token, agent=registration.agent, secret=registration.secret
    )

    token_reads = [sql for sql in queries if 'FROM "pool_tokens"' in sql]
    assert len(token_reads) == 1
    assert "agent_pools" not in token_reads[0]
