"""The pool page of a big pool: the slot map, which pods get cards (filter, sort, pages, one
on demand), bad parameters, the live regions of a view, and the query count."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from poolsadmin.dashboard.live import pool_live_html
from poolsadmin.dashboard.pool_view import ALL_CARDS_UP_TO, CARDS_PER_PAGE, PoolView
from poolsadmin.dashboard.selectors import dashboard_pool
from poolsadmin.lib import clock
from poolsadmin.pools.actions import pod_drain, pod_undrain
from poolsadmin.pools.models import AgentPool, Pod, Slot
from poolsadmin.realtime.consumers import _view_of
from poolsadmin.scheduler.diagnosis import task_diagnose
from poolsadmin.tasks.models import WorkspaceTask
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    run,
    submit,
)

pytestmark = pytest.mark.django_db

PODS = ALL_CARDS_UP_TO + 16  # above the size at which every pod gets a card


@dataclass(frozen=True)
class Fleet:
    pool: AgentPool
    reserved_pod: Pod  # holds the reservation (and, bin-packed, three running plans)
    older_reservation_pod: Pod  # a reservation held for longer, on the offline pod
    draining_pod: Pod
    offline_pod: Pod
    task: WorkspaceTask  # the reservation on reserved_pod


@pytest.fixture
def fleet() -> Fleet:
    pool = make_pool(plan_and_apply_per_pod=1)
    pods = [pod_of(make_agent(pool, f"pod-{i:02d}")) for i in range(PODS - 1)]
    with clock.frozen_at(clock.now() - timedelta(hours=1)):
        # Silent since it registered an hour ago.
        offline = pod_of(make_agent(pool, "pod-gone"))
        # Planned an hour ago, when this agent was still heard: bin-packing puts it on the
        # oldest pod, this one.
        older = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    task = plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    for _ in range(3):
        run(submit(make_workspace(pool), "plan"))
    pod_drain(pod_id=pods[-1].pk, actor="user:test", reason="node maintenance")
    return Fleet(
        pool=pool,
        reserved_pod=Pod.objects.get(pk=Slot.objects.get(task_id=task.pk).pod_id),
        older_reservation_pod=Pod.objects.get(pk=Slot.objects.get(task_id=older.pk).pod_id),
        draining_pod=pods[-1],
        offline_pod=offline,
        task=task,
    )


def _page(client: Client, pool: AgentPool, query: str = "", **headers: str) -> str:
    url = reverse("pools-detail", args=[pool.pool_id]) + (f"?{query}" if query else "")
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _cards(html: str) -> list[str]:
    return re.findall(
        r'<article class="card pod[^"]*" id="pod-\d+" tabindex="-1" aria-label="Pod ([^"]+)"', html
    )


def test_a_big_pool_maps_every_slot_and_cards_only_the_pods_that_need_attention(
    viewer_client: Client, fleet: Fleet
) -> None:
    html = _page(viewer_client, fleet.pool)

    slot_map = re.search(r'<ol class="slot-map".*?</ol>', html, flags=re.S)
    assert slot_map is not None
    assert slot_map.group().count("<li") == PODS
    # Cells: 4 per pod, of them 2 reserved, 3 running.
    assert slot_map.group().count('<a class="v"') == 2
    assert slot_map.group().count('<i class="r">') == 3
    assert slot_map.group().count("<i></i>") == PODS * 4 - 5
    assert slot_map.group().count('<li class="o">') == 1
    assert slot_map.group().count('<li class="d">') == 1
    assert sorted(_cards(html)) == sorted(
        {
            fleet.reserved_pod.name,
            fleet.older_reservation_pod.name,
            fleet.draining_pod.name,
            fleet.offline_pod.name,
        }
    )
    assert "pods that need attention" in html


def test_a_reserved_cell_of_the_map_names_its_owner_and_age_and_links_its_pod(
    viewer_client: Client, fleet: Fleet
) -> None:
    html = _page(viewer_client, fleet.pool)
    slot = Slot.objects.get(task_id=fleet.task.pk)
    cell = re.search(
        rf'<a class="v" id="map-slot-{slot.pk}" href="([^"]+)" aria-label="([^"]+)"', html
    )
    assert cell is not None
    href, label = cell.groups()
    assert href == f"?pod={slot.pod_id}#pod-{slot.pod_id}"
    assert (
        f"{fleet.reserved_pod.name} slot {slot.index}: reserved for task #{fleet.task.pk}" in label
    )
    assert fleet.task.workspace_id in label
    assert re.search(r"\) for \d+ s$", label), label


def test_a_small_pool_still_shows_every_pods_card(viewer_client: Client) -> None:
    pool = make_pool()
    for i in range(3):
        make_agent(pool, f"small-{i}")
    assert sorted(_cards(_page(viewer_client, pool))) == ["small-0", "small-1", "small-2"]


@pytest.mark.parametrize(
    ("show", "expected"),
    [
        ("reserved", {"reserved_pod", "older_reservation_pod"}),
        ("draining", {"draining_pod"}),
        ("offline", {"offline_pod"}),
    ],
)
def test_the_filter_shows_the_pods_in_one_state(
    viewer_client: Client, fleet: Fleet, show: str, expected: set[str]
) -> None:
    html = _page(viewer_client, fleet.pool, f"show={show}")
    assert sorted(_cards(html)) == sorted({getattr(fleet, name).name for name in expected})


def test_the_idle_filter_shows_only_fully_idle_pods_a_page_at_a_time(
    viewer_client: Client, fleet: Fleet
) -> None:
    first = _cards(_page(viewer_client, fleet.pool, "show=idle"))
    second = _cards(_page(viewer_client, fleet.pool, "show=idle&page=2"))
    idle = PODS - 2  # every pod but the two with reservations (running plans sit on them)
    assert len(first) == CARDS_PER_PAGE
    assert len(second) == idle - CARDS_PER_PAGE
    assert not set(first) & set(second)
    assert fleet.reserved_pod.name not in first + second
    # A page past the last one shows the last one.
    assert _cards(_page(viewer_client, fleet.pool, "show=idle&page=99")) == second


def test_sorting_by_reservation_age_puts_the_oldest_reservation_first(
    viewer_client: Client, fleet: Fleet
) -> None:
    html = _page(viewer_client, fleet.pool, "show=reserved&sort=reservation")
    assert _cards(html) == [fleet.older_reservation_pod.name, fleet.reserved_pod.name]


def test_the_name_filter_and_one_pods_card_on_demand(viewer_client: Client, fleet: Fleet) -> None:
    assert _cards(_page(viewer_client, fleet.pool, "show=all&q=POD-0")) == [
        f"pod-{i:02d}" for i in range(10)
    ]
    healthy = Pod.objects.get(pool=fleet.pool, name="pod-30")
    html = _page(viewer_client, fleet.pool, f"pod={healthy.pk}")
    assert "pod-30" in _cards(html)
    assert 'class="pod-grid pod-pinned"' in html


@pytest.mark.parametrize(
    ("query", "field"),
    [("show=bogus", "show"), ("sort=age", "sort"), ("page=0", "page"), ("pod=x", "pod")],
)
def test_a_bad_view_parameter_is_a_400_naming_it(
    viewer_client: Client, fleet: Fleet, query: str, field: str
) -> None:
    url = reverse("pools-detail", args=[fleet.pool.pool_id]) + f"?{query}"
    response = viewer_client.get(url)
    assert response.status_code == 400
    assert f'data-field="{field}"' in response.content.decode()


def test_the_socket_and_the_poller_follow_the_pages_view(
    viewer_client: Client, fleet: Fleet
) -> None:
    html = _page(viewer_client, fleet.pool, "show=reserved&sort=reservation&q=")
    query = "show=reserved&amp;sort=reservation"
    assert f'ws-connect="/ws/pools/{fleet.pool.pool_id}/?{query}"' in html
    assert f'hx-get="/pools/{fleet.pool.pool_id}/?{query}"' in html


def test_the_live_html_of_a_view_is_what_a_poll_of_that_view_gets(
    viewer_client: Client, fleet: Fleet, viewer: User
) -> None:
    view = _view_of(b"show=reserved&sort=reservation")
    assert view == PoolView(show="reserved", sort="reservation")
    # A hand-made query string that does not parse gets the default view.
    assert _view_of(b"show=%00") == PoolView()
    with clock.frozen_at(clock.now()):
        polled = _page(
            viewer_client, fleet.pool, "show=reserved&sort=reservation", **{"HX-Request": "true"}
        )
        pushed = pool_live_html(pool_id=fleet.pool.pool_id, user=viewer, view=view)
    assert pushed == polled
    assert len(_cards(pushed)) == 2


@pytest.mark.parametrize("query", ["", "show=all&page=2", "show=reserved&sort=busy", "pod=1"])
def test_every_view_runs_as_many_queries_at_40_pods_as_at_3(
    viewer_client: Client, query: str
) -> None:
    def queries(pool: AgentPool) -> int:
        with CaptureQueriesContext(connection) as captured:
            _page(viewer_client, pool, query)
        return len(captured)

    small, big = make_pool(name="small"), make_pool(name="big")
    for pool, pods in ((small, 3), (big, 40)):
        for i in range(pods):
            make_agent(pool, f"{pool.name}-{i}")
        plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
        run(submit(make_workspace(pool), "plan"))
        submit(make_workspace(pool), "drift_check")
    assert queries(big) == queries(small)


def test_the_queue_costs_as_many_queries_with_many_waiting_tasks_as_with_one(
    viewer_client: Client,
) -> None:
    """The queue's diagnoses read rule 2's heads, the planners' names, the reserved slots and
    the liveness once for the page, not once per waiting task (a nightly drift check puts
    hundreds of tasks in the queue of a big pool)."""

    def queries(pool: AgentPool) -> int:
        with CaptureQueriesContext(connection) as captured:
            _page(viewer_client, pool, "")
        return len(captured)

    few, many = make_pool(name="few"), make_pool(name="many")
    for pool, n in ((few, 1), (many, 4)):
        for i in range(2 * n):  # one plan_and_apply per pod
            make_agent(pool, f"{pool.name}-{i}")
        for _ in range(n):
            # Awaiting confirmation, holding a reserved slot (the founding incident's shape).
            plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
            ws = make_workspace(pool)
            waiting = plan_with_changes(submit(ws, "plan_and_apply"))
            submit(ws, "plan_and_apply")  # rule 2: waits for the one before it
            submit(make_workspace(pool), "drift_check")
            assert waiting.status == "apply_pending"
    assert queries(many) == queries(few)


def test_the_queue_names_the_pod_the_scheduler_would_take(viewer_client: Client) -> None:
    """The page keeps its pods oldest first, but a queued task's diagnosis names the pod the
    scheduler would pick: the busiest (bin-packing), as the task's own page says."""
    pool = make_pool(name="binpack")
    older = make_agent(pool, "older")
    make_agent(pool, "newer")
    pod_drain(pod_id=pod_of(older).pk, actor="user:test", reason="test")
    run(submit(make_workspace(pool), "plan"))  # on the newer pod: the older one drains
    pod_undrain(pod_id=pod_of(older).pk, actor="user:test", reason="test")
    waiting = submit(make_workspace(pool), "plan")

    with clock.frozen_at(clock.now()):
        page = dashboard_pool(pool_id=pool.pool_id)
        alone = task_diagnose(task=WorkspaceTask.objects.get(pk=waiting.pk))
    assert [entry.task.pk for entry in page.queue] == [waiting.pk]
    assert "places it on newer" in alone.text
    assert page.queue[0].diagnosis == alone
