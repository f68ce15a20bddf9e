"""Issue acceptance: "A worker killed with SIGKILL in the middle of a pass and restarted loses
nothing: the ledger check afterwards finds no drift, and no task is dispatched twice."

Real processes on a real SQLite file: `manage.py worker --only scheduler` dispatches a queue of
300 plans onto a static pool, is killed with SIGKILL while it dispatches, is started again with
`--once`, and a third process runs the ledger check as a dry run and counts dispatches.

SQLite only: the worker subprocesses need committed data in a database they can open, which
pytest-django's PostgreSQL test database (one transaction per test, or a flushed database
shared with the other tests) does not give cleanly; the dispatch path is the same code on both
databases, and its concurrency on PostgreSQL is covered by the I-W4 tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANAGE = [sys.executable, str(ROOT / "manage.py")]
TASKS = 300
AGENTS = 80  # 4 slots each: room for every task

SEED = f"""
from tests.ledger import make_agent, make_pool, make_workspace
from poolsadmin.tasks.services import task_submit
pool = make_pool(name="sigkill")
for i in range({AGENTS}):
    make_agent(pool, f"agent-{{i:03d}}")
workspaces = []
for i in range(10):
    workspaces.append(make_workspace(pool, f"ws-{{i}}"))
for i in range({TASKS}):
    task_submit(workspace=workspaces[i % 10], task_type="plan", actor="test")
"""

CHECK = """
import json
from collections import Counter
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool, Slot, SlotState
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.worker.reconcile import ledger_check
pool = AgentPool.objects.get(name="sigkill")
changes = ledger_check(pool=pool, dry_run=True)
dispatched = Counter(
    Event.objects.filter(kind="task.dispatched").values_list("task_id", flat=True)
)
running = list(WorkspaceTask.objects.filter(status=TaskStatus.RUNNING).values_list("id", flat=True))
slots = Counter(Slot.objects.exclude(state=SlotState.IDLE).values_list("task_id", flat=True))
print(json.dumps({
    "changes": [f"{c.kind} {c.target}: {c.reason}" for c in changes],
    "max_dispatches": max(dispatched.values(), default=0),
    "running": len(running),
    "running_slot_counts": sorted({slots.get(t, 0) for t in running}),
    "busy_slots": sum(slots.values()),
    "statuses": dict(Counter(WorkspaceTask.objects.values_list("status", flat=True))),
}))
"""


def _env(var_dir: Path) -> dict[str, str]:
    return {**os.environ, "POOLSADMIN_VAR_DIR": str(var_dir), "DATABASE_URL": ""}


def _shell(var_dir: Path, code: str) -> str:
    done = subprocess.run(
        [*MANAGE, "shell", "-c", code],
        env=_env(var_dir),
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    return done.stdout


def _running(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=0.1) as conn:
            row = conn.execute(
                "select count(*) from workspace_tasks where status = 'running'"
            ).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # locked by the worker's write: try again
        return 0


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated and seeded database file, copied for each round."""
    var_dir = tmp_path_factory.mktemp("sigkill-seed")
    subprocess.run([*MANAGE, "migrate", "-v0"], env=_env(var_dir), cwd=ROOT, check=True)
    _shell(var_dir, SEED)
    return var_dir / "poolsadmin.sqlite3"


@pytest.mark.sqlite_only
@pytest.mark.parametrize("round_", range(3))
def test_a_worker_killed_mid_pass_and_restarted_loses_nothing(
    seeded: Path, tmp_path: Path, round_: int
) -> None:
    shutil.copy(seeded, tmp_path / "poolsadmin.sqlite3")
    db = tmp_path / "poolsadmin.sqlite3"
    rng = random.Random(604 + round_)

    worker = subprocess.Popen(
        [*MANAGE, "worker", "--only", "scheduler"],
        env=_env(tmp_path),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while _running(db) == 0:  # wait until the pass is dispatching
            assert worker.poll() is None, "the worker died on its own"
            assert time.monotonic() < deadline, "the worker never dispatched"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    killed_at = _running(db)

    subprocess.run(
        [*MANAGE, "worker", "--once", "--only", "scheduler"],
        env=_env(tmp_path),
        cwd=ROOT,
        check=True,
        timeout=60,
        capture_output=True,
    )

    report = json.loads(_shell(tmp_path, CHECK).strip().splitlines()[-1])
    assert report["changes"] == [], report
    assert report["max_dispatches"] <= 1, report
    assert report["running_slot_counts"] in ([], [1]), report  # each running task: one slot
    assert report["busy_slots"] == report["running"], report
    # The restarted pass finished the queue the killed one left.
    assert report["running"] >= killed_at
    assert report["statuses"] == {"running": TASKS}, report
