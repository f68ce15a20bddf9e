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
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction

from poolsadmin.agents.liveness import Liveness, agents_lost, liveness_read
from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record, events_write
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
    NewPod,
    pod_delete_not_done,
    pod_retire,
    pods_create,
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


def pods_phase_set(*, pool_id: str, phases: Sequence[tuple[Pod, str]], actor: str) -> list[Pod]:
    """The pods' phases as the cluster reports them, each conditional on the phase the caller
    saw, with an event each, in one transaction of three statements per pair of phases (not
    per pod: a cold start sees a thousand pods go from Pending to Running). Returns the pods
    that changed; `.phase` is updated on them."""
    moves: dict[tuple[str, str], dict[int, Pod]] = defaultdict(dict)
    for pod, phase in phases:
        if pod.phase != phase:
            moves[(pod.phase, phase)][pod.pk] = pod
    changed: list[tuple[Pod, str]] = []
    events: list[Event] = []
    with transaction.atomic():
        for (before, after), pods in moves.items():
            # Locked first, so the rows updated are exactly those read as still `before`. A
            # row another transaction holds right now (a retire, a link) is skipped, not waited
            # for (no deadlock between two transactions that lock many pods): its phase follows
            # on the next pass.
            ids = list(
                Pod.objects.select_for_update(skip_locked=True, no_key=True)
                .filter(pk__in=list(pods), phase=before)
                .values_list("pk", flat=True)
            )
            Pod.objects.filter(pk__in=ids).update(phase=after)
            for pk in ids:
                pod = pods[pk]
                event_record(
                    actor=actor,
                    kind="pod.phase_changed",
                    target_type="pod",
                    target_id=pod.name,
                    pool_id=pool_id,
                    before={"phase": before},
                    after={"phase": after},
                    batch=events,
                )
                changed.append((pod, after))
        events_write(events)
        if changed:
            broadcast_pool_changed(
                pool_id=pool_id, kind="pod", payload={"pods": [pod.name for pod, _ in changed]}
            )
    for pod, phase in changed:
        pod.phase = phase
    return [pod for pod, _ in changed]


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
    """Remove one pod and its slots from the ledger (pods_remove)."""
    return pod.pk in pods_remove(pool_id=pod.pool_id, pods=[(pod, reason)], actor=actor)


def pods_remove(*, pool_id: str, pods: Sequence[tuple[Pod, str]], actor: str) -> set[int]:
    """Remove pods and their slots from the ledger, with a `pod.removed` event each (the
    reason given with it), in one transaction of a few statements however many they are (a
    lost node takes a whole pool's pods at once). Returns the ids of the pods removed.

    A pod is kept while a slot still holds a task: the caller fails or drops those first, and
    a task that raced in is kept for the next pass rather than orphaned. Pods and slots are
    locked with SKIP LOCKED: one another transaction holds right now (a scheduler batch taking
    one of its slots) is kept for the next pass too, never waited for, so two transactions
    that lock many rows cannot deadlock."""
    by_pk = {pod.pk: (pod, reason) for pod, reason in pods}
    events: list[Event] = []
    with transaction.atomic():
        locked = set(
            Pod.objects.select_for_update(skip_locked=True)
            .filter(pk__in=list(by_pk))
            .values_list("pk", flat=True)
        )
        slots = Slot.objects.filter(pod_id__in=list(locked))
        held = list(
            slots.select_for_update(skip_locked=True).values_list("pod_id", "state").order_by()
        )
        # Locked slots (all of them, or a scheduler holds one) that are all idle: the slot
        # rows cannot change before the transaction ends, so no dispatch can slip in.
        total = Counter(slots.order_by().values_list("pod_id", flat=True))
        idle = Counter(pod_id for pod_id, state in held if state == SlotState.IDLE)
        removable = {pk for pk in locked if idle[pk] == total[pk]}
        Slot.objects.filter(pod_id__in=list(removable)).delete()
        Pod.objects.filter(pk__in=list(removable)).delete()
        for pk in sorted(removable):
            pod, reason = by_pk[pk]
            event_record(
                actor=actor,
                kind="pod.removed",
                target_type="pod",
                target_id=pod.name,
                pool_id=pool_id,
                before={"phase": pod.phase, "slots": idle[pk], "agent_id": pod.agent_id},
                reason=reason,
                batch=events,
            )
        events_write(events)
        if removable:
            broadcast_pool_changed(
                pool_id=pool_id,
                kind="pod",
                payload={"pods": [by_pk[pk][0].name for pk in removable]},
            )
    return removable


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


def _release_pods(*, gone: list[tuple[Pod, str]], actor: str, dry_run: bool) -> list[Change]:
    """Fail the running tasks of pods that are gone (each with why) and drop their
    reservations, then remove the pods from the ledger: a few queries for all of them, and
    one repair per task that held a slot there.

    Immediately, with no grace period: the pods are gone for certain, so their work is lost
    (I-713 B: one reconcile fails the tasks that were running on the failed pod)."""
    if not gone:
        return []
    changes: list[Change] = []
    why_of = {pod.pk: why for pod, why in gone}
    busy = (
        Slot.objects.filter(pod_id__in=list(why_of))
        .exclude(state=SlotState.IDLE)
        .select_related("task", "pod")
        .order_by("pod__name", "index")
    )
    slotted = set()
    for slot in busy:
        pod, why = slot.pod, why_of[slot.pod_id]
        reason = f"pod {pod.name} {why}"
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
    # Running tasks that point at the pods without holding a slot there (drift).
    names = {pod.pk: pod.name for pod, _ in gone}
    for task_id, pod_id in (
        WorkspaceTask.objects.filter(pod_id__in=list(why_of), status=TaskStatus.RUNNING)
        .exclude(pk__in=slotted)
        .order_by("pk")
        .values_list("id", "pod_id")
    ):
        assert pod_id is not None
        message = (
            f"Pod {names[pod_id]} {why_of[pod_id]}; task #{task_id} that was running on it "
            "was lost."
        )
        if dry_run or task_fail_lost(task_id=task_id, message=message, actor=actor):
            changes.append(Change("task.fail", f"task #{task_id}", message))
    reasons = [(pod, f"pod {pod.name} {why}") for pod, why in gone]
    removed = (
        {pod.pk for pod, _ in gone}
        if dry_run
        else pods_remove(pool_id=gone[0][0].pool_id, pods=reasons, actor=actor)
    )
    changes += [
        Change("pod.remove", pod.name, reason) for pod, reason in reasons if pod.pk in removed
    ]
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


def _agents_waiting_for(*, pool: AgentPool, pods: list[PodInfo]) -> dict[str, str]:
    """Pod name -> the agent that registered under that name before its pod was known, in
    one query for all the pods a pass adopts. Not one registered from another pod of that
    name: a replaced pod's agent registers anew (agent_register)."""
    uids = {info.name: info.uid for info in pods}
    waiting: dict[str, str] = {}
    for name, pod_uid, agent_id in (
        Agent.objects.filter(
            pool=pool, agent_name__in=list(uids), pod__isnull=True, retired_at__isnull=True
        )
        .order_by("pk")
        .values_list("agent_name", "pod_uid", "agent_id")
    ):
        if pod_uid in ("", uids[name]):
            waiting.setdefault(name, agent_id)
    return waiting


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

    gone: list[tuple[Pod, str]] = []
    moving: list[tuple[Pod, str]] = []
    phase_changes: dict[int, Change] = {}
    for pod in Pod.objects.filter(pool=pool).order_by("name"):
        seen = listed.get(pod.name)
        if pod.name in lost:
            gone.append((pod, lost[pod.name]))
        elif (
            seen is None
            or seen.deletion_requested
            or pod.name in finished_names
            or _replaced(pod, seen)
        ):
            gone.append((pod, _gone_reason(seen)))
        else:
            if not pod.uid and seen.uid:
                pod_uid_learn(pod=pod, uid=seen.uid, actor=actor)
            if seen.phase != pod.phase:
                moving.append((pod, seen.phase))
                phase_changes[pod.pk] = Change("pod.phase", pod.name, f"-> {seen.phase}")
                changes.append(phase_changes[pod.pk])
            if _delete_not_done(pod, listed_at) and (
                dry_run or pod_delete_not_done(pod=pod, actor=actor)
            ):
                changes.append(Change("pod.uncordon", pod.name, "its delete did not happen"))

    changes += _release_pods(gone=gone, actor=actor, dry_run=dry_run)
    if moving and not dry_run:
        # All at once (pods_phase_set); a pod whose change did not happen is not reported.
        moved = {pod.pk for pod in pods_phase_set(pool_id=pool.pool_id, phases=moving, actor=actor)}
        skipped = {id(phase_changes[pod.pk]) for pod, _ in moving if pod.pk not in moved}
        changes = [change for change in changes if id(change) not in skipped]

    # Read again: the pods released above are gone, and a replaced pod's name is free.
    known = set(Pod.objects.filter(pool=pool).values_list("name", flat=True))
    new = [
        info
        for info in sorted(listed.values(), key=lambda i: i.name)
        if info.name not in known
        and info.name not in finished_names
        and info.name not in lost
        and not info.deletion_requested
    ]
    agents = _agents_waiting_for(pool=pool, pods=new)
    adopted = [
        NewPod(name=info.name, phase=info.phase, agent_id=agents.get(info.name), uid=info.uid)
        for info in new
    ]
    if adopted and not dry_run:
        pods_create(pool=pool, pods=adopted, actor=actor)
    for new_pod in adopted:
        agent = f", agent {new_pod.agent_id}" if new_pod.agent_id else ""
        changes.append(Change("pod.adopt", new_pod.name, f"phase {new_pod.phase}{agent}"))
    return changes
