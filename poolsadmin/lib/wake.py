"""Wake a waiting loop when work arrives, instead of letting it find the work at its next poll
(issue 9: a submitted task waited up to the scheduler's 0.5 s interval before dispatch).

`notify(channel, keys)` and `Fanout` do the same for many waiters that each wait for one key
(an agent's long-poll heartbeat waits for work for that agent): the keys travel in the
notice's payload, and one LISTEN connection per process hands each notice to the threads
waiting for its keys, so a waiter holds a thread and an Event, never a database connection.

On PostgreSQL `wake()` is a `notify` inside the caller's transaction: the server delivers it
at commit and drops it on rollback, so a loop is never woken for a change that did not happen,
and the notices of one transaction on one channel fold into one. `Listener.wait()` is a waiter
of a `Fanout` of its own, held for good. On SQLite, or while the listening connection cannot
be made, `wait()` just sleeps: the loops' polling is the fallback, and it is always there,
since a notice can be missed (a listener that reconnects, a worker that starts after the
commit).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import psycopg
from django.db import connection, transaction

logger = logging.getLogger(__name__)

WORK_CHANNEL = "poolsadmin_work"  # a task became dispatchable, or capacity came free
WORK_KEY = "work"  # the one key of its notices
STOP_CHECK_SECONDS = 0.25  # how soon a waiting Listener notices `stop`
FIRST_LISTEN_SECONDS = 10.0  # a Listener's first wait, for its connection to listen


def wake(channel: str = WORK_CHANNEL) -> None:
    """Wake the listeners of `channel` when the current transaction commits."""
    notify(channel, [WORK_KEY])


def listen_connect(channel: str) -> psycopg.Connection[object]:
    """A connection of its own (not one of the pool's: it is held for good) that LISTENs on
    `channel`, with the default database's parameters."""
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    conn = psycopg.connect(**params, autocommit=True)
    conn.execute(f'LISTEN "{channel}"')
    return conn


# PostgreSQL refuses a payload of 8,000 bytes or more: longer key lists go in several notices.
PAYLOAD_BYTES = 7000


def _payloads(keys: list[str]) -> Iterator[str]:
    chunk: list[str] = []
    size = 0
    for key in keys:
        if chunk and size + len(key) + 1 > PAYLOAD_BYTES:
            yield ",".join(chunk)
            chunk, size = [], 0
        chunk.append(key)
        size += len(key) + 1
    if chunk:
        yield ",".join(chunk)


def notify(channel: str, keys: Iterable[str], *, fanout: Fanout | None = None) -> None:
    """Wake whoever waits for one of `keys` on `channel`, when the current transaction commits
    (never for a change that is rolled back): other processes by `pg_notify` on PostgreSQL,
    this process's `fanout` directly (so the SQLite default, which has no notices, wakes the
    waiters of its own process at once too). Keys must not contain a comma."""
    unique = sorted(set(keys))
    if not unique:
        return
    if fanout is not None:
        transaction.on_commit(lambda: fanout.deliver(unique))
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for payload in _payloads(unique):
            cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])


class Fanout:
    """One LISTEN connection per process on `channel` (made by a daemon thread on first use,
    and again after an error), handing each notice to the threads that wait for one of its
    keys. `listening` is set while the connection listens: a waiter that finds it unset
    (SQLite, the connection lost) must look for itself, since notices sent meanwhile are
    gone."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.listening = threading.Event()
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._count = 0  # waiters of every key
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def deliver(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                for woken in self._waiters.get(key, ()):
                    woken.set()

    def waiting(self, key: str) -> int:
        """How many threads wait for `key` (for tests and metrics)."""
        with self._lock:
            return len(self._waiters.get(key, ()))

    @contextmanager
    def waiter(self, key: str, *, most: int | None = None) -> Iterator[threading.Event | None]:
        """An Event set by the next notice for `key` from now on; register it before reading
        the state it waits on, so that no change between the read and the wait is missed.
        None, and nothing registered, if `most` waiters (of every key) are registered
        already."""
        woken = threading.Event()
        with self._lock:
            full = most is not None and self._count >= most
            if not full:
                self._waiters.setdefault(key, set()).add(woken)
                self._count += 1
        if full:
            yield None
            return
        self._start_listener()
        try:
            yield woken
        finally:
            with self._lock:  # registered above, and removed only here
                waiters = self._waiters[key]
                waiters.discard(woken)
                self._count -= 1
                if not waiters:
                    del self._waiters[key]

    def _start_listener(self) -> None:
        if connection.vendor != "postgresql":
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            # Each thread has its own stop: a stop() racing a restart ends the old thread
            # and cannot clear the new one's.
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._listen, args=(self._stop,), name=f"fanout-{self.channel}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the listening thread and its connection (tests; the next waiter starts it
        again)."""
        with self._lock:
            thread, stop = self._thread, self._stop
            self._thread = None
        stop.set()
        if thread is not None:
            thread.join()

    def _listen(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with listen_connect(self.channel) as conn:
                    self.listening.set()
                    while not stop.is_set():
                        # A timeout, so that stop() is noticed within a second.
                        for notice in conn.notifies(timeout=1.0):
                            self.deliver(notice.payload.split(","))
            except psycopg.Error as exc:
                logger.warning("lost the LISTEN connection on %s: %s", self.channel, exc)
            finally:
                self.listening.clear()
            stop.wait(1.0)


class Listener:
    """One loop's wake-up on `channel` (the worker's scheduler): a `Fanout` waiter held for
    the listener's whole life, so a notice that arrives while the loop runs a pass wakes its
    next wait, and the notices of many commits fold into one wake-up."""

    def __init__(self, channel: str = WORK_CHANNEL) -> None:
        self._fanout = Fanout(channel)
        self._held = ExitStack()
        self._woken: threading.Event | None = None

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Wait up to `timeout` seconds for a notice (True); False otherwise, and at once
        when `stop` is set. On SQLite, or until the connection listens, it only waits."""
        if connection.vendor != "postgresql":
            stop.wait(timeout)
            return False
        if self._woken is None:
            woken = self._held.enter_context(self._fanout.waiter(WORK_KEY))
            assert woken is not None  # a waiter without `most` is always registered
            self._woken = woken
            # The first wait lasts until the connection listens (as long as connecting may
            # take): a notice sent before that would be lost.
            self._fanout.listening.wait(max(timeout, FIRST_LISTEN_SECONDS))
        deadline = time.monotonic() + timeout
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if not self._fanout.listening.is_set():
                self._fanout.listening.wait(min(left, STOP_CHECK_SECONDS))
            elif self._woken.wait(min(left, STOP_CHECK_SECONDS)):
                self._woken.clear()
                return True
        return False

    def close(self) -> None:
        self._held.close()
        self._woken = None
        self._fanout.stop()
