"""What every text a client sends must be before any code looks it up or stores it: free of
NUL bytes (PostgreSQL text cannot hold one: the query fails with DataError) and valid Unicode
(a lone surrogate cannot be encoded as UTF-8: the driver, hashing and templates fail).

Checked at the edge, once: `api.http.json_body` for JSON bodies (strings and keys at any
depth); refusals name the field, so the client knows what to fix.
"""

from __future__ import annotations

from poolsadmin.lib.errors import InvalidInput


def text_problem(value: str) -> str | None:
    """What is wrong with `value` as text, or None."""
    if "\x00" in value:
        return "contains a NUL byte"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "is not valid Unicode (it contains a lone surrogate)"
    return None


def shown(name: str) -> str:
    """A field name fit for a message: a hostile name (a JSON key with a NUL byte) escaped."""
    return name if text_problem(name) is None else ascii(name)


def check_text(value: str, *, field: str) -> None:
    """Refuse `value` with a 400 naming `field` unless it is clean text."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidInput(f"{shown(field)} {problem}", field=field)
