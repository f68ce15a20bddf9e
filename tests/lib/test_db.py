"""Database connections under load (issue 8): one bounded pool of connections per process,
on PostgreSQL, where under ASGI every request runs in a thread of its own."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections
from django.test import Client

from poolsadmin.agents.models import Agent
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_token_create
from tests.ledger import ADMIN, make_agent_with_secret, make_pool


@dataclass
class AgentCall:
    pool: AgentPool
    token: str
    agent: Agent
    agent_secret: str

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return Client().post(
            f"/api/v1/agents/{path}",
            json.dumps(body),
            content_type="application/json",
            headers={"Authorization": f"Bearer {self.token}", "X-Agent-Secret": self.agent_secret},
        )

    def heartbeat(self) -> Any:
        return self.post(f"{self.agent.agent_id}/heartbeat", {"running_task_ids": []})


def agent_call(pool: AgentPool, token: str, name: str) -> AgentCall:
    registration = make_agent_with_secret(pool, name)
    return AgentCall(pool, token, registration.agent, registration.secret)


@pytest.fixture
def agent() -> AgentCall:
    pool = make_pool(name="conn")
    token = pool_token_create(pool=pool, name="agents", actor=ADMIN).secret
    return agent_call(pool, token, "P1")


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_four_times_as_many_concurrent_heartbeats_as_the_pool_holds_use_no_more_backends(
    agent: AgentCall,
) -> None:
    """Without the pool each request thread opened a connection of its own (and, with
    persistent connections, kept it): here every backend that served a query is counted."""
    limit = settings.DATABASE_POOL_MAX_SIZE
    callers = [agent] + [agent_call(agent.pool, agent.token, f"P{i}") for i in range(2, 4 * limit)]
    statuses: list[int] = []
    backends: set[int] = set()
    start = threading.Barrier(len(callers))

    def record_backend(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        backends.add(context["connection"].connection.info.backend_pid)
        return execute(sql, params, many, context)

    def beat(call: AgentCall) -> None:
        try:
            with connection.execute_wrapper(record_backend):
                start.wait()
                for _ in range(3):
                    statuses.append(call.heartbeat().status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=beat, args=(call,)) for call in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * (3 * len(callers))
    assert 0 < len(backends) <= limit
