"""Browser tests (Playwright + Debian's chromium); the harness is in conftest.py."""

from __future__ import annotations

import os

from django.conf import settings


def serve_test_database(database_name: str) -> None:
    """Runs in the browser tests' server process just before it serves.

    It lives here, not in conftest.py, because multiprocessing pickles it by reference: where
    the child is spawned rather than forked (the default from Python 3.14 on Linux), the child
    imports this module before Django is set up, which conftest.py's model imports would not
    survive. The test database's name is passed in, not read from settings: a spawned child
    reads settings afresh, and the SQLite file and PostgreSQL names embed the parent's pid.
    """
    # The server keeps Django's guard against sync ORM calls from async code (the tests lift
    # it in their own process only): a consumer that forgets database_sync_to_async must fail.
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    database = settings.DATABASES["default"]
    database["NAME"] = database_name
    # No persistent connections: the tests flush tables after each test and PostgreSQL drops
    # the test database at the end, and an idle server connection would be in the way.
    database["CONN_MAX_AGE"] = 0
    # The tests create users with the fast hasher (tests/conftest.py); the server's logins
    # must be able to check those hashes.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "127.0.0.1"]
