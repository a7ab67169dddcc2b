"""The Stripe test double's state: its tables (customers, subscriptions, prices, sessions,
events...), its clock, the lookups every part of it uses, the catalog it starts with, and
:meth:`DoubleState.record`, which turns a change into a Stripe Event.

The double's clock is real time plus what ``advance_time`` added (``now()``); every object
timestamp and every event's ``created`` use it. Webhook signatures use real time (the receiver
checks a 300 s tolerance against its own clock).
"""

from __future__ import annotations

import time
from typing import Any

from gateway.demo.stripe_double import invoicing, objects, promotions
from gateway.demo.stripe_double.entitlements import DoubleEntitlements
from gateway.demo.stripe_double.form import Params, missing
from gateway.demo.stripe_double.guard import Faults
from gateway.demo.stripe_double.meters import DoubleMeters
from gateway.demo.stripe_double.objects import Obj
from gateway.demo.stripe_double.promotions import DEFAULT_PROMOTION_CODES
from gateway.demo.stripe_double.webhooks import WebhookSender

__all__ = [
    "BASIC_FEATURES",
    "DEFAULT_API_KEY",
    "DEFAULT_PRICES",
    "DEFAULT_WEBHOOK_SECRET",
    "PRO_FEATURES",
    "DoubleState",
]

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


class DoubleState:
    """Tables, clock and lookups of one double (see the module docstring)."""

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
        #: Checkout session id → the metered prices of its line items after the first
        self.checkout_metered: dict[str, tuple[str, ...]] = {}
        self.coupons: dict[str, dict[str, Any]] = {}
        self.promotion_codes: dict[str, dict[str, Any]] = {}
        self.discounts: dict[str, dict[str, Any]] = {}
        #: Checkout options per session (``promotions.checkout_options``).
        self.checkout_options: dict[str, Obj] = {}
        self._offset = 0
        #: price id → its ``tiers`` (Stripe's shape; tiered prices only)
        self.price_tiers: dict[str, list[Obj]] = {}
        self.meters = DoubleMeters(self.customers, self.now)
        self._seed_catalog(prices if prices is not None else DEFAULT_PRICES)
        self.entitlements = DoubleEntitlements(self.products, self.subscriptions, self.now)
        for spec in DEFAULT_PROMOTION_CODES if promotion_codes is None else promotion_codes:
            self.add_promotion_code(**spec)
        self.default_price_id: str = next(iter(self.prices))
        self.webhooks = WebhookSender(self)

    # --- the clock and lookups --------------------------------------------------------------------

    def now(self) -> int:
        """Unix seconds on the double's clock: real time plus what ``advance_time`` added."""
        return int(time.time()) + self._offset

    def _seed_catalog(self, specs: list[Obj]) -> None:
        created = self.now() - 30 * 86_400
        for spec in specs:
            price = objects.price(spec, created)
            self.prices[price["id"]] = price
            if spec.get("tiers"):
                self.price_tiers[price["id"]] = invoicing.tiers(spec["tiers"])
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

    # --- events ------------------------------------------------------------------------------

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
            "meters": self.meters.meters,
            "meter_events": self.meters.customer_events(None),
            "events": self.events,
            "deliveries": self.deliveries,
        }
