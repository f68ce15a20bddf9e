"""Retention: `history_prune`, `manage.py prune` and the worker's daily step (worker/prune.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command

from poolsadmin.autoscaler.models import ScaleAction, ScaleDecision
from poolsadmin.events.models import Event
from poolsadmin.events.services import event_record
from poolsadmin.lib import clock
from poolsadmin.pools.models import AgentPool
from poolsadmin.tasks.models import WaitReason, WorkspaceTask
from poolsadmin.tasks.services import task_cancel
from poolsadmin.worker.lease import lease_acquire_or_renew
from poolsadmin.worker.loops import LOOPS
from poolsadmin.worker.prune import PRUNE_LEASE, PRUNED_KIND, history_prune
from tests.ledger import make_pool, make_workspace, submit
from tests.test_settings import _start

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _system_event(task: WorkspaceTask | None = None, kind: str = "task.stage") -> Event:
    return event_record(
        actor="system:scheduler",
        kind=kind,
        target_type="task",
        target_id=task.pk if task else "x",
        task_id=task.pk if task else None,
    )


def _done_task(pool: AgentPool) -> WorkspaceTask:
    task = submit(make_workspace(pool))
    return task_cancel(task_id=task.pk, actor="system:test", reason="over")


def _alive(event: Event) -> bool:
    return Event.objects.filter(pk=event.pk).exists()


def test_events_go_on_the_day_their_retention_ends_and_not_a_second_before() -> None:
    with clock.frozen_at(T0):
        event = _system_event()
    history_prune(actor="system:test", now=T0 + 90 * DAY)
    assert _alive(event)  # exactly 90 days old: still inside its retention
    history_prune(actor="system:test", now=T0 + 90 * DAY + timedelta(seconds=1))
    assert not _alive(event)


def test_an_open_tasks_events_survive_while_a_finished_tasks_go() -> None:
    with clock.frozen_at(T0):
        pool = make_pool()
        open_task = submit(make_workspace(pool))
        done = _done_task(pool)
    open_events = set(Event.objects.filter(task_id=open_task.pk).values_list("pk", flat=True))
    # Past the audit period too: a person's submission is an audit entry (kept 365 days).
    history_prune(actor="system:test", now=T0 + 400 * DAY)
    assert set(Event.objects.filter(task_id=open_task.pk).values_list("pk", flat=True)) == (
        open_events
    )
    assert not Event.objects.filter(task_id=done.pk).exists()


def test_admin_actions_are_kept_for_the_audit_period_after_other_events_are_gone() -> None:
    with clock.frozen_at(T0):
        make_pool()  # pool.created by user:admin
        cli = event_record(
            actor="system:cli", kind="agent.retired", target_type="agent", target_id="a"
        )
        system = _system_event()
    history_prune(actor="system:test", now=T0 + 100 * DAY)
    assert Event.objects.filter(kind="pool.created").exists() and _alive(cli)
    assert not _alive(system)
    history_prune(actor="system:test", now=T0 + 366 * DAY)
    assert not Event.objects.filter(kind="pool.created").exists() and not _alive(cli)


def test_wait_history_of_finished_tasks_goes_and_an_open_tasks_stays() -> None:
    with clock.frozen_at(T0):
        pool = make_pool()
        open_task = submit(make_workspace(pool))
        done = _done_task(pool)
    for task in (open_task, done):
        WaitReason.objects.create(
            task=task, code="no_free_slot", text="busy", started_at=T0, ended_at=T0 + DAY
        )
    current = WaitReason.objects.create(
        task=open_task, code="no_pods", text="none", started_at=T0 + DAY
    )
    history_prune(actor="system:test", now=T0 + DAY + 30 * DAY + timedelta(seconds=1))
    left = set(WaitReason.objects.values_list("task_id", "code"))
    assert left == {(open_task.pk, "no_free_slot"), (open_task.pk, current.code)}


def test_old_scale_decisions_go_except_each_pools_latest() -> None:
    pool, other = make_pool(name="a"), make_pool(name="b")

    def decide(p: AgentPool, at: datetime) -> ScaleDecision:
        return ScaleDecision.objects.create(
            pool=p, at=at, desired=1, actual=1, min=0, max=2, action=ScaleAction.BLOCKED, reason="r"
        )

    old = [decide(pool, T0), decide(pool, T0 + timedelta(hours=1))]
    only = decide(other, T0)
    recent = decide(pool, T0 + 20 * DAY)
    history_prune(actor="system:test", now=T0 + 31 * DAY)
    assert set(ScaleDecision.objects.values_list("pk", flat=True)) == {only.pk, recent.pk}
    assert not ScaleDecision.objects.filter(pk__in=[d.pk for d in old]).exists()


def test_a_big_prune_deletes_in_bounded_batches() -> None:
    with clock.frozen_at(T0):
        for _ in range(25):
            _system_event()
    report = history_prune(actor="system:test", now=T0 + 100 * DAY, batch_size=10)
    assert report.deleted["events"] == 25
    assert report.batches == 3  # 10 + 10 + 5
    assert not Event.objects.exclude(kind=PRUNED_KIND).exists()


def test_a_prune_records_one_event_saying_what_it_deleted() -> None:
    with clock.frozen_at(T0):
        _system_event()
    history_prune(actor="system:test", now=T0 + 100 * DAY)
    summary = Event.objects.get(kind=PRUNED_KIND)
    assert summary.data["deleted"] == {"events": 1, "task_wait_reasons": 0, "scale_decisions": 0}
    assert summary.actor == "system:test"


def test_a_dry_run_counts_per_table_and_deletes_nothing() -> None:
    with clock.frozen_at(T0):
        events = [_system_event() for _ in range(3)]
    with clock.frozen_at(T0 + 100 * DAY):
        out = StringIO()
        call_command("prune", "--dry-run", stdout=out)
    assert "events: would delete 3" in out.getvalue()
    assert "task_wait_reasons: would delete 0" in out.getvalue()
    assert all(_alive(e) for e in events)
    assert not Event.objects.filter(kind=PRUNED_KIND).exists()


def test_the_command_prints_what_it_deleted_per_table() -> None:
    with clock.frozen_at(T0):
        _system_event()
    with clock.frozen_at(T0 + 100 * DAY):
        out = StringIO()
        call_command("prune", stdout=out)
    assert "events: deleted 1" in out.getvalue()
    assert Event.objects.get(kind=PRUNED_KIND).actor == "system:cli"


def test_the_worker_prunes_once_a_day_and_a_restart_does_not_prune_again() -> None:
    with clock.frozen_at(T0):
        _system_event()
    with clock.frozen_at(T0 + 100 * DAY):
        assert LOOPS["prune"].run_once()
        # Later the same day (a restarted worker too: the record is in the database).
        clock.advance(23 * 3600)
        LOOPS["prune"].run_once()
        assert Event.objects.filter(kind=PRUNED_KIND).count() == 1
        clock.advance(3600 + 1)
        LOOPS["prune"].run_once()
        assert Event.objects.filter(kind=PRUNED_KIND).count() == 2


def test_only_the_worker_holding_the_prune_lease_prunes() -> None:
    assert lease_acquire_or_renew(name=PRUNE_LEASE, holder="elsewhere:1:x:1", ttl_seconds=600)
    assert not LOOPS["prune"].run_once()
    assert not Event.objects.filter(kind=PRUNED_KIND).exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RETENTION_EVENTS_DAYS": "3"}, "RETENTION_EVENTS_DAYS=3 must be >= 7"),
        ({"RETENTION_WAIT_HISTORY_DAYS": "soon"}, "RETENTION_WAIT_HISTORY_DAYS='soon'"),
        (
            {"RETENTION_EVENTS_DAYS": "400", "RETENTION_AUDIT_DAYS": "365"},
            "RETENTION_AUDIT_DAYS=365 must be >= RETENTION_EVENTS_DAYS=400",
        ),
    ],
)
def test_a_bad_retention_stops_start_up_naming_it(env: dict[str, str], message: str) -> None:
    result = _start(**env)
    assert result.returncode != 0
    assert message in result.stderr
