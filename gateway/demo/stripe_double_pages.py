"""Hosted pages of the Stripe test double, and its ``/_double`` helpers.

Plain HTML with real forms (no JavaScript), stable element ids for browser tests:

- ``GET /checkout/{id}``: product, price, ``<input id="email">``, ``<button id="pay">`` and
  ``<button id="cancel">``. Paying creates the customer and subscription, delivers the webhooks,
  then redirects (303) to ``success_url`` (``{CHECKOUT_SESSION_ID}`` replaced).
  With ``payment_method_collection=if_required`` and nothing due (a trial; or promotion codes
  allowed, one of which may take the whole first invoice) also ``<button
  id="pay-without-card">``; with ``allow_promotion_codes`` an ``<input id="promotion-code">``.
- ``GET /portal/{id}``: the customer's subscriptions with ``cancel-at-period-end``,
  ``cancel-now``, ``resume``, ``switch-price`` buttons (plain ids on the first live
  subscription, ``-{sub_id}`` suffixed on the others) and ``<a id="return">``. A session
  created with ``flow_data`` lands on that flow's screen first (``#flow-{type}`` heading;
  ``payment_method_update``: ``<input id="card">`` and ``<button id="save-card">``).
- ``/_double/...``: clock, status and fault controls over HTTP (for the demo and browsers), and
  ``GET /`` an index page with those controls.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from gateway.demo import stripe_double_objects as objects
from gateway.demo.common import favicon_handler
from gateway.demo.stripe_double_form import ApiError
from gateway.demo.stripe_double_http import Faults
from gateway.demo.stripe_double_objects import Obj

__all__ = ["HostedPages", "PagesState"]


class PagesState(Protocol):
    """What the hosted pages use of the double: its tables, clock, faults and the operations
    behind their buttons (the :class:`~gateway.demo.stripe_double.StripeDouble` is one)."""

    faults: Faults
    customers: dict[str, dict[str, Any]]
    subscriptions: dict[str, dict[str, Any]]
    checkout_sessions: dict[str, dict[str, Any]]
    checkout_lines: dict[str, tuple[str, int, dict[str, Any]]]
    checkout_options: dict[str, dict[str, Any]]
    portal_sessions: dict[str, dict[str, Any]]
    products: dict[str, dict[str, Any]]
    prices: dict[str, dict[str, Any]]
    promotion_codes: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]
    deliveries: list[tuple[str, int]]
    webhook_urls: list[str]

    def now(self) -> int: ...

    def period(self, sub: Obj) -> tuple[int, int]: ...

    def customer_subscriptions(self, customer_id: str) -> list[Obj]: ...

    def state(self) -> dict[str, Any]: ...

    async def complete_checkout(
        self,
        session_id: str,
        email: str | None = None,
        *,
        promotion_code: str | None = None,
        with_card: bool = True,
    ) -> dict[str, Any]: ...

    async def update_payment_method(self, customer_id: str) -> str: ...

    async def cancel_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any]
    ) -> dict[str, Any]: ...

    async def set_status(
        self, subscription_id: str, status: str, **fields: Any
    ) -> dict[str, Any]: ...

    async def advance_time(self, seconds: int) -> None: ...


_STYLE = """
:root{--ink:#1a1f36;--muted:#697386;--line:#e3e8ee;--accent:#635bff;--bg:#f6f9fc}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:34rem;
margin:0 auto;padding:1.5rem 1rem 3rem;color:var(--ink);background:var(--bg)}
h1{font-size:1.45rem;margin:.5rem 0 .25rem} h2{font-size:1.1rem;margin:0 0 .25rem}
.box{background:#fff;border:1px solid var(--line);border-radius:12px;padding:1.25rem 1.5rem;
margin:1rem 0;box-shadow:0 2px 8px rgba(50,50,93,.06)}
.price{font-size:1.6rem;font-weight:650;margin:.25rem 0}
.muted{color:var(--muted);font-size:.9rem} .error{color:#df1b41;background:#fff0f3;
border:1px solid #ffc9d4;border-radius:8px;padding:.5rem .75rem}
.test{background:#fff8e1;color:#8a5a00;padding:.35rem .75rem;border-radius:999px;
font-size:.8rem;font-weight:600;display:inline-block;margin:0}
label{display:block;font-weight:550;font-size:.9rem;margin:.9rem 0 .3rem}
input,select{font:inherit;width:100%;padding:.55rem .7rem;border:1px solid var(--line);
border-radius:8px;background:#fff;color:var(--ink)}
input[readonly]{background:#f6f8fa;color:var(--muted)}
button{font:inherit;font-weight:600;padding:.55rem 1.1rem;margin:.35rem .35rem .35rem 0;
border-radius:8px;border:1px solid var(--line);background:#fff;color:var(--ink);cursor:pointer}
button#pay,button.primary,button#save-card,button#confirm-update{background:var(--accent);
color:#fff;border-color:var(--accent)}
#pay{width:100%;padding:.75rem;font-size:1rem;margin:1.1rem 0 .25rem}
form{display:inline} form.stack{display:block}
.hint{background:#f0f4ff;border-radius:8px;padding:.4rem .7rem;font-size:.85rem;color:#3c4257}
code{background:#eef0f7;border-radius:4px;padding:0 .3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;background:#fff}
td,th{border-bottom:1px solid var(--line);padding:.4rem .5rem;text-align:left}
td select,td input{width:auto}
a{color:var(--accent)}
"""

PORTAL_ACTIONS = ("cancel-at-period-end", "cancel-now", "resume", "switch-price")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="icon" href="/favicon.ico" type="image/svg+xml">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
        f'<p class="test">Stripe test double — test mode, no real payment</p>'
        f"{body}</body></html>"
    )
    return web.Response(text=text, status=status, content_type="text/html")


def day(ts: int | None) -> str:
    """A date as people read it: ``1 Jan 2027`` (UTC)."""
    if ts is None:
        return ""
    at = datetime.fromtimestamp(ts, UTC)
    return f"{at.day} {at:%b %Y}"


def local_redirect(target: str | None, fallback: str) -> str:
    """Only same-site paths (``/x``), never ``//host`` or absolute URLs."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return fallback


class HostedPages:
    """Routes and handlers of the hosted Checkout / Portal pages and the helpers."""

    def __init__(self, double: PagesState) -> None:
        self.double = double
        #: Portal sessions whose ``flow`` is done: they show the portal's home page.
        self.flows_done: set[str] = set()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/favicon.ico", favicon_handler("S", "#635bff")),
            web.get("/checkout/{id}", self.checkout),
            web.post("/checkout/{id}/pay", self.checkout_pay),
            web.post("/checkout/{id}/cancel", self.checkout_cancel),
            web.get("/portal/{id}", self.portal),
            web.post("/portal/{id}/subscriptions/{sub}/{action}", self.portal_action),
            web.post("/portal/{id}/payment-method", self.portal_payment_method),
            web.post("/_double/advance", self.helper_advance),
            web.post("/_double/subscriptions/{id}/status", self.helper_status),
            web.post("/_double/faults", self.helper_faults),
            web.post("/_double/webhooks", self.helper_webhooks),
            web.get("/_double/state", self.helper_state),
        ]

    # --- Checkout -------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Obj:
        session = self.double.checkout_sessions.get(request.match_info["id"])
        if session is None:
            raise web.HTTPNotFound(text="No such Checkout Session.")
        return session

    def _checkout_page(
        self,
        session: Obj,
        error: str = "",
        status: int = 200,
        typed: dict[str, str] | None = None,
    ) -> web.Response:
        """The hosted Checkout page; after a refused payment (``error``) the form keeps what
        was ``typed`` (email, card, promotion code) as Stripe's page does."""
        typed = typed or {}
        price_id, quantity, sub_data = self.double.checkout_lines[session["id"]]
        price = self.double.prices[price_id]
        product = self.double.products.get(price["product"], {})
        name = product.get("name", price_id)
        head = (
            f'<h1>{esc(name)}</h1><p class="price" id="price">'
            f"{esc(objects.format_amount(price))}"
            f"{esc(f' x {quantity}') if quantity != 1 else ''}</p>"
        )
        options = self.double.checkout_options.get(session["id"], {})
        trial = bool(sub_data.get("trial_period_days") or options.get("trial_end"))
        if sub_data.get("trial_period_days"):
            head += f'<p id="trial">{esc(sub_data["trial_period_days"])}-day free trial</p>'
        elif trial:
            head += f'<p id="trial">Free trial until {esc(day(options["trial_end"]))}</p>'
        if session["automatic_tax"]["enabled"]:
            head += '<p class="muted" id="tax">Tax calculated by Stripe Tax</p>'
        if session["discounts"]:
            head += (
                f'<p id="discount">Discount applied: -'
                f"{session['total_details']['amount_discount'] / 100:,.2f} "
                f"{esc(str(session['currency']).upper())}</p>"
            )
        if session["status"] == "complete":
            target = str(session["success_url"] or "").replace(
                "{CHECKOUT_SESSION_ID}", session["id"]
            )
            body = f'{head}<p id="status">Payment complete.</p>'
            if target:
                body += f'<p><a id="continue" href="{esc(target)}">Continue</a></p>'
            return page(f"{name} — paid", body)
        if session["status"] != "open":
            body = f'{head}<p id="status">This checkout session has expired.</p>'
            if session["cancel_url"]:
                body += f'<p><a id="back" href="{esc(session["cancel_url"])}">Back</a></p>'
            return page(f"{name} — expired", body, 410)
        email = typed.get("email") or session["customer_email"]
        locked = ""
        if session["customer"] in self.double.customers:
            email, locked = self.double.customers[session["customer"]]["email"], " readonly"
        error_html = f'<p class="error" id="error">{esc(error)}</p>' if error else ""
        # The card may be skipped only when nothing will be due (checked again on Pay).
        no_card = options.get("payment_method_collection") == "if_required" and (
            trial or bool(session["allow_promotion_codes"])
        )
        promo = ""
        if session["allow_promotion_codes"]:
            codes = [p["code"] for p in self.double.promotion_codes.values() if p["active"]]
            hint = (
                f'<p class="hint" id="promotion-hint">Test double: try '
                f"{', '.join(f'<code>{esc(c)}</code>' for c in codes)}</p>"
                if codes
                else ""
            )
            promo = (
                '<label for="promotion-code">Promotion code</label>'
                '<input name="promotion_code" id="promotion-code" autocomplete="off" '
                f'value="{esc(typed.get("promotion_code", ""))}">{hint}'
            )
        buttons = '<button id="pay" type="submit">{}</button>'.format(
            "Start trial" if trial else "Pay"
        )
        if no_card:
            buttons += (
                '<button id="pay-without-card" type="submit" name="without_card" value="1">'
                f"{'Start trial' if trial else 'Continue'} without a card</button>"
            )
        card = typed.get("card") or "4242 4242 4242 4242"
        body = (
            f'<div class="box">{head}</div><div class="box">{error_html}'
            f'<form class="stack" method="post" action="/checkout/{esc(session["id"])}/pay">'
            f'<label for="email">Email</label>'
            f'<input type="email" name="email" id="email" value="{esc(email)}" required'
            f'{locked} autocomplete="email"><label for="card">Card</label>'
            f'<input name="card" id="card" value="{esc(card)}"{"" if no_card else " required"}>'
            f'<p class="muted">Test double: any card number works.'
            f"{' No card is needed for the trial.' if no_card and trial else ''}"
            f"{' No card is needed when a code makes it free.' if no_card and not trial else ''}"
            "</p>"
            f"{promo}{buttons}</form>"
            f'<form method="post" action="/checkout/{esc(session["id"])}/cancel">'
            f'<button id="cancel" type="submit">Cancel and go back</button></form></div>'
        )
        return page(f"Subscribe to {name}", body, status)

    async def checkout(self, request: web.Request) -> web.Response:
        return self._checkout_page(self._session(request))

    async def checkout_pay(self, request: web.Request) -> web.Response:
        session = self._session(request)
        form = await request.post()
        email = str(form.get("email", "")).strip() or None
        code = str(form.get("promotion_code", "")).strip() or None
        try:
            await self.double.complete_checkout(
                session["id"],
                email,
                promotion_code=code,
                with_card=form.get("without_card") != "1",
            )
        except ApiError as exc:
            typed = {k: str(form.get(k, "")) for k in ("email", "card", "promotion_code")}
            return self._checkout_page(session, exc.message, 400, typed)
        target = str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session["id"])
        raise web.HTTPSeeOther(target)

    async def checkout_cancel(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if not session["cancel_url"]:
            return page("Checkout canceled", '<p id="status">Checkout canceled.</p>')
        raise web.HTTPSeeOther(str(session["cancel_url"]))

    # --- Portal ---------------------------------------------------------------------------------

    def _portal_session(self, request: web.Request) -> Obj:
        session = self.double.portal_sessions.get(request.match_info["id"])
        if session is None:
            raise web.HTTPNotFound(text="No such billing portal session.")
        return session

    def _when(self, sub: Obj) -> str:
        end = self.double.period(sub)[1]
        if sub["status"] in objects.ENDED_STATUSES:
            return f"Ended on {day(sub['ended_at'])}"
        if sub["cancel_at"] is not None:
            return f"Ends on {day(sub['cancel_at'])}"
        if sub["status"] == "trialing":
            return f"Trial ends on {day(sub['trial_end'])}, then renews"
        return f"Renews on {day(end)}"

    def _subscription_box(self, portal_id: str, sub: Obj, suffix: str) -> str:
        item = sub["items"]["data"][0]
        price_id = objects.item_price_id(item)
        price = self.double.prices.get(price_id) or item.get("price") or {}
        product = self.double.products.get(str(price.get("product")), {})
        amount = objects.format_amount(price) if price else price_id
        paused = " · payments paused" if sub["pause_collection"] else ""
        box = (
            f'<div class="box" id="sub-{esc(sub["id"])}">'
            f'<h2>{esc(product.get("name", price_id))}</h2><p class="price">{esc(amount)}'
            f'</p><p>Status: <strong class="status">{esc(sub["status"])}</strong>'
            f'{esc(paused)}</p><p class="when">{esc(self._when(sub))}</p>'
        )
        if sub["status"] in objects.ENDED_STATUSES:
            return box + "</div>"
        base = f"/portal/{esc(portal_id)}/subscriptions/{esc(sub['id'])}"

        def button(action: str, label: str, extra: str = "") -> str:
            return (
                f'<form method="post" action="{base}/{action}">{extra}'
                f'<button type="submit" id="{action}{suffix}">{label}</button></form>'
            )

        if sub["cancel_at"] is not None or sub["pause_collection"]:
            box += button("resume", "Resume subscription")
        else:
            box += button("cancel-at-period-end", "Cancel at period end")
        box += button("cancel-now", "Cancel now")
        others = [p for p in self.double.prices.values() if p["active"] and p["id"] != price_id]
        if others:
            options = "".join(
                f'<option value="{esc(p["id"])}">{esc(self.price_label(p))}</option>'
                for p in others
            )
            select = f'<select name="price" id="price{suffix}">{options}</select> '
            box += button("switch-price", "Switch plan", select)
        return box + "</div>"

    async def portal(self, request: web.Request) -> web.Response:
        session = self._portal_session(request)
        customer = self.double.customers.get(session["customer"], {})
        subs = self.double.customer_subscriptions(session["customer"])
        live = [s["id"] for s in subs if s["status"] not in objects.ENDED_STATUSES]
        boxes = (
            "".join(
                self._subscription_box(
                    session["id"], sub, "" if live and sub["id"] == live[0] else f"-{sub['id']}"
                )
                for sub in subs
            )
            or '<p id="no-subscriptions">No subscriptions.</p>'
        )
        back = ""
        if session["return_url"]:
            back = f'<p><a id="return" href="{esc(session["return_url"])}">← Return</a></p>'
        email = f'<p class="muted">{esc(customer.get("email"))}</p>'
        flow = session["flow"]
        if flow and session["id"] not in self.flows_done:
            return self._flow_screen(session, flow, email, back)
        body = f"<h1>Billing</h1>{email}{boxes}{back}"
        return page("Manage billing", body)

    def _flow_screen(self, session: Obj, flow: Obj, email: str, back: str) -> web.Response:
        """The screen a portal session created with ``flow_data`` lands on."""
        kind = str(flow["type"])
        anchor = f"flow-{kind.replace('_', '-')}"
        if kind == "payment_method_update":
            late = [
                s
                for s in self.double.customer_subscriptions(session["customer"])
                if s["status"] in ("past_due", "unpaid")
            ]
            note = (
                '<p id="flow-note">Your last payment failed. Saving a card pays what is due.</p>'
                if late
                else ""
            )
            body = (
                f'<h1 id="{anchor}">Update payment method</h1>{email}{note}<div class="box">'
                f'<form method="post" action="/portal/{esc(session["id"])}/payment-method">'
                f'<p><label for="card">Card</label><br><input name="card" id="card" '
                f'value="4242 4242 4242 4242" required></p>'
                f'<button id="save-card" type="submit">Save card</button></form></div>{back}'
            )
            return page("Update payment method", body)
        sub_id = flow[kind]["subscription"]
        sub = self.double.subscriptions[sub_id]
        titles = {
            "subscription_cancel": "Cancel your subscription",
            "subscription_update": "Change your plan",
            "subscription_update_confirm": "Confirm your new plan",
        }
        if kind == "subscription_update_confirm":
            box = self._confirm_box(session, sub, flow[kind])
        else:
            box = self._subscription_box(session["id"], sub, "")
        body = f'<h1 id="{anchor}">{esc(titles[kind])}</h1>{email}{box}{back}'
        return page(titles[kind], body)

    def _confirm_box(self, session: Obj, sub: Obj, detail: Obj) -> str:
        """``subscription_update_confirm``: the current plan, the one the session names, and
        one Confirm button (Stripe's confirmation screen, without prorations)."""
        item = sub["items"]["data"][0]
        current = self.double.prices.get(objects.item_price_id(item)) or item.get("price") or {}
        target_id = str(detail["items"][0].get("price") or "")
        target = self.double.prices.get(target_id, {})
        return (
            f'<div class="box" id="confirm-box"><p class="muted">Current plan</p>'
            f'<p id="current-plan">{esc(self.price_label(current))}</p>'
            f'<p class="muted">New plan</p><p class="price" id="new-plan">'
            f"{esc(self.price_label(target) if target else target_id)}</p>"
            f'<p class="muted">The new price applies from today; Stripe prorates the '
            f"difference on the next invoice.</p>"
            f'<form method="post" action="/portal/{esc(session["id"])}/subscriptions/'
            f'{esc(sub["id"])}/switch-price"><input type="hidden" name="price" '
            f'value="{esc(target_id)}"><button class="primary" id="confirm-update" '
            f'type="submit">Confirm</button></form></div>'
        )

    def price_label(self, price: Obj) -> str:
        """``PatentLLM Pro — $190.00 / year``: the product's name and the price."""
        if not price:
            return ""
        product = self.double.products.get(str(price.get("product")), {})
        name = str(product.get("name") or price.get("nickname") or price.get("id"))
        return f"{name} — {objects.format_amount(price)}"

    def _after_flow(self, session: Obj) -> str:
        """Where a portal session goes once its flow is done (``after_completion``)."""
        flow = session["flow"]
        self.flows_done.add(session["id"])
        after = flow["after_completion"] if flow else None
        if after and after["type"] == "redirect":
            return str(after["redirect"]["return_url"])
        return f"/portal/{session['id']}"

    async def portal_payment_method(self, request: web.Request) -> web.Response:
        session = self._portal_session(request)
        await request.post()
        await self.double.update_payment_method(session["customer"])
        raise web.HTTPSeeOther(self._after_flow(session))

    async def portal_action(self, request: web.Request) -> web.Response:
        session = self._portal_session(request)
        sub = self.double.subscriptions.get(request.match_info["sub"])
        action = request.match_info["action"]
        if sub is None or sub["customer"] != session["customer"] or action not in PORTAL_ACTIONS:
            raise web.HTTPNotFound(text="No such subscription or action.")
        form = await request.post()
        try:
            if action == "cancel-now":
                await self.double.cancel_subscription(sub["id"])
            else:
                updates: dict[str, dict[str, Any]] = {
                    "cancel-at-period-end": {"cancel_at_period_end": "true"},
                    "resume": {"cancel_at_period_end": "false", "pause_collection": ""},
                    "switch-price": {
                        "items": [
                            {
                                "id": sub["items"]["data"][0]["id"],
                                "price": str(form.get("price", "")),
                            }
                        ]
                    },
                }
                await self.double.update_subscription(sub["id"], updates[action])
        except ApiError as exc:
            return page(
                "Manage billing",
                f'<p class="error" id="error">{esc(exc.message)}'
                f'</p><p><a href="/portal/{esc(session["id"])}">Back</a></p>',
                400,
            )
        if session["flow"] and session["id"] not in self.flows_done:
            raise web.HTTPSeeOther(self._after_flow(session))
        raise web.HTTPSeeOther(f"/portal/{session['id']}")

    # --- helpers over HTTP ----------------------------------------------------------------------

    @staticmethod
    async def _fields(request: web.Request) -> dict[str, str]:
        form = await request.post()
        fields = {k: v for k, v in request.query.items()}
        fields.update({k: v for k, v in form.items() if isinstance(v, str)})
        return fields

    @staticmethod
    def _reply(fields: dict[str, str], data: Any) -> web.Response:
        if "next" in fields:
            raise web.HTTPSeeOther(local_redirect(fields["next"], "/"))
        return web.json_response(data)

    async def helper_advance(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        try:
            seconds = int(fields.get("seconds", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="seconds must be an integer") from None
        await self.double.advance_time(seconds)
        return self._reply(fields, {"now": self.double.now()})

    async def helper_status(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        extra: dict[str, Any] = {}
        if "cancel_at_period_end" in fields:
            extra["cancel_at_period_end"] = fields["cancel_at_period_end"] == "true"
        try:
            sub = await self.double.set_status(
                request.match_info["id"], fields.get("status", ""), **extra
            )
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except ValueError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        return self._reply(fields, sub)

    async def helper_faults(self, request: web.Request) -> web.Response:
        fields = await self._fields(request)
        faults = self.double.faults
        try:
            if fields.get("reset"):
                faults.reset()
            if "latency" in fields:
                faults.latency = float(fields["latency"])
            status = int(fields.get("status", "500"))
            if "fail_next" in fields:
                faults.fail_next(int(fields["fail_next"]), status)
            if "drop_next" in fields:
                faults.drop_next(int(fields["drop_next"]))
            if fields.get("fail_always"):
                faults.fail_always(status)
            if fields.get("drop_always"):
                faults.drop_always()
        except ValueError:
            raise web.HTTPBadRequest(
                text="latency: seconds; fail_next, drop_next, status: integers"
            ) from None
        return self._reply(fields, faults.snapshot())

    async def helper_webhooks(self, request: web.Request) -> web.Response:
        """Add (``url=``) or drop (``remove=``) a webhook endpoint: another gate pointed at
        this double (``STRIPE_API_BASE``) gets its events too."""
        fields = await self._fields(request)
        urls = self.double.webhook_urls
        for key in ("url", "remove"):
            value = fields.get(key, "")
            if value and not value.startswith(("http://", "https://")):
                raise web.HTTPBadRequest(text=f"{key}: an http:// or https:// URL")
        if fields.get("url") and fields["url"] not in urls:
            urls.append(fields["url"])
        if fields.get("remove") in urls:
            urls.remove(fields["remove"])
        return self._reply(fields, {"webhook_urls": urls})

    async def helper_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.double.state(), dumps=lambda d: json.dumps(d, indent=1))

    async def index(self, request: web.Request) -> web.Response:
        rows = "".join(
            f"<tr><td>{esc(s['id'])}</td><td>{esc(s['customer'])}</td>"
            f"<td>{esc(s['status'])}</td><td>{esc(self._when(s))}</td><td>"
            f'<form method="post" action="/_double/subscriptions/{esc(s["id"])}/status">'
            f'<input type="hidden" name="next" value="/"><select name="status">'
            + "".join(
                f"<option{' selected' if st == s['status'] else ''}>{st}</option>"
                for st in objects.SUBSCRIPTION_STATUSES
            )
            + '</select> <button type="submit">Set</button></form></td></tr>'
            for s in reversed(self.double.subscriptions.values())
        )
        advance = "".join(
            f'<form method="post" action="/_double/advance"><input type="hidden" '
            f'name="next" value="/"><input type="hidden" name="seconds" value="{sec}">'
            f'<button type="submit">+{label}</button></form>'
            for sec, label in ((3600, "1 hour"), (86_400, "1 day"), (32 * 86_400, "32 days"))
        )
        body = (
            f"<h1>Stripe test double</h1><p>Clock: {esc(day(self.double.now()))} "
            f"({self.double.now()})</p><p>{advance}</p>"
            f"<h2>Subscriptions</h2><table><tr><th>id</th><th>customer</th><th>status</th>"
            f"<th>period</th><th></th></tr>{rows}</table>"
            f'<h2>Faults</h2><form method="post" action="/_double/faults">'
            f'<input type="hidden" name="next" value="/">latency s <input name="latency" '
            f'value="{esc(self.double.faults.latency)}" size="4"> fail next <input '
            f'name="fail_next" value="0" size="3"> with <input name="status" value="500"'
            f' size="4"> <button type="submit">Apply</button></form>'
            f'<form method="post" action="/_double/faults"><input type="hidden" '
            f'name="next" value="/"><input type="hidden" name="reset" value="1">'
            f'<button type="submit">Reset faults</button></form>'
            f'<p><a href="/_double/state">State (JSON)</a> · {len(self.double.events)} events,'
            f" {len(self.double.deliveries)} deliveries</p>"
        )
        return page("Stripe test double", body)
