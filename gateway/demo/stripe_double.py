"""A local Stripe test double: an aiohttp app speaking Stripe's wire format.

The real ``stripe`` library talks to it through ``base_addresses``::

    double = StripeDouble(webhook_urls=["http://127.0.0.1:8080/_gate/webhooks/stripe"])
    # serve double.app (aiohttp_server, web.AppRunner...), then:
    http = stripe.AIOHTTPClient(timeout=10.0)
    client = stripe.StripeClient("sk_test_double", http_client=http,
                                 base_addresses={"api": "http://127.0.0.1:PORT"},
                                 max_network_retries=0)

It covers the subset of Stripe the gate uses (customers, prices, products, subscriptions,
Checkout and Billing Portal sessions, events, invoices), hosted Checkout / Portal pages with real
HTML forms, signed webhooks and fault injection. The pieces:

- ``stripe_double_form``: form decoding (``a[b]=``, ``a[0][b]=``, ``expand[]=``) and errors;
- ``stripe_double_objects``: Stripe-shaped objects (same keys as Stripe's own examples);
- ``stripe_double_api``: the ``/v1`` HTTP handlers;
- ``stripe_double_pages``: hosted pages and the ``/_double`` helpers for demos and browser tests;
- this module: the state, the clock, the operations, webhook delivery and the app.

Events: API calls and hosted pages emit the events Stripe would. Hosted pages, ``emit``,
``set_status`` and ``advance_time`` deliver webhooks before they return; API calls answer first
and deliver in the background, as Stripe does (``await double.wait_deliveries()`` to wait).
The setup helpers ``create_customer`` / ``create_subscription`` seed state silently (no events).
Webhook signatures use real time (the receiver checks a 300 s tolerance against its own clock);
event ``created`` and every object timestamp use the double's clock (``now()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import stripe
from aiohttp import web

from gateway.demo import stripe_double_objects as objects
from gateway.demo import stripe_double_promotions as promotions
from gateway.demo.stripe_double_api import StripeApi, read_params
from gateway.demo.stripe_double_entitlements import DoubleEntitlements
from gateway.demo.stripe_double_form import (
    ApiError,
    Params,
    missing,
    param_bool,
    param_dict,
    param_int,
    param_list,
)
from gateway.demo.stripe_double_http import ApiGuard, Faults
from gateway.demo.stripe_double_objects import ENDED_STATUSES, SUBSCRIPTION_STATUSES, Obj
from gateway.demo.stripe_double_pages import HostedPages
from gateway.demo.stripe_double_promotions import DEFAULT_PROMOTION_CODES

__all__ = ["DEFAULT_PRICES", "Faults", "StripeDouble"]

PAUSE_BEHAVIORS = ("keep_as_draft", "mark_uncollectible", "void")
INCOMPLETE_EXPIRY = 23 * 3600
WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=10)
DEFAULT_API_KEY = "sk_test_double"
DEFAULT_WEBHOOK_SECRET = "whsec_double"  # noqa: S105 - the double's made-up test secret

#: Stripe's ``marketing_features`` of the demo's products (shown on the landing page).
PRO_FEATURES = ["Patent search", "LLM analysis of claims", "Export to PDF and CSV"]
BASIC_FEATURES = ["Patent search", "Saved searches"]

DEFAULT_PRICES: list[Obj] = [
    {
        "id": "price_demo_monthly",
        "unit_amount": 1900,
        "currency": "usd",
        "nickname": "Monthly",
        "recurring": {"interval": "month"},
        "product": "prod_demo",
        "product_name": "PatentLLM Pro",
        "marketing_features": PRO_FEATURES,
    },
    {
        "id": "price_demo_yearly",
        "unit_amount": 19000,
        "currency": "usd",
        "nickname": "Yearly",
        "recurring": {"interval": "year"},
        "product": "prod_demo",
        "product_name": "PatentLLM Pro",
        "marketing_features": PRO_FEATURES,
    },
    {
        "id": "price_basic_monthly",
        "unit_amount": 900,
        "currency": "usd",
        "nickname": "Basic monthly",
        "recurring": {"interval": "month"},
        "product": "prod_basic",
        "product_name": "PatentLLM Basic",
        "marketing_features": BASIC_FEATURES,
    },
    {
        "id": "price_basic_yearly",
        "unit_amount": 9000,
        "currency": "usd",
        "nickname": "Basic yearly",
        "recurring": {"interval": "year"},
        "product": "prod_basic",
        "product_name": "PatentLLM Basic",
        "marketing_features": BASIC_FEATURES,
    },
]


class StripeDouble:
    """The double's state and behaviour; ``app`` serves it (see the module docstring)."""

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
        webhook_urls: list[str] | None = None,
        public_url: str = "",
        prices: list[dict[str, Any]] | None = None,
        promotion_codes: list[dict[str, Any]] | None = None,
    ) -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.webhook_urls: list[str] = list(webhook_urls or [])
        self.public_url = public_url
        self.deliver_webhooks = True
        self.faults = Faults()
        self.calls: list[tuple[str, str]] = []
        self.customers: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.portal_sessions: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        #: Legacy Plans only the Plans API returns (``add_legacy_plan``), not the Prices API.
        self.plans: dict[str, dict[str, Any]] = {}
        self.deleted_customers: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.deliveries: list[tuple[str, int]] = []
        self.checkout_lines: dict[str, tuple[str, int, Params]] = {}
        self.coupons: dict[str, dict[str, Any]] = {}
        self.promotion_codes: dict[str, dict[str, Any]] = {}
        self.discounts: dict[str, dict[str, Any]] = {}
        #: Checkout options per session (``promotions.checkout_options``).
        self.checkout_options: dict[str, Obj] = {}
        self._offset = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._seed_catalog(prices if prices is not None else DEFAULT_PRICES)
        self.entitlements = DoubleEntitlements(self.products, self.subscriptions, self.now)
        for spec in DEFAULT_PROMOTION_CODES if promotion_codes is None else promotion_codes:
            self.add_promotion_code(**spec)
        self.default_price_id: str = next(iter(self.prices))
        self.app = self.make_app()

    # --- clock and lookups --------------------------------------------------------------------

    def now(self) -> int:
        """Unix seconds on the double's clock: real time plus what ``advance_time`` added."""
        return int(time.time()) + self._offset

    def _seed_catalog(self, specs: list[Obj]) -> None:
        created = self.now() - 30 * 86_400
        for spec in specs:
            price = objects.price(spec, created)
            self.prices[price["id"]] = price
            product_id = price["product"]
            if product_id not in self.products:
                name = str(spec.get("product_name", "PatentLLM Pro"))
                product = objects.product(product_id, name, created, price["id"])
                product["marketing_features"] = [
                    {"name": str(feature)} for feature in spec.get("marketing_features", ())
                ]
                self.products[product_id] = product

    @property
    def public_base(self) -> str:
        return self.public_url.rstrip("/")

    def get_customer(self, customer_id: str, *, param: str = "id", status: int = 404) -> Obj:
        if customer_id not in self.customers:
            raise missing("customer", customer_id, param=param, status=status)
        return self.customers[customer_id]

    def get_subscription(self, subscription_id: str) -> Obj:
        if subscription_id not in self.subscriptions:
            raise missing("subscription", subscription_id)
        return self.subscriptions[subscription_id]

    def add_price(self, spec: Obj) -> Obj:
        """One more price on the account (``spec`` as in :data:`DEFAULT_PRICES`; its product is
        created if the double lacks it), e.g. one the gate does not sell."""
        self._seed_catalog([spec])
        return self.prices[spec["id"]]

    def add_legacy_plan(self, spec: Obj) -> Obj:
        """A legacy Plan (see :func:`objects.plan`): ``/v1/plans/{id}`` knows it,
        ``/v1/prices/{id}`` does not (as for some accounts' plans created before Prices)."""
        plan = objects.plan(spec, self.now() - 30 * 86_400)
        self.plans[plan["id"]] = plan
        product_id = plan["product"]
        if product_id not in self.products:
            name = str(spec.get("product_name", "PatentLLM Pro"))
            self.products[product_id] = objects.product(product_id, name, plan["created"], None)
        return plan

    def add_promotion_code(self, code: str, **coupon_spec: Any) -> Obj:
        """A coupon (``percent_off`` or ``amount_off``, ``duration``...) and a customer-facing
        promotion ``code`` for it (``active``, ``expires_at``, ``max_redemptions`` go to the
        code). Returns the promotion code."""
        code_keys = ("active", "expires_at", "max_redemptions")
        code_spec = {"code": code, **{k: coupon_spec.pop(k) for k in code_keys if k in coupon_spec}}
        coupon = promotions.coupon(coupon_spec, self.now())
        self.coupons[coupon["id"]] = coupon
        promo = promotions.promotion_code(code_spec, coupon, self.now())
        self.promotion_codes[promo["id"]] = promo
        return promo

    def get_plan(self, plan_id: str) -> Obj:
        if plan_id not in self.plans:
            raise missing("plan", plan_id)
        return self.plans[plan_id]

    def get_price(self, price_id: str, *, param: str = "id", status: int = 404) -> Obj:
        if price_id not in self.prices:
            raise missing("price", price_id, param=param, status=status)
        return self.prices[price_id]

    def resolve(self, object_id: str) -> Obj | None:
        """Any stored object by id (for ``expand``)."""
        for table in (
            self.customers,
            self.subscriptions,
            self.invoices,
            self.prices,
            self.products,
            self.checkout_sessions,
            self.deleted_customers,
            self.coupons,
            self.promotion_codes,
            self.discounts,
        ):
            if object_id in table:
                return table[object_id]
        return None

    def customer_subscriptions(self, customer_id: str) -> list[Obj]:
        """The customer's subscriptions, newest first, all statuses."""
        return [s for s in reversed(self.subscriptions.values()) if s["customer"] == customer_id]

    @staticmethod
    def period(sub: Obj) -> tuple[int, int]:
        item = sub["items"]["data"][0]
        return int(item["current_period_start"]), int(item["current_period_end"])

    @staticmethod
    def _set_period(sub: Obj, start: int, end: int) -> None:
        for item in sub["items"]["data"]:
            item["current_period_start"], item["current_period_end"] = start, end
        if "current_period_end" in sub:  # created with top_level_period=True (old API shape)
            sub["current_period_start"], sub["current_period_end"] = start, end

    # --- setup helpers (no events) --------------------------------------------------------------

    def create_customer(self, email: str, name: str | None = None) -> dict[str, Any]:
        """Seed a customer (no event)."""
        return self.new_customer(email, name, {}, None)

    # --- operations (record events into ``out``; callers deliver them) --------------------------

    def record(
        self, event_type: str, obj: Obj, out: list[Obj] | None, previous: Obj | None = None
    ) -> Obj:
        """Record an Event (listable); append it to ``out`` for delivery."""
        pending = len(self.webhook_urls) if self.deliver_webhooks else 0
        evt = objects.event(
            event_type,
            obj,
            created=self.now(),
            pending_webhooks=pending,
            previous_attributes=previous,
        )
        self.events.append(evt)
        if out is not None:
            out.append(evt)
        self.entitlements.after_event(event_type, obj, out, self.record)
        return evt

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
        sub = objects.subscription(
            sub_id,
            customer_id,
            [item],
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

    def create_subscription(
        self,
        customer_id: str,
        price_id: str,
        *,
        status: str = "active",
        trial_days: int = 0,
        legacy_plan: bool = False,
        top_level_period: bool = False,
    ) -> dict[str, Any]:
        """Seed a subscription (no event). ``legacy_plan``: items carry ``plan`` and no
        ``price``; ``top_level_period``: ``current_period_*`` also at the top level."""
        return self.new_subscription(
            customer_id,
            price_id,
            status=status,
            trial_days=trial_days,
            legacy_plan=legacy_plan,
            top_level_period=top_level_period,
            out=None,
        )

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
            self._discount_renewal(sub, invoice, start)
            self.invoices[invoice["id"]] = invoice
            previous["latest_invoice"] = sub["latest_invoice"]
            sub["latest_invoice"] = invoice["id"]
        self.record("customer.subscription.updated", sub, out, previous)
        if invoice is not None:
            self.record("invoice.paid", invoice, out)

    def complete_checkout_now(
        self,
        session: Obj,
        email: str | None,
        out: list[Obj],
        *,
        promotion_code: str | None = None,
        with_card: bool = True,
    ) -> Obj:
        """What paying on the hosted Checkout page does (see ``complete_checkout``)."""
        if session["status"] == "complete":
            return session
        if session["status"] != "open":
            raise ApiError(400, "This Checkout Session is no longer active.")
        options = self.checkout_options.get(session["id"]) or promotions.checkout_options(
            {}, self.now()
        )
        price_id, quantity, sub_data = self.checkout_lines[session["id"]]
        # Only what the session asked for (subscription_data), never the price's own days.
        trial_days = param_int(sub_data, "trial_period_days", 0) or 0
        trial_end = options.get("trial_end")
        promo = None
        if promotion_code:
            if not options["allow_promotion_codes"]:
                raise ApiError(
                    400, "Promotion codes are not accepted here.", param="promotion_code"
                )
            promo = promotions.find_code(self.promotion_codes, promotion_code, self.now())
            if promo is None:
                raise ApiError(400, "This code is invalid.", param="promotion_code")
        price = self.get_price(price_id)
        due = 0 if trial_days or trial_end else int(price["unit_amount"]) * quantity
        if promo is not None and due:
            coupon = self.coupons[promo["promotion"]["coupon"]]
            due -= promotions.discount_amount(due, coupon, str(price["currency"]))
        # Stripe: with payment_method_collection=if_required, "Checkout will not collect a
        # payment method when the total due for the session is 0. This may occur if the
        # Checkout Session includes a free trial or a discount"
        # (https://docs.stripe.com/api/checkout/sessions/create#create_checkout_session-payment_method_collection).
        # So the card may be skipped only then; whenever money is due, it is asked for.
        if not with_card and not (
            due == 0 and options["payment_method_collection"] == "if_required"
        ):
            raise ApiError(400, "Enter your card details.", param="card")
        customer_id = session["customer"]
        if customer_id is None:
            email = email or session["customer_email"]
            if not email or "@" not in email:
                raise ApiError(400, "Enter a valid email address.", param="email")
            customer_id = self.new_customer(email, None, {}, out)["id"]
        sub = self.new_subscription(
            customer_id,
            price_id,
            trial_days=trial_days,
            trial_end=trial_end,
            quantity=quantity,
            metadata=param_dict(sub_data, "metadata"),
            out=out,
            payment_method=objects.new_id("pm_") if with_card else None,
            missing_payment_method=options["missing_payment_method"],
            promotion_code=promo,
            checkout_session=session["id"],
        )
        invoice = self.invoices[sub["latest_invoice"]]
        off = sum(d["amount"] for d in invoice["total_discount_amounts"])
        session.update(
            {
                "status": "complete",
                "payment_status": "no_payment_required" if due == 0 else "paid",
                "customer": customer_id,
                "subscription": sub["id"],
                "invoice": sub["latest_invoice"],
                "url": None,
                "customer_details": objects.customer_details(self.customers[customer_id]),
            }
        )
        if promo is not None:
            coupon_id = promo["promotion"]["coupon"]
            session["discounts"] = [{"coupon": coupon_id, "promotion_code": promo["id"]}]
            session["total_details"]["amount_discount"] = off
            session["amount_total"] = session["amount_subtotal"] - off
        if session["automatic_tax"]["enabled"]:
            session["automatic_tax"]["status"] = "complete"
        self.record("checkout.session.completed", session, out)
        return session

    # --- async public API (delivers the events before returning) ------------------------------

    async def advance_time(self, seconds: int) -> None:
        """Move the clock; renew or end subscriptions whose period ended (with events)."""
        self._offset += seconds
        out: list[Obj] = []
        self.run_clock(out)
        await self.deliver(out)

    async def set_status(self, subscription_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Force a subscription's status (and top-level ``fields``) as Stripe's own machinery
        would; emits ``customer.subscription.updated`` (``.deleted`` for ``canceled``)."""
        sub = self.get_subscription(subscription_id)
        if status not in SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        unknown = set(fields) - set(sub)
        if unknown:
            raise KeyError(f"not subscription fields: {sorted(unknown)}")
        if fields.get("cancel_at_period_end") and "cancel_at" not in fields:
            fields["cancel_at"] = self.period(sub)[1]
        out: list[Obj] = []
        previous = {k: copy.deepcopy(sub[k]) for k in fields if sub[k] != fields[k]}
        sub.update(copy.deepcopy(fields))
        if status == "canceled" and sub["status"] != "canceled":
            self.cancel_subscription_now(sub, out)
        elif status != sub["status"] or previous:
            if status != sub["status"]:
                previous["status"] = sub["status"]
            sub["status"] = status
            if status == "incomplete_expired":
                sub["ended_at"] = self.now()
            self.record("customer.subscription.updated", sub, out, previous)
        await self.deliver(out)
        return sub

    async def emit(
        self,
        event_type: str,
        obj: dict[str, Any],
        *,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an Event for ``obj`` (listable) and deliver it to ``webhook_urls``."""
        out: list[Obj] = []
        evt = self.record(event_type, obj, out, previous_attributes)
        await self.deliver(out)
        return evt

    async def complete_checkout(
        self,
        session_id: str,
        email: str | None = None,
        *,
        promotion_code: str | None = None,
        with_card: bool = True,
    ) -> dict[str, Any]:
        """Pay an open Checkout Session as the hosted page's Pay button does (with a
        ``promotion_code`` typed in; ``with_card=False``: a trial started without a card)."""
        if session_id not in self.checkout_sessions:
            raise missing("checkout.session", session_id)
        out: list[Obj] = []
        session = self.complete_checkout_now(
            self.checkout_sessions[session_id],
            email,
            out,
            promotion_code=promotion_code,
            with_card=with_card,
        )
        await self.deliver(out)
        return session

    async def update_payment_method(self, customer_id: str) -> str:
        """What the portal's "update payment method" screen does: a new default card for the
        customer, then the open invoices of its past-due subscriptions are paid with it (their
        status becomes ``active``). Returns the new payment method's id."""
        cust = self.get_customer(customer_id)
        out: list[Obj] = []
        pm_id = objects.new_id("pm_")
        settings = cust.setdefault("invoice_settings", {})
        previous = {"invoice_settings": copy.deepcopy(settings)}
        settings["default_payment_method"] = pm_id
        self.record("customer.updated", cust, out, previous)
        for sub in self.customer_subscriptions(customer_id):
            invoice = self.invoices.get(sub["latest_invoice"] or "")
            if sub["status"] not in ("past_due", "unpaid") or not invoice:
                continue
            if invoice["status"] == "open":
                invoice.update(
                    {
                        "status": "paid",
                        "amount_paid": invoice["amount_due"],
                        "amount_remaining": 0,
                    }
                )
                invoice["status_transitions"]["paid_at"] = self.now()
                self.record("invoice.paid", invoice, out)
            before = {"status": sub["status"]}
            sub["status"] = "active"
            self.record("customer.subscription.updated", sub, out, before)
        await self.deliver(out)
        return pm_id

    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Apply Stripe update parameters (form-style strings) and deliver the event."""
        out: list[Obj] = []
        sub = self.update_subscription_now(self.get_subscription(subscription_id), params, out)
        await self.deliver(out)
        return sub

    async def cancel_subscription(self, subscription_id: str) -> dict[str, Any]:
        out: list[Obj] = []
        sub = self.cancel_subscription_now(self.get_subscription(subscription_id), out)
        await self.deliver(out)
        return sub

    # --- webhooks --------------------------------------------------------------------------------

    async def deliver(self, events: list[Obj]) -> None:
        """POST each event to every webhook URL, in order; results go to ``deliveries``."""
        if not self.deliver_webhooks:
            return
        for evt in events:
            for url in list(self.webhook_urls):
                self.deliveries.append((evt["id"], await self._post_event(url, evt)))

    def deliver_later(self, events: list[Obj]) -> None:
        """Deliver in a tracked background task (API calls answer before their webhooks)."""
        if not events or not self.deliver_webhooks or not self.webhook_urls:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_deliveries(self) -> None:
        """Wait until background webhook deliveries (from API calls) are done."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    def sign(self, payload: str, timestamp: int | None = None) -> str:
        """A ``Stripe-Signature`` header for ``payload`` (real time by default)."""
        ts = int(time.time()) if timestamp is None else timestamp
        return str(
            stripe.WebhookSignature.generate_signature_header(
                payload, self.webhook_secret, timestamp=ts
            )
        )

    async def _post_event(self, url: str, evt: Obj) -> int:
        payload = json.dumps(evt)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": self.sign(payload),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        try:
            if self._session is None or self._session.closed:
                async with aiohttp.ClientSession(timeout=WEBHOOK_TIMEOUT) as session:
                    return await self._post(session, url, payload, headers)
            return await self._post(self._session, url, payload, headers)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return 0

    @staticmethod
    async def _post(
        session: aiohttp.ClientSession, url: str, payload: str, headers: dict[str, str]
    ) -> int:
        async with session.post(url, data=payload.encode(), headers=headers) as resp:
            await resp.read()
            return resp.status

    # --- the app ---------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A fresh app serving this double (``app`` is one, built in ``__init__``)."""
        guard = ApiGuard(self)
        app = web.Application(middlewares=[guard.middleware])
        app.cleanup_ctx.append(self._client_session_ctx)
        api = StripeApi(self)
        app.router.add_routes(api.routes())
        app.router.add_routes(self.entitlements.routes(read_params, api.respond))
        app.router.add_routes(HostedPages(self).routes())
        return app

    async def _client_session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(timeout=WEBHOOK_TIMEOUT)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self.wait_deliveries()
            await self._session.close()
            self._session = None

    def state(self) -> dict[str, Any]:
        """Everything, as JSON-able data (``GET /_double/state``)."""
        return {
            "now": self.now(),
            "offset": self._offset,
            "public_url": self.public_url,
            "webhook_urls": self.webhook_urls,
            "deliver_webhooks": self.deliver_webhooks,
            "faults": self.faults.snapshot(),
            "calls": self.calls,
            "customers": self.customers,
            "subscriptions": self.subscriptions,
            "checkout_sessions": self.checkout_sessions,
            "portal_sessions": self.portal_sessions,
            "invoices": self.invoices,
            "prices": self.prices,
            "products": self.products,
            "coupons": self.coupons,
            "promotion_codes": self.promotion_codes,
            "discounts": self.discounts,
            "events": self.events,
            "deliveries": self.deliveries,
        }
