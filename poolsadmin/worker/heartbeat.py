"""The worker's proof of life for its liveness probe: a file the loop touches after every step.

A file rather than a row: the probe must say whether this process's loop still turns, not
whether the database answers (a database outage makes every pass fail fast, and restarting
workers would not help). `manage.py worker_health` reads its age; the kubelet runs it in the
worker's container, which has its own POOLSADMIN_VAR_DIR (an emptyDir). Several workers
sharing one VAR_DIR (a developer's machine) share the file: the freshest one counts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from django.conf import settings


def heartbeat_path() -> Path:
    return Path(settings.POOLSADMIN_WORKER_HEARTBEAT_FILE)


def heartbeat_touch() -> None:
    """Record that the loop made progress now (the file's modification time)."""
    path = heartbeat_path()
    try:
        os.utime(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def heartbeat_age_seconds() -> float | None:
    """Seconds since the loop last made progress, or None if it never did here."""
    try:
        modified = heartbeat_path().stat().st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, time.time() - modified)
