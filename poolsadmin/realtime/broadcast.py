"""The one module that publishes realtime events. Only services call it, and it publishes
after the transaction commits, so a page never renders a change that was rolled back."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from poolsadmin.lib.logs import log_ids

logger = logging.getLogger(__name__)


def pool_group(pool_id: str) -> str:
    return f"pool.{pool_id}"


def _send(pool_id: str, kind: str, payload: dict[str, object]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(
            pool_group(pool_id), {"type": "pool.changed", "kind": kind, **payload}
        )
    except Exception:  # a dashboard nudge must never break a state change
        logger.warning(
            "realtime publish to %s failed",
            pool_group(pool_id),
            exc_info=True,
            extra=log_ids(pool=pool_id),
        )


def broadcast_pool_changed(*, pool_id: str, kind: str, payload: dict[str, object]) -> None:
    transaction.on_commit(lambda: _send(pool_id, kind, payload))
