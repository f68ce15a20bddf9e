from __future__ import annotations

from django.db import models


class Lease(models.Model):
    """A named lease row: the worker that holds `reconciler` is the one leader (SPEC 5). Any
    worker may take it over once `expires_at` has passed; see worker/lease.py."""

    name = models.CharField(max_length=64, primary_key=True)
    holder = models.CharField(max_length=200)
    acquired_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "worker_leases"

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder} until {self.expires_at:%H:%M:%S}"
