from __future__ import annotations

from datetime import timedelta

from django.db import models


class PoolType(models.TextChoices):
    STATIC = "static", "Static"
    K8S = "k8s", "Kubernetes"


class PoolStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused"


# Bounds of a pool's numbers, checked by pools.services.pool_validate (and pool_scale). The
# columns are PositiveIntegerFields (up to 2**31 - 1, past which PostgreSQL fails the write),
# but the product's limits are far lower. A slot is one terraform run at a time on a pod: 64 is
# more than a pod runs, and it keeps registering a pod (a row per slot) and the pool page's
# grid small; a pool with 200,000 slots a pod took 20 s to register and answered 42 MB. No
# pool runs anywhere near MAX_REPLICAS pods: a larger number is a typo.
MAX_SLOTS_PER_POD = 64
MAX_REPLICAS = 1000


class AgentPool(models.Model):
    pool_id = models.CharField(max_length=64, primary_key=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    pool_type = models.CharField(max_length=16, choices=PoolType.choices, default=PoolType.STATIC)
    status = models.CharField(max_length=16, choices=PoolStatus.choices, default=PoolStatus.ACTIVE)
    paused_by = models.CharField(max_length=200, blank=True, default="")
    paused_reason = models.TextField(blank=True, default="")
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_until = models.DateTimeField(null=True, blank=True)

    slots_per_pod = models.PositiveIntegerField(default=4)
    plan_and_apply_per_pod = models.PositiveIntegerField(default=1)
    reservation_ttl_seconds = models.PositiveIntegerField(default=24 * 3600)
    heartbeat_timeout_seconds = models.PositiveIntegerField(default=120)
    # How long a task on a lost agent/pod (or one its agent stopped reporting) is given before
    # it is failed: a heartbeat or two can be late without killing work.
    task_grace_seconds = models.PositiveIntegerField(default=60)

    # k8s pools
    namespace = models.CharField(max_length=63, blank=True, default="")
    pod_image = models.CharField(max_length=500, blank=True, default="")
    pod_image_pull_policy = models.CharField(max_length=32, blank=True, default="IfNotPresent")
    pod_command = models.JSONField(default=list, blank=True)
    pod_args = models.JSONField(default=list, blank=True)
    pod_env = models.JSONField(default=dict, blank=True)
    pod_cpu_request = models.CharField(max_length=32, blank=True, default="")
    pod_cpu_limit = models.CharField(max_length=32, blank=True, default="")
    pod_memory_request = models.CharField(max_length=32, blank=True, default="")
    pod_memory_limit = models.CharField(max_length=32, blank=True, default="")
    pod_service_account = models.CharField(max_length=253, blank=True, default="")
    min_replicas = models.PositiveIntegerField(default=0)
    max_replicas = models.PositiveIntegerField(default=1)
    scale_down_idle_seconds = models.PositiveIntegerField(default=120)
    freeze_timezone = models.CharField(max_length=64, default="UTC")
    unfrozen_until = models.DateTimeField(null=True, blank=True)
    unfrozen_by = models.CharField(max_length=200, blank=True, default="")
    unfrozen_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField()

    class Meta:
        db_table = "agent_pools"
        ordering = ["name", "pool_id"]
        permissions = [
            ("manage_pool", "Can create pools and tokens, scale, pause, drain and unfreeze"),
            ("release_slot", "Can release a slot and run reconcile now"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.pool_id})"

    @property
    def heartbeat_timeout(self) -> timedelta:
        return timedelta(seconds=self.heartbeat_timeout_seconds)

    @property
    def lost_after(self) -> timedelta:
        """An agent silent for longer than this is lost: its tasks fail, its reservations
        go, its pod is deleted (heartbeat timeout + task grace)."""
        return self.heartbeat_timeout + timedelta(seconds=self.task_grace_seconds)

    @property
    def reservation_ttl(self) -> timedelta:
        return timedelta(seconds=self.reservation_ttl_seconds)


class FreezeWindow(models.Model):
    """A weekly change freeze. A window whose end is not after its start crosses midnight and
    belongs to the weekday on which it starts (SPEC 6)."""

    pool = models.ForeignKey(AgentPool, on_delete=models.CASCADE, related_name="freeze_windows")
    name = models.CharField(max_length=200, blank=True, default="")
    weekdays = models.JSONField(default=list, help_text="0=Monday .. 6=Sunday")
    start = models.TimeField()
    end = models.TimeField()

    class Meta:
        db_table = "pool_freeze_windows"

    def __str__(self) -> str:
        return f"{self.name or 'freeze'} {self.weekdays} {self.start:%H:%M}-{self.end:%H:%M}"


class PoolToken(models.Model):
    """Shown once as `apt_<pool_id>_<64 hex>`; only its SHA-256 is stored."""

    pool = models.ForeignKey(AgentPool, on_delete=models.CASCADE, related_name="tokens")
    name = models.CharField(max_length=200)
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.CharField(max_length=200)
    created_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=200, blank=True, default="")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "pool_tokens"

    def __str__(self) -> str:
        return f"{self.pool_id}:{self.name}"


class PoolAllowedWorkspace(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        REVOKED = "revoked", "Revoked"

    pool = models.ForeignKey(AgentPool, on_delete=models.CASCADE, related_name="allowed")
    workspace = models.ForeignKey("tasks.Workspace", on_delete=models.CASCADE)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField()

    class Meta:
        db_table = "pool_allowed_workspaces"
        constraints = [
            models.UniqueConstraint(fields=["pool", "workspace"], name="uniq_pool_workspace")
        ]

    def __str__(self) -> str:
        return f"{self.pool_id}:{self.workspace_id}:{self.status}"


class PodPhase(models.TextChoices):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


# A pod in these phases has ended: it runs nothing, counts for no capacity, and the reconciler
# deletes it from the cluster.
FINISHED_PHASES = frozenset({PodPhase.FAILED, PodPhase.SUCCEEDED})


class Pod(models.Model):
    """An execution host. In k8s pools one pod of the cluster; in static pools one per agent,
    with no cluster behind it. A pod and its agent are matched by name, within the pool: two
    static pools may each have an agent (and so a pod) called `agent-1`."""

    pool = models.ForeignKey(AgentPool, on_delete=models.CASCADE, related_name="pods")
    name = models.CharField(max_length=253)
    # The cluster's uid of the pod (k8s pools; empty for static pools). A pod listed under the
    # same name with another uid is another pod: the old one is gone.
    uid = models.CharField(max_length=64, blank=True, default="")
    phase = models.CharField(max_length=16, choices=PodPhase.choices, default=PodPhase.PENDING)
    agent = models.OneToOneField(
        "agents.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="pod"
    )
    created_at = models.DateTimeField()
    last_seen_at = models.DateTimeField(null=True, blank=True)
    cordoned = models.BooleanField(default=False)
    cordoned_by = models.CharField(max_length=200, blank=True, default="")
    cordoned_reason = models.TextField(blank=True, default="")
    # When poolsadmin last asked the cluster to delete the pod and could not tell whether it
    # did (a timeout): the pod stays cordoned until a later listing shows it still there.
    delete_unconfirmed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "pods"
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["pool", "name"], name="uniq_pod_name_in_pool")
        ]

    def __str__(self) -> str:
        return self.name


class SlotState(models.TextChoices):
    IDLE = "idle"
    RUNNING = "running"
    RESERVED = "reserved"


class Slot(models.Model):
    """One execution slot of a pod. `task` is unique: a task can never hold two slots, and a
    slot holds at most one task. `version` is bumped on every change so a stale UI action is
    refused."""

    pod = models.ForeignKey(Pod, on_delete=models.CASCADE, related_name="slots")
    index = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=SlotState.choices, default=SlotState.IDLE)
    task = models.OneToOneField(
        "tasks.WorkspaceTask",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="slot",
    )
    task_type = models.CharField(max_length=32, blank=True, default="")
    since = models.DateTimeField()
    reserved_until = models.DateTimeField(null=True, blank=True)
    version = models.PositiveBigIntegerField(default=1)

    class Meta:
        db_table = "slots"
        ordering = ["pod_id", "index"]
        constraints = [
            models.UniqueConstraint(fields=["pod", "index"], name="uniq_pod_slot_index"),
            # An idle slot holds no task; a busy one holds exactly one.
            models.CheckConstraint(
                condition=(
                    models.Q(state="idle", task__isnull=True)
                    | (models.Q(state__in=["running", "reserved"]) & models.Q(task__isnull=False))
                ),
                name="slot_state_matches_task",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.pod_id}[{self.index}] {self.state}"
