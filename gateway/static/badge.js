/* gateway badge: a small floating "Subscription · Pro · renews on 1 Jan 2027 (in 31 days) ·
   Manage billing" widget, inserted into the app's HTML pages by the gate (INJECT_BADGE=true).
   It reads api/me and shows its plain-words `summary` (never Stripe's raw status). */
(function () {
  "use strict";
  var script = document.currentScript;
  var prefix = (script && script.getAttribute("data-prefix")) || "/_gate";
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    if (text) { node.textContent = text; }
    return node;
  }
  function show(me) {
    if (!me || !me.signed_in || !me.billing_enabled) { return; }
    var box = el("div", {
      id: "gate-badge",
      style: "position:fixed;right:16px;bottom:16px;z-index:2147483647;" +
        "font:13px/1.4 system-ui,sans-serif;background:#fff;color:#1d2433;" +
        "border:1px solid #e4e7ee;border-radius:10px;padding:8px 12px;" +
        "box-shadow:0 4px 16px rgba(20,30,60,.12)"
    });
    box.appendChild(el("strong", {}, "Subscription"));
    var detail = me.summary || me.status_text;
    if (detail) { box.appendChild(document.createTextNode(" \u00b7 " + detail + " \u00b7 ")); }
    box.appendChild(el("a", { href: prefix + "/account", id: "gate-badge-manage",
      style: "color:#4f46e5" }, "Manage billing"));
    if (me.features && me.features.length) {  /* what the plan unlocks */
      box.appendChild(el("div", { id: "gate-badge-features", style: "color:#5b6475" },
        "Includes: " + me.features.join(", ")));
    }
    document.body.appendChild(box);
  }
  function load() {
    fetch(prefix + "/api/me", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(show)
      .catch(function () { /* the badge is optional; the app works without it */ });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", load);
  } else { load(); }
})();
