from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.apps import apps as django_apps
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.db import connection
from django.test import Client

from poolsadmin.agents import nudge
from poolsadmin.api.roles import ROLE_ADMIN, ROLE_VIEWER
from poolsadmin.api.services import api_token_create
from poolsadmin.lib import clock
from tests.processes import collect_static

IS_POSTGRES = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"

# No process of the test run records that the agent API is listening (agents/liveness.py): the
# browser tests' server and any test importing poolsadmin.asgi would write real times into the
# database of tests that move the ledger clock, which would read as an outage. The environment
# reaches spawned children; tests of the keeper start it themselves, and the outage test's
# web processes turn it back on.
os.environ["POOLSADMIN_HEARING_KEEPER"] = "false"
settings.POOLSADMIN_HEARING_KEEPER = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked for the other database are deselected, not skipped: CI runs the suite
    once on each database, and under CI=true nothing may be skipped. `ci_once` tests (over a
    minute, whatever the database) run in the PostgreSQL run only."""
    wrong = ["sqlite_only"] if IS_POSTGRES else ["postgres_only", "ci_once"]
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in wrong) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def collected_static(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A STATIC_ROOT filled by collectstatic, once per run, for processes started with DEBUG
    off (set it as their STATIC_ROOT)."""
    root = tmp_path_factory.mktemp("static")
    collect_static(root)
    return root


def pytest_report_header(config: pytest.Config) -> str:
    db = settings.DATABASES["default"]
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    return f"poolsadmin database: {engine} {db.get('NAME')}; CI={os.environ.get('CI', '')}"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    """Personas and the demo seed create users with passwords; the default hasher spends
    about a second on each, on purpose, which tests do not need."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _agents_fanout_stopped() -> Iterator[None]:
    """The LISTEN connection that a long-polling heartbeat starts in this process (any test
    whose agent long-polls, through the test client or a live server) is its own, outside
    Django's pool: it must not outlive the test, or the test database cannot be dropped."""
    yield
    nudge._fanout.stop()


@pytest.fixture(autouse=True)
def _reset_clock() -> Iterator[None]:
    clock.reset()
    yield
    clock.reset()


# --- personas (roles from migration api/0002_roles) --------------------------------------------


def _role(name: str) -> Group:
    group = Group.objects.filter(name=name).first()
    if group is None:
        # A transactional test (threads, live server) flushes every table, including the groups
        # the roles migration created: recreate them with that migration's own code.
        migration = importlib.import_module("poolsadmin.api.migrations.0002_roles")
        migration.create_roles(django_apps, SimpleNamespace(connection=connection))
        group = Group.objects.get(name=name)
    return group


def _persona(username: str, role: str) -> User:
    # No password: tests log in with force_login or a token, and hashing one costs ~0.3 s.
    user = User.objects.create_user(username=username, password=None)
    user.groups.add(_role(role))
    return user


@pytest.fixture
def admin(db: None) -> User:
    """alice, in the `admin` group. Not a superuser: a superuser passes every permission
    check and would hide a permission the admin role is missing."""
    return _persona("alice", ROLE_ADMIN)


@pytest.fixture
def viewer(db: None) -> User:
    """victor, in the `viewer` group: reads everything, may do nothing."""
    return _persona("victor", ROLE_VIEWER)


@pytest.fixture
def admin_client(admin: User) -> Client:
    """Overrides pytest-django's superuser `admin_client` on purpose (see `admin`)."""
    client = Client()
    client.force_login(admin)
    return client


@pytest.fixture
def viewer_client(viewer: User) -> Client:
    client = Client()
    client.force_login(viewer)
    return client


@pytest.fixture
def admin_token(admin: User) -> str:
    """A bearer secret (`pat_...`) of the admin persona."""
    return api_token_create(user=admin, name="tests")[1]


@pytest.fixture
def viewer_token(viewer: User) -> str:
    return api_token_create(user=viewer, name="tests")[1]


# --- a fake cluster (tests/kube/conftest.py), for the reconciler and autoscaler tests ----------

from tests.kube.conftest import fake_kube, kube_client  # noqa: E402, F401


@pytest.fixture
def running_cluster(fake_kube: Any, kube_client: Any) -> tuple[Any, Any]:  # noqa: F811
    """The fake cluster with pods that run as soon as they are created, and a client."""
    fake_kube.auto_run = True
    return fake_kube, kube_client


@pytest.fixture
def worker_cluster(fake_kube: Any, kube_client: Any) -> Iterator[Any]:  # noqa: F811
    """The fake cluster, reached the way the worker and "Reconcile now" reach a cluster
    (`kube_for_pool`), as `kube_override` sets it."""
    from poolsadmin.worker.cluster_access import kube_override

    kube_override(kube_client)
    yield fake_kube
    kube_override(None)
