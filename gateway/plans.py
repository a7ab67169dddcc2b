"""What the landing page sells: plan name and price read from Stripe, cached in memory."""

import logging
import time
from dataclasses import dataclass

from gateway.logs import log_event
from gateway.settings import Settings
from gateway.stripe_api import StripeAPI, StripeError

log = logging.getLogger("gateway.plans")

PLAN_CACHE_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Plan:
    price_id: str
    name: str
    amount: str  # "$19.00"
    interval: str  # "month"

    @property
    def label(self) -> str:
        return f"{self.amount} / {self.interval}" if self.interval else self.amount


def format_amount(unit_amount: int | None, currency: str) -> str:
    if unit_amount is None:
        return "—"
    symbol = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}.get(currency.lower())
    major = unit_amount if currency.lower() == "jpy" else unit_amount / 100
    text = f"{major:,.0f}" if currency.lower() == "jpy" else f"{major:,.2f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency.upper()}"


def plan_from_price(price: dict[str, object]) -> Plan:
    product = price.get("product")
    name = str(price.get("nickname") or "")
    if isinstance(product, dict):
        name = str(product.get("name") or name)
    recurring = price.get("recurring")
    interval = ""
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
    )


class PlanCatalog:
    """Plans for STRIPE_PRICE_IDS, fetched lazily and kept PLAN_CACHE_SECONDS."""

    def __init__(self, settings: Settings, stripe: StripeAPI) -> None:
        self._settings = settings
        self._stripe = stripe
        self._cache: dict[str, tuple[float, Plan]] = {}

    async def get(self, price_id: str) -> Plan:
        """The plan for ``price_id``. Raises :class:`StripeError` when Stripe cannot tell."""
        hit = self._cache.get(price_id)
        now = time.monotonic()
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

    async def primary(self) -> Plan:
        return await self.get(self._settings.stripe_price_ids[0])

    def name_for(self, price_id: str | None) -> str | None:
        """A cached plan name for ``price_id`` (no I/O), for pages and headers."""
        hit = self._cache.get(price_id or "")
        return hit[1].name if hit else None
