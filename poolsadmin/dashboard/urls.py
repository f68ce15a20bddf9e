from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path

from poolsadmin.dashboard import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.home, name="home"),
    path("pools/", views.pools_list, name="pools-list"),
    path("pools/<str:pool_id>/", views.pools_detail, name="pools-detail"),
    path("tasks/<int:task_id>/", views.tasks_detail, name="tasks-detail"),
    path("", include("poolsadmin.dashboard.browse_urls")),
    path("", include("poolsadmin.dashboard.action_urls")),
]
