"""Database connections under load and failure (issue 8): one bounded pool per process, 503
when it is exhausted, and one retry on a fresh connection when a backend dies under a request
that is safe to run twice (lib/db.py).

The first half drives the middleware with small views that fail the way Django fails (both
databases); the second half does it for real on PostgreSQL: a pool of one connection held
elsewhere, backends terminated with `pg_terminate_backend` from a second connection, and the
backends that serve many concurrent requests counted.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError, connection, connections
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from psycopg_pool import ConnectionPool, PoolTimeout

from poolsadmin.agents.models import Agent
from poolsadmin.lib import clock
from poolsadmin.lib.db import RETRY_AFTER_SECONDS
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_token_create
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import WorkspaceTask
from tests.backends import backend_killed_at_first_query
from tests.ledger import ADMIN, make_agent_with_secret, make_pool, make_workspace, submit

# --- the middleware, with views that fail as Django does (SQLite and PostgreSQL) ---------------


def _pool_timeout() -> OperationalError:
    """What Django raises when the pool has no connection in time: its OperationalError,
    from psycopg_pool's PoolTimeout."""
    try:
        raise OperationalError("couldn't get a connection") from PoolTimeout(
            "couldn't get a connection after 10.00 sec"
        )
    except OperationalError as error:
        return error


def busy(request: HttpRequest) -> HttpResponse:
    raise _pool_timeout()


@dataclass
class Flaky:
    """A view that loses its connection the first `failures` times it runs. A lost connection
    is what Django leaves behind a killed backend: the connection dropped (a failed rollback
    closes it) and an OperationalError."""

    failures: int = 1
    lost: bool = True
    runs: int = 0

    def __call__(self, request: HttpRequest) -> HttpResponse:
        self.runs += 1
        Agent.objects.count()  # a real query on a real connection
        if self.runs <= self.failures:
            if self.lost:
                connection.close()
            raise OperationalError("server closed the connection unexpectedly")
        return HttpResponse(f"ran {self.runs} times")


flaky = Flaky()

urlpatterns = [
    path("api/busy", busy),
    path("busy", busy),
    path("flaky", csrf_exempt(flaky), name="flaky"),
]


@pytest.fixture
def flaky_view() -> Iterator[Flaky]:
    flaky.failures, flaky.lost, flaky.runs = 1, True, 0
    yield flaky


def db_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "poolsadmin.db"]


@pytest.mark.urls(__name__)
def test_an_exhausted_pool_answers_the_api_with_a_json_503_and_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = Client().post("/api/busy")

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response.json()["error"] == "unavailable"
    [record] = db_log(caplog)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "pool" in record.getMessage()


@pytest.mark.urls(__name__)
def test_an_exhausted_pool_answers_a_page_with_a_503_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = Client().get("/busy")

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response["Content-Type"].startswith("text/plain")
    assert [r for r in caplog.records if r.exc_info] == []  # logged, without a traceback


@pytest.mark.urls(__name__)
@pytest.mark.django_db(transaction=True)
def test_a_get_that_lost_its_connection_runs_once_more_on_a_fresh_one(flaky_view: Flaky) -> None:
    response = Client().get("/flaky")

    assert response.status_code == 200
    assert response.content == b"ran 2 times"


@pytest.mark.urls(__name__)
@pytest.mark.django_db(transaction=True)
def test_a_post_that_lost_its_connection_is_not_run_again_and_answers_503(
    flaky_view: Flaky, caplog: pytest.LogCaptureFixture
) -> None:
    response = Client().post("/flaky")

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert flaky_view.runs == 1
    assert [r.levelno for r in db_log(caplog)] == [logging.ERROR]


@pytest.mark.urls(__name__)
@pytest.mark.django_db(transaction=True)
def test_a_post_named_retry_safe_is_run_once_more_like_a_get(
    flaky_view: Flaky, settings: Any
) -> None:
    settings.POOLSADMIN_RETRY_SAFE_URL_NAMES = ("flaky",)

    response = Client().post("/flaky")

    assert (response.status_code, flaky_view.runs) == (200, 2)


@pytest.mark.urls(__name__)
@pytest.mark.django_db(transaction=True)
def test_a_get_that_loses_its_connection_twice_is_retried_only_once_and_answers_503(
    flaky_view: Flaky,
) -> None:
    flaky_view.failures = 2

    response = Client().get("/flaky")

    assert (response.status_code, flaky_view.runs) == (503, 2)


@pytest.mark.urls(__name__)
@pytest.mark.django_db(transaction=True)
def test_an_operational_error_on_a_live_connection_is_not_taken_for_a_lost_one(
    flaky_view: Flaky,
) -> None:
    """A locked SQLite database, a statement timeout: the connection is fine, nothing is
    retried, and the error stays the error it is."""
    flaky_view.lost = False

    with pytest.raises(OperationalError):
        Client().get("/flaky")
    assert flaky_view.runs == 1


# --- for real, on PostgreSQL --------------------------------------------------------------------


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

    def accept(self, task: WorkspaceTask) -> Any:
        return self.post(f"tasks/{task.pk}/accept", {"agent_id": self.agent.agent_id})


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
def test_a_heartbeat_whose_backend_is_killed_is_answered_from_a_fresh_connection(
    agent: AgentCall, caplog: pytest.LogCaptureFixture
) -> None:
    beat_at = clock.now().replace(microsecond=0) + timedelta(hours=1)

    with clock.frozen_at(beat_at), backend_killed_at_first_query() as kill:
        response = agent.heartbeat()

    assert len(kill.killed) == 1
    assert response.status_code == 200, response.content
    assert response.json() == {"assignments": [], "cancellations": []}
    agent.agent.refresh_from_db()
    assert agent.agent.last_ping_at == beat_at
    assert any("retrying once" in r.getMessage() for r in db_log(caplog))


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_dashboard_page_whose_backend_is_killed_is_answered_from_a_fresh_connection(
    admin_client: Client,
) -> None:
    with backend_killed_at_first_query() as kill:
        response = admin_client.get("/pools/")

    assert len(kill.killed) == 1
    assert response.status_code == 200


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_an_accept_whose_backend_is_killed_answers_503_is_not_retried_and_writes_nothing(
    agent: AgentCall,
) -> None:
    task = submit(make_workspace(agent.pool), "plan")
    assert task_dispatch(task_id=task.pk).dispatched

    with backend_killed_at_first_query() as kill:
        response = agent.accept(task)

    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
    assert kill.queries == 1  # the one that met the dead backend: no second attempt
    task.refresh_from_db()
    assert task.acked_at is None


@pytest.fixture
def pool_of_one() -> Iterator[ConnectionPool]:
    """This process's pool, shrunk to one connection and a one-second wait for it."""
    conn = connections["default"]
    options = conn.settings_dict["OPTIONS"]
    saved = options["pool"]
    conn.close()
    conn.close_pool()  # type: ignore[attr-defined]
    options["pool"] = {**saved, "min_size": 1, "max_size": 1, "timeout": 1}
    conn.ensure_connection()  # Django opens the pool at its first connection
    conn.close()
    yield conn.pool  # type: ignore[attr-defined]
    conn.close()
    conn.close_pool()  # type: ignore[attr-defined]
    options["pool"] = saved


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_request_that_gets_no_connection_in_time_answers_503_with_retry_after(
    agent: AgentCall, pool_of_one: ConnectionPool
) -> None:
    held = pool_of_one.getconn()  # the only connection the pool has
    try:
        response = agent.heartbeat()
    finally:
        pool_of_one.putconn(held)

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response.json()["error"] == "unavailable"
    # The pool recovers as soon as a connection is back.
    assert agent.heartbeat().status_code == 200


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
