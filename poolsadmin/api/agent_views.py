"""The agent API (SPEC 7): JSON over HTTP with a bearer pool token and, once registered, the
agent's own secret (see agent_auth).

* `POST register` `{name, version, pod_uid?}` -> `{agent_id, pool_id, agent_secret}`; the
  secret is shown this once. Registering again under a taken name needs that agent's
  `X-Agent-Secret` (it is then rotated), or in a k8s pool a new pod of that name (`pod_uid`);
  otherwise 409, field `name`.
* `POST <agent_id>/heartbeat` `{running_task_ids, cpu?, memory?, wait?}`: with `wait`
  (seconds, 0-20) a heartbeat that has nothing for the agent is answered when work is
  dispatched to it or the wait ends (`woken` says which; agents/nudge.py). A process that
  already holds LONG_POLLS_MAX waiting heartbeats answers at once, without `woken`.
* the heartbeat, `POST tasks/<id>/accept` and `PUT tasks/<id>/status` (body `agent_id`),
  `GET tasks/<id>` (header `X-Agent-Id`) act as one agent and need its `X-Agent-Secret`.

Each view authenticates, parses and checks the body (400 naming the field), proves which agent
is asking and that the agent and task belong to the token's pool, and calls one service. The
services are transactional and refuse invalid transitions with Conflict (409), so a refused
request writes nothing. CSRF does not apply: agents authenticate with headers, not a cookie.
A wrong method is a JSON 405 (`allow_methods`), like every other answer of the API.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from poolsadmin.agents.liveness import HEARING_HEADER, hearing_proof, hearing_touch
from poolsadmin.agents.nudge import MAX_WAIT_SECONDS
from poolsadmin.agents.services import agent_heartbeat_wait, agent_register
from poolsadmin.api.agent_auth import (
    AGENT_SECRET_HEADER,
    pool_task,
    pool_task_check,
    pool_token_required,
    request_agent,
    token_pool,
)
from poolsadmin.api.http import allow_methods, field_number, field_str, json_body, json_errors
from poolsadmin.lib.errors import Forbidden, InvalidInput
from poolsadmin.tasks.models import WorkspaceTask
from poolsadmin.tasks.services import task_accept, task_report


def task_json(task: WorkspaceTask) -> dict[str, Any]:
    return {
        "task_id": task.pk,
        "workspace_id": task.workspace_id,
        "task_type": task.task_type,
        "status": task.status,
        "stage": task.stage,
        "action": "apply" if task.is_applying else "plan",
        "agent_id": task.agent_id,
        "pod": task.pod_name or None,
        "slot": task.slot_index,
        "reuse_workdir": task.reuse_workdir,
    }


def _client_ip(request: HttpRequest) -> str | None:
    # Only the socket's address: X-Forwarded-For is whatever the client wants it to be.
    raw = request.META.get("REMOTE_ADDR") or ""
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return None


# A heartbeat's figures (agents/reference.py `_usage`): the load average and the peak memory
# in MiB. Bounds far past any host: only garbage is refused (NaN, Infinity, 10**400).
CPU_MAX = 1e6
MEMORY_MAX = 1e9
# An agent runs at most its pod's slots at once (pools.models.MAX_SLOTS_PER_POD); a longer list
# is garbage, and each id is compared with every task the agent holds.
MAX_RUNNING_TASK_IDS = 1000
TASK_ID_MAX = 2**63 - 1  # the BigAutoField's range


def _task_ids(data: dict[str, Any], name: str) -> list[int]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= TASK_ID_MAX
        for item in value
    ):
        raise InvalidInput(f"{name} must be a list of task ids (positive integers)", field=name)
    if len(value) > MAX_RUNNING_TASK_IDS:
        raise InvalidInput(f"{name} lists more than {MAX_RUNNING_TASK_IDS} tasks", field=name)
    return value


@allow_methods("POST")
@json_errors
@pool_token_required
def register(request: HttpRequest, pool_id: str) -> HttpResponse:
    data = json_body(request)
    registration = agent_register(
        pool=token_pool(pool_id=pool_id),
        name=field_str(data, "name"),
        version=field_str(data, "version", required=False),
        ip=_client_ip(request),
        # Registering again under a taken name proves it is that agent (its secret), or in a
        # k8s pool a new pod of that name (its uid, as the cluster reports it).
        secret=request.headers.get(AGENT_SECRET_HEADER, "").strip(),
        pod_uid=field_str(data, "pod_uid", required=False),
        # The agent's own new secret: sent again unchanged, a retry of a registration whose
        # answer was lost proves itself with it.
        proposed_secret=field_str(data, "agent_secret", required=False),
    )
    response = JsonResponse(
        {
            "agent_id": registration.agent.agent_id,
            "pool_id": pool_id,
            "agent_secret": registration.secret,
        }
    )
    response["Cache-Control"] = "no-store"  # the secret is shown once; keep it out of caches
    return response


@allow_methods("POST")
@json_errors
@pool_token_required
def heartbeat(request: HttpRequest, pool_id: str, agent_id: str) -> HttpResponse:
    agent = request_agent(request, pool_id=pool_id, agent_id=agent_id)
    data = json_body(request)
    running = _task_ids(data, "running_task_ids")
    cpu = field_number(data, "cpu", low=0, high=CPU_MAX)
    memory = field_number(data, "memory", low=0, high=MEMORY_MAX)
    wait = field_number(data, "wait", low=0, high=MAX_WAIT_SECONDS)
    answer = agent_heartbeat_wait(
        agent=agent, running_task_ids=running, cpu=cpu, memory=memory, wait=wait or 0.0
    )
    body: dict[str, Any] = {
        "assignments": answer.assignments,
        "cancellations": answer.cancellations,
    }
    # An agent that asks no wait gets the answer it always got; so does one whose wait this
    # process cannot hold now (answer.held: the agent paces itself by its interval).
    if wait is not None and answer.held:
        body["woken"] = answer.woken
    return JsonResponse(body)


@allow_methods("POST")
@json_errors
@pool_token_required
def accept(request: HttpRequest, pool_id: str, task_id: int) -> HttpResponse:
    data = json_body(request)
    agent = request_agent(request, pool_id=pool_id, agent_id=field_str(data, "agent_id"))
    pool_task_check(pool_id=pool_id, task_id=task_id)
    return JsonResponse(task_json(task_accept(task_id=task_id, agent=agent)))


@allow_methods("PUT")
@json_errors
@pool_token_required
def report(request: HttpRequest, pool_id: str, task_id: int) -> HttpResponse:
    data = json_body(request)
    agent = request_agent(request, pool_id=pool_id, agent_id=field_str(data, "agent_id"))
    status = field_str(data, "status")
    stage = field_str(data, "stage", required=False)
    error_message = field_str(data, "error_message", required=False)
    pool_task_check(pool_id=pool_id, task_id=task_id)
    task = task_report(
        task_id=task_id, agent=agent, status=status, stage=stage, error_message=error_message
    )
    return JsonResponse(task_json(task))


@allow_methods("GET")
@json_errors
@pool_token_required
def detail(request: HttpRequest, pool_id: str, task_id: int) -> HttpResponse:
    # A GET names no agent in its URL or body, so the agent names itself in X-Agent-Id. Any
    # agent of the pool may read any task of the pool; only updates are the assignee's.
    request_agent(request, pool_id=pool_id)
    return JsonResponse(task_json(pool_task(pool_id=pool_id, task_id=task_id)))


@allow_methods("POST")
@json_errors
def hearing(request: HttpRequest) -> HttpResponse:
    """The web processes' keeper, by the agents' own route: poolsadmin can hear agents now
    (agents/liveness.py). Only poolsadmin may say so: the header proves it knows SECRET_KEY."""
    proof = request.headers.get(HEARING_HEADER, "")
    if not hmac.compare_digest(proof.encode(), hearing_proof().encode()):
        raise Forbidden(f"missing or wrong {HEARING_HEADER} header", field=HEARING_HEADER)
    hearing_touch(actor="system:web")
    return HttpResponse(status=204)
