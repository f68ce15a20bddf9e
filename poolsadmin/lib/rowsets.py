"""Many rows as one statement parameter: a JSON array that the database turns into a table
(PostgreSQL `json_to_recordset`, SQLite `json_each`), for batch statements of any size.

Why not `VALUES (%s, %s, ...), ...` or `bulk_create`: with the client-side binding Django
uses on psycopg 3, every one of thousands of parameters is parsed out of the statement and
quoted in Python, which was most of a scheduler batch's CPU time (issue 9). One JSON string
is quoted once, whatever the number of rows; SQLite has no limit of variables to split on.

    source = rowset_sql([("id", "bigint"), ("state", "text")])
    cursor.execute(f"UPDATE t SET state = v.state FROM {source} WHERE t.id = v.id",
                   [rowset_param([("id", "bigint"), ("state", "text")], [(1, "idle")])])

`v.n` is each row's position in the array, for an `ORDER BY` where the order matters.
Kinds: bigint, integer, text, boolean, timestamptz (aware datetimes), jsonb (any JSON value).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from django.db import connection

Columns = Sequence[tuple[str, str]]
KINDS = frozenset({"bigint", "integer", "text", "boolean", "timestamptz", "jsonb"})
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
RESERVED = frozenset({"n", "key", "value"})


def rowset_sql(columns: Columns, *, alias: str = "v") -> str:
    """A FROM item with one `%s` parameter (`rowset_param`): a table of `columns` and `n`."""
    for name, kind in columns:
        # Lower case: PostgreSQL folds an unquoted name, and the JSON key would then not
        # match (the column would read NULL). `n`, `key` and `value` are the rowset's own.
        if kind not in KINDS or not _NAME.fullmatch(name) or name in RESERVED:
            raise ValueError(f"rowset column {name!r} of kind {kind!r}")
    if connection.vendor == "postgresql":
        typed = ", ".join(f"{name} {kind}" for name, kind in columns)
        names = ", ".join(name for name, _ in columns)
        return (
            f"ROWS FROM (json_to_recordset(%s::json) AS ({typed})) "
            f"WITH ORDINALITY AS {alias}({names}, n)"
        )
    picked = ", ".join(f"json_extract(value, '$.{name}') AS {name}" for name, _ in columns)
    return f"(SELECT {picked}, CAST(key AS INTEGER) AS n FROM json_each(%s)) AS {alias}"


def rowset_param(columns: Columns, rows: Iterable[Sequence[Any]]) -> str:
    """The JSON array for `rowset_sql`: each row's values in the order of `columns`."""
    sqlite = connection.vendor != "postgresql"
    prepare: list[tuple[str, Any]] = []
    for name, kind in columns:
        if kind == "timestamptz":
            prepare.append((name, _db_datetime))
        elif kind == "jsonb" and sqlite:
            # SQLite keeps JSON as its text (as Django's JSONField does): json_extract
            # must hand back that text, not the value it encodes.
            prepare.append((name, _json_text))
        else:
            prepare.append((name, None))
    return json.dumps(
        [
            {
                name: (value if convert is None else convert(value))
                for (name, convert), value in zip(prepare, row, strict=True)
            }
            for row in rows
        ]
    )


def _db_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    return str(connection.ops.adapt_datetimefield_value(value))


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value)
