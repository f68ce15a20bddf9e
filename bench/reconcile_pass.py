"""Benchmark: one reconcile + autoscale pass over a k8s pool of 1,000 pods (issue 9, item 4).

    .venv/bin/python bench/reconcile_pass.py [--pods 1000] [--running 200] [--repeats 3]
        [--smoke] [--no-record]

Starts the fake Kubernetes API server (poolsadmin/kube/fake_api.py) and the real client over
HTTP against it, then builds the pool as the product would: --pods pods in the fake cluster
with the pool's labels, one reconcile pass adopts them into the ledger, each pod's agent
registers, and --running plans are dispatched and acknowledged (the autoscaler's demand). The
scale-down delay is an hour, so every pass finds the same pool and changes nothing: what is
timed is what a steady 1,000-pod pool costs the worker every few seconds.

Then it times --repeats passes (median, wall and CPU time: the process's, which includes the
fake API server's threads answering the listings, and the loops' own thread's, poolsadmin's
share) of the two cluster loops as the worker runs them
(worker/loops.py: `reconciler`, then `autoscaler`; each lists the pool's pods) and prints, per
pass, the time of each loop, the queries (CaptureQueriesContext) and the API calls (the fake
server's request log). A run appends one row per figure to docs/benchmarks.md (date, machine,
command, figure, goal, met or not); --smoke (a tiny pool, one repeat, for `.ci/run`) does not.

Database: SQLite in a temporary directory, or, when DATABASE_URL names a PostgreSQL server, a
scratch database of its own on that server (created, migrated, ANALYZEd after the build, and
dropped at the end). A benchmark prints figures; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import append_results, drop, machine, recreate, url_for  # noqa: E402

GOAL_SECONDS = 1.0
NAMESPACE = "agents"


@contextmanager
def scratch_database() -> Iterator[str]:
    """The DATABASE_URL the run uses: its own PostgreSQL database, or a temporary SQLite."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        yield f"sqlite:///{tempfile.mkdtemp(prefix='bench-reconcile-')}/bench.sqlite3"
        return
    name = f"poolsadmin_bench_reconcile_{os.getpid()}"
    admin = url_for(url, "postgres")
    recreate(admin, name)
    try:
        yield url_for(url, name)
    finally:
        from django.db import connections

        connections.close_all()
        drop(admin, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--running", type=int, default=200, help="plans running in the pool")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny pool, once (CI)")
    parser.add_argument("--no-record", action="store_true", help="leave docs/benchmarks.md")
    parser.add_argument("--label", default="", help="what is measured, for the recorded rows")
    parser.add_argument(
        "--profile", action="store_true", help="print a pyinstrument profile of one more pass"
    )
    args = parser.parse_args()
    if args.smoke:
        args.pods, args.running, args.repeats, args.no_record = 6, 2, 1, True
    command = shlex.join(["python", "bench/reconcile_pass.py", *sys.argv[1:]])
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        command = f"DATABASE_URL={os.environ['DATABASE_URL']} {command}"

    with scratch_database() as database_url:
        os.environ["DATABASE_URL"] = database_url
        run(args, command)


def run(args: argparse.Namespace, command: str) -> None:
    os.environ.setdefault("POOLSADMIN_VAR_DIR", tempfile.mkdtemp(prefix="bench-reconcile-var-"))
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # Production-like: DEBUG off, which needs a key (no request is served here).
    os.environ.setdefault("SECRET_KEY", secrets.token_hex(32))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "poolsadmin.settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from poolsadmin.agents.services import agent_register
    from poolsadmin.kube.adapter import (
        MANAGED_BY,
        MANAGED_BY_LABEL,
        POOL_LABEL,
        TEMPLATE_HASH_LABEL,
        KubeClient,
        KubeConfig,
        template_hash,
    )
    from poolsadmin.kube.fake_api import start_fake_kube
    from poolsadmin.pools.models import Pod
    from poolsadmin.pools.services import pool_create
    from poolsadmin.scheduler.services import task_dispatch
    from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
    from poolsadmin.tasks.services import task_accept, task_submit, workspace_create
    from poolsadmin.worker.cluster_access import kube_override
    from poolsadmin.worker.loops import LOOPS

    call_command("migrate", verbosity=0)
    actor = "user:bench"
    fake = start_fake_kube(auto_run=True)
    client = KubeClient(KubeConfig(mode="url", url=fake.url, timeout_seconds=30.0))
    kube_override(client)
    try:
        started = time.perf_counter()
        pool = pool_create(
            actor=actor,
            name=f"bench-{args.pods}",
            pool_type="k8s",
            pod_image="agent:1",
            namespace=NAMESPACE,
            slots_per_pod=2,
            max_replicas=args.pods,
            # Nobody heartbeats during the run, and no idle pod is due for scale-down: every
            # pass sees the same pool.
            heartbeat_timeout_seconds=3600,
            scale_down_idle_seconds=3600,
        )
        labels = {
            POOL_LABEL: pool.pool_id,
            MANAGED_BY_LABEL: MANAGED_BY,
            TEMPLATE_HASH_LABEL: template_hash(pool),
        }
        names = [f"bench-{i:04d}" for i in range(args.pods)]
        for name in names:
            fake.add_pod(NAMESPACE, name, labels=labels, phase="Running")
        LOOPS["reconciler"].run_once()  # adopts them all
        assert Pod.objects.filter(pool=pool).count() == args.pods
        agents = {
            name: agent_register(pool=pool, name=name, version="bench").agent for name in names
        }
        for i in range(args.running):
            workspace = workspace_create(name=f"bench-ws-{i}", pool=pool, actor=actor)
            task = task_submit(workspace=workspace, task_type="plan", actor=actor)
            # Acknowledged at once, as an agent would: a dispatch left unacknowledged past the
            # ack timeout while the rest are placed would be rolled back.
            assert task_dispatch(task_id=task.pk).dispatched
            task.refresh_from_db()
            task_accept(task_id=task.pk, agent=agents[task.pod_name])
        running = WorkspaceTask.objects.filter(pool=pool, status=TaskStatus.RUNNING).count()
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        print(
            f"built {args.pods} pods x 2 slots, {running} running, in "
            f"{time.perf_counter() - started:.1f} s; database {connection.vendor}; "
            f"{machine()}; load {os.getloadavg()[0]:.2f}"
        )

        LOOPS["reconciler"].run_once()  # warm: the first pass after the build may repair
        LOOPS["autoscaler"].run_once()
        totals, cpus, own, queries, calls = [], [], [], [], []
        for n in range(1, args.repeats + 1):
            log_before = len(fake.requests_log)
            connection.queries_log.clear()  # a full log (9,000) would count nothing
            with CaptureQueriesContext(connection) as captured:
                c0, o0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
                reconciled = LOOPS["reconciler"].run_once()
                t1 = time.perf_counter()
                scaled = LOOPS["autoscaler"].run_once()
                t2, o2, c2 = time.perf_counter(), time.thread_time(), time.process_time()
            totals.append(t2 - t0)
            cpus.append(c2 - c0)
            own.append(o2 - o0)
            queries.append(len(captured))
            calls.append(len(fake.requests_log) - log_before)
            print(
                f"pass {n}: {t2 - t0:.3f} s (reconcile {t1 - t0:.3f} s, autoscale "
                f"{t2 - t1:.3f} s), CPU {cpus[-1]:.3f} s ({own[-1]:.3f} s poolsadmin's), "
                f"{queries[-1]} queries, "
                f"{calls[-1]} API calls" + (", changed something" if reconciled or scaled else "")
            )
        median, cpu = statistics.median(totals), statistics.median(cpus)
        mine = statistics.median(own)
        met = median < GOAL_SECONDS
        print(
            f"median {median:.3f} s at {args.pods} pods (goal < {GOAL_SECONDS:g} s at 1,000 "
            f"pods: {'met' if met else 'NOT met'}); CPU {cpu:.3f} s ({mine:.3f} s poolsadmin's); "
            f"{statistics.median(queries):.0f} queries, "
            f"{statistics.median(calls):.0f} API calls per pass"
        )
        if args.profile:
            # Optional, not a dependency: `pip install pyinstrument` to use it.
            from pyinstrument import Profiler

            with Profiler() as profiler:
                LOOPS["reconciler"].run_once()
                LOOPS["autoscaler"].run_once()
            print(profiler.output_text(unicode=True, show_all=False))
        if not args.no_record:
            title = f"reconcile + autoscale pass ({connection.vendor}, {args.pods} pods x 2 slots"
            title += f", {running} running)" + (f" {args.label}" if args.label else "")
            same = "the same at N and 2N pods (tests/worker/test_pass_cost.py)"
            append_results(
                title,
                [
                    ("pass, wall time, median of 3", f"{median:.3f} s", "< 1 s", met),
                    (
                        "pass, CPU time, median of 3 (poolsadmin's own thread)",
                        f"{cpu:.3f} s ({mine:.3f} s)",
                        "< 1 s",
                        cpu < GOAL_SECONDS,
                    ),
                    ("queries per pass", f"{statistics.median(queries):.0f}", same, None),
                    ("API calls per pass", f"{statistics.median(calls):.0f}", same, None),
                ],
                command,
            )
            print("appended to docs/benchmarks.md")
    finally:
        kube_override(None)
        client.close()
        fake.stop()


if __name__ == "__main__":
    main()
