"""Rows as one JSON parameter (lib/rowsets.py), on SQLite and PostgreSQL alike: every kind
comes back as the value it was, NULL stays NULL, and the rows keep their order."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record, events_write
from poolsadmin.lib.rowsets import rowset_param, rowset_sql

pytestmark = pytest.mark.django_db

COLUMNS = (
    ("id", "bigint"),
    ("word", "text"),
    ("flag", "boolean"),
    ("count", "integer"),
    ("at", "timestamptz"),
    ("doc", "jsonb"),
)


def test_rows_come_back_as_they_went_in_and_in_their_order() -> None:
    at = datetime(2026, 12, 1, 16, 0, 0, 123456, tzinfo=UTC)
    rows = [
        (3, "it's \"quoted\" 'text'", True, 7, at, {"a": [1, "x"], "b": None}),
        (1, "", False, 0, None, None),
        (2, "ünïcödé", True, -1, at, {}),
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT v.id, v.word, v.flag, v.count, v.at, v.doc FROM {rowset_sql(COLUMNS)} "
            "ORDER BY v.n",
            [rowset_param(COLUMNS, rows)],
        )
        got = cursor.fetchall()
    assert [(r[0], r[1], bool(r[2]), r[3]) for r in got] == [
        (3, "it's \"quoted\" 'text'", True, 7),
        (1, "", False, 0),
        (2, "ünïcödé", True, -1),
    ]
    assert got[1][4] is None and got[1][5] is None
    assert [r[5] is None for r in got] == [False, True, False]


def test_a_column_of_an_unknown_kind_or_name_is_refused() -> None:
    with pytest.raises(ValueError):
        rowset_sql([("id", "money")])
    # Not a lower-case identifier (PostgreSQL folds unquoted names, so the JSON key would
    # not match and the column would read NULL), or a name the rowset itself uses.
    for name in ("id; DROP TABLE x", "Pod_Id", "n", "key", "value", "1st"):
        with pytest.raises(ValueError):
            rowset_sql([(name, "bigint")])


def test_a_batch_of_events_is_one_insert_that_keeps_every_field_and_the_order() -> None:
    batch: list[Event] = []
    for n in range(300):
        event_record(
            actor="system:test",
            kind="test.batch",
            target_type="slot",
            target_id=f"pod-{n}[0]",
            pool_id="pool-x",
            workspace_id="ws-x" if n % 2 else "",
            task_id=n if n % 3 else None,
            before=None if n % 2 else {"state": "idle", "n": n},
            after={"state": "running", "tags": ["a", n]},
            reason="why" * (n % 4),
            data={"reuse_workdir": bool(n % 2)},
            batch=batch,
        )
    expected = [
        (e.at, e.target_id, e.workspace_id, e.task_id, e.before, e.after, e.reason, e.data)
        for e in batch
    ]
    with CaptureQueriesContext(connection) as queries:
        events_write(batch)
    assert len(queries) == 1 and batch == []
    written = Event.objects.filter(kind="test.batch").order_by("id")
    assert [
        (e.at, e.target_id, e.workspace_id, e.task_id, e.before, e.after, e.reason, e.data)
        for e in written
    ] == expected
    # None is SQL NULL, as the model writes it, not a JSON null.
    assert Event.objects.filter(kind="test.batch", before__isnull=True).count() == 150
