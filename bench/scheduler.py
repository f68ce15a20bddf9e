"""Benchmark: scheduler throughput on PostgreSQL against `pgbench -N` on the same server.

    .venv/bin/python bench/scheduler.py [--layouts 1x1250,50x25] [--tasks 5000]
        [--processes 1,2,4] [--runs 3] [--seconds 180] [--source DIR] [--label TEXT]
        [--admin-url postgres://postgres@127.0.0.1:5432/postgres] [--smoke] [--no-record]

For each layout (POOLS x PODS per pool, 4 slots per pod, so 1x1250 and 50x25 both hold 5,000
slots) it builds, once, a template database on the server of --admin-url: migrated, the pools
with their agents registered through the services, --tasks pending plans over 500 workspaces,
then ANALYZE (fresh tables without statistics get bad plans; this machine's PostgreSQL has
autovacuum off). Then --runs rounds, each of them for every number of --processes in turn
(the load of a shared machine drifts: rounds compare the counts under the same drift):

0. `pgbench -N -T 10` with as many clients, right before the run;
1. a fresh copy of the template (CREATE DATABASE ... TEMPLATE);
2. that many scheduler processes, `scheduler_pass()` in a loop as the worker runs it, all
   started at the same instant, each until nothing is left to dispatch (or --seconds);
3. dispatches/s = tasks dispatched / time from the start to the last dispatch; time to drain
   when every task was dispatched; queries per dispatch, counted in the processes;
4. a check of the ledger: every task dispatched at most once, no slot holding two tasks.

pgbench gives the machine's own limit at that moment; the ratio of the medians (of the
dispatch rates, of the pgbench tps) is the figure the goal is about (issue 9: >= 0.5 with 1
and 2 processes, 2 processes never slower than 1). Each figure's median is appended to
docs/benchmarks.md unless --no-record. --source DIR runs the scheduler processes from another
checkout with this venv (`git archive <commit> | tar -x -C DIR`: the BEFORE figure).
--smoke: tiny layouts, one run, nothing recorded (CI runs it so the script cannot rot).
A benchmark prints figures; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    append_results,
    drop,
    machine,
    now_stamp,
    pgbench,
    pgbench_init,
    recreate,
    server_facts,
    standard_arguments,
    url_for,
)

TEMPLATE_DB = "poolsadmin_bench_sched_tpl"
RUN_DB = "poolsadmin_bench_sched"

# Run in a fresh process with DATABASE_URL set to the template database.
BUILD = """
import django, sys
django.setup()
from django.core.management import call_command
from django.db import connection
from tests.fleet import fleet_build, tasks_queue
call_command("migrate", verbosity=0)
pools, pods, tasks = (int(a) for a in sys.argv[1:4])
fleet = fleet_build(pools=pools, pods_per_pool=pods, slots_per_pod=4, workspaces=500)
tasks_queue(fleet, count=tasks)
with connection.cursor() as cursor:
    cursor.execute("ANALYZE")
"""

# One scheduler process: wait for the common start, then pass after pass, paced as the
# worker paces them, until nothing is left (or the deadline), counting its queries; print
# what it did as JSON.
SCHEDULE = """
import json, sys, time
import django
django.setup()
from django.db import connection
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.worker.loops import LOOPS
AFTER_WORK = 0.05  # as the worker (worker.py run_loops): a loop that found work goes again soon
start, deadline = float(sys.argv[1]), float(sys.argv[2])
queries = 0
def count(execute, sql, params, many, context):
    global queries
    queries += 1
    return execute(sql, params, many, context)
dispatched, passes, last = 0, 0, start
while time.time() < start:
    time.sleep(0.001)
with connection.execute_wrapper(count):
    while time.time() < deadline:
        result = scheduler_pass()
        passes += 1
        if result.dispatched:
            dispatched += len(result.dispatched)
            last = time.time()
            time.sleep(AFTER_WORK)
        elif not WorkspaceTask.objects.filter(status=TaskStatus.PENDING).exists():
            break
        else:  # another process holds the pools that are left
            time.sleep(LOOPS["scheduler"].interval_seconds)
print(json.dumps({"dispatched": dispatched, "passes": passes, "last": last, "queries": queries}))
"""

CHECK = """
SELECT
  (SELECT count(*) FROM events WHERE kind = 'task.dispatched'),
  (SELECT count(DISTINCT task_id) FROM events WHERE kind = 'task.dispatched'),
  (SELECT count(*) FROM workspace_tasks WHERE status = 'running'),
  (SELECT count(*) FROM slots WHERE state = 'running'),
  (SELECT count(DISTINCT task_id) FROM slots WHERE state = 'running'),
  (SELECT count(*) FROM workspace_tasks WHERE status = 'pending')
"""


@dataclass(frozen=True)
class Run:
    dispatched: int
    seconds: float
    queries: int
    drained: bool
    consistent: bool

    @property
    def rate(self) -> float:
        return self.dispatched / self.seconds if self.seconds else 0.0


def env_for(source: Path, url: str, var_dir: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(source),
        "DJANGO_SETTINGS_MODULE": "poolsadmin.settings",
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_hex(32),
        "DATABASE_URL": url,
        "CHANNEL_LAYER_URL": "",
        "LOG_LEVEL": "WARNING",
        "POOLSADMIN_VAR_DIR": var_dir,
        "POOLSADMIN_HEARING_KEEPER": "false",
        # No dispatch is acknowledged here: none may be rolled back while the queue drains.
        "POOLSADMIN_ACK_TIMEOUT_SECONDS": "86400",
    }


def build_template(admin_url: str, pools: int, pods: int, tasks: int, var_dir: str) -> None:
    recreate(admin_url, TEMPLATE_DB)
    env = env_for(ROOT, url_for(admin_url, TEMPLATE_DB), var_dir)
    subprocess.run(
        [sys.executable, "-c", BUILD, str(pools), str(pods), str(tasks)],
        cwd=ROOT,
        env=env,
        check=True,
    )


def one_run(args: argparse.Namespace, processes: int, var_dir: str) -> Run:
    recreate(args.admin_url, RUN_DB, template=TEMPLATE_DB)
    url = url_for(args.admin_url, RUN_DB)
    with psycopg.connect(url, autocommit=True) as db:
        # The agents registered while the template was built, minutes ago: they heartbeat now,
        # as the agents of a live pool do, or the scheduler would rightly call them offline.
        db.execute("UPDATE agents SET last_ping_at = now()")
        db.execute("ANALYZE")
    env = env_for(args.source, url, var_dir)
    start = time.time() + 3.0  # time for every process to import Django and connect
    deadline = start + args.seconds
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SCHEDULE, str(start), str(deadline)],
            cwd=args.source,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    reports = []
    for worker in workers:
        out, _ = worker.communicate(timeout=args.seconds + 120)
        if worker.returncode != 0:
            raise SystemExit(f"a scheduler process failed ({worker.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    with psycopg.connect(url) as db:
        row = db.execute(CHECK).fetchone()
    assert row is not None
    events, distinct, running, held, distinct_held, pending = row
    consistent = events == distinct == running == held == distinct_held
    dispatched = sum(r["dispatched"] for r in reports)
    last = max(r["last"] for r in reports)
    return Run(
        dispatched=dispatched,
        seconds=max(last - start, 1e-9),
        queries=sum(r["queries"] for r in reports),
        drained=pending == 0,
        consistent=consistent and dispatched == running,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1x1250,50x25")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=180.0, help="longest a run may take")
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    standard_arguments(parser, source="the checkout to schedule with")
    args = parser.parse_args()
    if args.smoke:
        args.layouts, args.tasks, args.processes, args.runs = "1x10,2x5", 40, "1,2", 1
        args.pgbench_seconds, args.no_record = 2, True
    args.source = args.source.resolve()
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    counts = [int(n) for n in args.processes.split(",")]
    var_dir = tempfile.mkdtemp(prefix="bench-scheduler-")

    version, _ = server_facts(args.admin_url)
    print(f"{now_stamp()}; {machine()}; load {os.getloadavg()[0]:.2f}")
    print(f"PostgreSQL {version}; {args.admin_url}; scheduling with {args.source} {args.label}")
    pgbench_init(args.admin_url)

    header = "| layout | processes | run | load | pgbench -N tps | dispatched | seconds | "
    header += "dispatches/s | x pgbench | queries/dispatch | drained | ledger |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    rows: list[tuple[str, str, str, bool | None]] = []
    try:
        for pools, pods in layouts:
            build_template(args.admin_url, pools, pods, args.tasks, var_dir)
            medians: dict[int, float] = {}
            # Rounds of every process count, each run right after pgbench with as many
            # clients: on a shared machine the load drifts over minutes, and runs of one
            # count after another would compare different machines.
            samples: dict[int, list[Run]] = {k: [] for k in counts}
            tps_samples: dict[int, list[float]] = {k: [] for k in counts}
            for n in range(1, args.runs + 1):
                for k in counts:
                    tps_k = pgbench(args.admin_url, clients=k, seconds=args.pgbench_seconds)
                    load = os.getloadavg()[0]
                    run = one_run(args, k, var_dir)
                    tps_samples[k].append(tps_k)
                    samples[k].append(run)
                    print(
                        f"| {pools}x{pods} | {k} | {n} | {load:.1f} | {tps_k:.0f} "
                        f"| {run.dispatched} | {run.seconds:.2f} "
                        f"| {run.rate:.0f} | {run.rate / tps_k:.2f} "
                        f"| {run.queries / max(run.dispatched, 1):.2f} "
                        f"| {'yes' if run.drained else 'no'} "
                        f"| {'consistent' if run.consistent else 'INCONSISTENT'} |",
                        flush=True,
                    )
            tps = {k: statistics.median(v) for k, v in tps_samples.items()}
            for k in counts:
                runs = samples[k]
                rate = statistics.median(r.rate for r in runs)
                medians[k] = rate
                ratio = rate / tps[k]
                label = f"{pools} pool(s) x {pods} pods, {args.tasks} plans, {k} process(es)"
                goal_met = ratio >= 0.5 if k <= 2 else None
                rows.append(
                    (
                        f"dispatches/s, {label} (median of {args.runs})",
                        f"{rate:.0f}/s = {ratio:.2f} x pgbench -N {tps[k]:.0f} tps "
                        f"(-c {k}, median)",
                        ">= 0.5 x pgbench" if k <= 2 else "more processes add throughput",
                        goal_met,
                    )
                )
                drains = [r.seconds for r in runs if r.drained]
                if drains:
                    rows.append(
                        (
                            f"time to drain, {label}",
                            f"{statistics.median(drains):.1f} s",
                            "(figure)",
                            None,
                        )
                    )
                if not all(r.consistent for r in runs):
                    rows.append((f"ledger after {label}", "INCONSISTENT", "consistent", False))
            if 1 in medians and 2 in medians:
                faster = medians[2] / medians[1]
                rows.append(
                    (
                        f"2 processes / 1, {pools} pool(s) x {pods} pods",
                        f"{faster:.2f}",
                        # One pool is one claim: a second process takes turns with the
                        # first, so "never slower" is within the noise of the rounds.
                        ">= 0.95 (never slower)" if pools == 1 else "> 1 (faster)",
                        faster >= 0.95 if pools == 1 else faster > 1.0,
                    )
                )
    finally:
        for database in (RUN_DB, TEMPLATE_DB):
            drop(args.admin_url, database)
    print()
    for figure, value, goal, met in rows:
        verdict = "" if met is None else ": met" if met else ": NOT met"
        print(f"{figure}: {value} (goal {goal}{verdict})")
    if not args.no_record:
        command = "python bench/scheduler.py " + " ".join(sys.argv[1:])
        append_results("scheduler throughput " + args.label, rows, command.strip())


if __name__ == "__main__":
    main()
