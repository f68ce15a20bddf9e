"""The request log of `LOG_REQUESTS` (lib/logs.py formats it like every other line)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from poolsadmin.lib.logs import log_ids


class RequestLogMiddleware:
    """With `LOG_REQUESTS`, one line per request (`poolsadmin.request`): method, path (never
    the query string or a header), status, milliseconds, and the task, pool and agent ids of
    the URL. It replaces daphne's own access log, which is plain text on stdout whatever
    LOG_FORMAT says: run daphne with `-v 0` then."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.enabled = bool(getattr(settings, "LOG_REQUESTS", False))

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if not self.enabled:
            return self.get_response(request)
        started = time.monotonic()
        response = self.get_response(request)
        self._log(request, response, started)
        return response

    def _log(self, request: HttpRequest, response: HttpResponseBase, started: float) -> None:
        match = request.resolver_match
        url = match.kwargs if match is not None else {}
        _request_logger.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "method": request.method,
                "path": request.path,
                "status_code": response.status_code,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                **log_ids(
                    task=url.get("task_id"), pool=url.get("pool_id"), agent=url.get("agent_id")
                ),
            },
        )


_request_logger = logging.getLogger("poolsadmin.request")
