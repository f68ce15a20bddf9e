"""The demo's traffic keeps the pool alive without ever resolving the incident."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from poolsadmin.dashboard.management.commands.demo import (
    CONFIRM_AFTER,
    TRAFFIC_MAX_PENDING,
    traffic_step,
)
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    demo_seed,
)
from poolsadmin.lib import clock
from poolsadmin.tasks.models import TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_cancel
from tests.ledger import plan_with_changes, submit

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path
    return tmp_path


def test_traffic_confirms_other_applies_but_never_task_598() -> None:
    demo_seed()
    other = plan_with_changes(submit(Workspace.objects.get(name="observability"), "plan_and_apply"))
    clock.advance(CONFIRM_AFTER.total_seconds() + 1)

    done = traffic_step(rng=random.Random(1))

    assert f"confirmed the apply of #{other.pk}" in done
    other.refresh_from_db()
    assert other.apply_confirmed_by == "user:demo-traffic"
    incident = WorkspaceTask.objects.get(pk=INCIDENT_TASK_ID)
    assert (incident.status, incident.apply_confirmed_by) == (TaskStatus.APPLY_PENDING, "")


def test_traffic_stops_submitting_when_the_backlog_is_full() -> None:
    demo_seed()
    pending = WorkspaceTask.objects.filter(pool_id=DEMO_POOL_ID, status=TaskStatus.PENDING)
    assert pending.count() >= TRAFFIC_MAX_PENDING

    done = traffic_step(rng=random.Random(1))

    assert not [line for line in done if line.startswith("submitted")]


def test_traffic_submits_work_when_the_backlog_has_room() -> None:
    demo_seed()
    for task_id in WorkspaceTask.objects.filter(status=TaskStatus.PENDING).values_list(
        "id", flat=True
    ):
        task_cancel(task_id=task_id, actor="user:test")
    last_id = WorkspaceTask.objects.order_by("-id").values_list("id", flat=True)[0]

    done = traffic_step(rng=random.Random(1))

    submitted = WorkspaceTask.objects.filter(pk__gt=last_id)
    assert len([line for line in done if line.startswith("submitted")]) == submitted.count() > 0
    assert set(submitted.values_list("status", flat=True)) == {TaskStatus.PENDING}
