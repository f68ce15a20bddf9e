"""Authentication and access checks of the agent API.

An agent presents its pool token as `Authorization: Bearer apt_<pool_id>_<hex>`. The token
decides the pool; every agent and task the request names must belong to that pool (SPEC 7:
a token only reaches its own pool). Missing or bad tokens are 401, anything of another pool
403, unknown ids 404.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec

from django.http import HttpRequest, HttpResponse

from poolsadmin.agents.models import Agent
from poolsadmin.api.http import error_response
from poolsadmin.lib.errors import Forbidden, NotFound, Unauthenticated
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_token_authenticate
from poolsadmin.tasks.models import WorkspaceTask

P = ParamSpec("P")
PoolView = Callable[Concatenate[HttpRequest, AgentPool, P], HttpResponse]


def request_pool(request: HttpRequest) -> AgentPool:
    """The pool of the request's bearer token, or Unauthenticated."""
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("missing bearer token (Authorization: Bearer apt_<pool_id>_<hex>)")
    return pool_token_authenticate(secret=secret.strip()).pool


def pool_token_required(view: PoolView[P]) -> Callable[Concatenate[HttpRequest, P], HttpResponse]:
    """Authenticate the pool token and pass its pool to the view."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        try:
            pool = request_pool(request)
        except Unauthenticated as error:
            response = error_response(error)
            response["WWW-Authenticate"] = 'Bearer realm="poolsadmin agents"'
            return response
        return view(request, pool, *args, **kwargs)

    return wrapper


def pool_agent(*, pool: AgentPool, agent_id: str) -> Agent:
    """The agent `agent_id`, which must belong to `pool`."""
    agent = Agent.objects.filter(pk=agent_id).first()
    if agent is None:
        raise NotFound(f"agent {agent_id} does not exist", field="agent_id")
    if agent.pool_id != pool.pool_id:
        raise Forbidden(f"agent {agent_id} does not belong to the token's pool", field="agent_id")
    return agent


def pool_task(*, pool: AgentPool, task_id: int) -> WorkspaceTask:
    """The task `task_id`, which must run in `pool`. A task never changes pool, so checking
    outside the service's transaction is safe."""
    task = WorkspaceTask.objects.filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    if task.pool_id != pool.pool_id:
        raise Forbidden(f"task {task_id} does not belong to the token's pool")
    return task
