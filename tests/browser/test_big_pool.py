"""A pool of 1,000 pods in a real browser: task 598's reserved slot is as easy to find as in
the demo's two pods, by eye in the slot map and by the filter (issue 9)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from poolsadmin.dashboard.management.commands.seed_demo import (
    DEMO_AGENT_NAMES,
    DEMO_POOL_ID,
    INCIDENT_TASK_ID,
    INCIDENT_WORKSPACE_ID,
    DemoSeed,
)
from tests.bigpool import BigPool, demo_big_pool_seed
from tests.browser.conftest import login

pytestmark = pytest.mark.browser

POOL_URL = f"/pools/{DEMO_POOL_ID}/"
INCIDENT_POD = DEMO_AGENT_NAMES[0]
PODS = 1000


@pytest.fixture
def big_pool(demo: DemoSeed) -> BigPool:
    big = demo_big_pool_seed(pods=PODS)
    assert big.pods == PODS
    # In the middle of the map, not at its start where the demo's two pods would put it.
    assert 400 < big.incident_position < 600
    return big


# What the focused element's tooltip (its ::after) says, and its colours.
TOOLTIP = """() => { const s = getComputedStyle(document.activeElement, "::after");
  return {content: s.content, color: s.color, background: s.backgroundColor}; }"""
# The background of a map cell of each kind.
MAP_BACKGROUNDS = """() => Object.fromEntries(["i.r", "i:not(.r)", "a.v"].map(sel =>
  [sel, getComputedStyle(document.querySelector(`#slot-map li ${sel}`)).backgroundImage + " " +
        getComputedStyle(document.querySelector(`#slot-map li ${sel}`)).backgroundColor]))"""


def test_in_a_1000_pod_pool_the_admin_finds_598s_reserved_slot_by_eye_in_the_map(
    page: Page, big_pool: BigPool, screenshot_dir: Path
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    pods = page.locator("#slot-map ol.slot-map > li")
    expect(pods).to_have_count(PODS)
    # The one reserved cell of 4,000, in the middle of the map, and marked apart from the
    # running and idle cells by pattern (a hatch), not only by colour.
    reserved = page.locator("#slot-map a.v")
    expect(reserved).to_have_count(1)
    position = reserved.evaluate(
        "el => [...el.parentNode.parentNode.children].indexOf(el.parentNode)"
    )
    assert position == big_pool.incident_position
    backgrounds = page.evaluate(MAP_BACKGROUNDS)
    assert "repeating-linear-gradient" in backgrounds["a.v"]
    assert len(set(backgrounds.values())) == 3, backgrounds

    # From the keyboard: after the pool's actions comes the map's "1 reserved" (the reserved
    # filter), then the reserved cell: the map's pod links are no tab stops. Focusing the
    # cell says its owner and age.
    page.locator("#pool-actions a, #pool-actions button").last.focus()
    page.keyboard.press("Tab")
    expect(page.locator("#slot-map .map-note a")).to_be_focused()
    expect(page.locator("#slot-map .map-note a")).to_have_attribute("href", "?show=reserved")
    page.keyboard.press("Tab")
    expect(reserved).to_be_focused()
    label = reserved.get_attribute("aria-label") or ""
    assert f"task #{INCIDENT_TASK_ID}" in label
    assert INCIDENT_WORKSPACE_ID in label
    assert re.search(r"for 2 h", label), label
    tooltip = page.evaluate(TOOLTIP)
    assert (
        f"#{INCIDENT_TASK_ID}" in tooltip["content"] and INCIDENT_WORKSPACE_ID in tooltip["content"]
    )
    assert tooltip["color"] == "rgb(255, 255, 255)" and tooltip["background"] == "rgb(22, 32, 46)"
    page.screenshot(path=screenshot_dir / "pool-1000-pods-1280.png", full_page=True)
    page.locator("#slot-map").screenshot(path=screenshot_dir / "pool-1000-pods-map-1280.png")

    # Enter opens the pod's full card: the owner, who planned it, and the Release button.
    page.keyboard.press("Enter")
    card = page.get_by_role("article", name=f"Pod {INCIDENT_POD}")
    expect(card).to_be_focused()
    expect(card.locator("li.slot-reserved")).to_contain_text(f"#{INCIDENT_TASK_ID}")
    expect(card).to_contain_text("Waits for an admin to confirm the apply")
    expect(card.get_by_role("link", name="Release")).to_be_visible()


def test_in_a_1000_pod_pool_the_reserved_filter_shows_598s_pod_alone(
    page: Page, big_pool: BigPool
) -> None:
    login(page, "admin")
    page.goto(POOL_URL)
    page.evaluate("window.__notReloaded = true")
    page.get_by_label("Show").select_option("reserved")
    page.get_by_role("button", name="Show", exact=True).click()

    expect(page).to_have_url(re.compile(r"\?show=reserved(&|$)"))
    expect(page.locator("#slot-grid [role=status]")).to_contain_text(
        f"1 of {PODS} pods: pods holding a reservation"
    )
    cards = page.locator("#slot-grid article.pod")
    expect(cards).to_have_count(1)
    expect(cards.first).to_have_attribute("aria-label", f"Pod {INCIDENT_POD}")
    expect(cards.first.locator("li.slot-reserved")).to_contain_text(f"#{INCIDENT_TASK_ID}")
    assert page.evaluate("window.__notReloaded === true"), "the filter reloaded the page"
    # The live socket follows the new view: its pushes keep the filter.
    expect(page.locator("#live-poller")).to_have_attribute(
        "ws-connect", f"/ws/pools/{DEMO_POOL_ID}/?show=reserved"
    )
    expect(page.locator("[data-live-state]")).to_have_text("live")


def test_without_javascript_the_filter_and_a_click_in_the_map_work_too(
    page_without_js: Page, big_pool: BigPool
) -> None:
    page = page_without_js
    login(page, "admin")
    page.goto(POOL_URL)
    page.get_by_label("Show").select_option("reserved")
    page.get_by_role("button", name="Show", exact=True).click()
    expect(page).to_have_url(re.compile(r"\?show=reserved(&|$)"))
    expect(page.locator("#slot-grid article.pod")).to_have_count(1)

    # Any pod of the map opens its card on demand, below the filtered ones.
    page.locator("#slot-map li").nth(3).locator("a").first.click()
    expect(page).to_have_url(re.compile(r"\?pod=\d+#pod-\d+$"))
    expect(page.locator("#slot-grid .pod-pinned article.pod")).to_have_count(1)
