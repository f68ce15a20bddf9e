"""`manage.py demo`: the whole product in one process, on the zero-setup default.

The demo pool is a k8s pool, and its cluster is the fake Kubernetes API server
(`poolsadmin.kube.fake_api`), in-process: pods the autoscaler creates run at once
(`auto_run`). Before anything else the fake cluster gets every pod the ledger knows for the
pool (it lives in memory, the ledger on disk): the reconciler would otherwise find them
vanished and drop task 598's reservation. The worker reaches it through `kube_override`.

Main thread: the ASGI development server (daphne's `runserver`). Side threads, started once
the server accepts connections, in this order:

1. the "kubelet": every second it looks at the fake cluster's pods and runs a simulated
   reference agent, named after the pod, for each running pod, and stops the agent of each
   pod that is gone (scale-down, reconciler) or no longer running;
2. the worker loops (scheduler, reconciler, autoscaler, diagnosis), once the agents of the
   ledger's pods have registered. The order matters on a re-run: the reconciler would
   otherwise find the agents' heartbeats of the previous run too old, call them lost and drop
   task 598's reservation;
3. a little traffic: new tasks every ~10 s, and confirmations of other tasks' applies, so the
   pool stays alive. Task 598 is never confirmed: it stays apply_pending on its reserved slot,
   the founding incident, for anyone to look at.

Ctrl-C or SIGTERM stops the server (daphne handles the signal); the threads are then stopped.
"""

from __future__ import annotations

import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections, connection
from django.db.models import Q

from poolsadmin.agents.reference import ReferenceAgent, Simulation
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_POOL_ID,
    DEMO_USERS,
    DEMO_WORKSPACES,
    INCIDENT_TASK_ID,
    DemoSeed,
    demo_agent_state,
    demo_ledger_outdated,
    demo_seed,
)
from poolsadmin.kube.adapter import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POOL_LABEL,
    KubeClient,
    KubeConfig,
)
from poolsadmin.kube.fake_api import FakeKubeServer, start_fake_kube
from poolsadmin.lib import clock
from poolsadmin.lib.errors import DomainError
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import FINISHED_PHASES, AgentPool, Pod, PoolType
from poolsadmin.tasks.models import TaskStatus, TaskType, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply, task_submit
from poolsadmin.worker.cluster_access import kube_override
from poolsadmin.worker.loops import LOOPS
from poolsadmin.worker.management.commands.worker import run_loops

logger = logging.getLogger("poolsadmin.demo")

TRAFFIC_ACTOR = "user:demo-traffic"
# Seconds between two traffic steps (uniform), and the backlog above which none is added.
TRAFFIC_INTERVAL = (7.0, 13.0)
TRAFFIC_MAX_PENDING = 8
# How long a planned apply waits before the traffic confirms it, so reserved slots of other
# tasks can be seen next to 598's.
CONFIRM_AFTER = timedelta(seconds=25)
AGENT_HEARTBEAT_SECONDS = 1.0
AGENT_SIMULATION = Simulation(duration_seconds=13.0, changes_ratio=0.5)  # 9-17 s per task
KUBELET_INTERVAL_SECONDS = 1.0


class _AgentRequestsFilter(logging.Filter):
    """Drop the access-log lines of successful agent API calls: three agents heartbeating
    every second would bury everything else on the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        details = record.args
        if isinstance(details, dict):
            path = str(details.get("path", ""))
            status = details.get("status", 0)
            if path.startswith("/api/v1/agents/") and isinstance(status, int) and status < 400:
                return False
        return True


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: connections of a previous run in TIME_WAIT do not block it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_server(port: int, stop: threading.Event, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            stop.wait(0.2)
    return False


def _thread(name: str, target: Callable[[], None]) -> threading.Thread:
    """A daemon thread that closes its own database connection when it ends."""

    def run() -> None:
        try:
            target()
        except Exception:
            logger.exception("demo thread %s crashed", name)
        finally:
            connection.close()

    thread = threading.Thread(target=run, name=f"demo-{name}", daemon=True)
    thread.start()
    return thread


# --- the fake cluster and its kubelet -------------------------------------------------------------


def fake_cluster_restore(server: FakeKubeServer) -> list[str]:
    """Put every pod the ledger knows for a k8s pool into the fake cluster, running, with the
    pool's label: the fake cluster lives in memory, the ledger on disk. Pods being scaled
    down (cordoned) come back too; the autoscaler deletes them again. Returns the pod names."""
    names: list[str] = []
    pools = AgentPool.objects.filter(pool_type=PoolType.K8S).exclude(namespace="")
    for pool in pools:
        pods = Pod.objects.filter(pool=pool).exclude(phase__in=FINISHED_PHASES)
        for name, uid in pods.order_by("name").values_list("name", "uid"):
            if server.pod(name, pool.namespace) is None:
                # With the uid the ledger knows: another uid is another pod under the name,
                # which the reconciler would take for a replacement of this one.
                server.add_pod(
                    pool.namespace,
                    name,
                    labels={POOL_LABEL: pool.pool_id, MANAGED_BY_LABEL: MANAGED_BY},
                    phase="Running",
                    image=pool.pod_image or "busybox",
                    uid=uid,
                )
            names.append(name)
    return names


class PodAgent(Protocol):
    """What the kubelet runs for a pod: `ReferenceAgent`, or a stub in tests."""

    def run(self, stop: threading.Event) -> None: ...


class Kubelet:
    """The demo's stand-in for the kubelets: a pod that runs has an agent named after it, a pod
    that is gone (or finished, or being deleted) has none. `sync()` is one look at the fake
    cluster; `run()` looks every second until stopped, then stops every agent."""

    def __init__(
        self,
        *,
        server: FakeKubeServer,
        namespaces: Callable[[], list[str]],
        agent_factory: Callable[[str], PodAgent],
    ) -> None:
        self.server = server
        self.namespaces = namespaces
        self.agent_factory = agent_factory
        self._agents: dict[str, tuple[threading.Event, threading.Thread]] = {}

    @property
    def running(self) -> list[str]:
        """Pods whose agent runs, by name."""
        return sorted(self._agents)

    def _running_pods(self) -> set[str]:
        names: set[str] = set()
        for namespace in self.namespaces():
            for pod in self.server.pods(namespace):
                metadata = pod.get("metadata", {})
                if pod.get("status", {}).get("phase") != "Running":
                    continue
                if "deletionTimestamp" in metadata:
                    continue
                names.add(str(metadata.get("name", "")))
        return names

    def sync(self) -> tuple[list[str], list[str]]:
        """Start the agents of new running pods, stop those of pods that are gone.
        Returns (started, stopped) pod names."""
        pods = self._running_pods()
        stopped = sorted(name for name in self._agents if name not in pods)
        for name in stopped:
            self._stop(name)
        started = sorted(name for name in pods if name not in self._agents)
        for name in started:
            agent = self.agent_factory(name)
            stop = threading.Event()
            self._agents[name] = (
                stop,
                _thread(f"agent-{name}", functools.partial(agent.run, stop)),
            )
        return started, stopped

    def _stop(self, name: str) -> None:
        stop, thread = self._agents.pop(name)
        stop.set()
        thread.join(timeout=5)

    def stop_all(self) -> None:
        for name in list(self._agents):
            self._stop(name)

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    started, stopped = self.sync()
                except Exception:  # a bad look must not end the kubelet
                    logger.exception("demo kubelet: sync failed")
                    started, stopped = [], []
                for name in started:
                    logger.info(
                        "demo kubelet: pod %s runs; started its agent",
                        name,
                        extra=log_ids(pod=name),
                    )
                for name in stopped:
                    logger.info(
                        "demo kubelet: pod %s is gone; stopped its agent",
                        name,
                        extra=log_ids(pod=name),
                    )
                stop.wait(KUBELET_INTERVAL_SECONDS)
        finally:
            self.stop_all()


def _k8s_namespaces() -> list[str]:
    close_old_connections()
    return sorted(
        set(
            AgentPool.objects.filter(pool_type=PoolType.K8S)
            .exclude(namespace="")
            .values_list("namespace", flat=True)
        )
    )


# --- traffic -------------------------------------------------------------------------------------


def traffic_step(*, rng: random.Random) -> list[str]:
    """1. confirm the applies of other tasks that have waited a little (never 598's);
    2. submit one to three tasks to random demo workspaces unless the backlog is full.
    Returns what it did, in words."""
    done: list[str] = []
    now = clock.now()
    planned = WorkspaceTask.objects.filter(
        pool_id=DEMO_POOL_ID,
        status=TaskStatus.APPLY_PENDING,
        apply_confirmed_by="",
        planned_at__lt=now - CONFIRM_AFTER,
    ).exclude(pk=INCIDENT_TASK_ID)
    for task_id in planned.values_list("id", flat=True):
        try:
            task_confirm_apply(
                task_id=task_id, actor=TRAFFIC_ACTOR, description="confirmed by the demo traffic"
            )
            done.append(f"confirmed the apply of #{task_id}")
        except DomainError as exc:  # cancelled or confirmed meanwhile
            logger.info(
                "demo traffic: not confirming #%s: %s", task_id, exc, extra=log_ids(task=task_id)
            )

    # The backlog counts what waits for capacity. Tasks parked in a locked workspace wait for
    # a person (598's confirmation, an admin's unlock after a lost apply) and would otherwise
    # fill it for good, and the pool would go quiet.
    backlog = WorkspaceTask.objects.filter(
        Q(task_type=TaskType.PLAN) | Q(workspace__is_locked=False),
        pool_id=DEMO_POOL_ID,
        status=TaskStatus.PENDING,
    )
    room = TRAFFIC_MAX_PENDING - backlog.count()
    workspaces = list(Workspace.objects.filter(pk__in=[w for w, _ in DEMO_WORKSPACES]))
    # Like a user would, send applies and drift checks only where they can run: not into a
    # locked workspace, and one plan_and_apply per workspace at a time.
    busy = set(
        WorkspaceTask.objects.filter(
            task_type=TaskType.PLAN_AND_APPLY,
            status__in=[TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.APPLY_PENDING],
        ).values_list("workspace_id", flat=True)
    )
    for _ in range(min(room, rng.choice((1, 2, 2, 3)))):
        task_type = rng.choices(
            (TaskType.PLAN, TaskType.PLAN_AND_APPLY, TaskType.DRIFT_CHECK), weights=(5, 3, 2)
        )[0]
        choices = [
            w
            for w in workspaces
            if task_type == TaskType.PLAN
            or (not w.is_locked and (task_type != TaskType.PLAN_AND_APPLY or w.pk not in busy))
        ]
        if not choices:
            task_type, choices = TaskType.PLAN, workspaces
        workspace = rng.choice(choices)
        if task_type == TaskType.PLAN_AND_APPLY:
            busy.add(workspace.pk)
        task = task_submit(
            workspace=workspace,
            task_type=task_type,
            actor=TRAFFIC_ACTOR,
            description="submitted by the demo traffic",
        )
        done.append(f"submitted #{task.pk} {task_type} in {workspace.name}")
    return done


def _traffic(stop: threading.Event) -> None:
    rng = random.Random()
    while not stop.wait(rng.uniform(*TRAFFIC_INTERVAL)):
        close_old_connections()
        try:
            for line in traffic_step(rng=rng):
                logger.info("demo traffic: %s", line)
        except Exception:  # a bad step must not end the demo's traffic
            logger.exception("demo traffic step failed")


# --- the command ---------------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Run the demo in one process: seed the ledger, serve the dashboard on 127.0.0.1, run "
        "the worker loops, simulated agents and a little traffic. Ctrl-C stops it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8000, help="port to serve on")
        parser.add_argument(
            "--reset", action="store_true", help="wipe the ledger and seed it afresh"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        port: int = options["port"]
        if not _port_free(port):
            raise CommandError(f"port {port} is in use; choose another with --port")
        logging.getLogger("django.channels.server").addFilter(_AgentRequestsFilter())

        reset = options["reset"]
        if not reset and demo_ledger_outdated():
            self.stdout.write(
                f"demo: pool {DEMO_POOL_ID} is the static pool of an earlier demo; it is a k8s "
                "pool now, so the demo starts on a fresh ledger"
            )
            reset = True
        seed = demo_seed(reset=reset)
        if not seed.incident_visible:
            # Someone confirmed, cancelled or let task 598's reservation expire in an earlier
            # run; the demo exists to show it, so it replays the incident from scratch.
            self.stdout.write(
                f"demo: task {INCIDENT_TASK_ID} no longer holds its reserved slot; "
                "replaying the demo on a fresh ledger"
            )
            seed = demo_seed(reset=True)
        if seed.created:
            self.stdout.write("demo: seeded " + ", ".join(seed.created))
        # Stopping the demo abandons the simulated agents' work; an apply lost that way keeps
        # its workspace locked until an admin has reviewed it (SPEC 3). Say so, once.
        lost = Workspace.objects.filter(is_locked=True).exclude(
            lock_task__status=TaskStatus.APPLY_PENDING
        )
        names = sorted(lost.values_list("name", flat=True))
        if names:
            self.stdout.write(
                f"demo: {', '.join(names)} stay locked: an apply was lost when the demo last "
                "stopped. Review and unlock them, or start afresh with `manage.py demo --reset`."
            )

        # The cluster of the k8s pool: in-process, pods run as soon as they are created.
        fake = start_fake_kube(auto_run=True)
        pods = fake_cluster_restore(fake)
        kube = KubeClient(KubeConfig(mode="url", url=fake.url))
        kube_override(kube)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        threads.append(
            _thread(
                "starter", lambda: self._start_side_threads(seed, port, stop, threads, fake, pods)
            )
        )
        try:
            # Daphne installs its own SIGINT/SIGTERM handlers (--noreload) and returns here
            # when it stops.
            call_command("runserver", f"127.0.0.1:{port}", use_reloader=False)
        finally:
            self.stdout.write("demo: stopping the agents, the worker and the traffic")
            stop.set()
            for thread in list(threads):
                thread.join(timeout=10)
            kube_override(None)
            kube.close()
            fake.stop()
            self.stdout.write("demo: stopped")

    def _start_side_threads(
        self,
        seed: DemoSeed,
        port: int,
        stop: threading.Event,
        threads: list[threading.Thread],
        fake: FakeKubeServer,
        pods: list[str],
    ) -> None:
        if not _wait_for_server(port, stop):
            if not stop.is_set():
                logger.error("demo: the server did not come up on port %s", port)
            return
        url = f"http://127.0.0.1:{port}"
        agents: dict[str, ReferenceAgent] = {}

        def agent_for_pod(name: str) -> ReferenceAgent:
            pod = fake.pod(name) or {}
            agents[name] = ReferenceAgent(
                url=url,
                token=seed.token_secret,
                name=name,
                heartbeat_interval=AGENT_HEARTBEAT_SECONDS,
                simulation=AGENT_SIMULATION,
                pod_uid=str(pod.get("metadata", {}).get("uid", "")),
                # The identity survives a restart of the demo (seed_demo writes the seeded
                # agents' files): registering again under a taken name needs its secret.
                state_file=demo_agent_state(name),
            )
            return agents[name]

        kubelet = Kubelet(server=fake, namespaces=_k8s_namespaces, agent_factory=agent_for_pod)
        threads.append(_thread("kubelet", lambda: kubelet.run(stop)))

        def registered() -> bool:
            return all(name in agents and agents[name].agent_id for name in pods)

        deadline = time.monotonic() + 30
        while not registered() and time.monotonic() < deadline:
            if stop.wait(0.2):
                return
        if not registered():
            logger.warning("demo: not every agent registered within 30 s; starting the worker")

        threads.append(_thread("worker", lambda: run_loops(list(LOOPS.values()), stop=stop)))
        threads.append(_thread("traffic", lambda: _traffic(stop)))
        self._banner(url, seed, fake, pods)

    def _banner(self, url: str, seed: DemoSeed, fake: FakeKubeServer, pods: list[str]) -> None:
        logins = "  ".join(f"{user} / {password}" for user, password, _ in DEMO_USERS)
        task_url = f"{url}/tasks/{INCIDENT_TASK_ID}/"
        lines = [
            "",
            "=" * 78,
            f"  poolsadmin demo: {url}/",
            f"  Log in as: {logins}",
            f"  Pool:      {url}/pools/{DEMO_POOL_ID}/",
            f"  Task {INCIDENT_TASK_ID}:  {task_url} is the founding incident: apply_pending,",
            f"             slot {seed.incident_slot} stays RESERVED for its apply; the demo never",
            "             confirms it. Once confirmed, the apply runs in that very slot.",
            f"  Cluster:   fake Kubernetes API at {fake.url}, namespace {seed.pool.namespace}:",
            f"             pods {', '.join(pods)} (min {seed.pool.min_replicas}, max "
            f"{seed.pool.max_replicas}); the autoscaler adds and removes pods,",
            "             each pod runs a simulated agent named after it · Ctrl-C stops the demo",
            "=" * 78,
            "",
        ]
        self.stdout.write("\n".join(lines))
        self.stdout.flush()
