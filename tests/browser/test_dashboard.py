"""The dashboard in a real browser: the founding incident as an operator sees it (SPEC 8)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, ViewportSize, expect

from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_AGENT_NAMES,
    DEMO_POOL_ID,
    DEMO_POOL_NAME,
    INCIDENT_TASK_ID,
    DemoSeed,
)
from poolsadmin.pools.models import Slot
from tests.browser.conftest import DESKTOP, PHONE, Api, login

pytestmark = pytest.mark.browser

POOL_URL = f"/pools/{DEMO_POOL_ID}/"
INCIDENT_POD = DEMO_AGENT_NAMES[0]


# How long a pushed change may take to show before the test fails. The product's goal is 2 s
# (the live dashboard's acceptance); a shared, loaded machine cannot promise durations, so a
# test only proves the change arrives without a reload, with room for a busy machine.
PUSHED_MS = 10_000


def pod_card(page: Page, pod_name: str) -> Locator:
    return page.get_by_role("article", name=f"Pod {pod_name}")


def incident_cell(page: Page) -> Locator:
    """Slot 0 of the first pod: task 598's reservation in the seed."""
    return pod_card(page, INCIDENT_POD).locator("li.slot").first


def open_demo_pool(page: Page) -> None:
    page.get_by_role("link", name=DEMO_POOL_NAME, exact=True).click()
    # wait_for_url waits for the load event too: the stylesheet is in before styles are read.
    page.wait_for_url(re.compile(re.escape(POOL_URL) + "$"))
    expect(page.get_by_role("heading", level=1)).to_have_text(DEMO_POOL_NAME)


def test_admin_opens_the_pool_and_sees_task_598s_reserved_slot_with_its_owner(
    page: Page, demo: DemoSeed
) -> None:
    login(page, "admin")
    open_demo_pool(page)

    cell = incident_cell(page)
    expect(cell).to_have_class(re.compile(r"\bslot-reserved\b"))
    expect(cell).to_contain_text("Reserved")
    expect(cell.get_by_role("link", name=f"#{INCIDENT_TASK_ID}")).to_be_visible()
    expect(cell).to_contain_text(f"Planned by {INCIDENT_POD}")
    expect(cell).to_contain_text("Waits for an admin to confirm the apply")
    expect(cell).to_contain_text(re.compile(r"expires in \S"))
    expect(cell.get_by_role("link", name="Release")).to_be_enabled()
    # It stands out from its idle neighbours, and not by colour alone: a thick dashed edge.
    # (Retrying assertions, or one evaluate over fresh nodes: a live update may replace the
    # grid's elements at any moment, and a detached element has no computed style.)
    expect(cell).to_have_css("border-top-style", "dashed")
    expect(cell).to_have_css("border-top-width", "2px")
    backgrounds = page.evaluate(SLOT_BACKGROUNDS, INCIDENT_POD)
    assert backgrounds["slot-reserved"] not in {backgrounds["slot-idle"], "rgba(0, 0, 0, 0)"}


def test_a_viewer_sees_the_release_button_disabled_with_the_permission_it_needs(
    page: Page, demo: DemoSeed
) -> None:
    login(page, "viewer")
    open_demo_pool(page)

    release = incident_cell(page).get_by_role("button", name=re.compile("^Release"))
    expect(release).to_be_disabled()
    expect(release).to_contain_text("needs pools.release_slot")
    expect(release).to_have_attribute("title", "needs pools.release_slot")
    expect(incident_cell(page).get_by_role("link", name="Release")).to_have_count(0)


def expect_undone_and_audited(page: Page, demo: DemoSeed) -> None:
    """After Undo: the message says so, 598's reservation is back, and the audit log holds
    the release (by the admin, with the reason given) and its undo."""
    expect(page.locator("#messages")).to_contain_text(
        f"Put back the reservation of task #{INCIDENT_TASK_ID} on {demo.incident_slot}"
    )
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-reserved\b"))
    expect(incident_cell(page)).to_contain_text(f"#{INCIDENT_TASK_ID}")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit log").click()
    released = page.locator("tbody tr").filter(has_text="slot.released")
    expect(released).to_have_count(1)
    expect(released).to_contain_text("user:admin")
    expect(released).to_contain_text("agent pod is being replaced")
    expect(page.locator("tbody tr").filter(has_text="slot.release_undone")).to_have_count(1)


def test_without_javascript_an_admin_releases_598s_slot_with_a_reason_and_undoes_it(
    page_without_js: Page, demo: DemoSeed
) -> None:
    """The no-JavaScript flow: Release opens a confirm page, the reason is required, the pool
    page says what happened and offers Undo, and the audit log keeps both."""
    page = page_without_js
    login(page, "admin")
    page.goto(POOL_URL)
    incident_cell(page).get_by_role("link", name="Release").click()

    expect(page.get_by_role("heading", level=1)).to_have_text(f"Release slot {demo.incident_slot}")
    expect(page.locator(".impact")).to_contain_text(f"#{INCIDENT_TASK_ID}")
    reason = page.get_by_label("Reason")
    submit = page.get_by_role("button", name="Release slot")
    # An empty reason does not even leave the browser...
    submit.click()
    assert reason.evaluate("el => el.validity.valueMissing") is True
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Release slot {demo.incident_slot}")
    # ...and a blank one is refused by the server.
    reason.fill("   ")
    submit.click()
    expect(page.get_by_role("alert")).to_contain_text("A reason is required")

    page.get_by_label("Reason").fill("agent pod is being replaced")
    page.get_by_role("button", name="Release slot").click()

    expect(page).to_have_url(re.compile(re.escape(POOL_URL) + "$"))
    message = page.locator(".messages .message-success")
    expect(message).to_contain_text(
        f"Released slot {demo.incident_slot} (reservation of task #{INCIDENT_TASK_ID})"
    )
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-idle\b"))
    expect(incident_cell(page)).not_to_contain_text(f"#{INCIDENT_TASK_ID}")

    # Undo at once, in case the page refreshes itself (which would drop the message).
    message.get_by_role("button", name="Undo").click()

    expect(page).to_have_url(re.compile(re.escape(POOL_URL) + "$"))
    expect_undone_and_audited(page, demo)


def test_the_open_pool_page_shows_a_slot_released_through_the_api_without_reload(
    page: Page, demo: DemoSeed, admin_api: Api
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-reserved\b"))
    # The WebSocket is up: the update must not come from the polling fallback.
    expect(page.locator("[data-live-state]")).to_have_text("live")
    # A reload would lose this; a live update keeps it.
    page.evaluate("window.__notReloaded = true")
    slot = Slot.objects.get(task_id=INCIDENT_TASK_ID)

    started = time.monotonic()
    admin_api(
        "POST",
        f"slots/{slot.pk}/release",
        {"reason": "browser test", "expected_version": slot.version},
    )
    # SPEC 8 asks for "within a second", the acceptance for 2 s: printed for the
    # record (measured: about 0.1 s), not asserted (PUSHED_MS).
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-idle\b"), timeout=PUSHED_MS)
    print(f"live update latency: {time.monotonic() - started:.2f} s")
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded"


# A WebSocket that never connects (the server or a proxy refuses it): closes at once, 1006.
DEAD_WEBSOCKET = """
window.WebSocket = class {
  constructor() {
    this.readyState = 0;
    setTimeout(() => { this.readyState = 3; if (this.onclose) this.onclose({ code: 1006 }); }, 10);
  }
  send() {}
  close() {}
};
"""


def test_without_a_websocket_the_pool_page_polls_and_still_updates_without_reload(
    page: Page, demo: DemoSeed, admin_api: Api
) -> None:
    page.add_init_script(DEAD_WEBSOCKET)
    login(page, "admin")
    page.goto(POOL_URL)
    expect(page.locator("[data-live-state]")).to_have_text("polling every 5 s")
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-reserved\b"))
    page.evaluate("window.__notReloaded = true")
    slot = Slot.objects.get(task_id=INCIDENT_TASK_ID)

    admin_api(
        "POST",
        f"slots/{slot.pk}/release",
        {"reason": "no socket", "expected_version": slot.version},
    )

    # The next poll (every 5 s) brings it.
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-idle\b"), timeout=10_000)
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded"


def test_the_open_task_page_follows_its_task_without_reload(
    page: Page, demo: DemoSeed, admin_api: Api
) -> None:
    login(page, "admin")
    page.goto(f"/tasks/{INCIDENT_TASK_ID}/")
    facts = page.locator("#task-live")
    expect(facts).to_contain_text("not yet")
    page.wait_for_function("window.poolsadmin && window.poolsadmin.liveConnected()")
    page.evaluate("window.__notReloaded = true")

    admin_api("POST", f"tasks/{INCIDENT_TASK_ID}/confirm-apply", {"description": "go"})

    # Pushed as "the pool changed", then fetched (the product's 2 s is a figure, not asserted).
    expect(facts).to_contain_text("by user:admin", timeout=PUSHED_MS)
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded"


def test_a_push_leaves_unchanged_regions_and_the_focus_in_them_alone(
    page: Page, demo: DemoSeed, admin_api: Api
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    expect(page.locator("[data-live-state]")).to_have_text("live")
    pause = page.locator("#pool-actions").get_by_role("link", name="Pause")
    pause.focus()
    page.evaluate("document.getElementById('pool-actions').__before = true")
    slot = Slot.objects.get(task_id=INCIDENT_TASK_ID)

    admin_api(
        "POST", f"slots/{slot.pk}/release", {"reason": "focus", "expected_version": slot.version}
    )

    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-idle\b"), timeout=PUSHED_MS)
    # The action bar did not change: the very same element, still focused.
    assert page.evaluate("document.getElementById('pool-actions').__before === true")
    expect(pause).to_be_focused()


def test_when_the_focused_button_goes_away_its_slot_cell_keeps_the_focus(
    page: Page, demo: DemoSeed, admin_api: Api
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    expect(page.locator("[data-live-state]")).to_have_text("live")
    incident_cell(page).get_by_role("link", name="Release").focus()
    slot = Slot.objects.get(task_id=INCIDENT_TASK_ID)

    admin_api(
        "POST", f"slots/{slot.pk}/release", {"reason": "focus", "expected_version": slot.version}
    )

    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-idle\b"), timeout=PUSHED_MS)
    expect(incident_cell(page)).to_be_focused()


def dialog(page: Page) -> Locator:
    return page.get_by_role("dialog")


def test_an_admin_releases_598s_slot_in_the_dialog_from_the_keyboard_and_undoes_it(
    page: Page, demo: DemoSeed
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    expect(page.locator("[data-live-state]")).to_have_text("live")

    # Open from the keyboard: focus lands on the reason, the impact is shown.
    incident_cell(page).get_by_role("link", name="Release").focus()
    page.keyboard.press("Enter")
    expect(dialog(page)).to_be_visible()
    expect(dialog(page)).to_contain_text(f"frees the reservation of task #{INCIDENT_TASK_ID}")
    reason = dialog(page).get_by_label("Reason")
    expect(reason).to_be_focused()

    # Escape cancels, and focus goes back to the button that opened the dialog.
    page.keyboard.press("Escape")
    expect(dialog(page)).to_be_hidden()
    expect(incident_cell(page).get_by_role("link", name="Release")).to_be_focused()
    assert Slot.objects.get(task_id=INCIDENT_TASK_ID).state == "reserved"

    # A blank reason is refused by the server inside the dialog, which stays open.
    page.keyboard.press("Enter")
    expect(reason).to_be_focused()
    page.keyboard.type("   ")
    page.keyboard.press("Tab")  # to "Release slot"
    page.keyboard.press("Enter")
    expect(dialog(page).get_by_role("alert")).to_contain_text("A reason is required")
    expect(dialog(page).get_by_label("Reason")).to_be_focused()

    # A reason, then confirm from the keyboard: the dialog closes, the message offers Undo
    # and has the focus (the Release button is gone with the reservation), and the cell is
    # idle without a reload.
    page.evaluate("window.__notReloaded = true")
    page.keyboard.press("Control+A")
    page.keyboard.type("agent pod is being replaced")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(dialog(page)).to_be_hidden()
    message = page.locator("#messages .message-success")
    expect(message).to_contain_text(
        f"Released slot {demo.incident_slot} (reservation of task #{INCIDENT_TASK_ID})"
    )
    expect(incident_cell(page)).to_have_class(re.compile(r"\bslot-idle\b"))
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded"
    undo = message.get_by_role("button", name="Undo")
    expect(undo).to_be_focused()

    page.keyboard.press("Enter")
    expect_undone_and_audited(page, demo)


def test_a_dialog_opened_before_the_slot_changed_says_so_and_shows_the_fresh_state(
    page: Page, demo: DemoSeed, admin_api: Api
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    incident_cell(page).get_by_role("link", name="Release").click()
    expect(dialog(page)).to_be_visible()
    # Someone else releases and puts back the reservation meanwhile: same task, new version.
    slot = Slot.objects.get(task_id=INCIDENT_TASK_ID)
    done = admin_api(
        "POST", f"slots/{slot.pk}/release", {"reason": "other", "expected_version": slot.version}
    )
    admin_api("POST", f"events/{done['event_id']}/undo-release", {})

    dialog(page).get_by_label("Reason").fill("stale dialog")
    dialog(page).get_by_role("button", name="Release slot").click()

    expect(dialog(page).get_by_role("alert")).to_contain_text("This slot changed")
    expect(dialog(page)).to_contain_text(f"task #{INCIDENT_TASK_ID}")
    assert Slot.objects.get(task_id=INCIDENT_TASK_ID).state == "reserved"


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=lambda v: str(v["width"]))
def test_screenshots_of_the_pools_pool_and_task_pages(
    page: Page, demo: DemoSeed, screenshot_dir: Path, viewport: ViewportSize
) -> None:
    """docs/screenshots/ with SCREENSHOTS=1. At phone width no page scrolls sideways."""
    width = viewport["width"]
    page.set_viewport_size({"width": width, "height": viewport["height"]})
    login(page, "admin")
    too_wide = {}
    for name, url in (
        ("pools", "/pools/"),
        ("pool", POOL_URL),
        ("task", f"/tasks/{INCIDENT_TASK_ID}/"),
    ):
        page.goto(url)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=screenshot_dir / f"{name}-{width}.png", full_page=True)
        if overflowing := page.evaluate(OVERFLOWING):
            too_wide[url] = overflowing
    assert not too_wide, f"pages wider than {width} px: {too_wide}"


# The background of each kind of slot cell of a pod, read at one moment.
SLOT_BACKGROUNDS = """pod => Object.fromEntries(
  [...document.querySelectorAll(`article[aria-label="Pod ${pod}"] li.slot`)].map(el =>
    [[...el.classList].find(c => c.startsWith("slot-")), getComputedStyle(el).backgroundColor]))"""

# The elements sticking out past the right edge of the viewport, outermost first, if the page
# scrolls sideways; [] if it does not.
OVERFLOWING = """() => {
  if (document.documentElement.scrollWidth <= window.innerWidth) return [];
  const out = [];
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.right > window.innerWidth + 0.5 && !out.some(o => o.el.contains(el))) {
      out.push({el, what: el.tagName.toLowerCase() + (el.className ? "." + String(el.className)
        .trim().replace(/\\s+/g, ".") : ""), right: Math.round(r.right)});
    }
  }
  return [`scrollWidth ${document.documentElement.scrollWidth}`,
          ...out.slice(0, 10).map(o => `${o.what} ends at ${o.right}`)];
}"""
