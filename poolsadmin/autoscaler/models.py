from __future__ import annotations

from django.db import models


class ScaleAction(models.TextChoices):
    NONE = "none"
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    BLOCKED = "blocked"


class ScaleDecision(models.Model):
    """One autoscaler pass that changed, or refused to change, a pool's pod count, with the
    reason in words (SPEC 6). Passes with nothing to do are not stored."""

    pool = models.ForeignKey(
        "pools.AgentPool", on_delete=models.CASCADE, related_name="scale_decisions"
    )
    at = models.DateTimeField(db_index=True)
    desired = models.PositiveIntegerField()
    actual = models.PositiveIntegerField()
    min = models.PositiveIntegerField()
    max = models.PositiveIntegerField()
    action = models.CharField(max_length=16, choices=ScaleAction.choices)
    created_pods = models.JSONField(default=list, blank=True)
    deleted_pods = models.JSONField(default=list, blank=True)
    reason = models.TextField()

    class Meta:
        db_table = "scale_decisions"
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.pool_id} {self.action} {self.actual}->{self.desired}"


class PoolHold(models.Model):
    """An admin holds a pool at `pods` pods until `until`; it wins over demand meanwhile."""

    pool = models.ForeignKey("pools.AgentPool", on_delete=models.CASCADE, related_name="holds")
    pods = models.PositiveIntegerField()
    until = models.DateTimeField()
    by = models.CharField(max_length=200)
    reason = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        db_table = "pool_holds"
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.pool_id} held at {self.pods} until {self.until:%Y-%m-%d %H:%M}"
