"""The admin JSON API (SPEC 8 "JSON API"): pools, a pool's slot grid, workspaces, tasks with
their diagnosis and timeline, task submission, confirm, cancel and unlock, and the admin
actions of the dashboard (release, drain, pause, reconcile now, scale, hold, ...).

Each view: `api_user` (who, which permission), `json_errors` (domain errors -> 400/403/404/
409 JSON), one selector or service call, a serializer. Methods are routed in admin_urls.py
(other methods get a JSON 405).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import models
from django.http import HttpRequest, JsonResponse
from django.utils.dateparse import parse_datetime

from poolsadmin.api import roles
from poolsadmin.api.http import field_bool, field_int, field_str, json_body, json_errors
from poolsadmin.api.serializers import (
    POOL_DETAIL_FIELDS,
    iso,
    lease_json,
    pool_detail_json,
    pool_json,
    pool_summary_json,
    pool_token_json,
    task_detail_json,
    task_json,
    workspace_detail_json,
    workspace_json,
)
from poolsadmin.api.services import request_actor
from poolsadmin.api.user_auth import api_user, permission_denied
from poolsadmin.autoscaler.models import PoolHold, ScaleDecision
from poolsadmin.autoscaler.services import HOLD_MAX, pool_hold, pool_scale
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput, NotFound
from poolsadmin.pools.actions import (
    pod_drain,
    pod_undrain,
    slot_release,
    slot_release_impact,
    slot_release_undo,
)
from poolsadmin.pools.grid import pool_get, pool_pod_count, pool_slot_grid, pools_overview
from poolsadmin.pools.models import AgentPool, Pod, PoolToken, PoolType, Slot
from poolsadmin.pools.services import (
    pool_create,
    pool_pause,
    pool_resume,
    pool_token_create,
    pool_unfreeze_once,
)
from poolsadmin.tasks.detail import task_detail, workspace_detail, workspace_get
from poolsadmin.tasks.models import Workspace
from poolsadmin.tasks.services import (
    task_cancel,
    task_confirm_apply,
    task_submit,
    workspace_create,
    workspace_unlock,
)
from poolsadmin.worker.cluster import Change
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_current
from poolsadmin.worker.reconcile import pool_reconcile_now, pool_reconcile_preview

POOL_STR_FIELDS = ("name", "pool_id", "pool_type", "description", "pod_image", "namespace")
POOL_INT_FIELDS = ("slots_per_pod", "plan_and_apply_per_pod", "min_replicas", "max_replicas")


def _body(request: HttpRequest, *allowed: str) -> dict[str, Any]:
    """The JSON body; an unknown field is refused by name, so a typo (`forced`) is not
    silently ignored."""
    data = json_body(request)
    for name in data:
        if name not in allowed:
            raise InvalidInput(f"unknown field {name}; expected {', '.join(allowed)}", field=name)
    return data


def _fits(model: type[models.Model], data: dict[str, Any], *names: str) -> None:
    """Strings no longer than their column: PostgreSQL would refuse them with a 500."""
    for name in names:
        value = data.get(name)
        limit = getattr(model._meta.get_field(name), "max_length", None)
        if isinstance(value, str) and limit is not None and len(value) > limit:
            raise InvalidInput(f"{name} is longer than {limit} characters", field=name)


def _secret(response: JsonResponse) -> JsonResponse:
    # A response carrying a secret shown once must not be kept by any cache.
    response["Cache-Control"] = "no-store"
    return response


# --- pools -------------------------------------------------------------------------------------


@api_user(roles.PERM_VIEW)
@json_errors
def pools_list(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"pools": [pool_summary_json(summary) for summary in pools_overview()]})


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_create(request: HttpRequest) -> JsonResponse:
    data = _body(request, *POOL_STR_FIELDS, *POOL_INT_FIELDS)
    fields: dict[str, Any] = {"name": field_str(data, "name")}
    for name in POOL_STR_FIELDS[1:]:
        if name in data:
            fields[name] = field_str(data, name)
    for name in POOL_INT_FIELDS:
        if name in data:
            fields[name] = field_int(data, name)
            if fields[name] < 0:
                raise InvalidInput(f"{name} must not be negative", field=name)
    _fits(AgentPool, fields, *POOL_STR_FIELDS)
    pool = pool_create(actor=request_actor(request), **fields)
    return JsonResponse(pool_json(pool), status=201)


# A page of the JSON pool detail: at most this many pods (`pods_limit`).
PODS_LIMIT_MAX = 1000


def _query_int(request: HttpRequest, name: str, *, low: int, high: int) -> int | None:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise InvalidInput(f"{name} must be a whole number from {low} to {high}", field=name)
    return int(raw)


def _detail_fields(request: HttpRequest) -> set[str] | None:
    """`?fields=name,pods`: the top-level keys wanted (None: all of them)."""
    raw = request.GET.get("fields")
    if raw is None:
        return None
    wanted = {name.strip() for name in raw.split(",") if name.strip()}
    unknown = sorted(wanted - set(POOL_DETAIL_FIELDS))
    if not wanted or unknown:
        raise InvalidInput(
            f"fields must name some of {', '.join(POOL_DETAIL_FIELDS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
            field="fields",
        )
    return wanted


@api_user(roles.PERM_VIEW)
@json_errors
def pools_detail(request: HttpRequest, pool_id: str) -> JsonResponse:
    """The pool with its pods and slots. Without parameters every pod (the shape since the
    start); a big pool is read a page at a time (`pods_limit`, `pods_page`) or without its
    pods (`fields`), and each answer says how many pods there are (`pods_total`)."""
    fields = _detail_fields(request)
    limit = _query_int(request, "pods_limit", low=1, high=PODS_LIMIT_MAX)
    page = _query_int(request, "pods_page", low=1, high=2**31 - 1) or 1
    if limit is None and page > 1:
        raise InvalidInput("pods_page needs pods_limit", field="pods_page")
    pool = pool_get(pool_id=pool_id)

    def wants(name: str) -> bool:
        return fields is None or name in fields

    # Only k8s pools have an autoscaler: a static pool's page costs no extra query.
    decision = (
        ScaleDecision.objects.filter(pool=pool).order_by("-at", "-id").first()
        if pool.pool_type == PoolType.K8S and wants("autoscaler")
        else None
    )
    offset = (page - 1) * (limit or 0)
    grid = pool_slot_grid(pool=pool, offset=offset, limit=limit) if wants("pods") else []
    total = pool_pod_count(pool=pool) if limit is not None or not wants("pods") else len(grid)
    body = pool_detail_json(pool, grid, decision, pods_total=total)
    if limit is not None:
        body["pods_page"] = {
            "page": page,
            "limit": limit,
            "next_page": page + 1 if offset + limit < total else None,
        }
    if fields is not None:
        body = {key: value for key, value in body.items() if key in fields or key == "pods_page"}
    return JsonResponse(body)


@api_user(roles.PERM_VIEW)
@json_errors
def reconciler_detail(request: HttpRequest) -> JsonResponse:
    """Who holds the reconciler lease now (SPEC 5: "the dashboard shows who holds it")."""
    return JsonResponse(lease_json(lease_current(RECONCILER_LEASE)))


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_token_create(request: HttpRequest, pool_id: str) -> JsonResponse:
    pool = pool_get(pool_id=pool_id)
    data = _body(request, "name")
    _fits(PoolToken, data, "name")
    issued = pool_token_create(
        pool=pool, name=field_str(data, "name"), actor=request_actor(request)
    )
    return _secret(JsonResponse(pool_token_json(issued.token, issued.secret), status=201))


# --- workspaces --------------------------------------------------------------------------------


@api_user(roles.PERM_SUBMIT_TASK)
@json_errors
def workspaces_create(request: HttpRequest) -> JsonResponse:
    data = _body(request, "name", "pool_id", "workspace_id", "execution_mode")
    _fits(Workspace, data, "name")
    pool_id = field_str(data, "pool_id")
    try:
        pool = pool_get(pool_id=pool_id)
    except NotFound:
        # A reference in the body, not the resource of the URL: bad input, not a 404.
        raise InvalidInput(f"pool {pool_id} does not exist", field="pool_id") from None
    workspace = workspace_create(
        name=field_str(data, "name"),
        pool=pool,
        actor=request_actor(request),
        workspace_id=field_str(data, "workspace_id", required=False) or None,
        execution_mode=field_str(data, "execution_mode", required=False, default="agent"),
    )
    return JsonResponse(workspace_json(workspace), status=201)


@api_user(roles.PERM_VIEW)
@json_errors
def workspaces_detail(request: HttpRequest, workspace_id: str) -> JsonResponse:
    return JsonResponse(workspace_detail_json(workspace_detail(workspace_id=workspace_id)))


@api_user(roles.PERM_SUBMIT_TASK)
@json_errors
def workspaces_task_submit(request: HttpRequest, workspace_id: str) -> JsonResponse:
    workspace = workspace_get(workspace_id=workspace_id)
    data = _body(request, "task_type", "description")
    task = task_submit(
        workspace=workspace,
        task_type=field_str(data, "task_type"),
        actor=request_actor(request),
        description=field_str(data, "description", required=False),
    )
    return JsonResponse(task_json(task), status=201)


@api_user(roles.PERM_UNLOCK_WORKSPACE)
@json_errors
def workspaces_unlock(request: HttpRequest, workspace_id: str) -> JsonResponse:
    data = _body(request, "reason")
    workspace = workspace_unlock(
        workspace_id=workspace_id, actor=request_actor(request), reason=field_str(data, "reason")
    )
    return JsonResponse(workspace_json(workspace))


# --- tasks -------------------------------------------------------------------------------------


@api_user(roles.PERM_VIEW)
@json_errors
def tasks_detail(request: HttpRequest, task_id: int) -> JsonResponse:
    return JsonResponse(task_detail_json(task_detail(task_id=task_id)))


@api_user(roles.PERM_CONFIRM_APPLY)
@json_errors
def tasks_confirm_apply(request: HttpRequest, task_id: int) -> JsonResponse:
    data = _body(request, "description")
    task = task_confirm_apply(
        task_id=task_id,
        actor=request_actor(request),
        description=field_str(data, "description", required=False),
    )
    return JsonResponse(task_json(task))


@api_user(roles.PERM_CANCEL_TASK)
@json_errors
def tasks_cancel(request: HttpRequest, task_id: int) -> JsonResponse:
    data = _body(request, "force", "reason")
    task = task_cancel(
        task_id=task_id,
        actor=request_actor(request),
        reason=field_str(data, "reason"),
        force=field_bool(data, "force"),
    )
    return JsonResponse(task_json(task))


# --- admin actions: slots, pods, pools (SPEC 8 "Actions") ---------------------------------------


def _slot_action_json(slot: Slot) -> dict[str, Any]:
    return {
        "slot_id": slot.pk,
        "pod": slot.pod.name,
        "index": slot.index,
        "state": slot.state,
        "task_id": slot.task_id,
        "reserved_until": iso(slot.reserved_until),
        "version": slot.version,
    }


def _pod_action_json(pod: Pod) -> dict[str, Any]:
    return {
        "pod_id": pod.pk,
        "name": pod.name,
        "pool_id": pod.pool_id,
        "phase": pod.phase,
        "cordoned": pod.cordoned,
        "cordoned_by": pod.cordoned_by or None,
        "cordoned_reason": pod.cordoned_reason or None,
    }


def _future_datetime(data: dict[str, Any], name: str) -> datetime | None:
    raw = field_str(data, name, required=False)
    if not raw:
        return None
    try:
        moment = parse_datetime(raw)
        if moment is not None:
            # In UTC, as it is stored: 9999-12-31T23:59-05:00 is past year 9999 there.
            moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        moment = None
    if moment is None:
        raise InvalidInput(
            f"{name} must be an ISO 8601 date and time between years 1 and 9999", field=name
        )
    if moment <= clock.now():
        raise InvalidInput(f"{name} must be in the future", field=name)
    return moment


@api_user(roles.PERM_RELEASE_SLOT)
@json_errors
def slots_release(request: HttpRequest, slot_id: int) -> JsonResponse:
    data = _body(request, "reason", "expected_version")
    result = slot_release(
        slot_id=slot_id,
        actor=request_actor(request),
        reason=field_str(data, "reason"),
        expected_version=field_int(data, "expected_version"),
    )
    return JsonResponse(
        {
            "slot": _slot_action_json(result.slot),
            "task": task_json(result.task),
            "event_id": result.event.pk,
            "task_failed": result.task_failed,
            "undo_until": iso(result.undo_until),
        }
    )


@api_user(roles.PERM_VIEW)
@json_errors
def slots_release_preview(request: HttpRequest, slot_id: int) -> JsonResponse:
    impact = slot_release_impact(slot_id=slot_id)
    return JsonResponse(
        {
            "slot_id": impact.slot_id,
            "state": impact.state,
            "version": impact.version,
            "task_id": impact.task_id,
            "impact": impact.text,
        }
    )


@api_user(roles.PERM_RELEASE_SLOT)
@json_errors
def events_undo_release(request: HttpRequest, event_id: int) -> JsonResponse:
    _body(request)
    result = slot_release_undo(event_id=event_id, actor=request_actor(request))
    return JsonResponse(
        {
            "slot": _slot_action_json(result.slot),
            "task": task_json(result.task),
            "event_id": result.event.pk,
        }
    )


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pods_drain(request: HttpRequest, pod_id: int) -> JsonResponse:
    data = _body(request, "reason")
    pod = pod_drain(pod_id=pod_id, actor=request_actor(request), reason=field_str(data, "reason"))
    return JsonResponse(_pod_action_json(pod))


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pods_undrain(request: HttpRequest, pod_id: int) -> JsonResponse:
    data = _body(request, "reason")
    pod = pod_undrain(pod_id=pod_id, actor=request_actor(request), reason=field_str(data, "reason"))
    return JsonResponse(_pod_action_json(pod))


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_pause(request: HttpRequest, pool_id: str) -> JsonResponse:
    data = _body(request, "reason", "until")
    reason = field_str(data, "reason")
    until = _future_datetime(data, "until")
    pool = pool_pause(pool_id=pool_id, actor=request_actor(request), reason=reason, until=until)
    return JsonResponse(pool_json(pool))


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_resume(request: HttpRequest, pool_id: str) -> JsonResponse:
    data = _body(request, "reason")
    pool = pool_resume(
        pool_id=pool_id,
        actor=request_actor(request),
        reason=field_str(data, "reason", required=False),
    )
    return JsonResponse(pool_json(pool))


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_unfreeze(request: HttpRequest, pool_id: str) -> JsonResponse:
    data = _body(request, "reason")
    pool = pool_unfreeze_once(
        pool_id=pool_id, actor=request_actor(request), reason=field_str(data, "reason")
    )
    body = pool_json(pool)
    body["unfrozen_until"] = iso(pool.unfrozen_until)
    return JsonResponse(body)


# --- admin actions: reconcile now, scale, hold (the dashboard's views_pool_actions.py) ---------


def _change_json(change: Change) -> dict[str, str]:
    return {"kind": change.kind, "target": change.target, "detail": change.detail}


def _hold_json(hold: PoolHold) -> dict[str, Any]:
    return {
        "pool_id": hold.pool_id,
        "pods": hold.pods,
        "until": iso(hold.until),
        "by": hold.by,
        "reason": hold.reason,
    }


def _hold_until(data: dict[str, Any]) -> datetime:
    """When a hold ends: `minutes` from now, or `until`; at most a day ahead, as on the
    dashboard. `"minutes": 0` ends the current hold now (the dashboard's form cannot)."""
    longest = int(HOLD_MAX.total_seconds() // 60)
    now = clock.now()
    if data.get("until") is not None:
        if data.get("minutes") is not None:
            raise InvalidInput("give minutes or until, not both", field="until")
        until = _future_datetime(data, "until")
        if until is None:  # ""
            raise InvalidInput("until must be an ISO 8601 date and time", field="until")
        if until > now + timedelta(minutes=longest):
            raise InvalidInput(f"until must be within {longest} minutes from now", field="until")
        return until
    if data.get("minutes") is None:
        raise InvalidInput("minutes (0 ends the hold now) or until is required", field="minutes")
    minutes = field_int(data, "minutes")
    if not 0 <= minutes <= longest:
        raise InvalidInput(f"minutes must be between 0 and {longest}", field="minutes")
    return now + timedelta(minutes=minutes)


@api_user(roles.PERM_VIEW)
@json_errors
def pools_reconcile(request: HttpRequest, pool_id: str) -> JsonResponse:
    """A dry run is a read (viewers see it on the dashboard's confirm dialog too); a pass
    needs `manage_pool` and a reason: it may fail tasks, drop reservations, delete pods."""
    data = _body(request, "dry_run", "reason")
    if "dry_run" not in data:
        # No default: a forgotten flag must neither run a pass nor pretend to.
        raise InvalidInput("dry_run is required (true: what a pass would change)", field="dry_run")
    if field_bool(data, "dry_run"):
        report = pool_reconcile_preview(pool=pool_get(pool_id=pool_id))
    else:
        if not request.user.has_perm(roles.PERM_MANAGE_POOL):
            return permission_denied(request, roles.PERM_MANAGE_POOL)
        reason = field_str(data, "reason")
        report = pool_reconcile_now(pool_id=pool_id, actor=request_actor(request), reason=reason)
    return JsonResponse(
        {
            "pool_id": report.pool_id,
            "dry_run": report.dry_run,
            "changes": [_change_json(change) for change in report.changes],
            "cluster_error": report.cluster_error or None,
        }
    )


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_scale(request: HttpRequest, pool_id: str) -> JsonResponse:
    pool = pool_get(pool_id=pool_id)
    data = _body(request, "min_replicas", "max_replicas", "reason")
    pool = pool_scale(
        pool=pool,
        min_replicas=field_int(data, "min_replicas"),
        max_replicas=field_int(data, "max_replicas"),
        actor=request_actor(request),
        reason=field_str(data, "reason"),
    )
    return JsonResponse(pool_json(pool))


@api_user(roles.PERM_MANAGE_POOL)
@json_errors
def pools_hold(request: HttpRequest, pool_id: str) -> JsonResponse:
    pool = pool_get(pool_id=pool_id)
    data = _body(request, "pods", "minutes", "until", "reason")
    until = _hold_until(data)
    # Ending a hold ("minutes": 0) needs no pod count.
    ends = until <= clock.now() and data.get("pods") is None
    hold = pool_hold(
        pool=pool,
        pods=0 if ends else field_int(data, "pods"),
        until=until,
        actor=request_actor(request),
        reason=field_str(data, "reason"),
    )
    return JsonResponse(_hold_json(hold))
