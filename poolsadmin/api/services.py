"""Writes for the admin API: personal API tokens (`pat_<64 hex>`, stored as SHA-256 only)."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest

from poolsadmin.api.models import ApiToken
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput, Unauthenticated
from poolsadmin.lib.ids import secret_hex, sha256_hex

TOKEN_PREFIX = "pat_"
MAX_NAME = 200  # ApiToken.name
# Scripts call the API in bursts; one write per token per minute is enough for "last used".
LAST_USED_RESOLUTION = timedelta(minutes=1)


def user_actor(user: User) -> str:
    """The actor string services and the event log use for a person."""
    return f"user:{user.get_username()}"


def request_actor(request: HttpRequest) -> str:
    """The actor of an authenticated request (views check authentication first)."""
    user = request.user
    assert isinstance(user, User), "an action view ran for an anonymous request"
    return user_actor(user)


def api_token_create(*, user: User, name: str) -> tuple[ApiToken, str]:
    """A new token for `user`. The secret is returned once and never stored."""
    name = name.strip()
    if not name:
        raise InvalidInput("name is required", field="name")
    if len(name) > MAX_NAME:
        raise InvalidInput(f"name is longer than {MAX_NAME} characters", field="name")
    secret = TOKEN_PREFIX + secret_hex(32)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user, name=name, token_hash=sha256_hex(secret), created_at=clock.now()
        )
        event_record(
            actor=user_actor(user),
            kind="api_token.created",
            target_type="user",
            target_id=user.get_username(),
            after={"token_id": token.pk, "token_name": token.name},
        )
    return token, secret


def api_token_authenticate(*, secret: str) -> User:
    """The active user behind a bearer secret, or Unauthenticated."""
    if not secret.startswith(TOKEN_PREFIX):
        raise Unauthenticated("not a personal API token (expected pat_<64 hex>)")
    token = ApiToken.objects.select_related("user").filter(token_hash=sha256_hex(secret)).first()
    if token is None:
        raise Unauthenticated("unknown API token")
    if token.revoked_at is not None:
        raise Unauthenticated("API token revoked")
    if not token.user.is_active:
        raise Unauthenticated("the user of this API token is inactive")
    now = clock.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token.user
