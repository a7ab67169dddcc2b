"""Selling seats in Checkout: a seat price's line item has the chosen quantity and Stripe's
``adjustable_quantity`` (the buyer may still change it on Stripe's page, from 1 to
``MAX_SEATS``); any other price is one unit, as before."""

from typing import Any

from gateway.settings import Settings

__all__ = ["line_item", "seat_quantity"]


def seat_quantity(settings: Settings, price_id: str, typed: str | None) -> int | None:
    """The quantity to buy of ``price_id``: 1 for a price not sold per seat; for a seat price
    the number of seats typed on the landing page (none typed: 1), or None when it is not a
    number from 1 to ``MAX_SEATS``."""
    if price_id not in settings.seat_price_ids:
        return 1
    text = (typed or "1").strip()
    if not text.isdigit() or len(text) > 6:
        return None
    seats = int(text)
    return seats if 1 <= seats <= settings.max_seats else None


def line_item(settings: Settings, price_id: str, quantity: int) -> dict[str, Any]:
    """Checkout's ``line_items[]`` entry for ``price_id``."""
    item: dict[str, Any] = {"price": price_id, "quantity": quantity}
    if price_id in settings.seat_price_ids:
        item["adjustable_quantity"] = {
            "enabled": True,
            "minimum": 1,
            "maximum": settings.max_seats,
        }
    return item
