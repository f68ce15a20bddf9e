"""`/metrics` for Prometheus (SPEC 8).

A scraper cannot log in, so the view takes what the admin API takes: a session, or a person's
bearer token (`Authorization: Bearer pat_...`), with the viewer permission. Anonymous: 401
with `WWW-Authenticate`; no permission: 403; anything but GET: 405.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from poolsadmin.api.roles import PERM_VIEW
from poolsadmin.api.user_auth import api_route, api_user
from poolsadmin.dashboard.metrics import CONTENT_TYPE, exposition, metrics_collect


@api_user(PERM_VIEW)
def _metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(exposition(metrics_collect()), content_type=CONTENT_TYPE)


metrics = api_route(GET=_metrics)
