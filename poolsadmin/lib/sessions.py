"""Django's database sessions, refusing a session cookie that is not clean text.

The session key comes from a cookie, which any client sets: with a NUL byte in it the session
lookup failed on PostgreSQL (DataError, a 500 for every page and API call). A key that is not
clean text (`lib.input`) is no key, as a too-short one is: the request has no session.
"""

from __future__ import annotations

from django.contrib.sessions.backends import db

from poolsadmin.lib.input import text_problem


class SessionStore(db.SessionStore):
    def __init__(self, session_key: str | None = None) -> None:
        if session_key is not None and text_problem(session_key) is not None:
            session_key = None
        super().__init__(session_key)
