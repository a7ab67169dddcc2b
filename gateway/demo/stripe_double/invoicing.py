"""Usage on the Stripe test double's invoices: tiered prices and the metered lines of a
renewal invoice.

A metered price (``recurring.usage_type=metered`` on a ``recurring.meter``) bills in arrears:
the invoice a renewal makes carries, for each metered item, the meter's aggregated value for
the customer over the period that just ended, priced by the price's tiers (``graduated``: each
tier prices the units that fall in it, plus its ``flat_amount`` once it is reached; ``volume``:
the tier of the total prices every unit) or by its ``unit_amount`` (``per_unit``). One line per
tier reached (graduated), as Stripe itemizes them; the invoice's totals grow by the lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.demo.stripe_double import objects
from gateway.demo.stripe_double.form import ApiError
from gateway.demo.stripe_double.objects import Obj

if TYPE_CHECKING:
    from gateway.demo.stripe_double.subscriptions import SubscriptionLifecycle

__all__ = ["add_usage_lines", "meter_items", "price_usage", "tiers"]


def tiers(specs: list[Any]) -> list[Obj]:
    """Tiers in Stripe's shape (``up_to`` an int or None for "inf"; amounts in cents), sorted;
    the last must be unbounded, as Stripe requires."""
    result: list[Obj] = []
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ApiError(400, f"Invalid hash: tiers[{index}]", param=f"tiers[{index}]")
        up_to = spec.get("up_to")
        unit = spec.get("unit_amount")
        flat = spec.get("flat_amount")
        result.append(
            {
                "flat_amount": None if flat is None else int(flat),
                "flat_amount_decimal": None if flat is None else str(int(flat)),
                "unit_amount": None if unit is None else int(unit),
                "unit_amount_decimal": None if unit is None else str(int(unit)),
                "up_to": None if up_to in (None, "inf") else int(up_to),
            }
        )
    bounded = [t for t in result if t["up_to"] is not None]
    if len(bounded) != len(result) - 1 or result[-1]["up_to"] is not None:
        raise ApiError(400, "The last tier must have up_to=inf.", param="tiers")
    if [t["up_to"] for t in bounded] != sorted({t["up_to"] for t in bounded}):
        raise ApiError(400, "Tiers must be in increasing order of up_to.", param="tiers")
    return result


def price_usage(price_obj: Obj, tier_list: list[Obj], quantity: int) -> list[tuple[int, int, int]]:
    """``(tier index, units, amount)`` for ``quantity`` units of the price (index -1 for a
    ``per_unit`` price); graduated tiers give one entry per tier reached."""
    if price_obj["billing_scheme"] != "tiered":
        return [(-1, quantity, quantity * int(price_obj["unit_amount"] or 0))]
    if price_obj["tiers_mode"] == "volume":
        for index, tier in enumerate(tier_list):
            if tier["up_to"] is None or quantity <= tier["up_to"]:
                amount = quantity * (tier["unit_amount"] or 0) + (tier["flat_amount"] or 0)
                return [(index, quantity, amount)]
    result: list[tuple[int, int, int]] = []
    below = 0
    for index, tier in enumerate(tier_list):
        if quantity <= below and index > 0:
            break
        top = quantity if tier["up_to"] is None else min(quantity, tier["up_to"])
        units = max(top - below, 0)
        amount = units * (tier["unit_amount"] or 0) + ((tier["flat_amount"] or 0) if units else 0)
        result.append((index, units, amount))
        if tier["up_to"] is None:
            break
        below = tier["up_to"]
    return result


def _line(invoice: Obj, sub: Obj, item: Obj, price_obj: Obj, period: tuple[int, int]) -> Obj:
    return objects.invoice_line(
        invoice["id"],
        sub["id"],
        item["id"],
        price_obj,
        period,
        amount=0,
        quantity=0,
        description="",
        unit_amount_decimal=None,
    )


def add_usage_lines(
    invoice: Obj,
    sub: Obj,
    item: Obj,
    price_obj: Obj,
    tier_list: list[Obj],
    quantity: int,
    period: tuple[int, int],
) -> int:
    """Add the metered ``item``'s lines for ``quantity`` units over ``period`` to ``invoice``
    (totals updated); the amount added."""
    added = 0
    name = price_obj.get("nickname") or price_obj["id"]
    for index, units, amount in price_usage(price_obj, tier_list, quantity):
        line = _line(invoice, sub, item, price_obj, period)
        if index < 0:
            line["description"] = f"{units} x {name}"
            line["pricing"]["unit_amount_decimal"] = price_obj["unit_amount_decimal"]
        else:
            tier = tier_list[index]
            line["description"] = f"{name} (Tier {index + 1})"
            unit = tier["unit_amount"]
            line["pricing"]["unit_amount_decimal"] = None if unit is None else str(unit)
        line.update(
            {
                "amount": amount,
                "subtotal": amount,
                "quantity": units,
                "quantity_decimal": str(units),
            }
        )
        invoice["lines"]["data"].append(line)
        added += amount
    paid = invoice["status"] == "paid"
    for key in ("subtotal", "subtotal_excluding_tax", "total", "total_excluding_tax"):
        invoice[key] = int(invoice[key]) + added
    invoice["amount_due"] = int(invoice["amount_due"]) + added
    invoice["amount_paid"] = invoice["amount_due"] if paid else 0
    invoice["amount_remaining"] = 0 if paid else invoice["amount_due"]
    return added


def meter_items(
    double: SubscriptionLifecycle, items: list[Any], param: str, *, first: int
) -> tuple[str, ...]:
    """The price ids of the metered items (``param[first + i]``) beside the licensed one, each
    checked as Stripe does: a metered price, no ``quantity``."""
    result = []
    for offset, spec in enumerate(items):
        where = f"{param}[{first + offset}]"
        if not isinstance(spec, dict) or not spec.get("price"):
            raise ApiError(400, f"Missing required param: {where}[price].", param=f"{where}[price]")
        double.metered_price(str(spec["price"]), where)
        if spec.get("quantity") not in (None, ""):
            raise ApiError(
                400,
                "Quantity should not be specified where usage_type is `metered`. "
                f"Remove quantity from `{where}`.",
                param=f"{where}[quantity]",
            )
        result.append(str(spec["price"]))
    return tuple(result)
