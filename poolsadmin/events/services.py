from __future__ import annotations

from typing import Any

from django.db import transaction

from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.rowsets import rowset_param, rowset_sql


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


EVENT_COLUMNS = (
    ("at", "timestamptz"),
    ("actor", "text"),
    ("kind", "text"),
    ("target_type", "text"),
    ("target_id", "text"),
    ("pool_id", "text"),
    ("workspace_id", "text"),
    ("task_id", "bigint"),
    ("before", "jsonb"),
    ("after", "jsonb"),
    ("reason", "text"),
    ("data", "jsonb"),
)


def events_write(batch: list[Event]) -> None:
    """Write a batch of events, in the order they were recorded, with one INSERT of one
    parameter (lib/rowsets.py): a scheduler batch writes a thousand events, and bulk_create's
    twelve thousand parameters cost more than the rest of the batch (issue 9)."""
    if not batch:
        return
    column = {f.name: f.column for f in Event._meta.concrete_fields}
    names = ", ".join(column[name] for name, _ in EVENT_COLUMNS)
    values = ", ".join(f"v.{name}" for name, _ in EVENT_COLUMNS)
    rows = rowset_param(
        EVENT_COLUMNS, ([getattr(e, name) for name, _ in EVENT_COLUMNS] for e in batch)
    )
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {Event._meta.db_table} ({names}) "
            f"SELECT {values} FROM {rowset_sql(EVENT_COLUMNS)} ORDER BY v.n",
            [rows],
        )
    batch.clear()
