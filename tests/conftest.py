from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.conf import settings

from poolsadmin.lib import clock

IS_POSTGRES = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked for the other database are deselected, not skipped: CI runs the suite
    once on each database, and under CI=true nothing may be skipped."""
    wrong = "sqlite_only" if IS_POSTGRES else "postgres_only"
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (drop if item.get_closest_marker(wrong) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    db = settings.DATABASES["default"]
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    return f"poolsadmin database: {engine} {db.get('NAME')}; CI={os.environ.get('CI', '')}"


@pytest.fixture(autouse=True)
def _reset_clock() -> Iterator[None]:
    clock.reset()
    yield
    clock.reset()
