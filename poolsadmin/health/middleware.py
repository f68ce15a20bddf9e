"""Answers the health probes before any other middleware runs (see health/views.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from poolsadmin.health.views import healthz, readyz

PROBES: dict[str, Callable[[HttpRequest], HttpResponse]] = {
    "/healthz": healthz,
    "/readyz": readyz,
}


class HealthProbeMiddleware:
    """First in MIDDLEWARE: a probe never reaches `request.get_host()` (ALLOWED_HOSTS), the
    HTTPS redirect, sessions or authentication. Other paths pass through untouched.

    Sync and async, so that under ASGI the request stays on the event loop down to
    ServeStatic's async middleware: a sync-only outer middleware made every request cross
    from the loop to a thread and back once more (issue 9: the agents' heartbeats)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        probe = PROBES.get(request.path_info)
        if probe is not None:
            return probe(request)
        return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        probe = PROBES.get(request.path_info)
        if probe is not None:
            # readyz asks the database: a thread, as for any sync view.
            return await sync_to_async(probe)(request)
        response: Awaitable[HttpResponseBase] = self.get_response(request)
        return await response
