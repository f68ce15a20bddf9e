"""The pool actions of SPEC 8 that need more than a reason: "Reconcile now", whose confirm page
shows a dry run of the pass, and "Scale" and "Hold" (k8s pools), whose confirm pages take
numbers (`NumberField`s of `_confirm`). Same flow as views_actions.py: GET confirms, POST
acts and redirects (or closes the dialog), a refused POST shows the form again with the error
and changes nothing.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_http_methods

from poolsadmin.api.roles import PERM_MANAGE_POOL, PERM_VIEW
from poolsadmin.api.services import request_actor
from poolsadmin.autoscaler.services import (
    HOLD_MAX,
    pool_active_hold,
    pool_hold,
    pool_pods_alive,
    pool_scale,
)
from poolsadmin.dashboard.views_actions import (
    NumberField,
    _back,
    _confirm,
    _get,
    _pool_url,
)
from poolsadmin.lib import clock
from poolsadmin.lib.errors import InvalidInput
from poolsadmin.lib.humanize import stamp
from poolsadmin.pools.models import MAX_REPLICAS, AgentPool, PoolType
from poolsadmin.worker.reconcile import pool_reconcile_now, pool_reconcile_preview

PREVIEW_TEMPLATE = "dashboard/actions/_reconcile_preview.html"
STATIC_POOL = "only k8s pools have replicas"
HOLD_MINUTES = (0, int(HOLD_MAX.total_seconds() // 60))  # 0 ends the current hold


# --- reconcile now -------------------------------------------------------------------------------


def _reconcile_impact(pool: AgentPool) -> SafeString:
    """The dry run in words, rendered by a template (it lists each change). Inline markup
    only: confirm.html puts the impact inside a paragraph."""
    report = pool_reconcile_preview(pool=pool)
    html = render_to_string(PREVIEW_TEMPLATE, {"pool": pool, "report": report})
    # render_to_string escaped every value; strip() only drops the file's final newline.
    return mark_safe(html.strip())


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pool_reconcile_view(request: HttpRequest, pool_id: str) -> HttpResponse:
    pool: AgentPool = _get(AgentPool, pool_id, "pool")
    if request.method == "POST":
        # Shown only if the pass is refused: a dry run would list the cluster for nothing.
        impact: str = f"runs one reconcile pass over pool {pool.name} now"
    else:
        impact = _reconcile_impact(pool)

    def perform(reason: str) -> str:
        report = pool_reconcile_now(pool_id=pool.pk, actor=request_actor(request), reason=reason)
        count = len(report.changes)
        text = f"Reconciled pool {pool.name}: " + (
            f"{count} change{'' if count == 1 else 's'} made." if count else "nothing to change."
        )
        if report.cluster_error:
            text += f" Cluster sync was skipped: {report.cluster_error}."
        return text

    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        title=f"Reconcile pool {pool.name} now",
        impact=impact,
        button="Reconcile now",
        back=_back(request, _pool_url(pool.pk)),
        # A pass may fail tasks, drop reservations and delete pods: destructive (SPEC 8).
        reason_required=True,
        perform=perform,
    )


# --- scale and hold ------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pool_scale_view(request: HttpRequest, pool_id: str) -> HttpResponse:
    pool: AgentPool = _get(AgentPool, pool_id, "pool")

    def perform(reason: str, *, min_replicas: int, max_replicas: int) -> str:
        if min_replicas > max_replicas:
            # pool_scale refuses it too, in the API's words; the form names its own fields.
            raise InvalidInput(
                f"Min pods ({min_replicas}) must not be more than max pods ({max_replicas})",
                field="min_replicas",
            )
        done = pool_scale(
            pool=pool,
            actor=request_actor(request),
            reason=reason,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
        )
        return (
            f"Pool {pool.name} scales between {done.min_replicas} and {done.max_replicas} "
            "pods from the autoscaler's next pass."
        )

    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        back=_back(request, _pool_url(pool.pk)),
        reason_required=True,
        refused=_refusal(pool),
        title=f"Scale pool {pool.name}",
        impact=(
            f"sets the pod bounds of pool {pool.name} (now min {pool.min_replicas}, "
            f"max {pool.max_replicas}); the autoscaler scales within them from its next pass, "
            "and never removes a pod with a running or reserved slot"
        ),
        button="Scale pool",
        fields=[
            NumberField("min_replicas", "Min pods", str(pool.min_replicas), 0, MAX_REPLICAS),
            NumberField(
                "max_replicas",
                "Max pods",
                str(pool.max_replicas),
                1,
                MAX_REPLICAS,
                help="At least 1, and not below min.",
            ),
        ],
        perform=perform,
    )


def _refusal(pool: AgentPool) -> str:
    return "" if pool.pool_type == PoolType.K8S else STATIC_POOL


@require_http_methods(["GET", "POST"])
@login_required
@permission_required(PERM_VIEW, raise_exception=True)
def pool_hold_view(request: HttpRequest, pool_id: str) -> HttpResponse:
    pool: AgentPool = _get(AgentPool, pool_id, "pool")
    now = clock.now()
    current = pool_active_hold(pool=pool, now=now)
    impact = (
        f"holds pool {pool.name} at a number of pods for a while, whatever the demand; pods "
        "with a running or reserved slot are still never removed, and a freeze still allows "
        "no scale-up"
    )
    if current is not None:
        impact += (
            f"; it replaces the hold at {current.pods} pods by {current.by} "
            f"until {stamp(current.until)}"
        )

    def perform(reason: str, *, pods: int, minutes: int) -> str:
        until = clock.now() + timedelta(minutes=minutes)
        hold = pool_hold(
            pool=pool, pods=pods, until=until, actor=request_actor(request), reason=reason
        )
        if minutes == 0:
            return f"Pool {pool.name} is no longer held; the autoscaler follows demand again."
        return f"Pool {pool.name} is held at {hold.pods} pods until {stamp(hold.until)}."

    low, high = HOLD_MINUTES
    return _confirm(
        request,
        perm=PERM_MANAGE_POOL,
        back=_back(request, _pool_url(pool.pk)),
        reason_required=True,
        refused=_refusal(pool),
        title=f"Hold pool {pool.name}",
        impact=impact,
        button="Hold pool",
        fields=[
            NumberField(
                "pods",
                "Pods",
                # The hold in force, else the pods the pool has now: confirming the form as it
                # opens must not shrink the pool.
                str(
                    current.pods
                    if current is not None
                    else min(pool_pods_alive(pool=pool), pool.max_replicas)
                ),
                0,
                pool.max_replicas,
                help=f"0 to the pool's max ({pool.max_replicas}).",
            ),
            NumberField(
                "minutes",
                "For (minutes)",
                "60",
                low,
                high,
                help=f"1 to {high} ({high // 60} hours); 0 ends the current hold.",
            ),
        ],
        perform=perform,
    )
