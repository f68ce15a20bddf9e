"""`/healthz` and `/readyz` for the kubelet's probes (and load balancers).

Both are answered by `HealthProbeMiddleware` before any other middleware: no login, no
session, no CSRF, and no ALLOWED_HOSTS check nor HTTPS redirect. The kubelet sends the pod IP
as Host and probes over plain HTTP; a 400 for the host would restart healthy pods and a
redirect counts as success, so either would make the probe meaningless. That is safe because
these answers are the same whatever the Host says: they build no URL and set no cookie.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from poolsadmin.health.checks import readiness_problems

ALLOWED_METHODS = ("GET", "HEAD")


def _method_not_allowed(request: HttpRequest) -> HttpResponse | None:
    if request.method in ALLOWED_METHODS:
        return None
    response = JsonResponse(
        {"error": "method_not_allowed", "detail": f"use {' or '.join(ALLOWED_METHODS)}"},
        status=405,
    )
    response["Allow"] = ", ".join(ALLOWED_METHODS)
    return response


def _no_store(response: HttpResponse) -> HttpResponse:
    response["Cache-Control"] = "no-store"
    return response


def healthz(request: HttpRequest) -> HttpResponse:
    """The process answers HTTP. Nothing else: a database outage must not make the kubelet
    restart every web pod (liveness), only take them out of the Service (readiness)."""
    refused = _method_not_allowed(request)
    if refused is not None:
        return refused
    return _no_store(JsonResponse({"status": "ok"}))


def readyz(request: HttpRequest) -> HttpResponse:
    """The database answers with every migration applied and the channel layer round-trips:
    200 `{"status": "ok"}`, else 503 naming each failure under `failed`."""
    refused = _method_not_allowed(request)
    if refused is not None:
        return refused
    problems = readiness_problems()
    failed = {name: found for name, found in problems.items() if found}
    checks = {name: ("failed" if found else "ok") for name, found in problems.items()}
    if failed:
        body = {"status": "unavailable", "checks": checks, "failed": failed}
        return _no_store(JsonResponse(body, status=503))
    return _no_store(JsonResponse({"status": "ok", "checks": checks}))
