"""Admin JSON API under /api/v1/ (agent endpoints live in agent_urls.py under agents/)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from poolsadmin.api import admin_views as views
from poolsadmin.api.user_auth import api_route

urlpatterns: list[URLPattern | URLResolver] = [
    path("pools", api_route(GET=views.pools_list, POST=views.pools_create), name="api-pools"),
    path("pools/<str:pool_id>", api_route(GET=views.pools_detail), name="api-pools-detail"),
    path(
        "pools/<str:pool_id>/tokens",
        api_route(POST=views.pools_token_create),
        name="api-pools-tokens",
    ),
    path("workspaces", api_route(POST=views.workspaces_create), name="api-workspaces"),
    path(
        "workspaces/<str:workspace_id>",
        api_route(GET=views.workspaces_detail),
        name="api-workspaces-detail",
    ),
    path(
        "workspaces/<str:workspace_id>/tasks",
        api_route(POST=views.workspaces_task_submit),
        name="api-workspaces-tasks",
    ),
    path(
        "workspaces/<str:workspace_id>/unlock",
        api_route(POST=views.workspaces_unlock),
        name="api-workspaces-unlock",
    ),
    path("tasks/<int:task_id>", api_route(GET=views.tasks_detail), name="api-tasks-detail"),
    path(
        "tasks/<int:task_id>/confirm-apply",
        api_route(POST=views.tasks_confirm_apply),
        name="api-tasks-confirm-apply",
    ),
    path("tasks/<int:task_id>/cancel", api_route(POST=views.tasks_cancel), name="api-tasks-cancel"),
]

# Admin actions (SPEC 8 "Actions").
urlpatterns += [
    path(
        "slots/<int:slot_id>/release",
        api_route(POST=views.slots_release),
        name="api-slots-release",
    ),
    path(
        "slots/<int:slot_id>/release-preview",
        api_route(GET=views.slots_release_preview),
        name="api-slots-release-preview",
    ),
    path(
        "events/<int:event_id>/undo-release",
        api_route(POST=views.events_undo_release),
        name="api-events-undo-release",
    ),
    path("pods/<int:pod_id>/drain", api_route(POST=views.pods_drain), name="api-pods-drain"),
    path("pods/<int:pod_id>/undrain", api_route(POST=views.pods_undrain), name="api-pods-undrain"),
    path("pools/<str:pool_id>/pause", api_route(POST=views.pools_pause), name="api-pools-pause"),
    path("pools/<str:pool_id>/resume", api_route(POST=views.pools_resume), name="api-pools-resume"),
    path(
        "pools/<str:pool_id>/unfreeze",
        api_route(POST=views.pools_unfreeze),
        name="api-pools-unfreeze",
    ),
    path(
        "pools/<str:pool_id>/reconcile",
        api_route(POST=views.pools_reconcile),
        name="api-pools-reconcile",
    ),
    path("pools/<str:pool_id>/scale", api_route(POST=views.pools_scale), name="api-pools-scale"),
    path("pools/<str:pool_id>/hold", api_route(POST=views.pools_hold), name="api-pools-hold"),
]

# Reconciler leadership (SPEC 5).
urlpatterns += [
    path("reconciler", api_route(GET=views.reconciler_detail), name="api-reconciler"),
]
