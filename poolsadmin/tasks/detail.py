"""Reads for the task and workspace pages and the API: a task with its diagnosis, diagnosis
history and timeline; a workspace with its tasks."""

from __future__ import annotations

from dataclasses import dataclass

from poolsadmin.events.models import Event
from poolsadmin.lib.errors import NotFound
from poolsadmin.scheduler.diagnosis import task_diagnose, task_wait_history
from poolsadmin.scheduler.rules import Diagnosis
from poolsadmin.tasks.models import WaitReason, Workspace, WorkspaceTask


@dataclass(frozen=True)
class TaskDetail:
    task: WorkspaceTask
    diagnosis: Diagnosis
    history: list[WaitReason]
    events: list[Event]


def task_detail(*, task_id: int) -> TaskDetail:
    task = WorkspaceTask.objects.select_related("workspace", "pool").filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    return TaskDetail(
        task=task,
        diagnosis=task_diagnose(task=task),
        history=task_wait_history(task=task),
        # The log is append-only: id order is the order things happened.
        events=list(Event.objects.filter(task_id=task.pk).order_by("id")),
    )


@dataclass(frozen=True)
class WorkspaceDetail:
    workspace: Workspace
    tasks: list[WorkspaceTask]


def workspace_get(*, workspace_id: str) -> Workspace:
    workspace = Workspace.objects.filter(pk=workspace_id).first()
    if workspace is None:
        raise NotFound(f"workspace {workspace_id} does not exist")
    return workspace


def workspace_detail(*, workspace_id: str) -> WorkspaceDetail:
    workspace = workspace_get(workspace_id=workspace_id)
    return WorkspaceDetail(
        workspace=workspace, tasks=list(WorkspaceTask.objects.filter(workspace=workspace))
    )
