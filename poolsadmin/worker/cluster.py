"""Cluster sync for k8s pools (SPEC 5): the ledger's pods follow the cluster's.

One pass: list the pool's pods by label; adopt pods the ledger does not know; follow phase
changes; delete `Failed`/`Succeeded` pods from the cluster, and pods whose agent is lost
(offline past heartbeat timeout + grace) once they hold no running slot; and for pods that are
gone (or going), fail their running tasks naming the pod, drop their reservations and remove
them from the ledger (the autoscaler then creates replacements). The cluster is only read until
the plan is complete, so a retryable API error changes nothing and the next pass starts again
from the top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from poolsadmin.agents.liveness import Liveness, agents_lost, liveness_read
from poolsadmin.agents.models import Agent
from poolsadmin.events.services import event_record
from poolsadmin.kube.adapter import KubeApi, KubeError, PodInfo
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import stamp
from poolsadmin.pools.models import (
    FINISHED_PHASES,
    AgentPool,
    Pod,
    PoolType,
    Slot,
    SlotState,
)
from poolsadmin.pools.services import (
    pod_create,
    pod_delete_not_done,
    pod_retire,
    slot_free_for_task,
)
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_fail_lost, task_reservation_drop

logger = logging.getLogger("poolsadmin.worker.cluster")

RECONCILER = "system:reconciler"


@dataclass(frozen=True)
class Change:
    """One change a reconcile pass made, or would make in a dry run."""

    kind: str  # "pod.adopt", "task.fail", "drift.slot_mismatch", ...
    target: str  # pod name, "task #12", "pod-a[0]"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.target}" + (f": {self.detail}" if self.detail else "")


class ClusterUnavailable(Exception):
    """The cluster could not be read or changed this pass; the pool was skipped."""

    def __init__(self, error: KubeError) -> None:
        super().__init__(error.message)
        self.error = error


# --- ledger services for pods (pools/services.py has create and link only) ---------------------


def pod_phase_set(*, pod: Pod, phase: str, actor: str) -> bool:
    """The pod's phase as the cluster reports it. Conditional on the phase the caller saw."""
    if pod.phase == phase:
        return False
    with transaction.atomic():
        changed = Pod.objects.filter(pk=pod.pk, phase=pod.phase).update(phase=phase)
        if changed != 1:
            return False
        event_record(
            actor=actor,
            kind="pod.phase_changed",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before={"phase": pod.phase},
            after={"phase": phase},
        )
        broadcast_pool_changed(pool_id=pod.pool_id, kind="pod", payload={"pod": pod.name})
    pod.phase = phase
    return True


def pod_uid_learn(*, pod: Pod, uid: str, actor: str) -> bool:
    """The cluster's uid of a pod adopted before uids were kept. Only a pod without one: a pod
    listed with another uid than the ledger's is another pod (cluster_sync releases it)."""
    with transaction.atomic():
        if Pod.objects.filter(pk=pod.pk, uid="").update(uid=uid) != 1:
            return False
        event_record(
            actor=actor,
            kind="pod.uid_learned",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            after={"uid": uid},
        )
    pod.uid = uid
    return True


def pod_remove(*, pod: Pod, actor: str, reason: str) -> bool:
    """Remove a pod and its slots from the ledger. Refused (False) while a slot still holds a
    task: the caller fails or drops those first, and a task that raced in is kept for the
    next pass rather than orphaned."""
    with transaction.atomic():
        locked = Pod.objects.select_for_update().filter(pk=pod.pk).first()
        if locked is None:
            return False
        # Only idle slots go, and the pod only if none is left: a dispatch that takes a slot
        # between the caller's release and this delete (slots_take does not lock the pod) keeps
        # its slot, and the pod stays until the next pass.
        slots, _ = Slot.objects.filter(pod=locked, state=SlotState.IDLE).delete()
        if Slot.objects.filter(pod=locked).exists():
            transaction.set_rollback(True)
            return False
        locked.delete()
        event_record(
            actor=actor,
            kind="pod.removed",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before={"phase": pod.phase, "slots": slots, "agent_id": pod.agent_id},
            reason=reason,
        )
        broadcast_pool_changed(pool_id=pod.pool_id, kind="pod", payload={"pod": pod.name})
    return True


# --- the pass --------------------------------------------------------------------------------


def _delete_not_done(pod: Pod, listed_at: datetime) -> bool:
    """The pod's delete of unknown outcome did not happen: it is listed (not being deleted) by
    a listing made longer after the request than the request could take."""
    asked = pod.delete_unconfirmed_at
    timeout = timedelta(seconds=settings.KUBE_CONFIG.timeout_seconds)
    return asked is not None and listed_at - asked > timeout


def _replaced(pod: Pod, info: PodInfo | None) -> bool:
    """The cluster lists another pod under this pod's name (a pod made again by hand or by a
    StatefulSet): the one the ledger knows is gone."""
    return info is not None and bool(pod.uid) and bool(info.uid) and info.uid != pod.uid


def _gone_reason(info: PodInfo | None) -> str:
    if info is None:
        return "vanished from the cluster"
    if info.deletion_requested:
        return "is being deleted from the cluster"
    if info.phase not in FINISHED_PHASES:
        return "was replaced by a new pod of the same name"
    return f"is {info.phase} and was deleted from the cluster"


def _release_pod(*, pod: Pod, why: str, actor: str, dry_run: bool) -> list[Change]:
    """Fail the pod's running tasks and drop its reservations, then remove it from the ledger.

    Immediately, with no grace period: the pod is gone for certain, so its work is lost
    (I-713 B: one reconcile fails the tasks that were running on the failed pod)."""
    changes: list[Change] = []
    reason = f"pod {pod.name} {why}"
    busy = Slot.objects.filter(pod=pod).exclude(state=SlotState.IDLE).select_related("task")
    slotted = set()
    for slot in busy.order_by("index"):
        task = slot.task
        assert task is not None  # the slot_state_matches_task constraint
        slotted.add(task.pk)
        if slot.state == SlotState.RUNNING and task.status == TaskStatus.RUNNING:
            message = f"Pod {pod.name} {why}; task #{task.pk} that was running on it was lost."
            if dry_run or task_fail_lost(task_id=task.pk, message=message, actor=actor):
                changes.append(Change("task.fail", f"task #{task.pk}", message))
        elif slot.state == SlotState.RESERVED and task.status == TaskStatus.APPLY_PENDING:
            if dry_run or task_reservation_drop(task_id=task.pk, actor=actor, reason=reason):
                changes.append(Change("reservation.drop", f"task #{task.pk}", reason))
        # A slot whose task has moved on (drift the ledger check would free) must not keep a
        # gone pod in the ledger.
        elif dry_run or slot_free_for_task(
            task_id=task.pk, actor=actor, reason=reason, pool_id=pod.pool_id, only_state=slot.state
        ):
            changes.append(Change("slot.free", f"{pod.name}[{slot.index}]", reason))
    # Running tasks that point at the pod without holding a slot there (drift).
    for task_id in (
        WorkspaceTask.objects.filter(pod=pod, status=TaskStatus.RUNNING)
        .exclude(pk__in=slotted)
        .values_list("id", flat=True)
    ):
        message = f"Pod {pod.name} {why}; task #{task_id} that was running on it was lost."
        if dry_run or task_fail_lost(task_id=task_id, message=message, actor=actor):
            changes.append(Change("task.fail", f"task #{task_id}", message))
    if dry_run or pod_remove(pod=pod, actor=actor, reason=reason):
        changes.append(Change("pod.remove", pod.name, reason))
    return changes


def _lost_agent_pods(*, pool: AgentPool, liveness: Liveness, dry_run: bool) -> list[Pod]:
    """Pods whose agent is lost (`agents_lost`: the reconciler's ledger-side step judges the
    same agents), and so never for silence poolsadmin could not hear: deleting a pod kills
    its terraform."""
    lost = agents_lost(pool=pool, now=clock.now(), liveness=liveness, dry_run=dry_run)
    return list(
        Pod.objects.filter(pool=pool, agent__in=lost).select_related("agent").order_by("name")
    )


def _lost_agent_words(agent: Agent) -> str:
    when = stamp(agent.last_ping_at) if agent.last_ping_at else "never"
    return f"its agent {agent.agent_name} ({agent.agent_id}) is lost (last heartbeat {when})"


def _pod_delete_for_lost_agent(*, pool: AgentPool, pod: Pod, kube: KubeApi, actor: str) -> bool:
    """Delete the pod of a lost agent once it holds no running slot.

    Its running tasks are failed by the ledger-side step first (a running slot means that
    has not happened yet: the next pass tries again); reservations are dropped when the pod
    is released. A failed delete raises ClusterUnavailable before anything else changed."""
    agent = pod.agent
    assert agent is not None  # _lost_agent_pods
    try:
        return pod_retire(
            pod=pod,
            kube=kube,
            actor=actor,
            kind="pod.agent_lost",
            reason=f"pod {pod.name} deleted from the cluster: {_lost_agent_words(agent)}",
            cordon_reason="agent lost",
            blocking_states=(SlotState.RUNNING,),
            before={"agent_id": agent.agent_id},
            after={"deleted": True},
        )
    except KubeError as exc:
        raise ClusterUnavailable(exc) from exc


def cluster_sync(
    *,
    pool: AgentPool,
    kube: KubeApi,
    dry_run: bool = False,
    actor: str = RECONCILER,
    liveness: Liveness | None = None,
    keep: Callable[[], None] = lambda: None,
) -> list[Change]:
    """1. list the pool's pods by label (a retryable error: ClusterUnavailable, nothing
          changed);
    2. delete `Failed`/`Succeeded` pods from the cluster (a pod that is already gone is fine),
       and pods whose agent is lost once they hold no running slot (an event names the
       agent);
    3. pods the ledger knows that are finished, being deleted or gone: fail their running
       tasks naming the pod, drop their reservations, remove them and their slots;
    4. phase changes of the others are written with an event;
    5. new pods are adopted with idle slots, linked to an agent of the same name if one has
       registered already.
    `keep()` is called before every change to the cluster: it renews the caller's lease on
    the pool and raises if it was lost, so two passes never delete or adopt the same pods."""
    if pool.pool_type != PoolType.K8S:
        return []
    listed_at = clock.now()
    try:
        listed = {
            info.name: info
            for info in kube.list_pods(namespace=pool.namespace, pool_id=pool.pool_id)
        }
    except KubeError as exc:
        raise ClusterUnavailable(exc) from exc
    changes: list[Change] = []
    finished = [
        i for i in listed.values() if i.phase in FINISHED_PHASES and not i.deletion_requested
    ]
    for info in finished:
        if not dry_run:
            keep()
            try:
                kube.delete_pod(namespace=pool.namespace, name=info.name)
            except KubeError as exc:
                # Nothing in the ledger changed yet for this pod; the next pass tries again.
                raise ClusterUnavailable(exc) from exc
        changes.append(Change("pod.delete", info.name, f"phase {info.phase}"))
    finished_names = {i.name for i in finished}

    # Pods whose agent is lost: deleted here, released below in the same pass.
    lost: dict[str, str] = {}
    liveness = liveness or liveness_read()
    for pod in _lost_agent_pods(pool=pool, liveness=liveness, dry_run=dry_run):
        seen = listed.get(pod.name)
        if seen is None or seen.deletion_requested or pod.name in finished_names:
            continue  # going anyway
        assert pod.agent is not None
        why = _lost_agent_words(pod.agent)
        if dry_run:
            if Slot.objects.filter(pod=pod, state=SlotState.RUNNING).exists():
                continue
        else:
            keep()
            if not _pod_delete_for_lost_agent(pool=pool, pod=pod, kube=kube, actor=actor):
                continue
        lost[pod.name] = f"was deleted from the cluster: {why}"
        changes.append(Change("pod.delete", pod.name, why))

    for pod in Pod.objects.filter(pool=pool).order_by("name"):
        seen = listed.get(pod.name)
        if pod.name in lost:
            changes += _release_pod(pod=pod, why=lost[pod.name], actor=actor, dry_run=dry_run)
        elif (
            seen is None
            or seen.deletion_requested
            or pod.name in finished_names
            or _replaced(pod, seen)
        ):
            changes += _release_pod(pod=pod, why=_gone_reason(seen), actor=actor, dry_run=dry_run)
        else:
            if not pod.uid and seen.uid:
                pod_uid_learn(pod=pod, uid=seen.uid, actor=actor)
            if seen.phase != pod.phase and (
                dry_run or pod_phase_set(pod=pod, phase=seen.phase, actor=actor)
            ):
                changes.append(Change("pod.phase", pod.name, f"-> {seen.phase}"))
            if _delete_not_done(pod, listed_at) and (
                dry_run or pod_delete_not_done(pod=pod, actor=actor)
            ):
                changes.append(Change("pod.uncordon", pod.name, "its delete did not happen"))

    # Read again: the pods released above are gone, and a replaced pod's name is free.
    known = set(Pod.objects.filter(pool=pool).values_list("name", flat=True))
    for info in sorted(listed.values(), key=lambda i: i.name):
        if (
            info.name in known
            or info.name in finished_names
            or info.name in lost
            or info.deletion_requested
        ):
            continue
        # An agent registered under the name before its pod was known. Not one registered from
        # another pod of that name: a replaced pod's agent registers anew (agent_register).
        agent_id = (
            Agent.objects.filter(
                pool=pool, agent_name=info.name, pod__isnull=True, retired_at__isnull=True
            )
            .filter(Q(pod_uid="") | Q(pod_uid=info.uid))
            .values_list("agent_id", flat=True)
            .first()
        )
        if not dry_run:
            pod_create(
                pool=pool,
                name=info.name,
                phase=info.phase,
                actor=actor,
                agent_id=agent_id,
                uid=info.uid,
            )
        detail = f"phase {info.phase}" + (f", agent {agent_id}" if agent_id else "")
        changes.append(Change("pod.adopt", info.name, detail))
    return changes
