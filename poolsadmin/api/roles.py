"""Roles and the permission strings views check (SPEC 8 "Roles").

Two Django groups, created by migration `api/0002_roles`:

* `viewer` (operators, support): read everything, i.e. every `view_*` permission of the
  poolsadmin apps;
* `admin`: the viewer's permissions plus every action permission below.

Views check a permission, never a group name, so a site can build its own groups.
`ROLE_PERMISSIONS` is what the migration installs; `tests/test_roles.py` keeps the two equal.
"""

from __future__ import annotations

# "May read everything": every view_* permission comes with the viewer role, and this one
# stands for them all, so read endpoints check one string.
PERM_VIEW = "pools.view_agentpool"

PERM_MANAGE_POOL = "pools.manage_pool"
PERM_RELEASE_SLOT = "pools.release_slot"
PERM_SUBMIT_TASK = "tasks.submit_task"
PERM_CONFIRM_APPLY = "tasks.confirm_apply"
PERM_CANCEL_TASK = "tasks.cancel_task"
PERM_UNLOCK_WORKSPACE = "tasks.unlock_workspace"

ACTION_PERMISSIONS: tuple[str, ...] = (
    PERM_MANAGE_POOL,
    PERM_RELEASE_SLOT,
    PERM_SUBMIT_TASK,
    PERM_CONFIRM_APPLY,
    PERM_CANCEL_TASK,
    PERM_UNLOCK_WORKSPACE,
)

# The apps whose `view_*` permissions make up "read everything".
VIEWER_APPS: tuple[str, ...] = ("pools", "agents", "tasks", "events")

ROLE_VIEWER = "viewer"
ROLE_ADMIN = "admin"
