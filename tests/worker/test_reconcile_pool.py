"""reconcile_pool (one pool, "Reconcile now"), its dry run, the leader-only pass and the
`reconcile` command."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from poolsadmin.agents.models import Agent
from poolsadmin.events.models import Event
from poolsadmin.kube.adapter import KubeApi, KubeClient
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool, Pod, Slot, SlotState
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.worker.lease import lease_acquire_or_renew, lease_current
from poolsadmin.worker.reconcile import reconcile_pass_leader, reconcile_pool
from tests.kube.fake_api import FakeKubeServer
from tests.ledger import make_agent, make_pool, make_workspace, plan_with_changes, run, submit
from tests.worker.kube_scenarios import adopted_pod_with_agent, cluster_pod, make_k8s_pool
from tests.worker.leases import expire_lease

pytestmark = pytest.mark.django_db


def _counts() -> tuple[int, int, int, list[tuple[int, str]]]:
    return (
        Event.objects.count(),
        Pod.objects.count(),
        Slot.objects.exclude(state=SlotState.IDLE).count(),
        list(WorkspaceTask.objects.order_by("pk").values_list("pk", "status")),
    )


def _drifting_k8s_pool(server: FakeKubeServer, kube: KubeApi) -> AgentPool:
    """Work for every step: a failed pod with a running task, a vanished pod with a
    reservation, a new pod, a stale agent and a drifted slot."""
    pool = make_k8s_pool(slots_per_pod=2, plan_and_apply_per_pod=2)
    adopted_pod_with_agent(server, kube, pool, "failed-pod")
    run(submit(make_workspace(pool), "plan"))
    adopted_pod_with_agent(server, kube, pool, "gone-pod")
    Pod.objects.filter(name="failed-pod").update(cordoned=True)  # keep new work on gone-pod
    plan_with_changes(submit(make_workspace(pool), "plan_and_apply"))
    drifted = run(submit(make_workspace(pool), "plan"))
    WorkspaceTask.objects.filter(pk=drifted.pk).update(status=TaskStatus.SUCCESS)  # drift
    server.set_phase("failed-pod", "Failed")
    server.delete_behind_back("gone-pod")
    cluster_pod(server, pool, "new-pod")
    return pool


def test_a_dry_run_lists_the_changes_and_changes_nothing(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = _drifting_k8s_pool(fake_kube, kube_client)
    before = _counts()
    cluster_before = fake_kube.pods()

    report = reconcile_pool(pool=pool, kube=kube_client, dry_run=True)

    kinds = {c.kind for c in report.changes}
    assert {"pod.delete", "task.fail", "reservation.drop", "pod.remove", "pod.adopt"} <= kinds
    # The drifted slot is on the vanished pod: freed as part of releasing it.
    assert "slot.free" in kinds
    assert not report.did_work
    assert _counts() == before
    assert fake_kube.pods() == cluster_before
    assert [r.method for r in fake_kube.requests_log if r.method != "GET"] == []

    done = reconcile_pool(pool=pool, kube=kube_client)
    assert done.changes == report.changes
    assert _counts() != before
    assert sorted(Pod.objects.filter(pool=pool).values_list("name", flat=True)) == ["new-pod"]


def test_a_static_pool_is_reconciled_without_a_cluster() -> None:
    pool = make_pool(heartbeat_timeout_seconds=120)
    make_agent(pool, "P1")
    clock.advance(121)
    report = reconcile_pool(pool=pool, kube=None, dry_run=True)
    assert [c.kind for c in report.changes] == ["agent.offline"]
    assert reconcile_pool(pool=pool, kube=None).changes[0].kind == "agent.offline"


def test_only_the_lease_holder_reconciles(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    cluster_pod(fake_kube, pool, "agent-a")

    def factory(p: AgentPool) -> KubeApi:
        return kube_client

    assert lease_acquire_or_renew(name="reconciler", holder="other", ttl_seconds=30)
    assert reconcile_pass_leader(holder="me", kube_factory=factory) is None
    assert not Pod.objects.filter(pool=pool).exists()

    expire_lease("reconciler")
    reports = reconcile_pass_leader(holder="me", kube_factory=factory)
    assert reports is not None
    assert [c.kind for r in reports for c in r.changes] == ["pod.adopt"]
    lease = lease_current("reconciler")
    assert lease is not None and lease.holder == "me"
    assert reconcile_pass_leader(holder="other", kube_factory=factory) is None


def test_the_command_prints_a_dry_run_then_applies_it(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool()
    cluster_pod(fake_kube, pool, "agent-a")
    out = StringIO()
    call_command(
        "reconcile", "--pool", pool.pool_id, "--dry-run", "--kube-url", fake_kube.url, stdout=out
    )
    assert "would change 1" in out.getvalue() and "pod.adopt agent-a" in out.getvalue()
    assert not Pod.objects.filter(pool=pool).exists()

    out = StringIO()
    call_command("reconcile", "--pool", pool.pool_id, "--kube-url", fake_kube.url, stdout=out)
    assert "changed 1" in out.getvalue()
    assert Pod.objects.filter(pool=pool, name="agent-a").exists()


def test_the_command_refuses_an_unknown_pool() -> None:
    with pytest.raises(CommandError, match="does not exist"):
        call_command("reconcile", "--pool", "pool-nope")


def test_the_command_reports_a_cluster_error_and_changes_nothing(
    fake_kube: FakeKubeServer,
) -> None:
    pool = make_k8s_pool()
    cluster_pod(fake_kube, pool, "agent-a")
    fake_kube.fail_next(1, 500)
    out, err = StringIO(), StringIO()
    call_command(
        "reconcile", "--pool", pool.pool_id, "--kube-url", fake_kube.url, stdout=out, stderr=err
    )
    assert "cluster sync skipped" in err.getvalue()
    assert "nothing to change" in out.getvalue()
    assert not Pod.objects.filter(pool=pool).exists()


def test_a_task_lost_twice_over_is_listed_and_failed_once(
    fake_kube: FakeKubeServer, kube_client: KubeClient
) -> None:
    pool = make_k8s_pool(heartbeat_timeout_seconds=120, task_grace_seconds=60)
    adopted_pod_with_agent(fake_kube, kube_client, pool, "agent-a")
    task = run(submit(make_workspace(pool), "plan"))
    clock.advance(200)  # the agent is lost...
    fake_kube.delete_behind_back("agent-a")  # ...and so is its pod

    dry = reconcile_pool(pool=pool, kube=kube_client, dry_run=True)
    done = reconcile_pool(pool=pool, kube=kube_client)

    target = f"task #{task.pk}"
    assert [c.kind for c in dry.changes if c.target == target] == ["task.fail"]
    assert dry.changes == done.changes


def test_reconciling_one_pool_leaves_other_pools_agents_to_their_own_pass() -> None:
    mine, other = make_pool(name="mine"), make_pool(name="other")
    a = make_agent(mine, "a")
    b = make_agent(other, "b")
    clock.advance(mine.heartbeat_timeout_seconds + 1)

    report = reconcile_pool(pool=mine, kube=None)

    assert [c.kind for c in report.changes].count("agent.offline") == 1
    statuses = dict(Agent.objects.values_list("agent_id", "status"))
    assert (statuses[a.agent_id], statuses[b.agent_id]) == ("offline", "online")
