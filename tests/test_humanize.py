"""Times in sentences operators read (lib/humanize.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from poolsadmin.lib.humanize import duration, stamp
from poolsadmin.pools.selectors import pool_freeze_state
from poolsadmin.pools.services import pool_freeze_window_add
from poolsadmin.scheduler.rules import pool_block
from tests.ledger import ADMIN, make_pool


def test_a_utc_moment_says_utc() -> None:
    assert stamp(datetime(2025, 3, 5, 17, 0, tzinfo=UTC)) == "2025-03-05 17:00:00 UTC"
    assert stamp(None) == "never"


def test_a_moment_in_a_pools_own_zone_names_that_zone_not_utc() -> None:
    """Issue 8: a Berlin pool's freeze "until 18:00 UTC" in fact ended at 17:00 UTC."""
    berlin = datetime(2025, 3, 5, 18, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert stamp(berlin) == "2025-03-05 18:00:00 CET"
    summer = datetime(2025, 7, 5, 18, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert stamp(summer) == "2025-07-05 18:00:00 CEST"


@pytest.mark.django_db
def test_a_freeze_diagnosis_names_the_end_in_the_pools_zone() -> None:
    pool = make_pool(freeze_timezone="Europe/Berlin")
    pool_freeze_window_add(
        pool=pool,
        weekdays=[2],
        start=datetime(2025, 1, 1, 9).time(),
        end=datetime(2025, 1, 1, 18).time(),
        actor=ADMIN,
    )
    noon_utc = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)  # a Wednesday, 13:00 in Berlin
    state = pool_freeze_state(pool=pool, now=noon_utc)
    assert state.frozen and state.until is not None
    assert state.until.astimezone(UTC) == datetime(2025, 3, 5, 17, 0, tzinfo=UTC)
    blocked = pool_block(pool=pool, now=noon_utc)
    assert blocked is not None and "until 2025-03-05 18:00:00 CET" in blocked.text


def test_durations_are_short() -> None:
    assert duration(timedelta(seconds=45)) == "45 s"
    assert duration(timedelta(minutes=20)) == "20 min"
