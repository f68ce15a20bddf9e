from __future__ import annotations

from django.urls import include, path, re_path

from poolsadmin.api.http import not_found

urlpatterns = [
    path("agents/", include("poolsadmin.api.agent_urls")),
    path("", include("poolsadmin.api.admin_urls")),
    # Last: whatever else is under /api/v1/ (the empty regex matches every rest of a path)
    # gets the API's JSON 404, not the dashboard's HTML page.
    re_path(r"", not_found, name="api-not-found"),
]
