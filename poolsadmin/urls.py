from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from poolsadmin.dashboard.views_metrics import metrics
from poolsadmin.health.views import healthz, readyz

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("django-admin/", admin.site.urls),
    path("api/v1/", include("poolsadmin.api.urls")),
    path("metrics", metrics, name="metrics"),
    # Answered by HealthProbeMiddleware before any other middleware; listed here so that
    # they resolve like every URL (reverse, the manifests' probe test, the hostile-input test).
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("", include("poolsadmin.dashboard.urls")),
]
