"""Could poolsadmin hear its agents? (SPEC 5: an outage of poolsadmin itself is not an outage
of its agents.)

An agent's silence means something only while somebody was listening. A durable record says
when that was (table `agent_hearing`, row `agent-api`): every web process's keeper thread
(`hearing_keeper_start`, started by the ASGI application) asks the agent API, through the URL
the agents use (`POOLSADMIN_PUBLIC_URL`), to record that it is listening, every
`POOLSADMIN_HEARING_TICK_SECONDS`. So the record is only touched while a request can travel the
agents' way to a web process and that process can write the ledger: web down, database down,
the agents' route (Service, Ingress) broken or the web too overloaded to answer, and nobody
touches it.

A touch that finds the record older than the gap (4 ticks) starts a new stretch (`since`) and
keeps the gap (`deaf_from` .. `since`), with a `hearing.resumed` event. Every liveness check
asks `judges(allowance)`: nothing is judged while the record is stale (nobody can hear agents
right now), and silence is held against an agent only once poolsadmin has been listening for
the whole allowance (its heartbeat timeout, + grace). A restart shorter than the gap changes
nothing. The record runs on the database's clock (`Now()`), like the leases: processes whose
clocks disagree must still agree on whether there was a gap.

No record (tests of one step, a database from before this table, a keeper that never reached
the agent API) means no outage is known: silence counts from the last heartbeat, as it always
did.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import BooleanField, DurationField, ExpressionWrapper, F, Q, QuerySet
from django.db.models.functions import Now

from poolsadmin.agents.models import Agent, AgentStatus, Hearing
from poolsadmin.events.services import event_record
from poolsadmin.lib.humanize import duration, stamp

if TYPE_CHECKING:
    from poolsadmin.pools.models import AgentPool

logger = logging.getLogger(__name__)

AGENT_API = "agent-api"
# A record older than this many ticks is a gap: an 8-second crash-restart is not an outage.
GAP_TICKS = 4
# The keeper proves who is asking with this header (an HMAC of SECRET_KEY: every replica knows
# it, nobody else does), so that only poolsadmin itself can say it is listening.
HEARING_HEADER = "X-Poolsadmin-Hearing"


def hearing_tick() -> float:
    return float(settings.POOLSADMIN_HEARING_TICK_SECONDS)


def hearing_gap() -> timedelta:
    """The record older than this means nobody was listening (a gap)."""
    return timedelta(seconds=GAP_TICKS * hearing_tick())


def hearing_proof() -> str:
    key = settings.SECRET_KEY.encode()
    return hmac.new(key, b"poolsadmin agent-api hearing", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Liveness:
    """What may be concluded from an agent's silence now."""

    # False: nobody has proved lately that agents can be heard (web, database or the agents'
    # route down): nobody is judged, whatever their last heartbeat.
    listening: bool = True
    # How long poolsadmin has been listening without a gap, by the database's clock. None: no
    # record, no outage known.
    listening_for: timedelta | None = None
    # The end of the latest gap, and its start (None: the first record), for the words.
    since: datetime | None = None
    deaf_from: datetime | None = None
    # The latest touch (None: never).
    heard_at: datetime | None = None

    def judges(self, allowance: timedelta) -> bool:
        """May an agent silent for longer than `allowance` (its heartbeat timeout, + grace) be
        judged for it? Only while listening, and only once poolsadmin has been listening for
        longer than that: silence nobody could hear is not the agent's."""
        return self.listening and (self.listening_for is None or self.listening_for > allowance)

    def waiting_until(self, allowance: timedelta) -> datetime | None:
        """When checks with this `allowance` stop waiting out the latest outage; None if they
        are not waiting."""
        if self.since is None or self.listening_for is None or self.listening_for > allowance:
            return None
        return self.since + allowance

    def words(self, *, allowance: timedelta) -> str:
        """For the dashboard and the diagnosis: why silence is not judged now, or ""."""
        if not self.listening:
            return (
                "Liveness checks are paused: poolsadmin cannot hear agents right now (the "
                f"agent API last proved it was serving at {stamp(self.heard_at)}). No agent "
                "is taken offline, "
                "no task failed and no pod deleted until it hears them again."
            )
        until = self.waiting_until(allowance)
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
            "Liveness checks are waiting out a control-plane outage: poolsadmin could not "
            f"hear agents{gap}. An agent's silence counts from {stamp(self.since)}, so none is "
            f"failed or deleted for silence before {stamp(until)}."
        )


def liveness_read() -> Liveness:
    """The liveness allowance now, from the record (one query, on the database's clock)."""
    row = (
        Hearing.objects.filter(name=AGENT_API)
        .annotate(
            fresh=ExpressionWrapper(
                Q(heard_at__gte=Now() - hearing_gap()), output_field=BooleanField()
            ),
            age=ExpressionWrapper(Now() - F("since"), output_field=DurationField()),
        )
        .first()
    )
    if row is None:
        return Liveness()
    return Liveness(
        listening=bool(row.fresh),
        listening_for=row.age,
        since=row.since,
        deaf_from=row.deaf_from,
        heard_at=row.heard_at,
    )


def agents_lost(
    *, pool: AgentPool, now: datetime, liveness: Liveness, dry_run: bool = False
) -> QuerySet[Agent]:
    """The pool's agents lost to silence: offline, no heartbeat for `pool.lost_after`, and
    never for silence poolsadmin could not hear (`liveness`). A dry run also counts the live
    agents a pass would take offline first (silent that long is silent past the timeout).
    The ledger-side steps fail their tasks, cluster sync deletes their pods."""
    if not liveness.judges(pool.lost_after):
        return Agent.objects.none()
    statuses = [AgentStatus.OFFLINE]
    if dry_run:
        statuses += [AgentStatus.ONLINE, AgentStatus.DRAINING]
    return Agent.objects.filter(
        pool=pool,
        status__in=statuses,
        retired_at__isnull=True,
        last_ping_at__lt=now - pool.lost_after,
    )


def hearing_touch(*, actor: str) -> bool:
    """poolsadmin is listening now. True if this touch ends a gap (or is the first ever),
    which is recorded as a `hearing.resumed` event.

    One conditional UPDATE per touch, whichever of any number of processes touches: a fresh
    record only moves `heard_at`; a stale one also starts a new stretch, and of two processes
    finding it stale only the first changes it (the second sees it fresh)."""
    gap = hearing_gap()
    if Hearing.objects.filter(name=AGENT_API, heard_at__gte=Now() - gap).update(heard_at=Now()):
        return False
    with transaction.atomic():
        stale = (
            Hearing.objects.select_for_update()
            .filter(name=AGENT_API, heard_at__lt=Now() - gap)
            .first()
        )
        if stale is not None:
            # Conditional on the staleness, not on the value read: SQLite keeps Now() to the
            # millisecond, and an equality with the value read back would never match.
            if not Hearing.objects.filter(name=AGENT_API, heard_at__lt=Now() - gap).update(
                heard_at=Now(), since=Now(), deaf_from=stale.heard_at
            ):
                return False
        else:
            try:
                with transaction.atomic():
                    Hearing.objects.create(name=AGENT_API, heard_at=Now(), since=Now())
            except IntegrityError:  # another process inserted it first: it is fresh
                return False
        row = Hearing.objects.get(name=AGENT_API)
        deaf_from = row.deaf_from if stale is not None else None
        event_record(
            actor=actor,
            kind="hearing.resumed",
            target_type="hearing",
            target_id=AGENT_API,
            before={"heard_at": stamp(deaf_from) if deaf_from else None},
            after={"since": stamp(row.since)},
            reason=(
                f"poolsadmin could not hear agents from {stamp(deaf_from)} to "
                f"{stamp(row.since)} ({duration(row.since - deaf_from)}): agents' silence "
                f"counts from {stamp(row.since)}"
                if deaf_from
                else f"poolsadmin started listening: agents' silence counts from {stamp(row.since)}"
            ),
        )
    if deaf_from is None:
        logger.info("the agent API is listening (first record) since %s", stamp(row.since))
    else:
        logger.warning(
            "the agent API is listening again since %s after a gap from %s: agents' silence "
            "counts from now",
            stamp(row.since),
            stamp(deaf_from),
        )
    return True


# --- the web's keeper ----------------------------------------------------------------------------

_keeper: threading.Thread | None = None
_keeper_lock = threading.Lock()


def hearing_url() -> str:
    """Where the keeper asks: the agent API, by the URL the agents use."""
    return settings.POOLSADMIN_PUBLIC_URL.rstrip("/") + "/api/v1/agents/hearing"


def _keep(stop: threading.Event, interval: float, url: str) -> None:
    failures = 0
    # One tick first: the keeper starts with the application, before the server listens.
    while not stop.wait(interval):
        request = urllib.request.Request(
            url, data=b"", method="POST", headers={HEARING_HEADER: hearing_proof()}
        )
        try:
            with urllib.request.urlopen(request, timeout=max(interval, 1.0)) as response:
                response.read()
            failures = 0
        except Exception as error:  # exactly the gap to record: agents cannot be heard either
            failures += 1
            if failures == 1 or failures % 60 == 0:
                logger.warning(
                    "the agent API at %s did not answer (%s, %d times in a row): agents' "
                    "silence is not held against them meanwhile",
                    url,
                    error,
                    failures,
                )


def hearing_keeper_start(
    *, interval: float | None = None, url: str | None = None
) -> threading.Event | None:
    """Start this process's keeper thread (once): every `interval` seconds (default: one
    tick) it asks the agent API at `url` (default `hearing_url()`) to record that it is
    listening. Returns the event that stops it, or None if a keeper already runs."""
    global _keeper
    with _keeper_lock:
        if _keeper is not None and _keeper.is_alive():
            return None
        stop = threading.Event()
        _keeper = threading.Thread(
            target=_keep,
            args=(stop, interval or hearing_tick(), url or hearing_url()),
            name="poolsadmin-hearing",
            daemon=True,
        )
        _keeper.start()
        return stop
