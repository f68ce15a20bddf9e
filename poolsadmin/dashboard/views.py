"""The server-rendered dashboard: pools, a pool's slot grid and queue, a task.

Every page needs a login and the viewer role (`PERM_VIEW`). The pool and task pages are live:
asked by htmx (a poll, or a refresh after an action), they answer only their live regions,
which htmx swaps in by id. The pool page is also pushed over its WebSocket
(`realtime.consumers`), rendered by the same partial (`dashboard.live`).
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required, permission_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_safe

from poolsadmin.api.roles import PERM_VIEW
from poolsadmin.dashboard.live import LIVE_PARTIAL, POOL_TEMPLATE, pool_page_context
from poolsadmin.dashboard.pool_view import pool_view_parse
from poolsadmin.dashboard.selectors import dashboard_pool, dashboard_pools, dashboard_task
from poolsadmin.lib.errors import InvalidInput, NotFound
from poolsadmin.lib.htmx import page_or_partial
from poolsadmin.lib.input import bad_input_response


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    return redirect("pools-list")


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pools_list(request: HttpRequest) -> HttpResponse:
    template = page_or_partial(request, "dashboard/pools.html", "pool-list")
    return render(request, template, {"rows": dashboard_pools()})


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pools_detail(request: HttpRequest, pool_id: str) -> HttpResponse:
    try:
        view = pool_view_parse(request.GET)
        page = dashboard_pool(pool_id=pool_id, view=view)
    except NotFound as exc:
        raise Http404(exc.message) from None
    except InvalidInput as exc:
        return bad_input_response(request, exc)
    template = page_or_partial(request, POOL_TEMPLATE, LIVE_PARTIAL)
    return render(request, template, pool_page_context(page=page))


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def tasks_detail(request: HttpRequest, task_id: int) -> HttpResponse:
    try:
        page = dashboard_task(task_id=task_id)
    except NotFound as exc:
        raise Http404(exc.message) from None
    template = page_or_partial(request, "dashboard/task.html", "task-live")
    return render(request, template, {"page": page})
