"""`manage.py worker`: --once, --only, unknown loops, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from poolsadmin.kube.adapter import KubeConfig
from poolsadmin.scheduler.services import scheduler_pass
from poolsadmin.tasks.models import TaskStatus
from poolsadmin.worker import cluster_access
from poolsadmin.worker.loops import LOOPS
from poolsadmin.worker.management.commands.worker import run_loops
from tests.backends import backend_killed_at_first_query, backend_pid, terminate_backend
from tests.ledger import make_agent, make_pool, make_workspace, refresh, submit
from tests.worker.kube_scenarios import make_k8s_pool

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.django_db
def test_once_runs_one_pass_of_each_loop(capsys: pytest.CaptureFixture[str]) -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    call_command("worker", once=True)
    assert refresh(task).status == TaskStatus.RUNNING
    assert "scheduler, reconciler, autoscaler, diagnosis, prune once" in capsys.readouterr().out


@pytest.mark.django_db
def test_only_picks_loops() -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    call_command("worker", once=True, only="reconciler")
    assert refresh(task).status == TaskStatus.PENDING
    assert scheduler_pass().dispatched == [task.pk]


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(CommandError, match="unknown loop"):
        call_command("worker", once=True, only="scheduler,nonsense")


def test_sigterm_stops_the_worker_cleanly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "POOLSADMIN_VAR_DIR": str(tmp_path),
        "DATABASE_URL": "",
        "PYTHONUNBUFFERED": "1",
    }
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, check=True, timeout=300)
    worker = subprocess.Popen(
        [*manage, "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Signal it once its handlers are installed: it says so as its loops start (on a busy
        # machine importing Django alone can take longer than any fixed sleep).
        assert worker.stdout is not None
        started = worker.stdout.readline()
        assert "worker: running" in started, started
        time.sleep(1)
        assert worker.poll() is None, "the worker must keep running until told to stop"
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert worker.returncode == 0, out
    assert "worker: stopped" in out


@pytest.mark.django_db
def test_a_cluster_configuration_that_cannot_work_stops_the_worker_at_start_up(
    settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not logged at the first pass while the worker runs on without ever syncing k8s pools."""
    monkeypatch.setattr(cluster_access, "_client", None)  # no client built by an earlier test
    make_k8s_pool()
    settings.KUBE_CONFIG = KubeConfig(
        mode="kubeconfig", kubeconfig_path=str(tmp_path / "missing-kubeconfig")
    )
    with pytest.raises(CommandError, match="cannot build the Kubernetes client"):
        call_command("worker", once=True)


# --- a killed database backend (issue 8) -------------------------------------------------------


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_pass_after_the_backend_was_killed_between_passes_runs_on_a_fresh_connection() -> None:
    """The pool hands out only connections that answer: the dead one is replaced before the
    pass, so the pass does its work instead of failing once."""
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")
    terminate_backend(backend_pid())

    run_loops([LOOPS["scheduler"]], stop=threading.Event(), once=True)

    assert refresh(task).status == TaskStatus.RUNNING


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_pass_whose_backend_is_killed_fails_alone_and_the_next_pass_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool()
    make_agent(pool, "P1")
    task = submit(make_workspace(pool), "plan")

    with backend_killed_at_first_query() as kill:
        run_loops([LOOPS["scheduler"]], stop=threading.Event(), once=True)
    assert kill.killed and "scheduler pass failed" in caplog.text

    run_loops([LOOPS["scheduler"]], stop=threading.Event(), once=True)

    assert refresh(task).status == TaskStatus.RUNNING


@pytest.mark.django_db
def test_a_scheduler_only_worker_needs_no_cluster_configuration(
    settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_access, "_client", None)
    make_k8s_pool()
    settings.KUBE_CONFIG = KubeConfig(
        mode="kubeconfig", kubeconfig_path=str(tmp_path / "missing-kubeconfig")
    )
    call_command("worker", once=True, only="scheduler")  # static pools keep scheduling
