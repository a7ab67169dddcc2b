"""Which sold plans include a feature: for the upgrade page.

A price in ``STRIPE_PRICE_IDS`` includes the features Stripe attaches to its product
(``product_feature`` objects, Stripe Entitlements) and those ``PRICE_FEATURES`` names for it.
Stripe's answer is kept :data:`~gateway.plans.PLAN_CACHE_SECONDS` per price (read through the
process's one :class:`~gateway.stripe_api.GuardedStripe`); when Stripe fails, ``PRICE_FEATURES``
alone answers (and nothing is cached), so the page still shows what it knows.
"""

import logging
from collections.abc import Iterable
from typing import Any

from gateway.logs import log_event
from gateway.model import Clock
from gateway.plans import PLAN_CACHE_SECONDS, Plan, PlanCatalog
from gateway.settings import Settings
from gateway.stripe_api import StripeAPI, StripeError

__all__ = ["FeatureCatalog"]

log = logging.getLogger("gateway.feature_catalog")


def _object_id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


class FeatureCatalog:
    """Features per sold price, and the plans that include a feature."""

    def __init__(
        self, settings: Settings, stripe: StripeAPI, plans: PlanCatalog, clock: Clock
    ) -> None:
        self._settings = settings
        self._stripe = stripe
        self._plans = plans
        self._time = clock.time
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        #: lookup key → the feature's name for people (Stripe's ``entitlements.feature.name``)
        self._names: dict[str, str] = {}

    async def features_of(self, price_id: str) -> frozenset[str]:
        """The features of ``price_id`` (Stripe's product features and ``PRICE_FEATURES``)."""
        configured = self._settings.price_feature_map.get(price_id, frozenset())
        hit = self._cache.get(price_id)
        now = self._time()
        if hit is not None and hit[0] > now:
            return hit[1] | configured
        try:
            price = await self._stripe.get_price(price_id)
            product_id = _object_id(price.get("product"))
            attached = await self._stripe.list_product_features(product_id) if product_id else []
        except StripeError as exc:
            log_event(log, "product_features_failed", price=price_id, error=type(exc).__name__)
            return (hit[1] if hit is not None else frozenset()) | configured
        found: set[str] = set()
        for item in attached:
            feature = item.get("entitlement_feature")
            key = feature.get("lookup_key") if isinstance(feature, dict) else None
            if not isinstance(key, str) or not key:
                continue
            found.add(key)
            name = feature.get("name") if isinstance(feature, dict) else None
            if isinstance(name, str) and name.strip():
                self._names[key] = name.strip()
        keys = frozenset(found)
        self._cache[price_id] = (now + PLAN_CACHE_SECONDS, keys)
        return keys | configured

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
        """The name Stripe gives ``feature`` ("LLM analysis of claims"), as far as it was read
        (:meth:`features_of`); else the lookup key itself."""
        return self._names.get(feature, feature)

    async def names(self, features: Iterable[str]) -> list[str]:
        """The names of ``features`` (in that order), reading the sold prices' features first
        (cached; when Stripe fails the lookup keys stand in)."""
        wanted = list(features)
        if any(key not in self._names for key in wanted):
            for price_id in self._settings.stripe_price_ids:
                await self.features_of(price_id)
        return [self.name_of(key) for key in wanted]
