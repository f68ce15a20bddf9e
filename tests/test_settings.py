"""Settings come from the environment and fail loudly on bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _start(code: str = "print('started')", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "poolsadmin.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEBUG": "false", "SECRET_KEY": ""}, "SECRET_KEY must be set"),
        ({"DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
        ({"DATABASE_URL": "mysql://root@localhost/db"}, "postgres:// and sqlite:// only"),
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"CHANNEL_LAYER_URL": "amqp://x"}, "CHANNEL_LAYER_URL='amqp://x'"),
        ({"POOLSADMIN_ACK_TIMEOUT_SECONDS": "soon"}, "is not an integer"),
        ({"POOLSADMIN_ACK_TIMEOUT_SECONDS": "0"}, "must be >= 1"),
        # Kubernetes settings stop every process at start-up too, not at the first k8s pool.
        ({"KUBE_MODE": "incluster"}, "KUBE_MODE='incluster' is not one of"),
        ({"KUBE_TIMEOUT_SECONDS": "0"}, "KUBE_TIMEOUT_SECONDS=0 must be > 0"),
        ({"KUBE_MODE": "url", "KUBE_API_URL": "cluster:6443"}, "KUBE_API_URL='cluster:6443'"),
        ({"KUBE_VERIFY_SSL": "false"}, "KUBE_VERIFY_SSL is only used with KUBE_MODE=url"),
        ({"POOLSADMIN_HEARING_TICK_SECONDS": "nan"}, "POOLSADMIN_HEARING_TICK_SECONDS=nan"),
        ({"DATABASE_POOL_MAX_SIZE": "lots"}, "DATABASE_POOL_MAX_SIZE='lots' is not an integer"),
        ({"DATABASE_POOL_TIMEOUT_SECONDS": "0"}, "DATABASE_POOL_TIMEOUT_SECONDS=0 must be >= 1"),
        (
            {"DATABASE_POOL_MIN_SIZE": "8", "DATABASE_POOL_MAX_SIZE": "4"},
            "DATABASE_POOL_MAX_SIZE=4 must be >= DATABASE_POOL_MIN_SIZE=8",
        ),
    ],
)
def test_a_bad_value_stops_start_up_with_a_message_naming_it(
    env: dict[str, str], message: str
) -> None:
    result = _start(**env)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_zero_setup_default_starts(tmp_path: Path) -> None:
    result = _start(POOLSADMIN_VAR_DIR=str(tmp_path), DATABASE_URL="", CHANNEL_LAYER_URL="")
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


def test_production_values_start(tmp_path: Path) -> None:
    result = _start(
        DEBUG="false",
        SECRET_KEY="x" * 50,
        ALLOWED_HOSTS="poolsadmin.example.com",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/test",
        CHANNEL_LAYER_URL="redis://127.0.0.1:6379/0",
        POOLSADMIN_VAR_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr


DATABASE = (
    "import json; from django.conf import settings; db = settings.DATABASES['default']; "
    "print(json.dumps({k: db.get(k) for k in ('CONN_MAX_AGE', 'CONN_HEALTH_CHECKS')} "
    "| {'pool': db.get('OPTIONS', {}).get('pool')}))"
)


def test_postgresql_gets_a_bounded_pool_sized_from_the_environment_not_persistent_connections(
    tmp_path: Path,
) -> None:
    """Under ASGI a persistent connection is one per request thread (issue 8)."""
    result = _start(
        DATABASE,
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/test",
        DATABASE_POOL_MIN_SIZE="3",
        DATABASE_POOL_MAX_SIZE="7",
        DATABASE_POOL_TIMEOUT_SECONDS="4",
        POOLSADMIN_VAR_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": True,
        "pool": {"min_size": 3, "max_size": 7, "timeout": 4},
    }


def test_the_sqlite_default_has_no_pool(tmp_path: Path) -> None:
    result = _start(DATABASE, DATABASE_URL="", POOLSADMIN_VAR_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pool"] is None
