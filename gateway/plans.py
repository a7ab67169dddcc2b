"""What the landing page sells: plan name and price read from Stripe, cached in memory."""

import asyncio
import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from babel.numbers import format_currency

from gateway.logs import log_event
from gateway.settings import Settings
from gateway.stripe_api import StripeAPI, StripeError, StripeRejected

log = logging.getLogger("gateway.plans")

PLAN_CACHE_SECONDS = 600.0
#: How long startup waits for Stripe to confirm ``STRIPE_PRICE_IDS`` before going on.
STARTUP_CHECK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Plan:
    price_id: str
    name: str
    amount: str  # "$19.00"
    interval: str  # "month"

    @property
    def label(self) -> str:
        return f"{self.amount} / {self.interval}" if self.interval else self.amount


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

    def name_for(self, price_id: str | None) -> str | None:
        """A cached plan name for ``price_id`` (no I/O), for pages and headers."""
        hit = self._cache.get(price_id or "")
        return hit[1].name if hit else None
