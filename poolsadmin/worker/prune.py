"""Retention (SPEC 11): `history_prune` deletes old history in bounded batches; the worker's
`prune` step runs it once a day in one worker.

What is old: events older than `RETENTION_EVENTS_DAYS`, wait-reason rows that ended longer
than `RETENTION_WAIT_HISTORY_DAYS` ago, scale decisions older than
`RETENTION_SCALE_DECISIONS_DAYS`. What is never deleted, however old (SPEC 11: "history never
loses what an open task or the audit period needs"):

* anything about an open task: its events and its wait history, while the task is not
  terminal. A live reservation belongs to an open (apply_pending) task, so its `slot.reserved`
  event and the plan's timeline stay with it;
* the audit period: events a person caused (actor `user:<name>`, or `system:cli`, a person at
  a management command) are kept `RETENTION_AUDIT_DAYS`, which is never shorter than the
  events' retention;
* a pool's latest scale decision, which its page shows as "last decision and reason";
* an open wait-reason row (the current diagnosis).

Each batch is its own short transaction, so a big prune never holds the ledger's locks for
long (the scheduler dispatches between two batches). One `history.pruned` event says what was
deleted; its time is also how the worker knows when it last pruned, so a restart does not
prune again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q, QuerySet

from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.humanize import stamp
from poolsadmin.tasks.models import TERMINAL_STATUSES, WaitReason, WorkspaceTask
from poolsadmin.worker.lease import lease_acquire_or_renew, lease_release

PRUNE_LEASE = "prune"
PRUNE_EVERY = timedelta(days=1)
PRUNED_KIND = "history.pruned"
# Rows per delete: small enough that one batch's transaction is short on a busy ledger.
BATCH_SIZE = 1000
# Events whose actor is a person: the audit log's entries.
AUDIT_ACTORS = Q(actor__startswith="user:") | Q(actor="system:cli")


@dataclass(frozen=True)
class Cutoffs:
    events: datetime
    audit: datetime
    wait_history: datetime
    scale_decisions: datetime

    @classmethod
    def from_settings(cls, now: datetime) -> Cutoffs:
        def days(name: str) -> datetime:
            return now - timedelta(days=getattr(settings, name))

        return cls(
            events=days("RETENTION_EVENTS_DAYS"),
            audit=days("RETENTION_AUDIT_DAYS"),
            wait_history=days("RETENTION_WAIT_HISTORY_DAYS"),
            scale_decisions=days("RETENTION_SCALE_DECISIONS_DAYS"),
        )


@dataclass
class PruneReport:
    dry_run: bool
    cutoffs: Cutoffs
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows (or would be)
    batches: int = 0

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def _open_task_ids() -> QuerySet[WorkspaceTask, int]:
    return WorkspaceTask.objects.exclude(status__in=TERMINAL_STATUSES).values_list("pk", flat=True)


def prunable_events(cutoffs: Cutoffs) -> QuerySet[Event]:
    """Events past retention that no open task and no audit period needs."""
    old = Event.objects.filter(at__lt=cutoffs.events).exclude(kind=PRUNED_KIND)
    old = old.exclude(AUDIT_ACTORS & Q(at__gte=cutoffs.audit))
    return old.exclude(task_id__in=_open_task_ids())


def prunable_wait_reasons(cutoffs: Cutoffs) -> QuerySet[WaitReason]:
    """Ended diagnoses past retention, of tasks that are over."""
    return WaitReason.objects.filter(ended_at__lt=cutoffs.wait_history).exclude(
        task_id__in=_open_task_ids()
    )


def prunable_scale_decisions(cutoffs: Cutoffs) -> QuerySet[ScaleDecision]:
    """Decisions past retention, except each pool's latest."""
    latest = (
        ScaleDecision.objects.order_by()
        .values("pool_id")
        .annotate(last=Max("id"))
        .values_list("last", flat=True)
    )
    return ScaleDecision.objects.filter(at__lt=cutoffs.scale_decisions).exclude(pk__in=latest)


PRUNABLE = {
    "events": prunable_events,
    "task_wait_reasons": prunable_wait_reasons,
    "scale_decisions": prunable_scale_decisions,
}


def _delete_in_batches(select: QuerySet, batch_size: int) -> tuple[int, int]:
    """Delete what `select` finds, `batch_size` rows per transaction, selecting again in each
    one, so every row is checked against the rules by the transaction that deletes it.
    Returns (rows, batches)."""
    deleted = batches = 0
    while True:
        with transaction.atomic():
            ids = list(select.order_by("pk").values_list("pk", flat=True)[:batch_size])
            if not ids:
                return deleted, batches
            count, _ = select.model.objects.filter(pk__in=ids).delete()
        deleted += count
        batches += 1
        if len(ids) < batch_size:
            return deleted, batches


def history_prune(
    *, actor: str, dry_run: bool = False, batch_size: int = BATCH_SIZE, now: datetime | None = None
) -> PruneReport:
    """Delete (or, with `dry_run`, count) the history past retention, table by table in
    batches, then record one `history.pruned` event with the counts."""
    now = now or clock.now()
    cutoffs = Cutoffs.from_settings(now)
    report = PruneReport(dry_run=dry_run, cutoffs=cutoffs)
    for table, select in PRUNABLE.items():
        if dry_run:
            report.deleted[table] = select(cutoffs).count()
            continue
        rows, batches = _delete_in_batches(select(cutoffs), batch_size)
        report.deleted[table] = rows
        report.batches += batches
    if not dry_run:
        event_record(
            actor=actor,
            kind=PRUNED_KIND,
            target_type="history",
            target_id="retention",
            reason=", ".join(f"{n} {table}" for table, n in report.deleted.items())
            + f" deleted (events before {stamp(cutoffs.events)}, audit before "
            f"{stamp(cutoffs.audit)})",
            data={
                "deleted": report.deleted,
                "batches": report.batches,
                "cutoffs": {k: stamp(v) for k, v in vars(cutoffs).items()},
            },
        )
    return report


def prune_due(now: datetime) -> bool:
    """True if no prune was recorded within the last day."""
    return not Event.objects.filter(kind=PRUNED_KIND, at__gt=now - PRUNE_EVERY).exists()


def prune_daily(*, holder: str, actor: str = "system:prune") -> PruneReport | None:
    """The worker's step: 1. nothing if a prune was recorded within a day; 2. only the holder
    of the `prune` lease prunes (one worker of many); 3. the due check again under the lease
    (another worker may have just finished); 4. prune, then give the lease up."""
    if not prune_due(clock.now()):
        return None
    # A day's prune in batches takes minutes at most; the TTL only matters if this worker
    # dies mid-prune, and then the next prune is tomorrow's anyway.
    if not lease_acquire_or_renew(name=PRUNE_LEASE, holder=holder, ttl_seconds=3600):
        return None
    try:
        if not prune_due(clock.now()):
            return None
        return history_prune(actor=actor)
    finally:
        lease_release(name=PRUNE_LEASE, holder=holder)
