"""The live pool page: one WebSocket per open page, fed by this process's hub of the pool.

The consumer checks who is behind the socket (at connect, and again every CHECK_SECONDS: a
socket lives for hours) and subscribes it to `fanout.pool_hub(pool_id)` under the key its
regions depend on (the person's action permissions and the page's view). The hub renders each
key once per change (the same HTML a poll of the page gets) and sends the same text to every
socket of the key; the htmx ws extension swaps each region by id.
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
from poolsadmin.dashboard.pool_view import PoolView, pool_view_parse
from poolsadmin.lib.errors import InvalidInput
from poolsadmin.lib.input import text_problem
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool
from poolsadmin.realtime.fanout import (
    CHANGED,
    CLOSE_NO_POOL,
    LiveKey,
    PoolHub,
    live_key,
    live_perms,
    pool_hub,
)

logger = logging.getLogger(__name__)

__all__ = ["CHANGED", "CLOSE_FORBIDDEN", "CLOSE_NOT_LOGGED_IN", "CLOSE_NO_POOL", "PoolConsumer"]

# Close codes in the application range (4000-4999), after the HTTP status they stand for.
CLOSE_NOT_LOGGED_IN = 4401
CLOSE_FORBIDDEN = 4403

# How often an open socket checks again that its person may still see the page (session,
# active user, viewer role) and which buttons they get: not per change, where two hundred
# sockets would cost six hundred queries for one slot.
CHECK_SECONDS = 30.0


def _pool_exists(pool_id: str) -> bool:
    # A NUL byte in the URL (`/ws/pools/%00/`) would fail the query on PostgreSQL: no such pool.
    return text_problem(pool_id) is None and AgentPool.objects.filter(pk=pool_id).exists()


def _view_of(query_string: bytes) -> PoolView:
    """The pool page's view (filter, sort, page of cards) the socket was opened for: the
    page's own query string. One that does not parse (hand-made) gets the default view."""
    try:
        return pool_view_parse(QueryDict(query_string.decode("latin-1")))
    except InvalidInput:
        return PoolView()


def _access(*, user_pk: Any, session_key: str | None) -> int | frozenset[str]:
    """A close code when the person behind the socket may no longer see the page, else
    the action permissions their page's buttons follow. The session may have ended (logout),
    the user been deactivated or lost the viewer role since connect, so this reads them
    again, with a fresh user object (Django caches permissions on the instance)."""
    if session_key is not None:
        store = import_module(settings.SESSION_ENGINE).SessionStore()
        if not store.exists(session_key):
            return CLOSE_NOT_LOGGED_IN
    user = get_user_model().objects.filter(pk=user_pk, is_active=True).first()
    if user is None:
        return CLOSE_NOT_LOGGED_IN
    if not user.has_perm(PERM_VIEW):
        return CLOSE_FORBIDDEN
    return live_perms(user)


class PoolConsumer(AsyncWebsocketConsumer):
    # No channel of its own: the pool's hub listens to the group once for every socket of
    # this process (an alias that names no layer gives the consumer none).
    channel_layer_alias = "pool pages listen through their hub"

    pool_id: str
    key: LiveKey | None = None
    hub: PoolHub | None = None  # the hub subscribed to: left at the end, never looked up again
    check_task: asyncio.Task[None] | None = None
    user_pk: Any = None
    session_key: str | None = None

    async def connect(self) -> None:
        self.pool_id = self.scope["url_route"]["kwargs"]["pool_id"]
        access = await self._access_at_connect()
        if isinstance(access, int):
            # Accept, then close with the reason. Refused before accept, the handshake fails
            # with HTTP 403, the browser only sees 1006, and the htmx ws extension retries
            # 1006 forever. A 44xx close reaches the page as CloseEvent.code and is not
            # retried; the page's polling fallback then gets the login redirect, 403 or 404.
            await self.accept()
            await self.close(code=access)
            return
        self.user_pk = self.scope["user"].pk
        query_string = self.scope.get("query_string", b"")
        notify = b"notify=1" in query_string.split(b"&")
        session = self.scope.get("session")
        self.session_key = session.session_key if session is not None else None
        await self.accept()
        self.key = live_key(perms=access, view=None if notify else _view_of(query_string))
        self.hub = pool_hub(self.pool_id)
        self.hub.subscribe(self.key, self)
        self.check_task = asyncio.create_task(self._check_forever())

    async def _access_at_connect(self) -> int | frozenset[str]:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return CLOSE_NOT_LOGGED_IN
        if not await database_sync_to_async(user.has_perm)(PERM_VIEW):
            return CLOSE_FORBIDDEN
        if not await database_sync_to_async(_pool_exists)(self.pool_id):
            return CLOSE_NO_POOL
        perms: frozenset[str] = await database_sync_to_async(live_perms)(user)
        return perms

    async def _check_forever(self) -> None:
        while self.key is not None:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                access = await database_sync_to_async(_access)(
                    user_pk=self.user_pk, session_key=self.session_key
                )
            except Exception:
                # The database blipped: keep the socket, check again next time.
                logger.exception(
                    "checking a page of pool %s failed",
                    self.pool_id,
                    extra=log_ids(pool=self.pool_id),
                )
                continue
            if isinstance(access, int):
                await self.refuse(access)
                return
            new = live_key(perms=access, view=self.key.view)
            if new != self.key and self.hub is not None:
                # A changed role: other buttons, another render.
                self.hub.rekey(self.key, new, self)
                self.key = new

    async def refuse(self, code: int) -> None:
        """Leave the hub and close with `code` (see fanout.Socket)."""
        self._leave()
        await self.close(code=code)

    def _leave(self) -> None:
        if self.key is not None and self.hub is not None:
            self.hub.unsubscribe(self.key, self)
        self.key = self.hub = None

    async def disconnect(self, code: int) -> None:
        if self.check_task is not None:
            self.check_task.cancel()
        self._leave()
