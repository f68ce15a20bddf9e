"""Work reaches a waiting agent at once (issue 9, item 5; SPEC 7 welcomes a nudge).

An agent may ask its heartbeat to wait (`"wait": seconds`, at most MAX_WAIT_SECONDS): when the
heartbeat has nothing for it, the answer is held until work is dispatched to this agent or the
wait ends, and then the heartbeat is answered as usual. Work still travels only in heartbeat
answers, so any web replica serves any agent and an agent that asks no wait gets today's
answer at once.

* The scheduler's dispatch calls `agents_nudge` inside its transaction: on commit, a
  `pg_notify` on AGENTS_CHANNEL carries the agent ids (lib/wake.py `notify`), and this
  process's waiters are woken directly.
* Each web process has one LISTEN connection (`Fanout`) that wakes the threads waiting for
  those ids. A waiting heartbeat holds a thread and an Event, not a database connection: it
  hands its connection back to the pool before it waits.
* Where nothing listens (SQLite, or while the LISTEN connection is being made again) the
  waiter looks at the ledger itself every POLL_SECONDS, and, as a safety net for a lost
  notice, every SAFETY_POLL_SECONDS while listening.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from django.db import connection

from poolsadmin.agents.models import Agent
from poolsadmin.agents.services import HeartbeatAnswer, agent_heartbeat
from poolsadmin.lib.wake import Fanout, notify
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask

AGENTS_CHANNEL = "poolsadmin_agents"  # payload: agent ids that were given work
MAX_WAIT_SECONDS = 20  # well under the pools' heartbeat timeout (2 minutes by default)
POLL_SECONDS = 0.25
SAFETY_POLL_SECONDS = 5.0

_fanout = Fanout(AGENTS_CHANNEL)


def agents_nudge(*, agent_ids: Iterable[str]) -> None:
    """Wake the heartbeats of `agent_ids` that wait for work, when the current transaction
    (the dispatch that gave them the work) commits."""
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


def agent_heartbeat_wait(
    *,
    agent: Agent,
    running_task_ids: list[int],
    cpu: float | None = None,
    memory: float | None = None,
    wait: float = 0.0,
) -> HeartbeatAnswer:
    """`agent_heartbeat`; if its answer has no assignment and no cancellation and `wait` > 0,
    wait until work is dispatched to the agent or `wait` seconds pass, and if work came, the
    heartbeat again (its answer has the work, `woken` set). Without work, the first answer."""
    beat = functools.partial(
        agent_heartbeat, agent=agent, running_task_ids=running_task_ids, cpu=cpu, memory=memory
    )
    with _fanout.waiter(agent.agent_id) as woken:
        # Registered before the heartbeat reads the ledger: a dispatch that commits after the
        # read wakes it; one that committed before is in the answer.
        first = beat()
        if wait <= 0 or first.assignments or first.cancellations:
            return first
        _release_connection()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            step = SAFETY_POLL_SECONDS if _fanout.listening.is_set() else POLL_SECONDS
            if woken.wait(min(left, step)) or _has_assignment(agent.agent_id):
                break
        else:
            return first
    answer = beat()
    answer.woken = True
    return answer
