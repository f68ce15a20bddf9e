"""Real processes for the end-to-end tests that run poolsadmin as it is deployed: daphne web
processes and `manage.py worker` processes on a database of their own, the fake Kubernetes API
server (in the test's process, reached over HTTP), and a reference agent per running pod in
threads of the test's process (the "kubelet"), spread over the web processes.

Ports are chosen at run time, readiness is polled, and `Stack.stop()` ends every process the
stack started, so a failing test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings

from poolsadmin.agents.reference import ReferenceAgent
from poolsadmin.kube.fake_api import FakeKubeServer
from tests.conftest import IS_POSTGRES
from tests.processes import MANAGE, ROOT, free_port

# Generous: two noisy cores run every process of the stack and the test at once.
DEADLINE = 90.0


def until(
    condition: Callable[[], bool],
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    deadline: float = DEADLINE,
    every: float = 0.2,
) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process died while waiting for {what}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {deadline} s")
        time.sleep(every)


@contextlib.contextmanager
def own_database(tmp_path: Path, static_root: Path) -> Iterator[dict[str, str]]:
    """Environment for the processes: a database of their own, on this run's engine (an
    SQLite file in `tmp_path`, or a scratch PostgreSQL database dropped afterwards), and the
    collected static files, which the pages need with DEBUG off."""
    common = {"POOLSADMIN_VAR_DIR": str(tmp_path), "STATIC_ROOT": str(static_root)}
    if not IS_POSTGRES:
        yield {"DATABASE_URL": "", **common}
        return
    db = settings.DATABASES["default"]
    name = f"poolsadmin_e2e_{os.getpid()}_{secrets.token_hex(3)}"
    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    user, password = db.get("USER") or "postgres", db.get("PASSWORD") or ""
    server = f"postgres://{user}{':' + password if password else ''}@{host}:{port}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {"DATABASE_URL": f"{server}/{name}", **common}
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Web:
    """One daphne process, on a port of its own that it keeps across restarts."""

    name: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/login/", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


class Stack:
    """Web and worker processes, the fake cluster, and a reference agent per running pod.

    `env` overrides the processes' environment (the database, CHANNEL_LAYER_URL, ...). Every
    web process is its agents' `POOLSADMIN_PUBLIC_URL`, so its hearing keeper asks itself;
    the workers give pods the first web's URL."""

    def __init__(
        self,
        env: dict[str, str],
        fake: FakeKubeServer,
        logs: Path,
        *,
        work: str,
        webs: int = 1,
        heartbeat_interval: float = 0.5,
    ) -> None:
        self.fake = fake
        self.logs = logs
        self.work = work
        self.heartbeat_interval = heartbeat_interval
        self.webs = [Web(name=f"web-{n}") for n in range(1, webs + 1)]
        self.url = self.webs[0].url
        self.env = {
            **os.environ,
            "DEBUG": "false",
            "SECRET_KEY": "e2e-test-" + secrets.token_hex(16),
            "ALLOWED_HOSTS": "127.0.0.1",
            # No TLS in front: the test reads pages over plain HTTP.
            "SECURE_SSL_REDIRECT": "false",
            "CHANNEL_LAYER_URL": "",
            "KUBE_MODE": "url",
            "KUBE_API_URL": fake.url,
            "POOLSADMIN_PUBLIC_URL": self.url,
            "POOLSADMIN_HEARING_KEEPER": "true",
            **env,
        }
        self.workers: list[subprocess.Popen[bytes]] = []
        self.agents: dict[str, ReferenceAgent] = {}
        self.stop_agents = threading.Event()
        self.seed: dict[str, Any] = {}
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._kubelet = threading.Thread(target=self._run_kubelet, daemon=True)

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [*MANAGE, *args], env=self.env, cwd=ROOT, check=True, capture_output=True, text=True
        )
        return done.stdout

    def seed_with(self, script: str) -> dict[str, Any]:
        """Run `script` in `manage.py shell`; it prints one JSON object last, kept as seed."""
        self.seed = json.loads(self.manage("shell", "-c", script).strip().splitlines()[-1])
        return self.seed

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv, env={**self.env, **(env or {})}, cwd=ROOT, stdout=log, stderr=log
        )
        self._spawned.append(process)
        return process

    def start_web(self, index: int = 0, *, wait: bool = True) -> Web:
        """Start (or restart) web process `index`; with `wait`, until it answers."""
        web = self.webs[index]
        web.process = self._spawn(
            web.name,
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web.port),
             "poolsadmin.asgi:application"],
            {"POOLSADMIN_PUBLIC_URL": web.url},
        )  # fmt: skip
        if wait:
            self.wait_for_web(index)
        return web

    def wait_for_web(self, index: int) -> None:
        web = self.webs[index]
        until(web.answers, f"{web.name} to answer", process=web.process)

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn(f"worker-{len(self.workers) + 1}", [*MANAGE, "worker"])
        self.workers.append(worker)
        return worker

    def start_kubelet(self) -> None:
        self._kubelet.start()

    def stop(self) -> None:
        """End every process this stack started and the agents; safe to call after a failure
        halfway through a start."""
        self.stop_agents.set()
        for process in self._spawned:
            if process.poll() is None:
                process.terminate()
        for process in self._spawned:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._kubelet.is_alive():
            self._kubelet.join(timeout=5)

    def logs_text(self) -> str:
        return "".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs.glob("*.log")
        )

    # --- the kubelet: a reference agent per running pod, the webs taking turns ------------------

    def _run_kubelet(self) -> None:
        while not self.stop_agents.wait(0.2):
            for pod in self.fake.pods("ci"):
                name = pod["metadata"]["name"]
                if pod.get("status", {}).get("phase") != "Running" or name in self.agents:
                    continue
                web = self.webs[len(self.agents) % len(self.webs)]
                agent = ReferenceAgent(
                    url=web.url,
                    token=self.seed["token"],
                    name=name,
                    heartbeat_interval=self.heartbeat_interval,
                    command=self.work,
                    max_backoff=1.0,  # back within the pool's timeout once poolsadmin is
                )
                self.agents[name] = agent
                threading.Thread(target=agent.run, args=(self.stop_agents,), daemon=True).start()

    # --- the admin API --------------------------------------------------------------------------

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, web: int = 0
    ) -> Any:
        request = urllib.request.Request(
            f"{self.webs[web].url}/api/v1/{path}",
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={
                "Authorization": f"Bearer {self.seed['api']}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def task(self, task_id: int, *, web: int = 0) -> dict[str, Any]:
        return dict(self.api("GET", f"tasks/{task_id}", web=web))
