"""Wake a waiting loop when work arrives, instead of letting it find the work at its next poll
(issue 9: a submitted task waited up to the scheduler's 0.5 s interval before dispatch).

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

import psycopg
from django.db import connection

logger = logging.getLogger(__name__)

WORK_CHANNEL = "poolsadmin_work"  # a task became dispatchable, or capacity came free


def wake(channel: str = WORK_CHANNEL) -> None:
    """Wake the listeners of `channel` when the current transaction commits."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [channel])


class Listener:
    """A connection that LISTENs on one channel, made on first use and again after an error."""

    def __init__(self, channel: str = WORK_CHANNEL) -> None:
        self.channel = channel
        self._conn: psycopg.Connection[object] | None = None

    def _connect(self) -> psycopg.Connection[object] | None:
        if connection.vendor != "postgresql":
            return None
        if self._conn is None or self._conn.closed:
            params = connection.get_connection_params()
            params.pop("cursor_factory", None)
            params.pop("context", None)
            conn = psycopg.connect(**params, autocommit=True)
            conn.execute(f'LISTEN "{self.channel}"')
            self._conn = conn
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
