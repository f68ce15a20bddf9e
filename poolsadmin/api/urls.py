from __future__ import annotations

from django.urls import include, path

urlpatterns = [
    path("agents/", include("poolsadmin.api.agent_urls")),
    path("", include("poolsadmin.api.admin_urls")),
]
