"""`python manage.py prune [--dry-run]`: delete the history past its retention (RETENTION_*),
printing per table what it deleted or, with --dry-run, would delete. The worker runs the same
prune once a day."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from poolsadmin.worker.prune import history_prune


class Command(BaseCommand):
    help = "Delete events, wait history and scale decisions past their retention."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        report = history_prune(actor="system:cli", dry_run=options["dry_run"])
        verb = "would delete" if report.dry_run else "deleted"
        for table, rows in report.deleted.items():
            self.stdout.write(f"{table}: {verb} {rows}")
        if not report.dry_run:
            self.stdout.write(f"in {report.batches} batches")
