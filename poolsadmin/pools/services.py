"""Writes to pools, tokens, pods and slots. Every slot change is a conditional update keyed by
what the caller expects the slot to hold, inside a transaction, with an event."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F

from poolsadmin.agents.liveness import hearing_gap
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record, events_write
from poolsadmin.kube.adapter import KubeApi, KubeError
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from poolsadmin.lib.humanize import stamp
from poolsadmin.lib.ids import POOL_ID_RE, random_id, secret_hex, sha256_hex
from poolsadmin.lib.rowsets import rowset_param, rowset_sql
from poolsadmin.lib.wake import wake
from poolsadmin.pools.models import (
    MAX_REPLICAS,
    MAX_SLOTS_PER_POD,
    AgentPool,
    FreezeWindow,
    Pod,
    PodPhase,
    PoolStatus,
    PoolToken,
    PoolType,
    Slot,
    SlotState,
)
from poolsadmin.pools.selectors import SlotRow, end_of_local_day
from poolsadmin.realtime.broadcast import broadcast_pool_changed


def slot_label(slot: Slot | SlotRow) -> str:
    return f"{slot.pod.name}[{slot.index}]"


def _slot_snapshot(slot: Slot | SlotRow) -> dict[str, Any]:
    return {
        "state": slot.state,
        "task_id": slot.task_id,
        "task_type": slot.task_type,
        "version": slot.version,
        "reserved_until": slot.reserved_until.isoformat() if slot.reserved_until else None,
    }


# --- pools -------------------------------------------------------------------------------------


def pool_validate(
    *,
    pool_type: str,
    slots_per_pod: int,
    plan_and_apply_per_pod: int,
    min_replicas: int,
    max_replicas: int,
    pod_image: str,
) -> None:
    if pool_type not in PoolType.values:
        raise InvalidInput(f"pool_type must be one of {PoolType.values}", field="pool_type")
    if not 1 <= slots_per_pod <= MAX_SLOTS_PER_POD:
        raise InvalidInput(
            f"slots_per_pod must be between 1 and {MAX_SLOTS_PER_POD}", field="slots_per_pod"
        )
    if plan_and_apply_per_pod < 1 or plan_and_apply_per_pod > slots_per_pod:
        raise InvalidInput(
            "plan_and_apply_per_pod must be between 1 and slots_per_pod",
            field="plan_and_apply_per_pod",
        )
    for name, count in (("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if not 0 <= count <= MAX_REPLICAS:
            raise InvalidInput(f"{name} must be between 0 and {MAX_REPLICAS}", field=name)
    if pool_type == PoolType.K8S:
        if max_replicas < 1:
            raise InvalidInput("max_replicas must be at least 1", field="max_replicas")
        if not 0 <= min_replicas <= max_replicas:
            raise InvalidInput("need 0 <= min_replicas <= max_replicas", field="min_replicas")
        if not pod_image:
            raise InvalidInput("a k8s pool needs a pod image", field="pod_image")


def pool_claim(*, pool_id: str, wait: bool) -> AgentPool | None:
    """Hold the pool row (`SELECT ... FOR NO KEY UPDATE`) until the transaction ends: what
    places tasks into a pool's slots, and what retires its pods, hold it, so each sees the
    others' committed work. With `wait=False` (`SKIP LOCKED`) None means another scheduler holds
    it: several scheduler processes then take different pools instead of queueing on one. NO
    KEY: new tasks and pods, whose foreign keys take KEY SHARE on the row, are not blocked.
    On SQLite every write transaction is IMMEDIATE and the lock is the database's."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("pool_claim holds the pool row for a transaction: call it in one")
    rows = AgentPool.objects.select_for_update(no_key=True, skip_locked=not wait)
    return rows.filter(pk=pool_id).first()


def pool_create(
    *,
    name: str,
    actor: str,
    pool_type: str = PoolType.STATIC,
    pool_id: str | None = None,
    description: str = "",
    slots_per_pod: int = 4,
    plan_and_apply_per_pod: int = 1,
    min_replicas: int = 0,
    max_replicas: int = 1,
    pod_image: str = "",
    namespace: str = "",
    **extra: Any,
) -> AgentPool:
    if not name.strip() or len(name.strip()) > 200:
        raise InvalidInput("name is required (at most 200 characters)", field="name")
    if pool_id is not None and not POOL_ID_RE.match(pool_id):
        raise InvalidInput("pool_id must be 'pool-' and 16 of [a-z0-9]", field="pool_id")
    pool_validate(
        pool_type=pool_type,
        slots_per_pod=slots_per_pod,
        plan_and_apply_per_pod=plan_and_apply_per_pod,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        pod_image=pod_image,
    )
    timeout = extra.get("heartbeat_timeout_seconds")
    if timeout is not None and timeout <= hearing_gap().total_seconds():
        # An outage shorter than the gap is not on record, so it would count as the agents'
        # silence: the timeout must outlast it (agents/liveness.py).
        raise InvalidInput(
            f"heartbeat_timeout_seconds must be longer than {hearing_gap().total_seconds():g} s "
            "(four POOLSADMIN_HEARING_TICK_SECONDS)",
            field="heartbeat_timeout_seconds",
        )
    with transaction.atomic():
        pool_id = pool_id or random_id("pool-")
        if AgentPool.objects.filter(pk=pool_id).exists():
            raise Conflict(f"pool {pool_id} already exists", field="pool_id")
        pool = AgentPool.objects.create(
            pool_id=pool_id,
            name=name.strip(),
            description=description,
            pool_type=pool_type,
            slots_per_pod=slots_per_pod,
            plan_and_apply_per_pod=plan_and_apply_per_pod,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            pod_image=pod_image,
            namespace=namespace,
            created_at=clock.now(),
            **extra,
        )
        event_record(
            actor=actor,
            kind="pool.created",
            target_type="pool",
            target_id=pool.pool_id,
            pool_id=pool.pool_id,
            after={"name": pool.name, "pool_type": pool.pool_type},
        )
    return pool


@dataclass(frozen=True)
class IssuedToken:
    token: PoolToken
    secret: str  # shown once, never stored


def pool_token_create(
    *, pool: AgentPool, name: str, actor: str, expires_at: datetime | None = None
) -> IssuedToken:
    if not name.strip():
        raise InvalidInput("name is required", field="name")
    secret = f"apt_{pool.pool_id}_{secret_hex(32)}"
    with transaction.atomic():
        token = PoolToken.objects.create(
            pool=pool,
            name=name.strip(),
            token_hash=sha256_hex(secret),
            created_by=actor,
            created_at=clock.now(),
            expires_at=expires_at,
        )
        event_record(
            actor=actor,
            kind="pool.token_created",
            target_type="pool",
            target_id=pool.pool_id,
            pool_id=pool.pool_id,
            after={"token_name": token.name},
        )
    return IssuedToken(token=token, secret=secret)


def pool_token_authenticate(*, secret: str) -> PoolToken:
    """The pool token behind a bearer secret, or Unauthenticated."""
    if not secret.startswith("apt_"):
        raise Unauthenticated("not a pool token (expected apt_<pool_id>_<hex>)")
    # `get`, not `first`: the hash is unique, and first's ORDER BY is CPU for nothing on a
    # query that every agent request makes (issue 9); and no join of the pool, whose wide row
    # cost that query as much again (the agent API needs only its id: `token.pool_id`).
    try:
        token = PoolToken.objects.get(token_hash=sha256_hex(secret))
    except PoolToken.DoesNotExist:
        raise Unauthenticated("unknown pool token") from None
    now = clock.now()
    if token.revoked_at is not None:
        raise Unauthenticated("pool token revoked")
    if token.expires_at is not None and token.expires_at <= now:
        raise Unauthenticated("pool token expired")
    # Touch at most once a minute: agents heartbeat every few seconds.
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        PoolToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


# --- pods --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewPod:
    """A pod for the ledger: one the cluster lists that the ledger does not know yet."""

    name: str
    phase: str
    agent_id: str | None = None
    uid: str = ""


def pod_create(
    *,
    pool: AgentPool,
    name: str,
    phase: str,
    actor: str,
    agent_id: str | None = None,
    uid: str = "",
) -> Pod:
    """A pod and its `slots_per_pod` idle slots, in one transaction."""
    [pod] = pods_create(
        pool=pool, pods=[NewPod(name=name, phase=phase, agent_id=agent_id, uid=uid)], actor=actor
    )
    return pod


def pods_create(*, pool: AgentPool, pods: Sequence[NewPod], actor: str) -> list[Pod]:
    """Pods and their `slots_per_pod` idle slots, with a `pod.adopted` event each, in one
    transaction of four statements however many they are: a cold start of a big pool adopts
    a thousand pods in one pass."""
    if not pods:
        return []
    now = clock.now()
    events: list[Event] = []
    with transaction.atomic():
        # bulk_create sets the primary keys on PostgreSQL and SQLite (RETURNING).
        created = Pod.objects.bulk_create(
            [
                Pod(
                    pool=pool,
                    name=new.name,
                    uid=new.uid,
                    phase=new.phase,
                    agent_id=new.agent_id,
                    created_at=now,
                    last_seen_at=now,
                )
                for new in pods
            ]
        )
        Slot.objects.bulk_create(
            [
                Slot(pod=pod, index=i, since=now)
                for pod in created
                for i in range(pool.slots_per_pod)
            ]
        )
        for pod in created:
            event_record(
                actor=actor,
                kind="pod.adopted",
                target_type="pod",
                target_id=pod.name,
                pool_id=pool.pool_id,
                after={
                    "phase": pod.phase,
                    "slots": pool.slots_per_pod,
                    "agent_id": pod.agent_id,
                    "uid": pod.uid or None,
                },
                batch=events,
            )
        events_write(events)
        broadcast_pool_changed(
            pool_id=pool.pool_id, kind="pod", payload={"pods": [pod.name for pod in created]}
        )
    return created


def pod_link_agent(*, pod: Pod, agent_id: str | None, actor: str) -> bool:
    """Make `agent_id` the agent of `pod` (they share a name), or, with None, leave the pod
    without one (its agent was retired). True if the link changed.

    Conditional on the agent the caller saw, so a concurrent relink is not overwritten
    silently: the loser changes nothing and writes no event."""
    if pod.agent_id == agent_id:
        return False
    before = pod.agent_id
    with transaction.atomic():
        changed = Pod.objects.filter(pk=pod.pk, agent_id=before).update(agent_id=agent_id)
        if changed != 1:
            return False
        event_record(
            actor=actor,
            kind="pod.agent_linked" if agent_id else "pod.agent_unlinked",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before={"agent_id": before},
            after={"agent_id": agent_id},
        )
        broadcast_pool_changed(pool_id=pod.pool_id, kind="pod", payload={"pod": pod.name})
    pod.agent_id = agent_id
    return True


def pod_for_static_agent(*, pool: AgentPool, agent_id: str, name: str, actor: str) -> Pod:
    """In a static pool every agent is its own execution host (a pod with no cluster)."""
    pod = Pod.objects.filter(pool=pool, name=name).first()
    if pod is None:
        return pod_create(
            pool=pool, name=name, phase=PodPhase.RUNNING, actor=actor, agent_id=agent_id
        )
    pod_link_agent(pod=pod, agent_id=agent_id, actor=actor)
    return pod


# --- slots -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotClaim:
    slot: Slot | SlotRow  # as the caller read it: idle, with its pod
    task_id: int
    task_type: str


SLOT_CLAIM_COLUMNS = (("slot_id", "bigint"), ("task_id", "bigint"), ("task_type", "text"))


def slots_take(
    *, claims: list[SlotClaim], actor: str, pool_id: str, batch: list[Event]
) -> list[SlotClaim]:
    """idle -> running for each claim's task, only where the slot is still idle and empty:
    the scheduler's batch of dispatches (a dispatch of one is a batch of one). Returns the
    claims that took their slot; their events join `batch`, and the caller publishes the
    pool's change once, after commit.

    One `UPDATE ... FROM <rows> RETURNING` rather than an UPDATE per slot: the same
    conditional update, row by row, in one statement (PostgreSQL; SQLite 3.33+), the rows as
    one JSON parameter (lib/rowsets.py)."""
    if not claims:
        return []
    now = clock.now()
    rows = rowset_param(SLOT_CLAIM_COLUMNS, ((c.slot.pk, c.task_id, c.task_type) for c in claims))
    connection = transaction.get_connection()
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE slots SET state = 'running', task_id = v.task_id, task_type = v.task_type, "
            f"since = %s, reserved_until = NULL, version = slots.version + 1 "
            f"FROM {rowset_sql(SLOT_CLAIM_COLUMNS)} "
            f"WHERE slots.id = v.slot_id AND slots.state = 'idle' AND slots.task_id IS NULL "
            f"RETURNING slots.id",
            # As the ORM writes a time (SQLite: naive UTC text, not "...+00:00").
            [connection.ops.adapt_datetimefield_value(now), rows],
        )
        taken = {row[0] for row in cursor.fetchall()}
    won = [c for c in claims if c.slot.pk in taken]
    for claim in won:
        event_record(
            actor=actor,
            kind="slot.taken",
            target_type="slot",
            target_id=slot_label(claim.slot),
            pool_id=pool_id,
            task_id=claim.task_id,
            before=_slot_snapshot(claim.slot),
            after={
                "state": SlotState.RUNNING,
                "task_id": claim.task_id,
                "task_type": claim.task_type,
            },
            batch=batch,
        )
    return won


def slot_resume_reserved(
    *,
    task_id: int,
    actor: str,
    pool_id: str,
    slot: Slot | SlotRow | None = None,
    batch: list[Event] | None = None,
) -> Slot | SlotRow | None:
    """reserved -> running for the confirmed apply that owns the reservation (I-598).

    `slot` is the reservation as the caller read it (else it is read here). With `batch` (a
    scheduler batch) the event joins it and the caller publishes the pool's change once."""
    if slot is None:
        slot = Slot.objects.select_related("pod").filter(task_id=task_id).first()
    if slot is None or slot.state != SlotState.RESERVED:
        return None
    changed = Slot.objects.filter(pk=slot.pk, state=SlotState.RESERVED, task_id=task_id).update(
        state=SlotState.RUNNING, since=clock.now(), version=F("version") + 1
    )
    if changed != 1:
        return None
    event_record(
        actor=actor,
        kind="slot.reservation_used",
        target_type="slot",
        target_id=slot_label(slot),
        pool_id=pool_id,
        task_id=task_id,
        before=_slot_snapshot(slot),
        after={"state": SlotState.RUNNING, "task_id": task_id},
        reason="confirmed apply reuses the plan's reserved slot",
        batch=batch,
    )
    if batch is None:
        broadcast_pool_changed(pool_id=pool_id, kind="slot", payload={"slot": slot_label(slot)})
    return slot


def slot_reserve_for_task(*, task_id: int, until: datetime, actor: str, pool_id: str) -> bool:
    """running -> reserved, keyed by task: the plan found changes and the apply will want the
    warm working directory."""
    slot = Slot.objects.select_related("pod").filter(task_id=task_id).first()
    if slot is None:
        return False
    changed = Slot.objects.filter(pk=slot.pk, task_id=task_id, state=SlotState.RUNNING).update(
        state=SlotState.RESERVED, since=clock.now(), reserved_until=until, version=F("version") + 1
    )
    if changed != 1:
        return False
    event_record(
        actor=actor,
        kind="slot.reserved",
        target_type="slot",
        target_id=slot_label(slot),
        pool_id=pool_id,
        task_id=task_id,
        before=_slot_snapshot(slot),
        after={
            "state": SlotState.RESERVED,
            "task_id": task_id,
            "reserved_until": until.isoformat(),
        },
    )
    broadcast_pool_changed(pool_id=pool_id, kind="slot", payload={"slot": slot_label(slot)})
    return True


def slot_free_for_task(
    *, task_id: int, actor: str, reason: str, pool_id: str, only_state: str | None = None
) -> Slot | None:
    """Free whatever slot still holds `task_id` (every free is keyed by task). Returns the slot
    as it was, or None if no slot held the task (already freed: nothing to do)."""
    slot = Slot.objects.select_related("pod").filter(task_id=task_id).first()
    if slot is None or (only_state is not None and slot.state != only_state):
        return None
    query = Slot.objects.filter(pk=slot.pk, task_id=task_id)
    if only_state is not None:
        query = query.filter(state=only_state)
    changed = query.update(
        state=SlotState.IDLE,
        task=None,
        task_type="",
        since=clock.now(),
        reserved_until=None,
        version=F("version") + 1,
    )
    if changed != 1:
        return None
    event_record(
        actor=actor,
        kind="slot.freed",
        target_type="slot",
        target_id=slot_label(slot),
        pool_id=pool_id,
        task_id=task_id,
        before=_slot_snapshot(slot),
        after={"state": SlotState.IDLE, "task_id": None},
        reason=reason,
    )
    wake()  # capacity came free: the scheduler places waiting work now
    broadcast_pool_changed(pool_id=pool_id, kind="slot", payload={"slot": slot_label(slot)})
    return slot


# A pause's `until` is a planned end (a maintenance window); a pool paused with no end in sight
# is paused without one. Past a year it is a typo, and a date near year 9999 breaks every later
# computation with it (shown in a pool's own time zone, it can pass year 9999).
PAUSE_MAX = timedelta(days=366)


def pool_pause(
    *, pool_id: str, actor: str, reason: str, until: datetime | None = None
) -> AgentPool:
    """Stop dispatching new work in the pool (rule 6). Running work continues."""
    if not reason.strip():
        raise InvalidInput("a reason is required to pause a pool", field="reason")
    if until is not None and until > clock.now() + PAUSE_MAX:
        raise InvalidInput(f"until must be within {PAUSE_MAX.days} days from now", field="until")
    with transaction.atomic():
        pool = AgentPool.objects.select_for_update().filter(pk=pool_id).first()
        if pool is None:
            raise NotFound(f"pool {pool_id} does not exist")
        if pool.status == PoolStatus.PAUSED:
            raise Conflict(f"pool {pool_id} is already paused by {pool.paused_by}")
        AgentPool.objects.filter(pk=pool_id, status=PoolStatus.ACTIVE).update(
            status=PoolStatus.PAUSED,
            paused_by=actor,
            paused_reason=reason,
            paused_at=clock.now(),
            paused_until=until,
        )
        event_record(
            actor=actor,
            kind="pool.paused",
            target_type="pool",
            target_id=pool_id,
            pool_id=pool_id,
            before={"status": PoolStatus.ACTIVE},
            after={"status": PoolStatus.PAUSED, "until": until.isoformat() if until else None},
            reason=reason,
        )
        broadcast_pool_changed(pool_id=pool_id, kind="pool", payload={"status": "paused"})
        pool.refresh_from_db()
    return pool


def pool_resume(*, pool_id: str, actor: str, reason: str = "") -> AgentPool:
    with transaction.atomic():
        pool = AgentPool.objects.select_for_update().filter(pk=pool_id).first()
        if pool is None:
            raise NotFound(f"pool {pool_id} does not exist")
        if pool.status != PoolStatus.PAUSED:
            raise Conflict(f"pool {pool_id} is not paused")
        AgentPool.objects.filter(pk=pool_id, status=PoolStatus.PAUSED).update(
            status=PoolStatus.ACTIVE,
            paused_by="",
            paused_reason="",
            paused_at=None,
            paused_until=None,
        )
        event_record(
            actor=actor,
            kind="pool.resumed",
            target_type="pool",
            target_id=pool_id,
            pool_id=pool_id,
            before={"status": PoolStatus.PAUSED, "paused_by": pool.paused_by},
            after={"status": PoolStatus.ACTIVE},
            reason=reason,
        )
        broadcast_pool_changed(pool_id=pool_id, kind="pool", payload={"status": "active"})
        pool.refresh_from_db()
    return pool


def pool_freeze_window_add(
    *,
    pool: AgentPool,
    weekdays: list[int],
    start: time,
    end: time,
    actor: str,
    name: str = "",
) -> FreezeWindow:
    if not weekdays or any(d not in range(7) for d in weekdays):
        raise InvalidInput("weekdays must be a non-empty list of 0 (Monday) .. 6", field="weekdays")
    if start == end:
        raise InvalidInput("a freeze window needs different start and end times", field="end")
    with transaction.atomic():
        window = FreezeWindow.objects.create(
            pool=pool, name=name, weekdays=sorted(set(weekdays)), start=start, end=end
        )
        event_record(
            actor=actor,
            kind="pool.freeze_window_added",
            target_type="pool",
            target_id=pool.pool_id,
            pool_id=pool.pool_id,
            after={
                "name": name,
                "weekdays": window.weekdays,
                "start": f"{start:%H:%M}",
                "end": f"{end:%H:%M}",
            },
        )
    return window


def pool_unfreeze_once(*, pool_id: str, actor: str, reason: str) -> AgentPool:
    """One-time unfreeze until the end of the pool's local day (SPEC 6)."""
    if not reason.strip():
        raise InvalidInput("a reason is required to unfreeze a pool", field="reason")
    now = clock.now()
    with transaction.atomic():
        pool = AgentPool.objects.select_for_update().filter(pk=pool_id).first()
        if pool is None:
            raise NotFound(f"pool {pool_id} does not exist")
        until = end_of_local_day(pool=pool, now=now)
        AgentPool.objects.filter(pk=pool_id).update(
            unfrozen_until=until, unfrozen_by=actor, unfrozen_at=now
        )
        event_record(
            actor=actor,
            kind="pool.unfrozen",
            target_type="pool",
            target_id=pool_id,
            pool_id=pool_id,
            after={"unfrozen_until": until.isoformat()},
            reason=reason,
        )
        broadcast_pool_changed(pool_id=pool_id, kind="pool", payload={"unfrozen": True})
        pool.refresh_from_db()
    return pool


def pool_token_revoke(*, token_id: int, actor: str) -> PoolToken:
    with transaction.atomic():
        token = PoolToken.objects.select_for_update().filter(pk=token_id).first()
        if token is None:
            raise NotFound(f"pool token {token_id} does not exist")
        if token.revoked_at is not None:
            raise Conflict(f"pool token {token.name} was already revoked by {token.revoked_by}")
        now = clock.now()
        PoolToken.objects.filter(pk=token_id, revoked_at__isnull=True).update(
            revoked_at=now, revoked_by=actor
        )
        event_record(
            actor=actor,
            kind="pool.token_revoked",
            target_type="pool",
            target_id=token.pool_id,
            pool_id=token.pool_id,
            after={"token_name": token.name},
        )
        token.refresh_from_db()
    return token


def _pod_still_there(*, kube: KubeApi, pod: Pod) -> bool:
    """True only if the cluster answers that the pod exists and no delete of it is under way."""
    try:
        info = kube.get_pod(namespace=pod.pool.namespace, name=pod.name)
    except KubeError:
        return False
    return info is not None and not info.deletion_requested


def _pod_delete_refused(*, pod: Pod, actor: str, error: KubeError) -> None:
    """The cluster refused the delete and still lists the pod: lift the cordon pod_retire set,
    so the pod takes work again."""
    with transaction.atomic():
        if not Pod.objects.filter(pk=pod.pk, cordoned=True, cordoned_by=actor).update(
            cordoned=False, cordoned_by="", cordoned_reason=""
        ):
            return
        event_record(
            actor=actor,
            kind="pod.delete_refused",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before={"cordoned": True},
            after={"cordoned": False},
            reason=f"the cluster refused to delete pod {pod.name} ({error.message}) and still "
            "lists it: it takes work again",
        )


def _pod_delete_unconfirmed(*, pod: Pod, actor: str, error: KubeError) -> None:
    """The delete may or may not have happened (a timeout; or a refusal, and the cluster
    would not say whether the pod is still there): the pod stays cordoned, marked, until
    cluster sync sees it gone or lists it again (pod_delete_not_done)."""
    with transaction.atomic():
        if not Pod.objects.filter(pk=pod.pk, cordoned=True, cordoned_by=actor).update(
            delete_unconfirmed_at=clock.now()
        ):
            return
        event_record(
            actor=actor,
            kind="pod.delete_unconfirmed",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            after={"cordoned": True},
            reason=(
                f"the delete of pod {pod.name} failed without saying whether it happened "
                f"({error.message}): it takes no work until the cluster shows it gone or still "
                "there"
            ),
        )


def pod_delete_not_done(*, pod: Pod, actor: str) -> bool:
    """A delete whose outcome was unknown did not happen: the cluster has listed the pod, not
    being deleted, longer after the request than the request could take (the caller checks).
    Lift the cordon that pod_retire kept for it. True if the pod changed."""
    asked = pod.delete_unconfirmed_at
    if asked is None:
        return False
    with transaction.atomic():
        changed = Pod.objects.filter(pk=pod.pk, delete_unconfirmed_at__isnull=False).update(
            delete_unconfirmed_at=None,
            cordoned=False,
            cordoned_by="",
            cordoned_reason="",
        )
        if not changed:
            return False
        event_record(
            actor=actor,
            kind="pod.delete_not_done",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before={"cordoned": pod.cordoned, "delete_unconfirmed_at": asked.isoformat()},
            after={"cordoned": False},
            reason=(
                f"the delete of pod {pod.name} at {stamp(asked)} timed out and the cluster "
                "still lists the pod: it was not deleted, and takes work again"
            ),
        )
        broadcast_pool_changed(pool_id=pod.pool_id, kind="pod", payload={"pod": pod.name})
    return True


def pod_retire(
    *,
    pod: Pod,
    kube: KubeApi,
    actor: str,
    kind: str,
    reason: str,
    cordon_reason: str,
    blocking_states: Collection[str],
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> bool:
    """Cordon a pod and delete it from the cluster, unless one of its slots is in
    `blocking_states`. False (nothing changed) when a slot blocks or another transaction holds
    the pod.

    Every dispatch holds its pool's row (`FOR NO KEY UPDATE`, scheduler/services.py) from the
    capacity snapshot it places with to its commit, so taking the same lock here, then checking
    the slots and cordoning in that transaction, means no task can be placed on the pod once it
    is decided (a batch that started first commits first, and its slots are then seen here).
    The ledger row goes when the reconciler sees the pod gone from the cluster.

    A failed delete re-raises the KubeError. A delete the server refused lifts the cordon
    again if the pod is still there. A delete whose outcome is unknown (timeout, lost
    connection, 504) may well have been carried out, and a pod that takes work while it
    terminates loses it ("vanished"): the cordon stays, marked `delete_unconfirmed_at`, until
    cluster sync lists the pod again later and lifts it (pod_delete_not_done), or sees it gone."""
    with transaction.atomic():
        pool_claim(pool_id=pod.pool_id, wait=True)
        locked = Pod.objects.select_for_update(skip_locked=True).filter(pk=pod.pk).first()
        if locked is None:
            return False
        if Slot.objects.filter(pod_id=pod.pk, state__in=list(blocking_states)).exists():
            return False
        was_cordoned = locked.cordoned
        if not was_cordoned:
            Pod.objects.filter(pk=pod.pk, cordoned=False).update(
                cordoned=True, cordoned_by=actor, cordoned_reason=cordon_reason
            )
        event_record(
            actor=actor,
            kind=kind,
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before={"cordoned": was_cordoned, **(before or {})},
            after={"cordoned": True, **(after or {})},
            reason=reason,
        )
    try:
        kube.delete_pod(namespace=pod.pool.namespace, name=pod.name)
    except KubeError as exc:
        # Only a cordon set here is lifted or marked: a person's drain stays as it was.
        if not was_cordoned:
            refused = exc.status is not None and exc.status != 504
            if refused and _pod_still_there(kube=kube, pod=pod):
                _pod_delete_refused(pod=pod, actor=actor, error=exc)
            else:
                _pod_delete_unconfirmed(pod=pod, actor=actor, error=exc)
        raise
    broadcast_pool_changed(pool_id=pod.pool_id, kind="pod", payload={"pod": pod.name})
    return True
