"""The server-rendered dashboard: pools, a pool's slot grid and queue, a task.

A stand-in for the live dashboard: the same URLs and reads, refreshed by the browser instead
of pushed over WebSockets. Every page needs a login and the viewer role (`PERM_VIEW`).
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required, permission_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_safe

from poolsadmin.api.roles import PERM_VIEW
from poolsadmin.dashboard.selectors import dashboard_pool, dashboard_pools, dashboard_task
from poolsadmin.lib.errors import NotFound


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    return redirect("pools-list")


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pools_list(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/pools.html", {"rows": dashboard_pools()})


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pools_detail(request: HttpRequest, pool_id: str) -> HttpResponse:
    try:
        page = dashboard_pool(pool_id=pool_id)
    except NotFound as exc:
        raise Http404(exc.message) from None
    return render(request, "dashboard/pool.html", {"page": page})


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def tasks_detail(request: HttpRequest, task_id: int) -> HttpResponse:
    try:
        page = dashboard_task(task_id=task_id)
    except NotFound as exc:
        raise Http404(exc.message) from None
    return render(request, "dashboard/task.html", {"page": page})
