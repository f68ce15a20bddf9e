// poolsadmin dashboard behaviour on top of htmx: the live state of a page (WebSocket or
// polling) and the action dialog. Everything here is an enhancement: without JavaScript the
// pages refresh themselves (<noscript> meta refresh) and actions are pages of their own.
(function () {
  "use strict";

  var live = { connected: false };
  window.poolsadmin = {
    // The poller of a live page polls only while the WebSocket is down.
    liveConnected: function () { return live.connected; },
    // A polled region is not replaced while the keyboard focus is inside it (a link being
    // read or about to be followed); it refreshes once the focus leaves.
    idle: function (id) {
      var region = document.getElementById(id);
      return !(region && region.contains(document.activeElement) && document.activeElement !== document.body);
    }
  };

  function showLiveState() {
    document.querySelectorAll("[data-live-state]").forEach(function (el) {
      el.textContent = live.connected ? "live" : "polling every 5 s";
      el.classList.toggle("live-on", live.connected);
    });
  }
  document.addEventListener("htmx:wsOpen", function () { live.connected = true; showLiveState(); });
  // A page of the pool that is not the pool page (a task's) holds a socket opened with
  // ?notify=1: it hears only "changed", and refreshes its own region over HTTP.
  document.addEventListener("htmx:wsBeforeMessage", function (event) {
    if (!event.target.hasAttribute("data-ws-notify")) { return; }
    event.preventDefault();
    var poller = document.getElementById("live-poller");
    if (poller && window.htmx) { window.htmx.trigger(poller, "poolsadmin:refresh"); }
  });
  document.addEventListener("htmx:wsClose", function () { live.connected = false; showLiveState(); });
  // Swapped-in regions carry the server's text: put the current state back.
  document.addEventListener("htmx:oobAfterSwap", showLiveState);
  document.addEventListener("htmx:wsAfterMessage", showLiveState);
  document.addEventListener("DOMContentLoaded", showLiveState);

  // A live region swapped in replaces the elements in it, and the keyboard focus with them:
  // put the focus back on the element with the same id (buttons have stable ids).
  var focusedIds = null;
  function signature(el) {
    // What a region looks like, minus what htmx itself adds (hx-swap-oob, htmx-* classes).
    var names = [];
    for (var i = 0; i < el.attributes.length; i++) {
      var a = el.attributes[i];
      if (a.name === "hx-swap-oob" || a.name === "data-hx-swap-oob") { continue; }
      var value = a.name === "class" ?
        a.value.split(/\s+/).filter(function (c) { return c && c.indexOf("htmx-") !== 0; }).join(" ") :
        a.value;
      names.push(a.name + "=" + value);
    }
    return names.sort().join(" ") + "|" + el.innerHTML;
  }
  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var target = event.detail.target;
    var fragment = event.detail.fragment;
    var incoming = fragment && (fragment.firstElementChild || fragment);
    // A region that did not change is left alone: no flicker, focus and selection stay.
    if (incoming && incoming.id === target.id && signature(incoming) === signature(target)) {
      event.detail.shouldSwap = false;
      return;
    }
    // Remember the focused element's id and its ancestors' ids inside the region: if the
    // element is gone after the swap (a finished task's Release), the nearest ancestor that
    // is still there (its slot cell, its pod card) takes the focus, not the page's body.
    var active = document.activeElement;
    if (active && active !== document.body && target.contains(active)) {
      focusedIds = [];
      for (var el = active; el && el !== target.parentNode; el = el.parentNode) {
        if (el.id) { focusedIds.push(el.id); }
      }
    }
  });
  document.addEventListener("htmx:oobAfterSwap", function () {
    if (!focusedIds) { return; }
    for (var i = 0; i < focusedIds.length; i++) {
      var again = document.getElementById(focusedIds[i]);
      if (!again) { continue; }
      if (again !== document.activeElement) {
        if (again.tabIndex < 0 && !again.hasAttribute("tabindex")) { again.setAttribute("tabindex", "-1"); }
        again.focus({ preventScroll: true });
      }
      break;
    }
    focusedIds = null;
  });

  // A pod picked in the slot map (a boosted link: its card comes with the live regions) or
  // a page of cards: once the regions are in, the focus goes to the picked card, or to the
  // cards' status line.
  var picked = null;
  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (!elt || !elt.closest || !(elt.closest(".slot-map") || elt.closest(".pager"))) { return; }
    var pod = elt.closest(".slot-map") && new URL(elt.href, location.href).searchParams.get("pod");
    picked = pod ? "pod-" + pod : "slot-grid";
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (!picked) { return; }
    var target = document.getElementById(picked);
    picked = null;
    if (target && target.id === "slot-grid") { target = target.querySelector("[role=status]"); }
    if (!target) { return; }
    if (!target.hasAttribute("tabindex")) { target.setAttribute("tabindex", "-1"); }
    target.focus({ preventScroll: true });
    target.scrollIntoView({ block: "start" });
  });

  // --- action dialog ------------------------------------------------------------------------
  // A button's confirm form is loaded into #action-dialog-body; the dialog then opens modal
  // (Escape cancels it, as for every <dialog>). When it closes, focus goes back to the button
  // that opened it: the same element, or, if a live update replaced it meanwhile, the
  // element with its id; else the page's heading.
  var openerId = null;
  var opener = null;

  function dialog() { return document.getElementById("action-dialog"); }

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    var target = event.detail.target;
    var d = dialog();
    if (target && target.id === "action-dialog-body" && d && !d.contains(elt)) {
      // A form (the Undo in a message) cannot take focus: its submit button can.
      var trigger = event.detail.requestConfig && event.detail.requestConfig.triggeringEvent;
      var from = (trigger && trigger.submitter) || elt;
      if (from.tagName === "FORM") { from = from.querySelector("button") || from; }
      opener = from;
      openerId = from.id || null;
    }
  });

  // After settle, not after swap: htmx processes the swapped-in form (hx-post) only when it
  // settles (20 ms later); a quick Enter before that would post it as a plain form.
  document.addEventListener("htmx:afterSettle", function (event) {
    var d = dialog();
    var target = event.detail.target;  // none on a history restore
    if (!d || !target || target.id !== "action-dialog-body") { return; }
    if (!d.open) { d.showModal(); }
    var field = d.querySelector("[aria-invalid=true]") ||
      d.querySelector("textarea, input:not([type=hidden]), select") ||
      d.querySelector("button[type=submit]:not([disabled])") ||
      d.querySelector("[data-dialog-close]");
    if (field) { field.focus(); }
  });

  document.addEventListener("click", function (event) {
    var closer = event.target.closest && event.target.closest("[data-dialog-close]");
    if (closer) { event.preventDefault(); dialog().close(); }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var d = dialog();
    if (!d) { return; }
    // A click on the backdrop (the dialog element itself, outside its content) cancels.
    d.addEventListener("click", function (event) { if (event.target === d) { d.close(); } });
    d.addEventListener("close", function () {
      document.getElementById("action-dialog-body").innerHTML = "";
      if (focusOutcome) { opener = null; openerId = null; return; }
      var back = (opener && document.contains(opener)) ? opener :
        (openerId && document.getElementById(openerId)) || document.querySelector("main h1");
      opener = null;
      openerId = null;
      if (back) {
        if (!back.hasAttribute("tabindex") && back.matches("h1")) { back.setAttribute("tabindex", "-1"); }
        back.focus();
      }
    });
  });

  // A done action: close the dialog and refresh the page's live regions at once (the
  // WebSocket would bring them too, but the poller also serves pages without one). Focus
  // goes to the outcome, the message (its Undo button if it has one): the button that opened
  // the dialog may be gone with the state it acted on.
  var focusOutcome = false;
  document.addEventListener("htmx:afterSettle", function () {
    if (!focusOutcome) { return; }
    focusOutcome = false;
    var region = document.getElementById("messages");
    var target = region && (region.querySelector("button") || region.querySelector(".message"));
    if (!target) { return; }
    if (!target.matches("button")) { target.setAttribute("tabindex", "-1"); }
    target.focus();
  });
  document.addEventListener("poolsadmin:action-done", function () {
    var d = dialog();
    focusOutcome = true;
    if (d && d.open) { d.close(); }
    var poller = document.getElementById("live-poller");
    if (poller && window.htmx) { window.htmx.trigger(poller, "poolsadmin:refresh"); }
  });
})();
