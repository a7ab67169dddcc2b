"""Customers and subscriptions of the Stripe test double, as Stripe's own machinery runs them:
creating them (with a first invoice, a trial, a promotion code's discount), updating and
canceling them, and the clock running them on (renewals with their invoices, period-end
cancellations, a trial ending without a card, incomplete subscriptions expiring, Checkout
Sessions expiring).

Every operation records the events it causes into ``out`` (``None``: the setup helpers, no
events); the caller delivers them (the API in the background, the hosted pages and the async
methods of :class:`~gateway.demo.stripe_double.StripeDouble` before they return).
"""

from __future__ import annotations

import copy
from typing import Any

from gateway.demo.stripe_double import invoicing, objects, promotions
from gateway.demo.stripe_double.form import (
    ApiError,
    Params,
    missing,
    param_bool,
    param_dict,
    param_int,
    param_list,
)
from gateway.demo.stripe_double.objects import ENDED_STATUSES, SUBSCRIPTION_STATUSES, Obj
from gateway.demo.stripe_double.state import DoubleState

__all__ = ["INCOMPLETE_EXPIRY", "PAUSE_BEHAVIORS", "SubscriptionLifecycle"]

PAUSE_BEHAVIORS = ("keep_as_draft", "mark_uncollectible", "void")
INCOMPLETE_EXPIRY = 23 * 3600


class SubscriptionLifecycle(DoubleState):
    """The operations on customers and subscriptions (see the module docstring)."""

    # --- setup helpers (no events) --------------------------------------------------------------

    def create_customer(self, email: str, name: str | None = None) -> dict[str, Any]:
        """Seed a customer (no event)."""
        return self.new_customer(email, name, {}, None)

    # --- operations (record events into ``out``; callers deliver them) --------------------------

    def new_customer(
        self, email: str | None, name: str | None, metadata: Obj, out: list[Obj] | None
    ) -> Obj:
        cust = objects.customer(objects.new_id("cus_", 14), self.now(), email, name, metadata)
        self.customers[cust["id"]] = cust
        if out is not None:
            self.record("customer.created", cust, out)
        return cust

    def new_subscription(
        self,
        customer_id: str,
        price_id: str,
        *,
        status: str = "active",
        trial_days: int = 0,
        trial_end: int | None = None,
        legacy_plan: bool = False,
        top_level_period: bool = False,
        quantity: int = 1,
        metadata: Obj | None = None,
        out: list[Obj] | None,
        payment_method: str | None = None,
        missing_payment_method: str | None = None,
        promotion_code: Obj | None = None,
        checkout_session: str | None = None,
        metered: tuple[str, ...] = (),
    ) -> Obj:
        """A new subscription and its first invoice (``promotion_code``'s coupon taken off).
        A trial only when asked for: ``trial_days``, or ``trial_end`` (Unix seconds).
        ``payment_method``: the card it charges; ``missing_payment_method``: what its trial's
        end does without one (Stripe's ``trial_settings.end_behavior``)."""
        if status not in SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        cust = self.get_customer(customer_id, param="customer", status=400)
        price = self.get_price(price_id, param="items[0][price]", status=400)
        now = self.now()
        trial = (now, now + trial_days * 86_400) if trial_days > 0 else None
        if trial_end is not None:
            trial = (now, trial_end)
        if trial and status == "active":
            status = "trialing"
        recurring = price["recurring"]
        end = (
            trial[1]
            if trial
            else objects.add_interval(now, recurring["interval"], recurring["interval_count"])
        )
        sub_id = objects.new_id("sub_")
        item = objects.subscription_item(
            sub_id, price, now, (now, end), legacy_plan=legacy_plan, quantity=quantity
        )
        usage_items = [
            objects.subscription_item(
                sub_id, self.metered_price(p, f"items[{i + 1}]"), now, (now, end)
            )
            for i, p in enumerate(metered)
        ]
        sub = objects.subscription(
            sub_id,
            customer_id,
            [item, *usage_items],
            created=now,
            status=status,
            trial=trial,
            currency=price["currency"],
        )
        sub["metadata"] = dict(metadata or {})
        sub["default_payment_method"] = payment_method
        if missing_payment_method:
            sub["trial_settings"]["end_behavior"]["missing_payment_method"] = missing_payment_method
        if top_level_period:
            sub["current_period_start"], sub["current_period_end"] = now, end
        self.subscriptions[sub_id] = sub
        paid = status in ("active", "trialing")
        inv = objects.invoice(
            sub,
            cust,
            price,
            created=now,
            period=(now, end),
            billing_reason="subscription_create",
            paid=paid,
            amount=0 if trial else price["unit_amount"] * quantity,
        )
        if promotion_code is not None:
            self._redeem(sub, inv, promotion_code, checkout_session)
        self.invoices[inv["id"]] = inv
        sub["latest_invoice"] = inv["id"]
        if out is not None:
            self.record("customer.subscription.created", sub, out)
            self.record("invoice.paid" if paid else "invoice.payment_failed", inv, out)
        return sub

    def metered_price(self, price_id: str, param: str) -> Obj:
        """The metered price ``price_id`` (an item beside the licensed one), or Stripe's 400."""
        price = self.get_price(price_id, param=f"{param}[price]", status=400)
        if price["recurring"].get("usage_type") != "metered":
            raise ApiError(
                400,
                "The double takes one licensed item; the others must be metered prices.",
                param=f"{param}[price]",
            )
        return price

    def create_subscription(self, customer_id: str, price_id: str, **options: Any) -> Obj:
        """Seed a subscription (no event). ``options`` as for :meth:`new_subscription`, e.g.
        ``status``, ``trial_days``; ``legacy_plan``: items carry ``plan`` and no ``price``;
        ``top_level_period``: ``current_period_*`` also at the top level."""
        return self.new_subscription(customer_id, price_id, out=None, **options)

    def _redeem(self, sub: Obj, inv: Obj, promo: Obj, checkout_session: str | None) -> None:
        coupon = self.coupons[promo["promotion"]["coupon"]]
        disc = promotions.discount(
            coupon,
            promo,
            start=sub["created"],
            customer_id=sub["customer"],
            subscription_id=sub["id"],
            checkout_session=checkout_session,
        )
        self.discounts[disc["id"]] = disc
        promotions.redeemed(promo, coupon)
        if inv["subtotal"]:  # a trial's zero invoice uses up no "once" coupon
            promotions.apply_discount(inv, disc, coupon)
            if coupon["duration"] == "once":
                return
        sub["discounts"] = [disc["id"]]

    def _discount_renewal(self, sub: Obj, invoice: Obj, start: int) -> None:
        """Apply the subscription's discount (if still running) to a renewal invoice."""
        for disc_id in list(sub["discounts"]):
            disc = self.discounts[disc_id]
            if disc["end"] is not None and disc["end"] <= start:
                sub["discounts"].remove(disc_id)
                continue
            coupon = self.coupons[disc["source"]["coupon"]]
            promotions.apply_discount(invoice, disc, coupon)
            if coupon["duration"] == "once":
                sub["discounts"].remove(disc_id)
            return

    def has_payment_method(self, sub: Obj) -> bool:
        cust = self.customers.get(sub["customer"], {})
        settings = cust.get("invoice_settings") or {}
        return bool(sub["default_payment_method"] or settings.get("default_payment_method"))

    def _end_trial_without_card(self, sub: Obj, start: int, out: list[Obj]) -> bool:
        """A trial ends with no card and ``missing_payment_method`` = cancel or pause: what
        Stripe does then. False when the trial converts as usual."""
        behavior = sub["trial_settings"]["end_behavior"]["missing_payment_method"]
        if sub["status"] != "trialing" or behavior == "create_invoice":
            return False
        if self.has_payment_method(sub):
            return False
        if behavior == "cancel":
            self.cancel_subscription_now(sub, out, at=start)
            return True
        previous = {"status": sub["status"]}
        sub["status"] = "paused"
        self.record("customer.subscription.paused", sub, out)
        self.record("customer.subscription.updated", sub, out, previous)
        return True

    def update_subscription_now(self, sub: Obj, params: Params, out: list[Obj]) -> Obj:
        """Apply Stripe's subscription update parameters (``cancel_at_period_end``,
        ``cancel_at``, ``pause_collection``, ``items``, ``metadata``), all or nothing."""
        before = copy.deepcopy(sub)
        try:
            self._apply_update(sub, params)
        except ApiError:
            sub.clear()
            sub.update(before)
            raise
        previous = {k: before[k] for k in sub if k in before and sub[k] != before[k]}
        if previous:
            self.record("customer.subscription.updated", sub, out, previous)
        return sub

    def _apply_update(self, sub: Obj, params: Params) -> None:
        if sub["status"] in ENDED_STATUSES and set(params) - {"metadata", "expand"}:
            raise ApiError(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        cancel_at_period_end = param_bool(params, "cancel_at_period_end")
        if cancel_at_period_end is not None:
            sub["cancel_at_period_end"] = cancel_at_period_end
            sub["cancel_at"] = self.period(sub)[1] if cancel_at_period_end else None
            sub["canceled_at"] = self.now() if cancel_at_period_end else None
            sub["cancellation_details"]["reason"] = (
                "cancellation_requested" if cancel_at_period_end else None
            )
        if "cancel_at" in params:
            sub["cancel_at"] = param_int(params, "cancel_at")
            sub["cancel_at_period_end"] = False
        pause = param_dict(params, "pause_collection")
        if pause is not None:
            behavior = pause.get("behavior")
            if pause and behavior not in PAUSE_BEHAVIORS:
                raise ApiError(
                    400,
                    f"Invalid pause_collection[behavior]: {behavior}",
                    param="pause_collection[behavior]",
                )
            sub["pause_collection"] = (
                {
                    "behavior": behavior,
                    "resumes_at": param_int(pause, "resumes_at"),
                }
                if pause
                else None
            )
        for index, spec in enumerate(param_list(params, "items")):
            self._update_item(sub, index, spec)
        metadata = param_dict(params, "metadata")
        if metadata is not None:
            merged = {**sub["metadata"], **metadata} if metadata else {}
            sub["metadata"] = {k: v for k, v in merged.items() if v != ""}

    def _update_item(self, sub: Obj, index: int, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise ApiError(400, f"Invalid hash: items[{index}]", param=f"items[{index}]")
        items: list[Obj] = sub["items"]["data"]
        price_id = spec.get("price") or spec.get("plan")
        price = (
            self.get_price(price_id, param=f"items[{index}][price]", status=400)
            if price_id
            else None
        )
        quantity = param_int(spec, "quantity")
        if not spec.get("id"):
            if price is None:
                raise ApiError(
                    400,
                    f"Missing required param: items[{index}][price].",
                    param=f"items[{index}][price]",
                )
            items.append(
                objects.subscription_item(
                    sub["id"], price, self.now(), self.period(sub), quantity=quantity or 1
                )
            )
            return
        found = [item for item in items if item["id"] == spec["id"]]
        if not found:
            raise missing("subscription_item", spec["id"], param=f"items[{index}][id]", status=400)
        item = found[0]
        if spec.get("deleted") == "true":
            if len(items) == 1:
                raise ApiError(
                    400,
                    "A subscription must have at least one active plan.",
                    param=f"items[{index}][deleted]",
                )
            items.remove(item)
            return
        if price is not None:
            item["plan"] = objects.plan_from_price(price)
            if "price" in item:  # legacy items (plan only) stay legacy
                item["price"] = copy.deepcopy(price)
        if quantity is not None:
            item["quantity"] = quantity

    def bill_usage(self, sub: Obj, invoice: Obj, period: tuple[int, int]) -> None:
        """The metered items' lines (usage over the ended ``period``) on a renewal invoice."""
        for item in sub["items"]["data"]:
            price = self.prices.get(objects.item_price_id(item))
            if price is None or price["recurring"].get("usage_type") != "metered":
                continue
            meter_id = price["recurring"].get("meter")
            if not meter_id or meter_id not in self.meters.meters:
                continue
            used = self.meters.aggregate(meter_id, sub["customer"], *period)
            invoicing.add_usage_lines(
                invoice, sub, item, price, self.price_tiers.get(price["id"], []), used, period
            )

    def cancel_subscription_now(self, sub: Obj, out: list[Obj], *, at: int | None = None) -> Obj:
        if sub["status"] in ENDED_STATUSES:
            raise ApiError(400, f"This subscription is already {sub['status']}: {sub['id']}")
        now = self.now() if at is None else at
        sub["status"] = "canceled"
        sub["canceled_at"] = sub["canceled_at"] or now
        sub["ended_at"] = now
        sub["cancellation_details"]["reason"] = "cancellation_requested"
        self.record("customer.subscription.deleted", sub, out)
        return sub

    def run_clock(self, out: list[Obj]) -> None:
        """Apply what happened up to ``now()``: renewals, period-end cancellations, trial ends,
        expiry of incomplete subscriptions and of open Checkout Sessions."""
        now = self.now()
        for sub in list(self.subscriptions.values()):
            self._advance_subscription(sub, now, out)
        for session in self.checkout_sessions.values():
            if session["status"] == "open" and session["expires_at"] <= now:
                session["status"], session["url"] = "expired", None
                self.record("checkout.session.expired", session, out)

    def _advance_subscription(self, sub: Obj, now: int, out: list[Obj]) -> None:
        while sub["status"] not in ENDED_STATUSES:
            end = self.period(sub)[1]
            renewable = sub["status"] in ("active", "trialing")
            cancel_at = sub["cancel_at"]
            if cancel_at is not None and cancel_at <= now and (cancel_at <= end or not renewable):
                self.cancel_subscription_now(sub, out, at=cancel_at)
                return
            if sub["status"] == "incomplete":
                if sub["created"] + INCOMPLETE_EXPIRY <= now:
                    previous = {"status": sub["status"]}
                    sub["status"] = "incomplete_expired"
                    sub["ended_at"] = sub["created"] + INCOMPLETE_EXPIRY
                    self.record("customer.subscription.updated", sub, out, previous)
                return
            if end > now or not renewable:
                return
            if self._end_trial_without_card(sub, end, out):
                return
            self._renew(sub, end, out)

    def _renew(self, sub: Obj, start: int, out: list[Obj]) -> None:
        previous: Obj = {"items": copy.deepcopy(sub["items"])}
        if "current_period_end" in sub:
            previous["current_period_start"] = sub["current_period_start"]
            previous["current_period_end"] = sub["current_period_end"]
        first = sub["items"]["data"][0]
        price = self.get_price(objects.item_price_id(first))
        recurring = price["recurring"]
        end = objects.add_interval(start, recurring["interval"], recurring["interval_count"])
        ended = self.period(sub)
        self._set_period(sub, start, end)
        if sub["status"] == "trialing":
            previous["status"], sub["status"] = "trialing", "active"
        invoice = None
        if sub["pause_collection"] is None:  # paused collection: the period's invoice is void
            invoice = objects.invoice(
                sub,
                self.customers[sub["customer"]],
                price,
                created=start,
                period=(start, end),
                billing_reason="subscription_cycle",
                paid=True,
                amount=price["unit_amount"] * int(first["quantity"]),
            )
            self.bill_usage(sub, invoice, ended)
            self._discount_renewal(sub, invoice, start)
            self.invoices[invoice["id"]] = invoice
            previous["latest_invoice"] = sub["latest_invoice"]
            sub["latest_invoice"] = invoice["id"]
        self.record("customer.subscription.updated", sub, out, previous)
        if invoice is not None:
            self.record("invoice.paid", invoice, out)
