"""Issue acceptance (SPEC 5): an outage of poolsadmin itself fails none of the work its agents
kept doing.

Real processes: a daphne web process and `manage.py worker`, on a database of their own (an
SQLite file, or a scratch PostgreSQL database on the PostgreSQL run), a k8s pool of two pods on
the fake Kubernetes API server (in this process, reached over HTTP), and a reference agent per
pod in threads of this process, running a shell command as their work.

Three tasks are under way when web and worker are killed (SIGKILL): a plan that runs on
through the outage, a confirmed apply that finishes during it (its `applied` arrives late),
and an apply_pending plan_and_apply whose slot is reserved. Nobody listens for longer than
heartbeat timeout + grace, while the agents keep working and keep trying. The worker comes back
first (and sees that nobody can hear agents), then the web; the reserved apply is confirmed.
Every task ends `success`/`applied`, no pod is deleted, no reservation is dropped, no agent is
taken offline, and the outage is on record.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from poolsadmin.kube.fake_api import start_fake_kube
from tests.e2e.processes import Stack, until

HEARTBEAT_TIMEOUT, GRACE = 4, 3  # seconds: an outage of 12 s is far longer than both
OUTAGE_SECONDS = 12.0
TICK = 0.5  # the web records that it listens every 0.5 s; a gap is 2 s
# The agents' work: a plan_and_apply's plan finds changes at once (exit 2), an apply takes 5 s
# (so the one under way finishes during the outage), a plan 20 s (it runs on through it).
WORK = (
    'if [ "$ACTION" = apply ]; then sleep 5; '
    'elif [ "$TASK_TYPE" = plan_and_apply ]; then sleep 0.3; exit 2; '
    "else sleep 20; fi"
)

SEED = f"""
import json
from django.contrib.auth.models import Group, User
from poolsadmin.api.roles import ROLE_ADMIN
from poolsadmin.api.services import api_token_create
from poolsadmin.pools.services import pool_create, pool_token_create
from poolsadmin.tasks.services import task_submit, workspace_create
pool = pool_create(
    name="outage", actor="test", pool_type="k8s", namespace="ci", pod_image="agent:1",
    min_replicas=2, max_replicas=2, heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT},
    task_grace_seconds={GRACE},
)
token = pool_token_create(pool=pool, name="agents", actor="test").secret
user = User.objects.create_user(username="ops")
user.groups.add(Group.objects.get(name=ROLE_ADMIN))
api = api_token_create(user=user, name="test")[1]
tasks = [
    task_submit(workspace=workspace_create(name=f"ws-{{kind}}", pool=pool, actor="test"),
                task_type=kind, actor="test").pk
    for kind in ("plan", "plan_and_apply", "plan_and_apply")
]
print(json.dumps({{"pool": pool.pool_id, "token": token, "api": api, "tasks": tasks}}))
"""

CHECK = """
import json
from collections import Counter
from poolsadmin.events.models import Event
from poolsadmin.tasks.models import Workspace, WorkspaceTask
kinds = Counter(Event.objects.values_list("kind", flat=True))
print(json.dumps({
    "statuses": {t.pk: t.status for t in WorkspaceTask.objects.all()},
    "reused": {t.pk: t.reuse_workdir for t in WorkspaceTask.objects.all()},
    "locked": list(Workspace.objects.filter(is_locked=True).values_list("name", flat=True)),
    "kinds": kinds,
    "resumed": list(Event.objects.filter(kind="hearing.resumed").values_list("reason", flat=True)),
}))
"""


def kill(stack: Stack) -> None:
    """Web and worker die at once (a node lost, a database failover taking both down). The
    killed worker keeps its leases; the restarted one takes them over at once (same host)."""
    for process in (stack.webs[0].process, stack.workers[-1]):
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


def test_an_outage_of_poolsadmin_longer_than_timeout_and_grace_fails_none_of_the_agents_work(
    database_env: dict[str, str], tmp_path: Path
) -> None:
    fake = start_fake_kube(auto_run=True)
    stack = Stack(
        {**database_env, "POOLSADMIN_HEARING_TICK_SECONDS": str(TICK)}, fake, tmp_path, work=WORK
    )
    try:
        stack.manage("migrate", "-v0")
        plan, apply_now, apply_later = stack.seed_with(SEED)["tasks"]
        stack.start_web()
        stack.start_worker()
        stack.start_kubelet()

        def under_way() -> bool:
            tasks = {t: stack.task(t) for t in stack.seed["tasks"]}
            if tasks[apply_now]["status"] == "apply_pending" and not tasks[apply_now].get(
                "apply_confirmed_by"
            ):
                stack.api("POST", f"tasks/{apply_now}/confirm-apply", {})
            # "running" (not "dispatched"): the agent has acknowledged it.
            return (
                tasks[plan]["diagnosis"]["code"] == "running"
                and tasks[apply_now]["stage"] == "applying"
                and tasks[apply_now]["diagnosis"]["code"] == "running"
                and tasks[apply_later]["status"] == "apply_pending"
            )

        until(under_way, "plan running, apply acknowledged, reservation held")

        kill(stack)
        time.sleep(OUTAGE_SECONDS)
        stack.start_worker()  # first: it must see that nobody can hear agents yet
        time.sleep(2 * TICK * 4)
        stack.start_web()
        stack.api("POST", f"tasks/{apply_later}/confirm-apply", {})

        finished = {"success", "applied", "planned_and_finished", "failed", "cancelled"}
        until(
            lambda: all(stack.task(t)["status"] in finished for t in stack.seed["tasks"]),
            "every task finished",
        )
    finally:
        stack.stop()
        fake.stop()

    report = json.loads(stack.manage("shell", "-c", CHECK).strip().splitlines()[-1])
    logs = stack.logs_text()
    statuses = {int(k): v for k, v in report["statuses"].items()}
    assert statuses == {plan: "success", apply_now: "applied", apply_later: "applied"}, logs
    assert report["reused"][str(apply_later)] is True, "the confirmed apply lost its reservation"
    assert report["locked"] == []
    kinds = report["kinds"]
    for kind in ("task.lost", "task.reservation_lost", "agent.offline", "pod.agent_lost"):
        assert kind not in kinds, (kind, report)
    deletes = [r for r in fake.requests_log if r.method == "DELETE"]
    assert deletes == [], "a pod was deleted"
    assert any("could not hear agents from" in r for r in report["resumed"]), report["resumed"]
