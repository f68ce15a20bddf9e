"""The autoscaler (SPEC 6, k8s pools, run by the reconciler's lease holder) and the admin's
scale and hold actions.

One pass, `autoscale_pool`:
1. list the pool's pods in the cluster (before reading the ledger: a pod created in an
   earlier pass that the reconciler has not adopted yet still counts, so it is never created
   twice);
2. read the demand (`pool_demand`) and any hold, and work out the desired pod count;
3. replace one pod whose pod template changed (its `poolsadmin/template-hash` label is not
   the pool's current `template_hash`) when it is fully idle: cordon and delete it, and let
   the scale-up below create its successor with the new template in the same pass. One pod
   per pass, and none while a pod is still waiting to be adopted, so a rolling replacement
   never takes more than one pod away; busy pods keep the old template until they are idle.
   A changed template never kills work. Pods without the label (made by hand) are left
   alone;
   then scale up at once, several pods in one pass if needed, with generateName (the
   reconciler adopts them; no ledger rows are written here);
4. or scale down pods fully idle for the idle delay, never a pod with a running or reserved
   slot, never below min (except in a freeze window); pods with an old template go first;
5. store the decision when the count changed or could not change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction

from poolsadmin.autoscaler.demand import Demand, pool_demand
from poolsadmin.autoscaler.models import PoolHold, ScaleAction, ScaleDecision
from poolsadmin.events.services import event_record
from poolsadmin.kube.adapter import TEMPLATE_HASH_LABEL, KubeApi, KubeError, PodInfo, template_hash
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput, NotFound
from poolsadmin.lib.humanize import duration, stamp
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import (
    FINISHED_PHASES,
    MAX_REPLICAS,
    AgentPool,
    Pod,
    PoolType,
    Slot,
    SlotState,
)
from poolsadmin.pools.selectors import pool_freeze_state
from poolsadmin.pools.services import pod_retire
from poolsadmin.realtime.broadcast import broadcast_pool_changed

logger = logging.getLogger(__name__)

AUTOSCALER = "system:autoscaler"


# --- admin actions -------------------------------------------------------------------------------

# A hold is a short manual override (a migration, an incident), not a configuration.
HOLD_MAX = timedelta(hours=24)


def pool_scale(
    *, pool: AgentPool, min_replicas: int, max_replicas: int, actor: str, reason: str
) -> AgentPool:
    """Set a k8s pool's replica bounds (0 <= min <= max, max >= 1). Takes effect on the next
    autoscaler pass."""
    if pool.pool_type != PoolType.K8S:
        raise InvalidInput("only k8s pools have replicas", field="pool_type")
    if max_replicas < 1:
        raise InvalidInput("max_replicas must be at least 1", field="max_replicas")
    if not 0 <= min_replicas <= max_replicas:
        raise InvalidInput("need 0 <= min_replicas <= max_replicas", field="min_replicas")
    if max_replicas > MAX_REPLICAS:
        raise InvalidInput(f"max_replicas must be at most {MAX_REPLICAS}", field="max_replicas")
    if not reason.strip():
        raise InvalidInput("a reason is required to scale a pool", field="reason")
    with transaction.atomic():
        locked = AgentPool.objects.select_for_update().filter(pk=pool.pk).first()
        if locked is None:
            raise NotFound(f"pool {pool.pk} does not exist")
        before = {"min_replicas": locked.min_replicas, "max_replicas": locked.max_replicas}
        AgentPool.objects.filter(pk=pool.pk).update(
            min_replicas=min_replicas, max_replicas=max_replicas
        )
        event_record(
            actor=actor,
            kind="pool.scaled",
            target_type="pool",
            target_id=pool.pk,
            pool_id=pool.pk,
            before=before,
            after={"min_replicas": min_replicas, "max_replicas": max_replicas},
            reason=reason,
        )
        broadcast_pool_changed(pool_id=pool.pk, kind="pool", payload={"scaled": True})
    pool.refresh_from_db()
    return pool


def pool_hold(*, pool: AgentPool, pods: int, until: datetime, actor: str, reason: str) -> PoolHold:
    """Hold the pool at `pods` pods until `until`, whatever the demand. Busy pods are still
    never removed, and a freeze window still allows no scale-up. A later hold replaces an
    earlier one; a hold until now (or earlier) ends it."""
    if pool.pool_type != PoolType.K8S:
        raise InvalidInput("only k8s pools can be held", field="pool_type")
    if not 0 <= pods <= pool.max_replicas:
        raise InvalidInput(
            f"pods must be between 0 and max_replicas ({pool.max_replicas})", field="pods"
        )
    if not reason.strip():
        raise InvalidInput("a reason is required to hold a pool", field="reason")
    now = clock.now()
    if until > now + HOLD_MAX:
        raise InvalidInput(
            f"a hold lasts at most {HOLD_MAX.total_seconds() / 3600:g} h", field="until"
        )
    with transaction.atomic():
        hold = PoolHold.objects.create(
            pool=pool, pods=pods, until=until, by=actor, reason=reason, created_at=now
        )
        # Ending a hold is recorded as that, not as a hold "at N pods until now".
        ends = until <= now
        event_record(
            actor=actor,
            kind="pool.hold_ended" if ends else "pool.held",
            target_type="pool",
            target_id=pool.pk,
            pool_id=pool.pk,
            after={"until": until.isoformat()}
            if ends
            else {"pods": pods, "until": until.isoformat()},
            reason=reason,
        )
        broadcast_pool_changed(pool_id=pool.pk, kind="pool", payload={"held": pods})
    return hold


def pool_pods_alive(*, pool: AgentPool) -> int:
    """The pool's pods in the ledger that have not finished (any other phase), as the
    autoscaler counts them: the "actual" of the dashboard's autoscaler panel."""
    return Pod.objects.filter(pool=pool).exclude(phase__in=FINISHED_PHASES).count()


def pool_active_hold(*, pool: AgentPool, now: datetime) -> PoolHold | None:
    """The most recent hold, if it still lasts."""
    hold = PoolHold.objects.filter(pool=pool).order_by("-created_at", "-id").first()
    return hold if hold is not None and hold.until > now else None


# --- the pass ------------------------------------------------------------------------------------


def _live_cluster_pods(pods: list[PodInfo]) -> dict[str, PodInfo]:
    return {p.name: p for p in pods if not p.deletion_requested and p.phase not in FINISHED_PHASES}


def _outdated(info: PodInfo, current: str) -> bool:
    """The pod was made from another template than the pool's current one."""
    stamped = info.labels.get(TEMPLATE_HASH_LABEL)
    return stamped is not None and stamped != current


@dataclass(frozen=True, slots=True)
class _SlotSeen:
    """What a pass reads of a slot: tuples, not models (2,000 slots at 1,000 pods)."""

    index: int
    state: str
    task_id: int | None
    since: datetime


def _slots_by_pod(pods: list[Pod]) -> dict[int, list[_SlotSeen]]:
    slots_by_pod: dict[int, list[_SlotSeen]] = {p.pk: [] for p in pods}
    for pod_id, index, state, task_id, since in (
        Slot.objects.filter(pod_id__in=list(slots_by_pod))
        .order_by("pod_id", "index")
        .values_list("pod_id", "index", "state", "task_id", "since")
    ):
        slots_by_pod[pod_id].append(_SlotSeen(index, state, task_id, since))
    return slots_by_pod


def _desired(
    *, pool: AgentPool, demand: Demand, hold: PoolHold | None, frozen: bool, actual: int
) -> tuple[int, str, bool]:
    """Desired pod count, its reason in words, and whether a freeze refused a scale-up."""
    words = demand.text()
    if demand.blocked_reason:  # paused or frozen: its queued work is not demand
        words += f"; queue not counted: {demand.blocked_reason}"
    if hold is not None:
        desired = hold.pods
        words = f"held at {hold.pods} by {hold.by} until {stamp(hold.until)} ({hold.reason})"
    else:
        floor = 0 if frozen else pool.min_replicas
        desired = min(max(demand.needed, floor), pool.max_replicas)
        if demand.needed > pool.max_replicas:
            words += f"; capped at max {pool.max_replicas} (needs {demand.needed})"
        elif demand.needed < floor:
            words += f"; min {floor}"
    if frozen and desired > actual:
        # A change freeze: nothing scales up (SPEC 6).
        words += f"; no scale-up to {desired} during the freeze"
        return actual, words, True
    return desired, words, False


def autoscale_pool(
    *,
    pool: AgentPool,
    kube: KubeApi,
    now: datetime,
    actor: str = AUTOSCALER,
    server_url: str,
    token_secret_name: str,
) -> ScaleDecision:
    """One autoscaler pass for one k8s pool (see the module docstring). Returns the decision;
    it is saved (has a pk) only when the pod count changed or could not change."""
    if pool.pool_type != PoolType.K8S:
        raise InvalidInput(f"pool {pool.pk} is not a k8s pool", field="pool_type")
    pool = AgentPool.objects.get(pk=pool.pk)  # min/max may have changed since the caller read

    def decide(
        action: str, desired: int, actual: int, reason: str, **pods: list[str]
    ) -> ScaleDecision:
        return ScaleDecision(
            pool=pool,
            at=now,
            desired=desired,
            actual=actual,
            min=pool.min_replicas,
            max=pool.max_replicas,
            action=action,
            created_pods=pods.get("created", []),
            deleted_pods=pods.get("deleted", []),
            reason=reason,
        )

    # 1. The cluster first.
    try:
        listed = kube.list_pods(namespace=pool.namespace, pool_id=pool.pk)
    except KubeError as exc:
        return _store(actor, decide(ScaleAction.BLOCKED, 0, 0, _kube_words("list pods", exc)))
    cluster = _live_cluster_pods(listed)
    ledger = [
        p
        for p in Pod.objects.filter(pool=pool).exclude(phase__in=FINISHED_PHASES)
        if p.name in cluster
    ]
    adopted = {p.name for p in ledger}
    unadopted = sorted(name for name in cluster if name not in adopted)
    actual = len(ledger) + len(unadopted)

    # 2. Demand, hold, freeze.
    demand = pool_demand(pool=pool, now=now)
    frozen = pool_freeze_state(pool=pool, now=now).frozen
    hold = pool_active_hold(pool=pool, now=now)
    desired, words, refused = _desired(
        pool=pool, demand=demand, hold=hold, frozen=frozen, actual=actual
    )
    reason = f"desired {desired}: {words}"
    if unadopted:
        reason += f"; {len(unadopted)} pod(s) not adopted yet ({', '.join(unadopted[:5])})"

    current = template_hash(pool)
    outdated = {p.name for p in ledger if _outdated(cluster[p.name], current)}
    slots_by_pod = _slots_by_pod(ledger)

    # 3. Replace one idle pod with an old template (never during a freeze, which allows no
    # scale-up, nor when the pool shrinks anyway: scale-down takes outdated pods first).
    replaced: list[str] = []
    if outdated and not frozen and desired >= actual:
        idle_old = sorted(
            (
                p
                for p in ledger
                if p.name in outdated and all(s.state == SlotState.IDLE for s in slots_by_pod[p.pk])
            ),
            key=lambda p: (p.created_at, p.pk),
        )
        busy_old = sorted(outdated - {p.name for p in idle_old})
        if idle_old and unadopted:
            reason += "; template changed: the next replacement waits for new pods to be adopted"
        elif idle_old:
            pod = idle_old[0]
            words = f"replacing pod {pod.name}: template changed"
            try:
                if _pod_delete_if_idle(
                    pool=pool,
                    pod=pod,
                    kube=kube,
                    actor=actor,
                    reason=f"{reason}; {words}",
                    kind="pod.replace",
                    cordon_reason="template changed",
                ):
                    replaced.append(pod.name)
                    reason += f"; {words}"
            except KubeError as exc:
                text = f"{reason}; {_kube_words(words, exc)}"
                return _store(actor, decide(ScaleAction.BLOCKED, desired, actual, text))
        if busy_old:
            reason += f"; {', '.join(busy_old[:5])} keep(s) the old template until idle"
    live = actual - len(replaced)

    # 4. Scale up at once.
    if desired > live:
        created: list[str] = []
        for _ in range(desired - live):
            try:
                info = kube.create_pod(
                    pool=pool, server_url=server_url, token_secret_name=token_secret_name
                )
            except KubeError as exc:
                made = f" after creating {', '.join(created)}" if created else ""
                text = f"{reason}; scale-up {live} -> {desired} {_kube_words('create', exc)}"
                return _store(
                    actor,
                    decide(
                        ScaleAction.BLOCKED,
                        desired,
                        actual,
                        text + made,
                        created=created,
                        deleted=replaced,
                    ),
                )
            created.append(info.name)
        text = f"{reason}; created {', '.join(created)}"
        return _store(
            actor,
            decide(ScaleAction.SCALE_UP, desired, actual, text, created=created, deleted=replaced),
        )

    if desired == actual:
        if refused:  # the freeze refused a scale-up: worth a (deduplicated) row
            return _store(actor, decide(ScaleAction.BLOCKED, desired, actual, reason))
        return decide(ScaleAction.NONE, desired, actual, reason)

    # 5. Scale down: fully idle pods only, old templates first, then longest idle first.
    surplus = actual - desired
    idle_delay = pool.scale_down_idle_seconds
    busy: list[str] = []
    waiting: list[str] = []
    candidates: list[tuple[datetime, Pod]] = []
    for pod in ledger:
        slots = slots_by_pod[pod.pk]
        held = [s for s in slots if s.state != SlotState.IDLE]
        if held:
            busy.append(
                "; ".join(
                    f"pod {pod.name} holds {s.state} slot {s.index} for task #{s.task_id}"
                    for s in held
                )
            )
            continue
        idle_since = max((s.since for s in slots), default=pod.created_at)
        # An admin's hold takes effect within one pass: the idle delay protects against
        # flapping on demand, not against an explicit decision.
        if hold is None and (now - idle_since).total_seconds() < idle_delay:
            waiting.append(
                f"pod {pod.name} idle for {duration(now - idle_since)} of {idle_delay} s"
            )
            continue
        candidates.append((idle_since, pod))
    candidates.sort(key=lambda item: (item[1].name not in outdated, item[0], -item[1].pk))

    deleted: list[str] = []
    for _since, pod in candidates[:surplus]:
        try:
            if _pod_delete_if_idle(pool=pool, pod=pod, kube=kube, actor=actor, reason=reason):
                deleted.append(pod.name)
        except KubeError as exc:
            text = f"{reason}; scale-down {_kube_words(f'delete {pod.name}', exc)}"
            if deleted:
                text += f" after deleting {', '.join(deleted)}"
            return _store(
                actor, decide(ScaleAction.BLOCKED, desired, actual, text, deleted=deleted)
            )

    notes = []
    if len(deleted) < surplus:
        if busy:
            notes.append("scale-down blocked: " + "; ".join(busy[:5]))
        if waiting:
            notes.append("scale-down waits: " + "; ".join(waiting[:5]))
    if deleted:
        text = "; ".join([f"{reason}; deleted {', '.join(deleted)}", *notes])
        return _store(actor, decide(ScaleAction.SCALE_DOWN, desired, actual, text, deleted=deleted))
    text = "; ".join([reason, *notes])
    if busy and not waiting:
        return _store(actor, decide(ScaleAction.BLOCKED, desired, actual, text))
    # Waiting for the idle delay is the normal course of things, not worth a row per pass.
    return decide(ScaleAction.NONE, desired, actual, text)


def _kube_words(action: str, exc: KubeError) -> str:
    kind = "will retry" if exc.retryable else "not retryable: needs a human"
    return f"failed ({kind}): {action}: {exc.message}"


def _pod_delete_if_idle(
    *,
    pool: AgentPool,
    pod: Pod,
    kube: KubeApi,
    actor: str,
    reason: str,
    kind: str = "pod.scale_down",
    cordon_reason: str = "scale-down",
) -> bool:
    """Delete a pod whose slots are all still idle (checked under its row lock)."""
    return pod_retire(
        pod=pod,
        kube=kube,
        actor=actor,
        kind=kind,
        reason=reason,
        cordon_reason=cordon_reason,
        blocking_states=(SlotState.RUNNING, SlotState.RESERVED),
    )


def _store(actor: str, decision: ScaleDecision) -> ScaleDecision:
    """Save a decision. A block that repeats the pool's last decision word for word is not
    stored again: a cluster that stays down must not write a row every few seconds."""
    if decision.action == ScaleAction.BLOCKED:
        last = (
            ScaleDecision.objects.filter(pool_id=decision.pool_id)
            .order_by("-at", "-id")
            .values_list("action", "reason")
            .first()
        )
        if last == (decision.action, decision.reason):
            return decision
    with transaction.atomic():
        decision.save()
        event_record(
            actor=actor,
            kind=f"pool.{decision.action}",
            target_type="pool",
            target_id=decision.pool_id,
            pool_id=decision.pool_id,
            before={"pods": decision.actual},
            after={
                "desired": decision.desired,
                "created": decision.created_pods,
                "deleted": decision.deleted_pods,
            },
            reason=decision.reason,
        )
        broadcast_pool_changed(
            pool_id=decision.pool_id, kind="pool", payload={"scale": decision.action}
        )
    if decision.action == ScaleAction.BLOCKED:
        logger.warning(
            "autoscaler %s: %s",
            decision.pool_id,
            decision.reason,
            extra=log_ids(pool=decision.pool_id),
        )
    return decision
