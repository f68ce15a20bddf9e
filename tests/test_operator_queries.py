"""The three queries operators run by hand (SPEC 2) must run unmodified and answer correctly."""

from __future__ import annotations

import pytest
from django.db import connection

from poolsadmin.lib import clock
from poolsadmin.tasks.models import TaskStatus
from tests.conftest import IS_POSTGRES
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, run, submit

pytestmark = pytest.mark.django_db

AGENTS_SQLITE = """
SELECT agent_id, agent_name, pool_id, last_ping_at,
       CASE WHEN last_ping_at > datetime('now', '-2 minutes') THEN 'online' ELSE 'offline' END as status
FROM agents WHERE pool_id = 'pool-z73eh8ihywlmgx0x';
"""
AGENTS_POSTGRES = """
SELECT agent_id, agent_name, pool_id, last_ping_at,
       CASE WHEN last_ping_at > now() - interval '2 minutes' THEN 'online' ELSE 'offline' END as status
FROM agents WHERE pool_id = 'pool-z73eh8ihywlmgx0x';
"""
TASK_598 = """
SELECT id, workspace_id, task_type, status, stage, agent_id, created_at, started_at, completed_at
FROM workspace_tasks WHERE id = 598;
"""
WORKSPACE_TASKS = """
SELECT id, task_type, status, stage, agent_id FROM workspace_tasks
WHERE workspace_id = 'ws-mb7m9ii5ey' ORDER BY id;
"""


def _rows(sql: str) -> list[tuple[object, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql.strip().rstrip(";"))
        return list(cursor.fetchall())


def _incident_ledger() -> dict[str, object]:
    pool = make_pool(pool_id="pool-z73eh8ihywlmgx0x", name="prod")
    clock.advance(-600)  # this agent's last heartbeat is ten minutes old
    stale = make_agent(pool, "agent-pod-stale")
    clock.reset()
    fresh = make_agent(pool, "agent-pod-fresh")
    other_pool = make_pool(name="other")
    make_agent(other_pool, "agent-elsewhere")
    ws = make_workspace(pool, "incident", workspace_id="ws-mb7m9ii5ey")
    return {"pool": pool, "stale": stale, "fresh": fresh, "ws": ws}


@pytest.mark.sqlite_only
def test_agents_query_runs_unmodified_on_sqlite_and_tells_online_from_offline() -> None:
    ledger = _incident_ledger()
    rows = _rows(AGENTS_SQLITE)
    by_name = {row[1]: row for row in rows}
    assert set(by_name) == {"agent-pod-stale", "agent-pod-fresh"}
    assert by_name["agent-pod-fresh"][0] == ledger["fresh"].agent_id  # type: ignore[attr-defined]
    assert by_name["agent-pod-fresh"][2] == "pool-z73eh8ihywlmgx0x"
    assert by_name["agent-pod-fresh"][4] == "online"
    assert by_name["agent-pod-stale"][4] == "offline"


@pytest.mark.postgres_only
def test_agents_query_in_its_postgres_form_tells_online_from_offline() -> None:
    _incident_ledger()
    by_name = {row[1]: row for row in _rows(AGENTS_POSTGRES)}
    assert by_name["agent-pod-fresh"][4] == "online"
    assert by_name["agent-pod-stale"][4] == "offline"


def test_task_queries_return_human_ids_and_the_incident_state() -> None:
    assert IS_POSTGRES or connection.vendor == "sqlite"
    ledger = _incident_ledger()
    ws = ledger["ws"]
    if IS_POSTGRES:
        # A sequence is not rolled back with the test's transaction: earlier tests (the demo
        # seed among them) may have moved it past 598. Start below it so `first` comes first.
        with connection.cursor() as cursor:
            cursor.execute("SELECT setval(pg_get_serial_sequence('workspace_tasks','id'), 500)")
    first = run(submit(ws, "plan"))  # type: ignore[arg-type]
    with connection.cursor() as cursor:
        # Operators know the incident as task 598; make the next id 598 on either database.
        if IS_POSTGRES:
            cursor.execute("SELECT setval(pg_get_serial_sequence('workspace_tasks','id'), 597)")
        else:
            cursor.execute("UPDATE sqlite_sequence SET seq = 597 WHERE name = 'workspace_tasks'")
    incident = plan_with_changes(submit(ws, "plan_and_apply"))  # type: ignore[arg-type]
    assert incident.pk == 598

    (row,) = _rows(TASK_598)
    assert row[0] == 598
    assert row[1:6] == (
        "ws-mb7m9ii5ey",
        "plan_and_apply",
        TaskStatus.APPLY_PENDING,
        "apply_pending",
        ledger["fresh"].agent_id,  # type: ignore[attr-defined]
    )
    assert row[6] is not None and row[7] is not None and row[8] is None

    rows = _rows(WORKSPACE_TASKS)
    # On PostgreSQL earlier tests may have advanced the sequence past 598.
    assert [r[0] for r in rows] == sorted([first.pk, 598])
    plan_row = next(r for r in rows if r[0] == first.pk)
    assert plan_row[1:4] == ("plan", "running", "planning")
    assert str(plan_row[4]).startswith("agent-")
