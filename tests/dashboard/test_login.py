"""Failed logins are throttled (issue 8 item 9): one username from one address gets
LOGIN_FAILURE_LIMIT tries, then a 429 for LOGIN_LOCKOUT_MINUTES, even with the right password."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture
def alice() -> User:
    return User.objects.create_user(username="alice", password=PASSWORD)


def login(client: Client, username: str, password: str, ip: str = "10.0.0.1") -> Any:
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def test_after_five_failures_the_right_password_is_refused_too(
    client: Client, alice: User, settings: Any
) -> None:
    assert settings.AXES_FAILURE_LIMIT == 5
    for _ in range(4):
        assert login(client, "alice", "guess").status_code == 200  # the form, with an error
    assert login(client, "alice", "guess").status_code == 429

    locked = login(client, "alice", PASSWORD)

    assert locked.status_code == 429
    assert "Too many failed logins" in locked.content.decode()
    assert "_auth_user_id" not in client.session


def test_the_lockout_is_per_username_and_address(client: Client, alice: User) -> None:
    """Guessing at alice's name from one address locks neither alice elsewhere nor others."""
    User.objects.create_user(username="bob", password=PASSWORD)
    for _ in range(5):
        login(client, "alice", "guess")

    assert login(Client(), "alice", PASSWORD, ip="10.0.0.2").status_code == 302
    assert login(Client(), "bob", PASSWORD).status_code == 302


def test_a_successful_login_resets_the_count(client: Client, alice: User) -> None:
    for _ in range(4):
        login(client, "alice", "guess")
    assert login(client, "alice", PASSWORD).status_code == 302
    for _ in range(4):
        assert login(Client(), "alice", "guess").status_code == 200
