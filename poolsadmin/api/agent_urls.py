from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from poolsadmin.api import agent_views

urlpatterns: list[URLPattern | URLResolver] = [
    path("register", agent_views.register, name="agents-register"),
    path("hearing", agent_views.hearing, name="agents-hearing"),
    path("<str:agent_id>/heartbeat", agent_views.heartbeat, name="agents-heartbeat"),
    path("tasks/<int:task_id>", agent_views.detail, name="agents-task-detail"),
    path("tasks/<int:task_id>/accept", agent_views.accept, name="agents-task-accept"),
    path("tasks/<int:task_id>/status", agent_views.report, name="agents-task-status"),
]
