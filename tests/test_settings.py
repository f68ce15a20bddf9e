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
        ({"SECURE_SSL_REDIRECT": "sometimes"}, "SECURE_SSL_REDIRECT='sometimes' is not a boolean"),
        ({"SESSION_COOKIE_SECURE": "y"}, "SESSION_COOKIE_SECURE='y' is not a boolean"),
        ({"SECURE_HSTS_SECONDS": "1y"}, "SECURE_HSTS_SECONDS='1y' is not an integer"),
        ({"SECURE_HSTS_SECONDS": "-1"}, "SECURE_HSTS_SECONDS=-1 must be >= 0"),
        (
            {"SECURE_HSTS_PRELOAD": "true", "SECURE_HSTS_INCLUDE_SUBDOMAINS": "false"},
            "SECURE_HSTS_PRELOAD=true needs SECURE_HSTS_INCLUDE_SUBDOMAINS=true",
        ),
        ({"SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto: https"}, "SECURE_PROXY_SSL_HEADER="),
        ({"SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO"}, "HEADER,VALUE"),
        ({"CSRF_TRUSTED_ORIGINS": "poolsadmin.example.com"}, "is not an origin"),
        ({"CSRF_TRUSTED_ORIGINS": "https://a.example.com/login/"}, "is not an origin"),
    ],
)
def test_a_bad_value_stops_start_up_with_a_message_naming_it(
    env: dict[str, str], message: str
) -> None:
    result = _start(**env)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_zero_setup_default_starts_once_debug_is_asked_for(tmp_path: Path) -> None:
    result = _start(
        DEBUG="true", POOLSADMIN_VAR_DIR=str(tmp_path), DATABASE_URL="", CHANNEL_LAYER_URL=""
    )
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


def test_debug_is_off_unless_asked_for_so_a_bare_start_wants_a_secret_key(
    tmp_path: Path,
) -> None:
    result = _start(DEBUG="", SECRET_KEY="", POOLSADMIN_VAR_DIR=str(tmp_path))
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


SECURITY = (
    "import json; from django.conf import settings as s; print(json.dumps({n: getattr(s, n) for "
    "n in ('DEBUG', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_SSL_REDIRECT', "
    "'SECURE_HSTS_SECONDS', 'SECURE_HSTS_INCLUDE_SUBDOMAINS', 'SECURE_HSTS_PRELOAD', "
    "'SECURE_PROXY_SSL_HEADER', 'CSRF_TRUSTED_ORIGINS')}))"
)
PRODUCTION = {
    "DEBUG": "",
    "SECRET_KEY": "k7#Qv2!pZr9@Lm4$Tx8^Wn3&Hy6*Bc1(Df5)Gj0_Ks2+Ep7=Ua",
    "ALLOWED_HOSTS": "poolsadmin.example.com",
}
SECURE_VARIABLES = (
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
    "CSRF_TRUSTED_ORIGINS",
)


def _security(tmp_path: Path, **env: str) -> dict[str, object]:
    unset = dict.fromkeys(SECURE_VARIABLES, "")
    result = _start(SECURITY, POOLSADMIN_VAR_DIR=str(tmp_path), **{**unset, **env})
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_with_debug_off_the_secure_settings_are_on_by_default(tmp_path: Path) -> None:
    assert _security(tmp_path, **PRODUCTION) == {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": False,
        "SECURE_PROXY_SSL_HEADER": None,
        "CSRF_TRUSTED_ORIGINS": [],
    }


def test_with_debug_on_plain_http_works_for_development(tmp_path: Path) -> None:
    values = _security(tmp_path, DEBUG="true")

    assert values["DEBUG"] is True
    assert not any(values[name] for name in SECURE_VARIABLES)


def test_each_secure_setting_comes_from_the_environment(tmp_path: Path) -> None:
    values = _security(
        tmp_path,
        **PRODUCTION,
        SESSION_COOKIE_SECURE="false",
        CSRF_COOKIE_SECURE="false",
        SECURE_SSL_REDIRECT="false",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        SECURE_HSTS_PRELOAD="true",
        SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
        CSRF_TRUSTED_ORIGINS="https://poolsadmin.example.com, https://ops.example.com:8443",
    )

    assert values == {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_SSL_REDIRECT": False,
        "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "CSRF_TRUSTED_ORIGINS": ["https://poolsadmin.example.com", "https://ops.example.com:8443"],
    }


def _check_deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={
            **os.environ,
            **dict.fromkeys(SECURE_VARIABLES, ""),
            "POOLSADMIN_VAR_DIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="the defaults of DEBUG off"),
        pytest.param(
            {"SECURE_HSTS_PRELOAD": "true", "CSRF_TRUSTED_ORIGINS": "https://ops.example.com"},
            id="with preload",
        ),
    ],
)
def test_check_deploy_is_clean_with_a_production_environment(
    tmp_path: Path, env: dict[str, str]
) -> None:
    result = _check_deploy(tmp_path, **PRODUCTION, **env)

    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_names_what_a_production_environment_turned_off(tmp_path: Path) -> None:
    """The checks are not silenced wholesale: turning a secure setting off is reported."""
    result = _check_deploy(
        tmp_path, **PRODUCTION, SECURE_SSL_REDIRECT="false", SESSION_COOKIE_SECURE="false"
    )

    assert result.returncode != 0
    assert "security.W008" in result.stderr
    assert "security.W012" in result.stderr


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


@pytest.mark.parametrize(
    "url",
    ["", "sqlite:///{tmp}/other.sqlite3", "postgres://postgres@127.0.0.1:5432/test"],
    ids=["the sqlite default", "sqlite by url", "postgresql"],
)
def test_no_database_path_has_persistent_connections(tmp_path: Path, url: str) -> None:
    """Django's docs: persistent connections are for WSGI; under ASGI each request thread
    would keep one of its own."""
    result = _start(
        DATABASE, DATABASE_URL=url.format(tmp=tmp_path), POOLSADMIN_VAR_DIR=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["CONN_MAX_AGE"] == 0
