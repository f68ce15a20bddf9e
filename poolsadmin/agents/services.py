"""Agent writes: registration, heartbeats, liveness; and agent authentication."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction

from poolsadmin.agents.liveness import Liveness, liveness_read
from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Forbidden, InvalidInput, NotFound
from poolsadmin.lib.ids import random_id, secret_hex, sha256_hex
from poolsadmin.pools.models import AgentPool, Pod, PoolType
from poolsadmin.pools.services import pod_for_static_agent, pod_link_agent
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask

MAX_NAME = 253
SECRET_PREFIX = "ags_"


@dataclass(frozen=True)
class Registration:
    agent: Agent
    secret: str  # `ags_<64 hex>`, shown once: only its SHA-256 is stored


def _agent_named(*, pool: AgentPool, name: str) -> Agent | None:
    """The agent called `name` in `pool`, row-locked until the transaction ends."""
    return Agent.objects.select_for_update().filter(pool=pool, agent_name=name).first()


def _agent_create(
    *, pool: AgentPool, name: str, version: str, ip: str | None, secret_hash: str
) -> Agent | None:
    """A new agent row, or None if a concurrent registration of the same name won the race.

    `select_for_update` locks nothing when there is no row yet, so two first registrations of
    one name can both get here; the unique (pool, agent_name) constraint refuses the second
    insert. The savepoint undoes only that insert, and the caller carries on with the winner's
    row as a re-registration instead of failing with a 500."""
    now = clock.now()
    try:
        with transaction.atomic():
            return Agent.objects.create(
                agent_id=random_id("agent-"),
                agent_name=name,
                pool=pool,
                status=AgentStatus.ONLINE,
                version=version,
                ip=ip,
                last_ping_at=now,
                registered_at=now,
                secret_hash=secret_hash,
            )
    except IntegrityError:
        if not Agent.objects.filter(pool=pool, agent_name=name).exists():
            raise  # not the name race (an agent_id collision, say): let it surface
        return None


def agent_register(
    *, pool: AgentPool, name: str, version: str = "", ip: str | None = None
) -> Registration:
    """Register (or re-register: same name, same pool reuses the agent). In a static pool the
    agent is its own execution host; in a k8s pool the name is the pod name, and the agent is
    matched to that pod.

    Every registration issues a new agent secret and the previous one stops working: an agent
    that restarts gets a fresh one, and a copy of an old secret is useless. The rotation is in
    the re-registration's event, so an unexpected takeover of a name is visible."""
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidInput(f"name is required (at most {MAX_NAME} characters)", field="name")
    if len(version) > 64:
        raise InvalidInput("version is longer than 64 characters", field="version")
    secret = f"{SECRET_PREFIX}{secret_hex(32)}"
    secret_hash = sha256_hex(secret)
    now = clock.now()
    with transaction.atomic():
        agent = _agent_named(pool=pool, name=name)
        created: Agent | None = None
        if agent is None:
            created = _agent_create(
                pool=pool, name=name, version=version, ip=ip, secret_hash=secret_hash
            )
            agent = created or _agent_named(pool=pool, name=name)
            assert agent is not None  # _agent_create returns None only if the row exists
        if created is not None:
            kind, before, reason = "agent.registered", None, ""
        else:
            before = {"status": agent.status, "version": agent.version}
            status = AgentStatus.DRAINING if agent.status == AgentStatus.DRAINING else "online"
            Agent.objects.filter(pk=agent.pk).update(
                status=status,
                version=version,
                ip=ip,
                last_ping_at=now,
                registered_at=now,
                secret_hash=secret_hash,
            )
            agent.refresh_from_db()
            kind, reason = "agent.reregistered", "registered again: the agent secret was rotated"
        actor = f"agent:{agent.agent_id}"
        event_record(
            actor=actor,
            kind=kind,
            target_type="agent",
            target_id=agent.agent_id,
            pool_id=pool.pool_id,
            before=before,
            after={
                "status": agent.status,
                "name": name,
                "version": version,
                "secret_rotated": created is None,
            },
            reason=reason,
        )
        if pool.pool_type == PoolType.STATIC:
            pod_for_static_agent(pool=pool, agent_id=agent.agent_id, name=name, actor=actor)
        else:
            pod = Pod.objects.filter(pool=pool, name=name).first()
            if pod is not None:
                pod_link_agent(pod=pod, agent_id=agent.agent_id, actor=actor)
        broadcast_pool_changed(pool_id=pool.pool_id, kind="agent", payload={"agent": name})
    return Registration(agent=agent, secret=secret)


def agent_authenticate(*, pool: AgentPool, agent_id: str, secret: str) -> Agent:
    """The agent `agent_id` of `pool`, if `secret` is the one it got when it last registered.

    The pool token proves only that the caller is some agent of the pool; the secret proves
    which one, so no agent can heartbeat, accept or report as another. Unknown agent:
    NotFound; agent of another pool, missing or wrong secret: Forbidden. Writes nothing."""
    agent = Agent.objects.filter(pk=agent_id).first()
    if agent is None:
        raise NotFound(f"agent {agent_id} does not exist", field="agent_id")
    if agent.pool_id != pool.pool_id:
        raise Forbidden(f"agent {agent_id} does not belong to the token's pool", field="agent_id")
    if not secret:
        raise Forbidden(f"the agent secret of {agent_id} is missing", field="agent_secret")
    # Constant time: comparing hashes with == would leak, byte by byte, how much matched.
    if not agent.secret_hash or not hmac.compare_digest(
        agent.secret_hash.encode(), sha256_hex(secret).encode()
    ):
        raise Forbidden(
            f"wrong agent secret for {agent_id}: it is another agent's, or a later "
            "registration of this agent replaced it; register again to get a new one",
            field="agent_secret",
        )
    return agent


@dataclass
class HeartbeatAnswer:
    assignments: list[dict[str, Any]] = field(default_factory=list)
    cancellations: list[dict[str, Any]] = field(default_factory=list)


def agent_heartbeat(
    *,
    agent: Agent,
    running_task_ids: list[int],
    cpu: float | None = None,
    memory: float | None = None,
) -> HeartbeatAnswer:
    """Record liveness, cross-check what the agent runs against the ledger, and answer with
    new assignments and cancellations.

    * A task the ledger has running on this agent that the agent does not report gets
      `unreported_since`; the reconciler fails it after the grace period.
    * A task the agent reports that the ledger does not assign to it (cancelled, failed,
      reassigned, unknown) gets a cancel instruction: this is how a cancel reaches the agent
      that runs the task, and only that one (I-510).
    * Assignments are dispatches not yet acknowledged: the ledger was written first (I-644),
      and they are repeated until the agent accepts them.
    """
    now = clock.now()
    reported = sorted(set(running_task_ids))
    answer = HeartbeatAnswer()
    with transaction.atomic():
        was = Agent.objects.filter(pk=agent.pk).values_list("status", flat=True).first()
        status = AgentStatus.DRAINING if was == AgentStatus.DRAINING else AgentStatus.ONLINE
        Agent.objects.filter(pk=agent.pk).update(
            last_ping_at=now,
            status=status,
            reported_task_ids=reported,
            cpu=cpu,
            memory=memory,
        )
        if was == AgentStatus.OFFLINE:
            event_record(
                actor=f"agent:{agent.agent_id}",
                kind="agent.online",
                target_type="agent",
                target_id=agent.agent_id,
                pool_id=agent.pool_id,
                before={"status": AgentStatus.OFFLINE},
                after={"status": AgentStatus.ONLINE},
            )
            broadcast_pool_changed(
                pool_id=agent.pool_id, kind="agent", payload={"agent": agent.agent_name}
            )
        mine = {
            t.pk: t
            for t in WorkspaceTask.objects.filter(
                agent_id=agent.agent_id,
                status__in=[TaskStatus.RUNNING, TaskStatus.APPLY_PENDING],
            ).select_related("workspace")
        }
        running_acked = [
            t for t in mine.values() if t.status == TaskStatus.RUNNING and t.acked_at is not None
        ]
        missing = [t.pk for t in running_acked if t.pk not in reported]
        present = [t.pk for t in running_acked if t.pk in reported]
        if missing:
            WorkspaceTask.objects.filter(
                pk__in=missing, status=TaskStatus.RUNNING, unreported_since__isnull=True
            ).update(unreported_since=now)
        if present:
            WorkspaceTask.objects.filter(pk__in=present, unreported_since__isnull=False).update(
                unreported_since=None
            )
        for task_id in reported:
            if task_id not in mine:
                answer.cancellations.append(
                    {"task_id": task_id, "reason": "the ledger does not assign it to this agent"}
                )
        for task in sorted(mine.values(), key=lambda t: t.pk):
            if task.status == TaskStatus.RUNNING and task.acked_at is None:
                answer.assignments.append(
                    {
                        "task_id": task.pk,
                        "workspace_id": task.workspace_id,
                        "task_type": task.task_type,
                        "action": "apply" if task.is_applying else "plan",
                        "pod": task.pod_name,
                        "slot": task.slot_index,
                        "reuse_workdir": task.reuse_workdir,
                    }
                )
    return answer


def agents_mark_offline(
    *,
    now: datetime,
    actor: str,
    only: AgentPool | None = None,
    liveness: Liveness | None = None,
) -> list[str]:
    """Online or draining agents without a heartbeat for their pool's timeout -> offline;
    of one pool (`only`), or of every pool. Silence counts only from when poolsadmin could
    hear agents again (`liveness`, read now if not given): nobody goes offline for a
    heartbeat that nobody could receive."""
    liveness = liveness or liveness_read(now=now)
    changed: list[str] = []
    for pool in [only] if only is not None else AgentPool.objects.all():
        cutoff = now - pool.heartbeat_timeout
        if not liveness.judges(cutoff):
            continue
        stale = Agent.objects.filter(
            pool=pool,
            status__in=[AgentStatus.ONLINE, AgentStatus.DRAINING],
            last_ping_at__lt=cutoff,
        )
        for agent in stale:
            with transaction.atomic():
                updated = Agent.objects.filter(
                    pk=agent.pk, status=agent.status, last_ping_at=agent.last_ping_at
                ).update(status=AgentStatus.OFFLINE)
                if not updated:
                    continue
                event_record(
                    actor=actor,
                    kind="agent.offline",
                    target_type="agent",
                    target_id=agent.agent_id,
                    pool_id=pool.pool_id,
                    before={"status": agent.status},
                    after={"status": AgentStatus.OFFLINE},
                    reason=f"no heartbeat since {agent.last_ping_at:%Y-%m-%d %H:%M:%S} UTC",
                )
                broadcast_pool_changed(
                    pool_id=pool.pool_id, kind="agent", payload={"agent": agent.agent_name}
                )
                changed.append(agent.agent_id)
    return changed
