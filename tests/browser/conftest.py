"""Browser tests: Playwright drives Debian's chromium against a real ASGI server.

The server is daphne in a child process serving `poolsadmin.asgi.application` (HTTP and
WebSockets; pytest-django's `live_server` is WSGI only and cannot carry the live dashboard).
It is what `channels.testing.ChannelsLiveServerTestCase` starts, as a pytest fixture:

* the child shares no memory with the tests, so it reads the test database through its own
  connections: the tests use `transactional_db` (data committed, visible to the child; tables
  flushed after each test) and the child is pointed at the test database by name;
* the in-memory channel layer lives in the child, which is also where the JSON API requests of
  the tests land, so a service's broadcast reaches the pages' WebSockets in one process;
* static files are served by channels' ASGIStaticFilesHandler (there is no whitenoise).

No worker loop runs: the ledger changes only when a test changes it.
"""

from __future__ import annotations

import importlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from channels.testing.live import make_application
from daphne.testing import DaphneProcess
from django.apps import apps as django_apps
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLDatabaseWrapper
from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabaseWrapper
from playwright.sync_api import Browser, Page, Playwright, ViewportSize, expect, sync_playwright

from poolsadmin.api.roles import ROLE_ADMIN, ROLE_VIEWER
from poolsadmin.api.services import api_token_create
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_USERS,
    DemoSeed,
    demo_seed,
)
from tests.browser import serve_test_database

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
# Generous: two noisy cores run chromium, daphne and the tests at once. A UI wait that needs
# longer than this is a bug, not a slow machine.
UI_TIMEOUT_MS = 15_000
SERVER_START_TIMEOUT_S = 60

PASSWORDS = {username: password for username, password, _ in DEMO_USERS}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


# --- the ASGI server ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def live_asgi_url(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    """`http://127.0.0.1:<port>` of daphne serving poolsadmin on the test database."""
    for conn in connections.all():
        if isinstance(conn, SQLiteDatabaseWrapper) and conn.is_in_memory_db():
            raise ImproperlyConfigured("the browser tests' server cannot share an in-memory DB")
    database_name = str(settings.DATABASES["default"]["NAME"])
    server = DaphneProcess(
        host="127.0.0.1",
        get_application=partial(make_application, static_wrapper=ASGIStaticFilesHandler),
        setup=partial(serve_test_database, database_name),
    )
    server.daemon = True  # never outlives an interrupted test run
    # Fork while unblocked: a forked child keeps pytest-django's database blocker as it was.
    with django_db_blocker.unblock():
        # A forked child inherits open database sockets, and two processes talking over one
        # PostgreSQL connection corrupt it. Close them, and close the connection pool too
        # (PostgreSQL): closing a connection only hands it back to the pool, whose idle
        # connections the child would otherwise take. The tests reconnect on demand.
        connections.close_all()
        for conn in connections.all():
            if isinstance(conn, PostgreSQLDatabaseWrapper):
                conn.close_pool()  # type: ignore[attr-defined]
        server.start()
    waited = 0
    while not server.ready.wait(timeout=1):
        waited += 1
        if not server.is_alive() or waited >= SERVER_START_TIMEOUT_S:
            detail = "" if server.errors.empty() else server.errors.get(False)[1]
            server.terminate()
            raise RuntimeError(f"daphne did not start within {waited} s\n{detail}")
    try:
        yield f"http://127.0.0.1:{server.port.value}"
    finally:
        server.terminate()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
            server.join()


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    """Playwright's sync API, one per test module.

    While it runs, its event loop counts as running in this thread, so Django refuses every
    ORM call of the test (SynchronousOnlyOperation, "You cannot call this from an async
    context"; microsoft/playwright-python#439, pytest-django#791). The tests and fixtures
    make plain synchronous calls between browser steps, which is safe, so
    DJANGO_ALLOW_ASYNC_UNSAFE is set only while Playwright runs: per module, not per session,
    so the rest of the suite keeps Django's guard.
    """
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as driver:
            yield driver


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright, live_asgi_url: str) -> Iterator[Browser]:
    """Debian's chromium (`playwright install` cannot download browsers here). A launch that
    fails is an error everywhere: only a missing binary outside CI skips."""
    expect.set_options(timeout=UI_TIMEOUT_MS)
    launched = playwright_driver.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield launched
    launched.close()


def _page(browser: Browser, base_url: str, *, javascript: bool) -> Iterator[Page]:
    context = browser.new_context(
        base_url=base_url, viewport=DESKTOP, java_script_enabled=javascript
    )
    context.set_default_timeout(UI_TIMEOUT_MS)
    new_page = context.new_page()
    errors: list[str] = []
    new_page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield new_page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def page(browser: Browser, live_asgi_url: str) -> Iterator[Page]:
    """A fresh browser context (no cookies) at 1280x800; relative URLs go to the server.
    An uncaught JavaScript error on any page fails the test."""
    yield from _page(browser, live_asgi_url, javascript=True)


@pytest.fixture
def page_without_js(browser: Browser, live_asgi_url: str) -> Iterator[Page]:
    """`page` with JavaScript off: every page must work without it (STYLE rule 4), through
    confirm pages and POST-redirect-GET instead of dialogs and WebSockets."""
    yield from _page(browser, live_asgi_url, javascript=False)


def login(page: Page, username: str, password: str | None = None) -> None:
    """Log in through the login form (the demo password unless given); lands on /pools/."""
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password if password is not None else PASSWORDS[username])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/pools/")


# --- data --------------------------------------------------------------------------------------


def _roles() -> None:
    """The flush after every transactional test deletes the groups the roles migration made
    (permissions come back through post_migrate, groups do not): recreate them with that
    migration's own code, or seed_demo would make empty groups."""
    if Group.objects.filter(name__in=[ROLE_ADMIN, ROLE_VIEWER]).count() == 2:
        return
    migration = importlib.import_module("poolsadmin.api.migrations.0002_roles")
    migration.create_roles(django_apps, SimpleNamespace(connection=connection))


@pytest.fixture
def demo(transactional_db: None, live_asgi_url: str, settings: Any, tmp_path: Path) -> DemoSeed:
    """The demo ledger (`seed_demo`), committed so the server sees it: pool DEMO_POOL_ID,
    task 598 reserved on prod-agents-7xk2p[0], a queue, users admin and viewer."""
    settings.VAR_DIR = tmp_path  # seed_demo writes the pool token file there
    # No channel layer in the test process: its broadcasts could reach no page (the pages'
    # WebSockets are in the server process), and async_to_sync refuses to run under
    # Playwright's loop anyway. A test that wants a live update changes data through the
    # server: `admin_api`.
    settings.CHANNEL_LAYERS = {}
    _roles()
    seed = demo_seed()
    assert seed.incident_slot, "the seed did not reserve task 598's slot"
    return seed


@dataclass(frozen=True)
class Api:
    """The admin JSON API over HTTP, as a tool would call it (bearer token, no session):
    requests land in the server process, so their broadcasts reach its WebSockets."""

    base_url: str
    token: str

    def __call__(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}/api/v1/{path.lstrip('/')}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read().decode()}") from exc


@pytest.fixture
def admin_api(demo: DemoSeed, live_asgi_url: str) -> Api:
    """The JSON API as the demo `admin`."""
    user = User.objects.get(username="admin")
    return Api(base_url=live_asgi_url, token=api_token_create(user=user, name="browser tests")[1])


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """docs/screenshots/ with SCREENSHOTS=1 (to refresh the committed ones), else a temporary
    directory, so a CI run leaves the tree clean."""
    if os.environ.get("SCREENSHOTS") == "1":
        target = Path(settings.BASE_DIR) / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        return target
    return tmp_path
