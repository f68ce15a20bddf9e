from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.processes import own_database


@pytest.fixture
def database_env(tmp_path: Path, collected_static: Path) -> Iterator[dict[str, str]]:
    """Environment for the stack's processes: a database of their own, on this run's engine,
    and the collected static files."""
    with own_database(tmp_path, collected_static) as env:
        yield env
