"""``CHECKOUT_METERED_PRICES``: the metered prices Checkout adds beside a sold price.

A plan with overage is two prices on one subscription: the licensed one the landing page sells
(``STRIPE_PRICE_IDS``) and a metered one on a Stripe Meter (``recurring.usage_type=metered``),
billed in arrears from the meter events. Checkout must subscribe to both, so the gate adds each
metered price named for the chosen price as one more line item, without ``quantity`` (Stripe
refuses a quantity on a metered price).
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.setting_items import split_items

__all__ = ["checkout_line_items", "parse_metered_prices"]

_PRICE = re.compile(r"[A-Za-z0-9_\-]{1,255}")


def parse_metered_prices(items: Iterable[str]) -> Mapping[str, tuple[str, ...]]:
    """``PRICE_ID=METERED_PRICE_ID[|METERED_PRICE_ID…]`` items → {price id: metered price ids};
    a bad item raises :class:`ValueError`. A price named twice gets the prices of both."""
    out: dict[str, tuple[str, ...]] = {}
    for item, price, sep, names in split_items(items):
        metered = tuple(n.strip() for n in names.split("|"))
        if not sep or not _PRICE.fullmatch(price) or not all(map(_PRICE.fullmatch, metered)):
            raise ValueError(f"{item!r}: expected price_id=metered_price_id|metered_price_id")
        if price in metered:
            raise ValueError(f"{item!r}: a price cannot be its own metered price")
        out[price] = out.get(price, ()) + tuple(m for m in metered if m not in out.get(price, ()))
    return out


def checkout_line_items(
    price_id: str, metered: Mapping[str, tuple[str, ...]]
) -> list[dict[str, Any]]:
    """Checkout's ``line_items`` for ``price_id``: it (quantity 1), then its metered prices."""
    return [{"price": price_id, "quantity": 1}, *({"price": m} for m in metered.get(price_id, ()))]
