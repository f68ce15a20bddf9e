"""Admin actions (SPEC 8 "Actions"), after Django admin's delete_selected.

GET shows a confirm page with the impact of the action; POST (CSRF-protected, permission
checked) calls the service, adds a success message and redirects back to the page the action
came from (POST-redirect-GET). A refused POST shows the confirm page again with the error.
A viewer may open a confirm page, where the button is disabled and names the permission.

With htmx the same views fill the action dialog: GET and a refused POST answer the
`confirm-form` partial only, and a done POST answers the messages region (retargeted to
`#messages`) with the `poolsadmin:action-done` trigger, which closes the dialog and refreshes
the page's live regions. Without JavaScript every action still works as a page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods

from poolsadmin.api.roles import (
    PERM_CANCEL_TASK,
    PERM_CONFIRM_APPLY,
    PERM_MANAGE_POOL,
    PERM_RELEASE_SLOT,
    PERM_UNLOCK_WORKSPACE,
    PERM_VIEW,
)
from poolsadmin.api.services import request_actor
from poolsadmin.events.models import Event
from poolsadmin.lib.errors import DomainError, InvalidInput
from poolsadmin.lib.htmx import is_htmx
from poolsadmin.pools.actions import (
    RELEASE_UNDO_SECONDS,
    RELEASED,
    SlotChanged,
    pod_drain,
    pod_undrain,
    slot_release,
    slot_release_impact,
    slot_release_undo,
)
from poolsadmin.pools.models import AgentPool, Pod, PoolStatus, Slot
from poolsadmin.pools.services import pool_pause, pool_resume, pool_unfreeze_once, slot_label
from poolsadmin.tasks.models import Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_cancel, task_confirm_apply, workspace_unlock

TEMPLATE = "dashboard/actions/confirm.html"
FIELDS_TEMPLATE = "dashboard/actions/_number_fields.html"
MESSAGES_TEMPLATE = "dashboard/actions/_messages.html"
ACTION_DONE = "poolsadmin:action-done"
REASON_REQUIRED = "A reason is required for this action."
# What a `refused` action is refused for: only k8s pools can be scaled or held (as pool_scale
# and pool_hold say).
REFUSED_FIELD = "pool_type"


def _render_form(
    request: HttpRequest,
    *,
    status: int,
    title: str,
    impact: str,
    button: str,
    back: str,
    perm: str,
    reason: str,
    error: str,
    reason_required: bool = True,
    reason_label: str = "Reason",
    **extra: Any,
) -> HttpResponse:
    """The confirm page, or only its form for the dialog when htmx asks. `extra`: what a
    particular form adds (hidden fields, a force box, number fields, the fresh slot)."""
    in_dialog = is_htmx(request)
    context = {
        "title": title,
        "impact": impact,
        "button": button,
        "back": back,
        "perm": perm,
        "allowed": request.user.has_perm(perm),
        "reason_required": reason_required,
        "reason_label": reason_label,
        "reason": reason,
        "error": error,
        "in_dialog": in_dialog,
        "action_url": request.get_full_path(),
        **extra,
    }
    name = f"{TEMPLATE}#confirm-form" if in_dialog else TEMPLATE
    return render(request, name, context, status=status)


def _done(request: HttpRequest, back: str) -> HttpResponse:
    """After a done action: back to the page (POST-redirect-GET), or, in the dialog, the
    messages region for the page the dialog sits on."""
    if not is_htmx(request):
        return redirect(back)
    response = render(request, MESSAGES_TEMPLATE)
    response["HX-Retarget"] = "#messages"
    response["HX-Reswap"] = "outerHTML"
    response["HX-Trigger"] = ACTION_DONE
    return response


def _back(request: HttpRequest, default: str) -> str:
    """Where to go after the action: a safe `next` from the form or the query, else `default`."""
    candidate = request.POST.get("next") or request.GET.get("next") or ""
    if candidate and url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return default


@dataclass(frozen=True)
class NumberField:
    """One whole-number input of a confirm form (`_number_fields.html`)."""

    name: str
    label: str
    value: str  # as sent, so a refused form shows what was typed
    low: int
    high: int
    help: str = ""

    def parse(self) -> int:
        try:
            number = int(self.value)
        except ValueError:
            raise InvalidInput(f"{self.label} must be a whole number", field=self.name) from None
        if not self.low <= number <= self.high:
            raise InvalidInput(
                f"{self.label} must be between {self.low} and {self.high}", field=self.name
            )
        return number


def _confirm(
    request: HttpRequest,
    *,
    perm: str,
    title: str,
    impact: str,
    button: str,
    back: str,
    reason_required: bool,
    perform: Callable[..., str],
    hidden: dict[str, Any] | None = None,
    force_field: bool = False,
    reason_label: str = "Reason",
    fields: Sequence[NumberField] = (),
    refused: str = "",
) -> HttpResponse:
    """The shared confirm-then-act flow: GET renders, POST acts or renders the error.

    `perform(reason, **numbers)` calls the service and returns the success message; `fields`
    are number inputs, parsed (and refused with 400, naming the field) before it runs.
    `refused`: why this action cannot apply here at all (400 on GET and POST), which is the
    pool's type (scale and hold on a static pool)."""
    error, error_field, status, reason = "", "", 200, ""
    if request.method == "POST":
        if not request.user.has_perm(perm):
            raise PermissionDenied(f"needs {perm}")
        reason = request.POST.get("reason", "").strip()
        fields = [replace(f, value=request.POST.get(f.name, "").strip()) for f in fields]
        try:
            if refused:
                raise InvalidInput(refused, field=REFUSED_FIELD)
            numbers = {f.name: f.parse() for f in fields}
            if reason_required and not reason:
                raise InvalidInput(REASON_REQUIRED, field="reason")
            text = perform(reason, **numbers)
        except DomainError as exc:
            error, error_field, status = exc.message, exc.field or "", exc.http_status
        else:
            messages.success(request, text)
            return _done(request, back)
    elif refused:
        error, error_field, status = refused, REFUSED_FIELD, 400
    return _render_form(
        request,
        status=status,
        title=title,
        impact=impact,
        button=button,
        back=back,
        perm=perm,
        reason=reason,
        error=error,
        reason_required=reason_required,
        reason_label=reason_label,
        hidden=hidden or {},
        force_field=force_field,
        force=request.POST.get("force") == "on",
        fields_template=FIELDS_TEMPLATE if fields and not refused else "",
        fields=[] if refused else fields,
        error_field=error_field,
    )


def _get(model: type[Any], pk: Any, what: str, **related: Any) -> Any:
    query = model.objects.all()
    if related.get("select"):
        query = query.select_related(*related["select"])
    obj = query.filter(pk=pk).first()
    if obj is None:
        raise Http404(f"{what} {pk} does not exist")
    return obj


def _pool_url(pool_id: str) -> str:
    return reverse("pools-detail", args=[pool_id])


def _task_url(task_id: int) -> str:
    return reverse("tasks-detail", args=[task_id])


# --- slots ---------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def slot_release_view(request: HttpRequest, slot_id: int) -> HttpResponse:
    slot: Slot = _get(Slot, slot_id, "slot", select=("pod",))
    back = _back(request, _pool_url(slot.pod.pool_id))
    label = slot_label(slot)
    error, error_field = "", ""
    status = 200
    changed = False
    reason = ""
    perm = PERM_RELEASE_SLOT
    if request.method == "POST":
        if not request.user.has_perm(perm):
            raise PermissionDenied(f"needs {perm}")
        reason = request.POST.get("reason", "").strip()
        try:
            expected = int(request.POST.get("expected_version", ""))
        except ValueError:
            expected = -1
        if not reason:
            error, error_field, status = REASON_REQUIRED, "reason", 400
        else:
            try:
                result = slot_release(
                    slot_id=slot.pk,
                    actor=request_actor(request),
                    reason=reason,
                    expected_version=expected,
                )
            except SlotChanged as exc:
                error, status, changed = exc.message, 409, True
            except DomainError as exc:
                error, error_field, status = exc.message, exc.field or "", exc.http_status
            else:
                _release_message(request, result.event.pk, label, result.task_failed, result.task)
                return _done(request, back)
    impact = slot_release_impact(slot_id=slot.pk)
    return _render_form(
        request,
        status=status,
        title=f"Release slot {label}",
        impact=impact.text,
        button="Release slot",
        back=back,
        perm=perm,
        reason=reason,
        error=error,
        changed=changed,
        current=impact,
        hidden={"expected_version": impact.version},
        error_field=error_field,
    )


def _release_message(
    request: HttpRequest, event_id: int, label: str, failed: bool, task: WorkspaceTask
) -> None:
    if failed:
        messages.success(request, f"Released slot {label}; task #{task.pk} failed.")
        return
    undo_url = reverse("events-undo-release", args=[event_id])
    message = format_html(
        'Released slot {} (reservation of task #{}). <form method="post" action="{}" '
        'hx-post="{}" hx-target="#action-dialog-body" class="inline-form">'
        '<input type="hidden" name="csrfmiddlewaretoken" value="{}">'
        '<button type="submit" class="button button-small">Undo</button></form> '
        '<span class="muted">within {} s</span>',
        label,
        task.pk,
        undo_url,
        undo_url,
        get_token(request),
        RELEASE_UNDO_SECONDS,
    )
    messages.success(request, message, extra_tags="undo")


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def slot_release_undo_view(request: HttpRequest, event_id: int) -> HttpResponse:
    event: Event = _get(Event, event_id, "event")
    if event.kind != RELEASED:
        raise Http404(f"event {event_id} is not a slot release")
    back = _back(request, _pool_url(event.pool_id) if event.pool_id else reverse("pools-list"))

    def perform(reason: str) -> str:
        result = slot_release_undo(event_id=event.pk, actor=request_actor(request))
        return f"Put back the reservation of task #{result.task.pk} on {slot_label(result.slot)}."

    return _confirm(
        request,
        perm=PERM_RELEASE_SLOT,
        title=f"Undo release of slot {event.target_id}",
        impact=(
            f"puts the reservation of task #{event.task_id} back on slot {event.target_id}, "
            f"if the slot is still free and less than {RELEASE_UNDO_SECONDS} s have passed"
        ),
        button="Undo release",
        back=back,
        reason_required=False,
        perform=perform,
    )


# --- pods ----------------------------------------------------------------------------------------


def _pod_view(request: HttpRequest, pod_id: int, *, drain: bool) -> HttpResponse:
    pod: Pod = _get(Pod, pod_id, "pod")
    busy = pod.slots.exclude(task__isnull=True).count()
    if drain:
        impact = (
            f"pod {pod.name} takes no new work; its {busy} running or reserved slot(s) finish "
            "where they are, and a reserved apply may still resume there"
        )
    else:
        impact = f"pod {pod.name} takes new work again"

    def perform(reason: str) -> str:
        if drain:
            pod_drain(pod_id=pod.pk, actor=request_actor(request), reason=reason)
            return f"Pod {pod.name} is draining."
        pod_undrain(pod_id=pod.pk, actor=request_actor(request), reason=reason or "undrained")
        return f"Pod {pod.name} takes work again."

    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        title=f"{'Drain' if drain else 'Undrain'} pod {pod.name}",
        impact=impact,
        button="Drain pod" if drain else "Undrain pod",
        back=_back(request, _pool_url(pod.pool_id)),
        reason_required=drain,
        perform=perform,
    )


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pod_drain_view(request: HttpRequest, pod_id: int) -> HttpResponse:
    return _pod_view(request, pod_id, drain=True)


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pod_undrain_view(request: HttpRequest, pod_id: int) -> HttpResponse:
    return _pod_view(request, pod_id, drain=False)


# --- pools ---------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pool_pause_view(request: HttpRequest, pool_id: str) -> HttpResponse:
    pool: AgentPool = _get(AgentPool, pool_id, "pool")

    def perform(reason: str) -> str:
        pool_pause(pool_id=pool.pk, actor=request_actor(request), reason=reason)
        return f"Pool {pool.name} is paused."

    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        title=f"Pause pool {pool.name}",
        impact=f"pool {pool.name} dispatches no new work until resumed; running work continues",
        button="Pause pool",
        back=_back(request, _pool_url(pool.pk)),
        reason_required=True,
        perform=perform,
    )


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pool_resume_view(request: HttpRequest, pool_id: str) -> HttpResponse:
    pool: AgentPool = _get(AgentPool, pool_id, "pool")
    if pool.status == PoolStatus.PAUSED:
        impact = f"pool {pool.name} dispatches work again (paused by {pool.paused_by})"
    else:
        impact = f"pool {pool.name} is not paused; there is nothing to resume"

    def perform(reason: str) -> str:
        pool_resume(pool_id=pool.pk, actor=request_actor(request), reason=reason)
        return f"Pool {pool.name} is dispatching again."

    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        title=f"Resume pool {pool.name}",
        impact=impact,
        button="Resume pool",
        back=_back(request, _pool_url(pool.pk)),
        reason_required=False,
        perform=perform,
    )


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pool_unfreeze_view(request: HttpRequest, pool_id: str) -> HttpResponse:
    pool: AgentPool = _get(AgentPool, pool_id, "pool")

    def perform(reason: str) -> str:
        done = pool_unfreeze_once(pool_id=pool.pk, actor=request_actor(request), reason=reason)
        return f"Pool {pool.name} is unfrozen until {done.unfrozen_until:%Y-%m-%d %H:%M} UTC."

    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        title=f"Unfreeze pool {pool.name} once",
        impact=(
            f"pool {pool.name} ignores its freeze windows until the end of its local day; "
            "the autoscaler may scale it meanwhile"
        ),
        button="Unfreeze once",
        back=_back(request, _pool_url(pool.pk)),
        reason_required=True,
        perform=perform,
    )


# --- tasks and workspaces -------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def task_cancel_view(request: HttpRequest, task_id: int) -> HttpResponse:
    task: WorkspaceTask = _get(WorkspaceTask, task_id, "task")
    impact = f"cancels task #{task.pk} ({task.task_type}, {task.status})"
    if task.apply_started:
        impact += (
            "; it is applying: cancelling may leave partial state, needs force, and keeps "
            "the workspace locked"
        )

    def perform(reason: str) -> str:
        force = request.POST.get("force") == "on"
        task_cancel(task_id=task.pk, actor=request_actor(request), reason=reason, force=force)
        return f"Task #{task.pk} is cancelled."

    return _confirm(
        request,
        perm=PERM_CANCEL_TASK,
        title=f"Cancel task #{task.pk}",
        impact=impact,
        button="Cancel task",
        back=_back(request, _task_url(task.pk)),
        reason_required=True,
        perform=perform,
        force_field=True,
    )


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def task_confirm_apply_view(request: HttpRequest, task_id: int) -> HttpResponse:
    task: WorkspaceTask = _get(WorkspaceTask, task_id, "task")

    def perform(reason: str) -> str:
        task_confirm_apply(task_id=task.pk, actor=request_actor(request), description=reason)
        return f"Apply of task #{task.pk} confirmed; it runs when a slot is free."

    return _confirm(
        request,
        perm=PERM_CONFIRM_APPLY,
        title=f"Confirm apply of task #{task.pk}",
        impact=(
            f"runs the apply of task #{task.pk} ({task.task_type}, {task.status}) "
            f"in workspace {task.workspace_id}: it changes real infrastructure"
        ),
        button="Confirm apply",
        back=_back(request, _task_url(task.pk)),
        reason_required=False,
        perform=perform,
        reason_label="Note (optional)",
    )


def _workspace_url(workspace: Workspace) -> str:
    """The page of the task that locked it (it shows messages), else the workspace page."""
    if workspace.lock_task_id:
        return _task_url(workspace.lock_task_id)
    try:
        return reverse("workspaces-detail", args=[workspace.pk])
    except NoReverseMatch:
        return reverse("pools-list")


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def workspace_unlock_view(request: HttpRequest, workspace_id: str) -> HttpResponse:
    workspace: Workspace = _get(Workspace, workspace_id, "workspace")
    if workspace.is_locked:
        impact = (
            f"unlocks workspace {workspace.pk} (locked: {workspace.lock_reason}); new applies "
            "may run on it, so check the state the last apply left first"
        )
    else:
        impact = f"workspace {workspace.pk} is not locked; there is nothing to unlock"

    def perform(reason: str) -> str:
        workspace_unlock(workspace_id=workspace.pk, actor=request_actor(request), reason=reason)
        return f"Workspace {workspace.pk} is unlocked."

    return _confirm(
        request,
        perm=PERM_UNLOCK_WORKSPACE,
        title=f"Unlock workspace {workspace.pk}",
        impact=impact,
        button="Unlock workspace",
        back=_back(request, _workspace_url(workspace)),
        reason_required=True,
        perform=perform,
    )
