"""What readiness means for a web process: each check answers None (fine) or what failed.

`/readyz` runs them all and names every failure, so an operator reading a failed probe (or
`kubectl describe pod`) learns which dependency is missing without a shell in the pod.
Messages are short and never carry credentials: a driver's message names host and port at
most; the whole error goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor

logger = logging.getLogger("poolsadmin.health")

# A probe that hangs is a failed probe, but the kubelet's timeout would hide which check hung.
CHANNEL_LAYER_TIMEOUT_SECONDS = 3.0
MESSAGE_LIMIT = 200


def _short(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return text[:MESSAGE_LIMIT]


def database_problems() -> list[str]:
    """1. every configured database answers `SELECT 1`; 2. each has no unapplied migration of
    this code (a web process of a new image before the migrate Job ran would serve errors)."""
    problems: list[str] = []
    for alias in connections:
        connection = connections[alias]
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except DatabaseError as exc:
            logger.warning("readiness: database %s does not answer: %s", alias, exc)
            problems.append(f"database {alias}: {_short(exc)}")
            continue
        try:
            executor = MigrationExecutor(connection)
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        except DatabaseError as exc:
            logger.warning("readiness: migrations of %s unreadable: %s", alias, exc)
            problems.append(f"migrations {alias}: {_short(exc)}")
            continue
        if plan:
            names = ", ".join(f"{m.app_label}.{m.name}" for m, _backwards in plan[:5])
            more = f" and {len(plan) - 5} more" if len(plan) > 5 else ""
            problems.append(f"migrations {alias}: {len(plan)} unapplied ({names}{more})")
    return problems


async def _channel_layer_round_trip() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel("readyz.")
    await layer.send(channel, {"type": "readyz.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "readyz.ping":
        raise RuntimeError(f"the channel layer answered {message.get('type')!r}")


async def _bounded_round_trip() -> None:
    await asyncio.wait_for(_channel_layer_round_trip(), CHANNEL_LAYER_TIMEOUT_SECONDS)


def channel_layer_problems() -> list[str]:
    """A message sent to a new channel comes back: the live dashboard needs the layer (Redis
    with several processes) to push slot changes."""
    try:
        async_to_sync(_bounded_round_trip)()
    except Exception as exc:  # any failure of the layer (connection, timeout) is the answer
        logger.warning("readiness: channel layer round trip failed: %s", exc)
        if isinstance(exc, TimeoutError):
            return [f"channel layer: no answer within {CHANNEL_LAYER_TIMEOUT_SECONDS:g} s"]
        return [f"channel layer: {_short(exc)}"]
    return []


READINESS_CHECKS: dict[str, Callable[[], list[str]]] = {
    "database": database_problems,
    "channel_layer": channel_layer_problems,
}


def readiness_problems() -> dict[str, list[str]]:
    """Every check's problems, by check name (empty lists when ready)."""
    return {name: check() for name, check in READINESS_CHECKS.items()}
