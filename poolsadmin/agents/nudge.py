"""Work reaches a waiting agent at once (issue 9, item 5; SPEC 7 welcomes a nudge).

An agent may ask its heartbeat to wait (`"wait": seconds`, at most MAX_WAIT_SECONDS): when the
heartbeat has nothing for it, the answer is held until work is dispatched to this agent or the
wait ends, and then the heartbeat is answered as usual. Work still travels only in heartbeat
answers, so any web replica serves any agent and an agent that asks no wait gets today's
answer at once.

* The scheduler's dispatch calls `agents_nudge` inside its transaction (and so does a
  cancel of a task an agent runs: the cancellation is in the answer too): on commit, a
  `pg_notify` on AGENTS_CHANNEL carries the agent ids (lib/wake.py `notify`), and this
  process's waiters are woken directly.
* Each web process has one LISTEN connection (`Fanout`) that wakes the threads waiting for
  those ids. A waiting heartbeat holds a thread and an Event, not a database connection: it
  hands its connection back to the pool before it waits.
* A process holds at most LONG_POLLS_MAX waiting heartbeats (the Fanout counts its waiters;
  `nudge_waiter` gives None past them): each takes one of the threads set aside for them
  (lib/http_app.py). Past that a heartbeat that asks to wait is answered at once, without
  `woken`, as if it had asked none: the agent paces itself by its interval, and the
  dashboard, the API and the probes keep their threads.
* Where nothing listens (SQLite, or while the LISTEN connection is being made again) the
  waiter looks at the ledger itself every POLL_SECONDS, and, as a safety net for a lost
  notice, every SAFETY_POLL_SECONDS while listening.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import connection

from poolsadmin.lib.http_app import idle
from poolsadmin.lib.wake import Fanout, notify
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask

AGENTS_CHANNEL = "poolsadmin_agents"  # payload: agent ids that were given work
MAX_WAIT_SECONDS = 20  # well under the pools' heartbeat timeout (2 minutes by default)
POLL_SECONDS = 0.25
SAFETY_POLL_SECONDS = 5.0

_fanout = Fanout(AGENTS_CHANNEL)


def agents_nudge(*, agent_ids: Iterable[str | None]) -> None:
    """Wake the heartbeats of `agent_ids` that wait, when the current transaction (the
    dispatch that gave them work, the cancel of their task) commits."""
    notify(AGENTS_CHANNEL, [a for a in agent_ids if a], fanout=_fanout)


def agents_waiting(*, agent_id: str) -> int:
    """How many heartbeats of `agent_id` wait in this process."""
    return _fanout.waiting(agent_id)


def _has_assignment(agent_id: str) -> bool:
    """A dispatch to the agent that it has not acknowledged yet: what a heartbeat answers."""
    found = WorkspaceTask.objects.filter(
        agent_id=agent_id, status=TaskStatus.RUNNING, acked_at__isnull=True
    ).exists()
    _release_connection()
    return found


def _release_connection() -> None:
    # Back to the pool (PostgreSQL) or closed (SQLite): a waiting heartbeat holds none. Not
    # inside a caller's transaction (a test's), which the connection must keep.
    if not connection.in_atomic_block:
        connection.close()


@contextmanager
def nudge_waiter(*, agent_id: str) -> Iterator[threading.Event | None]:
    """An Event that the next nudge of `agent_id` sets, from now on: enter it before reading
    the ledger, so that no dispatch between the read and the wait is missed. None if this
    process already holds LONG_POLLS_MAX waiting heartbeats."""
    with _fanout.waiter(agent_id, most=settings.LONG_POLLS_MAX) as woken:
        yield woken


def nudge_wait(*, woken: threading.Event, agent_id: str, seconds: float) -> bool:
    """Wait up to `seconds` for a nudge of `agent_id` (or, where nothing listens, for work
    the agent has not acknowledged yet, looked up in the ledger). True if it came. Holds no
    database connection while it waits."""
    _release_connection()
    deadline = time.monotonic() + seconds
    with idle():  # its place among the web process's working requests goes to another
        while (left := deadline - time.monotonic()) > 0:
            step = SAFETY_POLL_SECONDS if _fanout.listening.is_set() else POLL_SECONDS
            if woken.wait(min(left, step)) or _has_assignment(agent_id):
                return True
    return False
