"""The Stripe double's Entitlements: features, product features and active entitlements.

In Stripe's shapes (``entitlements.feature``, ``product_feature``,
``entitlements.active_entitlement``, ``entitlements.active_entitlement_summary``):

- features are attached to products with :meth:`DoubleEntitlements.attach`, or all at once
  with :meth:`DoubleEntitlements.seed` from :data:`DEFAULT_PRODUCT_FEATURES` (lookup keys per
  product: ``search`` on both demo products, ``analysis`` and ``export`` on Pro only; the demo
  seeds its own, with ``analysis`` on Basic too: ``gateway.demo.runner``). A double without
  attachments never changes anyone's entitlements, so it sends no summary events (the double's
  own tests count its events exactly);
- a customer's active entitlements are the union over *all* their subscriptions that have not
  ended (every status but ``canceled``, ``incomplete`` and ``incomplete_expired``: Stripe keeps
  a ``paused`` or ``past_due`` subscription's entitlements), whatever the price, of their items'
  products (``price.product``, or ``plan.product`` for a legacy item); every subscription event
  re-computes them, and a change records the ``entitlements.active_entitlement_summary.updated``
  event (delivered with the subscription's);
- ``GET /v1/entitlements/active_entitlements?customer=``, ``GET /v1/entitlements/features``
  and ``GET /v1/products/{id}/features`` answer in Stripe's list shape.

The double wires this in with :meth:`DoubleEntitlements.after_event` (called by ``record``) and
:meth:`DoubleEntitlements.routes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.demo.stripe_double import objects
from gateway.demo.stripe_double.form import ApiError, missing, param_str, read_params
from gateway.demo.stripe_double.objects import Obj

if TYPE_CHECKING:
    from gateway.demo.stripe_double.api import StripeApi

__all__ = ["DEFAULT_PRODUCT_FEATURES", "FEATURE_NAMES", "SUMMARY_EVENT", "DoubleEntitlements"]

SUMMARY_EVENT = "entitlements.active_entitlement_summary.updated"
#: Feature lookup keys per product id (the demo catalog; products the double lacks are skipped).
DEFAULT_PRODUCT_FEATURES: Mapping[str, tuple[str, ...]] = {
    "prod_demo": ("search", "analysis", "export"),
    "prod_basic": ("search",),
}
FEATURE_NAMES = {
    "search": "Patent search",
    "analysis": "LLM analysis of claims",
    "export": "Export to PDF and CSV",
}
#: Subscription statuses whose products count for active entitlements (not ended).
_ENTITLING = ("active", "trialing", "past_due", "unpaid", "paused")

# The double's own ``record(event_type, obj, out)``.
Recorder = Callable[[str, Obj, "list[Obj] | None"], Obj]


class DoubleEntitlements:
    """Entitlements state of one double (see the module docstring)."""

    def __init__(
        self,
        products: Mapping[str, Obj],
        subscriptions: Mapping[str, Obj],
        now: Callable[[], int],
    ) -> None:
        self._products = products
        self._subscriptions = subscriptions
        self._now = now
        #: feature id → ``entitlements.feature``
        self.features: dict[str, Obj] = {}
        #: product id → its ``product_feature`` attachments
        self.product_features: dict[str, list[Obj]] = {}
        #: customer id → the lookup keys of their active entitlements (as last summarized)
        self.active: dict[str, tuple[str, ...]] = {}
        self._ids: dict[tuple[str, str], str] = {}  # (customer, feature id) → entitlement id

    def seed(self, product_features: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """Attach features per product (default :data:`DEFAULT_PRODUCT_FEATURES`); products
        the double does not sell are skipped."""
        specs = DEFAULT_PRODUCT_FEATURES if product_features is None else product_features
        for product_id, keys in specs.items():
            if product_id in self._products:
                for key in keys:
                    self.attach(product_id, key)

    def feature(self, lookup_key: str, name: str | None = None) -> Obj:
        """The feature with ``lookup_key`` (created on first use)."""
        for feat in self.features.values():
            if feat["lookup_key"] == lookup_key:
                return feat
        feat = {
            "id": objects.new_id("feat_test_", 24),
            "object": "entitlements.feature",
            "active": True,
            "livemode": False,
            "lookup_key": lookup_key,
            "metadata": {},
            "name": name or FEATURE_NAMES.get(lookup_key, lookup_key),
        }
        self.features[feat["id"]] = feat
        return feat

    def attach(self, product_id: str, lookup_key: str) -> Obj:
        """Attach the feature to the product (a ``product_feature``)."""
        attachment = {
            "id": objects.new_id("prodft_", 24),
            "object": "product_feature",
            "entitlement_feature": self.feature(lookup_key),
            "livemode": False,
        }
        self.product_features.setdefault(product_id, []).append(attachment)
        return attachment

    def detach(self, product_id: str, lookup_key: str) -> None:
        """Remove the feature from the product (active entitlements follow at the next
        subscription event of each customer)."""
        kept = [
            a
            for a in self.product_features.get(product_id, [])
            if a["entitlement_feature"]["lookup_key"] != lookup_key
        ]
        self.product_features[product_id] = kept

    # --- active entitlements ----------------------------------------------------------------

    def active_entitlements(self, customer_id: str) -> list[Obj]:
        """The customer's active entitlements now (one per feature), in Stripe's shape."""
        out: dict[str, Obj] = {}
        for sub in self._subscriptions.values():
            if sub.get("customer") != customer_id or sub.get("status") not in _ENTITLING:
                continue
            for item in sub.get("items", {}).get("data", []):
                price = item.get("price") or item.get("plan")  # a legacy item has a plan only
                product = price.get("product") if isinstance(price, dict) else None
                if isinstance(product, dict):
                    product = product.get("id")
                for attachment in self.product_features.get(str(product), []):
                    feat = attachment["entitlement_feature"]
                    out.setdefault(feat["id"], self._entitlement(customer_id, feat))
        return sorted(out.values(), key=lambda e: str(e["lookup_key"]))

    def _entitlement(self, customer_id: str, feat: Obj) -> Obj:
        ent_id = self._ids.setdefault((customer_id, feat["id"]), objects.new_id("ent_test_", 24))
        return {
            "id": ent_id,
            "object": "entitlements.active_entitlement",
            "feature": feat["id"],
            "livemode": False,
            "lookup_key": feat["lookup_key"],
        }

    def summary(self, customer_id: str) -> Obj:
        """The ``entitlements.active_entitlement_summary`` of the customer."""
        data = [
            {**e, "feature": self.features[e["feature"]]}
            for e in self.active_entitlements(customer_id)
        ]
        return {
            "object": "entitlements.active_entitlement_summary",
            "customer": customer_id,
            "livemode": False,
            "entitlements": {
                "object": "list",
                "data": data,
                "has_more": False,
                "url": f"/v1/customer/{customer_id}/entitlements",
            },
        }

    def after_event(
        self, event_type: str, obj: Obj, out: list[Obj] | None, record: Recorder
    ) -> None:
        """After a recorded event: a subscription event whose customer's active entitlements
        changed records the summary event too."""
        if not event_type.startswith("customer.subscription."):
            return
        customer_id = obj.get("customer")
        if not isinstance(customer_id, str):
            return
        keys = tuple(e["lookup_key"] for e in self.active_entitlements(customer_id))
        if keys == self.active.get(customer_id, ()):
            return
        self.active[customer_id] = keys
        record(SUMMARY_EVENT, self.summary(customer_id), out)

    # --- HTTP ---------------------------------------------------------------------------------

    def routes(self, api: StripeApi) -> list[web.RouteDef]:
        """The ``/v1`` routes, answering through the double's ``api``."""

        async def active(request: web.Request) -> web.Response:
            params = await read_params(request)
            customer = param_str(params, "customer")
            if customer is None:
                raise ApiError(400, "Missing required param: customer.", param="customer")
            items = self.active_entitlements(customer)
            return api.listing(items, params, "/v1/entitlements/active_entitlements")

        async def product_features(request: web.Request) -> web.Response:
            params = await read_params(request)
            product_id = request.match_info["id"]
            if product_id not in self._products:
                raise missing("product", product_id)
            items = list(reversed(self.product_features.get(product_id, [])))
            return api.listing(items, params, f"/v1/products/{product_id}/features")

        return [
            web.get("/v1/entitlements/active_entitlements", active),
            api.listing_route("/v1/entitlements/features", lambda _double: self.features),
            web.get("/v1/products/{id}/features", product_features),
        ]
