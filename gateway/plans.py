"""What the landing page sells: every price in ``STRIPE_PRICE_IDS`` read from Stripe (with its
product's name and ``marketing_features``), grouped by product, cached in memory."""

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from babel.numbers import format_currency

from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.settings import Settings
from gateway.stripe_api import StripeAPI, StripeError, StripeRejected

__all__ = [
    "PLAN_CACHE_SECONDS",
    "STARTUP_CHECK_SECONDS",
    "THREE_DECIMAL_CURRENCIES",
    "TRIAL_END_WITHOUT_CARD",
    "ZERO_DECIMAL_CURRENCIES",
    "Offer",
    "Plan",
    "PlanCatalog",
    "checkout_options",
    "format_amount",
    "group_offers",
    "plan_from_price",
]

log = logging.getLogger("gateway.plans")

PLAN_CACHE_SECONDS = 600.0
#: How long startup waits for Stripe to confirm ``STRIPE_PRICE_IDS`` before going on.
STARTUP_CHECK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Plan:
    """One price as the landing page sells it."""

    price_id: str
    name: str  # the product's name, e.g. "PatentLLM Pro"
    amount: str  # "$19.00"
    interval: str  # "month", "3 months"; "" for a one-off price
    product_id: str = ""
    unit: str = ""  # Stripe's recurring.interval: day | week | month | year
    features: tuple[str, ...] = ()  # the product's marketing_features names
    unit_amount: int | None = None  # Stripe's, in the currency's minor unit
    currency: str = ""

    @property
    def label(self) -> str:
        return f"{self.amount} / {self.interval}" if self.interval else self.amount

    @property
    def cadence(self) -> str:
        """``Monthly``, ``Yearly``… (every one interval), else ``Every 3 months``."""
        names = {"day": "Daily", "week": "Weekly", "month": "Monthly", "year": "Yearly"}
        if self.interval == self.unit and self.unit in names:
            return names[self.unit]
        return f"Every {self.interval}" if self.interval else "One-time"


@dataclass(frozen=True, slots=True)
class Offer:
    """A product on the landing page: its name, features and plans (in STRIPE_PRICE_IDS
    order). ``switch``: it has both a monthly and a yearly plan (the page offers a switch)."""

    product_id: str
    name: str
    features: tuple[str, ...]
    plans: tuple[Plan, ...]

    @property
    def switch(self) -> bool:
        units = {p.unit for p in self.plans if p.interval == p.unit}
        return {"month", "year"} <= units

    def switch_class(self, plan: Plan) -> str:
        """``interval-month`` / ``interval-year`` for the plans the switch shows or hides."""
        if self.switch and plan.interval == plan.unit and plan.unit in ("month", "year"):
            return f"interval-{plan.unit}"
        return ""

    def yearly_saving(self, plan: Plan) -> int | None:
        """Whole percent a yearly ``plan`` saves over twelve of this product's monthly plan
        (same currency); ``None`` when that is not a saving or cannot be told."""
        if plan.interval != "year" or not plan.unit_amount:
            return None
        for monthly in self.plans:
            if monthly.interval == "month" and monthly.currency == plan.currency:
                if not monthly.unit_amount:
                    return None
                saving = round(100 - plan.unit_amount * 100 / (12 * monthly.unit_amount))
                return saving if saving > 0 else None
        return None


def group_offers(plans: list[Plan]) -> list[Offer]:
    """``plans`` grouped by product, products in order of their first plan."""
    grouped: dict[str, list[Plan]] = {}
    for plan in plans:
        grouped.setdefault(plan.product_id or plan.price_id, []).append(plan)
    return [
        Offer(key, group[0].name, group[0].features, tuple(group)) for key, group in grouped.items()
    ]


#: Currencies whose Stripe amounts are whole units, not hundredths
#: (https://docs.stripe.com/currencies#zero-decimal).
ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        *("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"),
        *("pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"),
    }
)
#: Currencies whose Stripe amounts are thousandths
#: (https://docs.stripe.com/currencies#three-decimal).
THREE_DECIMAL_CURRENCIES = frozenset(("bhd", "jod", "kwd", "omr", "tnd"))


def format_amount(unit_amount: int | None, currency: str) -> str:
    """A Stripe amount (in the currency's minor unit, as Stripe counts it) for display, e.g.
    ``format_amount(1900, "usd") == "$19.00"``, ``format_amount(1900, "krw") == "₩1,900"``."""
    if unit_amount is None:
        return "—"
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        digits = 0
    elif code in THREE_DECIMAL_CURRENCIES:
        digits = 3
    else:
        digits = 2
    major = Decimal(unit_amount).scaleb(-digits)
    return format_currency(major, code.upper(), locale="en_US")


#: What a trial that ends without a card does (Stripe's
#: ``trial_settings.end_behavior.missing_payment_method``): the subscription is canceled, so
#: the gate's access ends at the trial's end (``rules.access``: ``trial_ended``, then
#: ``canceled`` once the webhook arrives). ``pause`` would keep a paused subscription around
#: that the portal cannot resume; ``cancel`` lets the user simply subscribe again.
TRIAL_END_WITHOUT_CARD = "cancel"


def checkout_options(settings: Settings, *, trial: bool = True) -> dict[str, Any]:
    """The Checkout Session parameters set by ``TRIAL_DAYS``, ``TRIAL_WITHOUT_CARD``,
    ``ALLOW_PROMOTION_CODES`` and ``AUTOMATIC_TAX`` (merged into the gate's own). ``trial``
    False: none of the trial's (the customer may not have one, :mod:`gateway.trials`)."""
    params: dict[str, Any] = {}
    if trial and settings.trial_days > 0:
        params["subscription_data"] = {"trial_period_days": settings.trial_days}
        if settings.trial_without_card:
            params["payment_method_collection"] = "if_required"
            params["subscription_data"]["trial_settings"] = {
                "end_behavior": {"missing_payment_method": TRIAL_END_WITHOUT_CARD}
            }
    if settings.allow_promotion_codes:
        params["allow_promotion_codes"] = True
    if settings.automatic_tax:
        params["automatic_tax"] = {"enabled": True}
    return params


def _features(product: dict[str, object]) -> tuple[str, ...]:
    found = product.get("marketing_features")
    if not isinstance(found, list):
        return ()
    return tuple(
        str(f["name"]) for f in found if isinstance(f, dict) and isinstance(f.get("name"), str)
    )


def plan_from_price(price: dict[str, object]) -> Plan:
    """A :class:`Plan` from a Stripe price (``product`` expanded, or just its id)."""
    product = price.get("product")
    name = str(price.get("nickname") or "")
    product_id = product if isinstance(product, str) else ""
    features: tuple[str, ...] = ()
    if isinstance(product, dict):
        name = str(product.get("name") or name)
        product_id = str(product.get("id") or "")
        features = _features(product)
    recurring = price.get("recurring")
    interval = unit = ""
    if isinstance(recurring, dict):
        count = recurring.get("interval_count") or 1
        unit = str(recurring.get("interval") or "")
        interval = unit if count == 1 else f"{count} {unit}s"
    amount = price.get("unit_amount")
    return Plan(
        price_id=str(price.get("id")),
        name=name or "Subscription",
        amount=format_amount(
            amount if isinstance(amount, int) else None, str(price.get("currency") or "usd")
        ),
        interval=interval,
        product_id=product_id,
        unit=unit,
        features=features,
        unit_amount=amount if isinstance(amount, int) else None,
        currency=str(price.get("currency") or "usd").lower(),
    )


class PlanCatalog:
    """Plans for STRIPE_PRICE_IDS, fetched lazily and kept PLAN_CACHE_SECONDS."""

    def __init__(self, settings: Settings, stripe: StripeAPI, clock: Clock = SYSTEM_CLOCK) -> None:
        self._settings = settings
        self._stripe = stripe
        self._clock = clock
        self._cache: dict[str, tuple[float, Plan]] = {}

    async def get(self, price_id: str) -> Plan:
        """The plan for ``price_id``. Raises :class:`StripeError` when Stripe cannot tell."""
        hit = self._cache.get(price_id)
        now = self._clock.time()
        if hit and hit[0] > now:
            return hit[1]
        try:
            plan = plan_from_price(await self._stripe.get_price(price_id))
        except StripeError as exc:
            if hit:  # stale is better than an error page for a name and a price
                log_event(log, "plan_stale", price=price_id, error=type(exc).__name__)
                return hit[1]
            raise
        self._cache[price_id] = (now + PLAN_CACHE_SECONDS, plan)
        return plan

    async def startup_check(self) -> None:
        """:meth:`check_configured` at startup, given at most :data:`STARTUP_CHECK_SECONDS`
        (then skipped with a warning: Stripe being slow must not hold the gate's start)."""
        try:
            async with asyncio.timeout(STARTUP_CHECK_SECONDS):
                await self.check_configured()
        except TimeoutError:
            log_event(log, "price_check_skipped", level=logging.WARNING, error="timeout")

    async def check_configured(self) -> list[str]:
        """The ``STRIPE_PRICE_IDS`` Stripe definitely does not know (404 for the price and the
        legacy plan), each logged as an ERROR naming the setting. Called at startup. It never
        raises and never stops the gate: a Stripe outage proves nothing (logged as a warning),
        and the landing page tells users that billing is not configured while a price is
        unknown (``gateway check`` fails)."""
        unknown: list[str] = []
        for price_id in self._settings.stripe_price_ids:
            try:
                # Not through the cache: the landing page keeps asking Stripe itself.
                await self._stripe.get_price(price_id)
            except StripeRejected as exc:
                if not exc.not_found:
                    log_event(
                        log,
                        "price_check_failed",
                        level=logging.ERROR,
                        price=price_id,
                        error=str(exc),
                    )
                    continue
                unknown.append(price_id)
                log_event(
                    log,
                    "price_unknown",
                    level=logging.ERROR,
                    setting="STRIPE_PRICE_IDS",
                    price=price_id,
                    problem="Stripe knows no price or plan with this id (configuration error)",
                )
            except StripeError as exc:
                log_event(
                    log,
                    "price_check_skipped",
                    level=logging.WARNING,
                    price=price_id,
                    error=type(exc).__name__,
                )
        return unknown

    async def primary(self) -> Plan:
        return await self.get(self._settings.stripe_price_ids[0])

    async def offers(self) -> list[Offer]:
        """Every price in ``STRIPE_PRICE_IDS``, grouped by product (:func:`group_offers`).
        Raises :class:`StripeError` when Stripe cannot tell one of them."""
        ids = self._settings.stripe_price_ids
        return group_offers(list(await asyncio.gather(*(self.get(pid) for pid in ids))))

    def sells(self, price_id: str) -> bool:
        """Whether ``price_id`` is one the landing page sells (in ``STRIPE_PRICE_IDS``)."""
        return price_id in self._settings.stripe_price_ids

    def name_for(self, price_id: str | None) -> str | None:
        """A cached plan name for ``price_id`` (no I/O), for pages and headers."""
        hit = self._cache.get(price_id or "")
        return hit[1].name if hit else None
