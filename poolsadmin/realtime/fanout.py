"""Live pool pages that cost per change, not per socket (issue 9 item 3).

Per process and pool, one `PoolHub` listens to the group `pool.<pool_id>` on one channel of
its own (so one event reaches a web process once, however many pages it serves), and keeps
the sockets by `LiveKey`: what the regions depend on besides the ledger, the action
permissions the buttons check and the page's view (filter, sort, page of cards). A change
reads the ledger once per view (`pool_live_context`), renders the template once per key from
it (`pool_live_render`) and sends the same text to every socket of that key: two hundred
viewers of one pool cost one read and one render, an admin among them one more render.

Throttle, as before per socket, now per pool: the first event renders at once; events
arriving during a render or the rest of its window mark the pages stale again and get one
more render when the window ends, so the last render always starts after the last event.
Without events the hub re-renders now and then (ages and countdowns move on) and joins its
group again, because channels_redis forgets group members after `group_expiry` (a day by
default).

Events carry no state: the render reads the ledger, so a dropped or coalesced event can never
leave a page showing something the database does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import AnonymousUser

from poolsadmin.api.roles import ACTION_PERMISSIONS
from poolsadmin.dashboard.live import live_regions, pool_live_context, pool_live_render
from poolsadmin.dashboard.pool_view import PoolView
from poolsadmin.lib.errors import NotFound
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool
from poolsadmin.realtime.broadcast import pool_group

logger = logging.getLogger(__name__)

# Close code of a page whose pool is gone (the HTTP status it stands for).
CLOSE_NO_POOL = 4404

# A scheduler pass publishes dozens of events within a few ms: render at most once per window.
RENDER_WINDOW_SECONDS = 0.15
# Without any event the pages are rendered again and the group joined again this often.
REFRESH_SECONDS = 30.0
# After a channel layer error (Redis restarting), listen again after this long.
RETRY_SECONDS = 1.0

# What a socket opened with `?notify=1` gets instead of the pool page's regions: pages of
# the pool that are not the pool page (a task's) only need to know that it changed, and then
# refresh their own region over HTTP.
CHANGED = "changed"


@dataclass(frozen=True)
class LiveKey:
    """Everything the pushed text depends on besides the pool's ledger (`live_key`)."""

    perms: frozenset[str]  # the action permissions the person holds (the buttons)
    view: PoolView | None = None  # None: a notify socket (`CHANGED`, whoever asks)


def live_key(*, perms: frozenset[str], view: PoolView | None) -> LiveKey:
    """The key of a socket: a notify socket's text depends on no permission, so every notify
    socket of the pool shares one key, and a changed role does not move it."""
    return LiveKey(perms=perms if view is not None else frozenset(), view=view)


def live_perms(user: Any) -> frozenset[str]:
    """The permissions that change the pool page's regions: the action permissions (a
    button is enabled or shown disabled with the permission it needs). The user is not part
    of the key, so every viewer shares one render."""
    return frozenset(perm for perm in ACTION_PERMISSIONS if user.has_perm(perm))


class _Role(AnonymousUser):
    """Whom the template renders for: a set of permissions, not a person (the live regions
    use `perms` only)."""

    def __init__(self, perms: frozenset[str]) -> None:
        self._perms = perms

    def has_perm(self, perm: str, obj: object = None) -> bool:
        return perm in self._perms

    def has_module_perms(self, module: str) -> bool:
        return any(perm.startswith(f"{module}.") for perm in self._perms)


def live_texts(*, pool_id: str, keys: Iterable[LiveKey]) -> dict[LiveKey, str]:
    """The text each key's sockets get: the ledger read once per view, the template
    rendered once per key from it. Raises NotFound when the pool is gone."""
    texts: dict[LiveKey, str] = {}
    by_view: dict[PoolView | None, list[LiveKey]] = {}
    for key in keys:
        by_view.setdefault(key.view, []).append(key)
    for view, of_view in by_view.items():
        if view is None:  # notify sockets: "changed", once the pool is known to exist
            if not AgentPool.objects.filter(pk=pool_id).exists():
                raise NotFound(f"pool {pool_id} not found")
            texts.update(dict.fromkeys(of_view, CHANGED))
            continue
        context = pool_live_context(pool_id=pool_id, view=view)
        for key in of_view:
            texts[key] = pool_live_render(context=context, user=_Role(key.perms))
    return texts


@dataclass(eq=False)
class LivePage:
    """The sockets of one key, and what the ones that are up to date were sent last: a
    change sends them only the regions that differ (a slot change leaves the queue, the
    panels and most cards alone), a new socket gets every region."""

    sockets: set[Socket] = field(default_factory=set)
    current: set[Socket] = field(default_factory=set)
    regions: dict[str, str] = field(default_factory=dict)

    def texts(self, text: str) -> list[tuple[Socket, str]]:
        """What to send to whom for the key's new `text`."""
        regions = live_regions(text)
        changed = (
            "".join(html for region, html in regions.items() if self.regions.get(region) != html)
            if regions is not None and self.regions
            else text
        )
        sends = [(socket, changed if socket in self.current else text) for socket in self.sockets]
        self.regions = regions or {}
        self.current = set(self.sockets) if regions is not None else set()
        return [(socket, out) for socket, out in sends if out]


class Socket(Protocol):
    """What a page's consumer offers the hub."""

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None: ...

    async def refuse(self, code: int) -> None: ...


class PoolHub:
    """This process's listener for one pool, on the event loop that serves its sockets, and
    the one render of each key for all of them."""

    def __init__(self, pool_id: str) -> None:
        self.pool_id = pool_id
        self.pages: dict[LiveKey, LivePage] = {}
        self.stale: set[LiveKey] = set()
        self.render_task: asyncio.Task[None] | None = None
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.task = asyncio.create_task(self._listen())

    def subscribe(self, key: LiveKey, socket: Socket) -> None:
        """Add a socket and render its key: changes made between the page load (or a
        dropped socket) and now published to nobody."""
        self.pages.setdefault(key, LivePage()).sockets.add(socket)
        self.mark_stale([key])

    def rekey(self, old: LiveKey, new: LiveKey, socket: Socket) -> None:
        """Move a socket to another key (its person's role changed). Subscribed first: the
        hub's last socket changing key must not shut the hub down on the way."""
        self.subscribe(new, socket)
        self.unsubscribe(old, socket)

    def unsubscribe(self, key: LiveKey, socket: Socket) -> None:
        page = self.pages.get(key)
        if page is None:
            return
        page.sockets.discard(socket)
        page.current.discard(socket)
        if not page.sockets:
            del self.pages[key]
        if not self.pages:
            self.task.cancel()
            if self.render_task is not None:
                self.render_task.cancel()
            _hubs_of_this_loop().pop(self.pool_id, None)

    def mark_stale(self, keys: Iterable[LiveKey] | None = None, *, resend: bool = False) -> None:
        """Render `keys` (default: every key) again; `resend` sends every region to every
        socket, not only the changed ones (the periodic refresh: a page that missed a
        message, or swapped one badly, is whole again within REFRESH_SECONDS)."""
        self.stale.update(self.pages if keys is None else keys)
        if resend:
            for page in self.pages.values():
                page.current.clear()
        if self.render_task is None or self.render_task.done():
            self.render_task = asyncio.create_task(self._render_while_stale())

    async def _render_while_stale(self) -> None:
        loop = asyncio.get_running_loop()
        while self.stale:
            keys = [key for key in self.stale if key in self.pages]
            self.stale = set()
            started = loop.time()
            if keys:
                await self._render_and_send(keys)
            await asyncio.sleep(max(0.0, started + RENDER_WINDOW_SECONDS - loop.time()))

    async def _render_and_send(self, keys: list[LiveKey]) -> None:
        """Errors are logged here: this runs in a task of its own, whose exception nobody
        would ever read."""
        pool_id = self.pool_id
        try:
            texts = await database_sync_to_async(live_texts)(pool_id=pool_id, keys=keys)
        except NotFound:
            for key in keys:
                for socket in list(self.pages[key].sockets if key in self.pages else ()):
                    await socket.refuse(CLOSE_NO_POOL)
            return
        except Exception:
            # Keep the sockets: the next change tries again (at most once per window).
            logger.exception("live update of pool %s failed", pool_id, extra=log_ids(pool=pool_id))
            return
        for key, text in texts.items():
            if key not in self.pages:  # its last socket left during the render
                continue
            for socket, out in self.pages[key].texts(text):
                try:
                    await socket.send(text_data=out)
                except Exception:  # one closing socket does not keep the others waiting
                    logger.warning(
                        "live update of a page of pool %s not sent", pool_id, exc_info=True
                    )

    async def _listen(self) -> None:
        if self.layer is None:  # no channel layer: the pages refresh on their own only
            await self._refresh_forever()
            return
        self.channel = await self.layer.new_channel()
        refresh = asyncio.create_task(self._refresh_forever())
        try:
            await self._join()
            # What changed while the hub was joining reached nobody.
            self.mark_stale()
            while True:
                try:
                    message = await self.layer.receive(self.channel)
                except Exception:
                    logger.exception(
                        "listening to %s failed",
                        pool_group(self.pool_id),
                        extra=log_ids(pool=self.pool_id),
                    )
                    await asyncio.sleep(RETRY_SECONDS)
                    await self._join()
                    self.mark_stale()
                    continue
                if message.get("type") == "pool.changed":
                    self.mark_stale()
        finally:
            refresh.cancel()
            with contextlib.suppress(Exception):
                await self.layer.group_discard(pool_group(self.pool_id), self.channel)

    async def _join(self) -> None:
        assert self.layer is not None and self.channel is not None
        try:
            await self.layer.group_add(pool_group(self.pool_id), self.channel)
        except Exception:
            # A channel layer blip: log it and try again at the next refresh; the pages
            # still render then, and say what they know.
            logger.exception(
                "joining %s failed", pool_group(self.pool_id), extra=log_ids(pool=self.pool_id)
            )

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            if self.layer is not None and self.channel is not None:
                await self._join()
            self.mark_stale(resend=True)


# One registry per event loop: a hub's tasks and its channel layer connections belong to
# the loop it was made on (tests run each scenario on a loop of its own). The lock is for
# pool_hub_loops, which publishers call from their own threads.
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, PoolHub]] = (
    weakref.WeakKeyDictionary()
)
_hubs_lock = threading.Lock()


def _hubs_of_this_loop() -> dict[str, PoolHub]:
    loop = asyncio.get_running_loop()
    with _hubs_lock:
        hubs = _hubs.get(loop)
        if hubs is None:
            hubs = _hubs[loop] = {}
    return hubs


def pool_hub_loops(pool_id: str) -> list[asyncio.AbstractEventLoop]:
    """The event loops on which a hub of the pool listens in this process (under daphne, its
    one loop); from any thread."""
    with _hubs_lock:
        found = [loop for loop, hubs in _hubs.items() if pool_id in hubs]
    return [loop for loop in found if not loop.is_closed()]


def pool_hub(pool_id: str) -> PoolHub:
    """This process's hub of the pool, made on first use."""
    hubs = _hubs_of_this_loop()
    hub = hubs.get(pool_id)
    if hub is None:
        hub = hubs[pool_id] = PoolHub(pool_id)
    return hub
