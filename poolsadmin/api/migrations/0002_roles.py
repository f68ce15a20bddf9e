"""Roles (SPEC 8): the `viewer` and `admin` groups with their permissions.

Permissions are normally created by the post_migrate signal, i.e. after every migration has
run, so this migration creates the ones it needs itself (get_or_create: post_migrate then
finds them and adds nothing). The role table is frozen here on purpose: a later change to the
roles is a new migration, and `poolsadmin/api/roles.py` names the same permissions for the
views (tests/test_roles.py checks the two agree).
"""

from django.db import migrations

VIEWER_APPS = ("pools", "agents", "tasks", "events")

# (app_label, model_name, codename) of the action permissions declared in the models' Meta.
ACTION_PERMISSIONS = (
    ("pools", "agentpool", "manage_pool"),
    ("pools", "agentpool", "release_slot"),
    ("tasks", "workspacetask", "submit_task"),
    ("tasks", "workspacetask", "confirm_apply"),
    ("tasks", "workspacetask", "cancel_task"),
    ("tasks", "workspace", "unlock_workspace"),
)

ROLES = ("viewer", "admin")


def _permission(apps, db, model, codename, name):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    content_type, _ = ContentType.objects.using(db).get_or_create(
        app_label=model._meta.app_label, model=model._meta.model_name
    )
    permission, _ = Permission.objects.using(db).get_or_create(
        content_type=content_type, codename=codename, defaults={"name": name}
    )
    return permission


def create_roles(apps, schema_editor):
    db = schema_editor.connection.alias
    Group = apps.get_model("auth", "Group")

    view = []
    for label in VIEWER_APPS:
        for model in apps.get_app_config(label).get_models():
            view.append(
                _permission(
                    apps,
                    db,
                    model,
                    f"view_{model._meta.model_name}",
                    f"Can view {model._meta.verbose_name_raw}",
                )
            )
    actions = []
    for label, model_name, codename in ACTION_PERMISSIONS:
        model = apps.get_model(label, model_name)
        name = dict(model._meta.permissions).get(codename, codename.replace("_", " "))
        actions.append(_permission(apps, db, model, codename, name))

    # add(), not set(): a site that already had a group of that name keeps what it added.
    viewer, _ = Group.objects.using(db).get_or_create(name="viewer")
    viewer.permissions.add(*view)
    admin, _ = Group.objects.using(db).get_or_create(name="admin")
    admin.permissions.add(*view, *actions)


def delete_roles(apps, schema_editor):
    # The permissions stay: they belong to the models (post_migrate recreates them anyway).
    Group = apps.get_model("auth", "Group")
    Group.objects.using(schema_editor.connection.alias).filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0001_initial"),
        ("agents", "0002_initial"),
        ("events", "0001_initial"),
        ("pools", "0002_initial"),
        ("tasks", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_roles, delete_roles)]
