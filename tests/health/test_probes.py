"""`/healthz` and `/readyz`: what the kubelet's probes see, failures included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder
from django.test import Client

from poolsadmin.settings import redis_channel_layer

# A port nothing listens on: connecting is refused at once, like a database or Redis that is
# down, with the real drivers doing the connecting.
CLOSED_PORT = 1
POD_IP_HOST = "10.42.0.17:8000"
ROOT = Path(__file__).resolve().parents[2]


def test_healthz_answers_ok_without_touching_the_database(client: Client) -> None:
    # No django_db mark: pytest-django refuses any query here, so this proves none is made.
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["Cache-Control"] == "no-store"


@pytest.mark.django_db
def test_readyz_answers_ok_when_database_migrations_and_channel_layer_are_fine(
    client: Client,
) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "channel_layer": "ok"},
    }


def test_readyz_is_503_naming_the_database_when_it_is_unreachable() -> None:
    # A process of its own whose DATABASE_URL points at a closed port: the real driver and
    # connection pool fail to connect, as in a web pod whose database is down.
    code = (
        "import django, json; django.setup();"
        "from django.test import Client;"
        "r = Client().get('/readyz');"
        "print(json.dumps({'status': r.status_code, 'body': r.json()}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "poolsadmin.settings",
            "DATABASE_URL": f"postgres://poolsadmin@127.0.0.1:{CLOSED_PORT}/poolsadmin",
            "DATABASE_POOL_MIN_SIZE": "0",
            "DATABASE_POOL_TIMEOUT_SECONDS": "1",
            "CHANNEL_LAYER_URL": "",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["status"] == 503
    assert answer["body"]["checks"] == {"database": "failed", "channel_layer": "ok"}
    (problem,) = answer["body"]["failed"]["database"]
    assert problem.startswith("database default: OperationalError")
    assert "database default does not answer" in result.stderr  # logged in full


@pytest.mark.django_db
def test_readyz_is_503_naming_an_unapplied_migration(client: Client) -> None:
    executor = MigrationExecutor(connection)
    app_label, name = sorted(executor.loader.graph.leaf_nodes())[-1]
    # Inside the test's transaction: rolled back afterwards.
    MigrationRecorder(connection).record_unapplied(app_label, name)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["failed"] == {
        "database": [f"migrations default: 1 unapplied ({app_label}.{name})"]
    }


@pytest.mark.django_db
def test_readyz_is_503_naming_the_channel_layer_when_redis_is_unreachable(
    client: Client, settings: Any
) -> None:
    # channels resets its layers when CHANNEL_LAYERS changes (setting_changed).
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(f"redis://127.0.0.1:{CLOSED_PORT}/0")}
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {"database": "ok", "channel_layer": "failed"}
    (problem,) = body["failed"]["channel_layer"]
    assert problem.startswith("channel layer: ")


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_the_kubelet_by_pod_ip_over_http_without_login(
    client: Client, settings: Any, path: str
) -> None:
    # The production settings refuse unknown hosts and redirect to HTTPS; a probe must get
    # neither a 400 (restart loop) nor a redirect (which the kubelet counts as success).
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["poolsadmin.example.com"]
    settings.SECURE_SSL_REDIRECT = True
    response = client.get(path, HTTP_HOST=POD_IP_HOST)
    assert response.status_code == 200
    assert "Set-Cookie" not in response


def test_other_paths_still_refuse_an_unknown_host(client: Client, settings: Any) -> None:
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["poolsadmin.example.com"]
    assert client.get("/login/", HTTP_HOST=POD_IP_HOST).status_code == 400


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_refuse_other_methods(client: Client, path: str) -> None:
    response = client.post(path)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
