"""Load: 1,000 agents heartbeating every 5 s against ONE web process on PostgreSQL, with the
worker running (issue 9, item 6; issue 8 measured 200 agents once a second).

    .venv/bin/python bench/agents_heartbeat.py [--agents 1000] [--interval 5] [--seconds 60]
        [--runs 3] [--no-worker] [--admin-url postgres://postgres@127.0.0.1:5432/postgres]
        [--source DIR] [--label TEXT] [--smoke] [--no-record]

Sets up its own database on the server of --admin-url (`poolsadmin_bench`: dropped, created,
migrated) with a static pool of --agents registered agents, then, --runs times:

1. starts one web process as the image does (`daphne --proxy-headers -b 127.0.0.1 -p PORT
   poolsadmin.asgi:application`) with production-like settings (DEBUG off, SECRET_KEY,
   ALLOWED_HOSTS, DATABASE_URL, and the DATABASE_POOL_* sizes of this environment, if set),
   and, unless --no-worker, one `manage.py worker` on the same database (the scheduler,
   reconciler and autoscaler loops share the server and the machine with the web process);
2. runs one raw-HTTP client per agent (asyncio streams, keep-alive, not the reference agent),
   each POSTing /api/v1/agents/<id>/heartbeat with the pool token and its X-Agent-Secret
   every --interval seconds for --seconds; the agents' first heartbeats spread over the first
   interval; a late answer makes the next heartbeat go at once, never two at a time, as an
   agent does;
3. counts the backends of `poolsadmin_bench` (pg_stat_activity) every second;
4. stops both and runs `pgbench -N -T 15 -c 8` on a pgbench-initialised scratch database
   (`poolsadmin_pgbench`) of the same server: the machine's own limit, for the ratio.

Prints one row per run (requests, errors by status, heartbeats/s answered 200, latency
p50/p95/p99, most backends, the web process's CPU, the load average, pgbench tps) and the goal:
agents / interval heartbeats a second answered, 0 errors, p95 < 250 ms. Appends one row per run
and figure to docs/benchmarks.md unless --no-record. --smoke: 5 agents for 3 s, one run,
nothing recorded (`make bench-smoke`, so the script cannot rot).

--source DIR runs migrate, the set-up and the processes from another checkout with this venv
(`git archive <commit> | tar -x -C DIR`): the BEFORE figures. A benchmark prints figures; it
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    HOST,
    PGBENCH_DB,
    append_results,
    database_setup,
    drop,
    free_port,
    machine,
    pgbench,
    pgbench_init,
    process_cpu_seconds,
    process_env,
    read_response,
    recreate,
    server_facts,
    start_web,
    start_worker,
    stop_process,
    url_for,
)

BENCH_DB = "poolsadmin_bench"
REQUEST_TIMEOUT_S = 30.0
BODY = json.dumps({"running_task_ids": [], "cpu": 0.25, "memory": 256.0}).encode()
DEFAULT_POOL_MAX = 10  # settings.py's default for DATABASE_POOL_MAX_SIZE
P95_GOAL_MS = 250

# Run with `manage.py shell -c` in the checkout under test: its own services build the pool.
SETUP = """
import json
from poolsadmin.agents.services import agent_register
from poolsadmin.pools.services import pool_create, pool_token_create
# The worker's reconciler runs: the silence between two runs (pgbench) takes nobody offline.
pool = pool_create(
    actor="user:bench", name="bench-heartbeat", slots_per_pod=4, heartbeat_timeout_seconds=3600
)
token = pool_token_create(pool=pool, name="bench", actor="user:bench").secret
agents = [
    agent_register(pool=pool, name=f"bench-agent-{{i:03d}}", version="bench")
    for i in range({agents})
]
print(json.dumps({{"token": token, "agents": [[r.agent.agent_id, r.secret] for r in agents]}}))
"""


@dataclass
class Run:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    backends: list[int] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the web process's
    client_cpu_seconds: float = 0.0  # this process's (the agents)
    seconds: float = 0.0
    pgbench_tps: float = 0.0
    log_errors: Counter[str] = field(default_factory=Counter)
    load: float = 0.0  # the machine's 1-minute load average as the load ends (shared machine)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return self.requests - self.statuses["200"]

    def quantile(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[q - 1] if self.latencies else 0.0


# --- the server and its databases --------------------------------------------------------------


def backends_sampler(admin_url: str, samples: list[int], stop: threading.Event) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        while not stop.wait(1.0):
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [BENCH_DB]
            ).fetchone()
            assert row is not None
            samples.append(int(row[0]))


def log_errors(log: Path) -> Counter[str]:
    """The server's ERROR lines and the database errors of its tracebacks, by message."""
    found: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if " ERROR " in line:
            message = line.split(" ERROR ", 1)[1]
        elif line.startswith("django.db.utils."):
            message = line
            if "FATAL:" in line:  # the server's reason, not the address it was refused at
                message = f"{line.split(':', 1)[0]}: FATAL: {line.split('FATAL:', 1)[1].strip()}"
        else:
            continue
        found[re.sub(r"agent-[a-z0-9]{16}", "agent-...", message)[:110]] += 1
    return found


# --- the agents --------------------------------------------------------------------------------


async def agent(
    request: bytes,
    port: int,
    first_at: float,
    stop_at: float,
    interval: float,
    run: Run,
    in_flight: list[int],
) -> None:
    loop = asyncio.get_running_loop()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    next_at = first_at
    while next_at < stop_at:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        sent_at = loop.time()
        in_flight[0] += 1
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            status, keep_open, _ = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
            outcome = str(status)
        except (OSError, EOFError, ValueError, TimeoutError) as exc:
            outcome, keep_open = type(exc).__name__, False
        finally:
            in_flight[0] -= 1
        run.statuses[outcome] += 1
        run.latencies.append(loop.time() - sent_at)
        if not keep_open and writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            reader = writer = None
        # Every `interval`; an answer later than that sends the next one at once.
        next_at = max(next_at + interval, loop.time())
    if writer is not None:
        writer.close()


async def heartbeats(
    port: int, token: str, agents: list[list[str]], seconds: float, interval: float, run: Run
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time() + 1.0
    in_flight = [0]
    tasks = []
    for i, (agent_id, secret) in enumerate(agents):
        request = (
            f"POST /api/v1/agents/{agent_id}/heartbeat HTTP/1.1\r\n"
            f"Host: {HOST}:{port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"X-Agent-Secret: {secret}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        # Agents are not synchronised: their first heartbeats spread over the first interval.
        first_at = start + interval * i / len(agents)
        tasks.append(agent(request, port, first_at, start + seconds, interval, run, in_flight))
    await asyncio.gather(*tasks)


# --- one run, and the whole -----------------------------------------------------------------


def one_run(args: argparse.Namespace, env: dict[str, str], setup: dict[str, Any], n: int) -> Run:
    run = Run()
    port = free_port()
    var_dir = Path(env["POOLSADMIN_VAR_DIR"])
    log = var_dir / f"daphne-{n}.log"
    worker = None if args.no_worker else start_worker(args.source, env, var_dir / f"worker-{n}.log")
    web = start_web(args.source, env, port, log)
    stop = threading.Event()
    sampler = threading.Thread(
        target=backends_sampler, args=(args.admin_url, run.backends, stop), daemon=True
    )
    try:
        cpu_before, client_before = process_cpu_seconds(web.pid), time.process_time()
        sampler.start()
        started = time.monotonic()
        asyncio.run(
            heartbeats(port, setup["token"], setup["agents"], args.seconds, args.interval, run)
        )
        run.seconds = time.monotonic() - started
        run.cpu_seconds = process_cpu_seconds(web.pid) - cpu_before
        run.client_cpu_seconds = time.process_time() - client_before
        run.load = os.getloadavg()[0]
    finally:
        stop.set()
        sampler.join()
        stop_process(web)
        if worker is not None:
            stop_process(worker)
    run.log_errors = log_errors(log)
    run.pgbench_tps = pgbench(args.admin_url, seconds=args.pgbench_seconds)
    return run


def measure(args: argparse.Namespace, env: dict[str, str], setup: dict[str, Any]) -> list[Run]:
    runs = []
    header = (
        "| run | requests | errors (by status) | heartbeats/s (200) | p50 ms | p95 ms | p99 ms "
        "| most backends | web CPU | agents' CPU | load | pgbench tps | heartbeats/s / tps |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in range(1, args.runs + 1):
        run = one_run(args, env, setup, n)
        runs.append(run)
        rate = run.statuses["200"] / args.seconds
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(run.statuses.items()) if k != "200")
        print(
            f"| {n} | {run.requests} | {run.errors}{f' ({failed})' if failed else ''} "
            f"| {rate:.1f} | {run.quantile(50) * 1000:.0f} | {run.quantile(95) * 1000:.0f} "
            f"| {run.quantile(99) * 1000:.0f} | {max(run.backends, default=0)} "
            f"| {run.cpu_seconds / run.seconds:.0%} | {run.client_cpu_seconds / run.seconds:.0%} "
            f"| {run.load:.1f} | {run.pgbench_tps:.0f} "
            f"| {rate / run.pgbench_tps:.1%} |",
            flush=True,
        )
    for n, run in enumerate(runs, 1):
        for message, count in run.log_errors.most_common(3):
            print(f"run {n} server log: {count} x {message}")
    return runs


def result_rows(args: argparse.Namespace, runs: list[Run]) -> list[tuple[str, str, str, bool]]:
    """One row per run and figure for docs/benchmarks.md, each with the run's load."""
    wanted = args.agents / args.interval
    shape = f"{args.agents} agents every {args.interval:g} s" + (
        "" if args.no_worker else ", worker running"
    )
    rows = []
    for n, run in enumerate(runs, 1):
        rate = run.statuses["200"] / args.seconds
        p95 = run.quantile(95) * 1000
        at = f"run {n}, load {run.load:.1f}, web CPU {run.cpu_seconds / run.seconds:.0%}"
        rows += [
            (
                f"heartbeats/s answered 200, {shape} ({at})",
                f"{rate:.1f}/s",
                f">= {wanted * 0.98:.0f}/s",
                rate >= wanted * 0.98,
            ),
            (f"errors, {shape} (run {n})", str(run.errors), "0", run.errors == 0),
            (
                f"heartbeat p95 (p50), {shape} (run {n})",
                f"{p95:.0f} ms ({run.quantile(50) * 1000:.0f} ms)",
                f"< {P95_GOAL_MS} ms",
                p95 < P95_GOAL_MS,
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pgbench-seconds", type=int, default=15)
    parser.add_argument("--no-worker", action="store_true", help="the web process alone")
    parser.add_argument("--admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to serve")
    parser.add_argument("--label", default="", help="what is measured, for the output")
    parser.add_argument("--smoke", action="store_true", help="5 agents, 3 s, one run, no record")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.interval, args.seconds, args.runs = 5, 1.0, 3.0, 1
        args.pgbench_seconds, args.no_record = 2, True
    args.source = args.source.resolve()

    version, max_connections = server_facts(args.admin_url)
    pool_max = int(os.environ.get("DATABASE_POOL_MAX_SIZE") or DEFAULT_POOL_MAX)
    pool_env = {k: v for k, v in os.environ.items() if k.startswith("DATABASE_POOL_")}
    database_url = url_for(args.admin_url, BENCH_DB)
    env = process_env(
        source=args.source, database_url=database_url, prefix="bench-agents-", debug=False
    )
    var_dir = env["POOLSADMIN_VAR_DIR"]
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; load {os.getloadavg()[0]:.2f}")
    print(f"PostgreSQL {version}, max_connections {max_connections}; {args.admin_url}")
    print(f"serving {args.source} {args.label}; pool env {pool_env or '(defaults)'}")

    recreate(args.admin_url, BENCH_DB)
    setup = database_setup(args.source, env, SETUP.format(agents=args.agents))
    pgbench_init(args.admin_url)
    print(
        f"{args.agents} agents x 1 heartbeat every {args.interval:g} s x {args.seconds:.0f} s"
        f" ({args.agents / args.interval:.0f}/s), {args.runs} runs,"
        f" {'no worker' if args.no_worker else 'worker running'}\n"
    )

    try:
        runs = measure(args, env, setup)
    finally:
        for database in (BENCH_DB, PGBENCH_DB):
            drop(args.admin_url, database)
    print(f"server logs: {var_dir}")
    errors = sum(run.errors for run in runs)
    most = max(max(run.backends, default=0) for run in runs)
    rows = result_rows(args, runs)
    # Each process holds its own bounded pool: the web's, and the worker's.
    processes = 1 if args.no_worker else 2
    met = all(row[3] for row in rows) and most <= pool_max * processes
    print(
        f"\ngoal ({args.agents / args.interval:.0f} heartbeats/s answered, 0 errors, p95 < "
        f"{P95_GOAL_MS} ms, backends <= {processes} pools of {pool_max}): "
        f"{'met' if met else 'NOT met'} ({errors} errors, at most {most} backends)"
    )
    if not args.no_record:
        command = "python bench/agents_heartbeat.py " + " ".join(sys.argv[1:])
        append_results(f"agent API at fleet size {args.label}".strip(), rows, command.strip())


if __name__ == "__main__":
    main()
