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
    batch: list[Event] | None = None,
) -> Event:
    """Append one event. Call it inside the transaction of the change it describes.

    With `batch`, the event is built and appended to it instead, for a caller that makes many
    changes in one transaction and writes their events with one INSERT (`events_write`)."""
    event = Event(
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
    if batch is None:
        event.save(force_insert=True)
    else:
        batch.append(event)
    return event


def events_write(batch: list[Event]) -> None:
    """Write a batch of events, in the order they were recorded."""
    Event.objects.bulk_create(batch)
    batch.clear()
