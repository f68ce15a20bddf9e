"""The dashboard's browse pages: a workspace, the agents, the audit log and the search box.

Read-only like the pools pages: a login and the viewer role (`PERM_VIEW`), GET only.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required, permission_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_safe

from poolsadmin.api.roles import PERM_VIEW
from poolsadmin.dashboard.browse_selectors import (
    AuditFilters,
    dashboard_agents,
    dashboard_audit,
    dashboard_search,
    dashboard_workspace,
)
from poolsadmin.lib.errors import InvalidInput, NotFound
from poolsadmin.lib.htmx import page_or_partial


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def workspaces_detail(request: HttpRequest, workspace_id: str) -> HttpResponse:
    try:
        page = dashboard_workspace(workspace_id=workspace_id)
    except NotFound as exc:
        raise Http404(exc.message) from None
    return render(
        request,
        page_or_partial(request, "dashboard/workspace.html", "workspace-live"),
        {"page": page},
    )


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def agents_list(request: HttpRequest) -> HttpResponse:
    page = dashboard_agents(
        pool_id=request.GET.get("pool", "").strip(), agent=request.GET.get("agent", "").strip()
    )
    return render(
        request, page_or_partial(request, "dashboard/agents.html", "agents-results"), {"page": page}
    )


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def audit_list(request: HttpRequest) -> HttpResponse:
    filters = AuditFilters(
        **{name: request.GET.get(name, "").strip() for name in AuditFilters.__dataclass_fields__}
    )
    template = page_or_partial(request, "dashboard/audit.html", "audit-results")
    try:
        page = dashboard_audit(filters=filters, page=request.GET.get("page"))
    except InvalidInput as exc:
        context = {"filters": filters, "error": exc.message, "error_field": exc.field}
        return render(request, template, context, status=exc.http_status)
    return render(request, template, {"page": page, "filters": filters})


@require_safe
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def search(request: HttpRequest) -> HttpResponse:
    query = request.GET.get("q", "").strip()
    target = dashboard_search(query=query)
    if target is not None:
        return redirect(target)
    return render(request, "dashboard/search.html", {"query": query})
