"""`manage.py create_api_token USERNAME [--name NAME]`: issue a personal API token.

The secret is printed once, on stdout alone, so `TOKEN=$(manage.py create_api_token alice)`
works in scripts; it cannot be shown again.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolsadmin.api.services import api_token_create
from poolsadmin.lib.errors import DomainError


class Command(BaseCommand):
    help = "Create a personal API token (pat_...) for a user and print it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="what the token is for (default: cli)")

    def handle(self, *args: Any, **options: Any) -> None:
        username: str = options["username"]
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        try:
            token, secret = api_token_create(user=user, name=options["name"])
        except DomainError as error:
            raise CommandError(error.message) from None
        self.stderr.write(
            f"Token {token.name!r} for {username} created; it is shown only this once."
        )
        self.stdout.write(secret)
