"""The live pool page over WebSockets: service -> on_commit -> broadcast -> group `pool.<id>`
-> the pool's hub (fanout.py) -> pool_live_context + pool_live_render -> every socket.

pytest-asyncio is not a dependency: each test is sync and drives one coroutine with
async_to_sync. Services publish on commit and the consumer renders what they committed, so
these tests run with real transactions (django_db(transaction=True)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.contrib.sessions.models import Session
from django.db import transaction
from django.test import Client
from django.urls import reverse

from poolsadmin.asgi import application
from poolsadmin.dashboard import live
from poolsadmin.lib import clock
from poolsadmin.pools.actions import slot_release
from poolsadmin.pools.models import AgentPool, Pod, Slot
from poolsadmin.realtime import consumers, fanout
from poolsadmin.realtime.broadcast import broadcast_pool_changed, pool_group
from poolsadmin.realtime.consumers import CLOSE_FORBIDDEN, CLOSE_NO_POOL, CLOSE_NOT_LOGGED_IN
from poolsadmin.realtime.routing import websocket_urlpatterns
from poolsadmin.settings import redis_channel_layer
from poolsadmin.tasks.models import WorkspaceTask
from tests.ledger import (
    make_agent,
    make_pool,
    make_workspace,
    plan_with_changes,
    pod_of,
    submit,
)
from tests.redis_server import redis_or_skip

pytestmark = pytest.mark.django_db(transaction=True)

# Generous: the first render compiles the templates. The product promise is "within a
# second of a change", asserted separately where a change is made.
TIMEOUT = 5
REDIS_URL = "redis://127.0.0.1:6379/13"


@dataclass
class World:
    pool: AgentPool
    pod: Pod
    planned: WorkspaceTask  # apply_pending, holding a reserved slot
    reserved: Slot


@pytest.fixture
def world() -> World:
    pool = make_pool(name="blue")
    pod = pod_of(make_agent(pool, "P1"))
    planned = plan_with_changes(submit(make_workspace(pool, "infra"), "plan_and_apply"))
    return World(pool=pool, pod=pod, planned=planned, reserved=Slot.objects.get(task=planned))


def socket(pool_id: str, user: Any) -> WebsocketCommunicator:
    """A socket to the consumer through the routing, with `user` as AuthMiddleware sets it."""
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), ws_path(pool_id))
    communicator.scope["user"] = user
    return communicator


def ws_path(pool_id: str) -> str:
    return f"/ws/pools/{pool_id}/"


async def open_page(communicator: WebsocketCommunicator) -> str:
    """Connect and return the render the consumer sends on (re)connect."""
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    html: str = await communicator.receive_from(timeout=TIMEOUT)
    return html


async def refusal(communicator: WebsocketCommunicator) -> int:
    """The close code of a refused socket (accepted, then closed at once: see connect)."""
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    message = await communicator.receive_output(timeout=TIMEOUT)
    assert message["type"] == "websocket.close"
    code: int = message["code"]
    return code


def reserved_cells(html: str) -> list[str]:
    return re.findall(r'<li class="slot slot-reserved"[^>]*>(.*?)</li>', html, flags=re.S)


def release(slot: Slot) -> None:
    slot.refresh_from_db()
    slot_release(slot_id=slot.pk, actor="user:alice", reason="stuck", expected_version=slot.version)


# --- a change reaches the page -----------------------------------------------------------------


def admin_sees_the_release(world: World, user: User) -> None:
    async def scenario() -> None:
        page = socket(world.pool.pool_id, user)
        try:
            before = await open_page(page)
            assert 'id="slot-grid"' in before
            assert any(f"#{world.planned.pk}" in cell for cell in reserved_cells(before))

            await database_sync_to_async(release)(world.reserved)
            released_at = time.monotonic()
            after = await page.receive_from(timeout=TIMEOUT)
            # The product wants this within a second; a shared machine cannot promise one, so
            # the figure is printed, never asserted (the benchmarks measure it).
            print(f"release shown after {time.monotonic() - released_at:.3f} s")
            assert 'id="slot-grid"' in after
            assert world.pod.name in after
            assert reserved_cells(after) == []
        finally:
            await page.disconnect()

    async_to_sync(scenario)()


def test_an_admin_receives_the_pool_regions_after_a_slot_release_in_that_pool(
    world: World, admin: User
) -> None:
    admin_sees_the_release(world, admin)


def test_a_notify_socket_hears_only_that_the_pool_changed(world: World, viewer: User) -> None:
    """A task page of the pool: it refreshes its own region over HTTP on "changed"."""

    async def scenario() -> tuple[str, str]:
        communicator = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns), ws_path(world.pool.pool_id) + "?notify=1"
        )
        communicator.scope["user"] = viewer
        try:
            first = await open_page(communicator)
            await database_sync_to_async(release)(world.reserved)
            return first, await communicator.receive_from(timeout=TIMEOUT)
        finally:
            await communicator.disconnect()

    assert async_to_sync(scenario)() == (consumers.CHANGED, consumers.CHANGED)


def test_a_change_in_another_pool_sends_nothing(world: World, viewer: User) -> None:
    other = make_pool(name="green")

    async def scenario() -> None:
        page = socket(world.pool.pool_id, viewer)
        try:
            await open_page(page)
            await database_sync_to_async(make_agent)(other, "G1")
            assert await page.receive_nothing(timeout=0.5)

            # The socket was live all along: a change in its own pool does arrive.
            await database_sync_to_async(make_agent)(world.pool, "joined-later")
            assert "joined-later" in await page.receive_from(timeout=TIMEOUT)
        finally:
            await page.disconnect()

    async_to_sync(scenario)()


@pytest.fixture
def counted_renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every render the hub makes, made by the real pool_live_render."""
    renders: list[str] = []

    def counting(**kwargs: Any) -> str:
        html = live.pool_live_render(**kwargs)
        renders.append(html)
        return html

    monkeypatch.setattr(fanout, "pool_live_render", counting)
    return renders


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The views the hub read the ledger for, by the real pool_live_context."""
    reads: list[object] = []

    def counting(**kwargs: Any) -> dict[str, Any]:
        reads.append(kwargs["view"])
        return live.pool_live_context(**kwargs)

    monkeypatch.setattr(fanout, "pool_live_context", counting)
    return reads


def test_a_burst_of_twenty_events_yields_a_few_renders_and_the_last_is_final(
    world: World, viewer: User, counted_renders: list[str]
) -> None:
    workspace = make_workspace(world.pool, "burst")

    def burst() -> list[WorkspaceTask]:
        # One transaction, like a busy scheduler pass: 20 events published within a few ms.
        with transaction.atomic():
            return [submit(workspace) for _ in range(20)]

    async def scenario() -> tuple[list[str], WorkspaceTask, float]:
        page = socket(world.pool.pool_id, viewer)
        try:
            await open_page(page)
            counted_renders.clear()
            tasks = await database_sync_to_async(burst)()
            committed_at = time.monotonic()
            quiet = 4 * fanout.RENDER_WINDOW_SECONDS
            received = [await page.receive_from(timeout=TIMEOUT)]
            while not await page.receive_nothing(timeout=quiet):
                received.append(await page.receive_from(timeout=TIMEOUT))
            # receive_nothing waited `quiet` after the last message: not part of the path.
            return received, tasks[-1], time.monotonic() - quiet - committed_at
        finally:
            await page.disconnect()

    received, last_task, latency = async_to_sync(scenario)()

    # Coalesced: far fewer renders than events (one or two on a quiet machine; on a loaded
    # one the 20 publishes spread over several render windows), the last one final. How soon
    # is printed, never asserted: the machines are shared.
    assert len(received) <= 10
    assert len(received) == len(counted_renders)  # each render sent what changed
    assert f"#{last_task.pk}" in received[-1]
    print(f"burst of 20 shown after {latency:.3f} s in {len(received)} renders")


def test_without_events_the_page_is_rendered_again_and_its_group_joined_again(
    world: World, viewer: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "REFRESH_SECONDS", 0.2)
    joins: list[str] = []

    async def scenario() -> None:
        page = socket(world.pool.pool_id, viewer)
        layer = get_channel_layer()
        group_add = layer.group_add

        async def counting_add(group: str, channel: str) -> None:
            joins.append(group)
            await group_add(group, channel)

        monkeypatch.setattr(layer, "group_add", counting_add)
        try:
            await open_page(page)
            # Nothing changes, yet the ages move on: two more renders in about 0.4 s.
            assert 'id="slot-grid"' in await page.receive_from(timeout=TIMEOUT)
            assert 'id="slot-grid"' in await page.receive_from(timeout=TIMEOUT)
        finally:
            await page.disconnect()

    async_to_sync(scenario)()
    assert joins.count(pool_group(world.pool.pool_id)) >= 3


def test_a_change_published_during_a_render_gets_a_render_after_it(
    world: World, viewer: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders = 0

    def read_then_change(**kwargs: Any) -> dict[str, Any]:
        nonlocal renders
        context = live.pool_live_context(**kwargs)
        renders += 1
        if renders == 1:
            # The ledger changes after this render read it: the page it sends is stale.
            make_agent(world.pool, "joined-later")
        return context

    monkeypatch.setattr(fanout, "pool_live_context", read_then_change)

    async def scenario() -> tuple[str, str]:
        page = socket(world.pool.pool_id, viewer)
        try:
            stale = await open_page(page)
            return stale, await page.receive_from(timeout=TIMEOUT)
        finally:
            await page.disconnect()

    stale, trailing = async_to_sync(scenario)()

    assert "joined-later" not in stale
    assert "joined-later" in trailing


def test_a_failed_render_is_logged_and_the_next_change_renders_again(
    world: World, viewer: User, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = iter([RuntimeError("template broke")])

    def flaky(**kwargs: Any) -> str:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return live.pool_live_render(**kwargs)

    monkeypatch.setattr(fanout, "pool_live_render", flaky)

    async def scenario() -> str:
        page = socket(world.pool.pool_id, viewer)
        try:
            connected, _ = await page.connect(timeout=TIMEOUT)
            assert connected
            # The render on connect fails: nothing is sent and the socket stays open.
            assert await page.receive_nothing(timeout=0.5)
            await database_sync_to_async(make_agent)(world.pool, "joined-later")
            html: str = await page.receive_from(timeout=TIMEOUT)
            return html
        finally:
            await page.disconnect()

    with caplog.at_level(logging.ERROR, logger=fanout.__name__):
        html = async_to_sync(scenario)()

    assert "joined-later" in html
    assert [r.getMessage() for r in caplog.records] == [
        f"live update of pool {world.pool.pool_id} failed"
    ]


def test_a_pool_deleted_while_open_closes_the_socket_with_4404(viewer: User) -> None:
    pool = make_pool(name="gone")

    def delete_and_publish() -> None:
        # No service deletes pools yet; the consumer must cope with a vanished pool anyway.
        with transaction.atomic():
            AgentPool.objects.filter(pk=pool.pk).delete()
            broadcast_pool_changed(pool_id=pool.pk, kind="pool", payload={})

    async def scenario() -> dict[str, Any]:
        page = socket(pool.pk, viewer)
        try:
            await open_page(page)
            await database_sync_to_async(delete_and_publish)()
            message: dict[str, Any] = await page.receive_output(timeout=TIMEOUT)
            return message
        finally:
            await page.disconnect()

    assert async_to_sync(scenario)() == {"type": "websocket.close", "code": CLOSE_NO_POOL}


# --- who may connect ---------------------------------------------------------------------------


def test_an_anonymous_visitor_is_refused_with_4401(world: World) -> None:
    code = async_to_sync(refusal)(socket(world.pool.pool_id, AnonymousUser()))
    assert code == CLOSE_NOT_LOGGED_IN


def test_a_user_without_the_view_permission_is_refused_with_4403(world: World) -> None:
    nobody = User.objects.create_user(username="nobody")
    assert async_to_sync(refusal)(socket(world.pool.pool_id, nobody)) == CLOSE_FORBIDDEN


def test_an_unknown_pool_is_refused_with_4404(viewer: User) -> None:
    code = async_to_sync(refusal)(socket("pool-nosuchpool00000", viewer))
    assert code == CLOSE_NO_POOL


def test_a_pool_id_with_a_nul_byte_is_refused_with_4404(viewer: User) -> None:
    # An HTTP request with it is a 400 (lib/input.py); a socket has no status to answer.
    assert async_to_sync(refusal)(socket("pool-\x00", viewer)) == CLOSE_NO_POOL


# --- through the real ASGI application ----------------------------------------------------------


def browser_socket(pool_id: str, *, user: User, origin: str) -> WebsocketCommunicator:
    """What a browser sends: the session cookie of a logged-in user and its page's origin."""
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    headers = [(b"cookie", cookie.encode()), (b"origin", origin.encode())]
    return WebsocketCommunicator(application, ws_path(pool_id), headers=headers)


def test_a_logged_in_browser_connects_through_the_asgi_application(
    world: World, viewer: User
) -> None:
    page = browser_socket(world.pool.pool_id, user=viewer, origin="http://testserver")

    async def scenario() -> str:
        try:
            return await open_page(page)
        finally:
            await page.disconnect()

    assert world.pod.name in async_to_sync(scenario)()


def test_a_foreign_origin_is_refused_by_the_asgi_application(world: World, viewer: User) -> None:
    page = browser_socket(world.pool.pool_id, user=viewer, origin="https://evil.example")

    async def scenario() -> bool:
        try:
            connected, _ = await page.connect(timeout=TIMEOUT)
            return bool(connected)
        finally:
            await page.disconnect()

    assert not async_to_sync(scenario)()


@pytest.fixture
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets check their person again every 0.2 s instead of every 30 s."""
    monkeypatch.setattr(consumers, "CHECK_SECONDS", 0.2)


def closed_after_a_change(world: World, page: WebsocketCommunicator, change: Any) -> Any:
    """Open the page, make `change` (sync, in a thread), and return how the socket ends:
    the first output that is not a render (pushed regions may arrive before the check)."""

    async def scenario() -> Any:
        try:
            await open_page(page)
            await database_sync_to_async(change)()
            await database_sync_to_async(make_agent)(world.pool, "after")
            while (message := await page.receive_output(timeout=TIMEOUT))["type"] == (
                "websocket.send"
            ):
                pass
            return message
        finally:
            await page.disconnect()

    return async_to_sync(scenario)()


@pytest.mark.usefixtures("quick_checks")
def test_after_logout_the_open_socket_is_closed_at_its_next_check(
    world: World, viewer: User
) -> None:
    page = browser_socket(world.pool.pool_id, user=viewer, origin="http://testserver")
    message = closed_after_a_change(world, page, lambda: Session.objects.all().delete())
    assert message == {"type": "websocket.close", "code": CLOSE_NOT_LOGGED_IN}


@pytest.mark.usefixtures("quick_checks")
def test_a_user_who_lost_the_viewer_role_is_closed_at_its_next_check(
    world: World, viewer: User
) -> None:
    page = browser_socket(world.pool.pool_id, user=viewer, origin="http://testserver")
    message = closed_after_a_change(world, page, lambda: viewer.groups.clear())
    assert message == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}


@pytest.mark.usefixtures("quick_checks")
def test_a_deactivated_user_is_closed_at_its_next_check(world: World, viewer: User) -> None:
    page = socket(world.pool.pool_id, viewer)

    def deactivate() -> None:
        User.objects.filter(pk=viewer.pk).update(is_active=False)

    message = closed_after_a_change(world, page, deactivate)
    assert message == {"type": "websocket.close", "code": CLOSE_NOT_LOGGED_IN}


def test_each_socket_renders_the_buttons_its_own_user_may_use(
    world: World, admin: User, viewer: User
) -> None:
    release_url = f'hx-get="/slots/{world.reserved.pk}/release/"'

    async def scenario() -> tuple[str, str]:
        as_admin, as_viewer = socket(world.pool.pool_id, admin), socket(world.pool.pool_id, viewer)
        try:
            await open_page(as_admin)
            await open_page(as_viewer)
            await database_sync_to_async(make_agent)(world.pool, "pushed")
            return (
                await as_admin.receive_from(timeout=TIMEOUT),
                await as_viewer.receive_from(timeout=TIMEOUT),
            )
        finally:
            await as_admin.disconnect()
            await as_viewer.disconnect()

    admin_html, viewer_html = async_to_sync(scenario)()
    assert "pushed" in admin_html and "pushed" in viewer_html
    assert release_url in admin_html
    assert release_url not in viewer_html
    assert 'disabled title="needs pools.release_slot"' in viewer_html


# --- one render per key, the same bytes to every socket of it ----------------------------------


async def settled(pages: list[WebsocketCommunicator]) -> None:
    """Read what the pages got while they opened (each new socket of a key renders that key
    again, for every socket of it) until nothing more arrives."""
    quiet = 4 * fanout.RENDER_WINDOW_SECONDS
    for page in pages:
        while not await page.receive_nothing(timeout=quiet):
            await page.receive_output(timeout=TIMEOUT)


def pushed_after_a_release(
    world: World, users: list[User], *counters: list[Any]
) -> tuple[list[str], float]:
    """Open a pool page per user, wait until they are quiet, release the reserved slot, and
    return what each page got for it (one message each, checked) and how long the last took."""

    async def scenario() -> tuple[list[str], float]:
        pages = [socket(world.pool.pool_id, user) for user in users]
        try:
            for page in pages:
                await open_page(page)
            await settled(pages)
            for counter in counters:  # count from the change on
                counter.clear()
            await database_sync_to_async(release)(world.reserved)
            released_at = time.monotonic()
            received = [await page.receive_from(timeout=TIMEOUT) for page in pages]
            took = time.monotonic() - released_at
            for page in pages:  # exactly one message each for the one change
                assert await page.receive_nothing(timeout=4 * fanout.RENDER_WINDOW_SECONDS)
            return received, took
        finally:
            for page in pages:
                await page.disconnect()

    return async_to_sync(scenario)()


def test_twenty_viewers_of_one_pool_cost_one_render_per_change(
    world: World, viewer: User, counted_renders: list[str]
) -> None:
    received, took = pushed_after_a_release(world, [viewer] * 20, counted_renders)

    assert len(counted_renders) == 1
    assert received == received[:1] * 20
    assert 'id="slot-map"' in received[0]
    assert reserved_cells(received[0]) == []
    print(f"20 viewers got the release after {took:.3f} s")


def test_an_admin_among_viewers_gets_a_render_of_their_own_with_the_buttons(
    world: World,
    admin: User,
    viewer: User,
    counted_renders: list[str],
    counted_reads: list[object],
) -> None:
    """Keyed by the permissions the buttons check, not by the person: one render for the
    viewers, one for the admin, from one read of the ledger."""
    other_viewer = User.objects.create_user(username="vera")
    other_viewer.groups.set(viewer.groups.all())

    received, _ = pushed_after_a_release(
        world, [viewer, admin, other_viewer], counted_renders, counted_reads
    )

    assert len(counted_renders) == 2
    assert len(counted_reads) == 1
    as_viewer, as_admin, as_other_viewer = received
    assert as_viewer == as_other_viewer
    assert as_admin != as_viewer
    # The released slot's card is sent again, with the buttons of each role.
    drain_button = f'hx-get="{reverse("pools-pod-drain", args=[world.pod.pk])}"'
    assert drain_button in as_admin
    assert drain_button not in as_viewer
    assert 'disabled title="needs pools.manage_pool"' in as_viewer


def test_notify_sockets_share_the_changed_message_without_rendering_the_page(
    world: World, viewer: User, counted_renders: list[str]
) -> None:
    async def scenario() -> list[str]:
        pages = [
            WebsocketCommunicator(
                URLRouter(websocket_urlpatterns), ws_path(world.pool.pool_id) + "?notify=1"
            )
            for _ in range(5)
        ]
        for page in pages:
            page.scope["user"] = viewer
        try:
            for page in pages:
                await open_page(page)
            await settled(pages)
            await database_sync_to_async(release)(world.reserved)
            return [await page.receive_from(timeout=TIMEOUT) for page in pages]
        finally:
            for page in pages:
                await page.disconnect()

    assert async_to_sync(scenario)() == [consumers.CHANGED] * 5
    assert counted_renders == []


def test_a_change_sends_the_regions_that_changed_and_a_new_page_gets_them_all(
    world: World, viewer: User
) -> None:
    workspace = make_workspace(world.pool, "queued")

    async def scenario() -> tuple[str, str, str]:
        first, second = socket(world.pool.pool_id, viewer), socket(world.pool.pool_id, viewer)
        try:
            opened = await open_page(first)
            await settled([first])
            # A task joins the queue: no slot changes.
            task = await database_sync_to_async(submit)(workspace)
            changed = await first.receive_from(timeout=TIMEOUT)
            assert f"#{task.pk}" in changed
            await settled([first])
            return opened, changed, await open_page(second)
        finally:
            await first.disconnect()
            await second.disconnect()

    # One moment throughout: the cards show ages, which would differ between two renders.
    with clock.frozen_at(clock.now()):
        opened, changed, newcomer = async_to_sync(scenario)()
    regions = live.live_regions(opened)
    assert regions is not None and list(regions) == list(live.LIVE_REGIONS)
    assert 'id="queue"' in changed
    assert 'id="slot-map"' not in changed and 'id="slot-grid"' not in changed
    assert list(live.live_regions(newcomer) or ()) == list(live.LIVE_REGIONS)


def test_the_periodic_refresh_sends_every_region_again(
    world: World, viewer: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "REFRESH_SECONDS", 0.3)

    async def scenario() -> str:
        page = socket(world.pool.pool_id, viewer)
        try:
            await open_page(page)
            refreshed: str = await page.receive_from(timeout=TIMEOUT)
            return refreshed
        finally:
            await page.disconnect()

    assert list(live.live_regions(async_to_sync(scenario)()) or ()) == list(live.LIVE_REGIONS)


def test_pages_of_two_views_get_their_own_cards(world: World, viewer: User) -> None:
    make_agent(world.pool, "P2")  # idle: a card by default, none among the reserved

    async def scenario() -> tuple[str, str]:
        default = socket(world.pool.pool_id, viewer)
        reserved_only = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns), ws_path(world.pool.pool_id) + "?show=reserved"
        )
        reserved_only.scope["user"] = viewer
        try:
            return await open_page(default), await open_page(reserved_only)
        finally:
            await default.disconnect()
            await reserved_only.disconnect()

    default_html, reserved_html = async_to_sync(scenario)()
    assert default_html != reserved_html
    # The cards follow the view (the filter form's query alone would make the texts differ).
    assert 'aria-label="Pod P1"' in default_html and 'aria-label="Pod P1"' in reserved_html
    assert 'aria-label="Pod P2"' in default_html
    assert 'aria-label="Pod P2"' not in reserved_html


@pytest.mark.usefixtures("quick_checks")
def test_an_admin_demoted_to_viewer_gets_the_viewers_page_at_the_next_check(
    world: World, admin: User, viewer: User
) -> None:
    pause_button = f'hx-get="{reverse("pools-pause", args=[world.pool.pool_id])}"'

    def demote() -> None:
        admin.is_superuser = False
        admin.save()
        admin.groups.set(viewer.groups.all())
        admin.user_permissions.clear()

    async def scenario() -> str:
        page = socket(world.pool.pool_id, admin)
        try:
            assert pause_button in await open_page(page)
            await database_sync_to_async(demote)()
            # Until its new key's first render, which sends every region.
            while "needs pools.manage_pool" not in (
                html := await page.receive_from(timeout=TIMEOUT)
            ):
                pass
            return html
        finally:
            await page.disconnect()

    html = async_to_sync(scenario)()
    assert pause_button not in html
    assert 'disabled title="needs pools.manage_pool"' in html


@pytest.mark.usefixtures("quick_checks")
def test_a_demoted_admins_page_still_gets_changes_and_leaves_no_hub_behind(
    world: World, admin: User, viewer: User
) -> None:
    """The only socket of a pool changing key (a changed role) stays on a live hub: later
    changes still reach it, and when it goes the pool's hub goes with it."""

    def demote() -> None:
        admin.is_superuser = False
        admin.save()
        admin.groups.set(viewer.groups.all())
        admin.user_permissions.clear()

    async def scenario() -> tuple[str, bool]:
        page = socket(world.pool.pool_id, admin)
        try:
            await open_page(page)
            await database_sync_to_async(demote)()
            while "needs pools.manage_pool" not in await page.receive_from(timeout=TIMEOUT):
                pass
            await database_sync_to_async(release)(world.reserved)
            while reserved_cells(after := await page.receive_from(timeout=TIMEOUT)):
                pass
        finally:
            await page.disconnect()
        return after, world.pool.pool_id in fanout._hubs_of_this_loop()

    after, hub_left = async_to_sync(scenario)()
    assert reserved_cells(after) == []
    assert not hub_left


# --- the production channel layer --------------------------------------------------------------


@pytest.fixture
def redis_layer(settings: Any) -> Iterator[None]:
    """CHANNEL_LAYERS on Redis (db 13, flushed around the test)."""
    client = redis_or_skip(REDIS_URL)
    client.flushdb()
    # The production configuration (settings.py), pointed at the tests' database.
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL)}
    yield
    client.flushdb()
    client.close()


@pytest.mark.usefixtures("redis_layer")
def test_an_admin_receives_the_pool_regions_after_a_slot_release_over_the_redis_layer(
    world: World, admin: User
) -> None:
    assert isinstance(get_channel_layer(), RedisChannelLayer)
    admin_sees_the_release(world, admin)


# A bit more than the quiet minute after which 12 of 20 open pages were dead (issue 8).
QUIET_SECONDS = 65
OPEN_PAGES = 20


async def what_arrives(page: WebsocketCommunicator, marker: str) -> str:
    """ "the change" once a render with `marker` arrives (the periodic renders of the quiet
    minute come first), or what went wrong instead."""
    try:
        while marker not in await page.receive_from(timeout=30):
            pass
    except Exception as exc:  # a dead consumer raises whatever killed it
        return f"dead: {type(exc).__module__}.{type(exc).__name__}: {exc}"
    return "the change"


@pytest.mark.ci_once
@pytest.mark.usefixtures("redis_layer")
def test_twenty_pages_open_over_redis_all_receive_a_change_after_a_quiet_minute(
    world: World, viewer: User
) -> None:
    """Every consumer waits on the layer's blocking read all minute long; with the Redis
    client's read timeout as short as that read, some of them died of it."""

    async def scenario() -> list[str]:
        pages = [socket(world.pool.pool_id, viewer) for _ in range(OPEN_PAGES)]
        try:
            for page in pages:
                await open_page(page)
            await asyncio.sleep(QUIET_SECONDS)
            await database_sync_to_async(make_agent)(world.pool, "after-the-quiet")
            return list(await asyncio.gather(*(what_arrives(p, "after-the-quiet") for p in pages)))
        finally:
            for page in pages:
                with contextlib.suppress(Exception):  # a dead one re-raises here
                    await page.disconnect()

    assert Counter(async_to_sync(scenario)()) == {"the change": OPEN_PAGES}
