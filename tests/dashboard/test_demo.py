"""The demo's traffic keeps the pool alive without ever resolving the incident."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolsadmin.dashboard.management.commands.demo import (
    CONFIRM_AFTER,
    TRAFFIC_MAX_PENDING,
    Kubelet,
    fake_cluster_restore,
    traffic_step,
)
from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_AGENT_NAMES,
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    demo_seed,
)
from poolsadmin.kube.adapter import KubeClient, KubeConfig
from poolsadmin.kube.fake_api import FakeKubeServer, start_fake_kube
from poolsadmin.lib import clock
from poolsadmin.pools.models import Slot, SlotState
from poolsadmin.tasks.models import TaskStatus, Workspace, WorkspaceTask
from poolsadmin.tasks.services import task_cancel
from poolsadmin.worker.cluster import cluster_sync
from tests.ledger import plan_with_changes, submit

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path
    return tmp_path


@pytest.fixture
def fake() -> Iterator[FakeKubeServer]:
    with start_fake_kube(auto_run=True) as server:
        yield server


def test_traffic_confirms_other_applies_but_never_task_598() -> None:
    demo_seed()
    other = plan_with_changes(submit(Workspace.objects.get(name="observability"), "plan_and_apply"))
    clock.advance(CONFIRM_AFTER.total_seconds() + 1)

    done = traffic_step(rng=random.Random(1))

    assert f"confirmed the apply of #{other.pk}" in done
    other.refresh_from_db()
    assert other.apply_confirmed_by == "user:demo-traffic"
    incident = WorkspaceTask.objects.get(pk=INCIDENT_TASK_ID)
    assert (incident.status, incident.apply_confirmed_by) == (TaskStatus.APPLY_PENDING, "")


def test_traffic_stops_submitting_when_the_backlog_is_full() -> None:
    demo_seed()
    pending = WorkspaceTask.objects.filter(pool_id=DEMO_POOL_ID, status=TaskStatus.PENDING)
    assert pending.count() >= TRAFFIC_MAX_PENDING

    done = traffic_step(rng=random.Random(1))

    assert not [line for line in done if line.startswith("submitted")]


def test_traffic_submits_work_when_the_backlog_has_room() -> None:
    demo_seed()
    for task_id in WorkspaceTask.objects.filter(status=TaskStatus.PENDING).values_list(
        "id", flat=True
    ):
        task_cancel(task_id=task_id, actor="user:test", reason="make room")
    last_id = WorkspaceTask.objects.order_by("-id").values_list("id", flat=True)[0]

    done = traffic_step(rng=random.Random(1))

    submitted = WorkspaceTask.objects.filter(pk__gt=last_id)
    assert len([line for line in done if line.startswith("submitted")]) == submitted.count() > 0
    assert set(submitted.values_list("status", flat=True)) == {TaskStatus.PENDING}


# --- the fake cluster and its kubelet -------------------------------------------------------------


class StubAgent:
    """Runs until its stop event is set, like a ReferenceAgent, without any server."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def run(self, stop: threading.Event) -> None:
        self.log.append(f"start {self.name}")
        stop.wait()
        self.log.append(f"stop {self.name}")


def test_the_kubelet_runs_an_agent_named_after_each_new_running_pod_and_stops_it_with_the_pod(
    fake: FakeKubeServer,
) -> None:
    log: list[str] = []
    kubelet = Kubelet(
        server=fake, namespaces=lambda: ["iac-agents"], agent_factory=lambda n: StubAgent(n, log)
    )
    assert kubelet.sync() == ([], [])

    fake.add_pod("iac-agents", "prod-agents-abcde", phase="Running")
    fake.add_pod("iac-agents", "prod-agents-pend1", phase="Pending")
    fake.add_pod("other", "not-watched", phase="Running")

    assert kubelet.sync() == (["prod-agents-abcde"], [])
    assert kubelet.running == ["prod-agents-abcde"]
    assert kubelet.sync() == ([], [])  # started once

    fake.set_phase("prod-agents-pend1", "Running")
    assert kubelet.sync() == (["prod-agents-pend1"], [])

    fake.delete_behind_back("prod-agents-abcde")
    assert kubelet.sync() == ([], ["prod-agents-abcde"])
    assert kubelet.running == ["prod-agents-pend1"]
    fake.set_phase("prod-agents-pend1", "Failed")
    assert kubelet.sync() == ([], ["prod-agents-pend1"])
    assert kubelet.running == []
    # Stopped agents have returned from run().
    assert log == [
        "start prod-agents-abcde",
        "start prod-agents-pend1",
        "stop prod-agents-abcde",
        "stop prod-agents-pend1",
    ]


def test_the_kubelet_runs_agents_for_pods_the_autoscaler_creates(fake: FakeKubeServer) -> None:
    pool = demo_seed().pool
    started: list[str] = []

    def factory(name: str) -> StubAgent:
        started.append(name)
        return StubAgent(name, [])

    kubelet = Kubelet(server=fake, namespaces=lambda: [pool.namespace], agent_factory=factory)
    with KubeClient(KubeConfig(mode="url", url=fake.url, timeout_seconds=5.0)) as kube:
        info = kube.create_pod(pool=pool, server_url="http://demo", token_secret_name="t")
    try:
        assert kubelet.sync() == ([info.name], [])
        assert started == [info.name] and info.name.startswith("prod-agents-")
    finally:
        kubelet.stop_all()


def test_the_fake_cluster_gets_the_ledgers_pods_so_598_keeps_its_reservation(
    fake: FakeKubeServer,
) -> None:
    pool = demo_seed().pool

    assert fake_cluster_restore(fake) == list(DEMO_AGENT_NAMES)
    assert fake_cluster_restore(fake) == list(DEMO_AGENT_NAMES)  # idempotent

    with KubeClient(KubeConfig(mode="url", url=fake.url, timeout_seconds=5.0)) as kube:
        listed = kube.list_pods(namespace=pool.namespace, pool_id=pool.pool_id)
        assert {(p.name, p.phase) for p in listed} == {(n, "Running") for n in DEMO_AGENT_NAMES}
        # The reconciler's cluster sync finds every ledger pod: nothing vanished.
        changes = cluster_sync(pool=pool, kube=kube)
    assert [c for c in changes if c.kind in {"pod.remove", "reservation.drop"}] == []
    slot = Slot.objects.get(task_id=INCIDENT_TASK_ID)
    assert slot.state == SlotState.RESERVED
