"""Benchmark: the pool page with 2 pods and with 500 pods x 4 slots.

    .venv/bin/python bench/pool_page.py [--pods 500] [--rounds 5]

Builds two pools through the services (agents register, tasks are submitted, dispatched and
acknowledged, one plan_and_apply is left reserved) in a throwaway SQLite database (or the one
in DATABASE_URL, which must be a scratch database: the script migrates it), then renders the
pool page (the full page, and the live regions a poll or the WebSocket gets) through the
Django test client, and prints queries, bytes and the median render time of each, with the
ratio of 500 pods to 2. A benchmark prints figures; it asserts nothing about time (the
machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--running", type=int, default=300, help="tasks running in the big pool")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="bench-pool-page-")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{scratch}/bench.sqlite3")
    os.environ["POOLSADMIN_VAR_DIR"] = scratch
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "poolsadmin.settings")
    os.environ.setdefault("DEBUG", "true")  # a scratch database with the test client
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, setup_test_environment

    from poolsadmin.agents.services import agent_register
    from poolsadmin.pools.services import pool_create
    from poolsadmin.scheduler.services import task_dispatch
    from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
    from poolsadmin.tasks.services import task_accept, task_report, task_submit, workspace_create

    setup_test_environment()
    call_command("migrate", verbosity=0)
    actor = "user:bench"

    def build(name: str, pods: int, running: int) -> str:
        started = time.perf_counter()
        pool = pool_create(actor=actor, name=name, slots_per_pod=4)
        for i in range(pods):
            agent_register(pool=pool, name=f"{name}-pod-{i:03d}", version="bench")
        for i in range(running):
            ws = workspace_create(name=f"{name}-ws-{i}", pool=pool, actor=actor)
            task = task_submit(workspace=ws, task_type="plan", actor=actor)
            outcome = task_dispatch(task_id=task.pk)
            assert outcome.dispatched, outcome
            task.refresh_from_db()
            assert task.agent is not None
            task_accept(task_id=task.pk, agent=task.agent)
        # The founding incident: a planned apply holding its reserved slot.
        ws = workspace_create(name=f"{name}-incident", pool=pool, actor=actor)
        task = task_submit(workspace=ws, task_type="plan_and_apply", actor=actor)
        assert task_dispatch(task_id=task.pk).dispatched
        agent = WorkspaceTask.objects.get(pk=task.pk).agent
        assert agent is not None
        task_accept(task_id=task.pk, agent=agent)
        task_report(task_id=task.pk, agent=agent, status=TaskStatus.APPLY_PENDING)
        for i in range(10):  # a queue to diagnose, as on a busy day
            ws = workspace_create(name=f"{name}-queued-{i}", pool=pool, actor=actor)
            task_submit(workspace=ws, task_type="drift_check", actor=actor)
        print(
            f"built {name}: {pods} pods, {running} running in {time.perf_counter() - started:.1f} s"
        )
        return pool.pool_id

    user = User.objects.create_superuser("bench", password="bench-password")
    client = Client()
    client.force_login(user)

    def measure(pool_id: str, htmx: bool) -> tuple[int, int, float]:
        headers = {"HX-Request": "true"} if htmx else {}
        url = f"/pools/{pool_id}/"
        client.get(url, headers=headers)  # warm the template cache
        times = []
        for _ in range(args.rounds):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url, headers=headers)
                times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code
        return len(queries), len(response.content), statistics.median(times)

    small = build("small", 2, 2)
    big = build("big", args.pods, min(args.running, args.pods * 4))
    print(f"database: {connection.vendor}; rounds: {args.rounds}; median of each")
    for htmx, what in ((False, "full page"), (True, "live regions")):
        q2, b2, t2 = measure(small, htmx)
        qn, bn, tn = measure(big, htmx)
        print(
            f"{what:13s} 2 pods: {q2} queries, {b2 / 1024:.0f} KiB, {t2 * 1000:.0f} ms | "
            f"{args.pods} pods x 4 slots: {qn} queries, {bn / 1024:.0f} KiB, {tn * 1000:.0f} ms | "
            f"time ratio {tn / t2:.1f}x, query ratio {qn / q2:.2f}"
        )


if __name__ == "__main__":
    main()
