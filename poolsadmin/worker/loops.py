"""The worker's loops, each a `run_once()` step that returns whether it did work.

The worker runs them round-robin in one process; any number of workers may run at once. The
scheduler is safe under concurrency (scheduler/services.py); the reconciler and the
autoscaler act only in the worker that holds the `reconciler` lease (worker/lease.py), and
another worker takes over within the lease TTL when that one dies. The daily prune runs in
whichever worker takes the `prune` lease once a day has passed (worker/prune.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from poolsadmin.autoscaler.services import autoscale_pool
from poolsadmin.lib import clock
from poolsadmin.lib.logs import log_ids
from poolsadmin.pools.models import AgentPool, PoolType
from poolsadmin.scheduler.diagnosis import diagnosis_record_all
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.worker.cluster_access import kube_for_pool
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_acquire_or_renew, lease_holder_id
from poolsadmin.worker.prune import prune_daily
from poolsadmin.worker.reconcile import LEASE_TTL_SECONDS, reconcile_pass_leader

logger = logging.getLogger(__name__)

# One lease holder id per worker process.
HOLDER = lease_holder_id()


@dataclass(frozen=True)
class Loop:
    name: str
    run_once: Callable[[], bool]
    interval_seconds: float  # minimum time between two passes


def _scheduler() -> bool:
    return scheduler_pass().did_work


def _reconciler() -> bool:
    reports = reconcile_pass_leader(holder=HOLDER, kube_factory=kube_for_pool)
    return reports is not None and any(r.did_work for r in reports)


def _autoscaler() -> bool:
    """1. only the lease holder scales; 2. one decision per k8s pool with a cluster client."""
    if not lease_acquire_or_renew(
        name=RECONCILER_LEASE, holder=HOLDER, ttl_seconds=LEASE_TTL_SECONDS
    ):
        return False
    changed = False
    for pool in AgentPool.objects.filter(pool_type=PoolType.K8S):
        kube = kube_for_pool(pool)
        if kube is None:
            continue
        try:
            decision = autoscale_pool(
                pool=pool,
                kube=kube,
                now=clock.now(),
                server_url=settings.POOLSADMIN_PUBLIC_URL,
                token_secret_name=settings.POOLSADMIN_AGENT_TOKEN_SECRET.format(
                    pool_id=pool.pool_id
                ),
            )
        except Exception:  # one pool's failure must not stop the others
            logger.exception(
                "autoscaling %s failed", pool.pool_id, extra=log_ids(pool=pool.pool_id)
            )
            continue
        changed = changed or decision.action in {"scale_up", "scale_down"}
    return changed


def _diagnosis() -> bool:
    return diagnosis_record_all() > 0


def _prune() -> bool:
    """Once a day, in one worker (worker/prune.py)."""
    report = prune_daily(holder=HOLDER)
    return report is not None and report.total > 0


LOOPS: dict[str, Loop] = {
    "scheduler": Loop("scheduler", _scheduler, interval_seconds=0.5),
    "reconciler": Loop("reconciler", _reconciler, interval_seconds=3.0),
    "autoscaler": Loop("autoscaler", _autoscaler, interval_seconds=5.0),
    "diagnosis": Loop("diagnosis", _diagnosis, interval_seconds=5.0),
    # Asks every minute whether a day has passed since the last prune (one query).
    "prune": Loop("prune", _prune, interval_seconds=60.0),
}
