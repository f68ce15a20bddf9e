"""Admin actions on slots and pods (SPEC 8 "Actions"): release a slot (with its preview and
its 60-second undo), drain and undrain a pod.

Each action is a service: keyword-only, one transaction, a conditional update on the state
the caller saw, an event carrying the reason, a realtime nudge after commit.

What a release does to the task, decided from what an operator means by it:

* a **reserved** slot holds nobody's running work, only an apply_pending task's warm working
  directory. Releasing it drops the reservation (`task_reservation_drop`): the task stays
  apply_pending and still owns the workspace lock, and its apply will take a fresh slot and
  re-init. Nothing is lost but the warm directory, so this release can be undone.
* a **running** slot holds work an agent is doing. Freeing the slot under it would let a
  second task run on the same slot, so the task is failed (`task_fail_lost`) with a message
  naming who released it and why; its agent hears of it in its next heartbeat answer. A
  failed apply keeps the workspace lock (it may have changed things), like any failed apply.
  A failed task is terminal, so this release cannot be undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F

from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, InvalidInput, NotFound
from poolsadmin.lib.humanize import duration
from poolsadmin.pools.models import Pod, Slot, SlotState
from poolsadmin.pools.services import slot_label
from poolsadmin.realtime.broadcast import broadcast_pool_changed
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_fail_lost, task_reservation_drop

RELEASE_UNDO_SECONDS = 60
RELEASED = "slot.released"
RELEASE_UNDONE = "slot.release_undone"


class SlotChanged(Conflict):
    """The slot is no longer at the version the caller saw: refuse, and say what it is now so
    the dialog can show it."""

    def __init__(self, message: str, *, current: dict[str, Any]) -> None:
        super().__init__(message, field="expected_version")
        self.current = current

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "current": self.current}


@dataclass(frozen=True)
class ReleaseResult:
    slot: Slot
    task: WorkspaceTask
    event: Event  # the `slot.released` event; its id is what an undo names
    task_failed: bool  # a running slot was released: its task failed
    undo_until: datetime | None  # None: this release cannot be undone


@dataclass(frozen=True)
class ReleaseUndoResult:
    slot: Slot
    task: WorkspaceTask
    event: Event


@dataclass(frozen=True)
class ReleaseImpact:
    slot_id: int
    state: str
    version: int
    task_id: int | None
    text: str


def _slot(slot_id: int) -> Slot:
    slot = Slot.objects.select_related("pod").filter(pk=slot_id).first()
    if slot is None:
        raise NotFound(f"slot {slot_id} does not exist")
    return slot


def _slot_state(slot: Slot) -> dict[str, Any]:
    return {
        "slot_id": slot.pk,
        "slot": slot_label(slot),
        "state": slot.state,
        "task_id": slot.task_id,
        "version": slot.version,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _parse(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


# --- release -----------------------------------------------------------------------------------


def slot_release_impact(*, slot_id: int) -> ReleaseImpact:
    """What releasing the slot would do, in a sentence for the confirm dialog, with the version
    the sentence describes (the dialog sends it back as `expected_version`)."""
    slot = _slot(slot_id)
    now = clock.now()
    task = WorkspaceTask.objects.filter(pk=slot.task_id).first() if slot.task_id else None
    if task is None or slot.state == SlotState.IDLE:
        text = f"slot {slot_label(slot)} is idle; there is nothing to release"
    elif slot.state == SlotState.RESERVED:
        since = task.planned_at or slot.since
        text = (
            f"frees the reservation of task #{task.pk}, {task.status} for "
            f"{duration(now - since)}; its apply will need a fresh slot and a re-init"
        )
    else:
        applying = task.is_applying
        since = (task.apply_started_at if applying else task.started_at) or slot.since
        what = "applying" if applying else "running"
        text = (
            f"fails task #{task.pk} ({task.task_type}, {what} for {duration(now - since)}) "
            "and frees its slot; its agent is told to stop at its next heartbeat"
        )
        if task.apply_started:
            text += "; the workspace stays locked: the apply may have changed things"
    return ReleaseImpact(
        slot_id=slot.pk, state=slot.state, version=slot.version, task_id=slot.task_id, text=text
    )


def slot_release_preview(*, slot_id: int) -> str:
    return slot_release_impact(slot_id=slot_id).text


def slot_release(*, slot_id: int, actor: str, reason: str, expected_version: int) -> ReleaseResult:
    """Free a reserved or running slot, only if it is still at `expected_version`.

    Lock order is task, then slot, as in dispatch (task row, then pod, then slot): taking the
    slot first could deadlock against a dispatch of the same task on PostgreSQL."""
    if not reason.strip():
        raise InvalidInput("a reason is required to release a slot", field="reason")
    seen = _slot(slot_id)
    _refuse_changed(seen, expected_version)
    if seen.state == SlotState.IDLE or seen.task_id is None:
        raise Conflict(f"slot {slot_label(seen)} is idle; there is nothing to release")
    task_id = seen.task_id
    with transaction.atomic():
        task = WorkspaceTask.objects.select_for_update(of=("self",)).filter(pk=task_id).first()
        slot = Slot.objects.select_for_update().select_related("pod").filter(pk=slot_id).first()
        if task is None or slot is None:
            raise Conflict(f"slot {slot_label(seen)} changed; reload and try again")
        _refuse_changed(slot, expected_version)
        pool_id = slot.pod.pool_id
        before = {
            **_slot_state(slot),
            "task_type": slot.task_type,
            "since": _iso(slot.since),
            "reserved_until": _iso(slot.reserved_until),
            "task_status": task.status,
            "task_agent_id": task.agent_id,
            "task_pod_id": task.pod_id,
            "task_pod_name": task.pod_name,
            "task_slot_index": task.slot_index,
        }
        why = f"slot {slot_label(slot)} released by {actor}: {reason}"
        if slot.state == SlotState.RESERVED:
            failed = False
            if not task_reservation_drop(task_id=task_id, actor=actor, reason=why):
                raise Conflict(f"task #{task_id} no longer holds a reservation on this slot")
        else:
            failed = True
            if task_fail_lost(task_id=task_id, message=why, actor=actor) is None:
                raise Conflict(f"task #{task_id} is {task.status}, not running; nothing changed")
        slot.refresh_from_db()
        task.refresh_from_db()
        event = event_record(
            actor=actor,
            kind=RELEASED,
            target_type="slot",
            target_id=slot_label(slot),
            pool_id=pool_id,
            workspace_id=task.workspace_id,
            task_id=task_id,
            before=before,
            after={**_slot_state(slot), "task_status": task.status},
            reason=reason,
            data={"slot_id": slot.pk, "undoable": not failed},
        )
        broadcast_pool_changed(pool_id=pool_id, kind="slot", payload={"slot": slot_label(slot)})
    undo_until = None if failed else event.at + timedelta(seconds=RELEASE_UNDO_SECONDS)
    return ReleaseResult(
        slot=slot, task=task, event=event, task_failed=failed, undo_until=undo_until
    )


def _refuse_changed(slot: Slot, expected_version: int) -> None:
    if slot.version == expected_version:
        return
    holder = f" (task #{slot.task_id})" if slot.task_id else ""
    raise SlotChanged(
        f"this slot changed: {slot_label(slot)} is now {slot.state}{holder} at version "
        f"{slot.version}, not version {expected_version}; nothing was released",
        current=_slot_state(slot),
    )


# --- undo --------------------------------------------------------------------------------------


def slot_release_undo(*, event_id: int, actor: str) -> ReleaseUndoResult:
    """Put a released reservation back, within 60 s of the release, while the slot is still
    idle at the version the release left and the task still waits without a slot."""
    release = Event.objects.filter(pk=event_id, kind=RELEASED).first()
    if release is None:
        raise NotFound(f"event {event_id} is not a slot release")
    before: dict[str, Any] = release.before or {}
    after: dict[str, Any] = release.after or {}
    if before.get("state") != SlotState.RESERVED:
        raise Conflict(f"release {event_id} failed a running task; a failed task cannot be undone")
    age = clock.now() - release.at
    if age > timedelta(seconds=RELEASE_UNDO_SECONDS):
        raise Conflict(
            f"release {event_id} was {duration(age)} ago; it can only be undone within "
            f"{RELEASE_UNDO_SECONDS} s"
        )
    task_id = int(before["task_id"])
    slot_id = int(before["slot_id"])
    with transaction.atomic():
        task = WorkspaceTask.objects.select_for_update(of=("self",)).filter(pk=task_id).first()
        slot = Slot.objects.select_for_update().select_related("pod").filter(pk=slot_id).first()
        if slot is None:
            raise Conflict(f"the released slot of event {event_id} no longer exists")
        if task is None or task.status != TaskStatus.APPLY_PENDING:
            status = task.status if task else "gone"
            raise Conflict(f"task #{task_id} is {status}, no longer apply_pending; not undone")
        if Slot.objects.filter(task_id=task_id).exists():
            raise Conflict(f"task #{task_id} already holds another slot; not undone")
        restored = Slot.objects.filter(
            pk=slot_id,
            state=SlotState.IDLE,
            task__isnull=True,
            version=int(after.get("version", -1)),
        ).update(
            state=SlotState.RESERVED,
            task_id=task_id,
            task_type=before.get("task_type", ""),
            since=_parse(before.get("since")) or clock.now(),
            reserved_until=_parse(before.get("reserved_until")),
            version=F("version") + 1,
        )
        if restored != 1:
            holder = f" by task #{slot.task_id}" if slot.task_id else ""
            raise Conflict(
                f"slot {slot_label(slot)} changed since the release (now {slot.state}{holder}, "
                f"version {slot.version}); the reservation cannot be put back"
            )
        agent_id = before.get("task_agent_id")
        if agent_id and not Agent.objects.filter(pk=agent_id).exists():
            agent_id = None
        task_before = {"agent_id": task.agent_id, "pod": task.pod_name or None, "slot": None}
        updated = WorkspaceTask.objects.filter(
            pk=task_id, status=TaskStatus.APPLY_PENDING, pod__isnull=True
        ).update(
            agent_id=agent_id,
            pod_id=slot.pod_id,
            pod_name=slot.pod.name,
            slot_index=slot.index,
        )
        if updated != 1:
            raise Conflict(f"task #{task_id} changed since the release; not undone")
        slot.refresh_from_db()
        task.refresh_from_db()
        pool_id = slot.pod.pool_id
        event_record(
            actor=actor,
            kind="task.reservation_restored",
            target_type="task",
            target_id=task_id,
            pool_id=pool_id,
            workspace_id=task.workspace_id,
            task_id=task_id,
            before=task_before,
            after={"agent_id": task.agent_id, "pod": task.pod_name, "slot": task.slot_index},
            reason=f"release {event_id} undone by {actor}",
        )
        event = event_record(
            actor=actor,
            kind=RELEASE_UNDONE,
            target_type="slot",
            target_id=slot_label(slot),
            pool_id=pool_id,
            workspace_id=task.workspace_id,
            task_id=task_id,
            before=after,
            after={**_slot_state(slot), "reserved_until": _iso(slot.reserved_until)},
            reason=release.reason,
            data={"release_event_id": release.pk, "slot_id": slot.pk},
        )
        broadcast_pool_changed(pool_id=pool_id, kind="slot", payload={"slot": slot_label(slot)})
    return ReleaseUndoResult(slot=slot, task=task, event=event)


# --- pods --------------------------------------------------------------------------------------


def _pod_cordon(*, pod_id: int, actor: str, reason: str, cordon: bool) -> Pod:
    verb = "drain" if cordon else "undrain"
    if not reason.strip():
        raise InvalidInput(f"a reason is required to {verb} a pod", field="reason")
    with transaction.atomic():
        pod = Pod.objects.filter(pk=pod_id).first()
        if pod is None:
            raise NotFound(f"pod {pod_id} does not exist")
        before = {
            "cordoned": pod.cordoned,
            "cordoned_by": pod.cordoned_by,
            "cordoned_reason": pod.cordoned_reason,
        }
        changed = Pod.objects.filter(pk=pod_id, cordoned=not cordon).update(
            cordoned=cordon,
            cordoned_by=actor if cordon else "",
            cordoned_reason=reason if cordon else "",
        )
        if changed != 1:
            if cordon:
                raise Conflict(
                    f"pod {pod.name} is already draining ({pod.cordoned_by}: {pod.cordoned_reason})"
                )
            raise Conflict(f"pod {pod.name} is not draining")
        pod.refresh_from_db()
        event_record(
            actor=actor,
            kind="pod.drained" if cordon else "pod.undrained",
            target_type="pod",
            target_id=pod.name,
            pool_id=pod.pool_id,
            before=before,
            after={"cordoned": cordon},
            reason=reason,
        )
        broadcast_pool_changed(
            pool_id=pod.pool_id, kind="pod", payload={"pod": pod.name, "cordoned": cordon}
        )
    return pod


def pod_drain(*, pod_id: int, actor: str, reason: str) -> Pod:
    """Take no new work on the pod; its running work finishes and a reserved apply may still
    resume there (placement_candidates)."""
    return _pod_cordon(pod_id=pod_id, actor=actor, reason=reason, cordon=True)


def pod_undrain(*, pod_id: int, actor: str, reason: str) -> Pod:
    return _pod_cordon(pod_id=pod_id, actor=actor, reason=reason, cordon=False)
