"""Could poolsadmin hear its agents? (SPEC 5: an outage of poolsadmin itself is not an outage
of its agents.)

An agent's silence means something only while somebody was listening. Two durable records say
when that was (table `agent_hearing`, one row each):

* `agent-api`: every web process touches it every few seconds while it runs and can write the
  ledger (`hearing_keeper_start`, started by the ASGI application). Web down or database
  down, nobody touches it: agents could not be heard.
* `reconciler`: the reconciler leader touches it on every pass. Worker down, nobody judged
  silence either, and on its return it gives agents the same grace as after a web outage
  (a grace after start-up, as Kubernetes' node lifecycle controller does after its own
  restart).

A touch that finds the previous one older than its gap (`hearing_gap`) starts a new stretch
(`since`) and keeps the gap (`deaf_from` .. `since`). Every liveness check counts an agent's silence
from `max(last heartbeat, since)` of both records, and judges nobody while the web's record
is stale (nobody can hear agents right now). A restart shorter than the gap changes nothing.

No record (tests of one step, a database from before this table) means no outage is known:
silence counts from the last heartbeat, as it always did.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction

from poolsadmin.agents.models import Hearing
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import duration, stamp

logger = logging.getLogger(__name__)

AGENT_API = "agent-api"
RECONCILER = "reconciler"
# A record older than this many ticks (`POOLSADMIN_HEARING_TICK_SECONDS`, 5 s: each web
# process touches `agent-api` that often) is a gap. The agent API's: four missed ticks (20 s).
# The reconciler's: a minute, since one pass over many pools with a slow cluster takes a
# while, and a worker that is down while the web hears agents loses nothing anyway. An
# 8-second crash-restart of the web or the worker is not an outage.
GAP_TICKS = {AGENT_API: 4, RECONCILER: 12}

WHO = {AGENT_API: "the agent API", RECONCILER: "the reconciler"}


def hearing_tick() -> float:
    return float(settings.POOLSADMIN_HEARING_TICK_SECONDS)


def hearing_gap(name: str) -> timedelta:
    """A record of `name` older than this means nobody was listening (a gap)."""
    return timedelta(seconds=GAP_TICKS[name] * hearing_tick())


@dataclass(frozen=True)
class Liveness:
    """What may be concluded from an agent's silence now."""

    # False: no web process has proved lately that it can hear agents (web or database
    # down): nobody is judged, whatever their last heartbeat.
    listening: bool = True
    # Silence counts from here at the earliest: the end of the latest outage of the agent API
    # or of the reconciler. None: no outage is known.
    since: datetime | None = None
    # Which record set `since` (`agent-api` or `reconciler`), and the gap it ended.
    resumed: str = ""
    deaf_from: datetime | None = None
    # The agent API's latest touch (None: never).
    heard_at: datetime | None = None

    def judges(self, cutoff: datetime) -> bool:
        """May silence that began before `cutoff` be judged? Only while listening, and only
        if poolsadmin has been listening since before the cutoff."""
        return self.listening and (self.since is None or self.since < cutoff)

    def silent_since(self, last_ping_at: datetime | None) -> datetime | None:
        """When an agent's silence began, as far as anybody could hear."""
        if last_ping_at is None or self.since is None:
            return last_ping_at or self.since
        return max(last_ping_at, self.since)

    def waiting_until(self, *, allowance: timedelta, now: datetime) -> datetime | None:
        """Until when checks with this `allowance` (timeout, + grace) are still waiting out an
        outage; None if they are not."""
        if self.since is None:
            return None
        until = self.since + allowance
        return until if until > now else None

    def words(self, *, allowance: timedelta, now: datetime) -> str:
        """For the dashboard and the diagnosis: why silence is not judged now, or ""."""
        if not self.listening:
            last = stamp(self.heard_at) if self.heard_at else "never"
            return (
                "Liveness checks are paused: poolsadmin cannot hear agents right now (the "
                f"agent API last proved it was serving at {last}). No agent is taken offline, "
                "no task failed and no pod deleted until it hears them again."
            )
        until = self.waiting_until(allowance=allowance, now=now)
        if until is None:
            return ""
        assert self.since is not None
        gap = (
            f" from {stamp(self.deaf_from)} to {stamp(self.since)}"
            f" ({duration(self.since - self.deaf_from)})"
            if self.deaf_from
            else f" until {stamp(self.since)}"
        )
        return (
            f"Liveness checks are waiting out a control-plane outage: {WHO[self.resumed]} was "
            f"down{gap}. An agent's silence counts from {stamp(self.since)}, so none is "
            f"failed or deleted for silence before {stamp(until)}."
        )


def liveness_read(*, now: datetime) -> Liveness:
    """The liveness allowance at `now`, from both hearing records (one query)."""
    rows = {row.name: row for row in Hearing.objects.filter(name__in=[AGENT_API, RECONCILER])}
    api = rows.get(AGENT_API)
    listening = api is None or api.heard_at >= now - hearing_gap(AGENT_API)
    latest = max(rows.values(), key=lambda row: row.since, default=None)
    if latest is None:
        return Liveness(listening=listening)
    return Liveness(
        listening=listening,
        since=latest.since,
        resumed=latest.name,
        deaf_from=latest.deaf_from,
        heard_at=api.heard_at if api else None,
    )


def hearing_touch(*, name: str, actor: str, now: datetime | None = None) -> bool:
    """`name` is listening now. True if this touch ends a gap (or is the first ever), which
    is recorded as a `hearing.resumed` event.

    One conditional UPDATE per touch, whichever of any number of processes touches: a fresh
    record only moves `heard_at`; a stale one also starts a new stretch, and of two processes
    finding it stale only the first changes it (the second sees it fresh)."""
    now = now or clock.now()
    fresh = now - hearing_gap(name)
    if Hearing.objects.filter(name=name, heard_at__gte=fresh).update(heard_at=now):
        return False
    with transaction.atomic():
        stale = Hearing.objects.select_for_update().filter(name=name, heard_at__lt=fresh).first()
        if stale is not None:
            Hearing.objects.filter(name=name, heard_at=stale.heard_at).update(
                heard_at=now, since=now, deaf_from=stale.heard_at
            )
            deaf_from: datetime | None = stale.heard_at
        else:
            try:
                with transaction.atomic():
                    Hearing.objects.create(name=name, heard_at=now, since=now)
            except IntegrityError:  # another process inserted it first: it is fresh
                return False
            deaf_from = None
        event_record(
            actor=actor,
            kind="hearing.resumed",
            target_type="hearing",
            target_id=name,
            before={"heard_at": stamp(deaf_from) if deaf_from else None},
            after={"since": stamp(now)},
            reason=(
                f"{WHO[name]} was down from {stamp(deaf_from)} to {stamp(now)} "
                f"({duration(now - deaf_from)}): agents' silence counts from {stamp(now)}"
                if deaf_from
                else f"{WHO[name]} started: agents' silence counts from {stamp(now)}"
            ),
        )
    if deaf_from is None:
        logger.info("%s is listening (first record) since %s", name, stamp(now))
    else:
        logger.warning(
            "%s is listening again since %s after a gap from %s: agents' silence counts from now",
            name,
            stamp(now),
            stamp(deaf_from),
        )
    return True


# --- the web's keeper ----------------------------------------------------------------------------

_keeper: threading.Thread | None = None
_keeper_lock = threading.Lock()


def _keep(stop: threading.Event, interval: float) -> None:
    while not stop.is_set():
        try:
            hearing_touch(name=AGENT_API, actor="system:web")
        except Exception:  # the database is down: that is exactly the gap to record
            logger.warning("could not record that the agent API is listening", exc_info=True)
        finally:
            connection.close()  # the thread's own connection: back to the pool between ticks
        stop.wait(interval)


def hearing_keeper_start(*, interval: float | None = None) -> threading.Event | None:
    """Start this process's keeper thread (once): it touches `agent-api` every `interval`
    seconds (default: one tick) while the process runs. Returns the event that stops it, or
    None if a keeper already runs."""
    global _keeper
    interval = interval or hearing_tick()
    with _keeper_lock:
        if _keeper is not None and _keeper.is_alive():
            return None
        stop = threading.Event()
        _keeper = threading.Thread(
            target=_keep, args=(stop, interval), name="poolsadmin-hearing", daemon=True
        )
        _keeper.start()
        return stop
