"""``POST /v1/invoices/create_preview`` for a quantity change of a subscription item (a team's
seats), as Stripe computes it.

Stripe prorates by the second: with ``create_prorations`` a change at ``proration_date`` t in
the period [start, end) adds two proration lines to the upcoming invoice — a credit for the
unused time on the old quantity, ``-unit * old * (end - t) / (end - start)``, and a charge for
the remaining time on the new one, ``unit * new * (end - t) / (end - start)`` — beside the next
period's line at the new quantity. ``always_invoice`` previews the invoice made at once (the
proration lines only); ``none`` the next period's line only. The answer is an invoice object
(``object: invoice``, ``lines.data[]`` line items with
``parent.subscription_item_details.proration``); errors are Stripe's shapes.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.demo.stripe_double import objects
from gateway.demo.stripe_double.form import (
    ApiError,
    Params,
    param_int,
    param_list,
    param_str,
    read_params,
)
from gateway.demo.stripe_double.objects import Obj

if TYPE_CHECKING:
    from gateway.demo.stripe_double.api import StripeApi

__all__ = ["create_preview", "preview"]

_BEHAVIORS = ("create_prorations", "always_invoice", "none")


def _line(base: Obj, amount: int, quantity: int, period: tuple[int, int], proration: bool) -> Obj:
    line = copy.deepcopy(base)
    line["id"] = objects.new_id("il_tmp_")
    line["amount"] = line["subtotal"] = amount
    line["quantity"] = quantity
    line["quantity_decimal"] = str(quantity)
    line["period"] = {"start": period[0], "end": period[1]}
    line["parent"]["subscription_item_details"]["proration"] = proration
    price = line["pricing"]["price_details"]["price"]
    if proration:
        what = "Unused time on" if amount < 0 else "Remaining time on"
        line["description"] = f"{what} {quantity} x {price}"
    else:
        line["description"] = f"{quantity} x {price}"
    return line


def preview(api: StripeApi, params: Params) -> Obj:
    """The preview invoice of ``params`` (``customer``, ``subscription``,
    ``subscription_details[items]``, ``[proration_behavior]``, ``[proration_date]``)."""
    double = api.double
    customer_id = param_str(params, "customer")
    sub_id = param_str(params, "subscription")
    if not sub_id:
        raise ApiError(400, "Missing required param: subscription.", param="subscription")
    sub = double.get_subscription(sub_id)
    if customer_id and sub["customer"] != customer_id:
        raise ApiError(
            400, f"The subscription {sub_id} does not belong to {customer_id}.", param="customer"
        )
    details = params.get("subscription_details") or {}
    if not isinstance(details, dict):
        raise ApiError(400, "Invalid hash", param="subscription_details")
    behavior = param_str(details, "proration_behavior") or "create_prorations"
    if behavior not in _BEHAVIORS:
        raise ApiError(
            400,
            f"Invalid subscription_details[proration_behavior]: must be one of "
            f"{', '.join(_BEHAVIORS)}",
            param="subscription_details[proration_behavior]",
        )
    item = sub["items"]["data"][0]
    old = int(item["quantity"])
    new = old
    for index, spec in enumerate(param_list(details, "items")):
        name = f"subscription_details[items][{index}]"
        if not isinstance(spec, dict) or spec.get("id") != item["id"]:
            raise ApiError(400, f"Invalid {name}[id]: no such subscription item", param=name)
        quantity = param_int(spec, "quantity")
        if quantity is None or quantity < 1:
            raise ApiError(400, "Invalid positive integer", param=f"{name}[quantity]")
        new = quantity
    start, end = double.period(sub)
    at = param_int(details, "proration_date") or double.now()
    if not start <= at <= end:
        raise ApiError(
            400,
            "The proration_date must be within the current period of the subscription.",
            param="subscription_details[proration_date]",
        )
    price = double.get_price(objects.item_price_id(item))
    unit = int(price["unit_amount"])
    customer = double.customers[sub["customer"]]
    invoice = objects.invoice(
        sub,
        customer,
        price,
        created=double.now(),
        period=(start, end),
        billing_reason="upcoming" if behavior != "always_invoice" else "subscription_update",
        amount=0,
        paid=False,
    )
    base = invoice["lines"]["data"][0]
    lines: list[Obj] = []
    if behavior != "none" and new != old:
        share = (end - at) / (end - start) if end > start else 0.0
        lines.append(_line(base, -round(unit * old * share), old, (at, end), True))
        lines.append(_line(base, round(unit * new * share), new, (at, end), True))
    if behavior != "always_invoice":
        interval = price["recurring"]["interval"]
        count = int(price["recurring"].get("interval_count") or 1)
        lines.append(
            _line(base, unit * new, new, (end, objects.add_interval(end, interval, count)), False)
        )
    total = sum(int(line["amount"]) for line in lines)
    invoice["id"] = "upcoming_" + invoice["id"]
    invoice["lines"]["data"] = lines
    invoice["lines"]["url"] = "/v1/invoices/upcoming/lines"
    invoice["number"] = None
    invoice["status"] = "draft"
    invoice["status_transitions"]["finalized_at"] = None
    invoice["webhooks_delivered_at"] = None
    for key in ("amount_due", "amount_remaining", "subtotal", "subtotal_excluding_tax"):
        invoice[key] = max(total, 0) if key.startswith("amount") else total
    invoice["total"] = invoice["total_excluding_tax"] = total
    invoice["amount_paid"] = 0
    return invoice


async def create_preview(api: StripeApi, request: web.Request) -> web.Response:
    """The route's handler."""
    params = await read_params(request)
    return api.respond(preview(api, params), params)
