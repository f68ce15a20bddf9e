from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from poolsadmin.dashboard import views_actions as v
from poolsadmin.dashboard import views_pool_actions as pa

urlpatterns: list[URLPattern | URLResolver] = [
    path("slots/<int:slot_id>/release/", v.slot_release_view, name="pools-slot-release"),
    path(
        "events/<int:event_id>/undo-release/",
        v.slot_release_undo_view,
        name="events-undo-release",
    ),
    path("pods/<int:pod_id>/drain/", v.pod_drain_view, name="pools-pod-drain"),
    path("pods/<int:pod_id>/undrain/", v.pod_undrain_view, name="pools-pod-undrain"),
    path("pools/<str:pool_id>/pause/", v.pool_pause_view, name="pools-pause"),
    path("pools/<str:pool_id>/resume/", v.pool_resume_view, name="pools-resume"),
    path("pools/<str:pool_id>/unfreeze/", v.pool_unfreeze_view, name="pools-unfreeze"),
    path("tasks/<int:task_id>/cancel/", v.task_cancel_view, name="tasks-cancel"),
    path(
        "tasks/<int:task_id>/confirm-apply/", v.task_confirm_apply_view, name="tasks-confirm-apply"
    ),
    path(
        "workspaces/<str:workspace_id>/unlock/",
        v.workspace_unlock_view,
        name="workspaces-unlock",
    ),
]

# Pool actions with a dry run or numbers (views_pool_actions.py).
urlpatterns += [
    path("pools/<str:pool_id>/reconcile/", pa.pool_reconcile_view, name="pools-reconcile"),
    path("pools/<str:pool_id>/scale/", pa.pool_scale_view, name="pools-scale"),
    path("pools/<str:pool_id>/hold/", pa.pool_hold_view, name="pools-hold"),
]
