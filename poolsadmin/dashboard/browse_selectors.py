"""Reads for the dashboard's browse pages: a workspace, the agents, the audit log, search.

Each page runs a fixed number of queries whatever the number of rows (related rows are
joined, never fetched per row), so a long audit log or a big fleet costs no more round trips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from django.core.paginator import Page, Paginator
from django.db.models import Q
from django.urls import reverse

from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput, NotFound
from poolsadmin.pools.models import AgentPool, Pod
from poolsadmin.pools.selectors import agent_is_online
from poolsadmin.tasks.models import Workspace, WorkspaceTask

# Tasks shown on a workspace page: old history is in the audit log.
WORKSPACE_TASK_LIMIT = 100
AUDIT_PAGE_SIZE = 50
# A task number as people type it (`598`, `#598`), in the search box and the audit filter.
_TASK_RE = re.compile(r"^#?(\d{1,18})$")


# --- workspace ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkspacePage:
    workspace: Workspace
    tasks: list[WorkspaceTask]
    limit: int


def dashboard_workspace(*, workspace_id: str) -> WorkspacePage:
    """The workspace, its lock and its newest tasks. Two queries."""
    workspace = (
        Workspace.objects.select_related("current_pool", "lock_task")
        .filter(pk=workspace_id)
        .first()
    )
    if workspace is None:
        raise NotFound(f"workspace {workspace_id} not found")
    tasks = list(
        WorkspaceTask.objects.filter(workspace=workspace)
        .select_related("agent")
        .order_by("-created_at", "-id")[:WORKSPACE_TASK_LIMIT]
    )
    return WorkspacePage(workspace=workspace, tasks=tasks, limit=WORKSPACE_TASK_LIMIT)


# --- agents ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentRow:
    agent: Agent
    online: bool
    pod: Pod | None


@dataclass(frozen=True)
class AgentsPage:
    rows: list[AgentRow]
    pools: list[AgentPool]
    pool_id: str
    agent: str


def dashboard_agents(
    *, pool_id: str = "", agent: str = "", now: datetime | None = None
) -> AgentsPage:
    """Every agent (or a pool's, or one by name or id) with its heartbeat judged against its
    pool's timeout, not the stored status word. Two queries: the agents with their pool and
    pod joined, and the pools for the filter."""
    now = now or clock.now()
    agents = Agent.objects.select_related("pool", "pod").order_by("pool__name", "agent_name")
    if pool_id:
        agents = agents.filter(pool_id=pool_id)
    if agent:
        agents = agents.filter(Q(agent_name=agent) | Q(agent_id=agent))
    rows = []
    for row in agents:
        pod = getattr(row, "pod", None)  # reverse one-to-one: raises when there is none
        rows.append(
            AgentRow(agent=row, online=agent_is_online(agent=row, pool=row.pool, now=now), pod=pod)
        )
    pools = list(AgentPool.objects.order_by("name").only("pool_id", "name"))
    return AgentsPage(rows=rows, pools=pools, pool_id=pool_id, agent=agent)


# --- audit log ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilters:
    actor: str = ""
    kind: str = ""
    pool: str = ""
    task: str = ""
    workspace: str = ""

    def querystring(self) -> str:
        """The filters as a query string, for the pager links."""
        return urlencode({k: v for k, v in vars(self).items() if v})


def dashboard_audit(*, filters: AuditFilters, page: str | int | None = 1) -> Page[Event]:
    """The event log newest first. Two queries: the count and the page."""
    events = Event.objects.order_by("-at", "-id")
    if filters.actor:
        events = events.filter(actor=filters.actor)
    if filters.kind:
        events = events.filter(kind__startswith=filters.kind)
    if filters.pool:
        events = events.filter(pool_id=filters.pool)
    if filters.task:
        # Refused rather than matching nothing: "no events" would hide the typo. A task
        # number as the search box takes it (`598`, `#598`); isdigit() also passed "²".
        match = _TASK_RE.match(filters.task)
        if match is None:
            raise InvalidInput("Task must be a task number, such as 598", field="task")
        events = events.filter(task_id=int(match.group(1)))
    if filters.workspace:
        events = events.filter(workspace_id=filters.workspace)
    return Paginator(events, AUDIT_PAGE_SIZE).get_page(page)


# --- search ------------------------------------------------------------------------------------


def dashboard_search(*, query: str) -> str | None:
    """Where the search box should jump to, or None when nothing matches: a task by number
    (`598`, `#598`), a workspace (`ws-...`), a pool (`pool-...`), a pod's pool by pod name,
    or the agents page filtered for an agent name or id."""
    query = query.strip()
    if not query:
        return None
    if match := _TASK_RE.match(query):
        task_id = int(match.group(1))
        if WorkspaceTask.objects.filter(pk=task_id).exists():
            return reverse("tasks-detail", args=[task_id])
        return None
    if query.startswith("ws-") and Workspace.objects.filter(pk=query).exists():
        return reverse("workspaces-detail", args=[query])
    if query.startswith("pool-") and AgentPool.objects.filter(pk=query).exists():
        return reverse("pools-detail", args=[query])
    pod = Pod.objects.filter(name=query).order_by("id").first()
    if pod is not None:
        return reverse("pools-detail", args=[pod.pool_id])
    if Agent.objects.filter(Q(agent_name=query) | Q(agent_id=query)).exists():
        return reverse("agents-list") + "?" + urlencode({"agent": query})
    return None
