"""Latency: a task submitted through the API until its assignment is in the agent's hands, at a
steady rate, with agents long-polling (issue 9, item 5: p95 < 300 ms at 50 tasks/s).

    .venv/bin/python bench/submit_latency.py [--rate 50] [--seconds 30] [--agents 50]
        [--runs 3] [--wait 20] [--admin-url postgres://postgres@127.0.0.1:5432/postgres]
        [--source DIR] [--label TEXT] [--smoke] [--no-record]

Sets up a template database on the server of --admin-url (migrated, a static pool of --agents
registered agents with 4 slots each, 10 workspaces, an admin API token), then, --runs times:

1. makes `poolsadmin_bench_submit` a fresh copy of it (no work left over from an earlier
   run), starts one web process as the image does (`daphne --proxy-headers`) and one
   `manage.py worker` (the scheduler wakes on the submission's notice, lib/wake.py);
2. runs one raw-HTTP client per agent (asyncio streams, keep-alive), each heartbeating with
   `"wait": --wait` (agents/nudge.py); as the reference agent does, an assignment is
   accepted in the heartbeat loop and its outcome (`success`, at once, so its slot comes
   free again) reported from beside it, and the agent heartbeats again at once;
3. submits plans through `POST /api/v1/workspaces/<id>/tasks` at --rate a second for
   --seconds (each at its own instant, on its own connection pool, never waiting for the
   previous answer);
4. latency = the moment the agent read the heartbeat answer naming the task - the moment the
   submission was sent.

Prints per run the submissions (and errors), the tasks that reached an agent, p50/p95/p99 and
the load average, and the goal; appends one row per run and figure to docs/benchmarks.md
unless --no-record. --smoke: 3 agents, 5 tasks/s for 3 s, one run, nothing recorded. A
benchmark prints figures; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    HOST,
    append_results,
    database_setup,
    drop,
    free_port,
    machine,
    machine_cpu_seconds,
    now_stamp,
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

BENCH_DB = "poolsadmin_bench_submit"
TEMPLATE_DB = "poolsadmin_bench_submit_template"  # each run starts from a copy of it
P95_GOAL_MS = 300
SUBMITTERS = 16  # connections the submissions share (a submission never waits for another)
REQUEST_TIMEOUT_S = 60.0

SETUP = """
import json
from django.contrib.auth.models import Group, User
from poolsadmin.agents.services import agent_register
from poolsadmin.api.services import api_token_create
from poolsadmin.pools.services import pool_create, pool_token_create
from poolsadmin.tasks.services import workspace_create
pool = pool_create(
    actor="user:bench", name="bench-submit", slots_per_pod=4, heartbeat_timeout_seconds=3600
)
token = pool_token_create(pool=pool, name="bench", actor="user:bench").secret
agents = [agent_register(pool=pool, name=f"bench-agent-{{i:04d}}") for i in range({agents})]
spaces = [
    workspace_create(name=f"bench-ws-{{i}}", pool=pool, actor="user:bench").workspace_id
    for i in range(10)
]
user = User.objects.create_user(username="bench", password=None)
user.groups.add(Group.objects.get(name="admin"))
print(json.dumps({{
    "token": token,
    "api_token": api_token_create(user=user, name="bench")[1],
    "agents": [[r.agent.agent_id, r.secret] for r in agents],
    "workspaces": spaces,
}}))
"""


@dataclass
class Run:
    submitted: dict[int, float] = field(default_factory=dict)  # task id -> sent at
    received: dict[int, float] = field(default_factory=dict)  # task id -> in the agent's hands
    submit_errors: Counter[str] = field(default_factory=Counter)
    agent_errors: Counter[str] = field(default_factory=Counter)
    load: float = 0.0
    stages: str = ""  # the server's own timestamps, stage by stage (stages_of)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU ms per submission, by process
    machine_busy: float = 0.0  # share of the machine's CPU in use while the load ran

    @property
    def latencies(self) -> list[float]:
        return [self.received[t] - sent for t, sent in self.submitted.items() if t in self.received]

    def quantile(self, q: int) -> float:
        values = self.latencies
        if len(values) < 2:
            return values[0] if values else 0.0
        return statistics.quantiles(values, n=100)[q - 1]


class Connection:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(
        self, method: str, path: str, headers: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection(HOST, self.port)
            reader, writer = self.streams
            writer.write(head.encode() + data)
            status, keep_open, raw = await asyncio.wait_for(
                read_response(reader), REQUEST_TIMEOUT_S
            )
        except (OSError, EOFError, ValueError, TimeoutError):
            self.close()
            raise
        if not keep_open:
            self.close()
        return status, json.loads(raw) if raw else None

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def agent(
    port: int, token: str, agent_id: str, secret: str, wait: float, stop_at: float, run: Run
) -> None:
    """As the reference agent (agents/reference.py) does: heartbeat, accept each assignment
    in the heartbeat loop, and report its outcome from beside the loop (there a task's
    thread; here one reporter per agent on a connection of its own), so that the next
    heartbeat goes out at once, naming the tasks held until their reports are answered."""
    loop = asyncio.get_running_loop()
    conn = Connection(port)
    headers = {"Authorization": f"Bearer {token}", "X-Agent-Secret": secret}
    base = "/api/v1/agents"
    held: set[int] = set()
    outcomes: asyncio.Queue[int] = asyncio.Queue()

    async def reporter() -> None:
        reports = Connection(port)
        try:
            while True:
                task_id = await outcomes.get()
                try:
                    await reports.call(
                        "PUT",
                        f"{base}/tasks/{task_id}/status",
                        headers,
                        {"agent_id": agent_id, "status": "success"},
                    )
                except (OSError, EOFError, ValueError, TimeoutError) as exc:
                    run.agent_errors[f"report {type(exc).__name__}"] += 1
                held.discard(task_id)
        finally:
            reports.close()

    reporting = asyncio.ensure_future(reporter())
    while loop.time() < stop_at:
        try:
            status, answer = await conn.call(
                "POST",
                f"{base}/{agent_id}/heartbeat",
                headers,
                {"running_task_ids": sorted(held), "wait": wait},
            )
            now = time.monotonic()
            if status != 200:
                run.agent_errors[f"heartbeat {status}"] += 1
                await asyncio.sleep(1.0)
                continue
            for assignment in answer["assignments"]:
                task_id = int(assignment["task_id"])
                run.received.setdefault(task_id, now)
                await conn.call(
                    "POST", f"{base}/tasks/{task_id}/accept", headers, {"agent_id": agent_id}
                )
                held.add(task_id)
                outcomes.put_nowait(task_id)
        except (OSError, EOFError, ValueError, TimeoutError) as exc:
            run.agent_errors[type(exc).__name__] += 1
            await asyncio.sleep(1.0)
    reporting.cancel()
    conn.close()


async def submitter(
    port: int, api_token: str, workspaces: list[str], queue: asyncio.Queue[int], run: Run
) -> None:
    conn = Connection(port)
    headers = {"Authorization": f"Bearer {api_token}"}
    while (n := await queue.get()) >= 0:
        sent = time.monotonic()
        try:
            status, answer = await conn.call(
                "POST",
                f"/api/v1/workspaces/{workspaces[n % len(workspaces)]}/tasks",
                headers,
                {"task_type": "plan"},
            )
        except (OSError, EOFError, ValueError, TimeoutError) as exc:
            run.submit_errors[type(exc).__name__] += 1
            continue
        if status == 201:
            run.submitted[int(answer["id"])] = sent
        else:
            run.submit_errors[str(status)] += 1
    conn.close()


async def load(args: argparse.Namespace, port: int, setup: dict[str, Any], run: Run) -> None:
    loop = asyncio.get_running_loop()
    # Let the agents' first heartbeats reach their wait before the first submission.
    start = loop.time() + 2.0
    stop_at = start + args.seconds
    agents = [
        agent(port, setup["token"], agent_id, secret, args.wait, stop_at + 2.0, run)
        for agent_id, secret in setup["agents"]
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    submitters = [
        submitter(port, setup["api_token"], setup["workspaces"], queue, run)
        for _ in range(SUBMITTERS)
    ]

    async def pace() -> None:
        # A steady rate: submission n at start + n / rate, whatever the answers do (an
        # answer that is late delays no later submission while a connection is free).
        for n in range(int(args.seconds * args.rate)):
            await asyncio.sleep(max(0.0, start + n / args.rate - loop.time()))
            queue.put_nowait(n)
        for _ in submitters:
            queue.put_nowait(-1)

    await asyncio.gather(pace(), *submitters, *agents)


STAGES_SQL = """
SELECT percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY dispatched_at - created_at),
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY acked_at - dispatched_at),
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY completed_at - acked_at),
       count(*) FILTER (WHERE dispatched_at IS NULL)
FROM workspace_tasks
"""


def stages_of(database_url: str) -> str:
    """Where a submission's time went, by the ledger's own timestamps (p50/p95 ms): created ->
    dispatched is the scheduler's share, dispatched -> acked the agent's heartbeat answer and
    its accept, acked -> completed the agent's report; and the tasks never dispatched."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(STAGES_SQL).fetchone()
    assert row is not None
    *spans, undispatched = row

    def ms(pair: list[Any] | None) -> str:
        if not pair or pair[0] is None:
            return "-"
        return "/".join(f"{value.total_seconds() * 1000:.0f}" for value in pair)

    names = ("created->dispatched", "dispatched->acked", "acked->completed")
    text = ", ".join(f"{name} {ms(span)}" for name, span in zip(names, spans, strict=True))
    return f"{text} ms (p50/p95); never dispatched {undispatched}"


def one_run(args: argparse.Namespace, env: dict[str, str], setup: dict[str, Any], n: int) -> Run:
    run = Run()
    recreate(args.admin_url, BENCH_DB, template=TEMPLATE_DB)
    port = free_port()
    var_dir = Path(env["POOLSADMIN_VAR_DIR"])
    worker = start_worker(args.source, env, var_dir / f"worker-{n}.log")
    web = start_web(args.source, env, port, var_dir / f"daphne-{n}.log")
    try:
        before = {"web": process_cpu_seconds(web.pid), "worker": process_cpu_seconds(worker.pid)}
        clients = time.process_time()
        busy, total = machine_cpu_seconds()
        asyncio.run(load(args, port, setup, run))
        run.load = os.getloadavg()[0]
        busy_after, total_after = machine_cpu_seconds()
        run.machine_busy = (busy_after - busy) / max(total_after - total, 1e-9)
        count = max(len(run.submitted), 1)
        run.cpu_ms = {
            name: (process_cpu_seconds(proc.pid) - before[name]) * 1000 / count
            for name, proc in (("web", web), ("worker", worker))
        }
        run.cpu_ms["clients"] = (time.process_time() - clients) * 1000 / count
        run.cpu_ms["machine"] = (busy_after - busy) * 1000 / count
        run.stages = stages_of(url_for(args.admin_url, BENCH_DB))
    finally:
        stop_process(web)
        stop_process(worker)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="submissions a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wait", type=float, default=20.0, help="the heartbeats' long poll")
    parser.add_argument("--admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/12",
        help="the channel layer, as in production ('' for the in-memory one)",
    )
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to serve")
    parser.add_argument("--label", default="", help="what is measured, for the output")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run, no record")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.agents, args.runs, args.no_record = 5.0, 3.0, 3, 1, True
        args.wait = 2.0
    args.source = args.source.resolve()

    version, _ = server_facts(args.admin_url)
    env = process_env(
        source=args.source,
        database_url=url_for(args.admin_url, BENCH_DB),
        prefix="bench-submit-",
        debug=False,
    )
    env["CHANNEL_LAYER_URL"] = args.redis_url  # the dashboard's live push, as in production
    var_dir = env["POOLSADMIN_VAR_DIR"]
    print(f"{now_stamp()}; {machine()}; load {os.getloadavg()[0]:.2f}")
    print(f"PostgreSQL {version}; {args.admin_url}; serving {args.source} {args.label}")
    recreate(args.admin_url, TEMPLATE_DB)
    try:
        template_env = {**env, "DATABASE_URL": url_for(args.admin_url, TEMPLATE_DB)}
        setup = database_setup(args.source, template_env, SETUP.format(agents=args.agents))
        print(
            f"{args.rate:g} plans/s for {args.seconds:g} s, {args.agents} agents long-polling "
            f"{args.wait:g} s, worker running, {args.runs} runs\n"
        )
        header = (
            "| run | submitted | submit errors | in the agents' hands | p50 ms | p95 ms | p99 ms "
            "| agent errors | load |"
        )
        print(header + "\n|" + "---|" * (header.count("|") - 1))
        runs = []
        for n in range(1, args.runs + 1):
            run = one_run(args, env, setup, n)
            runs.append(run)
            print(
                f"| {n} | {len(run.submitted)} | {sum(run.submit_errors.values())} "
                f"| {len(run.latencies)} | {run.quantile(50) * 1000:.0f} "
                f"| {run.quantile(95) * 1000:.0f} | {run.quantile(99) * 1000:.0f} "
                f"| {dict(run.agent_errors) or 0} | {run.load:.1f} |",
                flush=True,
            )
            cpu = ", ".join(f"{name} {ms:.1f}" for name, ms in run.cpu_ms.items())
            print(
                f"  server side: {run.stages}; CPU ms per submission: {cpu}; machine busy "
                f"{run.machine_busy:.0%}",
                flush=True,
            )
    finally:
        for database in (BENCH_DB, TEMPLATE_DB):
            drop(args.admin_url, database)
    print(f"logs: {var_dir}")
    rows: list[tuple[str, str, str, bool | None]] = []
    shape = f"{args.rate:g} plans/s through the API, {args.agents} agents long-polling"
    for n, run in enumerate(runs, 1):
        p95 = run.quantile(95) * 1000
        delivered = len(run.latencies) == len(run.submitted) and not run.submit_errors
        rows += [
            (
                f"submission -> assignment p95 (p50), {shape} (run {n}, load {run.load:.1f})",
                f"{p95:.0f} ms ({run.quantile(50) * 1000:.0f} ms)",
                f"< {P95_GOAL_MS} ms",
                p95 < P95_GOAL_MS,
            ),
            (
                f"tasks in the agents' hands / submitted, {shape} (run {n})",
                f"{len(run.latencies)} / {len(run.submitted)} "
                f"({sum(run.submit_errors.values())} submit errors)",
                "all, 0 errors",
                delivered,
            ),
        ]
    met = all(row[3] for row in rows)
    verdict = "met" if met else "NOT met"
    print(f"\ngoal (p95 < {P95_GOAL_MS} ms, every submission delivered): {verdict}")
    if not args.no_record:
        command = "python bench/submit_latency.py " + " ".join(sys.argv[1:])
        append_results(f"submission to assignment {args.label}".strip(), rows, command.strip())


if __name__ == "__main__":
    main()
