"""`manage.py worker_health`: the worker's liveness probe reads the loop's heartbeat file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from poolsadmin.worker.loops import LOOPS, Loop
from poolsadmin.worker.management.commands.worker import run_loops


@pytest.fixture
def heartbeat_file(settings: Any, tmp_path: Path) -> Path:
    path = tmp_path / "var" / "worker-heartbeat"
    settings.POOLSADMIN_WORKER_HEARTBEAT_FILE = path
    return path


@pytest.mark.django_db
def test_a_worker_pass_makes_the_worker_healthy(
    heartbeat_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_loops([LOOPS["scheduler"]], stop=threading.Event(), once=True)

    call_command("worker_health")
    assert "worker healthy" in capsys.readouterr().out
    assert heartbeat_file.exists()


def test_no_heartbeat_yet_is_unhealthy(heartbeat_file: Path) -> None:
    with pytest.raises(CommandError, match="no heartbeat yet"):
        call_command("worker_health")


def test_a_stale_heartbeat_is_unhealthy_naming_its_age(heartbeat_file: Path) -> None:
    heartbeat_file.parent.mkdir(parents=True)
    heartbeat_file.touch()
    ten_minutes_ago = time.time() - 600
    os.utime(heartbeat_file, (ten_minutes_ago, ten_minutes_ago))

    with pytest.raises(CommandError, match=r"last progress 600 s ago \(> 300 s"):
        call_command("worker_health")
    call_command("worker_health", max_age=900)  # within a longer allowance it is fine


@pytest.mark.django_db
def test_a_failing_pass_still_counts_as_progress(heartbeat_file: Path) -> None:
    def broken() -> bool:
        raise RuntimeError("the database is down")

    run_loops([Loop("broken", broken, interval_seconds=1.0)], stop=threading.Event(), once=True)

    call_command("worker_health")
