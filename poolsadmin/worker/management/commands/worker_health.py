"""`manage.py worker_health`: the worker's liveness probe (an exec probe in its pod).

Exits 0 when the worker's loop touched its heartbeat file within --max-age seconds, 1 with a
message saying how stale it is otherwise. The default leaves room for the longest honest
step: a reconcile pass renews each pool's lease at least every 30 s, and with a few k8s pools
whose cluster times out (KUBE_TIMEOUT_SECONDS each call) a pass may take a few minutes; a loop
silent for longer than that is stuck, and a restart is the cure.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolsadmin.worker.heartbeat import heartbeat_age_seconds, heartbeat_path

DEFAULT_MAX_AGE_SECONDS = 300.0


class Command(BaseCommand):
    help = "Exit 0 if the worker's loop made progress within --max-age seconds, else 1."
    # A probe runs every few seconds: no system checks, no database.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age",
            type=float,
            default=DEFAULT_MAX_AGE_SECONDS,
            help=f"seconds (default {DEFAULT_MAX_AGE_SECONDS:g})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        max_age: float = options["max_age"]
        age = heartbeat_age_seconds()
        if age is None:
            raise CommandError(f"worker unhealthy: no heartbeat yet ({heartbeat_path()})")
        if age > max_age:
            raise CommandError(
                f"worker unhealthy: last progress {age:.0f} s ago (> {max_age:g} s; "
                f"{heartbeat_path()})"
            )
        self.stdout.write(f"worker healthy: last progress {age:.1f} s ago")
