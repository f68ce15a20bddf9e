from __future__ import annotations

from django.db import models


class Event(models.Model):
    """Append-only log of every slot and task transition and every admin action.

    It powers task timelines, slot history, the audit page and the undo of a release.
    Rows are only ever inserted (`event_record`); nothing updates or deletes them.
    """

    at = models.DateTimeField(db_index=True)
    actor = models.CharField(max_length=200, help_text="user:<name>, agent:<id> or system:<loop>")
    kind = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=32)
    # A slot's label is its pod's name (up to 253 characters, as Kubernetes allows) and index.
    target_id = models.CharField(max_length=300)
    pool_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    workspace_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    task_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    reason = models.TextField(blank=True, default="")
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "events"
        ordering = ["id"]
        indexes = [models.Index(fields=["target_type", "target_id", "id"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.kind} {self.target_id}"
