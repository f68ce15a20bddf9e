"""Leader leases: one row per name, taken and renewed with one conditional UPDATE, so the same
code is correct on SQLite (writes serialised) and PostgreSQL (the second UPDATE waits for the
first and re-checks its WHERE against the committed row)."""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, Value, When

from poolsadmin.lib import clock
from poolsadmin.worker.models import Lease

RECONCILER_LEASE = "reconciler"


def lease_holder_id() -> str:
    """`hostname:pid:random`: unique per process, and readable on the dashboard."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def lease_acquire_or_renew(*, name: str, holder: str, ttl_seconds: float) -> bool:
    """True if `holder` holds `name` for the next `ttl_seconds`.

    One UPDATE takes the row if it is ours or expired; the first use inserts it. Two first
    uses race on the primary key: the loser's insert fails and it does not hold the lease."""
    now = clock.now()
    expires_at = now + timedelta(seconds=ttl_seconds)
    # SET expressions see the row as it was, so `holder = me` tells a renewal (keep
    # acquired_at) from a takeover (acquired now).
    updated = Lease.objects.filter(
        Q(name=name) & (Q(holder=holder) | Q(expires_at__lt=now))
    ).update(
        acquired_at=Case(When(holder=holder, then=F("acquired_at")), default=Value(now)),
        holder=holder,
        renewed_at=now,
        expires_at=expires_at,
    )
    if updated == 1:
        return True
    if Lease.objects.filter(name=name).exists():
        return False
    try:
        with transaction.atomic():
            Lease.objects.create(
                name=name, holder=holder, acquired_at=now, renewed_at=now, expires_at=expires_at
            )
    except IntegrityError:
        return False
    return True


def lease_release(*, name: str, holder: str) -> bool:
    """Give the lease up at once (clean shutdown), so another worker need not wait out the
    TTL. Only the holder can release it."""
    return (
        Lease.objects.filter(name=name, holder=holder).update(
            expires_at=clock.now() - timedelta(seconds=1)
        )
        == 1
    )


def lease_record_pass(*, name: str, holder: str, seconds: float, changes: int) -> bool:
    """Record the holder's completed pass on its lease row. Only the holder writes it: a
    worker that lost the lease mid-pass does not overwrite its successor's figures."""
    return (
        Lease.objects.filter(name=name, holder=holder).update(
            last_pass_at=clock.now(), last_pass_seconds=seconds, last_pass_changes=changes
        )
        == 1
    )


def lease_current(name: str) -> Lease | None:
    """The lease row if someone holds it now (for display), else None."""
    return Lease.objects.filter(name=name, expires_at__gte=clock.now()).first()
