"""Seats in the double's Checkout: ``line_items[0][adjustable_quantity]`` validated as Stripe
does (``enabled`` required; ``minimum`` default 0 and ``maximum`` default 99, at most 999999;
the line's ``quantity`` between them), and the hosted page's quantity field, whose value the Pay
form sells."""

from typing import Any

from gateway.demo.stripe_double.form import ApiError, Params, param_bool, param_dict, param_int
from gateway.demo.stripe_double.markup import esc

__all__ = ["adjustable_quantity", "chosen_quantity", "portal_quantity", "quantity_field"]

_PARAM = "line_items[0][adjustable_quantity]"


def adjustable_quantity(line: Params, quantity: int) -> tuple[int, int] | None:
    """The (minimum, maximum) the buyer may choose, or None when not adjustable."""
    spec = param_dict(line, "adjustable_quantity")
    if not spec:
        return None
    enabled = param_bool(spec, "enabled")
    if enabled is None:
        raise ApiError(
            400, f"Missing required param: {_PARAM}[enabled].", param=f"{_PARAM}[enabled]"
        )
    if not enabled:
        return None
    low = param_int(spec, "minimum", 0)
    high = param_int(spec, "maximum", 99)
    low = 0 if low is None else low
    high = 99 if high is None else high
    if not 0 <= low <= high <= 999999:
        raise ApiError(
            400,
            "adjustable_quantity[minimum] must be at most adjustable_quantity[maximum], "
            "both between 0 and 999999.",
            param=f"{_PARAM}[maximum]",
        )
    if not low <= quantity <= high:
        raise ApiError(
            400,
            f"The quantity ({quantity}) must be between adjustable_quantity[minimum] ({low}) "
            f"and adjustable_quantity[maximum] ({high}).",
            param="line_items[0][quantity]",
        )
    return low, high


def quantity_field(options: dict[str, Any], quantity: int) -> str:
    """The hosted page's quantity input (empty when the line is not adjustable)."""
    bounds = options.get("adjustable_quantity")
    if not bounds:
        return ""
    low, high = bounds
    return (
        '<label for="quantity">Quantity</label>'
        f'<input type="number" name="quantity" id="quantity" min="{esc(str(low))}" '
        f'max="{esc(str(high))}" value="{esc(str(quantity))}" required>'
    )


def chosen_quantity(options: dict[str, Any], typed: str | None, quantity: int) -> int:
    """The quantity the Pay form sells: the typed one within the bounds, else ApiError."""
    bounds = options.get("adjustable_quantity")
    if not bounds or typed is None or typed == "":
        return quantity
    low, high = bounds
    if not typed.isdigit() or not low <= int(typed) <= high:
        raise ApiError(400, f"Choose a quantity from {low} to {high}.", param="quantity")
    return int(typed)


def portal_quantity(item: dict[str, Any], suffix: str) -> str:
    """The portal's quantity input for a subscription's item (``subscription_update`` with
    ``quantity`` among the allowed updates, as a portal configuration enables it)."""
    return (
        f'<input type="number" name="quantity" id="quantity{esc(suffix)}" min="1" '
        f'value="{esc(str(item.get("quantity") or 1))}" required> '
    )
