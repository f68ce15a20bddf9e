"""`python manage.py reconcile --pool POOL_ID [--dry-run]`: one reconcile pass for one pool,
printing what it changed (or would change). The same pass as "Reconcile now"."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolsadmin.kube.adapter import KubeApi, KubeClient, KubeConfig, KubeError
from poolsadmin.pools.models import AgentPool, PoolType
from poolsadmin.worker.reconcile import reconcile_pool


class Command(BaseCommand):
    help = "Run one reconcile pass for one pool and print the changes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--pool", required=True, help="the pool id (pool-...)")
        parser.add_argument(
            "--dry-run", action="store_true", help="list what would change; change nothing"
        )
        parser.add_argument(
            "--kube-url",
            default="",
            help="talk to this API server URL (the local fake) instead of the KUBE_* settings",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        pool = AgentPool.objects.filter(pk=options["pool"]).first()
        if pool is None:
            raise CommandError(f"pool {options['pool']} does not exist")
        dry_run: bool = options["dry_run"]
        with ExitStack() as stack:
            kube: KubeApi | None = None
            if pool.pool_type == PoolType.K8S:
                try:
                    config = (
                        KubeConfig(mode="url", url=options["kube_url"])
                        if options["kube_url"]
                        else settings.KUBE_CONFIG
                    )
                    kube = stack.enter_context(KubeClient(config))
                except (ImproperlyConfigured, KubeError) as exc:
                    raise CommandError(f"cannot reach the cluster: {exc}") from exc
            report = reconcile_pool(pool=pool, kube=kube, dry_run=dry_run, actor="system:cli")
        verb = "would change" if dry_run else "changed"
        if report.cluster_error:
            self.stderr.write(f"cluster sync skipped: {report.cluster_error}")
        if not report.changes:
            self.stdout.write(f"{pool.pool_id}: nothing to change")
            return
        self.stdout.write(f"{pool.pool_id}: {verb} {len(report.changes)}")
        for change in report.changes:
            self.stdout.write(f"  {change}")
