"""The hosted pages of the Stripe test double: Checkout and the Billing Portal.

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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.demo.stripe_double import objects, seats
from gateway.demo.stripe_double.form import ApiError
from gateway.demo.stripe_double.handlers import DoubleHandlers
from gateway.demo.stripe_double.markup import (
    amount_text,
    day,
    esc,
    page,
    price_label,
    price_text,
    when,
)
from gateway.demo.stripe_double.objects import Obj

__all__ = ["PORTAL_ACTIONS", "CheckoutPages", "PortalPages"]

PORTAL_ACTIONS = ("cancel-at-period-end", "cancel-now", "resume", "switch-price", "update-quantity")


def session_of(request: web.Request, sessions: dict[str, Obj], kind: str) -> Obj:
    """The session of the path's ``{id}``; a 404 page naming ``kind`` if there is none."""
    session = sessions.get(request.match_info["id"])
    if session is None:
        raise web.HTTPNotFound(text=f"No such {kind}.")
    return session


class CheckoutPages(DoubleHandlers):
    """The hosted Checkout page: ``GET /checkout/{id}``, its Pay and Cancel buttons."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/checkout/{id}", self.checkout),
            web.post("/checkout/{id}/pay", self.checkout_pay),
            web.post("/checkout/{id}/cancel", self.checkout_cancel),
        ]

    def _session(self, request: web.Request) -> Obj:
        return session_of(request, self.double.checkout_sessions, "Checkout Session")

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
            f"{esc(price_text(price))}"
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
            off = amount_text(session["total_details"]["amount_discount"], session["currency"])
            head += f'<p id="discount">Discount applied: -{esc(off)}</p>'
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
            f"{seats.quantity_field(options, quantity)}{promo}{buttons}</form>"
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
            price_id, quantity, sub_data = self.double.checkout_lines[session["id"]]
            options = self.double.checkout_options.get(session["id"], {})
            typed_quantity = form.get("quantity")
            chosen = seats.chosen_quantity(
                options, str(typed_quantity) if typed_quantity is not None else None, quantity
            )
            self.double.checkout_lines[session["id"]] = (price_id, chosen, sub_data)
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


@dataclass
class PortalPages(DoubleHandlers):
    """The hosted Billing Portal: ``GET /portal/{id}``, its flows and its buttons."""

    #: Portal sessions whose ``flow`` is done: they show the portal's home page.
    flows_done: set[str] = field(default_factory=set)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/portal/{id}", self.portal),
            web.post("/portal/{id}/subscriptions/{sub}/{action}", self.portal_action),
            web.post("/portal/{id}/payment-method", self.portal_payment_method),
        ]

    def _portal_session(self, request: web.Request) -> Obj:
        return session_of(request, self.double.portal_sessions, "billing portal session")

    def _subscription_box(self, portal_id: str, sub: Obj, suffix: str) -> str:
        item = sub["items"]["data"][0]
        price_id = objects.item_price_id(item)
        price = self.double.prices.get(price_id) or item.get("price") or {}
        product = self.double.products.get(str(price.get("product")), {})
        amount = price_text(price) if price else price_id
        paused = " · payments paused" if sub["pause_collection"] else ""
        box = (
            f'<div class="box" id="sub-{esc(sub["id"])}">'
            f'<h2>{esc(product.get("name", price_id))}</h2><p class="price">{esc(amount)}'
            f'</p><p>Status: <strong class="status">{esc(sub["status"])}</strong>'
            f'{esc(paused)}</p><p class="when">{esc(when(sub))}</p>'
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
            label = functools.partial(price_label, self.double.products)
            options = "".join(
                f'<option value="{esc(p["id"])}">{esc(label(p))}</option>' for p in others
            )
            select = f'<select name="price" id="price{suffix}">{options}</select> '
            box += button("switch-price", "Switch plan", select)
        box += button("update-quantity", "Update quantity", seats.portal_quantity(item, suffix))
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
            f'<p id="current-plan">{esc(price_label(self.double.products, current))}</p>'
            f'<p class="muted">New plan</p><p class="price" id="new-plan">'
            f"{esc(price_label(self.double.products, target) if target else target_id)}</p>"
            f'<p class="muted">The new price applies from today; Stripe prorates the '
            f"difference on the next invoice.</p>"
            f'<form method="post" action="/portal/{esc(session["id"])}/subscriptions/'
            f'{esc(sub["id"])}/switch-price"><input type="hidden" name="price" '
            f'value="{esc(target_id)}"><button class="primary" id="confirm-update" '
            f'type="submit">Confirm</button></form></div>'
        )

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
                    "update-quantity": {
                        "items": [
                            {
                                "id": sub["items"]["data"][0]["id"],
                                "quantity": str(form.get("quantity", "")),
                            }
                        ]
                    },
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
