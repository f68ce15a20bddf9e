"""JSON shapes of the admin API: plain functions from models and read models to dicts.
Datetimes are ISO 8601 (UTC), absent values are null, ids are the human ids."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from poolsadmin.api.models import ApiToken
from poolsadmin.autoscaler.models import ScaleDecision
from poolsadmin.events.models import Event
from poolsadmin.pools.grid import PodRow, PoolSummary
from poolsadmin.pools.models import AgentPool, PoolToken, Slot, SlotState
from poolsadmin.scheduler.rules import Diagnosis
from poolsadmin.tasks.detail import TaskDetail, WorkspaceDetail
from poolsadmin.tasks.models import WaitReason, Workspace, WorkspaceTask
from poolsadmin.worker.models import Lease

Json = dict[str, Any]


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def pool_json(pool: AgentPool) -> Json:
    return {
        "pool_id": pool.pool_id,
        "name": pool.name,
        "description": pool.description,
        "pool_type": pool.pool_type,
        "status": pool.status,
        "paused_by": pool.paused_by or None,
        "paused_reason": pool.paused_reason or None,
        "paused_until": iso(pool.paused_until),
        "slots_per_pod": pool.slots_per_pod,
        "plan_and_apply_per_pod": pool.plan_and_apply_per_pod,
        "reservation_ttl_seconds": pool.reservation_ttl_seconds,
        "heartbeat_timeout_seconds": pool.heartbeat_timeout_seconds,
        "namespace": pool.namespace,
        "pod_image": pool.pod_image,
        "min_replicas": pool.min_replicas,
        "max_replicas": pool.max_replicas,
        "created_at": iso(pool.created_at),
    }


def pool_summary_json(summary: PoolSummary) -> Json:
    slots = summary.slots
    return {
        **pool_json(summary.pool),
        # Flat counts: "pods" is the list of pods in the pool detail.
        "pods_total": summary.pods,
        "pods_running": summary.pods_running,
        "agents_total": summary.agents,
        "agents_online": summary.agents_online,
        "slots": {
            "total": sum(slots.values()),
            "running": slots[SlotState.RUNNING],
            "reserved": slots[SlotState.RESERVED],
            "idle": slots[SlotState.IDLE],
        },
        "queue": {
            "length": summary.queue_length,
            "oldest_created_at": iso(summary.queue_oldest_at),
        },
    }


def slot_json(slot: Slot) -> Json:
    task = slot.task if slot.task_id is not None else None
    return {
        "id": slot.pk,
        "index": slot.index,
        "state": slot.state,
        "task_id": slot.task_id,
        "task_type": slot.task_type or None,
        "task_status": task.status if task is not None else None,
        "workspace_id": task.workspace_id if task is not None else None,
        "since": iso(slot.since),
        "reserved_until": iso(slot.reserved_until),
        "version": slot.version,
    }


def pod_json(row: PodRow) -> Json:
    agent = row.agent
    return {
        "id": row.pod.pk,
        "name": row.pod.name,
        "phase": row.pod.phase,
        "created_at": iso(row.pod.created_at),
        "cordoned": row.pod.cordoned,
        "agent": None
        if agent is None
        else {
            "agent_id": agent.agent_id,
            "agent_name": agent.agent_name,
            # `status` is the stored word; `online` also requires a fresh heartbeat, as the
            # scheduler does, so a stale "online" agent shows as not online.
            "status": agent.status,
            "online": row.agent_online,
            "last_ping_at": iso(agent.last_ping_at),
        },
        "slots": [slot_json(slot) for slot in row.slots],
    }


def scale_decision_json(decision: ScaleDecision | None) -> Json | None:
    if decision is None:
        return None
    return {
        "at": iso(decision.at),
        "desired": decision.desired,
        "actual": decision.actual,
        "action": decision.action,
        "reason": decision.reason,
    }


def pool_detail_json(
    pool: AgentPool,
    grid: list[PodRow],
    decision: ScaleDecision | None = None,
    *,
    pods_total: int | None = None,
) -> Json:
    return {
        **pool_json(pool),
        "pods": [pod_json(row) for row in grid],
        # How many pods the pool has: `pods` may be one page of them.
        "pods_total": len(grid) if pods_total is None else pods_total,
        # The latest autoscaler decision (SPEC 6), null for a pool that has none.
        "autoscaler": scale_decision_json(decision),
    }


# The top-level keys of the pool detail, which `?fields=` chooses from.
POOL_DETAIL_FIELDS = (
    "pool_id",
    "name",
    "description",
    "pool_type",
    "status",
    "paused_by",
    "paused_reason",
    "paused_until",
    "slots_per_pod",
    "plan_and_apply_per_pod",
    "reservation_ttl_seconds",
    "heartbeat_timeout_seconds",
    "namespace",
    "pod_image",
    "min_replicas",
    "max_replicas",
    "created_at",
    "pods",
    "pods_total",
    "autoscaler",
)


def lease_json(lease: Lease | None) -> Json:
    """Who leads the reconciler now (SPEC 5), all null when nobody holds the lease."""
    return {
        "leader": lease.holder if lease else None,
        "acquired_at": iso(lease.acquired_at) if lease else None,
        "renewed_at": iso(lease.renewed_at) if lease else None,
        "expires_at": iso(lease.expires_at) if lease else None,
    }


def pool_token_json(token: PoolToken, secret: str) -> Json:
    return {
        "token": secret,
        "name": token.name,
        "pool_id": token.pool_id,
        "created_by": token.created_by,
        "created_at": iso(token.created_at),
        "expires_at": iso(token.expires_at),
    }


def api_token_json(token: ApiToken, secret: str) -> Json:
    return {"token": secret, "name": token.name, "created_at": iso(token.created_at)}


def task_json(task: WorkspaceTask) -> Json:
    return {
        "id": task.pk,
        "workspace_id": task.workspace_id,
        "pool_id": task.pool_id,
        "task_type": task.task_type,
        "status": task.status,
        "stage": task.stage,
        "agent_id": task.agent_id,
        "pod": task.pod_name or None,
        "slot": task.slot_index,
        "plan_agent_id": task.plan_agent_id or None,
        "plan_pod": task.plan_pod_name or None,
        "plan_slot": task.plan_slot_index,
        "planned_at": iso(task.planned_at),
        "created_at": iso(task.created_at),
        "started_at": iso(task.started_at),
        "completed_at": iso(task.completed_at),
        "apply_confirmed_by": task.apply_confirmed_by or None,
        "apply_confirmed_at": iso(task.apply_confirmed_at),
        "apply_description": task.apply_description,
        "retry_count": task.retry_count,
        "next_attempt_at": iso(task.next_attempt_at),
        "error_message": task.error_message,
        "created_by": task.created_by,
        "description": task.description,
    }


def diagnosis_json(diagnosis: Diagnosis) -> Json:
    return {"code": diagnosis.code, "text": diagnosis.text, "blocker": diagnosis.blocker}


def wait_reason_json(reason: WaitReason) -> Json:
    return {
        "code": reason.code,
        "text": reason.text,
        "blocker": reason.blocker,
        "from": iso(reason.started_at),
        "to": iso(reason.ended_at),
    }


def event_json(event: Event) -> Json:
    return {
        "id": event.pk,
        "at": iso(event.at),
        "actor": event.actor,
        "kind": event.kind,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "before": event.before,
        "after": event.after,
        "reason": event.reason,
        "data": event.data,
    }


def task_detail_json(detail: TaskDetail) -> Json:
    return {
        **task_json(detail.task),
        "diagnosis": diagnosis_json(detail.diagnosis),
        "diagnosis_history": [wait_reason_json(reason) for reason in detail.history],
        "events": [event_json(event) for event in detail.events],
    }


def workspace_json(workspace: Workspace) -> Json:
    return {
        "workspace_id": workspace.workspace_id,
        "name": workspace.name,
        "execution_mode": workspace.execution_mode,
        "pool_id": workspace.current_pool_id,
        "is_locked": workspace.is_locked,
        "locked_by": workspace.locked_by or None,
        "locked_at": iso(workspace.locked_at),
        "lock_reason": workspace.lock_reason or None,
        "lock_task_id": workspace.lock_task_id,
        "created_at": iso(workspace.created_at),
    }


def workspace_detail_json(detail: WorkspaceDetail) -> Json:
    return {
        **workspace_json(detail.workspace),
        "tasks": [task_json(task) for task in detail.tasks],
    }
