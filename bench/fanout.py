"""Benchmark: live push of one slot change to 200 open pool pages on ONE web process (issue 9).

    .venv/bin/python bench/fanout.py [--pods 100,1000] [--clients 200] [--runs 3]
        [--admin-url postgres://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/11] [--source DIR] [--label TEXT]
        [--no-record] [--smoke]

Sets up its own database on the server of --admin-url (`poolsadmin_bench_fanout`: dropped,
created, migrated) and, through the services of the checkout under test, one static pool per
size: N registered agents (a pod of 4 slots each) and N/100 + runs plan_and_apply plans holding
reserved slots (task 598's shape); a viewer and an admin, and one logged-in session per client
(one in ten an admin's). Then, per size:

1. starts one daphne process on that database with the channel layer on Redis (--redis-url:
   a database of its own, flushed before and after);
2. opens --clients WebSockets to the pool page (`/ws/pools/<pool_id>/`, aiohttp, each with
   its session cookie and the page's origin) and waits until every page got its first render
   and all is quiet;
3. --runs times: another process (`manage.py shell`) releases one reserved slot through the
   service `slot_release` and prints when it returned (the change committed); each client
   notes when it first receives a frame whose slot map counts one reservation fewer. Per run:
   delivery latency p50/p95 over the clients (wall clock, one machine), how many never got it
   within --wait seconds, and the web process's CPU seconds from the change to the end.

Appends one row per figure to docs/benchmarks.md (`--no-record` does not). Goal: p95 < 500 ms
with 200 clients at 100 and 1,000 pods, every client served. `--smoke` runs 4 pods, 5 clients,
one run and records nothing (`make bench-smoke`). --source DIR serves another checkout with
this venv (`git archive <commit> | tar -x -C DIR`): the BEFORE figure. A benchmark prints
figures; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.agents_heartbeat import log_errors  # noqa: E402
from bench.common import (  # noqa: E402
    append_results,
    drop,
    free_port,
    machine,
    manage,
    process_cpu_seconds,
    recreate,
    standard_arguments,
    start_web,
    stop_process,
    url_for,
)

BENCH_DB = "poolsadmin_bench_fanout"
HOST = "127.0.0.1"
GOAL_MS = 500
TITLE = "live push fan-out, one web process"
# The slot map's note: "... · 3 running, <a ...><strong>12 reserved</strong></a>, ...".
RESERVED = re.compile(r"(\d+) running, (?:<a [^>]*><strong>)?(\d+) reserved")
NOTE_WITHIN = 30_000  # characters: the note is in the first regions of a frame

# Run with `manage.py shell -c` in the checkout under test: its own services build the pool.
SETUP = """
import json
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.test import Client
from poolsadmin.agents.services import agent_register
from poolsadmin.pools.services import pool_create
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_accept, task_report, task_submit, workspace_create
actor = "user:bench"
pools = {{}}
for pods in {sizes}:
    name = f"bench-fanout-{{pods}}"
    pool = pool_create(actor=actor, name=name, slots_per_pod=4)
    for i in range(pods):
        agent_register(pool=pool, name=f"{{name}}-pod-{{i:04d}}", version="bench")
    for i in range(pods // 100 + {runs}):
        ws = workspace_create(name=f"{{name}}-apply-{{i}}", pool=pool, actor=actor)
        task = task_submit(workspace=ws, task_type="plan_and_apply", actor=actor)
        assert task_dispatch(task_id=task.pk).dispatched
        task = WorkspaceTask.objects.get(pk=task.pk)
        task_accept(task_id=task.pk, agent=task.agent)
        task_report(task_id=task.pk, agent=task.agent, status=TaskStatus.APPLY_PENDING)
    pools[pods] = pool.pool_id
viewer = User.objects.create_user(username="bench-viewer")
viewer.groups.add(Group.objects.get(name="viewer"))
admin = User.objects.create_user(username="bench-admin")
admin.groups.add(Group.objects.get(name="admin"))
sessions = []
for i in range({clients}):
    client = Client()
    client.force_login(admin if i % 10 == 0 else viewer)
    sessions.append(client.cookies[settings.SESSION_COOKIE_NAME].value)
print(json.dumps({{"pools": pools, "cookie": settings.SESSION_COOKIE_NAME, "sessions": sessions}}))
"""

# One slot change, through the service, in a process of its own; prints when it returned.
CHANGE = """
import json, time
from poolsadmin.pools.actions import slot_release
from poolsadmin.pools.models import Slot
reserved = Slot.objects.filter(pod__pool_id={pool_id!r}, state="reserved")
slot = reserved.order_by("id").first()
slot_release(slot_id=slot.pk, actor="user:bench", reason="bench", expected_version=slot.version)
committed_at = time.time()
print(json.dumps({{"committed_at": committed_at, "reserved": reserved.count()}}))
"""


@dataclass
class Client:
    """One open pool page: its last known reservation count and when each count arrived."""

    frames: int = 0
    first_frame: asyncio.Event = field(default_factory=asyncio.Event)
    last_frame_at: float = 0.0
    seen: dict[int, float] = field(default_factory=dict)  # reserved count -> first time seen
    error: str = ""


@dataclass
class Run:
    pods: int
    clients: int
    latencies: list[float]  # seconds, of the clients that got it
    missing: int
    cpu_seconds: float
    load: float

    def quantile(self, q: int) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


async def page(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], client: Client
) -> None:
    try:
        async with session.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            async for message in ws:
                now = time.time()
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                client.frames += 1
                client.last_frame_at = now
                client.first_frame.set()
                found = RESERVED.search(message.data, 0, NOTE_WITHIN)
                if found:
                    client.seen.setdefault(int(found.group(2)), now)
            client.error = f"closed {ws.close_code}"
    except Exception as exc:
        client.error = f"{type(exc).__name__}: {exc}"
    client.first_frame.set()


async def quiet(clients: list[Client], *, seconds: float, at_most: float) -> None:
    """Until no client received anything for `seconds` (or `at_most` passed)."""
    deadline = time.time() + at_most
    while time.time() < deadline:
        latest = max((c.last_frame_at for c in clients), default=0.0)
        if time.time() - latest >= seconds:
            return
        await asyncio.sleep(0.2)


async def measure_size(
    args: argparse.Namespace, env: dict[str, str], port: int, pid: int, pods: int, pool_id: str
) -> list[Run]:
    url = f"ws://{HOST}:{port}/ws/pools/{pool_id}/"
    clients = [Client() for _ in range(args.clients)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [
            asyncio.create_task(
                page(
                    session,
                    url,
                    {
                        "Cookie": f"{args.setup['cookie']}={args.setup['sessions'][i]}",
                        "Origin": f"http://{HOST}:{port}",
                    },
                    client,
                )
            )
            for i, client in enumerate(clients)
        ]
        started = time.time()
        await asyncio.wait_for(
            asyncio.gather(*(c.first_frame.wait() for c in clients)), args.connect_wait
        )
        errors = [c.error for c in clients if c.error]
        print(
            f"{pods} pods: {args.clients} pages open, first frames after "
            f"{time.time() - started:.1f} s{f'; errors: {errors[:3]}' if errors else ''}",
            flush=True,
        )
        await quiet(clients, seconds=1.0, at_most=args.connect_wait)
        runs = []
        for n in range(1, args.runs + 1):
            cpu_before = process_cpu_seconds(pid)
            done = await asyncio.to_thread(
                manage,
                args.source,
                env,
                "shell",
                "--no-imports",
                "-c",
                CHANGE.format(pool_id=pool_id),
            )
            change = json.loads(done.strip().splitlines()[-1])
            committed_at, expected = change["committed_at"], change["reserved"]
            deadline = committed_at + args.wait
            while time.time() < deadline and not all(expected in c.seen for c in clients):
                await asyncio.sleep(0.05)
            cpu = process_cpu_seconds(pid) - cpu_before
            latencies = [c.seen[expected] - committed_at for c in clients if expected in c.seen]
            run = Run(
                pods=pods,
                clients=args.clients,
                latencies=latencies,
                missing=args.clients - len(latencies),
                cpu_seconds=cpu,
                load=os.getloadavg()[0],
            )
            runs.append(run)
            print(
                f"| {pods} | {n} | {run.quantile(50) * 1000:.0f} | {run.quantile(95) * 1000:.0f} "
                f"| {max(latencies, default=float('nan')) * 1000:.0f} | {run.missing} "
                f"| {run.cpu_seconds:.2f} | {run.load:.1f} |",
                flush=True,
            )
            await quiet(clients, seconds=1.0, at_most=args.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="100,1000", help="pool sizes, comma separated")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wait", type=float, default=30.0, help="seconds a client may take")
    parser.add_argument("--connect-wait", type=float, default=600.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    standard_arguments(parser, source="the checkout to serve")
    args = parser.parse_args()
    if args.smoke:
        args.pods, args.clients, args.runs, args.wait = "4", 5, 1, 15.0
    args.source = args.source.resolve()
    sizes = [int(n) for n in args.pods.split(",")]

    redis_client = redis.Redis.from_url(args.redis_url)
    redis_client.flushdb()
    var_dir = tempfile.mkdtemp(prefix="bench-fanout-")
    env = {
        **os.environ,
        "PYTHONPATH": str(args.source),
        "DJANGO_SETTINGS_MODULE": "poolsadmin.settings",
        "DEBUG": "true",
        "SECRET_KEY": secrets.token_hex(32),
        "ALLOWED_HOSTS": HOST,
        "DATABASE_URL": url_for(args.admin_url, BENCH_DB),
        "CHANNEL_LAYER_URL": args.redis_url,
        "LOG_LEVEL": "WARNING",
        "POOLSADMIN_VAR_DIR": var_dir,
    }
    print(f"{machine()}; load {os.getloadavg()[0]:.2f}; serving {args.source} {args.label}")
    recreate(args.admin_url, BENCH_DB)
    runs: list[Run] = []
    try:
        manage(args.source, env, "migrate", "--noinput", "-v0")
        started = time.time()
        script = SETUP.format(sizes=sizes, runs=args.runs, clients=args.clients)
        printed = manage(args.source, env, "shell", "--no-imports", "-c", script)
        args.setup = json.loads(printed.strip().splitlines()[-1])
        print(f"built pools of {sizes} pods in {time.time() - started:.0f} s")
        print("| pods | run | p50 ms | p95 ms | max ms | never got it | web CPU s | load |")
        print("|---|---|---|---|---|---|---|---|")
        for pods in sizes:
            port = free_port()
            log = Path(var_dir) / f"daphne-{pods}.log"
            web = start_web(args.source, env, port, log)
            try:
                pool_id = args.setup["pools"][str(pods)]
                runs += asyncio.run(measure_size(args, env, port, web.pid, pods, pool_id))
            finally:
                stop_process(web)
            for message, count in log_errors(log).most_common(3):
                print(f"{pods} pods, server log: {count} x {message}")
    finally:
        drop(args.admin_url, BENCH_DB)
        redis_client.flushdb()
        redis_client.close()
    record(args, runs)


def record(args: argparse.Namespace, runs: list[Run]) -> None:
    rows: list[tuple[str, str, str, bool | None]] = []
    label = f" ({args.label})" if args.label else ""
    for run in runs:
        what = f"{run.clients} pages, {run.pods:,} pods x 4 slots{label}"
        p95 = run.quantile(95) * 1000
        met = p95 < GOAL_MS and run.missing == 0
        rows += [
            (
                f"slot change -> every page, p50 / p95, {what}",
                f"{run.quantile(50) * 1000:.0f} / {p95:.0f} ms",
                f"p95 < {GOAL_MS} ms",
                met,
            ),
            (
                f"pages that never got it ({args.wait:.0f} s), {what}",
                str(run.missing),
                "0",
                run.missing == 0,
            ),
            (f"web process CPU for the change, {what}", f"{run.cpu_seconds:.2f} s", "—", None),
        ]
    if not (args.smoke or args.no_record):
        command = "python bench/fanout.py " + " ".join(sys.argv[1:])
        append_results(TITLE, rows, command)
        print(f"recorded {len(rows)} rows in docs/benchmarks.md")


if __name__ == "__main__":
    main()
