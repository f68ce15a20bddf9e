"""`/metrics` for Prometheus (SPEC 8).

A scraper cannot log in, so the view takes what the admin API takes: a session, or a person's
bearer token (`Authorization: Bearer pat_...`), with the viewer permission. Anonymous: 401
with `WWW-Authenticate`; no permission: 403; anything but GET: 405.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from poolsadmin.api.roles import PERM_VIEW
from poolsadmin.api.user_auth import api_route, api_user
from poolsadmin.dashboard.metrics import REGISTRY


@api_user(PERM_VIEW)
def _metrics(request: HttpRequest) -> HttpResponse:
    # The classic text format whatever the Accept header: it is what every Prometheus reads,
    # and OpenMetrics would rename the counters' families.
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_PLAIN_0_0_4)


metrics = api_route(GET=_metrics)
