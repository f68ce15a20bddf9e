"""`manage.py agent_retire --pool POOL_ID --name NAME --reason WHY`: end an agent identity.

For an agent that lost its secret (its disk was wiped, it registered before agent secrets
existed): registering again under its name needs that secret, so the name stays taken until
an admin retires the old identity. Its running tasks fail, its secret stops working, the row
stays for history, and the next registration under the name is a new agent.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolsadmin.agents.models import Agent
from poolsadmin.agents.services import agent_retire
from poolsadmin.lib.errors import DomainError


class Command(BaseCommand):
    help = "Retire the live agent of a name in a pool, so that the name can be registered anew."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--pool", required=True, help="the pool id (pool-...)")
        parser.add_argument("--name", required=True, help="the agent's name (a pod name)")
        parser.add_argument("--reason", required=True, help="why, for the audit log")

    def handle(self, *args: Any, **options: Any) -> None:
        agent = Agent.objects.filter(
            pool_id=options["pool"], agent_name=options["name"], retired_at__isnull=True
        ).first()
        if agent is None:
            raise CommandError(f"no live agent named {options['name']!r} in {options['pool']}")
        try:
            agent_retire(agent=agent, actor="system:cli", reason=options["reason"])
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"retired {agent.agent_name} ({agent.agent_id})")
