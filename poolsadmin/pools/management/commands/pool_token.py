"""`manage.py pool_token create --pool POOL_ID [--name NAME] [--k8s-secret [SECRET]
[--namespace NS]]`: issue a pool token (the agents' bearer credential).

Without --k8s-secret the token is printed once, as the admin API answers it, and never
again (only its SHA-256 is kept). With --k8s-secret it is written into the Secret that the
pool's agent pods read it from (key `token`; by default the name the autoscaler gives pods,
POOLSADMIN_AGENT_TOKEN_SECRET, in the pool's namespace) and neither printed nor logged: it
goes from memory to the cluster. A Secret that cannot be written leaves no usable token
behind: the new token is revoked.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolsadmin.kube.adapter import KubeClient, KubeError
from poolsadmin.lib.errors import DomainError
from poolsadmin.pools.grid import pool_get
from poolsadmin.pools.models import AgentPool
from poolsadmin.pools.services import pool_token_create, pool_token_revoke

ACTOR = "system:cli"


class Command(BaseCommand):
    help = "Create a pool token; print it once, or write it into the agents' Kubernetes Secret."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="issue a new token for a pool")
        create.add_argument("--pool", required=True, help="the pool id (pool-...)")
        create.add_argument("--name", default="", help="the token's name (default: its use)")
        create.add_argument(
            "--k8s-secret",
            nargs="?",
            const="",
            default=None,
            metavar="SECRET",
            help="write the token into this Secret instead of printing it "
            "(default name: POOLSADMIN_AGENT_TOKEN_SECRET for the pool)",
        )
        create.add_argument(
            "--namespace", default="", help="the Secret's namespace (default: the pool's)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            pool = pool_get(pool_id=options["pool"])
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        if options["k8s_secret"] is None:
            if options["namespace"]:
                raise CommandError("--namespace only goes with --k8s-secret")
            issued = pool_token_create(pool=pool, name=options["name"] or "cli", actor=ACTOR)
            self.stdout.write(f"token {issued.token.name} for {pool.pool_id} (shown once):")
            self.stdout.write(issued.secret)
            return
        self._create_into_secret(pool=pool, options=options)

    def _create_into_secret(self, *, pool: AgentPool, options: dict[str, Any]) -> None:
        default_name = settings.POOLSADMIN_AGENT_TOKEN_SECRET.format(pool_id=pool.pool_id)
        secret_name = options["k8s_secret"] or default_name
        namespace = options["namespace"] or pool.namespace
        if not namespace:
            raise CommandError(f"{pool.pool_id} has no namespace: pass --namespace")
        # The client first: a configuration that cannot work must not cost a token.
        try:
            kube = KubeClient(settings.KUBE_CONFIG)
        except ImproperlyConfigured as exc:
            raise CommandError(f"cannot build the Kubernetes client (KUBE_*): {exc}") from exc
        with kube:
            issued = pool_token_create(
                pool=pool,
                name=options["name"] or f"k8s-secret {namespace}/{secret_name}",
                actor=ACTOR,
            )
            try:
                outcome = kube.put_token_secret(
                    namespace=namespace,
                    name=secret_name,
                    pool_id=pool.pool_id,
                    token=issued.secret,
                )
            except KubeError as exc:
                pool_token_revoke(token_id=issued.token.pk, actor=ACTOR)
                raise CommandError(
                    f"could not write secret {namespace}/{secret_name} ({exc.message}); "
                    f"token {issued.token.name} was revoked"
                ) from exc
        self.stdout.write(
            f"token {issued.token.name} for {pool.pool_id}: secret {namespace}/{secret_name} "
            f"{outcome} (key token; the token is not shown)"
        )
        if secret_name != default_name:
            self.stderr.write(
                f"note: the autoscaler's pods read {default_name} "
                "(POOLSADMIN_AGENT_TOKEN_SECRET), not this Secret"
            )
