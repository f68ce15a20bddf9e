"""Agent writes: registration, heartbeats, liveness; and agent authentication."""

from __future__ import annotations

import functools
import hmac
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction

from poolsadmin.agents.liveness import Liveness, liveness_read
from poolsadmin.agents.models import Agent, AgentStatus
from poolsadmin.agents.nudge import nudge_wait, nudge_waiter
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, Forbidden, InvalidInput, NotFound
from poolsadmin.lib.humanize import stamp
from poolsadmin.lib.ids import random_id, secret_hex, sha256_hex
from poolsadmin.pools.models import AgentPool, Pod, PoolType
from poolsadmin.pools.services import pod_for_static_agent, pod_link_agent
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_fail_lost

MAX_NAME = 253
SECRET_PREFIX = "ags_"
SECRET_RE = re.compile(r"^ags_[0-9a-f]{64}$")


@dataclass(frozen=True)
class Registration:
    agent: Agent
    secret: str  # `ags_<64 hex>`, shown once: only its SHA-256 is stored
    # The identity this registration ended: a k8s pod replaced by a new pod of the same name.
    retired: Agent | None = None


def _agent_named(*, pool: AgentPool, name: str) -> Agent | None:
    """The live agent called `name` in `pool`, row-locked until the transaction ends."""
    return (
        Agent.objects.select_for_update()
        .filter(pool=pool, agent_name=name, retired_at__isnull=True)
        .first()
    )


def _agent_create(
    *, pool: AgentPool, name: str, version: str, ip: str | None, secret_hash: str, pod_uid: str
) -> Agent | None:
    """A new agent row, or None if a concurrent registration of the same name won the race.

    `select_for_update` locks nothing when there is no row yet, so two first registrations of
    one name can both get here; the unique constraint on live names refuses the second
    insert. The savepoint undoes only that insert, and the caller treats the loser like any
    other registration under a taken name (it must prove it is that agent)."""
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
                pod_uid=pod_uid,
            )
    except IntegrityError:
        if not Agent.objects.filter(pool=pool, agent_name=name, retired_at__isnull=True).exists():
            raise  # not the name race (an agent_id collision, say): let it surface
        return None


def _secret_matches(agent: Agent, secret: str) -> bool:
    # Constant time: comparing hashes with == would leak, byte by byte, how much matched.
    return (
        bool(secret)
        and bool(agent.secret_hash)
        and hmac.compare_digest(agent.secret_hash.encode(), sha256_hex(secret).encode())
    )


def _replaced_pod(*, pool: AgentPool, agent: Agent, pod_uid: str) -> bool:
    """In a k8s pool, is the caller a new pod under the agent's name? Only if the cluster says
    so: the pod the reconciler adopted under that name has the caller's uid, and it is not the
    uid the agent registered from. A uid is not a secret, so it is checked against what the
    API server reported, never taken on the caller's word alone."""
    if pool.pool_type != PoolType.K8S or not pod_uid or pod_uid == agent.pod_uid:
        return False
    return Pod.objects.filter(pool=pool, name=agent.agent_name, uid=pod_uid).exists()


def _name_claim(
    *, pool: AgentPool, name: str, secret: str, proposed_secret: str, pod_uid: str
) -> tuple[Agent | None, Agent | None]:
    """Who may register under `name`: (the live agent the caller proved to be, or None if the
    name is free now; the identity this claim retired, if any). Conflict if the caller proves
    nothing. The agent row stays locked until the transaction ends."""
    agent = _agent_named(pool=pool, name=name)
    if agent is None:
        return None, None
    # Its current secret, or the one this very request proposed before (a retry).
    if _secret_matches(agent, secret) or _secret_matches(agent, proposed_secret):
        return agent, None
    if not _replaced_pod(pool=pool, agent=agent, pod_uid=pod_uid):
        k8s = pool.pool_type == PoolType.K8S
        raise Conflict(
            f"agent name {name} is taken by agent {agent.agent_id} of this pool: registering "
            "again needs its X-Agent-Secret"
            + (", or a new pod of that name (pod_uid)" if k8s else "")
            + "; an agent that lost its secret is retired by an admin (manage.py agent_retire)",
            field="name",
        )
    agent_retire(
        agent=agent,
        actor="system:agent-api",
        reason=f"its pod {name} was replaced by a new pod of that name (uid {pod_uid})",
    )
    return None, agent


def agent_register(
    *,
    pool: AgentPool,
    name: str,
    version: str = "",
    ip: str | None = None,
    secret: str = "",
    pod_uid: str = "",
    proposed_secret: str = "",
) -> Registration:
    """Register an agent: a new name in the pool gets a new agent. In a static pool the agent
    is its own execution host; in a k8s pool the name is the pod name, and the agent is
    matched to that pod.

    A name that a live agent holds is taken over only by proof (issue: any holder of the pool
    token could register under another agent's name, get its identity and fail its work):
    * `secret`, that agent's current secret: the same agent registering again (after a
      restart, say). Its secret is rotated, the previous one stops working.
    * in a k8s pool, `pod_uid` of a new pod of that name, as the cluster reported it: the old
      identity is retired explicitly (`agent_retire`: its running tasks fail, naming the
      replacement) and the new pod gets a new agent.
    Anything else is Conflict (409), and changes nothing.

    `proposed_secret` (`ags_<64 hex>`, made by the agent) becomes the new secret instead of
    one made here, so that a registration whose answer was lost can be sent again as it was:
    the retry proves itself with the secret it proposed, which is already the agent's."""
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise InvalidInput(f"name is required (at most {MAX_NAME} characters)", field="name")
    if len(version) > 64:
        raise InvalidInput("version is longer than 64 characters", field="version")
    if len(pod_uid) > 64:
        raise InvalidInput("pod_uid is longer than 64 characters", field="pod_uid")
    if proposed_secret and not SECRET_RE.match(proposed_secret):
        raise InvalidInput(
            f"agent_secret must be {SECRET_PREFIX} and 64 lowercase hex digits",
            field="agent_secret",
        )
    issued = proposed_secret or f"{SECRET_PREFIX}{secret_hex(32)}"
    secret_hash = sha256_hex(issued)
    now = clock.now()
    with transaction.atomic():
        agent, retired = _name_claim(
            pool=pool, name=name, secret=secret, proposed_secret=proposed_secret, pod_uid=pod_uid
        )
        created: Agent | None = None
        if agent is None:
            created = _agent_create(
                pool=pool,
                name=name,
                version=version,
                ip=ip,
                secret_hash=secret_hash,
                pod_uid=pod_uid,
            )
            if created is None:  # a concurrent first registration of the name won
                raise Conflict(
                    f"agent name {name} was registered by another agent at the same moment",
                    field="name",
                )
            agent = created
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
                pod_uid=pod_uid or agent.pod_uid,
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
                "replaces": retired.agent_id if retired else None,
            },
            reason=reason
            or (f"a new pod of that name; agent {retired.agent_id} retired" if retired else ""),
        )
        if pool.pool_type == PoolType.STATIC:
            pod_for_static_agent(pool=pool, agent_id=agent.agent_id, name=name, actor=actor)
        else:
            pod = Pod.objects.filter(pool=pool, name=name).first()
            if pod is not None:
                pod_link_agent(pod=pod, agent_id=agent.agent_id, actor=actor)
        broadcast_pool_changed(pool_id=pool.pool_id, kind="agent", payload={"agent": name})
    return Registration(agent=agent, secret=issued, retired=retired)


def agent_retire(*, agent: Agent, actor: str, reason: str) -> bool:
    """End an agent identity: its secret stops working, it is offline for good, its running
    tasks fail (nothing can report them any more) and its name is free for a new agent. The
    row stays for history. Conditional on the agent still being live."""
    if not reason.strip():
        raise InvalidInput("a reason is required to retire an agent", field="reason")
    now = clock.now()
    with transaction.atomic():
        # Locked first: a heartbeat of the agent waits, then finds it retired.
        Agent.objects.select_for_update().filter(pk=agent.pk).first()
        changed = Agent.objects.filter(pk=agent.pk, retired_at__isnull=True).update(
            retired_at=now, retired_reason=reason, status=AgentStatus.OFFLINE, secret_hash=""
        )
        if not changed:
            return False
        event_record(
            actor=actor,
            kind="agent.retired",
            target_type="agent",
            target_id=agent.agent_id,
            pool_id=agent.pool_id,
            before={"status": agent.status, "name": agent.agent_name},
            after={"status": AgentStatus.OFFLINE, "retired": True},
            reason=reason,
        )
        # Acknowledged work only: an unacknowledged dispatch is not lost work, and the
        # scheduler rolls it back to waiting when its ack timeout passes (I-644).
        for task_id in WorkspaceTask.objects.filter(
            agent_id=agent.agent_id, status=TaskStatus.RUNNING, acked_at__isnull=False
        ).values_list("id", flat=True):
            task_fail_lost(
                task_id=task_id,
                message=f"Agent {agent.agent_name} ({agent.agent_id}) was retired: {reason}; "
                f"task #{task_id} that was running on it was lost.",
                actor=actor,
            )
        for pod in Pod.objects.filter(agent_id=agent.agent_id):
            pod_link_agent(pod=pod, agent_id=None, actor=actor)
        broadcast_pool_changed(
            pool_id=agent.pool_id, kind="agent", payload={"agent": agent.agent_name}
        )
    return True


def agent_authenticate(*, pool_id: str, agent_id: str, secret: str) -> Agent:
    """The agent `agent_id` of the pool `pool_id`, if `secret` is the one it got when it last
    registered.

    The pool token proves only that the caller is some agent of the pool; the secret proves
    which one, so no agent can heartbeat, accept or report as another. Unknown agent:
    NotFound; agent of another pool, missing or wrong secret: Forbidden. Writes nothing."""
    try:
        agent = Agent.objects.get(pk=agent_id)
    except Agent.DoesNotExist:
        raise NotFound(f"agent {agent_id} does not exist", field="agent_id") from None
    if agent.pool_id != pool_id:
        raise Forbidden(f"agent {agent_id} does not belong to the token's pool", field="agent_id")
    if agent.retired_at is not None:
        raise Forbidden(
            f"agent {agent_id} was retired: {agent.retired_reason}", field="agent_secret"
        )
    if not secret:
        raise Forbidden(f"the agent secret of {agent_id} is missing", field="agent_secret")
    if not _secret_matches(agent, secret):
        raise Forbidden(
            f"wrong agent secret for {agent_id}: it is another agent's, or a later "
            "registration of this agent (with its secret) replaced it",
            field="agent_secret",
        )
    return agent


@dataclass
class HeartbeatAnswer:
    assignments: list[dict[str, Any]] = field(default_factory=list)
    cancellations: list[dict[str, Any]] = field(default_factory=list)
    # A heartbeat that waited for work (agents/nudge.py): the wait ended because work came.
    woken: bool = False
    # False: it asked to wait, but its process already held as many waiting heartbeats as it
    # may (LONG_POLLS_MAX), so it was answered at once (the answer then has no `woken`).
    held: bool = True


# The columns of a heartbeat's own tasks that its answer and cross-check read.
HEARTBEAT_TASK_FIELDS = (
    "id",
    "workspace_id",
    "task_type",
    "status",
    "acked_at",
    "apply_started_at",
    "pod_name",
    "slot_index",
    "reuse_workdir",
    "unreported_since",
)


def _agent_heard(
    *, agent: Agent, now: datetime, reported: list[int], cpu: float | None, memory: float | None
) -> str:
    """Record the heartbeat on the agent's row, which stays locked until the transaction
    ends; return the status the agent had. Forbidden if it was retired meanwhile: a heartbeat
    on its way while the agent was retired must not bring the retired identity back online.

    The steady state is one conditional update: from the status the agent had when the
    request authenticated it (online, in nearly every heartbeat). If that status changed
    since (the reconciler marked it offline, an admin drained or retired it), the row is
    locked and read first, as the general case."""
    heard = {"last_ping_at": now, "reported_task_ids": reported, "cpu": cpu, "memory": memory}
    live = Agent.objects.filter(pk=agent.pk, retired_at__isnull=True)
    if live.filter(status=agent.status).update(status=_status_heard(agent.status), **heard):
        return agent.status
    was = live.select_for_update().values_list("status", flat=True).first()
    if was is None:
        raise Forbidden(f"agent {agent.agent_id} was retired", field="agent_secret")
    live.update(status=_status_heard(was), **heard)
    return was


def _status_heard(was: str) -> str:
    # A draining agent stays draining (it finishes its work and takes no new); anyone else
    # who is heard is online.
    return AgentStatus.DRAINING if was == AgentStatus.DRAINING else AgentStatus.ONLINE


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
    with transaction.atomic():
        was = _agent_heard(agent=agent, now=now, reported=reported, cpu=cpu, memory=memory)
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
        mine = _agent_tasks(agent)
        running_acked = [
            t for t in mine.values() if t.status == TaskStatus.RUNNING and t.acked_at is not None
        ]
        # Only the tasks whose mark changes: a steady heartbeat (every task it runs reported,
        # as before) writes nothing but the agent row. The agent's row lock, taken above,
        # orders this agent's heartbeats, the only writers of the mark besides a dispatch.
        missing = [
            t.pk for t in running_acked if t.pk not in reported and t.unreported_since is None
        ]
        present = [
            t.pk for t in running_acked if t.pk in reported and t.unreported_since is not None
        ]
        if missing:
            WorkspaceTask.objects.filter(
                pk__in=missing, status=TaskStatus.RUNNING, unreported_since__isnull=True
            ).update(unreported_since=now)
        if present:
            WorkspaceTask.objects.filter(pk__in=present, unreported_since__isnull=False).update(
                unreported_since=None
            )
    return _answer(mine, reported)


def _agent_tasks(agent: Agent) -> dict[int, WorkspaceTask]:
    # Only what the answer and the cross-check read, and no join: this runs 200 times a
    # second at fleet size (issue 9).
    return {
        t.pk: t
        for t in WorkspaceTask.objects.filter(
            agent_id=agent.agent_id,
            status__in=[TaskStatus.RUNNING, TaskStatus.APPLY_PENDING],
        )
        .order_by()
        .only(*HEARTBEAT_TASK_FIELDS)
    }


def _answer(mine: dict[int, WorkspaceTask], reported: list[int]) -> HeartbeatAnswer:
    """A heartbeat's answer: the agent's dispatches it has not acknowledged, and a cancel of
    each task it reports that the ledger does not assign to it."""
    answer = HeartbeatAnswer()
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


def agent_heartbeat_wait(
    *,
    agent: Agent,
    running_task_ids: list[int],
    cpu: float | None = None,
    memory: float | None = None,
    wait: float = 0.0,
) -> HeartbeatAnswer:
    """`agent_heartbeat`; if its answer has no assignment and no cancellation and `wait` > 0,
    wait until the agent is nudged (work dispatched to it, a task of it cancelled) or `wait`
    seconds pass, and if it was, the answer read again: it has the news, `woken` set.
    Otherwise the first answer; at once, `held` False, if this process holds as many waiting
    heartbeats as it may (agents/nudge.py)."""
    beat = functools.partial(
        agent_heartbeat, agent=agent, running_task_ids=running_task_ids, cpu=cpu, memory=memory
    )
    if wait <= 0:
        # No waiter, and so no LISTEN connection in a process whose agents never wait.
        return beat()
    with nudge_waiter(agent_id=agent.agent_id) as woken:
        if woken is None:  # this process holds as many waiting heartbeats as it may
            answer = beat()
            answer.held = False
            return answer
        # Entered before the heartbeat reads the ledger: a dispatch that commits after the
        # read wakes it; one that committed before is in the answer.
        first = beat()
        if first.assignments or first.cancellations:
            return first
        if not nudge_wait(woken=woken, agent_id=agent.agent_id, seconds=wait):
            return first
    # The first heartbeat recorded the agent and cross-checked its tasks a moment ago; the
    # answer is read again (one query, no write): the news the nudge announced.
    answer = _answer(_agent_tasks(agent), sorted(set(running_task_ids)))
    answer.woken = True
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
    liveness = liveness or liveness_read()
    changed: list[str] = []
    for pool in [only] if only is not None else AgentPool.objects.all():
        cutoff = now - pool.heartbeat_timeout
        if not liveness.judges(pool.heartbeat_timeout):
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
                    reason=f"no heartbeat since {stamp(agent.last_ping_at)}",
                )
                broadcast_pool_changed(
                    pool_id=pool.pool_id, kind="agent", payload={"agent": agent.agent_name}
                )
                changed.append(agent.agent_id)
    return changed
