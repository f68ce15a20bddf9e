"""Publishing: one event per pool per transaction, after commit, and on a cross-process layer
through one long-lived publisher thread (issue 9 item 5)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer, get_channel_layer
from django.db import transaction

from poolsadmin.realtime import broadcast
from poolsadmin.realtime.broadcast import Publisher, broadcast_pool_changed, pool_group
from poolsadmin.settings import redis_channel_layer
from tests.redis_server import redis_or_skip

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The pools whose event left the commit hook, in order."""
    pools: list[str] = []
    monkeypatch.setattr(broadcast, "_publish", lambda pool_id, message: pools.append(pool_id))
    return pools


def change(pool_id: str) -> None:
    broadcast_pool_changed(pool_id=pool_id, kind="slot", payload={"slot": "x[0]"})


def test_many_changes_of_a_pool_in_one_transaction_publish_once(published: list[str]) -> None:
    with transaction.atomic():
        for _ in range(20):
            change("pool-a")
        with transaction.atomic():  # a savepoint, released
            change("pool-a")
            change("pool-b")
        change("pool-b")
        assert published == []  # nothing before the commit

    assert published == ["pool-a", "pool-b"]


def test_a_change_in_a_rolled_back_savepoint_does_not_swallow_a_later_one(
    published: list[str],
) -> None:
    with transaction.atomic():
        try:
            with transaction.atomic():
                change("pool-a")
                change("pool-gone")
                raise RuntimeError("rolled back")
        except RuntimeError:
            pass
        change("pool-a")

    assert published == ["pool-a"]


def test_a_rolled_back_transaction_publishes_nothing(published: list[str]) -> None:
    try:
        with transaction.atomic():
            change("pool-a")
            raise RuntimeError("rolled back")
    except RuntimeError:
        pass

    assert published == []


def test_each_change_outside_a_transaction_is_published(published: list[str]) -> None:
    change("pool-a")
    change("pool-a")

    assert published == ["pool-a", "pool-a"]


class RecordingLayer(BaseChannelLayer):
    """A cross-process layer as the publisher sees it: where each group_send ran."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.sends: list[tuple[str, str, asyncio.AbstractEventLoop, threading.Thread]] = []

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        loop, thread = asyncio.get_running_loop(), threading.current_thread()
        self.sends.append((group, message["kind"], loop, thread))
        if self.fail:
            raise ConnectionError("Redis went away")


@pytest.fixture
def own_publisher(monkeypatch: pytest.MonkeyPatch) -> Publisher:
    """A publisher of the test's own, flushed (and so stopped) by the test."""
    fresh = Publisher()
    monkeypatch.setattr(broadcast, "publisher", fresh)
    return fresh


def use_layer(monkeypatch: pytest.MonkeyPatch, layer: BaseChannelLayer) -> None:
    monkeypatch.setattr(broadcast, "get_channel_layer", lambda: layer)


def test_every_publish_goes_out_from_one_thread_and_one_event_loop(
    monkeypatch: pytest.MonkeyPatch, own_publisher: Publisher
) -> None:
    """One loop for the life of the process: channels_redis keeps one connection pool per
    loop, so the connection outlives each publish (it used to be opened and closed with a
    fresh loop for every change, on the committing thread)."""
    layer = RecordingLayer()
    use_layer(monkeypatch, layer)

    for pool_id in ("pool-a", "pool-b", "pool-a"):
        with transaction.atomic():
            change(pool_id)
            change(pool_id)
    own_publisher.flush()

    groups = [group for group, *_ in layer.sends]
    assert set(groups) == {pool_group("pool-a"), pool_group("pool-b")}
    assert len(groups) <= 3  # events still waiting when the thread got to them are merged
    assert len({loop for _, _, loop, _ in layer.sends}) == 1
    threads = {thread for *_, thread in layer.sends}
    assert len(threads) == 1 and threading.current_thread() not in threads


def test_a_failed_publish_is_logged_and_the_change_stands(
    monkeypatch: pytest.MonkeyPatch, own_publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    use_layer(monkeypatch, RecordingLayer(fail=True))

    with caplog.at_level(logging.WARNING, logger=broadcast.__name__):
        with transaction.atomic():
            change("pool-a")
        own_publisher.flush()

    assert [r.getMessage() for r in caplog.records] == ["realtime publish to pool.pool-a failed"]


def test_a_flush_at_exit_sends_what_is_still_pending(
    monkeypatch: pytest.MonkeyPatch, own_publisher: Publisher
) -> None:
    layer = RecordingLayer()
    use_layer(monkeypatch, layer)
    with transaction.atomic():
        change("pool-a")

    own_publisher.flush()  # what atexit calls

    assert [group for group, *_ in layer.sends] == [pool_group("pool-a")]


@pytest.fixture
def redis_layer(settings: Any) -> Iterator[None]:
    client = redis_or_skip(REDIS_URL)
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL)}
    yield
    client.close()


@pytest.mark.usefixtures("redis_layer")
def test_over_redis_a_transaction_reaches_each_pools_group_once() -> None:
    async def scenario() -> list[tuple[str, str]]:
        layer = get_channel_layer()
        channels = {pool: await layer.new_channel() for pool in ("pool-a", "pool-b")}
        for pool, channel in channels.items():
            await layer.group_add(pool_group(pool), channel)
        try:

            def commit() -> None:
                with transaction.atomic():
                    for _ in range(10):
                        change("pool-a")
                        change("pool-b")

            await database_sync_to_async(commit)()
            got = [
                (pool, (await asyncio.wait_for(layer.receive(channel), 5))["type"])
                for pool, channel in channels.items()
            ]
            for channel in channels.values():  # and nothing more
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(layer.receive(channel), 0.5)
            return got
        finally:
            for pool, channel in channels.items():
                await layer.group_discard(pool_group(pool), channel)

    assert async_to_sync(scenario)() == [("pool-a", "pool.changed"), ("pool-b", "pool.changed")]


def test_on_the_in_memory_layer_a_change_committed_on_a_plain_thread_is_sent_on_the_hubs_loop(
    settings: Any,
) -> None:
    """The in-memory layer's queues belong to the event loop of the pool's hub (daphne's):
    a request's thread (not one of asgiref's) hands the send to that loop, which it wakes.
    async_to_sync there ran it on a new loop in a new thread, for every change, touching
    the hub's queue from the wrong thread (it waited for the next wake-up of daphne's loop)."""
    from poolsadmin.realtime.fanout import _hubs

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    sends: list[threading.Thread] = []
    original = layer.group_send

    async def recording(group: str, message: dict[str, Any]) -> None:
        sends.append(threading.current_thread())
        await original(group, message)

    layer.group_send = recording
    loop = asyncio.new_event_loop()
    serving = threading.Thread(target=loop.run_forever, name="daphne's loop", daemon=True)
    serving.start()

    async def listen() -> str:
        channel = await layer.new_channel()
        await layer.group_add(pool_group("pool-a"), channel)
        return channel

    try:
        channel = asyncio.run_coroutine_threadsafe(listen(), loop).result(5)
        _hubs[loop] = {"pool-a": object()}  # type: ignore[dict-item]  # a hub listens there
        committer = threading.Thread(target=change, args=("pool-a",), name="a request's thread")
        committer.start()
        committer.join(5)
        message = asyncio.run_coroutine_threadsafe(layer.receive(channel), loop).result(5)
    finally:
        _hubs.pop(loop, None)
        loop.call_soon_threadsafe(loop.stop)
        serving.join(5)
        loop.close()

    assert message["type"] == "pool.changed"
    assert sends == [serving]


def test_on_the_in_memory_layer_a_pool_nobody_listens_to_costs_no_send(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    sends: list[str] = []

    async def recording(group: str, message: dict[str, Any]) -> None:
        sends.append(group)

    layer.group_send = recording
    committer = threading.Thread(target=change, args=("pool-nobody-watches",))
    committer.start()
    committer.join(5)

    assert sends == []  # the worker's changes, for instance: its process serves no page
    assert caplog.records == []  # not a failed publish: none was made
