"""The live regions of the pool page, rendered for a push or a poll.

The pool page is made of template partials (`dashboard/pool.html`), each with a stable id and
`hx-swap-oob="true"`. `live-fragments` renders all of them in a row: the WebSocket consumer
sends that after each change of the pool (the htmx ws extension swaps each element by id), and
a poll of the page with htmx (the fallback while the socket is down) gets the same answer. So
a pushed page and a polled page can never show different things.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from django.contrib.auth.context_processors import PermWrapper
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.template.loader import render_to_string

from poolsadmin.dashboard.panels import (
    pool_autoscaler_panel,
    pool_recent_events,
    pool_reconciler_panel,
)
from poolsadmin.dashboard.pool_view import SHOW, SORT, PoolView
from poolsadmin.dashboard.selectors import PoolPage, dashboard_pool

POOL_TEMPLATE = "dashboard/pool.html"
LIVE_PARTIAL = "live-fragments"
LIVE_FRAGMENTS = f"{POOL_TEMPLATE}#{LIVE_PARTIAL}"
# The ids of the live regions, in the order `live-fragments` renders them (the table in
# docs/architecture.md says what each depends on). The push sends only those that changed.
LIVE_REGIONS = (
    "pool-updated",
    "pool-actions",
    "pool-stats",
    "slot-map",
    "slot-grid",
    "queue",
    "awaiting",
    "autoscaler-panel",
    "reconciler-panel",
    "events-panel",
    "live-poller",
)

_REGION_START = re.compile(
    r'<\w+\b[^>]*?\bid="(' + "|".join(LIVE_REGIONS) + r')"[^>]*\bhx-swap-oob='
)


def live_regions(text: str) -> dict[str, str] | None:
    """`text` cut into its live regions (id -> HTML), or None when it is not every region
    once in the page's order (the "changed" of a notify socket, a template that changed)."""
    starts = [(m.group(1), m.start()) for m in _REGION_START.finditer(text)]
    if [region for region, _ in starts] != list(LIVE_REGIONS) or text[: starts[0][1]].strip():
        return None
    ends = [start for _, start in starts[1:]] + [len(text)]
    return {region: text[start:end] for (region, start), end in zip(starts, ends, strict=True)}


def pool_page_context(*, page: PoolPage) -> dict[str, Any]:
    """The pool page's context: the slot map, cards and queue, and the autoscaler,
    reconciler and recent-events panels (a fixed number of queries each)."""
    return {
        "page": page,
        "view_query": page.view.query(),
        "show_choices": SHOW.items(),
        "sort_choices": SORT.items(),
        "autoscaler": pool_autoscaler_panel(pool=page.pool, now=page.now),
        "reconciler": pool_reconciler_panel(pool=page.pool, now=page.now),
        "events": pool_recent_events(pool=page.pool),
    }


def pool_live_context(
    *, pool_id: str, view: PoolView | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """What every live region of the pool page reads, for `view` (which cards; the other
    regions are the same for every view), whoever looks: the ledger reads of a render.
    Raises NotFound when the pool does not exist."""
    return pool_page_context(page=dashboard_pool(pool_id=pool_id, view=view, now=now))


def pool_live_render(*, context: dict[str, Any], user: AbstractBaseUser | AnonymousUser) -> str:
    """Every live region as `user` sees them (buttons depend on permissions), from a
    `pool_live_context` that any number of renders may share."""
    return render_to_string(LIVE_FRAGMENTS, {**context, "user": user, "perms": PermWrapper(user)})


def pool_live_html(
    *,
    pool_id: str,
    user: AbstractBaseUser | AnonymousUser,
    view: PoolView | None = None,
    now: datetime | None = None,
) -> str:
    """Every live region of the pool page as `user` sees it in `view`. Raises NotFound when
    the pool does not exist."""
    context = pool_live_context(pool_id=pool_id, view=view, now=now)
    return pool_live_render(context=context, user=user)
