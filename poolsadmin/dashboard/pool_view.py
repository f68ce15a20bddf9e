"""What the operator asked to see on a pool page, and the slot map of a big pool.

A pool of 1,000 pods cannot show 1,000 cards (2.4 MB of HTML, seconds of template work), and
nobody reads them. The page shows instead:

* the **slot map**: every slot of the pool as one small cell, pods in a stable order (oldest
  first), state by colour *and* pattern; a reserved cell (the founding incident's, task 598)
  stands out, is a tab stop, and says its owner and age on hover and on focus. Built here as
  one string (`slot_map_html`), without a template per cell: it is most of the page;
* **full cards** for the pods that matter (holding reservations, draining, unhealthy) or for
  whichever the operator filters and sorts by (`PoolView`, GET parameters, so it works
  without JavaScript and a link to it can be pasted), a page at a time, and one pod's card
  on demand (`?pod=<id>`, what a click in the map asks for).

A small pool shows every card, as before: below `ALL_CARDS_UP_TO` pods, the default is `all`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import urlencode

from django.utils.html import escape

from poolsadmin.agents.models import AgentStatus
from poolsadmin.lib.errors import InvalidInput
from poolsadmin.lib.humanize import duration
from poolsadmin.pools.models import AgentPool, SlotState
from poolsadmin.pools.selectors import PodView, agent_is_online

# Up to this many pods, every pod gets its card by default (the demo's two pods, a team's
# pool); above it, the cards of the pods that need attention.
ALL_CARDS_UP_TO = 24
CARDS_PER_PAGE = 24
QUERY_MAX = 253  # a pod name's longest

SHOW = {
    "attention": "pods that need attention (reserved, draining or unhealthy)",
    "reserved": "pods holding a reservation",
    "running": "pods running work",
    "idle": "fully idle pods",
    "draining": "draining pods",
    "offline": "pods whose agent is offline or missing",
    "all": "all pods",
}
SORT = {
    "pod": "oldest pod first",
    "reservation": "oldest reservation first",
    "busy": "busiest first",
    "heartbeat": "stalest heartbeat first",
    "name": "by name",
}


@dataclass(frozen=True)
class PoolView:
    """The GET parameters of a pool page. `show` "" is the default for the pool's size."""

    show: str = ""
    sort: str = "pod"
    q: str = ""
    page: int = 1
    pod: int | None = None  # one more pod's card, on demand

    def query(self, **changes: object) -> str:
        """The canonical query string of this view (defaults left out), with `changes`."""
        view = replace(self, **changes)  # type: ignore[arg-type]
        params = {
            "show": view.show,
            "sort": "" if view.sort == "pod" else view.sort,
            "q": view.q,
            "page": "" if view.page == 1 else str(view.page),
            "pod": "" if view.pod is None else str(view.pod),
        }
        return urlencode({k: v for k, v in params.items() if v})


def _positive(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 2**31:
        raise InvalidInput(f"{name} must be a positive whole number", field=name)
    return int(raw)


def pool_view_parse(params: Mapping[str, str]) -> PoolView:
    """The view a query string asks for. Unknown values are refused naming the parameter."""
    show = params.get("show", "").strip()
    if show and show not in SHOW:
        raise InvalidInput(f"show must be one of {', '.join(SHOW)}", field="show")
    sort = params.get("sort", "").strip() or "pod"
    if sort not in SORT:
        raise InvalidInput(f"sort must be one of {', '.join(SORT)}", field="sort")
    q = params.get("q", "").strip()
    if len(q) > QUERY_MAX:
        raise InvalidInput(f"q is longer than {QUERY_MAX} characters", field="q")
    return PoolView(
        show=show, sort=sort, q=q, page=_positive(params, "page") or 1, pod=_positive(params, "pod")
    )


# --- which pods get cards ----------------------------------------------------------------------


def pod_is_draining(v: PodView) -> bool:
    return v.pod.cordoned or (v.agent is not None and v.agent.status == AgentStatus.DRAINING)


def _has(v: PodView, state: str) -> bool:
    return any(s.state == state for s in v.slots)


def _matches(v: PodView, show: str, online: bool) -> bool:
    if show == "attention":
        return not v.eligible or _has(v, SlotState.RESERVED)
    if show in (SlotState.RESERVED, SlotState.RUNNING):
        return _has(v, show)
    if show == "idle":
        return all(s.state == SlotState.IDLE for s in v.slots)
    if show == "draining":
        return pod_is_draining(v)
    if show == "offline":
        return not online
    return True


def _oldest_reservation(v: PodView) -> datetime:
    return min((s.since for s in v.slots if s.state == SlotState.RESERVED), default=datetime.max)


@dataclass(frozen=True)
class CardSelection:
    view: PoolView  # with the default `show` filled in and `page` clamped
    shown: list[PodView]  # this page of the matching pods
    matching: int
    pages: int
    pinned: PodView | None  # `?pod=`: asked for on demand, not on this page already

    @property
    def show_label(self) -> str:
        return SHOW[self.view.show]

    @property
    def sort_label(self) -> str:
        return SORT[self.view.sort]

    @property
    def previous_query(self) -> str | None:
        return self.view.query(page=self.view.page - 1) if self.view.page > 1 else None

    @property
    def next_query(self) -> str | None:
        return self.view.query(page=self.view.page + 1) if self.view.page < self.pages else None


def pod_cards_select(
    *, views: list[PodView], pool: AgentPool, view: PoolView, now: datetime
) -> CardSelection:
    """The pods whose cards `view` shows, from the page's capacity snapshot (`views`, oldest
    pod first). No query."""
    show = view.show or ("all" if len(views) <= ALL_CARDS_UP_TO else "attention")
    needle = view.q.lower()
    matching = [
        v
        for v in views
        if _matches(v, show, agent_is_online(agent=v.agent, pool=pool, now=now))
        and (
            not needle
            or needle in v.pod.name.lower()
            or (v.agent is not None and needle in v.agent.agent_name.lower())
        )
    ]
    # Stable sorts: ties keep the oldest pod first.
    if view.sort == "reservation":
        matching.sort(key=_oldest_reservation)
    elif view.sort == "busy":
        matching.sort(key=lambda v: -v.busy)
    elif view.sort == "heartbeat":
        matching.sort(
            key=lambda v: (v.agent is not None and v.agent.last_ping_at is not None, _ping(v))
        )
    elif view.sort == "name":
        matching.sort(key=lambda v: v.pod.name)
    pages = max(1, -(-len(matching) // CARDS_PER_PAGE))
    page = min(view.page, pages)
    shown = matching[(page - 1) * CARDS_PER_PAGE : page * CARDS_PER_PAGE]
    pinned = None
    if view.pod is not None and all(v.pod.pk != view.pod for v in shown):
        pinned = next((v for v in views if v.pod.pk == view.pod), None)
    return CardSelection(
        view=replace(view, show=show, page=page),
        shown=shown,
        matching=len(matching),
        pages=pages,
        pinned=pinned,
    )


def _ping(v: PodView) -> datetime:
    if v.agent is None or v.agent.last_ping_at is None:
        return datetime.min
    return v.agent.last_ping_at


# --- the slot map ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """Who holds a reserved slot, for its cell's label."""

    task_id: int
    workspace_id: str
    workspace_name: str


def reserved_label(*, pod_name: str, index: int, owner: Owner | None, age: str) -> str:
    """What a reserved cell says on hover and focus (and to a screen reader)."""
    who = f"task #{owner.task_id}, {owner.workspace_name} ({owner.workspace_id})" if owner else ""
    return f"{pod_name} slot {index}: reserved for {who or 'a task'} for {age}"


def slot_map_html(
    *, views: list[PodView], pool: AgentPool, owners: Mapping[int, Owner], now: datetime
) -> str:
    """The slot map's cells, one `<li>` per pod (oldest first) holding one cell per slot.

    Per pod: an untabbable link to its card covering the group (the pod's name on hover), and
    its cells: `<i>` for idle, `<i class="r">` for running, and for reserved an `<a class="v">`
    that is a tab stop with its owner and age in `aria-label` (a CSS tooltip shows it on hover
    and focus). A pod taking no work is marked: `o` agent offline or missing, `d` draining,
    `u` otherwise unavailable (phase). Escaped by hand: Django's template engine costs a
    few ms per thousand cells, and this is four thousand.
    """
    parts: list[str] = []
    for v in views:
        pod = v.pod
        name = escape(pod.name)
        href = f"?pod={pod.pk}#pod-{pod.pk}"
        online = agent_is_online(agent=v.agent, pool=pool, now=now)
        if not online:
            mark, note = "o", " · agent offline" if v.agent is not None else " · no agent"
        elif pod_is_draining(v):
            mark, note = "d", " · draining"
        elif not v.eligible:
            mark, note = "u", f" · {escape(pod.phase)}"
        else:
            mark, note = "", ""
        parts.append(f'<li class="{mark}">' if mark else "<li>")
        parts.append(f'<a href="{href}" tabindex="-1" title="{name}{note}"></a>')
        for slot in v.slots:
            if slot.state == SlotState.RUNNING:
                parts.append('<i class="r"></i>')
            elif slot.state == SlotState.RESERVED:
                label = reserved_label(
                    pod_name=pod.name,
                    index=slot.index,
                    owner=owners.get(slot.task_id or 0),
                    age=duration(now - slot.since),
                )
                parts.append(
                    f'<a class="v" id="map-slot-{slot.pk}" href="{href}" '
                    f'aria-label="{escape(label)}"></a>'
                )
            else:
                parts.append("<i></i>")
        parts.append("</li>")
    return "".join(parts)
