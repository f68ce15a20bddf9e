from __future__ import annotations

from datetime import datetime, timedelta


def duration(delta: timedelta) -> str:
    """`45 s`, `20 min`, `3 h`, `2 d 4 h`: short, for sentences operators read."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        rest = minutes % 60
        return f"{hours} h" if hours >= 10 or rest == 0 else f"{hours} h {rest} min"
    return f"{hours // 24} d {hours % 24} h"


def stamp(moment: datetime | None) -> str:
    """`2025-03-05 18:00:00 UTC`, or in the moment's own zone with its name
    (`2025-03-05 18:00:00 CET`: a pool's freeze window ends at 18:00 in Berlin, which is not
    18:00 UTC). A naive moment is taken as UTC, as Django stores them."""
    if moment is None:
        return "never"
    if moment.tzinfo is None or moment.utcoffset() == timedelta(0):
        return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")
