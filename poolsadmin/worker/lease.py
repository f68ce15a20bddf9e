"""Leader leases: one row per name, taken and renewed with one conditional UPDATE, so the same
code is correct on SQLite (writes serialised) and PostgreSQL (the second UPDATE waits for the
first and re-checks its WHERE against the committed row).

Every time in a lease is the database's (`Now()`), never a worker's own clock: two workers on
hosts whose clocks disagree by a minute must still agree on whether a lease has expired.

A holder that died without releasing its lease (SIGKILL, OOM) is taken over at once, not a TTL
later, when the taker can tell it is dead: it ran on the same host and in the same PID
namespace (a worker restarted in its container, or on its machine) and its process is gone.
Otherwise (another host, another container of the pod) the TTL decides.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import BooleanField, Case, ExpressionWrapper, F, Q, Value, When
from django.db.models.functions import Now

from poolsadmin.lib.errors import Conflict
from poolsadmin.worker.models import Lease

logger = logging.getLogger(__name__)

RECONCILER_LEASE = "reconciler"

# Holder ids this process made: another id with this process's pid and host was made by an
# earlier process that had the same pid (a restarted container's pid 1), which is dead.
_own_ids: set[str] = set()
_own_lock = threading.Lock()


class LeaseLost(Conflict):
    """The holder no longer holds the lease it works under (it expired and was taken over):
    whatever it was doing must stop before it does it twice with the new holder."""


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), "" where it cannot be told. Containers of one pod
    share a hostname but not their pids: a pid means something only within its namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def lease_holder_id() -> str:
    """`hostname:pid:random:pid-namespace`: unique per process, and readable on the
    dashboard."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:{_pid_namespace()}"
    with _own_lock:
        _own_ids.add(holder)
    return holder


def lease_holder_dead(holder: str) -> bool:
    """True only if `holder` surely no longer runs: its id (the last word of it: "Reconcile
    now" holders are `user:alice host:pid:random:ns`) names this host and PID namespace and a
    process that is gone, or this process's pid without being one of this process's ids."""
    word = holder.rsplit(" ", 1)[-1]
    parts = word.split(":")
    if len(parts) != 4:
        return False
    host, pid_text, token, namespace = parts
    if host != socket.gethostname() or not pid_text.isdecimal() or not token:
        return False
    if not namespace or namespace != _pid_namespace():
        return False  # another container's pids, or no way to tell
    pid = int(pid_text)
    if pid == os.getpid():
        with _own_lock:
            return word not in _own_ids
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _expires(ttl_seconds: float) -> Now:
    return Now() + Value(timedelta(seconds=ttl_seconds))  # type: ignore[return-value]


def lease_acquire_or_renew(*, name: str, holder: str, ttl_seconds: float) -> bool:
    """True if `holder` holds `name` for the next `ttl_seconds`.

    One UPDATE takes the row if it is ours or expired; the first use inserts it. Two first
    uses race on the primary key: the loser's insert fails and it does not hold the lease. A
    row held by a holder that is surely dead (`lease_holder_dead`) is taken over at once, by
    an UPDATE conditional on that very holder, so of two takers only one wins."""
    # SET expressions see the row as it was, so `holder = me` tells a renewal (keep
    # acquired_at) from a takeover (acquired now).
    updated = Lease.objects.filter(
        Q(name=name) & (Q(holder=holder) | Q(expires_at__lt=Now()))
    ).update(
        acquired_at=Case(When(holder=holder, then=F("acquired_at")), default=Now()),
        holder=holder,
        renewed_at=Now(),
        expires_at=_expires(ttl_seconds),
    )
    if updated == 1:
        return True
    current = Lease.objects.filter(name=name).values_list("holder", flat=True).first()
    if current is not None:
        if not lease_holder_dead(current):
            return False
        taken = Lease.objects.filter(name=name, holder=current).update(
            acquired_at=Now(), holder=holder, renewed_at=Now(), expires_at=_expires(ttl_seconds)
        )
        if taken == 1:
            logger.warning("lease %s: took it over from %s, whose process is gone", name, current)
        return taken == 1
    try:
        with transaction.atomic():
            Lease.objects.create(
                name=name,
                holder=holder,
                acquired_at=Now(),
                renewed_at=Now(),
                expires_at=_expires(ttl_seconds),
            )
    except IntegrityError:
        return False
    return True


def lease_keep(*, name: str, holder: str, ttl_seconds: float) -> None:
    """Renew a lease the caller works under, between two steps of its work; LeaseLost if its
    term ran out (the caller stops). Never taken back once lapsed: someone may have taken it,
    done the same work and released it meanwhile, and this caller's view is stale."""
    renewed = Lease.objects.filter(name=name, holder=holder, expires_at__gte=Now()).update(
        renewed_at=Now(), expires_at=_expires(ttl_seconds)
    )
    if not renewed:
        raise LeaseLost(f"lease {name} ran out before this pass renewed it; the pass stopped")


def lease_release(*, name: str, holder: str) -> bool:
    """Give the lease up at once (clean shutdown), so another worker need not wait out the
    TTL. Only the holder can release it."""
    return Lease.objects.filter(name=name, holder=holder).update(expires_at=_expires(-1.0)) == 1


def lease_record_pass(*, name: str, holder: str, seconds: float, changes: int) -> bool:
    """Record the holder's completed pass on its lease row. Only the holder writes it: a
    worker that lost the lease mid-pass does not overwrite its successor's figures."""
    return (
        Lease.objects.filter(name=name, holder=holder).update(
            last_pass_at=Now(), last_pass_seconds=seconds, last_pass_changes=changes
        )
        == 1
    )


def lease_current(name: str) -> Lease | None:
    """The lease row if someone holds it now (for display), else None."""
    return Lease.objects.filter(name=name, expires_at__gte=Now()).first()


def lease_record(name: str) -> tuple[Lease | None, bool]:
    """The lease row whether or not anyone holds it (it keeps the last recorded pass), and
    whether someone holds it now by the database's clock. One query."""
    row = (
        Lease.objects.filter(name=name)
        .annotate(held=ExpressionWrapper(Q(expires_at__gte=Now()), output_field=BooleanField()))
        .first()
    )
    return row, bool(row is not None and row.held)
