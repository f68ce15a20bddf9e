from __future__ import annotations

from django.db import models


class Lease(models.Model):
    """A named lease row: the worker that holds `reconciler` is the one leader (SPEC 5). Any
    worker may take it over once `expires_at` has passed; see worker/lease.py."""

    name = models.CharField(max_length=64, primary_key=True)
    # `host:pid:random`, or `user:<username> host:pid:random` for a person's "Reconcile now".
    holder = models.CharField(max_length=300)
    acquired_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    # The holder's latest completed pass (reconciler: over every pool), for the dashboard's
    # reconciler panel and /metrics: when it ended, how long it took, how many changes.
    last_pass_at = models.DateTimeField(null=True, blank=True)
    last_pass_seconds = models.FloatField(null=True, blank=True)
    last_pass_changes = models.PositiveIntegerField(default=0)

    class Meta:
        db_table = "worker_leases"

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder} until {self.expires_at:%H:%M:%S}"
