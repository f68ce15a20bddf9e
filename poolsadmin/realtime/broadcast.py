"""The one module that publishes realtime events. Only services call it, and it publishes
after the transaction commits, so a page never renders a change that was rolled back.

Events carry no state (a page re-renders from the ledger), so any number of changes of one
pool in one transaction is one event: a scheduler pass that dispatches forty tasks publishes
once per pool, not forty times (issue 9). On a channel layer that crosses processes (Redis)
the event is handed to this process's publisher, one thread with one event loop and so one
long-lived connection pool, instead of a fresh thread, loop and Redis connection per change
(about 8.5 ms each, on the committing thread). The in-memory layer reaches only this
process's hubs (realtime/fanout.py): the send is handed to the event loop they listen on,
and a pool that no hub of this process listens to (every pool, in the worker) costs nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
from typing import Any

from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer
from django.db import transaction

from poolsadmin.lib.logs import log_ids

logger = logging.getLogger(__name__)

# How long a process that exits waits for its last events to reach the channel layer.
FLUSH_SECONDS = 2.0


def pool_group(pool_id: str) -> str:
    return f"pool.{pool_id}"


def _failed(pool_id: str, error: BaseException | None = None) -> None:
    # A dashboard nudge must never break a state change: log it, and the pages' periodic
    # refresh shows the change a little later.
    logger.warning(
        "realtime publish to %s failed",
        pool_group(pool_id),
        exc_info=error or True,
        extra=log_ids(pool=pool_id),
    )


class Publisher:
    """One thread per process that owns an event loop for the whole life of the process, so
    the channel layer keeps its connections (channels_redis pools them per event loop).
    Events wait in a dict by pool: whatever piled up while the thread was sending goes out
    as one event per pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, tuple[BaseChannelLayer, dict[str, Any]]] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = False

    def put(self, layer: BaseChannelLayer, pool_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            self._pending[pool_id] = (layer, message)
            # A forked child inherits the parent's object but not its thread.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                if self._stopping:
                    return
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="realtime-publisher", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def flush(self, timeout: float = FLUSH_SECONDS) -> None:
        """Send what is pending and stop the thread (at exit): a change committed just
        before a worker stops still reaches the pages."""
        with self._lock:
            self._stopping = True
            thread = self._thread if self._pid == os.getpid() else None
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    batch, self._pending = self._pending, {}
                    stopping = self._stopping
                if batch:
                    loop.run_until_complete(self._send(batch))
                if stopping:
                    return
        finally:
            loop.close()

    async def _send(self, batch: dict[str, tuple[BaseChannelLayer, dict[str, Any]]]) -> None:
        pools = list(batch)
        results = await asyncio.gather(
            *(
                layer.group_send(pool_group(pool_id), message)
                for pool_id, (layer, message) in batch.items()
            ),
            return_exceptions=True,
        )
        for pool_id, result in zip(pools, results, strict=True):
            if isinstance(result, BaseException):
                _failed(pool_id, result)


publisher = Publisher()
atexit.register(publisher.flush)


def _publish(pool_id: str, message: dict[str, Any]) -> None:
    try:
        layer = get_channel_layer()
        if layer is None:
            return
        if isinstance(layer, InMemoryChannelLayer):
            _send_on_hub_loops(layer, pool_id, message)
        else:
            publisher.put(layer, pool_id, message)
    except Exception:
        _failed(pool_id)


_sending: set[asyncio.Task[None]] = set()  # held until done: a loop keeps weak references


def _send_on_hub_loops(layer: InMemoryChannelLayer, pool_id: str, message: dict[str, Any]) -> None:
    """The in-memory layer's queues belong to the event loop of the hub that listens, so the
    send runs there. A request's thread has no loop of its own: async_to_sync made a new one,
    in a new thread, for every change, and put into the hub's queue from that thread (which
    does not wake the hub's loop: the page heard of it at the loop's next wake-up). A
    process serves its sockets on one loop (daphne's; a test, one at a time): with hubs of
    one pool on two live loops each would hear the change twice."""
    from poolsadmin.realtime.fanout import pool_hub_loops  # fanout imports this module

    def send() -> None:
        task = asyncio.ensure_future(layer.group_send(pool_group(pool_id), message))
        _sending.add(task)
        task.add_done_callback(sent)

    def sent(task: asyncio.Task[None]) -> None:
        _sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _failed(pool_id, task.exception())

    for loop in pool_hub_loops(pool_id):
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (a test's)
            loop.call_soon_threadsafe(send)


class _OnCommit:
    """The commit hook of one pool's event; `pool_id` lets a later call of the same
    transaction see that the event is already on its way."""

    def __init__(self, pool_id: str, message: dict[str, Any]) -> None:
        self.pool_id = pool_id
        self.message = message

    def __call__(self) -> None:
        _publish(self.pool_id, self.message)


def _already_on_commit(pool_id: str) -> bool:
    """Whether this transaction already publishes for the pool when it commits. A hook
    registered inside a savepoint is dropped by Django when that savepoint rolls back; one
    still in the list was registered in a savepoint that was released (and can no longer roll
    back alone) or in one we are still inside (whose rollback would drop ours too). So any
    such hook runs whenever ours would."""
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        return False
    return any(
        isinstance(hook, _OnCommit) and hook.pool_id == pool_id
        for _savepoints, hook, _robust in connection.run_on_commit
    )


def broadcast_pool_changed(*, pool_id: str, kind: str, payload: dict[str, object]) -> None:
    """Tell the pool's pages that it changed, once the transaction commits; further changes
    of the pool in the same transaction add nothing (the first event's kind is kept)."""
    if _already_on_commit(pool_id):
        return
    transaction.on_commit(_OnCommit(pool_id, {"type": "pool.changed", "kind": kind, **payload}))
