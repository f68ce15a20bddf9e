from __future__ import annotations

from typing import Any

from poolsadmin.events.models import Event
from poolsadmin.lib import clock


def event_record(
    *,
    actor: str,
    kind: str,
    target_type: str,
    target_id: str | int,
    pool_id: str = "",
    workspace_id: str = "",
    task_id: int | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str = "",
    data: dict[str, Any] | None = None,
) -> Event:
    """Append one event. Call it inside the transaction of the change it describes."""
    return Event.objects.create(
        at=clock.now(),
        actor=actor,
        kind=kind,
        target_type=target_type,
        target_id=str(target_id),
        pool_id=pool_id,
        workspace_id=workspace_id,
        task_id=task_id,
        before=before,
        after=after,
        reason=reason,
        data=data or {},
    )
