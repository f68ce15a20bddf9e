from __future__ import annotations

from django.db import models


class ExecutionMode(models.TextChoices):
    AGENT = "agent"
    K8S = "k8s"


class Workspace(models.Model):
    workspace_id = models.CharField(max_length=64, primary_key=True)
    name = models.CharField(max_length=200)
    execution_mode = models.CharField(
        max_length=16, choices=ExecutionMode.choices, default=ExecutionMode.AGENT
    )
    current_pool = models.ForeignKey(
        "pools.AgentPool",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="workspaces",
    )
    is_locked = models.BooleanField(default=False)
    locked_by = models.CharField(max_length=200, blank=True, default="")
    locked_at = models.DateTimeField(null=True, blank=True)
    lock_reason = models.TextField(blank=True, default="")
    lock_task = models.ForeignKey(
        "tasks.WorkspaceTask",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField()

    class Meta:
        db_table = "workspaces"
        ordering = ["name"]
        permissions = [("unlock_workspace", "Can unlock a workspace")]

    def __str__(self) -> str:
        return f"{self.name} ({self.workspace_id})"


class TaskType(models.TextChoices):
    PLAN = "plan"
    PLAN_AND_APPLY = "plan_and_apply"
    DRIFT_CHECK = "drift_check"


class TaskStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    APPLY_PENDING = "apply_pending"
    PLANNED_AND_FINISHED = "planned_and_finished"
    SUCCESS = "success"
    APPLIED = "applied"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset(
    {
        TaskStatus.PLANNED_AND_FINISHED,
        TaskStatus.SUCCESS,
        TaskStatus.APPLIED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }
)


class Stage(models.TextChoices):
    PENDING = "pending"
    PLANNING = "planning"
    APPLY_PENDING = "apply_pending"
    APPLYING = "applying"
    COMPLETED = "completed"


class WorkspaceTask(models.Model):
    """Table and column names are fixed: operators query `workspace_tasks` by hand (SPEC 2).

    The slot a task holds is `Slot.task` (unique); `pod`/`slot_index` here mirror it for reads
    and history. The plan's agent/pod/slot are kept apart from the apply's, so "the apply runs
    on the plan's slot and may skip init" is decidable.
    """

    workspace = models.ForeignKey(
        Workspace, on_delete=models.PROTECT, db_column="workspace_id", related_name="tasks"
    )
    pool = models.ForeignKey("pools.AgentPool", on_delete=models.PROTECT, related_name="tasks")
    task_type = models.CharField(max_length=32, choices=TaskType.choices)
    status = models.CharField(
        max_length=32, choices=TaskStatus.choices, default=TaskStatus.PENDING, db_index=True
    )
    stage = models.CharField(max_length=64, default=Stage.PENDING)
    agent = models.ForeignKey(
        "agents.Agent",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        db_column="agent_id",
        related_name="tasks",
    )
    pod = models.ForeignKey(
        "pools.Pod", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks"
    )
    slot_index = models.PositiveIntegerField(null=True, blank=True)
    pod_name = models.CharField(max_length=253, blank=True, default="")

    plan_agent_id = models.CharField(max_length=64, blank=True, default="")
    plan_pod_name = models.CharField(max_length=253, blank=True, default="")
    plan_slot_index = models.PositiveIntegerField(null=True, blank=True)
    planned_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    apply_started_at = models.DateTimeField(null=True, blank=True)
    reuse_workdir = models.BooleanField(default=False)

    apply_confirmed_by = models.CharField(max_length=200, blank=True, default="")
    apply_confirmed_at = models.DateTimeField(null=True, blank=True)
    apply_description = models.TextField(blank=True, default="")

    retry_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_dispatch_error = models.TextField(blank=True, default="")
    # Set by the heartbeat cross-check when the agent stops reporting a running task.
    unreported_since = models.DateTimeField(null=True, blank=True)

    error_message = models.TextField(blank=True, default="")
    created_by = models.CharField(max_length=200, blank=True, default="")
    description = models.TextField(blank=True, default="")

    class Meta:
        db_table = "workspace_tasks"
        ordering = ["id"]
        indexes = [models.Index(fields=["workspace", "task_type", "status"])]
        permissions = [
            ("submit_task", "Can submit a task"),
            ("confirm_apply", "Can confirm an apply"),
            ("cancel_task", "Can cancel a task"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.task_type} {self.status}"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_applying(self) -> bool:
        """Decided by the ledger (the apply dispatch sets `apply_started_at`), never by the
        free-text stage an agent reports: an agent cannot talk a plan into an apply."""
        return self.status == TaskStatus.RUNNING and self.apply_started_at is not None

    @property
    def apply_started(self) -> bool:
        """The agent acknowledged the apply: from here on state may have changed."""
        return self.is_applying and self.acked_at is not None

    @property
    def is_confirmed_apply(self) -> bool:
        return self.status == TaskStatus.APPLY_PENDING and bool(self.apply_confirmed_by)


# What waits for a slot: pending tasks and confirmed applies. An unconfirmed apply_pending
# task waits for a person, not for capacity, so it is not queued.
QUEUED = models.Q(status=TaskStatus.PENDING) | (
    models.Q(status=TaskStatus.APPLY_PENDING) & ~models.Q(apply_confirmed_by="")
)


class WaitReason(models.Model):
    """History of a waiting task's diagnosis: one row per change of (code, blocker)."""

    task = models.ForeignKey(WorkspaceTask, on_delete=models.CASCADE, related_name="wait_reasons")
    code = models.CharField(max_length=64)
    text = models.TextField()
    # Unbounded: "no pod can take work" names up to ten pods of up to 253 characters each.
    blocker = models.TextField(blank=True, default="")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "task_wait_reasons"
        ordering = ["task_id", "id"]
        constraints = [
            # At most one open row per task, even with two diagnosis loops racing.
            models.UniqueConstraint(
                fields=["task"],
                condition=models.Q(ended_at__isnull=True),
                name="uniq_open_wait_reason_per_task",
            )
        ]

    def __str__(self) -> str:
        return f"#{self.task_id} {self.code}"
