"""Admin actions on slots and pods: release (stale versions refused, reason required), its
preview sentence, its 60-second undo, and drain/undrain."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
from django.db import connections

from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.errors import Conflict, InvalidInput, NotFound
from poolsadmin.pools.actions import (
    ReleaseResult,
    SlotChanged,
    pod_drain,
    pod_undrain,
    slot_release,
    slot_release_preview,
    slot_release_undo,
)
from poolsadmin.pools.models import AgentPool, Pod, Slot, SlotState
from poolsadmin.scheduler.services import task_dispatch
from poolsadmin.tasks.models import Stage, TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply
from tests.conftest import IS_POSTGRES
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    refresh,
    run,
    submit,
)

pytestmark = pytest.mark.django_db

ALICE = "user:alice"


@dataclass
class World:
    pool: AgentPool
    pod: Pod
    workspace: Workspace
    planned: WorkspaceTask  # apply_pending, its slot reserved, the workspace locked
    reserved: Slot


def build_world(pool_name: str = "blue", agent_name: str = "P1") -> World:
    pool = make_pool(name=pool_name)
    pod = pod_of(make_agent(pool, agent_name))
    workspace = make_workspace(pool, "infra")
    planned = plan_with_changes(submit(workspace, "plan_and_apply"))
    reserved = Slot.objects.get(task=planned)
    return World(pool=pool, pod=pod, workspace=workspace, planned=planned, reserved=reserved)


@pytest.fixture
def world() -> World:
    return build_world()


def release(slot: Slot, reason: str = "stuck for a day") -> int:
    slot.refresh_from_db()
    result = slot_release(
        slot_id=slot.pk, actor=ALICE, reason=reason, expected_version=slot.version
    )
    return result.event.pk


# --- release -----------------------------------------------------------------------------------


def test_releasing_a_reserved_slot_frees_it_and_the_task_waits_for_a_fresh_slot(
    world: World,
) -> None:
    version = world.reserved.version
    result = slot_release(
        slot_id=world.reserved.pk, actor=ALICE, reason="stuck", expected_version=version
    )

    slot = Slot.objects.get(pk=world.reserved.pk)
    assert (slot.state, slot.task_id, slot.reserved_until) == (SlotState.IDLE, None, None)
    assert slot.version > version
    task = refresh(world.planned)
    assert (task.status, task.stage) == (TaskStatus.APPLY_PENDING, Stage.APPLY_PENDING)
    assert (task.agent_id, task.pod_id, task.slot_index, task.pod_name) == (None, None, None, "")
    assert Workspace.objects.get(pk=world.workspace.pk).is_locked  # still its apply's
    assert not result.task_failed
    assert result.undo_until is not None
    event = result.event
    assert (event.kind, event.actor, event.reason) == ("slot.released", ALICE, "stuck")
    assert event.before is not None and event.after is not None
    assert event.before["state"] == SlotState.RESERVED
    assert event.before["task_id"] == task.pk
    assert event.after["state"] == SlotState.IDLE
    lost = Event.objects.get(kind="task.reservation_lost", task_id=task.pk)
    assert "released by user:alice: stuck" in lost.reason


def test_releasing_a_running_slot_fails_its_task_naming_who_and_why(world: World) -> None:
    running = run(submit(world.workspace, "plan"))
    slot = Slot.objects.get(task=running)

    result = slot_release(
        slot_id=slot.pk, actor=ALICE, reason="agent hung", expected_version=slot.version
    )

    task = refresh(running)
    assert task.status == TaskStatus.FAILED
    assert "released by user:alice: agent hung" in task.error_message
    assert Slot.objects.get(pk=slot.pk).state == SlotState.IDLE
    assert result.task_failed
    assert result.undo_until is None
    with pytest.raises(Conflict, match="cannot be undone"):
        slot_release_undo(event_id=result.event.pk, actor=ALICE)


def test_a_stale_version_is_refused_with_the_current_state_and_nothing_is_written(
    world: World,
) -> None:
    events = Event.objects.count()
    stale = world.reserved.version - 1

    with pytest.raises(SlotChanged, match="this slot changed") as refused:
        slot_release(slot_id=world.reserved.pk, actor=ALICE, reason="x", expected_version=stale)

    assert refused.value.current["state"] == SlotState.RESERVED
    assert refused.value.current["task_id"] == world.planned.pk
    assert refused.value.as_dict()["current"]["version"] == world.reserved.version
    assert Event.objects.count() == events
    assert Slot.objects.get(pk=world.reserved.pk).state == SlotState.RESERVED
    assert refresh(world.planned).pod_id is not None


@pytest.mark.parametrize("reason", ["", "   "])
def test_a_release_needs_a_reason(world: World, reason: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        slot_release(
            slot_id=world.reserved.pk,
            actor=ALICE,
            reason=reason,
            expected_version=world.reserved.version,
        )
    assert refused.value.field == "reason"
    assert Slot.objects.get(pk=world.reserved.pk).state == SlotState.RESERVED


def test_an_idle_slot_has_nothing_to_release_and_an_unknown_one_is_not_found(
    world: World,
) -> None:
    idle = Slot.objects.filter(pod=world.pod, state=SlotState.IDLE).first()
    assert idle is not None
    with pytest.raises(Conflict, match="nothing to release"):
        slot_release(slot_id=idle.pk, actor=ALICE, reason="x", expected_version=idle.version)
    with pytest.raises(NotFound):
        slot_release(slot_id=999999, actor=ALICE, reason="x", expected_version=1)


# --- preview -----------------------------------------------------------------------------------


def test_the_preview_of_a_reserved_slot_says_whose_reservation_goes_and_what_it_costs(
    world: World,
) -> None:
    clock.advance(3 * 3600)
    assert slot_release_preview(slot_id=world.reserved.pk) == (
        f"frees the reservation of task #{world.planned.pk}, apply_pending for 3 h; "
        "its apply will need a fresh slot and a re-init"
    )


def test_the_preview_of_a_running_slot_says_its_task_fails(world: World) -> None:
    running = run(submit(world.workspace, "plan"))
    clock.advance(300)
    text = slot_release_preview(slot_id=Slot.objects.get(task=running).pk)
    assert text.startswith(f"fails task #{running.pk} (plan, running for 5 min)")


def test_the_preview_of_an_idle_slot_says_there_is_nothing_to_release(world: World) -> None:
    idle = Slot.objects.filter(pod=world.pod, state=SlotState.IDLE).first()
    assert idle is not None
    assert "nothing to release" in slot_release_preview(slot_id=idle.pk)


# --- undo --------------------------------------------------------------------------------------


def test_a_release_undone_within_60_seconds_puts_the_reservation_back(world: World) -> None:
    before = Slot.objects.get(pk=world.reserved.pk)
    task_before = refresh(world.planned)
    event_id = release(world.reserved)
    clock.advance(59)

    result = slot_release_undo(event_id=event_id, actor=ALICE)

    slot = Slot.objects.get(pk=world.reserved.pk)
    assert (slot.state, slot.task_id) == (SlotState.RESERVED, world.planned.pk)
    assert slot.reserved_until == before.reserved_until
    assert slot.task_type == "plan_and_apply"
    assert slot.version > before.version
    task = refresh(world.planned)
    assert (task.agent_id, task.pod_id, task.pod_name, task.slot_index) == (
        task_before.agent_id,
        task_before.pod_id,
        task_before.pod_name,
        task_before.slot_index,
    )
    assert result.event.kind == "slot.release_undone"
    assert result.event.data["release_event_id"] == event_id
    # The confirmed apply resumes on its own reserved slot and may skip init again (I-598).
    task_confirm_apply(task_id=task.pk, actor=ALICE)
    outcome = task_dispatch(task_id=task.pk)
    assert outcome.dispatched and outcome.reuse_workdir


def test_a_release_cannot_be_undone_after_60_seconds(world: World) -> None:
    event_id = release(world.reserved)
    clock.advance(61)
    events = Event.objects.count()

    with pytest.raises(Conflict, match="within 60 s"):
        slot_release_undo(event_id=event_id, actor=ALICE)

    assert Event.objects.count() == events
    assert Slot.objects.get(pk=world.reserved.pk).state == SlotState.IDLE


def test_a_release_cannot_be_undone_once_the_slot_was_taken(world: World) -> None:
    event_id = release(world.reserved)
    # Fill every idle slot so the next plan lands on the released one.
    others = [run(submit(world.workspace, "plan")) for _ in range(4)]
    assert Slot.objects.filter(pk=world.reserved.pk, task__in=others).exists()

    with pytest.raises(Conflict, match="changed since the release"):
        slot_release_undo(event_id=event_id, actor=ALICE)

    assert refresh(world.planned).pod_id is None


def test_a_release_cannot_be_undone_once_the_apply_took_another_slot(world: World) -> None:
    event_id = release(world.reserved)
    task_confirm_apply(task_id=world.planned.pk, actor=ALICE)
    outcome = task_dispatch(task_id=world.planned.pk)
    assert outcome.dispatched and not outcome.reuse_workdir

    with pytest.raises(Conflict, match="no longer apply_pending"):
        slot_release_undo(event_id=event_id, actor=ALICE)


def test_a_release_is_undone_only_once(world: World) -> None:
    event_id = release(world.reserved)
    slot_release_undo(event_id=event_id, actor=ALICE)
    with pytest.raises(Conflict):
        slot_release_undo(event_id=event_id, actor=ALICE)


def test_undoing_an_event_that_is_not_a_release_is_not_found(world: World) -> None:
    other = Event.objects.exclude(kind="slot.released").first()
    assert other is not None
    with pytest.raises(NotFound):
        slot_release_undo(event_id=other.pk, actor=ALICE)


# --- drain -------------------------------------------------------------------------------------


def test_a_drained_pod_takes_no_new_work_and_its_reserved_apply_still_resumes(
    world: World,
) -> None:
    pod = pod_drain(pod_id=world.pod.pk, actor=ALICE, reason="node maintenance")

    assert (pod.cordoned, pod.cordoned_by, pod.cordoned_reason) == (
        True,
        ALICE,
        "node maintenance",
    )
    event = Event.objects.get(kind="pod.drained", target_id=pod.name)
    assert (event.actor, event.reason) == (ALICE, "node maintenance")
    plan = submit(world.workspace, "plan")
    outcome = task_dispatch(task_id=plan.pk)
    assert not outcome.dispatched
    assert outcome.diagnosis is not None and "draining" in outcome.diagnosis.text
    task_confirm_apply(task_id=world.planned.pk, actor=ALICE)
    assert task_dispatch(task_id=world.planned.pk).reuse_workdir


def test_an_undrained_pod_takes_work_again(world: World) -> None:
    pod_drain(pod_id=world.pod.pk, actor=ALICE, reason="maintenance")
    pod = pod_undrain(pod_id=world.pod.pk, actor=ALICE, reason="done")

    assert (pod.cordoned, pod.cordoned_by, pod.cordoned_reason) == (False, "", "")
    assert Event.objects.filter(kind="pod.undrained", reason="done").count() == 1
    assert task_dispatch(task_id=submit(world.workspace, "plan").pk).dispatched


def test_draining_twice_or_undraining_a_serving_pod_is_a_conflict_that_writes_nothing(
    world: World,
) -> None:
    with pytest.raises(Conflict, match="not draining"):
        pod_undrain(pod_id=world.pod.pk, actor=ALICE, reason="x")
    pod_drain(pod_id=world.pod.pk, actor=ALICE, reason="first")
    events = Event.objects.count()
    with pytest.raises(Conflict, match="already draining"):
        pod_drain(pod_id=world.pod.pk, actor="user:bob", reason="second")
    assert Event.objects.count() == events
    assert Pod.objects.get(pk=world.pod.pk).cordoned_by == ALICE


def test_drain_needs_a_reason_and_a_pod(world: World) -> None:
    with pytest.raises(InvalidInput) as refused:
        pod_drain(pod_id=world.pod.pk, actor=ALICE, reason=" ")
    assert refused.value.field == "reason"
    with pytest.raises(NotFound):
        pod_drain(pod_id=999999, actor=ALICE, reason="x")


# --- concurrency -------------------------------------------------------------------------------


def _race(*works: Callable[[], object]) -> list[object]:
    """Run each callable in its own thread (own connection), all released at once; returns
    each one's result or the exception it raised."""
    barrier = threading.Barrier(len(works))
    results: list[object] = [None] * len(works)

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = works[i]()
        except BaseException as exc:  # collected: the caller asserts which ones may fail
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(works))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.django_db(transaction=True)
def test_two_admins_releasing_the_same_slot_at_once_release_it_once() -> None:
    world = build_world("race", f"P-{Pod.objects.count()}")
    version = world.reserved.version

    def go() -> object:
        return slot_release(
            slot_id=world.reserved.pk, actor=ALICE, reason="race", expected_version=version
        )

    results = _race(go, go, go)

    assert sum(isinstance(r, ReleaseResult) for r in results) == 1, results
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, ReleaseResult))
    assert Event.objects.filter(kind="slot.released").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_release_racing_the_confirmed_apply_leaves_one_consistent_outcome() -> None:
    for _ in range(5 if IS_POSTGRES else 2):
        world = build_world("race", f"P-{Pod.objects.count()}")
        task_confirm_apply(task_id=world.planned.pk, actor=ALICE)
        release_it = partial(
            slot_release,
            slot_id=world.reserved.pk,
            actor=ALICE,
            reason="race",
            expected_version=world.reserved.version,
        )
        dispatch_it = partial(task_dispatch, task_id=world.planned.pk)

        released, dispatched = _race(release_it, dispatch_it)

        assert not isinstance(dispatched, BaseException), dispatched
        task = refresh(world.planned)
        held = list(Slot.objects.filter(task=task))
        if isinstance(released, BaseException):
            # The apply resumed its reservation first: the release saw a changed slot.
            assert isinstance(released, Conflict), released
            assert task.status == TaskStatus.RUNNING
            assert [s.pk for s in held] == [world.reserved.pk]
        else:
            # The release won: the apply either waits or runs on a fresh slot, never both.
            assert Event.objects.filter(kind="slot.released", task_id=task.pk).count() == 1
            if task.status == TaskStatus.RUNNING:
                assert len(held) == 1 and held[0].state == SlotState.RUNNING
            else:
                assert task.status == TaskStatus.APPLY_PENDING and held == []
