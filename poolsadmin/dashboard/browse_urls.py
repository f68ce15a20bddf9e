from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from poolsadmin.dashboard import views_browse

urlpatterns: list[URLPattern | URLResolver] = [
    path(
        "workspaces/<str:workspace_id>/",
        views_browse.workspaces_detail,
        name="workspaces-detail",
    ),
    path("agents/", views_browse.agents_list, name="agents-list"),
    path("audit/", views_browse.audit_list, name="audit-list"),
    path("search/", views_browse.search, name="search"),
]
