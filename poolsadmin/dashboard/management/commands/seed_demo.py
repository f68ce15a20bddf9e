"""Seed the demo ledger: the founding incident (task 598) in a busy k8s pool.

The pool is a k8s pool (min 2, max 4 pods). The seed writes its two first pods to the ledger
under fixed names, as the reconciler adopts pods it finds in the cluster, and registers their
agents under the same names (the pod name is the agent name, SPEC 7). `manage.py demo` puts
every ledger pod of the pool into its in-process fake cluster before the worker starts, so
the reconciler finds them there and keeps task 598's reservation.

Everything goes through the services, so the seeded state is one the product itself can reach.
Two deliberate exceptions, each commented where it happens: the task id sequence is moved so
the incident task is #598, and `--reset` deletes ledger rows (there is no service that wipes a
ledger, and none should exist outside a demo).

Idempotent: every object is created only if missing, and the incident scene (task 598 and the
queue around it) only by the run that creates task 598. A second run changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.db.models import Model

from poolsadmin.agents.models import Agent
from poolsadmin.agents.reference import identity_save
from poolsadmin.agents.services import agent_heartbeat, agent_register
from poolsadmin.autoscaler.models import PoolHold, ScaleDecision
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.ids import sha256_hex
from poolsadmin.pools.models import (
    AgentPool,
    FreezeWindow,
    Pod,
    PodPhase,
    PoolAllowedWorkspace,
    PoolToken,
    PoolType,
    Slot,
    SlotState,
)
from poolsadmin.pools.services import pod_create, pool_create, pool_token_create
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import (
    TaskStatus,
    TaskType,
    WaitReason,
    Workspace,
    WorkspaceTask,
)
from poolsadmin.tasks.services import task_accept, task_report, task_submit, workspace_create

SEED_ACTOR = "system:seed_demo"

DEMO_POOL_ID = "pool-z73eh8ihywlmgx0x"
DEMO_POOL_NAME = "prod-agents"
DEMO_NAMESPACE = "iac-agents"
DEMO_POD_IMAGE = "registry.example.com/iac-agent:1.42"
DEMO_MIN_REPLICAS = 2
DEMO_MAX_REPLICAS = 4
# The pool's first pods, named as the API server names them from the autoscaler's
# generateName ("prod-agents-" + 5 characters). The first one holds task 598's reservation.
DEMO_AGENT_NAMES = ("prod-agents-7xk2p", "prod-agents-m4q9z")
INCIDENT_TASK_ID = 598
INCIDENT_WORKSPACE_ID = "ws-mb7m9ii5ey"

# (workspace_id, name). The first one is the workspace of the incident.
DEMO_WORKSPACES = (
    (INCIDENT_WORKSPACE_ID, "payments-prod"),
    ("ws-k3v8q2n7xd", "network-core"),
    ("ws-p9f4t6c1ra", "billing-api"),
    ("ws-d2h7m5w8ze", "identity-iam"),
    ("ws-r6b1x9k4qu", "dns-zones"),
    ("ws-t8n3j5v2lc", "k8s-platform"),
    ("ws-y4c7g1s6pm", "observability"),
    ("ws-f5q2w8d3hn", "data-lake"),
)

# The queue behind the incident, submitted after task 598 (so they are #599 onwards), oldest
# first. More than the 7 free slots of the two seeded pods, so the autoscaler scales up to
# max at once and the queue stays visible meanwhile: #599 blocked behind #598, a
# plan_and_apply waiting for plan_and_apply capacity (the first pod's only plan_and_apply
# place is held by #598's reservation), drift checks waiting last.
DEMO_QUEUE = (
    (INCIDENT_WORKSPACE_ID, TaskType.PLAN_AND_APPLY, "Rotate the payment gateway TLS certs"),
    ("ws-k3v8q2n7xd", TaskType.PLAN, "Plan: new transit gateway attachment"),
    ("ws-p9f4t6c1ra", TaskType.PLAN_AND_APPLY, "Scale billing workers to 6"),
    ("ws-d2h7m5w8ze", TaskType.PLAN, "Plan: least-privilege CI role"),
    ("ws-r6b1x9k4qu", TaskType.PLAN, "Plan: add MX records"),
    ("ws-t8n3j5v2lc", TaskType.PLAN_AND_APPLY, "Upgrade node groups to 1.31"),
    ("ws-y4c7g1s6pm", TaskType.DRIFT_CHECK, "Nightly drift check"),
    ("ws-f5q2w8d3hn", TaskType.PLAN, "Plan: partition the events table"),
    ("ws-k3v8q2n7xd", TaskType.PLAN, "Plan: tighten NACLs"),
    (INCIDENT_WORKSPACE_ID, TaskType.PLAN, "Speculative plan for PR #412"),
    ("ws-d2h7m5w8ze", TaskType.PLAN_AND_APPLY, "Add break-glass admin role"),
    ("ws-f5q2w8d3hn", TaskType.DRIFT_CHECK, "Nightly drift check"),
    ("ws-t8n3j5v2lc", TaskType.PLAN, "Plan: enable cluster autoscaler"),
    ("ws-r6b1x9k4qu", TaskType.DRIFT_CHECK, "Nightly drift check"),
    ("ws-p9f4t6c1ra", TaskType.PLAN, "Plan: new invoice queue"),
)

# Demo logins only: printed by `manage.py demo`, never used outside a local demo.
DEMO_USERS = (
    ("admin", "admin-demo", "admin"),
    ("viewer", "viewer-demo", "viewer"),
)


@dataclass(frozen=True)
class DemoSeed:
    pool: AgentPool
    token_secret: str
    agent_names: tuple[str, ...]
    created: list[str]  # what this run created, in words (empty on a re-run)
    incident_slot: str  # "prod-agents-7xk2p[0]": task 598's reserved slot; "" once gone

    @property
    def incident_visible(self) -> bool:
        return bool(self.incident_slot)


def token_path() -> Path:
    return Path(settings.VAR_DIR) / "demo-token"


# --- reset -------------------------------------------------------------------------------------


def ledger_wipe() -> None:
    """Delete every ledger row, children first (slots and tasks are PROTECTed references).

    A direct delete, on purpose: no service wipes a ledger, and none should outside a demo.
    Users and groups are kept.
    """
    models: tuple[type[Model], ...] = (
        Event,
        ScaleDecision,
        PoolHold,
        WaitReason,
        Slot,
        Pod,
        WorkspaceTask,
        PoolAllowedWorkspace,
        Workspace,
        Agent,
        PoolToken,
        FreezeWindow,
        AgentPool,
    )
    with transaction.atomic():
        Workspace.objects.update(lock_task=None)
        for model in models:
            model._default_manager.all().delete()


# --- building blocks ---------------------------------------------------------------------------


@contextlib.contextmanager
def _at(moment: datetime) -> Iterator[None]:
    """Run services as if at `moment`, so the seeded history reads like a real one
    ("reserved for 2 h") instead of everything having happened a second ago."""
    with clock.frozen_at(moment):
        yield


def _pool() -> tuple[AgentPool, bool]:
    pool = AgentPool.objects.filter(pk=DEMO_POOL_ID).first()
    if pool is not None:
        return pool, False
    pool = pool_create(
        pool_id=DEMO_POOL_ID,
        name=DEMO_POOL_NAME,
        actor=SEED_ACTOR,
        pool_type=PoolType.K8S,
        description="Production Terraform agents on Kubernetes (demo)",
        slots_per_pod=4,
        plan_and_apply_per_pod=1,
        min_replicas=DEMO_MIN_REPLICAS,
        max_replicas=DEMO_MAX_REPLICAS,
        pod_image=DEMO_POD_IMAGE,
        namespace=DEMO_NAMESPACE,
    )
    return pool, True


def _token(pool: AgentPool) -> tuple[str, bool]:
    """The secret in var/demo-token if it still opens this pool, else a new token.

    Tokens are stored hashed, so the secret of an existing token cannot be read back: the file
    is the only place a re-run can find it.
    """
    path = token_path()
    if path.exists():
        secret = path.read_text().strip()
        usable = PoolToken.objects.filter(
            pool=pool, token_hash=sha256_hex(secret), revoked_at__isnull=True
        ).exclude(expires_at__lte=clock.now())
        if secret and usable.exists():
            return secret, False
    issued = pool_token_create(pool=pool, name="demo agents", actor=SEED_ACTOR)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(issued.secret + "\n")
    path.chmod(0o600)
    return issued.secret, True


def _users() -> list[str]:
    """The demo logins. Django's auth API is the service for users (poolsadmin has none).
    The `viewer` and `admin` groups come from the roles migration (api/0002_roles); they are
    created here, without permissions, only if that migration has not run."""
    created: list[str] = []
    for username, password, group_name in DEMO_USERS:
        group, _ = Group.objects.get_or_create(name=group_name)
        if User.objects.filter(username=username).exists():
            continue
        user = User.objects.create_user(username=username, password=password)
        user.groups.add(group)
        created.append(f"user {username}")
    return created


def _workspaces(pool: AgentPool) -> tuple[dict[str, Workspace], list[str]]:
    existing = {w.pk: w for w in Workspace.objects.filter(pk__in=[w for w, _ in DEMO_WORKSPACES])}
    created: list[str] = []
    for workspace_id, name in DEMO_WORKSPACES:
        if workspace_id not in existing:
            existing[workspace_id] = workspace_create(
                name=name, pool=pool, actor=SEED_ACTOR, workspace_id=workspace_id
            )
            created.append(f"workspace {workspace_id}")
    return existing, created


def demo_ledger_outdated() -> bool:
    """The ledger holds the demo pool of an earlier seed, a static pool: replay it afresh."""
    return AgentPool.objects.filter(pk=DEMO_POOL_ID).exclude(pool_type=PoolType.K8S).exists()


def _pods(pool: AgentPool) -> list[str]:
    """The pool's first pods, as the reconciler adopts them from the cluster: a ledger pod
    with idle slots. `manage.py demo` creates them in its fake cluster under the same names."""
    known = set(Pod.objects.filter(pool=pool).values_list("name", flat=True))
    created: list[str] = []
    for name in DEMO_AGENT_NAMES:
        if name not in known:
            pod_create(pool=pool, name=name, phase=PodPhase.RUNNING, actor=SEED_ACTOR)
            created.append(f"pod {name}")
    return created


def _agents(pool: AgentPool) -> tuple[dict[str, Agent], list[str]]:
    """The simulated agents' registrations, one per seeded pod and named after it: each is
    linked to its pod. `manage.py demo` then runs reference agents under the same names."""
    agents = {a.agent_name: a for a in Agent.objects.filter(pool=pool, retired_at__isnull=True)}
    created: list[str] = []
    for name in DEMO_AGENT_NAMES:
        if name not in agents:
            registration = agent_register(pool=pool, name=name, version="demo")
            agents[name] = registration.agent
            # `manage.py demo` runs reference agents under these names: they go on with this
            # identity (registering again under a taken name needs its secret).
            identity_save(
                demo_agent_state(name),
                name=name,
                agent_id=registration.agent.agent_id,
                secret=registration.secret,
            )
            created.append(f"agent {name}")
    return agents, created


def demo_agent_state(name: str) -> Path:
    """Where the demo's reference agent called `name` keeps its identity."""
    return Path(settings.VAR_DIR) / "demo-agents" / f"{name}.json"


def _next_task_id_becomes(task_id: int) -> None:
    """Make the next task id `task_id`.

    The one write around the services, and why: the demo replays the founding incident, and
    operators recognise it as task 598 (SPEC 1). Only moving the id sequence gets that id
    without inventing 597 tasks. Safe only while no task has an id >= `task_id`.
    """
    if WorkspaceTask.objects.filter(pk__gte=task_id).exists():
        raise CommandError(
            f"tasks with ids >= {task_id} exist but task {task_id} does not; "
            "run `manage.py seed_demo --reset` to start the demo ledger afresh"
        )
    table = WorkspaceTask._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)", [table, task_id - 1]
            )
        elif connection.vendor == "sqlite":
            # AUTOINCREMENT tables keep their counter in sqlite_sequence.
            cursor.execute("DELETE FROM sqlite_sequence WHERE name = %s", [table])
            cursor.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (%s, %s)", [table, task_id - 1]
            )
        else:
            raise CommandError(f"seed_demo does not support the {connection.vendor} database")


def _incident(
    workspaces: dict[str, Workspace], agents: dict[str, Agent], now: datetime
) -> WorkspaceTask:
    """Task 598: a plan_and_apply whose plan found changes two hours ago. It is apply_pending,
    its slot on the first pod is reserved for the apply, and its workspace is locked."""
    _next_task_id_becomes(INCIDENT_TASK_ID)
    planned_at = now - timedelta(hours=2)
    with _at(planned_at - timedelta(minutes=6)):
        task = task_submit(
            workspace=workspaces[INCIDENT_WORKSPACE_ID],
            task_type=TaskType.PLAN_AND_APPLY,
            actor="user:maria.k",
            description="Raise the payments API rate limits",
        )
    if task.pk != INCIDENT_TASK_ID:
        raise CommandError(f"the incident task got id {task.pk}, not {INCIDENT_TASK_ID}")
    with _at(planned_at - timedelta(minutes=5, seconds=58)):
        # Only agents with a fresh heartbeat take work.
        for agent in agents.values():
            if agent.agent_name in DEMO_AGENT_NAMES:
                agent_heartbeat(agent=agent, running_task_ids=[])
        outcome = task_dispatch(task_id=task.pk, actor="system:scheduler")
    if not outcome.dispatched:
        raise CommandError(f"could not dispatch task {task.pk}: {outcome.diagnosis}")
    task.refresh_from_db()
    assert task.agent is not None
    with _at(planned_at - timedelta(minutes=5, seconds=57)):
        task_accept(task_id=task.pk, agent=task.agent)
    with _at(planned_at):
        task_report(task_id=task.pk, agent=task.agent, status=TaskStatus.APPLY_PENDING)
    task.refresh_from_db()
    return task


def _queue(workspaces: dict[str, Workspace], now: datetime) -> list[WorkspaceTask]:
    """The pending work around the incident, submitted over the last few minutes. The
    scheduler and the simulated agents run it: a seeded "running" task would be unknown to
    the agents and failed by the heartbeat cross-check."""
    tasks = []
    for i, (workspace_id, task_type, description) in enumerate(DEMO_QUEUE):
        with _at(now - timedelta(seconds=20 * (len(DEMO_QUEUE) - i))):
            tasks.append(
                task_submit(
                    workspace=workspaces[workspace_id],
                    task_type=task_type,
                    actor="user:ci",
                    description=description,
                )
            )
    return tasks


def incident_slot() -> Slot | None:
    """Task 598's reserved slot while the incident is visible: the task is apply_pending,
    unconfirmed, and holds its reservation."""
    return (
        Slot.objects.select_related("pod")
        .filter(
            task_id=INCIDENT_TASK_ID,
            state=SlotState.RESERVED,
            task__status=TaskStatus.APPLY_PENDING,
            task__apply_confirmed_by="",
        )
        .first()
    )


def demo_seed(*, reset: bool = False) -> DemoSeed:
    if reset:
        ledger_wipe()
    now = clock.now()
    created: list[str] = []
    # The set-up is dated three hours back, so the agents' pods are older than task 598.
    with _at(now - timedelta(hours=3)):
        pool, pool_created = _pool()
        workspaces, new_workspaces = _workspaces(pool)
        new_pods = _pods(pool)
        agents, new_agents = _agents(pool)
    if pool_created:
        created.append(f"pool {pool.pool_id} (k8s, namespace {pool.namespace})")
    created += new_workspaces + new_pods + new_agents
    secret, token_created = _token(pool)
    if token_created:
        created.append(f"pool token (secret in {token_path()})")
    created += _users()

    if not WorkspaceTask.objects.filter(pk=INCIDENT_TASK_ID).exists():
        _incident(workspaces, agents, now)
        queue = _queue(workspaces, now)
        created.append(f"task {INCIDENT_TASK_ID} (apply_pending, reserved slot)")
        created.append(f"tasks #{queue[0].pk}-#{queue[-1].pk} (pending)")
        # The agents were registered in the past; a heartbeat now makes them online, as the
        # simulated agents will keep them.
        for agent in agents.values():
            if agent.agent_name in DEMO_AGENT_NAMES:
                agent_heartbeat(agent=agent, running_task_ids=[])

    slot = incident_slot()
    return DemoSeed(
        pool=pool,
        token_secret=secret,
        agent_names=DEMO_AGENT_NAMES,
        created=created,
        incident_slot=f"{slot.pod.name}[{slot.index}]" if slot else "",
    )


class Command(BaseCommand):
    help = (
        "Seed the demo ledger: k8s pool pool-z73eh8ihywlmgx0x with two pods, task 598 "
        "apply_pending on its reserved slot, a queue, and the admin/viewer logins. Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--reset", action="store_true", help="delete all ledger data first (not users)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        seed = demo_seed(reset=options["reset"])
        if seed.created:
            self.stdout.write("seed_demo: created " + ", ".join(seed.created))
        else:
            self.stdout.write("seed_demo: nothing to do, the demo ledger is already seeded")
        if not seed.incident_visible:
            self.stdout.write(
                self.style.WARNING(
                    f"seed_demo: task {INCIDENT_TASK_ID} no longer holds its reserved slot "
                    "(confirmed, cancelled or expired); use --reset to replay the incident"
                )
            )
