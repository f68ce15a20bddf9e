"""Admin actions without JavaScript: confirm page (GET), act and redirect (POST), refusals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod, PoolStatus, Slot, SlotState
from poolsadmin.tasks.models import TaskStatus, Workspace, WorkspaceTask
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, pod_of, submit

pytestmark = pytest.mark.django_db


@dataclass
class Scene:
    pool: AgentPool
    pod: Pod
    task: WorkspaceTask  # plan_and_apply, apply_pending, holding a reserved slot
    slot: Slot
    workspace: Workspace


@pytest.fixture
def scene() -> Scene:
    pool = make_pool()
    pod = pod_of(make_agent(pool, "pod-0"))
    workspace = make_workspace(pool)
    task = plan_with_changes(submit(workspace, "plan_and_apply"))
    slot = Slot.objects.get(task_id=task.pk)
    assert slot.state == SlotState.RESERVED
    Workspace.objects.filter(pk=workspace.pk).update(
        is_locked=True, lock_reason="partial apply", lock_task=task
    )
    return Scene(pool=pool, pod=pod, task=task, slot=slot, workspace=workspace)


@dataclass(frozen=True)
class Action:
    name: str
    url: Callable[[Scene], str]
    reason_required: bool
    impact: str  # part of the confirm page's impact text
    done: Callable[[Scene], bool]  # did the effect happen?


ACTIONS = [
    Action(
        "release",
        lambda s: reverse("pools-slot-release", args=[s.slot.pk]),
        True,
        "frees the reservation of task #",
        lambda s: Slot.objects.get(pk=s.slot.pk).state == SlotState.IDLE,
    ),
    Action(
        "drain",
        lambda s: reverse("pools-pod-drain", args=[s.pod.pk]),
        True,
        "takes no new work",
        lambda s: Pod.objects.get(pk=s.pod.pk).cordoned,
    ),
    Action(
        "pause",
        lambda s: reverse("pools-pause", args=[s.pool.pk]),
        True,
        "dispatches no new work",
        lambda s: AgentPool.objects.get(pk=s.pool.pk).status == PoolStatus.PAUSED,
    ),
    Action(
        "unfreeze",
        lambda s: reverse("pools-unfreeze", args=[s.pool.pk]),
        True,
        "ignores its freeze windows",
        lambda s: AgentPool.objects.get(pk=s.pool.pk).unfrozen_until is not None,
    ),
    Action(
        "cancel",
        lambda s: reverse("tasks-cancel", args=[s.task.pk]),
        True,
        "cancels task #",
        lambda s: WorkspaceTask.objects.get(pk=s.task.pk).status == TaskStatus.CANCELLED,
    ),
    Action(
        "confirm-apply",
        lambda s: reverse("tasks-confirm-apply", args=[s.task.pk]),
        False,
        "runs the apply of task #",
        lambda s: bool(WorkspaceTask.objects.get(pk=s.task.pk).apply_confirmed_by),
    ),
    Action(
        "unlock",
        lambda s: reverse("workspaces-unlock", args=[s.workspace.pk]),
        True,
        "unlocks workspace",
        lambda s: not Workspace.objects.get(pk=s.workspace.pk).is_locked,
    ),
]
IDS = [a.name for a in ACTIONS]


def _post_data(action: Action, scene: Scene, reason: str = "incident 42") -> dict[str, str]:
    data = {"reason": reason}
    if action.name == "release":
        data["expected_version"] = str(Slot.objects.get(pk=scene.slot.pk).version)
    return data


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_the_confirm_page_shows_the_impact(
    admin_client: Client, scene: Scene, action: Action
) -> None:
    response = admin_client.get(action.url(scene))
    assert response.status_code == 200
    html = response.content.decode()
    assert action.impact in html
    assert "csrfmiddlewaretoken" in html


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_an_admin_post_acts_and_redirects_with_a_message(
    admin_client: Client, scene: Scene, action: Action
) -> None:
    before = Event.objects.count()
    response = admin_client.post(action.url(scene), _post_data(action, scene))
    assert response.status_code == 302
    assert action.done(scene)
    assert Event.objects.count() > before
    assert len(list(get_messages(response.wsgi_request))) == 1
    page = admin_client.get(response["Location"])
    assert page.status_code == 200
    assert 'class="message message-success' in page.content.decode()


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_viewer_post_is_forbidden_and_writes_nothing(
    viewer_client: Client, scene: Scene, action: Action
) -> None:
    before = Event.objects.count()
    response = viewer_client.post(action.url(scene), _post_data(action, scene))
    assert response.status_code == 403
    assert not action.done(scene)
    assert Event.objects.count() == before


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_viewer_sees_the_confirm_button_disabled(
    viewer_client: Client, scene: Scene, action: Action
) -> None:
    html = viewer_client.get(action.url(scene)).content.decode()
    assert "disabled" in html
    assert "needs " in html


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_an_anonymous_visitor_is_sent_to_the_login(
    client: Client, scene: Scene, action: Action
) -> None:
    for response in (client.get(action.url(scene)), client.post(action.url(scene), {})):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
    assert not action.done(scene)


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_other_methods_are_405(admin_client: Client, scene: Scene, action: Action) -> None:
    assert admin_client.put(action.url(scene)).status_code == 405
    assert admin_client.delete(action.url(scene)).status_code == 405


@pytest.mark.parametrize("action", [a for a in ACTIONS if a.reason_required], ids=str)
def test_a_destructive_action_without_a_reason_shows_the_form_again(
    admin_client: Client, scene: Scene, action: Action
) -> None:
    before = Event.objects.count()
    response = admin_client.post(action.url(scene), _post_data(action, scene, reason="  "))
    assert response.status_code == 400
    html = response.content.decode()
    assert "A reason is required" in html
    assert 'name="reason"' in html
    assert not action.done(scene)
    assert Event.objects.count() == before


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_post_without_a_csrf_token_is_refused(admin: User, scene: Scene, action: Action) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    response = client.post(action.url(scene), _post_data(action, scene))
    assert response.status_code == 403
    assert not action.done(scene)


# --- release: version check and undo ------------------------------------------------------------


def test_a_stale_slot_version_is_refused_with_the_fresh_state(
    admin_client: Client, scene: Scene
) -> None:
    stale = scene.slot.version
    Slot.objects.filter(pk=scene.slot.pk).update(version=stale + 1)
    before = Event.objects.count()
    response = admin_client.post(
        reverse("pools-slot-release", args=[scene.slot.pk]),
        {"reason": "incident", "expected_version": str(stale)},
    )
    assert response.status_code == 409
    html = response.content.decode()
    assert "This slot changed" in html
    assert f'name="expected_version" value="{stale + 1}"' in html
    assert Slot.objects.get(pk=scene.slot.pk).state == SlotState.RESERVED
    assert Event.objects.count() == before


def _release(client: Client, scene: Scene) -> int:
    response = client.post(
        reverse("pools-slot-release", args=[scene.slot.pk]),
        {"reason": "incident", "expected_version": str(scene.slot.version)},
        follow=True,
    )
    html = response.content.decode()
    event = Event.objects.get(kind="slot.released")
    assert reverse("events-undo-release", args=[event.pk]) in html
    assert "Undo" in html
    return event.pk


def test_an_undo_within_60_seconds_restores_the_reservation(
    admin_client: Client, scene: Scene
) -> None:
    event_id = _release(admin_client, scene)
    assert Slot.objects.get(pk=scene.slot.pk).state == SlotState.IDLE
    clock.advance(30)
    response = admin_client.post(reverse("events-undo-release", args=[event_id]))
    assert response.status_code == 302
    slot = Slot.objects.get(pk=scene.slot.pk)
    assert (slot.state, slot.task_id) == (SlotState.RESERVED, scene.task.pk)


def test_the_undo_has_a_confirm_page_and_is_forbidden_to_a_viewer(
    admin_client: Client, viewer_client: Client, scene: Scene
) -> None:
    event_id = _release(admin_client, scene)
    url = reverse("events-undo-release", args=[event_id])
    assert "puts the reservation of task #" in admin_client.get(url).content.decode()
    assert viewer_client.post(url).status_code == 403
    assert Slot.objects.get(pk=scene.slot.pk).state == SlotState.IDLE


def test_an_undo_after_60_seconds_is_refused(admin_client: Client, scene: Scene) -> None:
    event_id = _release(admin_client, scene)
    clock.advance(61)
    response = admin_client.post(reverse("events-undo-release", args=[event_id]))
    assert response.status_code == 409
    assert Slot.objects.get(pk=scene.slot.pk).state == SlotState.IDLE


# --- the other actions' details -------------------------------------------------------------------


def test_undrain_and_resume_take_back_drain_and_pause(admin_client: Client, scene: Scene) -> None:
    admin_client.post(reverse("pools-pod-drain", args=[scene.pod.pk]), {"reason": "r"})
    admin_client.post(reverse("pools-pause", args=[scene.pool.pk]), {"reason": "r"})
    assert admin_client.get(reverse("pools-pod-undrain", args=[scene.pod.pk])).status_code == 200
    assert admin_client.post(reverse("pools-pod-undrain", args=[scene.pod.pk])).status_code == 302
    assert admin_client.post(reverse("pools-resume", args=[scene.pool.pk])).status_code == 302
    assert not Pod.objects.get(pk=scene.pod.pk).cordoned
    assert AgentPool.objects.get(pk=scene.pool.pk).status == PoolStatus.ACTIVE


def test_cancelling_an_applying_task_needs_force(admin_client: Client, scene: Scene) -> None:
    now = clock.now()
    WorkspaceTask.objects.filter(pk=scene.task.pk).update(
        status=TaskStatus.RUNNING, apply_started_at=now, acked_at=now
    )
    url = reverse("tasks-cancel", args=[scene.task.pk])
    response = admin_client.post(url, {"reason": "stuck"})
    assert response.status_code == 409
    assert "Repeat with force" in response.content.decode()
    assert WorkspaceTask.objects.get(pk=scene.task.pk).status == TaskStatus.RUNNING
    response = admin_client.post(url, {"reason": "stuck", "force": "on"})
    assert response.status_code == 302
    assert WorkspaceTask.objects.get(pk=scene.task.pk).status == TaskStatus.CANCELLED


# --- buttons on the pool and task pages -----------------------------------------------------------


def test_the_pool_page_links_each_action_for_an_admin(admin_client: Client, scene: Scene) -> None:
    html = admin_client.get(reverse("pools-detail", args=[scene.pool.pk])).content.decode()
    for url in (
        reverse("pools-slot-release", args=[scene.slot.pk]),
        reverse("pools-pod-drain", args=[scene.pod.pk]),
        reverse("pools-pause", args=[scene.pool.pk]),
        reverse("pools-unfreeze", args=[scene.pool.pk]),
    ):
        assert f'href="{url}"' in html
    assert "needs pools." not in html


def test_the_viewer_sees_disabled_buttons_naming_the_permission(
    viewer_client: Client, scene: Scene
) -> None:
    html = viewer_client.get(reverse("pools-detail", args=[scene.pool.pk])).content.decode()
    assert 'disabled title="needs pools.release_slot"' in html
    assert 'disabled title="needs pools.manage_pool"' in html
    assert reverse("pools-slot-release", args=[scene.slot.pk]) not in html
    html = viewer_client.get(reverse("tasks-detail", args=[scene.task.pk])).content.decode()
    for perm in ("tasks.confirm_apply", "tasks.cancel_task", "tasks.unlock_workspace"):
        assert f"needs {perm}" in html


def test_the_task_page_links_confirm_cancel_and_unlock_for_an_admin(
    admin_client: Client, scene: Scene
) -> None:
    html = admin_client.get(reverse("tasks-detail", args=[scene.task.pk])).content.decode()
    assert reverse("tasks-confirm-apply", args=[scene.task.pk]) in html
    assert reverse("tasks-cancel", args=[scene.task.pk]) in html
    assert reverse("workspaces-unlock", args=[scene.workspace.pk]) in html


# --- the same actions in the htmx dialog ---------------------------------------------------------

HTMX = {"HX-Request": "true"}


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_htmx_gets_only_the_confirm_form_for_the_dialog(
    admin_client: Client, scene: Scene, action: Action
) -> None:
    response = admin_client.get(action.url(scene), headers=HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert 'id="dialog-title"' in html
    assert action.impact in html
    assert f'hx-post="{action.url(scene)}"' in html
    assert 'hx-target="#action-dialog-body"' in html
    assert "data-dialog-close" in html


@pytest.mark.parametrize("action", ACTIONS, ids=IDS)
def test_a_done_action_in_the_dialog_answers_the_messages_and_closes_it(
    admin_client: Client, scene: Scene, action: Action
) -> None:
    response = admin_client.post(action.url(scene), _post_data(action, scene), headers=HTMX)
    assert response.status_code == 200
    assert action.done(scene)
    assert response["HX-Retarget"] == "#messages"
    assert response["HX-Reswap"] == "outerHTML"
    assert response["HX-Trigger"] == "poolsadmin:action-done"
    html = response.content.decode()
    assert 'id="messages"' in html
    assert "message-success" in html


@pytest.mark.parametrize("action", [a for a in ACTIONS if a.reason_required], ids=str)
def test_a_missing_reason_in_the_dialog_answers_the_form_with_the_error(
    admin_client: Client, scene: Scene, action: Action
) -> None:
    response = admin_client.post(
        action.url(scene), _post_data(action, scene, reason=""), headers=HTMX
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "<html" not in html
    assert "A reason is required" in html
    assert 'aria-invalid="true"' in html
    assert "HX-Trigger" not in response
    assert not action.done(scene)


def test_a_stale_version_in_the_dialog_says_the_slot_changed(
    admin_client: Client, scene: Scene
) -> None:
    stale = scene.slot.version
    Slot.objects.filter(pk=scene.slot.pk).update(version=stale + 1)
    response = admin_client.post(
        reverse("pools-slot-release", args=[scene.slot.pk]),
        {"reason": "incident", "expected_version": str(stale)},
        headers=HTMX,
    )
    assert response.status_code == 409
    html = response.content.decode()
    assert "<html" not in html
    assert "This slot changed" in html
    assert f'name="expected_version" value="{stale + 1}"' in html
    assert Slot.objects.get(pk=scene.slot.pk).state == SlotState.RESERVED


def test_a_viewer_post_in_the_dialog_is_forbidden(viewer_client: Client, scene: Scene) -> None:
    response = viewer_client.post(
        reverse("pools-slot-release", args=[scene.slot.pk]),
        {"reason": "incident", "expected_version": str(scene.slot.version)},
        headers=HTMX,
    )
    assert response.status_code == 403
    assert Slot.objects.get(pk=scene.slot.pk).state == SlotState.RESERVED


def test_the_undo_from_the_message_works_in_htmx_too(admin_client: Client, scene: Scene) -> None:
    response = admin_client.post(
        reverse("pools-slot-release", args=[scene.slot.pk]),
        {"reason": "incident", "expected_version": str(scene.slot.version)},
        headers=HTMX,
    )
    event = Event.objects.get(kind="slot.released")
    undo_url = reverse("events-undo-release", args=[event.pk])
    assert f'hx-post="{undo_url}"' in response.content.decode()

    response = admin_client.post(undo_url, {}, headers=HTMX)
    assert response.status_code == 200
    assert response["HX-Trigger"] == "poolsadmin:action-done"
    slot = Slot.objects.get(pk=scene.slot.pk)
    assert slot.state == SlotState.RESERVED
    assert slot.task_id == scene.task.pk
