"""One settings module, configured from the environment.

Every variable is listed in `.env.example`. Bad values fail at start-up with a message that
names the variable. DEBUG is off unless asked for (`DEBUG=true`, which `make demo` sets): with
DEBUG off a SECRET_KEY is required and the production defaults hold (secure cookies, HSTS, SSL
redirect, manifest static files). With only DEBUG=true set, the zero-setup default runs
(SQLite file in `var/`, in-memory channel layer).
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from poolsadmin.kube.config import kube_config_from_env
from poolsadmin.lib.logs import LOG_FORMATS, logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("POOLSADMIN_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true/false, 1/0).")


def _env_number(name: str, default: float, *, minimum: float, kind: type[float]) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ImproperlyConfigured(f"{name}={raw!r} is not {what}.") from None
    if not math.isfinite(value) or value < minimum:
        raise ImproperlyConfigured(f"{name}={raw} must be >= {minimum}.")
    return value


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    return int(_env_number(name, default, minimum=minimum, kind=int))


def env_float(name: str, default: float, *, minimum: float) -> float:
    return _env_number(name, default, minimum=minimum, kind=float)


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_origins(name: str) -> list[str]:
    """Origins as Django compares them with a request's Origin header: scheme://host[:port]."""
    origins = env_list(name, [])
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if scheme not in {"http", "https"} or not rest or "/" in rest:
            raise ImproperlyConfigured(
                f"{name}: {origin!r} is not an origin (use https://host or https://host:port)."
            )
    return origins


def env_proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """`HTTP_X_FORWARDED_PROTO,https`: the request header (as Django names it in META) and the
    value that means the client spoke HTTPS to the proxy."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    header, _, value = (part.strip() for part in raw.partition(","))
    if not re.fullmatch(r"HTTP_[A-Z0-9_]+", header) or not value:
        raise ImproperlyConfigured(
            f"{name}={raw!r}: use HEADER,VALUE with the header as Django names it in META, "
            "e.g. HTTP_X_FORWARDED_PROTO,https."
        )
    return header, value


# Off unless asked for: a process started without configuration must not show tracebacks
# and settings to the world. `make demo` and the tests (pytest-env in pyproject) ask for it.
DEBUG = env_bool("DEBUG", default=False)

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (DEBUG is off unless DEBUG=true; "
            "`make demo` sets it for development)."
        )
    SECRET_KEY = "insecure-development-key-only-for-debug"

ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"] if DEBUG else []
)
# Only for origins other than the site's own (same-origin POSTs pass on their Host): for
# example a dashboard reached under a second name through another proxy.
CSRF_TRUSTED_ORIGINS = env_origins("CSRF_TRUSTED_ORIGINS")

# --- HTTPS --------------------------------------------------------------------------------------
# With DEBUG off every one defaults to what `check --deploy` asks for; each can be turned off.
# TLS ends at the Ingress. `daphne --proxy-headers` (the image's command) already takes the
# scheme from X-Forwarded-Proto; SECURE_PROXY_SSL_HEADER is for a server that does not.
SECURE_PROXY_SSL_HEADER = env_proxy_ssl_header("SECURE_PROXY_SSL_HEADER")
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=not DEBUG)
# Browsers are sent to HTTPS; machine clients are not. Inside the cluster the kubelet probes
# the pod, agents (POOLSADMIN_PUBLIC_URL), scrapers and scripts reach the Service by plain
# HTTP; a redirect would protect none of them (the token has crossed the network before the
# 301 comes back) and most clients turn a redirected POST into a GET. From outside, the
# Ingress serves HTTPS only. Django matches these against the path without its leading slash.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$", r"^api/"]
# Browsers remember HSTS for this long: a year, as `check --deploy` and the preload list ask.
# A first roll-out that may still need plain HTTP can start lower (3600).
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=False)
if SECURE_HSTS_PRELOAD and not (
    SECURE_HSTS_INCLUDE_SUBDOMAINS and SECURE_HSTS_SECONDS >= 31_536_000
):
    raise ImproperlyConfigured(
        "SECURE_HSTS_PRELOAD=true needs SECURE_HSTS_INCLUDE_SUBDOMAINS=true and "
        "SECURE_HSTS_SECONDS >= 31536000: the preload list refuses anything less."
    )
# Preloading is the domain owner's decision, made by submitting the apex domain to the
# browsers' list; it binds every other site on that domain. poolsadmin offers the setting and
# does not nag (security.W021) when the operator has left it off.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "axes",
    "channels",
    "poolsadmin.events",
    "poolsadmin.pools",
    "poolsadmin.agents",
    "poolsadmin.tasks",
    "poolsadmin.scheduler",
    "poolsadmin.worker",
    "poolsadmin.autoscaler",
    "poolsadmin.api",
    "poolsadmin.dashboard",
    "poolsadmin.realtime",
]

MIDDLEWARE = [
    # First: the kubelet's probes are answered before the host check and the HTTPS redirect
    # (the kubelet sends the pod IP as Host, over plain HTTP; health/views.py).
    "poolsadmin.health.middleware.HealthProbeMiddleware",
    # Outermost, so the line has the status the client got (LOG_REQUESTS; lib/request_log.py).
    "poolsadmin.lib.request_log.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files before sessions and the database: a stylesheet costs no query. After
    # security, so they get the HTTPS redirect and HSTS too.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "poolsadmin.lib.htmx.VaryOnHtmxMiddleware",
    # After CSRF (whose process_view reads forms first) and htmx (the refusal answers a dialog).
    "poolsadmin.lib.input.InputCheckMiddleware",
    # After everything that authenticates, as its docs ask: it turns a locked-out login into
    # the lockout page.
    "axes.middleware.AxesMiddleware",
    # Innermost: the first to see a view's database error (503 or one retry; lib/db.py).
    "poolsadmin.lib.db.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "poolsadmin.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "poolsadmin.wsgi.application"
ASGI_APPLICATION = "poolsadmin.asgi.application"

# --- Database -------------------------------------------------------------------------------
# Zero-setup default: an SQLite file in WAL mode. Every transaction is IMMEDIATE, so a writer
# takes the database write lock at BEGIN: two scheduler processes serialise instead of both
# reading "slot idle" and one failing at COMMIT. The busy timeout makes the loser wait.
DATABASE_URL = os.environ.get("DATABASE_URL", "")
SQLITE_BUSY_TIMEOUT_SECONDS = env_int("SQLITE_BUSY_TIMEOUT_SECONDS", 20, minimum=1)
# HTTP under daphne runs Django's WSGI handler in a pool of threads (poolsadmin/asgi.py,
# lib/http_app.py): at most HTTP_THREADS requests work at once (the others wait on the event
# loop; more threads only contend for the interpreter), and up to LONG_POLLS_MAX heartbeats
# wait for work, each on a thread of its own with no database connection. Past LONG_POLLS_MAX
# a heartbeat that asks to wait is answered at once.
HTTP_THREADS = env_int("HTTP_THREADS", 8, minimum=1)
LONG_POLLS_MAX = env_int("LONG_POLLS_MAX", 1000, minimum=0)

# PostgreSQL: a bounded pool of connections per process (Django's psycopg pool), never
# persistent connections. A persistent connection belongs to its thread: 200 agents
# heartbeating against one daphne process (a thread per request then) held a connection per
# request thread and ran the server out of them ("too many clients already", issue 8). With
# the pool a process never holds more than MAX_SIZE; a request that gets none within TIMEOUT
# answers 503 with Retry-After (lib/db.py).
DATABASE_POOL_MIN_SIZE = env_int("DATABASE_POOL_MIN_SIZE", 2, minimum=0)
DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 10, minimum=1)
DATABASE_POOL_TIMEOUT_SECONDS = env_int("DATABASE_POOL_TIMEOUT_SECONDS", 10, minimum=1)
if DATABASE_POOL_MAX_SIZE < DATABASE_POOL_MIN_SIZE:
    raise ImproperlyConfigured(
        f"DATABASE_POOL_MAX_SIZE={DATABASE_POOL_MAX_SIZE} must be >= "
        f"DATABASE_POOL_MIN_SIZE={DATABASE_POOL_MIN_SIZE}."
    )


def _database_from_env() -> dict[str, Any]:
    if not DATABASE_URL:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "poolsadmin.sqlite3",
        }
    else:
        try:
            config = dict(dj_database_url.parse(DATABASE_URL))
        except ValueError as exc:
            raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from exc
        if config.get("ENGINE") not in {
            "django.db.backends.sqlite3",
            "django.db.backends.postgresql",
        }:
            raise ImproperlyConfigured(
                f"DATABASE_URL uses {config.get('ENGINE')!r}; poolsadmin supports "
                "postgres:// and sqlite:// only."
            )
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config["OPTIONS"] = {
            "transaction_mode": "IMMEDIATE",
            "timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
            "init_command": (
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;"
            ),
        }
        config["CONN_MAX_AGE"] = 0
        # Tests use a file, not shared-cache memory: shared cache uses table locks that
        # ignore the busy timeout, and the concurrency tests need real SQLite behaviour.
        # One file per test run, so two runs on one machine do not clobber each other.
        config["TEST"] = {"NAME": str(VAR_DIR / f"test-poolsadmin-{os.getpid()}.sqlite3")}
    else:
        # The pool requires CONN_MAX_AGE = 0: a request "closes" its connection by handing it
        # back. Health checks make the pool test a connection before handing it out, so one
        # whose backend died while idle (killed, a failover) is replaced, not served.
        config["CONN_MAX_AGE"] = 0
        config["CONN_HEALTH_CHECKS"] = True
        config["OPTIONS"] = {
            **config.get("OPTIONS", {}),
            "pool": {
                "min_size": DATABASE_POOL_MIN_SIZE,
                "max_size": DATABASE_POOL_MAX_SIZE,
                "timeout": DATABASE_POOL_TIMEOUT_SECONDS,
            },
        }
        config["TEST"] = {"NAME": f"test_poolsadmin_{os.getpid()}"}
    return config


DATABASES = {"default": _database_from_env()}
# POSTs that may run twice with the effect of once. When the database connection dies under
# one of them it is run again on a fresh connection (lib/db.py), like a GET. The heartbeat is
# one transaction that records liveness and answers from the ledger: running it twice is
# running it once.
POOLSADMIN_RETRY_SAFE_URL_NAMES = ("agents-heartbeat",)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channels -------------------------------------------------------------------------------
# channels_redis waits for a consumer's messages with a blocking BZPOPMIN of 5 s
# (RedisChannelLayer.brpop_timeout), and redis-py 8 gives every socket a 5 s read timeout by
# default: on a quiet pool the read now and then times out just before Redis answers
# "nothing yet", receive() raises TimeoutError and the open page's consumer dies (issue 8: 12
# of 20 pages dead after a quiet minute; django/channels_redis#422). So reads wait well past
# the blocking read; TCP keepalive and a PING before using a connection idle for longer than
# the health check interval still find a dead connection to Redis.
CHANNEL_LAYER_SOCKET_TIMEOUT_SECONDS = 15
CHANNEL_LAYER_HEALTH_CHECK_SECONDS = 30


def redis_channel_layer(url: str) -> dict[str, Any]:
    return {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": url,
                    "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT_SECONDS,
                    "socket_connect_timeout": 5,
                    "socket_keepalive": True,
                    "health_check_interval": CHANNEL_LAYER_HEALTH_CHECK_SECONDS,
                }
            ]
        },
    }


CHANNEL_LAYER_URL = os.environ.get("CHANNEL_LAYER_URL", "")
if not CHANNEL_LAYER_URL or CHANNEL_LAYER_URL == "memory://":
    CHANNEL_LAYERS: dict[str, Any] = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    }
elif CHANNEL_LAYER_URL.startswith(("redis://", "rediss://")):
    CHANNEL_LAYERS = {"default": redis_channel_layer(CHANNEL_LAYER_URL)}
else:
    raise ImproperlyConfigured(
        f"CHANNEL_LAYER_URL={CHANNEL_LAYER_URL!r}: use redis://host:port/db or memory://."
    )

# --- Auth -------------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# Failed logins are throttled (django-axes): after LOGIN_FAILURE_LIMIT failures of one username
# from one address, that pair is refused (429) for LOGIN_LOCKOUT_MINUTES. Per pair, so that
# nobody can lock an admin out from everywhere by guessing at their name.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked.html"

# Database sessions that treat a cookie with a NUL byte as no session (lib/sessions.py).
SESSION_ENGINE = "poolsadmin.lib.sessions"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/pools/"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# Served by WhiteNoise's middleware (sync, like the rest of the chain). With DEBUG on it
# serves the source files as they change; with DEBUG off it serves what `manage.py
# collectstatic` put in STATIC_ROOT, under hashed names from the manifest (cached for good)
# and compressed. htmx is django-htmx's copy.
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or VAR_DIR / "staticfiles")
if DEBUG:
    # Only collectstatic fills it, for DEBUG off; WhiteNoise warns on every start without it.
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# LOG_FORMAT=json: one JSON object per line (python-json-logger), with the task, pool, pod and
# agent ids as fields on the lines about them (lib/logs.py); plain by default. Both mask any
# token or secret of ours that reaches a line.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain").strip().lower() or "plain"
if LOG_FORMAT not in LOG_FORMATS:
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r} is not one of {', '.join(LOG_FORMATS)}.")
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(
        f"LOG_LEVEL={LOG_LEVEL!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL."
    )
# One line per request through logging (so JSON with LOG_FORMAT=json), with the ids of the URL.
# daphne's own access log is plain text on stdout: run daphne with `-v 0` when this is on.
LOG_REQUESTS = env_bool("LOG_REQUESTS", default=False)
LOGGING = logging_config(log_format=LOG_FORMAT, level=LOG_LEVEL)

# --- poolsadmin -------------------------------------------------------------------------------
# How long an agent has to acknowledge a dispatch before it is rolled back (SPEC 4).
POOLSADMIN_ACK_TIMEOUT_SECONDS = env_int("POOLSADMIN_ACK_TIMEOUT_SECONDS", 30, minimum=1)
# Back-off between dispatch attempts after unacknowledged dispatches (SPEC 4).
POOLSADMIN_RETRY_BACKOFF_SECONDS = (5, 10, 20, 40, 60)
# Retention (manage.py prune, and the worker once a day; worker/prune.py). Days; what an open
# task needs is kept whatever its age. No history is kept shorter than a week: SPEC 2 promises
# "why did my apply wait yesterday" an answer, and SPEC 11 a moment's link that support pastes
# into a ticket, which is read in the days after. Admin actions (the audit log) are kept at
# least RETENTION_AUDIT_DAYS, never less than the events' retention.
RETENTION_MIN_DAYS = 7
RETENTION_EVENTS_DAYS = env_int("RETENTION_EVENTS_DAYS", 90, minimum=RETENTION_MIN_DAYS)
RETENTION_WAIT_HISTORY_DAYS = env_int("RETENTION_WAIT_HISTORY_DAYS", 30, minimum=RETENTION_MIN_DAYS)
RETENTION_SCALE_DECISIONS_DAYS = env_int(
    "RETENTION_SCALE_DECISIONS_DAYS", 30, minimum=RETENTION_MIN_DAYS
)
RETENTION_AUDIT_DAYS = env_int("RETENTION_AUDIT_DAYS", 365, minimum=RETENTION_MIN_DAYS)
if RETENTION_AUDIT_DAYS < RETENTION_EVENTS_DAYS:
    raise ImproperlyConfigured(
        f"RETENTION_AUDIT_DAYS={RETENTION_AUDIT_DAYS} must be >= "
        f"RETENTION_EVENTS_DAYS={RETENTION_EVENTS_DAYS}: admin actions are kept at least as "
        "long as other events."
    )
# The worker touches this file after every loop step; `manage.py worker_health` (its liveness
# probe) fails when it is older than its --max-age (worker/heartbeat.py).
POOLSADMIN_WORKER_HEARTBEAT_FILE = VAR_DIR / "worker-heartbeat"
# Kubernetes (KUBE_*): read here so that a bad value stops start-up, naming the variable, rather
# than surfacing when the first k8s pool is reconciled (kube/config.py).
KUBE_CONFIG = kube_config_from_env()
# The URL agent pods use to reach poolsadmin, and the Secret (per pool) holding their token.
POOLSADMIN_PUBLIC_URL = os.environ.get("POOLSADMIN_PUBLIC_URL", "http://127.0.0.1:8000")
POOLSADMIN_AGENT_TOKEN_SECRET = os.environ.get(
    "POOLSADMIN_AGENT_TOKEN_SECRET", "poolsadmin-agent-token-{pool_id}"
)
if "{pool_id}" not in POOLSADMIN_AGENT_TOKEN_SECRET:
    raise ImproperlyConfigured("POOLSADMIN_AGENT_TOKEN_SECRET must contain {pool_id}.")
# Every web process records, every few seconds, that the agent API is listening
# (agents/liveness.py): an agent's silence during an outage of poolsadmin is not held against
# it. Off only for test servers that share a database with tests moving the clock.
POOLSADMIN_HEARING_KEEPER = env_bool("POOLSADMIN_HEARING_KEEPER", default=True)
# How often (seconds); four missed touches are a gap. A pool's heartbeat timeout must be longer
# than a gap (20 s by default) for a shorter outage to be waited out too.
POOLSADMIN_HEARING_TICK_SECONDS = env_float("POOLSADMIN_HEARING_TICK_SECONDS", 5.0, minimum=0.1)
