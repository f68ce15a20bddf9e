"""The worker's loops, each a `run_once()` step that returns whether it did work.

The worker runs them round-robin in one process; any number of workers may run at once (the
scheduler is safe under concurrency; see scheduler/services.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from poolsadmin.scheduler.diagnosis import diagnosis_record_all
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.worker.reconcile import reconcile_pass


@dataclass(frozen=True)
class Loop:
    name: str
    run_once: Callable[[], bool]
    interval_seconds: float  # minimum time between two passes


def _scheduler() -> bool:
    return scheduler_pass().did_work


def _reconciler() -> bool:
    return reconcile_pass().did_work


def _diagnosis() -> bool:
    return diagnosis_record_all() > 0


LOOPS: dict[str, Loop] = {
    "scheduler": Loop("scheduler", _scheduler, interval_seconds=0.5),
    "reconciler": Loop("reconciler", _reconciler, interval_seconds=3.0),
    "diagnosis": Loop("diagnosis", _diagnosis, interval_seconds=5.0),
}
