"""What a request does when its database connection fails under it (issue 8).

* **No connection in time** (`psycopg_pool.PoolTimeout`: every connection of this process's
  pool is busy for longer than DATABASE_POOL_TIMEOUT_SECONDS): 503 with `Retry-After`,
  logged without a traceback. The server is busy, not broken, and the client should come
  back; a 500 would say the opposite.
* **The connection died during the request** (a backend killed by `pg_terminate_backend`, a
  failover, a restart: an OperationalError or InterfaceError after which the connection is
  closed): a request that is safe to run twice is run once more, on a fresh connection from
  the pool, so the client never sees the failure. Safe are GET and HEAD, and the URL names in
  `POOLSADMIN_RETRY_SAFE_URL_NAMES` (the agent heartbeat: one transaction that records
  liveness and answers from the ledger). Any other request gets 503: its transaction may have
  committed or not, and only the client can decide to repeat it.

One middleware, so views stay as they are. It sees what views raise (`process_exception`),
not what other middleware raises; the database work of a request is in its view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.urls import ResolverMatch
from psycopg_pool import PoolTimeout, TooManyRequests

from poolsadmin.lib.input import answers_json

logger = logging.getLogger("poolsadmin.db")

RETRY_AFTER_SECONDS = 5
SAFE_METHODS = frozenset({"GET", "HEAD"})
# Set on a request once it has been retried: a second failure is answered, not retried again.
_RETRIED = "_poolsadmin_database_retried"


def _caused_by(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Django wraps the driver's errors (`raise ... from`): look along the chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def pool_exhausted(error: BaseException) -> bool:
    return _caused_by(error, (PoolTimeout, TooManyRequests))


def _unusable(conn: BaseDatabaseWrapper) -> bool:
    # Closed by Django (a failed rollback drops the connection) or by the driver (psycopg
    # marks a connection closed when its server went away). SQLite connections have no
    # `closed`: a locked SQLite database is not a lost connection.
    raw = conn.connection
    return raw is None or bool(getattr(raw, "closed", False))


def connection_lost(error: BaseException) -> bool:
    """The error came with a database connection of this thread that is no longer usable."""
    if not isinstance(error, OperationalError | InterfaceError):
        return False
    return any(_unusable(conn) for conn in connections.all(initialized_only=True))


def _view_to_retry(request: HttpRequest) -> ResolverMatch | None:
    """The request's view, if running it once more is safe."""
    if getattr(request, _RETRIED, False):
        return None
    # Inside a caller's transaction (a test's), a fresh connection cannot continue it.
    if any(conn.in_atomic_block for conn in connections.all(initialized_only=True)):
        return None
    match = request.resolver_match
    if match is None or iscoroutinefunction(match.func):
        return None
    safe = request.method in SAFE_METHODS or match.url_name in set(
        settings.POOLSADMIN_RETRY_SAFE_URL_NAMES
    )
    return match if safe else None


def _drop_unusable_connections() -> None:
    for conn in connections.all(initialized_only=True):
        if _unusable(conn):
            # With the pool this hands the dead connection back, and the pool discards it;
            # the next query takes a checked one.
            conn.close()


def unavailable(request: HttpRequest, detail: str) -> HttpResponse:
    """503 with Retry-After: JSON under /api/ (the API's error shape), text elsewhere."""
    response: HttpResponse
    if answers_json(request):
        response = JsonResponse({"error": "unavailable", "detail": detail}, status=503)
    else:
        response = HttpResponse(
            f"Service unavailable: {detail}\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


class DatabaseUnavailableMiddleware:
    """Last in MIDDLEWARE, so its process_exception is the first to see a view's error."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        what = f"{request.method} {request.path}"
        if pool_exhausted(exception):
            logger.warning(
                "%s: no database connection within %s s (pool of %s exhausted): 503",
                what,
                settings.DATABASE_POOL_TIMEOUT_SECONDS,
                settings.DATABASE_POOL_MAX_SIZE,
            )
            return unavailable(request, "the server is busy; try again shortly")
        if not connection_lost(exception):
            return None
        # Whatever happens next (the retry, the session middleware saving on the way out)
        # needs a connection that works.
        _drop_unusable_connections()
        match = _view_to_retry(request)
        if match is None:
            logger.error("%s: database connection lost (%s): not retried, 503", what, exception)
            return unavailable(request, "the database connection was lost; try again")
        logger.warning("%s: database connection lost (%s): retrying once", what, exception)
        setattr(request, _RETRIED, True)
        try:
            response: HttpResponse = match.func(request, *match.args, **match.kwargs)
        except DatabaseError as again:
            answer = self.process_exception(request, again)
            if answer is None:
                raise
            return answer
        return response
