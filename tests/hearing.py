"""Time passing for the record that agents can be heard (agents/liveness.py).

The record runs on the database's clock, which a test cannot move: these move the ledger clock
(agents' heartbeats, lib/clock.py) and age the record by as much.
"""

from __future__ import annotations

from datetime import timedelta

from django.db.models import F

from poolsadmin.agents.liveness import hearing_touch
from poolsadmin.agents.models import Hearing
from poolsadmin.lib import clock


def _age(seconds: int, *, heard: bool) -> None:
    """Time passes for the record: it is `seconds` older (and so is its latest touch, unless
    somebody kept touching it meanwhile)."""
    by = timedelta(seconds=seconds)
    fields = {"since": F("since") - by, "deaf_from": F("deaf_from") - by}
    if not heard:
        fields["heard_at"] = F("heard_at") - by
    Hearing.objects.update(**fields)


def listen(seconds: int) -> None:
    """A web process hears agents for `seconds`."""
    clock.advance(seconds)
    _age(seconds, heard=True)
    assert not hearing_touch(actor="system:web")


def down(seconds: int) -> None:
    """Nobody listens for `seconds` (web, database or the agents' route down)."""
    clock.advance(seconds)
    _age(seconds, heard=False)


def outage(seconds: int) -> None:
    """Nobody listens for `seconds`, then the web is back."""
    down(seconds)
    assert hearing_touch(actor="system:web"), "the touch ends the gap"
