"""Wake a waiting loop when work arrives, instead of letting it find the work at its next poll
(issue 9: a submitted task waited up to the scheduler's 0.5 s interval before dispatch).

`notify(channel, keys)` and `Fanout` do the same for many waiters that each wait for one key
(an agent's long-poll heartbeat waits for work for that agent): the keys travel in the
notice's payload, and one LISTEN connection per process hands each notice to the threads
waiting for its keys, so a waiter holds a thread and an Event, never a database connection.

On PostgreSQL `wake()` is a `pg_notify` inside the caller's transaction: the server delivers it
at commit and drops it on rollback, so a loop is never woken for a change that did not happen,
and the notices of one transaction on one channel fold into one. `Listener.wait()` waits on a
connection of its own that LISTENs. On SQLite, or while the listening connection cannot be
made, `wait()` just sleeps: the loops' polling is the fallback, and it is always there, since a
notice can be missed (a listener that reconnects, a worker that starts after the commit).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psycopg
from django.db import connection, transaction

logger = logging.getLogger(__name__)

WORK_CHANNEL = "poolsadmin_work"  # a task became dispatchable, or capacity came free


def wake(channel: str = WORK_CHANNEL) -> None:
    """Wake the listeners of `channel` when the current transaction commits."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [channel])


def listen_connect(channel: str) -> psycopg.Connection[object]:
    """A connection of its own (not one of the pool's: it is held for good) that LISTENs on
    `channel`, with the default database's parameters."""
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    conn = psycopg.connect(**params, autocommit=True)
    conn.execute(f'LISTEN "{channel}"')
    return conn


class Listener:
    """A connection that LISTENs on one channel, made on first use and again after an error."""

    def __init__(self, channel: str = WORK_CHANNEL) -> None:
        self.channel = channel
        self._conn: psycopg.Connection[object] | None = None

    def _connect(self) -> psycopg.Connection[object] | None:
        if connection.vendor != "postgresql":
            return None
        if self._conn is None or self._conn.closed:
            self._conn = listen_connect(self.channel)
        return self._conn

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Wait up to `timeout` seconds for a notice (True) or for `stop`; False otherwise."""
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            logger.warning("cannot LISTEN on %s, polling instead: %s", self.channel, exc)
            conn = None
        if conn is None:
            stop.wait(timeout)
            return False
        try:
            woken = any(True for _ in conn.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error as exc:
            logger.warning("lost the LISTEN connection on %s: %s", self.channel, exc)
            self.close()
            stop.wait(min(timeout, 1.0))
            return False
        if woken:  # several commits may have notified meanwhile: one pass sees them all
            for _ in conn.notifies(timeout=0):
                pass
        return woken

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
    def waiter(self, key: str) -> Iterator[threading.Event]:
        """An Event set by the next notice for `key` from now on; register it before reading
        the state it waits on, so that no change between the read and the wait is missed."""
        self._start_listener()
        woken = threading.Event()
        with self._lock:
            self._waiters.setdefault(key, set()).add(woken)
        try:
            yield woken
        finally:
            with self._lock:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(woken)
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
