"""`/metrics` (SPEC 8): access for sessions and bearer tokens, the exact lines of each metric
family for ledgers built through the services, the process metrics beside them, and a query
count that does not grow with the number of pools. Every scrape must parse with
prometheus_client's own parser."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from poolsadmin.agents.liveness import hearing_touch
from poolsadmin.autoscaler.services import pool_scale
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool
from poolsadmin.scheduler.services import task_dispatch, task_dispatch_rollback
from poolsadmin.tasks.models import TaskStatus, WorkspaceTask
from poolsadmin.tasks.services import task_confirm_apply
from poolsadmin.worker.lease import RECONCILER_LEASE, lease_acquire_or_renew
from poolsadmin.worker.models import Lease
from poolsadmin.worker.reconcile import ledger_check, reconcile_pass_leader
from tests.autoscaler.helpers import adopt_all, k8s_pool, scale
from tests.hearing import down
from tests.ledger import ADMIN, make_agent, make_pool, make_workspace, plan_with_changes, run
from tests.ledger import submit as submit_task
from tests.worker.leases import expire_lease

pytestmark = pytest.mark.django_db

POOL = "pool-metrics00000000a"
OTHER = "pool-metrics00000000b"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _frozen_clock() -> Any:
    with clock.frozen_at(T0):
        yield


def scrape(client: Client, **headers: str) -> str:
    response = client.get(reverse("metrics"), headers=headers)
    assert response.status_code == 200, response.content
    text = response.content.decode()
    assert list(text_string_to_metric_families(text))  # Prometheus can read all of it
    return text


def _number(value: float) -> str:
    """A sample's value as the expected lines write it: 2, not prometheus_client's 2.0."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def family(text: str, name: str) -> list[str]:
    """The sample lines of one metric family, in order, each value written by `_number`."""
    lines = []
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0] == name:
            series, value = line.rsplit(" ", 1)
            lines.append(f"{series} {_number(float(value))}")
    return lines


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pool_with_an_agent() -> AgentPool:
    """POOL, static, with one online agent: one pod of four idle slots."""
    pool = make_pool(pool_id=POOL, name="blue")
    make_agent(pool, "P1")
    return pool


def latency_lines(*seconds: int) -> list[str]:
    """The expected quantile lines of POOL's dispatch latency: p50, p90, p99."""
    return [
        f'poolsadmin_dispatch_latency_seconds{{pool="{POOL}",quantile="{q}"}} {value}'
        for q, value in zip(("0.5", "0.9", "0.99"), seconds, strict=True)
    ]


# --- access ------------------------------------------------------------------------------------


def test_a_viewer_session_gets_the_prometheus_text_format(viewer_client: Client) -> None:
    response = viewer_client.get(reverse("metrics"))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reverse("metrics") == "/metrics"


@pytest.mark.parametrize("persona", ["viewer_token", "admin_token"])
def test_a_scraper_with_a_personal_api_token_gets_the_metrics(
    client: Client, persona: str, request: pytest.FixtureRequest
) -> None:
    token = request.getfixturevalue(persona)

    assert "# TYPE poolsadmin_slots gauge" in scrape(client, **bearer(token))


def test_an_anonymous_scraper_is_told_to_authenticate(client: Client) -> None:
    response = client.get(reverse("metrics"))

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="poolsadmin"'


def test_an_unknown_token_is_refused(client: Client) -> None:
    response = client.get(reverse("metrics"), headers=bearer("pat_" + "0" * 64))

    assert response.status_code == 401


def test_a_user_without_the_view_permission_is_forbidden(client: Client) -> None:
    client.force_login(User.objects.create_user(username="nobody"))

    response = client.get(reverse("metrics"))

    assert response.status_code == 403
    assert response.json()["permission"] == "pools.view_agentpool"


def test_metrics_refuse_post(viewer_client: Client) -> None:
    response = viewer_client.post(reverse("metrics"))

    assert response.status_code == 405
    assert response["Allow"] == "GET"


# --- the text format ---------------------------------------------------------------------------


def test_a_pool_name_with_quotes_backslashes_and_a_newline_reads_back_unchanged(
    viewer_client: Client,
) -> None:
    make_pool(pool_id=POOL, name='say "hi" \\ to\nops')

    [info] = [
        sample
        for metric in text_string_to_metric_families(scrape(viewer_client))
        for sample in metric.samples
        if sample.name == "poolsadmin_pool_info"
    ]

    assert info.labels == {"pool": POOL, "name": 'say "hi" \\ to\nops', "type": "static"}
    assert info.value == 1


def test_the_process_metrics_come_with_the_ledger_metrics(viewer_client: Client) -> None:
    """Prometheus's own collectors for the web process that answered: CPU, memory, Python."""
    metrics = {m.name: m for m in text_string_to_metric_families(scrape(viewer_client))}

    assert metrics["process_cpu_seconds"].type == "counter"
    [resident] = metrics["process_resident_memory_bytes"].samples
    assert resident.value > 0
    [python] = metrics["python_info"].samples
    assert python.labels["implementation"] == "CPython"
    assert metrics["python_gc_collections"].samples
    assert metrics["poolsadmin_drift_repairs"].type == "counter"


def test_the_pool_name_is_escaped_in_the_info_metric(viewer_client: Client) -> None:
    make_pool(pool_id=POOL, name='ops "blue" \\ eu')

    assert family(scrape(viewer_client), "poolsadmin_pool_info") == [
        f'poolsadmin_pool_info{{name="ops \\"blue\\" \\\\ eu",pool="{POOL}",type="static"}} 1'
    ]


# --- values ------------------------------------------------------------------------------------


def test_slots_queue_and_oldest_wait_are_reported_per_pool(viewer_client: Client) -> None:
    pool = pool_with_an_agent()
    run(submit_task(make_workspace(pool), "plan"))
    plan_with_changes(submit_task(make_workspace(pool), "plan_and_apply"))
    submit_task(make_workspace(pool))
    clock.advance(30)
    submit_task(make_workspace(pool))
    clock.advance(10)
    make_pool(pool_id=OTHER, name="green")

    text = scrape(viewer_client)

    assert family(text, "poolsadmin_slots") == [
        f'poolsadmin_slots{{pool="{POOL}",state="idle"}} 2',
        f'poolsadmin_slots{{pool="{POOL}",state="running"}} 1',
        f'poolsadmin_slots{{pool="{POOL}",state="reserved"}} 1',
        f'poolsadmin_slots{{pool="{OTHER}",state="idle"}} 0',
        f'poolsadmin_slots{{pool="{OTHER}",state="running"}} 0',
        f'poolsadmin_slots{{pool="{OTHER}",state="reserved"}} 0',
    ]
    assert family(text, "poolsadmin_queue_length") == [
        f'poolsadmin_queue_length{{pool="{POOL}"}} 2',
        f'poolsadmin_queue_length{{pool="{OTHER}"}} 0',
    ]
    assert family(text, "poolsadmin_queue_oldest_wait_seconds") == [
        f'poolsadmin_queue_oldest_wait_seconds{{pool="{POOL}"}} 40',
        f'poolsadmin_queue_oldest_wait_seconds{{pool="{OTHER}"}} 0',
    ]


def test_an_unconfirmed_apply_is_not_in_the_queue(viewer_client: Client) -> None:
    pool = pool_with_an_agent()
    plan_with_changes(submit_task(make_workspace(pool), "plan_and_apply"))

    assert family(scrape(viewer_client), "poolsadmin_queue_length") == [
        f'poolsadmin_queue_length{{pool="{POOL}"}} 0'
    ]


def test_dispatch_latency_counts_from_submission_and_from_apply_confirmation(
    viewer_client: Client,
) -> None:
    pool = pool_with_an_agent()
    first = submit_task(make_workspace(pool), "plan")
    clock.advance(2)
    second = submit_task(make_workspace(pool), "plan_and_apply")
    clock.advance(3)
    run(first)  # waited 5 s
    plan_with_changes(second)  # waited 3 s
    clock.advance(60)  # the person takes a minute to confirm: not dispatch latency
    task_confirm_apply(task_id=second.pk, actor=ADMIN)
    clock.advance(8)
    assert task_dispatch(task_id=second.pk).dispatched  # the apply waited 8 s

    text = scrape(viewer_client)

    assert family(text, "poolsadmin_dispatch_latency_seconds") == latency_lines(5, 8, 8)
    assert family(text, "poolsadmin_dispatch_latency_window_dispatches") == [
        f'poolsadmin_dispatch_latency_window_dispatches{{pool="{POOL}"}} 3'
    ]


def test_a_dispatch_put_back_unacknowledged_counts_again_from_the_rollback(
    viewer_client: Client,
) -> None:
    pool = pool_with_an_agent()
    task = submit_task(make_workspace(pool), "plan")
    clock.advance(1)
    assert task_dispatch(task_id=task.pk).dispatched  # waited 1 s, never acknowledged
    clock.advance(31)
    assert task_dispatch_rollback(task_id=task.pk)
    clock.advance(6)  # past the 5 s back-off
    assert task_dispatch(task_id=task.pk).dispatched  # waited 6 s since the rollback

    text = scrape(viewer_client)
    assert family(text, "poolsadmin_dispatch_latency_seconds") == latency_lines(1, 6, 6)


def test_dispatches_older_than_the_window_are_left_out(viewer_client: Client) -> None:
    pool = pool_with_an_agent()
    run(submit_task(make_workspace(pool)))
    clock.advance(15 * 60 + 1)

    text = scrape(viewer_client)

    assert family(text, "poolsadmin_dispatch_latency_seconds") == []
    assert family(text, "poolsadmin_dispatch_latency_window_dispatches") == [
        f'poolsadmin_dispatch_latency_window_dispatches{{pool="{POOL}"}} 0'
    ]


def test_autoscaler_desired_pods_follow_the_latest_decision_and_actual_the_ledger(
    viewer_client: Client, running_cluster: tuple[Any, Any]
) -> None:
    fake, kube = running_cluster
    pool = k8s_pool(pool_id=POOL, name="blue", min_replicas=2)
    make_pool(pool_id=OTHER, name="green")  # static: no autoscaler
    assert scale(pool, kube).desired == 2
    before_adoption = scrape(viewer_client)
    adopt_all(pool, fake)
    pool = pool_scale(pool=pool, min_replicas=3, max_replicas=5, actor=ADMIN, reason="test")
    clock.advance(1)
    assert scale(pool, kube).desired == 3

    text = scrape(viewer_client)

    assert family(before_adoption, "poolsadmin_autoscaler_desired_pods") == [
        f'poolsadmin_autoscaler_desired_pods{{pool="{POOL}"}} 2'
    ]
    assert family(before_adoption, "poolsadmin_autoscaler_actual_pods") == [
        f'poolsadmin_autoscaler_actual_pods{{pool="{POOL}"}} 0'
    ]
    assert family(text, "poolsadmin_autoscaler_desired_pods") == [
        f'poolsadmin_autoscaler_desired_pods{{pool="{POOL}"}} 3'
    ]
    assert family(text, "poolsadmin_autoscaler_actual_pods") == [
        f'poolsadmin_autoscaler_actual_pods{{pool="{POOL}"}} 2'
    ]


def test_drift_repairs_are_counted_per_pool_and_kind(viewer_client: Client) -> None:
    blue = make_pool(pool_id=POOL, name="blue")
    green = make_pool(pool_id=OTHER, name="green")
    make_agent(blue, "B1")
    make_agent(green, "G1")
    tasks = [run(submit_task(make_workspace(pool))) for pool in (blue, blue, green)]
    # Drift cannot be reached through the services: finish the tasks behind the slots' back.
    WorkspaceTask.objects.filter(pk__in=[t.pk for t in tasks]).update(status=TaskStatus.SUCCESS)
    for pool in (blue, green):
        ledger_check(pool=pool)
        ledger_check(pool=pool, dry_run=True)  # a dry run repairs and counts nothing

    assert family(scrape(viewer_client), "poolsadmin_drift_repairs_total") == [
        f'poolsadmin_drift_repairs_total{{kind="drift.slot_mismatch",pool="{POOL}"}} 2',
        f'poolsadmin_drift_repairs_total{{kind="drift.slot_mismatch",pool="{OTHER}"}} 1',
    ]


def test_the_reconciler_leader_and_its_last_renewal_are_shown(viewer_client: Client) -> None:
    assert lease_acquire_or_renew(name=RECONCILER_LEASE, holder="w1:42:ab", ttl_seconds=30)
    at = Lease.objects.get(name=RECONCILER_LEASE).renewed_at.timestamp()

    text = scrape(viewer_client)
    expire_lease(RECONCILER_LEASE)
    expired = scrape(viewer_client)

    renewed = f"poolsadmin_reconciler_lease_renewed_timestamp_seconds {_number(at)}"
    assert family(text, "poolsadmin_reconciler_leader_info") == [
        'poolsadmin_reconciler_leader_info{holder="w1:42:ab"} 1'
    ]
    assert family(text, "poolsadmin_reconciler_lease_renewed_timestamp_seconds") == [renewed]
    assert family(expired, "poolsadmin_reconciler_leader_info") == []
    assert family(expired, "poolsadmin_reconciler_lease_renewed_timestamp_seconds") == [renewed]


def test_the_reconcile_duration_of_the_leaders_last_pass_is_shown(viewer_client: Client) -> None:
    assert family(scrape(viewer_client), "poolsadmin_reconcile_duration_seconds") == []
    assert reconcile_pass_leader(holder="w1:42:ab", kube_factory=lambda p: None) is not None
    lease = Lease.objects.get(name=RECONCILER_LEASE)
    assert lease.last_pass_seconds is not None

    text = scrape(viewer_client)

    [line] = family(text, "poolsadmin_reconcile_duration_seconds")
    assert float(line.split()[1]) == lease.last_pass_seconds
    assert lease.last_pass_at is not None
    ended = _number(lease.last_pass_at.timestamp())
    assert family(text, "poolsadmin_reconcile_last_pass_timestamp_seconds") == [
        f"poolsadmin_reconcile_last_pass_timestamp_seconds {ended}"
    ]
    assert family(text, "poolsadmin_reconcile_last_pass_changes") == [
        "poolsadmin_reconcile_last_pass_changes 0"
    ]


# --- cost --------------------------------------------------------------------------------------


def busy_pool(index: int) -> AgentPool:
    """A pool with two agents (pods, slots), a running plan, a reservation, a queued task."""
    pool = make_pool(name=f"pool {index}")
    for agent in ("A", "B"):
        make_agent(pool, f"{agent}{index}")
    run(submit_task(make_workspace(pool)))
    plan_with_changes(submit_task(make_workspace(pool), "plan_and_apply"))
    submit_task(make_workspace(pool))
    return pool


def test_metrics_run_the_same_number_of_queries_for_1_and_5_pools(
    client: Client, viewer_token: str, django_assert_num_queries: Any
) -> None:
    busy_pool(0)
    scrape(client, **bearer(viewer_token))  # the token's first use writes its last_used_at
    with CaptureQueriesContext(connection) as one_pool:
        scrape(client, **bearer(viewer_token))
    for index in range(1, 5):
        busy_pool(index)

    with django_assert_num_queries(len(one_pool)):
        text = scrape(client, **bearer(viewer_token))

    assert len(family(text, "poolsadmin_queue_length")) == 5
    # Token and permissions (3), then the metrics themselves (9).
    assert len(one_pool) == 12


def test_whether_poolsadmin_can_hear_its_agents_is_a_metric(viewer_client: Client) -> None:
    """A hearing record gone stale for good pauses every liveness check: it must show."""
    assert family(scrape(viewer_client), "poolsadmin_liveness_listening") == []
    hearing_touch(actor="system:web")
    assert family(scrape(viewer_client), "poolsadmin_liveness_listening") == [
        "poolsadmin_liveness_listening 1"
    ]
    down(60)
    assert family(scrape(viewer_client), "poolsadmin_liveness_listening") == [
        "poolsadmin_liveness_listening 0"
    ]
    [line] = family(scrape(viewer_client), "poolsadmin_liveness_listening_seconds")
    assert float(line.split()[1]) >= 60
