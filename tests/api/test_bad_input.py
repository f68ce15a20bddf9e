"""Bad input to the agent and admin APIs (issue 8, item 4): every refusal is a 400 that names
the field, never a 500, and a refused request writes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from poolsadmin.pools.models import AgentPool

pytestmark = pytest.mark.django_db


def post(client: Client, url: str, body: Any, **headers: str) -> Any:
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(url, data, content_type="application/json", headers=headers)


# --- the body's keys -----------------------------------------------------------------------------


def test_an_empty_json_key_is_a_400_that_still_names_it(admin_client: Client) -> None:
    response = post(admin_client, "/api/v1/pools", {"name": "p", "": 1})

    assert response.status_code == 400
    assert response.json()["field"] == ""
    assert not AgentPool.objects.exists()
