"""Small formatting filters for the dashboard: ages and countdowns in the words operators
read in diagnoses (`lib.humanize`), and what an event changed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template

from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import duration, stamp

register = template.Library()


@register.filter
def ago(moment: datetime | None) -> str:
    """`3 min` since `moment` (the page says "ago" or "for" around it)."""
    if moment is None:
        return "—"
    return duration(clock.now() - moment)


@register.filter
def until(moment: datetime | None) -> str:
    """`21 h 50 min` from now to `moment`; `expired` once it has passed."""
    if moment is None:
        return "—"
    delta = moment - clock.now()
    if delta.total_seconds() <= 0:
        return "expired"
    return duration(delta)


@register.filter(name="stamp")
def stamp_filter(moment: datetime | None) -> str:
    return stamp(moment) if moment is not None else "—"


@register.filter
def changes(event: Event) -> list[tuple[str, str, str]]:
    """(field, before, after) for each field the event changed. A field without a before
    value (a creation) shows its after value alone, and is left out when that is empty."""
    before: dict[str, Any] = event.before or {}
    after: dict[str, Any] = event.after or {}
    rows = []
    for key, value in after.items():
        old = before.get(key)
        if old == value or (_empty(old) and _empty(value)):
            continue
        rows.append((key, "" if _empty(old) else _show(old), _show(value)))
    return rows


def _empty(value: Any) -> bool:
    return value is None or value == ""


def _show(value: Any) -> str:
    if _empty(value):
        return "—"
    if isinstance(value, str) and len(value) >= 19 and value[10:11] == "T":
        # Events store times as ISO strings; show them as every other time on the page.
        try:
            return stamp(datetime.fromisoformat(value))
        except ValueError:
            return value
    return str(value)
