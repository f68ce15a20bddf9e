"""Personal API tokens: issued once, stored hashed, refused when unknown or revoked."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from poolsadmin.api.models import ApiToken
from poolsadmin.api.services import api_token_authenticate, api_token_create
from poolsadmin.events.models import Event
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput, Unauthenticated
from poolsadmin.lib.ids import sha256_hex

pytestmark = pytest.mark.django_db


def test_a_new_token_is_pat_and_64_hex_and_only_its_hash_is_stored(admin: User) -> None:
    token, secret = api_token_create(user=admin, name="laptop")
    assert re.fullmatch(r"pat_[0-9a-f]{64}", secret)
    stored = ApiToken.objects.get(pk=token.pk)
    assert stored.token_hash == sha256_hex(secret)
    assert secret[4:] not in stored.token_hash
    assert (stored.name, stored.user, stored.last_used_at) == ("laptop", admin, None)
    event = Event.objects.get(kind="api_token.created")
    assert (event.actor, event.target_id) == ("user:alice", "alice")
    assert secret not in str(event.after)


def test_a_token_needs_a_name(admin: User) -> None:
    with pytest.raises(InvalidInput) as error:
        api_token_create(user=admin, name="  ")
    assert error.value.field == "name"


def test_a_token_authenticates_its_user(admin: User) -> None:
    _, secret = api_token_create(user=admin, name="cli")
    assert api_token_authenticate(secret=secret) == admin


@pytest.mark.parametrize(
    "secret", ["pat_" + "0" * 64, "apt_pool-x_" + "0" * 64, "", "pat_", "Bearer pat_x"]
)
def test_an_unknown_or_malformed_token_is_refused(admin: User, secret: str) -> None:
    api_token_create(user=admin, name="cli")
    with pytest.raises(Unauthenticated):
        api_token_authenticate(secret=secret)


def test_a_revoked_token_is_refused(admin: User) -> None:
    token, secret = api_token_create(user=admin, name="cli")
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=clock.now())
    with pytest.raises(Unauthenticated, match="revoked"):
        api_token_authenticate(secret=secret)
    response = Client().get("/api/v1/pools", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 401
    assert response.json()["detail"] == "API token revoked"


def test_the_token_of_an_inactive_user_is_refused(admin: User) -> None:
    _, secret = api_token_create(user=admin, name="cli")
    User.objects.filter(pk=admin.pk).update(is_active=False)
    with pytest.raises(Unauthenticated, match="inactive"):
        api_token_authenticate(secret=secret)


def test_last_used_at_is_written_at_most_once_a_minute(admin: User) -> None:
    token, secret = api_token_create(user=admin, name="cli")
    start = clock.now()
    with clock.frozen_at(start):
        api_token_authenticate(secret=secret)
    assert ApiToken.objects.get(pk=token.pk).last_used_at == start

    with clock.frozen_at(start + timedelta(seconds=59)), CaptureQueriesContext(connection) as qs:
        api_token_authenticate(secret=secret)
    assert not [q for q in qs if q["sql"].lstrip().upper().startswith("UPDATE")]
    assert ApiToken.objects.get(pk=token.pk).last_used_at == start

    with clock.frozen_at(start + timedelta(seconds=60)):
        api_token_authenticate(secret=secret)
    assert ApiToken.objects.get(pk=token.pk).last_used_at == start + timedelta(seconds=60)


def test_the_command_prints_a_token_that_authenticates(admin: User) -> None:
    out, err = StringIO(), StringIO()
    call_command("create_api_token", "alice", "--name", "deploy", stdout=out, stderr=err)
    secret = out.getvalue().strip()
    assert re.fullmatch(r"pat_[0-9a-f]{64}", secret)
    assert "shown only this once" in err.getvalue()
    assert api_token_authenticate(secret=secret) == admin
    assert ApiToken.objects.get(user=admin).name == "deploy"
    response = Client().get("/api/v1/pools", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200


def test_the_command_refuses_an_unknown_user(db: None) -> None:
    with pytest.raises(CommandError, match="no user named 'mallory'"):
        call_command("create_api_token", "mallory", stdout=StringIO(), stderr=StringIO())
    assert not ApiToken.objects.exists()
