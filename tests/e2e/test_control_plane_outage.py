"""Issue acceptance (SPEC 5): an outage of poolsadmin itself fails none of the work its agents
kept doing.

Real processes: a daphne web process and `manage.py worker`, on a database of their own (an
SQLite file, or a scratch PostgreSQL database on the PostgreSQL run), a k8s pool of two pods on
the fake Kubernetes API server (in this process, reached over HTTP), and a reference agent per
pod in threads of this process, running a shell command as their work.

Three tasks are under way when web and worker are killed (SIGKILL): a plan that runs on
through the outage, a confirmed apply that finishes during it (its `applied` arrives late),
and an apply_pending plan_and_apply whose slot is reserved. Nobody listens for longer than
heartbeat timeout + grace, while the agents keep working and keep trying. The worker comes back
first (and sees that nobody can hear agents), then the web; the reserved apply is confirmed.
Every task ends `success`/`applied`, no pod is deleted, no reservation is dropped, no agent is
taken offline, and the outage is on record.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings

from poolsadmin.agents.reference import ReferenceAgent
from poolsadmin.kube.fake_api import FakeKubeServer, start_fake_kube
from tests.conftest import IS_POSTGRES
from tests.processes import MANAGE, ROOT, free_port

HEARTBEAT_TIMEOUT, GRACE = 4, 3  # seconds: an outage of 12 s is far longer than both
OUTAGE_SECONDS = 12.0
TICK = 0.5  # the web records that it listens every 0.5 s; a gap is 2 s
DEADLINE = 90.0
# The agents' work: a plan_and_apply's plan finds changes at once (exit 2), an apply takes 5 s
# (so the one under way finishes during the outage), a plan 20 s (it runs on through it).
WORK = (
    'if [ "$ACTION" = apply ]; then sleep 5; '
    'elif [ "$TASK_TYPE" = plan_and_apply ]; then sleep 0.3; exit 2; '
    "else sleep 20; fi"
)

SEED = f"""
import json
from django.contrib.auth.models import Group, User
from poolsadmin.api.roles import ROLE_ADMIN
from poolsadmin.api.services import api_token_create
from poolsadmin.pools.services import pool_create, pool_token_create
from poolsadmin.tasks.services import task_submit, workspace_create
pool = pool_create(
    name="outage", actor="test", pool_type="k8s", namespace="ci", pod_image="agent:1",
    min_replicas=2, max_replicas=2, heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT},
    task_grace_seconds={GRACE},
)
token = pool_token_create(pool=pool, name="agents", actor="test").secret
user = User.objects.create_user(username="ops")
user.groups.add(Group.objects.get(name=ROLE_ADMIN))
api = api_token_create(user=user, name="test")[1]
tasks = [
    task_submit(workspace=workspace_create(name=f"ws-{{kind}}", pool=pool, actor="test"),
                task_type=kind, actor="test").pk
    for kind in ("plan", "plan_and_apply", "plan_and_apply")
]
print(json.dumps({{"pool": pool.pool_id, "token": token, "api": api, "tasks": tasks}}))
"""

CHECK = """
import json
from collections import Counter
from poolsadmin.events.models import Event
from poolsadmin.tasks.models import Workspace, WorkspaceTask
kinds = Counter(Event.objects.values_list("kind", flat=True))
print(json.dumps({
    "statuses": {t.pk: t.status for t in WorkspaceTask.objects.all()},
    "reused": {t.pk: t.reuse_workdir for t in WorkspaceTask.objects.all()},
    "locked": list(Workspace.objects.filter(is_locked=True).values_list("name", flat=True)),
    "kinds": kinds,
    "resumed": list(Event.objects.filter(kind="hearing.resumed").values_list("reason", flat=True)),
}))
"""


@pytest.fixture
def database_env(tmp_path: Path, collected_static: Path) -> Iterator[dict[str, str]]:
    """Environment for the processes: a database of their own, on this run's engine (and the
    collected static files, which the pages need with DEBUG off)."""
    if not IS_POSTGRES:
        yield {
            "DATABASE_URL": "",
            "POOLSADMIN_VAR_DIR": str(tmp_path),
            "STATIC_ROOT": str(collected_static),
        }
        return
    db = settings.DATABASES["default"]
    name = f"poolsadmin_outage_{os.getpid()}_{secrets.token_hex(3)}"
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    user, password = db.get("USER") or "postgres", db.get("PASSWORD") or ""
    server = f"postgres://{user}{':' + password if password else ''}@{host}:{port}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {
            "DATABASE_URL": f"{server}/{name}",
            "POOLSADMIN_VAR_DIR": str(tmp_path),
            "STATIC_ROOT": str(collected_static),
        }
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    """The web and worker processes, the fake cluster, and a reference agent per pod."""

    def __init__(self, env: dict[str, str], fake: FakeKubeServer, logs: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fake = fake
        self.logs = logs
        self.env = {
            **os.environ,
            **env,
            "DEBUG": "false",
            "SECRET_KEY": "outage-test-" + secrets.token_hex(16),
            "ALLOWED_HOSTS": "127.0.0.1",
            # No TLS in front: the test reads pages over plain HTTP.
            "SECURE_SSL_REDIRECT": "false",
            "CHANNEL_LAYER_URL": "",
            "KUBE_MODE": "url",
            "KUBE_API_URL": fake.url,
            "POOLSADMIN_PUBLIC_URL": self.url,
            "POOLSADMIN_HEARING_KEEPER": "true",
            "POOLSADMIN_HEARING_TICK_SECONDS": str(TICK),
        }
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, ReferenceAgent] = {}
        self.stop_agents = threading.Event()
        self.seed: dict[str, Any] = {}

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [*MANAGE, *args], env=self.env, cwd=ROOT, check=True, capture_output=True, text=True
        )
        return done.stdout

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        return subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=log)

    def start_web(self) -> None:
        self.web = self._spawn(
            "web",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port),
             "poolsadmin.asgi:application"],
        )  # fmt: skip
        until(lambda: self._answers(), "the web process to answer", process=self.web)

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", [*MANAGE, "worker"])

    def kill(self) -> None:
        """Both die at once (a node lost, a database failover taking both down). The killed
        worker keeps its leases; the restarted one takes them over at once (same host)."""
        for process in (self.web, self.worker):
            assert process is not None
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        self.stop_agents.set()
        for process in (self.web, self.worker):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/login/", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    # --- the kubelet: a reference agent per running pod ---------------------------------------

    def kubelet(self) -> None:
        while not self.stop_agents.wait(0.2):
            for pod in self.fake.pods("ci"):
                name = pod["metadata"]["name"]
                if pod.get("status", {}).get("phase") != "Running" or name in self.agents:
                    continue
                agent = ReferenceAgent(
                    url=self.url,
                    token=self.seed["token"],
                    name=name,
                    heartbeat_interval=0.5,
                    command=WORK,
                    max_backoff=1.0,  # back within the pool's timeout once poolsadmin is
                )
                self.agents[name] = agent
                threading.Thread(target=agent.run, args=(self.stop_agents,), daemon=True).start()

    # --- the admin API --------------------------------------------------------------------------

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}/api/v1/{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={
                "Authorization": f"Bearer {self.seed['api']}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def task(self, task_id: int) -> dict[str, Any]:
        return dict(self.api("GET", f"tasks/{task_id}"))


def until(
    condition: Callable[[], bool],
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    deadline: float = DEADLINE,
) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process died while waiting for {what}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {deadline} s")
        time.sleep(0.2)


def test_an_outage_of_poolsadmin_longer_than_timeout_and_grace_fails_none_of_the_agents_work(
    database_env: dict[str, str], tmp_path: Path
) -> None:
    fake = start_fake_kube(auto_run=True)
    stack = Stack(database_env, fake, tmp_path)
    kubelet = threading.Thread(target=stack.kubelet, daemon=True)
    try:
        stack.manage("migrate", "-v0")
        stack.seed = json.loads(stack.manage("shell", "-c", SEED).strip().splitlines()[-1])
        plan, apply_now, apply_later = stack.seed["tasks"]
        stack.start_web()
        stack.start_worker()
        kubelet.start()

        def under_way() -> bool:
            tasks = {t: stack.task(t) for t in stack.seed["tasks"]}
            if tasks[apply_now]["status"] == "apply_pending" and not tasks[apply_now].get(
                "apply_confirmed_by"
            ):
                stack.api("POST", f"tasks/{apply_now}/confirm-apply", {})
            # "running" (not "dispatched"): the agent has acknowledged it.
            return (
                tasks[plan]["diagnosis"]["code"] == "running"
                and tasks[apply_now]["stage"] == "applying"
                and tasks[apply_now]["diagnosis"]["code"] == "running"
                and tasks[apply_later]["status"] == "apply_pending"
            )

        until(under_way, "plan running, apply acknowledged, reservation held")

        stack.kill()
        time.sleep(OUTAGE_SECONDS)
        stack.start_worker()  # first: it must see that nobody can hear agents yet
        time.sleep(2 * TICK * 4)
        stack.start_web()
        stack.api("POST", f"tasks/{apply_later}/confirm-apply", {})

        finished = {"success", "applied", "planned_and_finished", "failed", "cancelled"}
        until(
            lambda: all(stack.task(t)["status"] in finished for t in stack.seed["tasks"]),
            "every task finished",
        )
    finally:
        stack.stop()
        fake.stop()
        kubelet.join(timeout=5)

    report = json.loads(stack.manage("shell", "-c", CHECK).strip().splitlines()[-1])
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    statuses = {int(k): v for k, v in report["statuses"].items()}
    assert statuses == {plan: "success", apply_now: "applied", apply_later: "applied"}, logs
    assert report["reused"][str(apply_later)] is True, "the confirmed apply lost its reservation"
    assert report["locked"] == []
    kinds = report["kinds"]
    for kind in ("task.lost", "task.reservation_lost", "agent.offline", "pod.agent_lost"):
        assert kind not in kinds, (kind, report)
    deletes = [r for r in fake.requests_log if r.method == "DELETE"]
    assert deletes == [], "a pod was deleted"
    assert any("could not hear agents from" in r for r in report["resumed"]), report["resumed"]
