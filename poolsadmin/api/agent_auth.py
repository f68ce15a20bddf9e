"""Authentication and access checks of the agent API.

Two credentials, two questions:

* the pool token, `Authorization: Bearer apt_<pool_id>_<hex>`, says which pool the caller
  belongs to. Missing or bad: 401. Every agent and task the request names must belong to
  that pool (SPEC 7: a token only reaches its own pool), else 403; unknown ids are 404.
* the agent secret, `X-Agent-Secret: ags_<hex>` (returned once by register), says which agent
  of the pool the caller is. Every request but register acts as one agent (the URL's, the
  body's `agent_id`, or `X-Agent-Id`) and must carry that agent's secret. Missing or wrong:
  403 with `field: agent_secret`, since the token is valid but the identity is not; an agent
  answered so should register again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec

from django.http import HttpRequest, HttpResponse

from poolsadmin.agents.models import Agent
from poolsadmin.agents.services import agent_authenticate
from poolsadmin.api.http import error_response
from poolsadmin.lib.errors import Forbidden, NotFound, Unauthenticated
from poolsadmin.lib.input import check_text
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_token_authenticate
from poolsadmin.tasks.models import WorkspaceTask

P = ParamSpec("P")
PoolView = Callable[Concatenate[HttpRequest, str, P], HttpResponse]

AGENT_ID_HEADER = "X-Agent-Id"
AGENT_SECRET_HEADER = "X-Agent-Secret"


def request_pool_id(request: HttpRequest) -> str:
    """The pool of the request's bearer token (its id: the token row alone, no join, for the
    200 heartbeats a second of a fleet), or Unauthenticated."""
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("missing bearer token (Authorization: Bearer apt_<pool_id>_<hex>)")
    return pool_token_authenticate(secret=secret.strip()).pool_id


def token_pool(*, pool_id: str) -> AgentPool:
    """The token's pool, whole (register reads its type and slots); Unauthenticated if it
    went since the token was checked."""
    try:
        return AgentPool.objects.get(pk=pool_id)
    except AgentPool.DoesNotExist:
        raise Unauthenticated("the pool token's pool no longer exists") from None


def pool_token_required(view: PoolView[P]) -> Callable[Concatenate[HttpRequest, P], HttpResponse]:
    """Authenticate the pool token and pass its pool's id to the view. Every 401, the view's
    too (`token_pool`), names the scheme (RFC 6750)."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        try:
            return view(request, request_pool_id(request), *args, **kwargs)
        except Unauthenticated as error:
            response = error_response(error)
            response["WWW-Authenticate"] = 'Bearer realm="poolsadmin agents"'
            return response

    return wrapper


def request_agent(request: HttpRequest, *, pool_id: str, agent_id: str | None = None) -> Agent:
    """The agent the request acts as: `agent_id` (from the URL or the body) or, when the
    request names none, the `X-Agent-Id` header; proven by `X-Agent-Secret`."""
    if agent_id is None:
        agent_id = request.headers.get(AGENT_ID_HEADER, "").strip()
        if not agent_id:
            raise Forbidden(
                f"missing {AGENT_ID_HEADER} header: which agent of the pool is asking",
                field="agent_id",
            )
        check_text(agent_id, field="agent_id")
    secret = request.headers.get(AGENT_SECRET_HEADER, "").strip()
    check_text(secret, field="agent_secret")
    if not secret:
        raise Forbidden(
            f"missing {AGENT_SECRET_HEADER} header: the agent_secret that register returned",
            field="agent_secret",
        )
    return agent_authenticate(pool_id=pool_id, agent_id=agent_id, secret=secret)


def pool_task(*, pool_id: str, task_id: int) -> WorkspaceTask:
    """The task `task_id`, which must run in the pool `pool_id` (as `pool_task_check`)."""
    task = WorkspaceTask.objects.filter(pk=task_id).first()
    _check_pool(pool_id, task_id, None if task is None else task.pool_id)
    assert task is not None
    return task


def pool_task_check(*, pool_id: str, task_id: int) -> None:
    """NotFound unless the task `task_id` exists, Forbidden unless it runs in `pool_id`: its pool
    column only (accept and report run this before their service reads the task). A task
    never changes pool, so checking outside the service's transaction is safe."""
    found = list(WorkspaceTask.objects.filter(pk=task_id).values_list("pool_id", flat=True))
    _check_pool(pool_id, task_id, found[0] if found else None)


def _check_pool(pool_id: str, task_id: int, task_pool_id: str | None) -> None:
    if task_pool_id is None:
        raise NotFound(f"task {task_id} does not exist")
    if task_pool_id != pool_id:
        raise Forbidden(f"task {task_id} does not belong to the token's pool")
