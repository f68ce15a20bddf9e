"""Benchmark: the pool page, its live partial and the JSON pool detail at 100 and 1,000 pods.

    .venv/bin/python bench/pool_page.py [--pods 100,1000] [--rounds 5] [--no-record] [--smoke]

For each size, builds a static pool through the services in a throwaway SQLite database (or
the one in DATABASE_URL, which must be a scratch database: the script migrates it): N agents
register (a pod of 4 slots each), N tasks are dispatched and acknowledged (bin-packed, so the
first quarter of the pods is full: a quarter of the slots run), N/100 plan_and_apply plans
are left holding reserved slots (the founding incident, task 598's shape), N/100 pods are
drained, N/100 agents are offline, and 10 drift checks wait in the queue. Then, logged in as
an admin, it GETs through the Django test client (server time: the request through the whole
middleware stack, no network) `rounds` times each:

* the pool page, `/pools/<pool_id>/`;
* its live partial, the same URL with `HX-Request` (what a poll gets; the WebSocket pushes the
  same regions);
* the JSON pool detail, `/api/v1/pools/<pool_id>` (every pod, the old shape), and one page of
  it (`?pods_limit=100`).

It prints queries, size and the median server time of each, and appends one row per figure
to docs/benchmarks.md (`--no-record` does not). The goal (issue 9): page and partial under
300 ms and 300 KB at 1,000 pods, the JSON detail under 300 ms. `--smoke` runs 4 and 20 pods,
one round, and records nothing, so the script cannot rot (`make bench-smoke`). A benchmark
prints figures; it asserts nothing about time (the machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import append_results, machine  # noqa: E402

GOAL_MS = 300
GOAL_KB = 300
TITLE = "pool page, live partial and JSON pool detail"


@dataclass(frozen=True)
class Figure:
    what: str
    pods: int
    queries: int
    size: int  # bytes
    ms: float  # median server time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="100,1000", help="pool sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not touch benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round, no record")
    args = parser.parse_args()
    sizes = [4, 20] if args.smoke else [int(n) for n in args.pods.split(",")]
    rounds = 1 if args.smoke else args.rounds

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
    from poolsadmin.lib import clock
    from poolsadmin.pools.actions import pod_drain
    from poolsadmin.pools.models import Pod
    from poolsadmin.pools.services import pool_create
    from poolsadmin.scheduler.services import task_dispatch
    from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
    from poolsadmin.tasks.services import task_accept, task_report, task_submit, workspace_create

    setup_test_environment()
    call_command("migrate", verbosity=0)
    actor = "user:bench"

    def dispatched(task: WorkspaceTask) -> WorkspaceTask:
        outcome = task_dispatch(task_id=task.pk)
        assert outcome.dispatched, outcome
        task.refresh_from_db()
        assert task.agent is not None
        task_accept(task_id=task.pk, agent=task.agent)
        return task

    def build(pods: int) -> str:
        started = time.perf_counter()
        name = f"bench-{pods}"
        pool = pool_create(actor=actor, name=name, slots_per_pod=4)
        few = max(1, pods // 100)
        # Offline: registered an hour ago and silent since.
        with clock.frozen_at(clock.now() - timedelta(hours=1)):
            for i in range(few):
                agent_register(pool=pool, name=f"{name}-gone-{i:04d}", version="bench")
        for i in range(pods - few):
            agent_register(pool=pool, name=f"{name}-pod-{i:04d}", version="bench")
        # Reservations first: bin-packing then puts the running tasks on the same pods.
        for i in range(few):
            ws = workspace_create(name=f"{name}-apply-{i}", pool=pool, actor=actor)
            task = dispatched(task_submit(workspace=ws, task_type="plan_and_apply", actor=actor))
            assert task.agent is not None
            task_report(task_id=task.pk, agent=task.agent, status=TaskStatus.APPLY_PENDING)
        # A quarter of the slots running: each dispatch reads the pool (issue 9 item 1), so
        # more would make the build of 1,000 pods take many minutes.
        for i in range(pods):
            ws = workspace_create(name=f"{name}-ws-{i}", pool=pool, actor=actor)
            dispatched(task_submit(workspace=ws, task_type="plan", actor=actor))
        for pod in Pod.objects.filter(pool=pool, name__contains="-pod-").order_by("-id")[:few]:
            pod_drain(pod_id=pod.pk, actor=actor, reason="bench: node maintenance")
        for i in range(10):  # a queue to diagnose, as on a busy day
            ws = workspace_create(name=f"{name}-queued-{i}", pool=pool, actor=actor)
            task_submit(workspace=ws, task_type="drift_check", actor=actor)
        print(f"built {name}: {pods} pods in {time.perf_counter() - started:.1f} s")
        return pool.pool_id

    user = User.objects.create_superuser("bench", password="bench-password")
    client = Client()
    client.force_login(user)

    def measure(what: str, pods: int, url: str, headers: dict[str, str]) -> Figure:
        client.get(url, headers=headers)  # warm the template cache
        times = []
        for _ in range(rounds):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url, headers=headers)
                times.append(time.perf_counter() - started)
            assert response.status_code == 200, (url, response.status_code)
        return Figure(what, pods, len(queries), len(response.content), statistics.median(times))

    # One moment for the whole run: building 1,000 pods outlasts the heartbeat timeout, and the
    # ages on the page should not depend on how long the build took.
    run_moment = contextlib.ExitStack()
    run_moment.enter_context(clock.frozen_at(clock.now()))
    figures: list[Figure] = []
    for pods in sizes:
        pool_id = build(pods)
        page = f"/pools/{pool_id}/"
        api = f"/api/v1/pools/{pool_id}"
        figures += [
            measure("pool page", pods, page, {}),
            measure("live partial", pods, page, {"HX-Request": "true"}),
            measure("JSON detail, every pod", pods, api, {}),
            measure("JSON detail, ?pods_limit=100", pods, f"{api}?pods_limit=100", {}),
        ]

    print(f"{machine()}; load {os.getloadavg()[0]:.2f}; database: {connection.vendor}")
    print(f"rounds: {rounds}; median server time of each")
    rows: list[tuple[str, str, str, bool | None]] = []
    smallest = {f.what: f.queries for f in figures if f.pods == sizes[0]}
    for f in figures:
        kb = f.size / 1024
        print(
            f"{f.what:30s} {f.pods:5d} pods x 4 slots: {f.queries:3d} queries, "
            f"{kb:7.0f} KiB, {f.ms * 1000:6.0f} ms"
        )
        sized = f"{f.pods:,} pods x 4 slots"
        ms = f.ms * 1000
        rows.append((f"{f.what}, {sized}", f"{ms:.0f} ms", f"< {GOAL_MS} ms", ms < GOAL_MS))
        if not f.what.startswith("JSON"):
            small = f.size < GOAL_KB * 1000
            rows.append((f"{f.what}, {sized}", f"{kb:.0f} KiB", f"< {GOAL_KB} KB", small))
            same = f"as many as at {sizes[0]:,} pods ({smallest[f.what]})"
            flat = f.queries == smallest[f.what]
            rows.append((f"{f.what}, {sized}", f"{f.queries} queries", same, flat))
    if not (args.smoke or args.no_record):
        append_results(TITLE, rows, "python bench/pool_page.py " + " ".join(sys.argv[1:]))
        print(f"recorded {len(rows)} rows in docs/benchmarks.md")


if __name__ == "__main__":
    main()
