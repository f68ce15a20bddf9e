from __future__ import annotations

from django.db import models


class AgentStatus(models.TextChoices):
    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"


class Agent(models.Model):
    """Table and column names are fixed: operators query `agents` by hand (SPEC 2)."""

    agent_id = models.CharField(max_length=64, primary_key=True)
    agent_name = models.CharField(max_length=253)
    pool = models.ForeignKey(
        "pools.AgentPool", on_delete=models.PROTECT, db_column="pool_id", related_name="agents"
    )
    status = models.CharField(
        max_length=16, choices=AgentStatus.choices, default=AgentStatus.ONLINE
    )
    version = models.CharField(max_length=64, blank=True, default="")
    ip = models.GenericIPAddressField(null=True, blank=True)
    last_ping_at = models.DateTimeField(null=True, blank=True)
    registered_at = models.DateTimeField()
    reported_task_ids = models.JSONField(default=list, blank=True)
    cpu = models.FloatField(null=True, blank=True)
    memory = models.FloatField(null=True, blank=True)
    # SHA-256 of the agent's secret (`ags_<64 hex>`), which is shown once, at registration.
    # The pool token only says "some agent of this pool"; the secret says which one. Empty for
    # an agent registered before secrets existed: it cannot authenticate until it registers
    # again.
    secret_hash = models.CharField(max_length=64, blank=True, default="")
    # k8s pools: the uid of the pod the agent registered from (the downward API's
    # metadata.uid). A new pod of the same name has another uid; that is how it may take the
    # name over without the old agent's secret (agent_register).
    pod_uid = models.CharField(max_length=64, blank=True, default="")
    # An identity that ended (its pod was replaced, or an admin retired it): kept for history,
    # its secret void, its name free for a new agent.
    retired_at = models.DateTimeField(null=True, blank=True)
    retired_reason = models.TextField(blank=True, default="")

    class Meta:
        db_table = "agents"
        ordering = ["agent_name"]
        constraints = [
            # One live agent per name and pool; retired identities keep their name for history.
            models.UniqueConstraint(
                fields=["pool", "agent_name"],
                condition=models.Q(retired_at__isnull=True),
                name="uniq_live_agent_name_in_pool",
            )
        ]

    def __str__(self) -> str:
        return f"{self.agent_name} ({self.agent_id})"


class Hearing(models.Model):
    """Whether poolsadmin could hear its agents, durably (SPEC 5: an outage of poolsadmin is
    not an outage of its agents).

    One row, `agent-api`, touched every few seconds through the agent API, by every web
    process's keeper (agents/liveness.py), on the database's clock. `heard_at` is the latest
    touch; `since` starts the current stretch without a gap: a touch that finds `heard_at`
    older than the gap (web down, database down, the agents' route broken) starts a new
    stretch, and the gap is kept in `deaf_from` .. `since`. Agent silence is counted only from
    `since`."""

    name = models.CharField(max_length=32, primary_key=True)
    heard_at = models.DateTimeField()
    since = models.DateTimeField()
    deaf_from = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "agent_hearing"

    def __str__(self) -> str:
        return f"{self.name}: hearing since {self.since:%H:%M:%S}, last {self.heard_at:%H:%M:%S}"
