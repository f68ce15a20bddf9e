"""Log lines: the ids a line is about, the two formats (`LOG_FORMAT`), and no secrets.

Every log call about a task, a pool, a pod or an agent passes `extra=log_ids(...)`, so the
JSON format carries the same fields (`task_id`, `pool_id`, `pod`, `agent_id`) on every line
about them, whichever module wrote it: an operator filters one task's lines across web,
worker and agent processes with one query. The plain format shows only the message, which
names the same ids in words, so it reads as before.

Both formats pass the finished line through `redact`: a pool token, an agent secret or an
API token that reaches a log line anyway (a traceback quoting a header, a library logging a
request) is masked, since logs are read by more people, and kept longer, than the secrets'
owners would accept.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pythonjsonlogger.json import JsonFormatter

# Our three kinds of secret: `apt_<pool_id>_<64 hex>`, `ags_<64 hex>`, `pat_<64 hex>`. The
# prefix stays, so a reader still sees which kind of credential was there.
_SECRET_RE = re.compile(r"\b(apt_[A-Za-z0-9-]*_|ags_|pat_)[0-9a-fA-F]{8,}")
REDACTED = "<redacted>"

LOG_FORMATS = ("plain", "json")

# Every attribute a LogRecord has of its own (taskName too, on Python 3.12+): the rest of a
# record's attributes are the extras of the call.
_RESERVED = [*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message"]


def redact(text: str) -> str:
    """`text` with every secret of ours replaced by its prefix and `<redacted>`."""
    return _SECRET_RE.sub(lambda m: m.group(1) + REDACTED, text)


def log_ids(
    *,
    task: int | str | None = None,
    pool: str | None = None,
    pod: str | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """The `extra=` of a log call about these things; only the ones given become fields."""
    fields = {"task_id": task, "pool_id": pool, "pod": pod, "agent_id": agent}
    return {key: value for key, value in fields.items() if value not in (None, "")}


class PlainFormatter(logging.Formatter):
    """`time level logger: message`, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, message, the ids of `log_ids`, and for
    Django's and daphne's request lines the method, path and status instead of the request
    object (whose repr is noise, and whose headers hold credentials)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ISO 8601 in UTC, whatever the host's zone: lines of several hosts sort together.
        kwargs.setdefault("timestamp", "time")
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("reserved_attrs", [*_RESERVED, "request", "server_time", "scope"])
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        request = getattr(record, "request", None)
        method, path = getattr(request, "method", None), getattr(request, "path", None)
        if isinstance(method, str) and isinstance(path, str):
            log_data["method"], log_data["path"] = method, path

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def logging_config(*, log_format: str, level: str) -> dict[str, Any]:
    """settings.LOGGING for `LOG_FORMAT` and `LOG_LEVEL`. Everything goes to stderr through
    the root logger, Django's and daphne's loggers included, so one format covers them."""
    formatter = {
        "plain": {
            "()": PlainFormatter,
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        },
        "json": {"()": JsonLineFormatter},
    }[log_format]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "default"}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "WARNING"},
            # Lockouts are warnings; its start-up banner in every process is not news.
            "axes": {"level": "WARNING"},
            # Django's own console handler would print every line a second time via the root.
            "django": {"handlers": [], "level": "INFO"},
        },
    }
