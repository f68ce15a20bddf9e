"""The dashboard's browse pages: a workspace, the agents, the audit log and the search box."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    INCIDENT_WORKSPACE_ID,
    demo_seed,
)
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool
from poolsadmin.tasks.models import Workspace
from tests.ledger import make_agent, make_pool, make_workspace, pod_of, submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def no_role_client(client: Client) -> Client:
    client.force_login(User.objects.create_user(username="nobody"))
    return client


@pytest.fixture
def seeded(settings: Any, tmp_path: Path) -> AgentPool:
    settings.VAR_DIR = tmp_path
    return demo_seed().pool


def page_urls() -> list[str]:
    return [
        reverse("workspaces-detail", args=[INCIDENT_WORKSPACE_ID]),
        reverse("agents-list"),
        reverse("audit-list"),
        reverse("search") + "?q=nothing-like-this",
    ]


PAGES = range(4)


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", PAGES)
def test_each_browse_page_renders_for_a_viewer(viewer_client: Client, index: int) -> None:
    response = viewer_client.get(page_urls()[index])
    assert response.status_code == 200
    assert b"<h1>" in response.content


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", PAGES)
def test_each_browse_page_sends_an_anonymous_visitor_to_the_login(
    client: Client, index: int
) -> None:
    url = page_urls()[index]
    response = client.get(url)
    assert response.status_code == 302
    path, _, query = str(response["Location"]).partition("?")
    assert path == reverse("login")
    assert parse_qs(query)["next"] == [url]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", PAGES)
def test_each_browse_page_is_forbidden_to_a_user_without_a_role(
    no_role_client: Client, index: int
) -> None:
    assert no_role_client.get(page_urls()[index]).status_code == 403


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", PAGES)
def test_each_browse_page_refuses_post(viewer_client: Client, index: int) -> None:
    assert viewer_client.post(page_urls()[index]).status_code == 405


def test_an_unknown_workspace_is_404(viewer_client: Client) -> None:
    url = reverse("workspaces-detail", args=["ws-nosuchworkspace"])
    assert viewer_client.get(url).status_code == 404


def test_the_header_has_the_search_box_and_the_new_links(viewer_client: Client) -> None:
    content = viewer_client.get(reverse("agents-list")).content.decode()
    assert f'action="{reverse("search")}"' in content
    assert f'href="{reverse("audit-list")}"' in content


# --- workspace -------------------------------------------------------------------------------


def test_the_workspace_page_shows_the_lock_and_the_tasks_newest_first(
    viewer_client: Client, seeded: AgentPool
) -> None:
    content = viewer_client.get(
        reverse("workspaces-detail", args=[INCIDENT_WORKSPACE_ID])
    ).content.decode()
    assert INCIDENT_WORKSPACE_ID in content
    assert seeded.name in content
    assert reverse("tasks-detail", args=[INCIDENT_TASK_ID]) in content


def test_the_workspace_page_lists_tasks_newest_first(viewer_client: Client) -> None:
    pool = make_pool()
    workspace = make_workspace(pool)
    first, second = submit(workspace), submit(workspace)
    content = viewer_client.get(
        reverse("workspaces-detail", args=[workspace.workspace_id])
    ).content.decode()
    assert content.index(f">#{second.pk}<") < content.index(f">#{first.pk}<")
    assert "not locked" in content


def test_the_workspace_page_shows_who_holds_the_lock_and_why(viewer_client: Client) -> None:
    workspace = make_workspace(make_pool())
    task = submit(workspace, "plan_and_apply")
    # Set up the lock directly: the apply that takes it needs a whole dispatch to get there.
    Workspace.objects.filter(pk=workspace.pk).update(
        is_locked=True,
        locked_by="system:worker",
        locked_at=clock.now(),
        lock_reason="Locked for apply",
        lock_task=task,
    )
    content = viewer_client.get(
        reverse("workspaces-detail", args=[workspace.workspace_id])
    ).content.decode()
    assert "system:worker" in content
    assert "Locked for apply" in content
    assert f'href="{reverse("tasks-detail", args=[task.pk])}">task #{task.pk}' in content


# --- agents ----------------------------------------------------------------------------------


def test_the_agents_page_shows_each_agent_online_with_its_pod(viewer_client: Client) -> None:
    pool = make_pool(name="alpha")
    agent = make_agent(pool, "runner-1")
    content = viewer_client.get(reverse("agents-list")).content.decode()
    assert "runner-1" in content
    assert agent.agent_id in content
    assert pod_of(agent).name in content
    assert "status-online" in content


def test_the_agents_page_filters_by_pool(viewer_client: Client) -> None:
    alpha, beta = make_pool(name="alpha"), make_pool(name="beta")
    make_agent(alpha, "alpha-runner")
    make_agent(beta, "beta-runner")
    content = viewer_client.get(reverse("agents-list"), {"pool": alpha.pool_id}).content.decode()
    assert "alpha-runner" in content
    assert "beta-runner" not in content


def _agents_page_queries(client: Client) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(reverse("agents-list")).status_code == 200
    return len(queries)


def test_the_agents_page_runs_the_same_number_of_queries_for_2_and_20_agents(
    viewer_client: Client, django_assert_num_queries: Any
) -> None:
    pool = make_pool()
    for i in range(2):
        make_agent(pool, f"runner-{i}")
    two = _agents_page_queries(viewer_client)
    for i in range(2, 20):
        make_agent(pool, f"runner-{i}")
    with django_assert_num_queries(two):
        assert viewer_client.get(reverse("agents-list")).status_code == 200


# --- audit log -------------------------------------------------------------------------------


def _event(kind: str, **kwargs: object) -> None:
    kwargs.setdefault("actor", "user:alice")
    kwargs.setdefault("target_type", "pool")
    kwargs.setdefault("target_id", "pool-x")
    event_record(kind=kind, **kwargs)  # type: ignore[arg-type]


def test_the_audit_log_filters_by_actor_kind_prefix_pool_task_and_workspace(
    viewer_client: Client,
) -> None:
    _event("slot.released", actor="user:alice", pool_id="pool-a", reason="stuck-slot")
    _event("pool.paused", actor="user:bob", pool_id="pool-b", reason="maintenance")
    _event("task.cancelled", task_id=598, workspace_id="ws-abcdef", reason="by-ticket")

    def reasons(**params: str) -> set[str]:
        content = viewer_client.get(reverse("audit-list"), params).content.decode()
        return {r for r in ("stuck-slot", "maintenance", "by-ticket") if r in content}

    assert reasons() == {"stuck-slot", "maintenance", "by-ticket"}
    assert reasons(actor="user:bob") == {"maintenance"}
    assert reasons(kind="slot.") == {"stuck-slot"}
    assert reasons(pool="pool-a") == {"stuck-slot"}
    assert reasons(task="598") == {"by-ticket"}
    assert reasons(task="#598") == {"by-ticket"}
    assert reasons(workspace="ws-abcdef") == {"by-ticket"}


def test_the_audit_log_shows_newest_first_and_the_change(viewer_client: Client) -> None:
    _event("pool.scaled", reason="older-one", before={"desired": 2}, after={"desired": 5})
    _event("pool.scaled", reason="newer-one")
    content = viewer_client.get(reverse("audit-list")).content.decode()
    assert content.index("newer-one") < content.index("older-one")
    assert "2 → 5" in content


def test_the_audit_log_pages_by_50_and_keeps_the_filter(viewer_client: Client) -> None:
    for i in range(51):
        _event("slot.released", actor="user:alice", reason=f"r{i:03d}")
    first = viewer_client.get(reverse("audit-list"), {"actor": "user:alice"}).content.decode()
    assert "r050" in first and "r000" not in first
    assert "actor=user%3Aalice&amp;page=2" in first
    second = viewer_client.get(
        reverse("audit-list"), {"actor": "user:alice", "page": "2"}
    ).content.decode()
    assert "r000" in second and "r050" not in second


def _audit_page_queries(client: Client) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(reverse("audit-list")).status_code == 200
    return len(queries)


def test_the_audit_log_runs_the_same_number_of_queries_for_2_and_20_events(
    viewer_client: Client, django_assert_num_queries: Any
) -> None:
    for i in range(2):
        _event("slot.released", reason=f"r{i}")
    two = _audit_page_queries(viewer_client)
    for i in range(2, 20):
        _event(
            "slot.released", reason=f"r{i}", before={"state": "reserved"}, after={"state": "idle"}
        )
    with django_assert_num_queries(two):
        assert viewer_client.get(reverse("audit-list")).status_code == 200


# --- search ----------------------------------------------------------------------------------


def _search(client: Client, query: str) -> str:
    response = client.get(reverse("search"), {"q": query})
    assert response.status_code == 302, response.content
    return str(response["Location"])


@pytest.mark.parametrize("query", [str(INCIDENT_TASK_ID), f"#{INCIDENT_TASK_ID}"])
@pytest.mark.usefixtures("seeded")
def test_search_jumps_to_a_task_by_number(viewer_client: Client, query: str) -> None:
    assert _search(viewer_client, query) == reverse("tasks-detail", args=[INCIDENT_TASK_ID])


@pytest.mark.usefixtures("seeded")
def test_search_jumps_to_a_workspace_and_a_pool(viewer_client: Client) -> None:
    assert _search(viewer_client, INCIDENT_WORKSPACE_ID) == reverse(
        "workspaces-detail", args=[INCIDENT_WORKSPACE_ID]
    )
    assert _search(viewer_client, DEMO_POOL_ID) == reverse("pools-detail", args=[DEMO_POOL_ID])


def test_search_jumps_to_the_pool_of_a_pod_and_to_an_agent(viewer_client: Client) -> None:
    pool = make_pool()
    agent = make_agent(pool, "runner-7")
    pod = pod_of(agent)
    assert _search(viewer_client, pod.name) == reverse("pools-detail", args=[pool.pool_id])
    # In a static pool the pod is named after its agent, so the name finds the pod first.
    agents = reverse("agents-list")
    assert _search(viewer_client, agent.agent_id) == f"{agents}?agent={agent.agent_id}"
    content = viewer_client.get(_search(viewer_client, agent.agent_id)).content.decode()
    assert "runner-7" in content


def test_search_shows_nothing_found_with_the_query(viewer_client: Client) -> None:
    response = viewer_client.get(reverse("search"), {"q": "no-such-thing"})
    assert response.status_code == 200
    content = response.content.decode()
    assert "Nothing found" in content
    assert "no-such-thing" in content
    assert viewer_client.get(reverse("search"), {"q": "99999"}).status_code == 200


# --- htmx fragments: polls and filters swap only their region ------------------------------------

FRAGMENTS = [
    (lambda: reverse("pools-list"), "pool-list"),
    (lambda: reverse("workspaces-detail", args=[INCIDENT_WORKSPACE_ID]), "workspace-live"),
    (lambda: reverse("agents-list") + f"?pool={DEMO_POOL_ID}", "agents-results"),
    (lambda: reverse("audit-list") + "?kind=slot.", "audit-results"),
]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(("url", "region"), FRAGMENTS, ids=[r for _, r in FRAGMENTS])
def test_htmx_gets_only_the_pages_swappable_region(
    viewer_client: Client, url: Any, region: str
) -> None:
    response = viewer_client.get(url(), headers={"HX-Request": "true"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert html.strip().startswith(f'<div id="{region}"')
    assert html.count(f'id="{region}"') == 1


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(("url", "region"), FRAGMENTS, ids=[r for _, r in FRAGMENTS])
def test_the_full_page_holds_the_region_once(viewer_client: Client, url: Any, region: str) -> None:
    html = viewer_client.get(url()).content.decode()
    assert "<html" in html
    assert html.count(f'id="{region}"') == 1


@pytest.mark.usefixtures("seeded")
def test_a_history_restore_gets_the_whole_page(viewer_client: Client) -> None:
    """Back to a URL a filter pushed: htmx asks for the page to replace the body with."""
    response = viewer_client.get(
        reverse("audit-list") + "?kind=slot.",
        headers={"HX-Request": "true", "HX-History-Restore-Request": "true"},
    )
    assert "<html" in response.content.decode()


@pytest.mark.usefixtures("seeded")
def test_the_audit_filter_fragment_holds_only_matching_events(viewer_client: Client) -> None:
    html = viewer_client.get(
        reverse("audit-list") + "?kind=slot.", headers={"HX-Request": "true"}
    ).content.decode()
    assert "slot.reserved" in html
    assert "task.submitted" not in html
    assert "match this filter" in html
