"""Issue 10 item 7: the several-replica design (SPEC 10: PostgreSQL + Redis + N web + N worker)
run as several processes.

Two daphne web processes and two `manage.py worker` processes on a PostgreSQL database of
their own, the channel layer on Redis, a k8s pool of two pods on the fake Kubernetes API server
(reached over HTTP), and a reference agent per pod, one talking to each web process:

1. plans and plan_and_applys submitted through both webs run to the end, and a confirmed apply
   runs on its own reserved slot (I-598);
2. a WebSocket client logged in on web 2 sees a slot released through web 1: the change
   crosses processes through Redis;
3. SIGKILL of the worker that holds the `reconciler` lease: the other worker takes it (and
   the per-pool reconcile lease) within the lease time, and a plan submitted after the kill
   runs to the end;
4. afterwards the ledger check finds no drift and no task was dispatched twice.

The product wants "within 1 s" (SPEC 8) and a hand-over "within the lease time"; durations on
this shared machine are noise, so the test waits for each with a generous bound and prints
what it measured (`pytest -s` shows it; the figures are in the report, not asserted).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import websocket
from django.conf import settings

from poolsadmin.kube.fake_api import start_fake_kube
from poolsadmin.realtime.fanout import REFRESH_SECONDS
from poolsadmin.worker.lease import RECONCILER_LEASE
from poolsadmin.worker.reconcile import LEASE_TTL_SECONDS, pool_lease, pool_lease_ttl
from tests.e2e.processes import Stack, Web, until
from tests.redis_server import redis_or_skip

pytestmark = pytest.mark.postgres_only

# A Redis database of this test's own (tests/realtime flushes 13). It is not flushed: every
# key in it is named after this run's pool (a random id) or a channel's random name, so two
# runs at once on one Redis do not meet; the test deletes its pool's keys afterwards.
REDIS_URL = "redis://127.0.0.1:6379/12"
PASSWORD = "multi-replica-" + os.urandom(6).hex()
# The agents' work: a plan_and_apply's plan finds changes (exit 2); plans and applies succeed.
WORK = (
    'if [ "$ACTION" = apply ]; then sleep 0.5; '
    'elif [ "$TASK_TYPE" = plan_and_apply ]; then sleep 0.3; exit 2; '
    "else sleep 0.5; fi"
)
FINISHED = {"success", "applied", "planned_and_finished", "failed", "cancelled"}

SEED = f"""
import json
from django.contrib.auth.models import Group, User
from poolsadmin.api.roles import ROLE_ADMIN
from poolsadmin.api.services import api_token_create
from poolsadmin.pools.services import pool_create, pool_token_create
from poolsadmin.tasks.services import workspace_create
pool = pool_create(
    name="replicas", actor="test", pool_type="k8s", namespace="ci", pod_image="agent:1",
    min_replicas=2, max_replicas=2,
)
token = pool_token_create(pool=pool, name="agents", actor="test").secret
user = User.objects.create_user(username="ops", password={PASSWORD!r})
user.groups.add(Group.objects.get(name=ROLE_ADMIN))
api = api_token_create(user=user, name="test")[1]
workspaces = {{
    name: workspace_create(name=name, pool=pool, actor="test").workspace_id
    for name in ("ws-plans", "ws-a", "ws-b", "ws-after")
}}
print(json.dumps({{"pool": pool.pool_id, "token": token, "api": api, "ws": workspaces}}))
"""

CHECK = """
import json
from collections import Counter
from poolsadmin.events.models import Event
from poolsadmin.pools.models import AgentPool
from poolsadmin.tasks.models import WorkspaceTask
from poolsadmin.worker.reconcile import ledger_check
dispatches = Counter(
    f"{e.task_id}:{e.data.get('action')}" for e in Event.objects.filter(kind="task.dispatched")
)
print(json.dumps({
    "drift": [str(c) for p in AgentPool.objects.all() for c in ledger_check(pool=p, dry_run=True)],
    "drift_events": list(
        Event.objects.filter(kind__startswith="drift.").values_list("kind", "reason")
    ),
    "dispatches": dispatches,
    "tasks": {
        t.pk: {"type": t.task_type, "status": t.status, "reused": t.reuse_workdir,
               "plan_agent": t.plan_agent_id, "agent": t.agent_id}
        for t in WorkspaceTask.objects.all()
    },
}))
"""


@pytest.fixture
def redis_url() -> str:
    redis_or_skip(REDIS_URL).close()
    return REDIS_URL


@pytest.fixture
def stack(database_env: dict[str, str], redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    """Two webs and two workers on PostgreSQL and Redis, the fake cluster, the agents; every
    process ended afterwards, whatever happened."""
    fake = start_fake_kube(auto_run=True)
    stack = Stack(
        {**database_env, "CHANNEL_LAYER_URL": redis_url}, fake, tmp_path, work=WORK, webs=2
    )
    try:
        stack.manage("migrate", "-v0")
        # The processes start while the seed runs: each takes seconds to import Django.
        for index in range(len(stack.webs)):
            stack.start_web(index, wait=False)
        stack.start_worker()
        stack.start_worker()
        stack.seed_with(SEED)
        stack.start_kubelet()
        for index in range(len(stack.webs)):
            stack.wait_for_web(index)
        yield stack
    finally:
        stack.stop()
        fake.stop()
        if stack.seed:
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(f"*{stack.seed['pool']}*"))
            if keys:
                client.delete(*keys)
            client.close()


# --- reading the ledger and the dashboard, as an operator would ------------------------------


def sql(stack: Stack, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        return list(conn.execute(query, params).fetchall())


def lease_holder(stack: Stack, name: str) -> str | None:
    """Who holds (or last held) lease `name`: `host:pid:random:pid-namespace`."""
    rows = sql(stack, "SELECT holder FROM worker_leases WHERE name = %s", name)
    return str(rows[0][0]) if rows else None


def holder_of(stack: Stack, holder: str | None) -> subprocess.Popen[bytes] | None:
    """The worker process whose lease holder id `holder` is (worker/lease.py)."""
    if holder is None or not holder.startswith(f"{socket.gethostname()}:"):
        return None
    pid = int(holder.split(":")[1])
    return next((w for w in stack.workers if w.pid == pid), None)


def pool_slots(stack: Stack, *, web: int = 0) -> dict[int, dict[str, Any]]:
    pool = stack.api("GET", f"pools/{stack.seed['pool']}", web=web)
    return {slot["task_id"]: slot for pod in pool["pods"] for slot in pod["slots"]}


def submit(stack: Stack, workspace: str, task_type: str, *, web: int) -> int:
    ws = stack.seed["ws"][workspace]
    return int(stack.api("POST", f"workspaces/{ws}/tasks", {"task_type": task_type}, web=web)["id"])


def finished(stack: Stack, *task_ids: int) -> bool:
    return all(stack.task(t)["status"] in FINISHED for t in task_ids)


def log_in(web: Web, username: str, password: str) -> str:
    """The session cookie of `username`, logged in through `web`'s login form as a browser
    does (CSRF token from the form, cookies by hand so no redirect swallows them)."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    try:
        conn.request("GET", "/login/")
        page = conn.getresponse()
        html = page.read().decode()
        cookies = SimpleCookie()
        for header in page.headers.get_all("Set-Cookie") or []:
            cookies.load(header)
        found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
        assert found, html
        form = {"username": username, "password": password, "csrfmiddlewaretoken": found[1]}
        conn.request(
            "POST",
            "/login/",
            body=urllib.parse.urlencode(form),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Cookie": "; ".join(f"{k}={m.value}" for k, m in cookies.items()),
                "Referer": f"{web.url}/login/",
            },
        )
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 302, f"login refused: {answer.status}"
        for header in answer.headers.get_all("Set-Cookie") or []:
            cookies.load(header)
    finally:
        conn.close()
    return cookies[settings.SESSION_COOKIE_NAME].value


def receive_until(page: websocket.WebSocket, marker: str, *, before: float) -> float:
    """Read the pushed renders until one holds `marker`; when it arrived (monotonic)."""
    while True:
        left = before - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no render with {marker!r} before the deadline")
        page.settimeout(left)
        try:
            frame = page.recv()
        except websocket.WebSocketTimeoutException:
            continue
        if marker in str(frame):
            return time.monotonic()


# --- the test ---------------------------------------------------------------------------------


def test_two_webs_and_two_workers_share_the_work_the_live_page_and_the_leader_lease(
    stack: Stack,
) -> None:
    def agents_online() -> bool:
        pods = stack.api("GET", f"pools/{stack.seed['pool']}")["pods"]
        return len(pods) == 2 and all(p["agent"] and p["agent"]["online"] for p in pods)

    until(agents_online, "two pods with an online agent")
    # The kubelet gives the webs turns: one agent talks to web 1, the other to web 2.
    assert sorted(a.url for a in stack.agents.values()) == sorted(w.url for w in stack.webs)

    # 1. Work submitted through both webs, scheduled by both workers.
    plans = [submit(stack, "ws-plans", "plan", web=0), submit(stack, "ws-plans", "plan", web=1)]
    apply_a = submit(stack, "ws-a", "plan_and_apply", web=1)
    apply_b = submit(stack, "ws-b", "plan_and_apply", web=0)
    until(
        lambda: (
            finished(stack, *plans)
            and stack.task(apply_a)["status"] == "apply_pending"
            and stack.task(apply_b)["status"] == "apply_pending"
        ),
        "plans done and both plan_and_applys apply_pending",
    )

    # 2. The live pool page on web 2; the slot released through web 1.
    session = log_in(stack.webs[1], "ops", PASSWORD)
    ws_url = stack.webs[1].url.replace("http://", "ws://")
    page = websocket.create_connection(
        f"{ws_url}/ws/pools/{stack.seed['pool']}/",
        cookie=f"{settings.SESSION_COOKIE_NAME}={session}",
        origin=stack.webs[1].url,
        timeout=10,
    )
    try:
        connected = time.monotonic()
        # The pool's hub re-renders on its own every REFRESH_SECONDS: the wait for the push ends
        # before its first refresh, so only the event that crossed Redis can end it.
        before_refresh = connected + REFRESH_SECONDS - 1.0
        slot = pool_slots(stack)[apply_b]
        receive_until(
            page, f'class="slot slot-reserved" id="slot-{slot["id"]}"', before=before_refresh
        )
        group = redis.Redis.from_url(REDIS_URL).zcard(f"asgi:group:pool.{stack.seed['pool']}")
        assert group >= 1, "web 2's consumer did not join its group on Redis"
        caused = time.monotonic()
        stack.api(
            "POST",
            f"slots/{slot['id']}/release",
            {"reason": "multi-replica test", "expected_version": slot["version"]},
            web=0,
        )
        seen = receive_until(
            page, f'class="slot slot-idle" id="slot-{slot["id"]}"', before=before_refresh
        )
        # Printed, not asserted (see the module docstring): SPEC 8 wants it under 1 s.
        print(f"\nweb 2 showed the release made through web 1 after {seen - caused:.3f} s")
    finally:
        page.close()

    # The confirmed applies: A on its own reserved slot, B (released) on a fresh one.
    stack.api("POST", f"tasks/{apply_a}/confirm-apply", {}, web=1)
    stack.api("POST", f"tasks/{apply_b}/confirm-apply", {}, web=0)
    until(lambda: finished(stack, apply_a, apply_b), "both applies finished")

    # 3. SIGKILL of the leader. It is not reaped until the hand-over: a zombie still "runs",
    # so the survivor cannot see that it died and must wait the lease out, as a worker in
    # another pod (another host) would; reaped at once, it is taken over at once (lease.py).
    until(lambda: holder_of(stack, lease_holder(stack, RECONCILER_LEASE)) is not None, "a leader")
    leader = holder_of(stack, lease_holder(stack, RECONCILER_LEASE))
    assert leader is not None
    survivor = next(w for w in stack.workers if w is not leader)
    leader.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    after = submit(stack, "ws-after", "plan", web=1)

    def survivor_leads() -> bool:
        return holder_of(stack, lease_holder(stack, RECONCILER_LEASE)) is survivor

    # The dead leader renewed at most LEASE_TTL_SECONDS before the kill; the survivor tries
    # every few seconds (loops.py), a slow pass on a loaded machine adds more.
    until(
        survivor_leads, "the survivor holding the reconciler lease", deadline=LEASE_TTL_SECONDS + 30
    )
    handed_over = time.monotonic()
    print(
        f"the reconciler lease passed to the other worker {handed_over - killed:.1f} s "
        f"after the kill (TTL {LEASE_TTL_SECONDS:.0f} s)"
    )
    until(
        lambda: holder_of(stack, lease_holder(stack, pool_lease(stack.seed["pool"]))) is survivor,
        "the survivor reconciling the pool",
        deadline=pool_lease_ttl() + 30,
    )
    leader.wait(timeout=10)
    until(lambda: finished(stack, after), "the plan submitted after the kill finished")
    assert survivor.poll() is None

    stack.stop()
    report = json.loads(stack.manage("shell", "-c", CHECK).strip().splitlines()[-1])
    tasks = {int(k): v for k, v in report["tasks"].items()}
    logs = stack.logs_text()
    assert {t: v["status"] for t, v in tasks.items()} == {
        plans[0]: "success",
        plans[1]: "success",
        apply_a: "applied",
        apply_b: "applied",
        after: "success",
    }, logs
    assert tasks[apply_a]["reused"] is True, "the confirmed apply did not reuse its reserved slot"
    assert tasks[apply_b]["reused"] is False, "the released reservation was reused"
    # Each plan_and_apply holds at most one slot per pod at a time: their plans ran on both
    # pods, so on both agents, each heartbeating through its own web.
    assert tasks[apply_a]["plan_agent"] != tasks[apply_b]["plan_agent"]

    # 4. The ledger is whole and nothing ran twice.
    assert report["drift"] == [] and report["drift_events"] == [], report
    expected = {f"{t}:plan" for t in (*plans, after)} | {
        f"{t}:{action}" for t in (apply_a, apply_b) for action in ("plan", "apply")
    }
    assert report["dispatches"] == dict.fromkeys(expected, 1), report["dispatches"]
