"""Features per product and per sold plan: what a customer's subscriptions carry, and which
sold plans include a feature (the upgrade page).

:class:`ProductFeatures` reads a product's ``product_feature`` attachments (Stripe
Entitlements) and keeps them :data:`~gateway.plans.PLAN_CACHE_SECONDS`, shared by every
customer: the entitlement cache asks it for the products of the subscriptions the access rules
accept (:func:`gateway.rules.feature_sources`), so a customer read costs no Stripe call for
features once their products are known. One read per product at a time; when Stripe fails the
last answer is served (a product's features rarely change), and without one the error goes to
the caller (the entitlement cache then serves its stale state).

:class:`FeatureCatalog` answers the upgrade page: a price in ``STRIPE_PRICE_IDS`` includes its
product's features and those ``PRICE_FEATURES`` names for it; when Stripe fails,
``PRICE_FEATURES`` alone answers, so the page still shows what it knows.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.plans import PLAN_CACHE_SECONDS, Plan, PlanCatalog
from gateway.settings import Settings
from gateway.stripe_api import StripeError, StripeRejected

__all__ = ["MAX_PRODUCTS", "FeatureCatalog", "ProductFeatures", "ProductReader", "lookup_keys"]

log = logging.getLogger("gateway.feature_catalog")

#: Products remembered (then the cache starts over): an account sells a handful.
MAX_PRODUCTS = 1024
_NONE: frozenset[str] = frozenset()


def lookup_keys(
    attached: Iterable[Mapping[str, Any]], names: dict[str, str] | None = None
) -> frozenset[str]:
    """The feature lookup keys of ``product_feature`` objects; their names for people
    (Stripe's ``entitlements.feature.name``) go into ``names`` when given."""
    keys: set[str] = set()
    for item in attached:
        feature = item.get("entitlement_feature")
        key = feature.get("lookup_key") if isinstance(feature, Mapping) else None
        if isinstance(key, str) and key:
            keys.add(key)
            name = feature.get("name") if isinstance(feature, Mapping) else None
            if names is not None and isinstance(name, str) and name.strip():
                names[key] = name.strip()
    return frozenset(keys)


#: Reads a product's ``product_feature`` objects from Stripe
#: (:meth:`~gateway.stripe_api.StripeAPI.list_product_features`, through the caller's client).
ProductReader = Callable[[str], Awaitable[list[dict[str, Any]]]]


class ProductFeatures:
    """Feature lookup keys per Stripe product, cached (see the module docstring)."""

    def __init__(self, read: ProductReader, clock: Clock = SYSTEM_CLOCK) -> None:
        self._read = read
        self._time = clock.time
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: lookup key → the feature's name for people, from every product read so far
        self.names: dict[str, str] = {}

    async def get(self, product_id: str) -> frozenset[str]:
        """The product's features. Raises :class:`StripeError` when Stripe fails and nothing
        is known; a product Stripe does not know has none."""
        hit = self._cache.get(product_id)
        if hit is not None and hit[0] > self._time():
            return hit[1]
        lock = self._locks.setdefault(product_id, asyncio.Lock())
        async with lock:  # concurrent misses for one product: one read
            hit = self._cache.get(product_id)
            if hit is not None and hit[0] > self._time():
                return hit[1]
            try:
                keys = lookup_keys(await self._read(product_id), self.names)
            except StripeRejected as exc:
                if not exc.not_found:
                    raise
                keys = _NONE  # deleted or never existed: no features
            except StripeError as exc:
                if hit is None:
                    raise
                log_event(
                    log, "product_features_stale", product=product_id, error=type(exc).__name__
                )
                return hit[1]
            if len(self._cache) >= MAX_PRODUCTS:
                self._cache.clear()
                self._locks = {product_id: lock}
            self._cache[product_id] = (self._time() + PLAN_CACHE_SECONDS, keys)
            return keys


class FeatureCatalog:
    """Features per sold price, and the plans that include a feature."""

    def __init__(self, settings: Settings, plans: PlanCatalog, products: ProductFeatures) -> None:
        self._settings = settings
        self._plans = plans
        self._products = products

    async def features_of(self, price_id: str) -> frozenset[str]:
        """The features of ``price_id`` (its product's and ``PRICE_FEATURES``)."""
        configured = self._settings.price_feature_map.get(price_id, _NONE)
        try:
            product_id = (await self._plans.get(price_id)).product_id
            attached = await self._products.get(product_id) if product_id else _NONE
        except StripeError as exc:
            log_event(log, "product_features_failed", price=price_id, error=type(exc).__name__)
            return configured
        return attached | configured

    async def plans_with(self, feature: str) -> list[Plan]:
        """The sold plans (``STRIPE_PRICE_IDS`` order) that include ``feature``; a plan whose
        name and price Stripe cannot tell now is left out."""
        found: list[Plan] = []
        for price_id in self._settings.stripe_price_ids:
            if feature not in await self.features_of(price_id):
                continue
            try:
                found.append(await self._plans.get(price_id))
            except StripeError as exc:
                log_event(log, "plan_unavailable", price=price_id, error=type(exc).__name__)
        return found

    def name_of(self, feature: str) -> str:
        """The name Stripe gives ``feature`` ("LLM analysis of claims"), as far as its product
        was read; else the lookup key itself."""
        return self._products.names.get(feature, feature)

    async def names(self, features: Iterable[str]) -> list[str]:
        """The names of ``features`` (in that order), reading the sold prices' features first
        (cached; when Stripe fails the lookup keys stand in)."""
        wanted = list(features)
        if any(key not in self._products.names for key in wanted):
            for price_id in self._settings.stripe_price_ids:
                await self.features_of(price_id)
        return [self.name_of(key) for key in wanted]
