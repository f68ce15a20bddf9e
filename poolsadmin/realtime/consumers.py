"""The live pool page: one WebSocket per open page, fed by the group `pool.<pool_id>`.

Each "pool.changed" event marks the page stale; the consumer renders every live region
(`pool_live_html`, the same HTML a poll of the page gets) and sends it, and the htmx ws
extension swaps each region by id. Events carry no state: the render reads the ledger, so a
dropped or coalesced event can never leave the page showing something the database does not.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.http import QueryDict

from poolsadmin.api.roles import PERM_VIEW
from poolsadmin.dashboard.live import pool_live_html
from poolsadmin.dashboard.pool_view import PoolView, pool_view_parse
from poolsadmin.lib.errors import InvalidInput, NotFound
from poolsadmin.lib.input import text_problem
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool
from poolsadmin.realtime.broadcast import pool_group

logger = logging.getLogger(__name__)

# Close codes in the application range (4000-4999), after the HTTP status they stand for.
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NO_POOL = 4404

# A scheduler pass publishes dozens of events within a few ms: render at most once per window.
RENDER_WINDOW_SECONDS = 0.15
# Without any event the page still re-renders now and then: its ages and countdowns move on,
# and the consumer joins its group again, because channels_redis forgets group members after
# `group_expiry` (a day by default) and a page may stay open longer than that.
REFRESH_SECONDS = 30.0


def _pool_exists(pool_id: str) -> bool:
    # A NUL byte in the URL (`/ws/pools/%00/`) would fail the query on PostgreSQL: no such pool.
    return text_problem(pool_id) is None and AgentPool.objects.filter(pk=pool_id).exists()


# What a socket opened with `?notify=1` gets instead of the pool page's regions: pages of
# the pool that are not the pool page (a task's) only need to know that it changed, and then
# refresh their own region over HTTP.
CHANGED = "changed"


def _view_of(query_string: bytes) -> PoolView:
    """The pool page's view (filter, sort, page of cards) the socket was opened for: the
    page's own query string. One that does not parse (hand-made) gets the default view."""
    try:
        return pool_view_parse(QueryDict(query_string.decode("latin-1")))
    except InvalidInput:
        return PoolView()


def _render_for_whoever_is_still_there(
    *,
    pool_id: str,
    user_pk: Any,
    session_key: str | None,
    notify_only: bool = False,
    view: PoolView | None = None,
) -> tuple[int | None, str]:
    """(close code, "") when the person behind the socket may no longer see the page, else
    (None, html). A socket lives for hours: the session may have ended (logout), the user
    been deactivated or lost the viewer role since connect, so each render reads them again,
    and renders with a fresh user object (Django caches permissions on the instance, so
    buttons follow a changed role too)."""
    if session_key is not None:
        store = import_module(settings.SESSION_ENGINE).SessionStore()
        if not store.exists(session_key):
            return CLOSE_NOT_LOGGED_IN, ""
    user = get_user_model().objects.filter(pk=user_pk, is_active=True).first()
    if user is None:
        return CLOSE_NOT_LOGGED_IN, ""
    if not user.has_perm(PERM_VIEW):
        return CLOSE_FORBIDDEN, ""
    if notify_only:
        return (None, CHANGED) if _pool_exists(pool_id) else (CLOSE_NO_POOL, "")
    return None, pool_live_html(pool_id=pool_id, user=user, view=view)


class PoolConsumer(AsyncWebsocketConsumer):
    pool_id: str
    group: str | None = None
    stale: bool = False
    render_task: asyncio.Task[None] | None = None
    refresh_task: asyncio.Task[None] | None = None
    user_pk: Any = None
    session_key: str | None = None
    notify_only: bool = False
    view: PoolView | None = None

    async def connect(self) -> None:
        self.pool_id = self.scope["url_route"]["kwargs"]["pool_id"]
        refusal = await self._refusal()
        if refusal is not None:
            # Accept, then close with the reason. Refused before accept, the handshake fails
            # with HTTP 403, the browser only sees 1006, and the htmx ws extension retries
            # 1006 forever. A 44xx close reaches the page as CloseEvent.code and is not
            # retried; the page's polling fallback then gets the login redirect, 403 or 404.
            await self.accept()
            await self.close(code=refusal)
            return
        self.user_pk = self.scope["user"].pk
        query_string = self.scope.get("query_string", b"")
        self.notify_only = b"notify=1" in query_string.split(b"&")
        self.view = _view_of(query_string)
        session = self.scope.get("session")
        self.session_key = session.session_key if session is not None else None
        self.group = pool_group(self.pool_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        # Render once at (re)connect: changes made between the page load (or a dropped
        # socket) and joining the group published to nobody.
        self._mark_stale()
        self.refresh_task = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                if self.group is not None:
                    await self.channel_layer.group_add(self.group, self.channel_name)
            except Exception:
                # A channel layer blip (Redis restarting): log it and try again next time;
                # the render below still runs, and the page still says what it knows.
                logger.exception(
                    "re-joining %s failed", self.group, extra=log_ids(pool=self.pool_id)
                )
            self._mark_stale()

    async def _refusal(self) -> int | None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return CLOSE_NOT_LOGGED_IN
        if not await database_sync_to_async(user.has_perm)(PERM_VIEW):
            return CLOSE_FORBIDDEN
        if not await database_sync_to_async(_pool_exists)(self.pool_id):
            return CLOSE_NO_POOL
        return None

    async def disconnect(self, code: int) -> None:
        for task in (self.render_task, self.refresh_task):
            if task is not None:
                task.cancel()
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def pool_changed(self, event: dict[str, Any]) -> None:
        self._mark_stale()

    def _mark_stale(self) -> None:
        self.stale = True
        if self.render_task is None or self.render_task.done():
            self.render_task = asyncio.create_task(self._render_while_stale())

    async def _render_while_stale(self) -> None:
        """Throttle with a trailing edge: the first event renders at once; events arriving
        during a render or the rest of its window mark the page stale again and get one more
        render when the window ends. The last render always starts after the last event."""
        loop = asyncio.get_running_loop()
        while self.stale:
            self.stale = False
            started = loop.time()
            if not await self._render_and_send():
                return
            await asyncio.sleep(max(0.0, started + RENDER_WINDOW_SECONDS - loop.time()))

    async def _render_and_send(self) -> bool:
        """Return False when the socket was closed. Errors are logged here: this runs in a
        task of its own, whose exception nobody would ever read."""
        try:
            refusal, html = await database_sync_to_async(_render_for_whoever_is_still_there)(
                pool_id=self.pool_id,
                user_pk=self.user_pk,
                session_key=self.session_key,
                notify_only=self.notify_only,
                view=self.view,
            )
            if refusal is not None:
                await self.close(code=refusal)
                return False
            await self.send(text_data=html)
        except NotFound:
            await self.close(code=CLOSE_NO_POOL)
            return False
        except Exception:
            # Keep the socket: the next change tries again (at most once per window).
            logger.exception(
                "live update of pool %s failed", self.pool_id, extra=log_ids(pool=self.pool_id)
            )
        return True
