"""The server-rendered dashboard pages: access, content, and the pool page's query count."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Group, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from poolsadmin.dashboard.live import LIVE_REGIONS, live_regions, pool_live_html
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    INCIDENT_WORKSPACE_ID,
    demo_seed,
)
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool
from tests.ledger import (
    finish,
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    run,
    submit,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer_client(client: Client) -> Client:
    user = User.objects.create_user(username="vera")
    user.groups.add(Group.objects.get(name="viewer"))
    client.force_login(user)
    return client


@pytest.fixture
def no_role_client(client: Client) -> Client:
    client.force_login(User.objects.create_user(username="nobody"))
    return client


@pytest.fixture
def seeded(settings, tmp_path) -> AgentPool:
    settings.VAR_DIR = tmp_path
    return demo_seed().pool


def page_urls() -> list[str]:
    return [
        reverse("pools-list"),
        reverse("pools-detail", args=[DEMO_POOL_ID]),
        reverse("tasks-detail", args=[INCIDENT_TASK_ID]),
    ]


def test_the_root_redirects_to_the_pools_list(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == reverse("pools-list")


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", range(3))
def test_each_page_renders_for_a_viewer(viewer_client: Client, index: int) -> None:
    response = viewer_client.get(page_urls()[index])
    assert response.status_code == 200
    assert b"<h1>" in response.content


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", range(3))
def test_each_page_sends_an_anonymous_visitor_to_the_login(client: Client, index: int) -> None:
    url = page_urls()[index]
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", range(3))
def test_each_page_is_forbidden_to_a_user_without_a_role(
    no_role_client: Client, index: int
) -> None:
    assert no_role_client.get(page_urls()[index]).status_code == 403


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", range(3))
def test_each_page_refuses_post(viewer_client: Client, index: int) -> None:
    assert viewer_client.post(page_urls()[index]).status_code == 405


def test_unknown_pool_and_task_are_404(viewer_client: Client) -> None:
    unknown_pool = reverse("pools-detail", args=["pool-nosuchpool00000"])
    assert viewer_client.get(unknown_pool).status_code == 404
    assert viewer_client.get(reverse("tasks-detail", args=[999999])).status_code == 404


def test_the_login_page_renders(client: Client) -> None:
    response = client.get(reverse("login"))
    assert response.status_code == 200
    assert b'name="password"' in response.content


def _reserved_cells(html: str) -> list[str]:
    return re.findall(r'<li class="slot slot-reserved"[^>]*>(.*?)</li>', html, flags=re.S)


def test_the_pool_page_shows_task_598_reserved_with_its_owner(
    viewer_client: Client, seeded: AgentPool
) -> None:
    response = viewer_client.get(reverse("pools-detail", args=[seeded.pool_id]))
    html = response.content.decode()

    cells = _reserved_cells(html)
    assert len(cells) == 1
    cell = cells[0]
    assert "Reserved" in cell
    assert f"#{INCIDENT_TASK_ID}" in cell
    assert INCIDENT_WORKSPACE_ID in cell
    assert "Planned by <strong>prod-agents-7xk2p</strong>" in cell
    assert "Waits for an admin to confirm the apply" in cell
    assert "expires in" in cell
    # The queue explains both the incident and the task blocked behind it.
    assert "awaiting_confirmation" in html
    assert f"plan_and_apply #{INCIDENT_TASK_ID} of this workspace is apply_pending" in html


def test_the_pools_list_shows_counts_and_health(viewer_client: Client, seeded: AgentPool) -> None:
    html = viewer_client.get(reverse("pools-list")).content.decode()
    assert seeded.name in html
    assert "1 reserved" in html
    assert "7 idle" in html
    assert "healthy" in html


def test_the_task_page_shows_the_diagnosis_and_the_timeline(
    viewer_client: Client, seeded: AgentPool
) -> None:
    html = viewer_client.get(reverse("tasks-detail", args=[INCIDENT_TASK_ID])).content.decode()
    assert "apply_pending" in html
    assert "awaiting_confirmation" in html
    assert "prod-agents-7xk2p[0]" in html
    for kind in ("task.submitted", "task.dispatched", "task.apply_pending", "slot.reserved"):
        assert kind in html


def _pool_page_queries(client: Client, pool: AgentPool) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("pools-detail", args=[pool.pool_id]))
    assert response.status_code == 200
    return len(queries)


def test_the_pool_page_runs_the_same_number_of_queries_for_2_and_200_pods(
    viewer_client: Client,
) -> None:
    pool = make_pool()
    for i in range(2):
        make_agent(pool, f"pod-{i}")
    plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    for _ in range(2):
        run(submit(make_workspace(pool), "plan"))
    # The same queue in both measurements: its diagnoses cost queries per task, not per pod.
    for _ in range(2):
        submit(make_workspace(pool), "plan")
    submit(make_workspace(pool), "drift_check")
    two_pods = _pool_page_queries(viewer_client, pool)

    for i in range(2, 200):
        make_agent(pool, f"pod-{i}")
    extra = [submit(make_workspace(pool), "plan") for _ in range(12)]
    for task in extra:
        run(task)
    many_pods = _pool_page_queries(viewer_client, pool)

    assert many_pods == two_pods


# --- live regions -------------------------------------------------------------------------------


def test_htmx_polling_the_pool_page_gets_only_its_live_regions(
    viewer_client: Client, seeded: AgentPool
) -> None:
    response = viewer_client.get(
        reverse("pools-detail", args=[seeded.pool_id]), HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert live_regions(html) is not None  # each region once, in order, swapped out of band
    assert len(_reserved_cells(html)) == 1
    assert f"#{INCIDENT_TASK_ID}" in html


def test_the_full_pool_page_holds_each_live_region_once_and_connects_its_socket(
    viewer_client: Client, seeded: AgentPool
) -> None:
    html = viewer_client.get(reverse("pools-detail", args=[seeded.pool_id])).content.decode()
    for region in LIVE_REGIONS:
        assert html.count(f'id="{region}"') == 1
    assert f'ws-connect="/ws/pools/{seeded.pool_id}/"' in html
    assert 'hx-trigger="every 5s [!poolsadmin.liveConnected()], poolsadmin:refresh"' in html
    # Without JavaScript the page still refreshes itself.
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in html


def test_htmx_polling_the_task_page_gets_only_its_live_region(
    viewer_client: Client, seeded: AgentPool
) -> None:
    response = viewer_client.get(
        reverse("tasks-detail", args=[INCIDENT_TASK_ID]), HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html
    assert html.count('id="task-live" class="stack" hx-swap-oob="true"') == 1
    assert "awaiting_confirmation" in html
    # The messages of an action stay outside the region a refresh replaces.
    assert 'id="messages"' not in html


def test_the_live_html_pushed_over_the_socket_is_what_a_poll_gets(
    viewer_client: Client, seeded: AgentPool
) -> None:
    user = User.objects.get(username="vera")
    # The same moment for both, since the regions show ages.
    with clock.frozen_at(clock.now()):
        polled = viewer_client.get(
            reverse("pools-detail", args=[seeded.pool_id]), HTTP_HX_REQUEST="true"
        ).content.decode()
        pushed = pool_live_html(pool_id=seeded.pool_id, user=user)
    assert pushed == polled


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("index", range(3))
def test_pages_vary_on_hx_request_so_no_cache_serves_a_fragment_as_a_page(
    viewer_client: Client, index: int
) -> None:
    for headers in ({}, {"HX-Request": "true"}):
        response = viewer_client.get(page_urls()[index], headers=headers)
        assert "HX-Request" in response["Vary"]


def test_a_finished_tasks_page_stops_polling(viewer_client: Client) -> None:
    pool = make_pool()
    make_agent(pool, "pod-0")
    running = run(submit(make_workspace(pool), "plan"))
    url = reverse("tasks-detail", args=[running.pk])
    assert 'hx-trigger="every 10s' in viewer_client.get(url).content.decode()

    finish(running)
    html = viewer_client.get(url, headers={"HX-Request": "true"}).content.decode()

    assert '<div id="live-poller" hidden hx-swap-oob="true"></div>' in html
    assert "every 10s" not in html
