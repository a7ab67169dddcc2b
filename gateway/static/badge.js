/* gateway badge: a small floating "Subscription · Pro · renews on 1 Jan 2027 (in 31 days) ·
   Manage billing" widget, inserted into the app's HTML pages by the gate (INJECT_BADGE=true).
   It reads api/me and shows its plain-words `summary` (never Stripe's raw status), and the
   names of the plan's features. It keeps clear of the app (the page gets room below it; a
   button folds it to a pill) and follows changes: api/me is read again when the gate closes a
   WebSocket (4401 signed out, 4402 subscription or feature gone), when a request is refused
   (401/402), when the tab comes back, and every 30 s while it is visible. */
(function () {
  "use strict";
  var script = document.currentScript;
  var prefix = (script && script.getAttribute("data-prefix")) || "/_gate";
  var REFRESH_MS = 30000;
  var box = null;
  var folded = false;
  var pending = null;
  var padding = null;  // the body's own padding-bottom, before the badge added room

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    if (text) { node.textContent = text; }
    return node;
  }
  function room() {  /* the app's last lines can scroll above the badge */
    if (padding === null) { padding = document.body.style.paddingBottom || ""; }
    var height = box ? box.offsetHeight + 24 : 0;
    document.body.style.paddingBottom = height ? "calc(" + (padding || "0px") + " + " + height + "px)" : padding;
  }
  function render(me) {
    if (!me || !me.billing_enabled) { return; }
    if (!me.signed_in && !box) { return; }  /* nobody to show anything to */
    var fresh = el("div", {
      id: "gate-badge", role: "status", "aria-live": "polite",
      "data-allowed": me.allowed ? "true" : "false",
      style: "position:fixed;right:16px;bottom:16px;z-index:2147483647;max-width:min(360px,calc(100vw - 32px));" +
        "font:13px/1.4 system-ui,sans-serif;background:#fff;color:#1d2433;" +
        "border:1px solid #e4e7ee;border-radius:10px;padding:8px 32px 8px 12px;" +
        "box-shadow:0 4px 16px rgba(20,30,60,.12)"
    });
    var fold = el("button", {
      type: "button", id: "gate-badge-fold", "aria-label": folded ? "Show subscription" : "Fold",
      style: "position:absolute;top:4px;right:6px;border:0;background:none;color:#5b6475;" +
        "font:16px/1 system-ui,sans-serif;cursor:pointer;padding:2px 4px"
    }, folded ? "\u25b4" : "\u2013");
    fold.addEventListener("click", function () { folded = !folded; render(me); });
    fresh.appendChild(fold);
    if (!me.signed_in) {
      fresh.appendChild(el("strong", {}, "Signed out"));
      fresh.appendChild(document.createTextNode(" \u00b7 "));
      fresh.appendChild(el("a", { href: prefix + "/login", id: "gate-badge-manage", style: "color:#4f46e5" }, "Sign in"));
    } else if (folded) {
      fresh.appendChild(el("strong", {}, me.allowed ? (me.plan_short || "Subscription") : "Subscription ended"));
    } else {
      fresh.appendChild(el("strong", {}, "Subscription"));
      var detail = me.summary || me.status_text;
      if (detail) { fresh.appendChild(document.createTextNode(" \u00b7 " + detail + " \u00b7 ")); }
      if (me.allowed) {
        fresh.appendChild(el("a", { href: prefix + "/account", id: "gate-badge-manage", style: "color:#4f46e5" }, "Manage billing"));
      } else {
        fresh.appendChild(el("a", { href: prefix + "/subscribe", id: "gate-badge-manage", style: "color:#4f46e5" }, "Subscribe"));
      }
      var names = me.feature_names || me.features;
      if (me.allowed && names && names.length) {  /* what the plan unlocks */
        fresh.appendChild(el("div", { id: "gate-badge-features", style: "color:#5b6475" },
          "Includes: " + names.join(", ")));
      }
      (me.usage || []).forEach(function (u) {  /* "17 of 20 analyses used · resets on …" */
        fresh.appendChild(el("div", { "class": "gate-badge-usage", style: "color:#5b6475" }, u.text));
      });
    }
    if (box && box.parentNode) { box.parentNode.replaceChild(fresh, box); } else { document.body.appendChild(fresh); }
    box = fresh;
    room();
  }
  function load() {
    pending = null;
    window.fetch(prefix + "/api/me", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(render)
      .catch(function () { /* the badge is optional; the app works without it */ });
  }
  function soon() {  /* several refusals at once: one read */
    if (pending === null) { pending = window.setTimeout(load, 300); }
  }

  /* A refusal by the gate (an API call of the app, 401/402): the account changed. */
  if (window.fetch) {
    var fetch0 = window.fetch;
    window.fetch = function () {
      var call = fetch0.apply(window, arguments);
      call.then(function (r) {
        if ((r.status === 401 || r.status === 402 || r.status === 429) && r.url.indexOf(prefix + "/api/me") < 0) { soon(); }
      }, function () {});
      return call;
    };
  }
  /* A WebSocket the gate closes (4401/4402): the account changed. Sockets the app opens from
     now on are watched; one opened before this script ran is caught by the timer below. */
  if (window.WebSocket) {
    var WS = window.WebSocket;
    var Watched = function (url, protocols) {
      var ws = protocols === undefined ? new WS(url) : new WS(url, protocols);
      ws.addEventListener("close", function (ev) {
        if (ev.code === 4401 || ev.code === 4402) { soon(); }
      });
      return ws;
    };
    Watched.prototype = WS.prototype;
    ["CONNECTING", "OPEN", "CLOSING", "CLOSED"].forEach(function (k) { Watched[k] = WS[k]; });
    window.WebSocket = Watched;
  }
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") { soon(); }
  });
  window.setInterval(function () {
    if (document.visibilityState !== "hidden") { load(); }
  }, REFRESH_MS);

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", load);
  } else { load(); }
})();
