"""Leases run on the database's clock, which the tests' ledger clock does not move."""

from __future__ import annotations

from datetime import timedelta

from django.db.models.functions import Now

from poolsadmin.worker.models import Lease


def expire_lease(name: str) -> None:
    """The lease's term ends now, as if its holder had died a TTL ago."""
    Lease.objects.filter(name=name).update(expires_at=Now() - timedelta(seconds=1))
