"""Roles (SPEC 8): the migration creates `viewer` and `admin` with exactly the permissions
`poolsadmin/api/roles.py` names."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
from django.apps import apps as django_apps
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.db import connection

from poolsadmin.api import roles

pytestmark = pytest.mark.django_db

roles_migration = importlib.import_module("poolsadmin.api.migrations.0002_roles")


def perms(group: Group) -> set[str]:
    return {
        f"{p.content_type.app_label}.{p.codename}"
        for p in group.permissions.select_related("content_type")
    }


def every_view_permission() -> set[str]:
    return {
        f"{label}.view_{model._meta.model_name}"
        for label in roles.VIEWER_APPS
        for model in django_apps.get_app_config(label).get_models()
    }


def test_the_viewer_role_reads_everything_and_may_do_nothing() -> None:
    viewer = perms(Group.objects.get(name=roles.ROLE_VIEWER))
    assert viewer == every_view_permission()
    assert roles.PERM_VIEW in viewer
    assert "tasks.view_workspacetask" in viewer and "events.view_event" in viewer
    assert not viewer & set(roles.ACTION_PERMISSIONS)


def test_the_admin_role_is_the_viewer_plus_every_action() -> None:
    admin = perms(Group.objects.get(name=roles.ROLE_ADMIN))
    assert admin == every_view_permission() | set(roles.ACTION_PERMISSIONS)


def test_every_action_permission_exists_on_its_model() -> None:
    for perm in roles.ACTION_PERMISSIONS:
        label, codename = perm.split(".")
        assert Permission.objects.filter(content_type__app_label=label, codename=codename).exists()


def test_the_personas_have_their_roles(admin: User, viewer: User) -> None:
    assert all(admin.has_perm(perm) for perm in roles.ACTION_PERMISSIONS)
    assert admin.has_perm(roles.PERM_VIEW) and viewer.has_perm(roles.PERM_VIEW)
    assert not any(viewer.has_perm(perm) for perm in roles.ACTION_PERMISSIONS)
    assert not admin.is_superuser


def test_the_migration_creates_permissions_that_do_not_exist_yet() -> None:
    """On a fresh database the migration runs before post_migrate creates permissions."""
    Group.objects.filter(name__in=[roles.ROLE_VIEWER, roles.ROLE_ADMIN]).delete()
    Permission.objects.filter(content_type__app_label__in=roles.VIEWER_APPS).delete()
    editor = SimpleNamespace(connection=connection)

    roles_migration.create_roles(django_apps, editor)
    roles_migration.create_roles(django_apps, editor)  # idempotent

    admin = perms(Group.objects.get(name=roles.ROLE_ADMIN))
    assert admin == every_view_permission() | set(roles.ACTION_PERMISSIONS)
    # Names as post_migrate would have given them, so nothing is created twice later.
    assert Permission.objects.get(codename="manage_pool").name.startswith("Can create pools")
    assert Permission.objects.get(codename="view_slot").name == "Can view slot"


@pytest.mark.django_db(transaction=True)
def test_the_roles_migration_is_reversible() -> None:
    call_command("migrate", "api", "0001", verbosity=0)
    assert not Group.objects.filter(name__in=[roles.ROLE_VIEWER, roles.ROLE_ADMIN]).exists()
    call_command("migrate", "api", verbosity=0)
    assert perms(Group.objects.get(name=roles.ROLE_VIEWER)) == every_view_permission()


def test_personas_still_work_after_a_transactional_test_flushed_the_groups(
    request: pytest.FixtureRequest,
) -> None:
    Group.objects.all().delete()  # what a TransactionTestCase flush leaves behind
    admin: User = request.getfixturevalue("admin")
    assert admin.has_perm(roles.PERM_MANAGE_POOL)
