from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, close_old_connections, connection

from poolsadmin.lib.wake import Listener
from poolsadmin.worker.cluster_access import kube_client_check
from poolsadmin.worker.heartbeat import heartbeat_touch
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_release
from poolsadmin.worker.loops import HOLDER, LOOPS, Loop

logger = logging.getLogger("poolsadmin.worker")


def run_loops(
    loops: list[Loop],
    *,
    stop: threading.Event,
    once: bool = False,
    listener: Listener | None = None,
) -> None:
    """Run each loop when it is due until `stop` is set. A failing pass is logged and retried
    on the next turn: one bad row must not stop the control plane. With a `listener`, a
    notice that work arrived (lib/wake.py) makes the scheduler due at once."""
    next_due = {loop.name: 0.0 for loop in loops}
    while not stop.is_set():
        for loop in loops:
            if stop.is_set():
                break
            if not once and time.monotonic() < next_due[loop.name]:
                continue
            # Drop a broken or expired connection between passes, as a request would; not
            # inside a caller's transaction (tests run passes inside one).
            if not connection.in_atomic_block:
                close_old_connections()
            try:
                did_work = loop.run_once()
            except Exception:
                logger.exception("%s pass failed", loop.name)
                did_work = False
            # Progress, even after a failed pass: liveness is about the loop turning, and a
            # restart would not cure a failing database (worker/heartbeat.py).
            heartbeat_touch()
            # A loop that found work goes again soon; an idle one waits its interval.
            next_due[loop.name] = time.monotonic() + (0.05 if did_work else loop.interval_seconds)
        if once:
            return
        # Idle turns count too: a worker with nothing due is alive.
        heartbeat_touch()
        wait = min(1.0, max(0.0, min(next_due.values()) - time.monotonic()))
        if listener is None:
            stop.wait(wait)
        elif listener.wait(wait, stop) and "scheduler" in next_due:
            next_due["scheduler"] = 0.0


class Command(BaseCommand):
    help = (
        "Run the background loops (scheduler, reconciler, autoscaler, diagnosis, prune) "
        "until SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="run one pass of each and exit")
        parser.add_argument(
            "--only",
            default="",
            help=f"comma-separated loops to run (of {', '.join(LOOPS)})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        names = [n.strip() for n in options["only"].split(",") if n.strip()] or list(LOOPS)
        unknown = [n for n in names if n not in LOOPS]
        if unknown:
            raise CommandError(f"unknown loop(s) {unknown}; choose from {list(LOOPS)}")
        loops = [LOOPS[n] for n in names]
        if {"reconciler", "autoscaler"} & set(names):  # the loops that talk to a cluster
            try:
                kube_client_check()
            except ImproperlyConfigured as exc:
                raise CommandError(f"cannot build the Kubernetes client (KUBE_*): {exc}") from exc
            except DatabaseError as exc:  # a failover under way: the passes will retry
                logger.warning("could not check the Kubernetes client at start-up: %s", exc)
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %s: finishing the current pass, then stopping", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.stdout.write(
            f"worker: running {', '.join(names)}" + (" once" if options["once"] else "")
        )
        listener = Listener() if "scheduler" in names and not options["once"] else None
        try:
            run_loops(loops, stop=stop, once=options["once"], listener=listener)
        finally:
            if listener is not None:
                listener.close()
        # Hand the reconciler lease over at once instead of making the next worker wait out
        # its TTL.
        lease_release(name=RECONCILER_LEASE, holder=HOLDER)
        self.stdout.write("worker: stopped")
