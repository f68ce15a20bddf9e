"""docs/operations.md held against the code: its configuration table names exactly the
variables poolsadmin reads, and its runbook's SQL runs against the demo ledger and finds the
founding incident (task 598's reservation)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection

from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    INCIDENT_WORKSPACE_ID,
)
from poolsadmin.tasks.models import TaskStatus
from tests import test_operator_queries as operator_queries
from tests.conftest import IS_POSTGRES
from tests.deploy.test_manifests import _settings_variables

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
# Commands that read variables of their own, through module constants (TOKEN_ENV = "...").
COMMAND_SOURCES = (ROOT / "poolsadmin" / "agents" / "management" / "commands" / "agent.py",)
ENGINE = "postgres" if IS_POSTGRES else "sqlite"
ENGINES = {"sqlite", "postgres"}


def _command_variables(source: Path) -> set[str]:
    """NAME of every os.environ.get(CONSTANT) whose CONSTANT is a module-level string."""
    tree = ast.parse(source.read_text())
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "environ"
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            names.add(constants[node.args[0].id])
    return names


def _documented_variables() -> set[str]:
    """The first column of the configuration reference's table."""
    section = DOC.read_text().split("## 2. Configuration reference", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", section, flags=re.MULTILINE))


def _sql_blocks() -> list[tuple[str, str]]:
    """(engine tag or "", SQL) of every ```sql block; `sql sqlite` / `sql postgres` mark one
    engine's form."""
    return [
        (tag.strip(), body)
        for tag, body in re.findall(r"^```sql([^\n]*)\n(.*?)^```", DOC.read_text(), re.M | re.S)
    ]


def _normal(sql: str) -> str:
    return " ".join(sql.split())


def test_the_configuration_reference_names_every_variable_the_code_reads_and_no_other() -> None:
    read = _settings_variables().union(*(_command_variables(s) for s in COMMAND_SOURCES))
    assert {"POOLSADMIN_AGENT_TOKEN", "POOLSADMIN_POD_UID"} <= read  # the parser finds them
    documented = _documented_variables()
    assert read - documented == set(), "read by the code, missing from docs/operations.md"
    assert documented - read == set(), "in docs/operations.md, read by no code"


def test_every_runbook_sql_block_runs_on_at_least_one_engine_and_both_are_covered() -> None:
    blocks = _sql_blocks()
    assert len(blocks) >= 8
    tags = {tag for tag, _ in blocks}
    assert tags <= ENGINES | {""}, f"unknown engine tags: {tags - ENGINES - {''}}"
    assert tags >= ENGINES  # the agents query in both of its forms


def test_the_doc_has_the_operators_queries_exactly_as_they_type_them() -> None:
    bodies = {_normal(body) for _, body in _sql_blocks()}
    for query in (
        operator_queries.AGENTS_SQLITE,
        operator_queries.AGENTS_POSTGRES,
        operator_queries.TASK_598,
        operator_queries.WORKSPACE_TASKS,
    ):
        assert _normal(query) in bodies


@pytest.fixture
def demo(settings, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path  # the demo writes its agent token file there
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115


def _run(sql: str) -> tuple[list[str], list[tuple[object, ...]]]:
    with connection.cursor() as cursor:
        cursor.execute(sql.strip().rstrip(";"))
        columns = [column[0] for column in cursor.description]
        return columns, list(cursor.fetchall())


@pytest.mark.django_db
@pytest.mark.usefixtures("demo")
def test_the_runbook_sql_runs_on_the_demo_ledger_and_finds_task_598s_reservation() -> None:
    results = {}
    for tag, body in _sql_blocks():
        if tag in ("", ENGINE):
            results[_normal(body)] = _run(body)

    (task,) = results[_normal(operator_queries.TASK_598)][1]
    assert (task[0], task[1], task[2], task[3]) == (
        INCIDENT_TASK_ID,
        INCIDENT_WORKSPACE_ID,
        "plan_and_apply",
        TaskStatus.APPLY_PENDING,
    )

    queries = operator_queries
    agents_query = queries.AGENTS_POSTGRES if IS_POSTGRES else queries.AGENTS_SQLITE
    agents = results[_normal(agents_query)][1]
    assert agents and {row[2] for row in agents} == {DEMO_POOL_ID}
    assert "online" in {row[4] for row in agents}

    # The incident query: the reserved slot of task 598, still apply_pending, with the
    # version a release must name.
    (incident,) = [
        dict(zip(columns, row, strict=True))
        for sql, (columns, rows) in results.items()
        if "s.state = 'reserved'" in sql
        for row in rows
    ]
    assert incident["task_id"] == INCIDENT_TASK_ID
    assert incident["state"] == "reserved"
    assert incident["task_status"] == TaskStatus.APPLY_PENDING
    assert incident["reserved_until"] is not None
    assert isinstance(incident["version"], int) and incident["version"] >= 1
