"""Killing PostgreSQL backends for real, as an operator's `pg_terminate_backend` or a failover
does: from a second connection, while the test's own connection believes it is fine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection


def _admin_connection() -> psycopg.Connection[Any]:
    db = settings.DATABASES["default"]
    return psycopg.connect(
        dbname=str(db["NAME"]),
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        autocommit=True,
    )


def backend_pid() -> int:
    """The backend of this thread's connection (connecting if need be)."""
    connection.ensure_connection()
    pid: int = connection.connection.info.backend_pid
    return pid


def terminate_backend(pid: int) -> None:
    """Terminate backend `pid` and wait (up to 10 s) until it is gone."""
    with _admin_connection() as admin:
        row = admin.execute("SELECT pg_terminate_backend(%s, 10000)", [pid]).fetchone()
    assert row == (True,), f"backend {pid} was not terminated"


@dataclass
class KillSwitch:
    killed: list[int] = field(default_factory=list)
    queries: int = 0  # queries this thread ran from the kill on


@contextmanager
def backend_killed_at_first_query() -> Iterator[KillSwitch]:
    """Within the block, the first query of this thread's connection finds its backend
    terminated: the request or pass that runs it loses its connection in the middle."""
    switch = KillSwitch()

    def kill_once(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        if not switch.killed:
            pid = context["connection"].connection.info.backend_pid
            terminate_backend(pid)
            switch.killed.append(pid)
        switch.queries += 1
        return execute(sql, params, many, context)

    with connection.execute_wrapper(kill_once):
        yield switch
