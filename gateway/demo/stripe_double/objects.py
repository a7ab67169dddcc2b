"""Stripe-shaped objects for the Stripe test double.

Pure builders (no I/O, no state): ids, billing-interval arithmetic, and objects with the same
keys as Stripe's own examples (``shared/stripe/fixtures3.json``): customer, product, price, plan,
subscription, subscription item, invoice, checkout session, billing portal session, event.
Fields the double does not model are present with Stripe's "nothing here" value (null, ``[]``,
``{}``, ``false``) so that code reading them sees the real shape.
"""

from __future__ import annotations

import calendar
import copy
import secrets
import string
from datetime import UTC, datetime

from gateway.demo.stripe_double.lists import Obj, list_object

__all__ = [
    "API_VERSION",
    "ENDED_STATUSES",
    "SUBSCRIPTION_STATUSES",
    "Obj",
    "add_interval",
    "address",
    "customer",
    "deleted",
    "event",
    "invoice",
    "invoice_line",
    "item_price_id",
    "new_id",
    "nulls",
    "plan_from_price",
    "price",
    "product",
    "subscription",
    "subscription_item",
]


API_VERSION = "2026-10-28.endive"
SUBSCRIPTION_STATUSES = (
    "active",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "trialing",
    "paused",
)
ENDED_STATUSES = ("canceled", "incomplete_expired")
_ALPHABET = string.ascii_letters + string.digits
_DAY = 86_400


def new_id(prefix: str, length: int = 24) -> str:
    """A Stripe-looking id: ``cus_`` + 14 chars, ``sub_`` + 24 chars, ``cs_test_`` + 58 chars."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def nulls(names: str) -> Obj:
    return dict.fromkeys(names.split())


def add_interval(ts: int, interval: str, count: int = 1) -> int:
    """``ts`` moved by ``count`` billing intervals, calendar-aware like Stripe (Jan 31 + 1 month =
    Feb 28/29)."""
    if interval == "day":
        return ts + count * _DAY
    if interval == "week":
        return ts + count * 7 * _DAY
    months = count * (12 if interval == "year" else 1)
    if interval not in ("month", "year"):
        raise ValueError(f"unknown interval {interval!r}")
    start = datetime.fromtimestamp(ts, UTC)
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def address() -> Obj:
    return nulls("city country line1 line2 postal_code state")


# --- catalog ---------------------------------------------------------------------------------


def product(product_id: str, name: str, created: int, default_price: str | None = None) -> Obj:
    return {
        "id": product_id,
        "object": "product",
        "active": True,
        "created": created,
        "default_price": default_price,
        "description": None,
        "images": [],
        "livemode": False,
        "marketing_features": [],
        "metadata": {},
        "name": name,
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "type": "service",
        "unit_label": None,
        "updated": created,
        "url": None,
    }


def plan(spec: Obj, created: int) -> Obj:
    """A legacy Plan object (Stripe's shape, ``/v1/plans/{id}``) from a partial ``spec`` (at
    least ``id``; ``amount``, ``currency``, ``interval``, ``product`` and ``nickname`` default
    to a monthly USD plan)."""
    amount = int(spec.get("amount", 1900))
    return {
        "id": spec["id"],
        "object": "plan",
        "active": bool(spec.get("active", True)),
        "amount": amount,
        "amount_decimal": str(amount),
        "billing_scheme": "per_unit",
        "created": created,
        "currency": spec.get("currency", "usd"),
        "interval": spec.get("interval", "month"),
        "interval_count": int(spec.get("interval_count", 1)),
        "livemode": False,
        "metadata": dict(spec.get("metadata") or {}),
        "meter": None,
        "nickname": spec.get("nickname"),
        "product": spec.get("product", "prod_demo"),
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": spec.get("trial_period_days"),
        "usage_type": "licensed",
    }


def price(spec: Obj, created: int) -> Obj:
    """A full price object from a partial ``spec`` (at least ``id``; ``unit_amount``,
    ``currency``, ``product``, ``recurring`` and ``nickname`` default to a monthly USD price)."""
    recurring_spec = spec.get("recurring") or {}
    tiered = spec.get("billing_scheme") == "tiered"
    amount = None if tiered else int(spec.get("unit_amount", 1900))
    result: Obj = {
        "id": spec["id"],
        "object": "price",
        "active": bool(spec.get("active", True)),
        "billing_scheme": "tiered" if tiered else "per_unit",
        "created": created,
        "currency": spec.get("currency", "usd"),
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": spec.get("lookup_key"),
        "metadata": dict(spec.get("metadata") or {}),
        "nickname": spec.get("nickname"),
        "product": spec.get("product", "prod_demo"),
        "recurring": {
            "interval": recurring_spec.get("interval", "month"),
            "interval_count": int(recurring_spec.get("interval_count", 1)),
            "meter": recurring_spec.get("meter"),
            "trial_period_days": recurring_spec.get("trial_period_days"),
            "usage_type": recurring_spec.get("usage_type", "licensed"),
        },
        "tax_behavior": "unspecified",
        "tiers_mode": spec.get("tiers_mode") if tiered else None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": amount,
        "unit_amount_decimal": None if amount is None else str(amount),
    }
    return result


def plan_from_price(price_obj: Obj) -> Obj:
    """The legacy Plan view of a recurring price (same id, as Stripe does)."""
    recurring = price_obj["recurring"]
    return {
        "id": price_obj["id"],
        "object": "plan",
        "active": price_obj["active"],
        "amount": price_obj["unit_amount"],
        "amount_decimal": price_obj["unit_amount_decimal"],
        "billing_scheme": price_obj["billing_scheme"],
        "created": price_obj["created"],
        "currency": price_obj["currency"],
        "interval": recurring["interval"],
        "interval_count": recurring["interval_count"],
        "livemode": False,
        "metadata": dict(price_obj["metadata"]),
        "meter": recurring.get("meter"),
        "nickname": price_obj["nickname"],
        "product": price_obj["product"],
        "tiers_mode": price_obj["tiers_mode"],
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": recurring.get("usage_type", "licensed"),
    }


# --- customers -------------------------------------------------------------------------------


def customer(
    customer_id: str, created: int, email: str | None, name: str | None, metadata: Obj
) -> Obj:
    return {
        "id": customer_id,
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": created,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email,
        "invoice_prefix": new_id("", 8).upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": metadata,
        "name": name,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }


def deleted(obj: Obj) -> Obj:
    return {"id": obj["id"], "object": obj["object"], "deleted": True}


# --- subscriptions ---------------------------------------------------------------------------


def subscription_item(
    subscription_id: str,
    price_obj: Obj,
    created: int,
    period: tuple[int, int],
    *,
    legacy_plan: bool = False,
    quantity: int = 1,
) -> Obj:
    item: Obj = {
        "id": new_id("si_", 14),
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": created,
        "current_period_start": period[0],
        "current_period_end": period[1],
        "discounts": [],
        "metadata": {},
        "plan": plan_from_price(price_obj),
        "quantity": quantity,
        "subscription": subscription_id,
        "tax_rates": [],
    }
    if not legacy_plan:
        item["price"] = copy.deepcopy(price_obj)
    if price_obj["recurring"].get("usage_type") == "metered":
        del item["quantity"]  # Stripe: metered items have no quantity (usage is what counts)
    return item


def subscription(
    subscription_id: str,
    customer_id: str,
    items: list[Obj],
    *,
    created: int,
    status: str,
    trial: tuple[int, int] | None,
    currency: str,
) -> Obj:
    return {
        "id": subscription_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": items[0]["current_period_end"] if trial else created,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic"},
        "billing_schedules": [],
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically",
        "created": created,
        "currency": currency,
        "customer": customer_id,
        "customer_account": None,
        "days_until_due": None,
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": list_object(items, f"/v1/subscription_items?subscription={subscription_id}"),
        "latest_invoice": None,
        "livemode": False,
        "managed_payments": None,
        "metadata": {},
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": created,
        "status": status,
        "test_clock": None,
        "transfer_data": None,
        "trial_end": trial[1] if trial else None,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": trial[0] if trial else None,
    }


def item_price_id(item: Obj) -> str:
    """The price id of a subscription item (``plan.id`` on legacy items without ``price``)."""
    price_obj = item.get("price") or item.get("plan") or {}
    return str(price_obj.get("id", ""))


def invoice_line(
    invoice_id: str,
    subscription_id: str,
    item_id: str,
    price_obj: Obj,
    period: tuple[int, int],
    *,
    amount: int,
    quantity: int,
    description: str,
    unit_amount_decimal: str | None,
) -> Obj:
    """An invoice's ``line_item`` for a subscription item (not a proration)."""
    return {
        "id": new_id("il_"),
        "object": "line_item",
        "amount": amount,
        "currency": price_obj["currency"],
        "description": description,
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "invoice": invoice_id,
        "livemode": False,
        "metadata": {},
        "parent": {
            "invoice_item_details": None,
            "type": "subscription_item_details",
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": None,
                "subscription": subscription_id,
                "subscription_item": item_id,
            },
        },
        "period": {"start": period[0], "end": period[1]},
        "pretax_credit_amounts": [],
        "pricing": {
            "price_details": {"price": price_obj["id"], "product": price_obj["product"]},
            "type": "price_details",
            "unit_amount_decimal": unit_amount_decimal,
        },
        "quantity": quantity,
        "quantity_decimal": str(quantity),
        "subscription": subscription_id,
        "subtotal": amount,
        "taxes": [],
    }


def invoice(
    sub: Obj,
    customer_obj: Obj,
    price_obj: Obj,
    *,
    created: int,
    period: tuple[int, int],
    billing_reason: str,
    amount: int,
    paid: bool,
) -> Obj:
    invoice_id = new_id("in_")
    line = invoice_line(
        invoice_id,
        sub["id"],
        sub["items"]["data"][0]["id"],
        price_obj,
        period,
        amount=amount,
        quantity=1,
        description=f"1 x {price_obj['id']}",
        unit_amount_decimal=price_obj["unit_amount_decimal"],
    )
    obj: Obj = nulls(
        "account_name account_tax_ids application automatically_finalizes_at custom_fields "
        "customer_account customer_phone default_payment_method default_source description "
        "due_date ending_balance footer from_invoice hosted_invoice_url invoice_pdf "
        "last_finalization_error latest_revision next_payment_attempt on_behalf_of "
        "receipt_number shipping_cost statement_descriptor test_clock"
    )
    obj.update(
        {
            "id": invoice_id,
            "object": "invoice",
            "account_country": "US",
            "amount_due": amount,
            "amount_overpaid": 0,
            "amount_paid": amount if paid else 0,
            "amount_remaining": 0 if paid else amount,
            "amount_shipping": 0,
            "attempt_count": 1,
            "attempted": True,
            "auto_advance": False,
            "automatic_tax": {
                "disabled_reason": None,
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "billing_reason": billing_reason,
            "collection_method": "charge_automatically",
            "created": created,
            "currency": price_obj["currency"],
            "customer": customer_obj["id"],
            "customer_address": None,
            "customer_email": customer_obj["email"],
            "customer_name": customer_obj["name"],
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_tax_rates": [],
            "discounts": [],
            "effective_at": created,
            "issuer": {"type": "self"},
            "lines": list_object([line], f"/v1/invoices/{invoice_id}/lines"),
            "livemode": False,
            "metadata": {},
            "number": f"{customer_obj['invoice_prefix']}-{new_id('', 4).upper()}",
            "parent": {
                "quote_details": None,
                "type": "subscription_details",
                "subscription_details": {"metadata": {}, "subscription": sub["id"]},
            },
            "payment_settings": {
                "default_mandate": None,
                "payment_method_options": None,
                "payment_method_types": None,
            },
            "period_end": created,
            "period_start": created,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "rendering": None,
            "shipping_details": None,
            "starting_balance": 0,
            "status": "paid" if paid else "open",
            "status_transitions": {
                "finalized_at": created,
                "marked_uncollectible_at": None,
                "paid_at": created if paid else None,
                "voided_at": None,
            },
            "subscription": sub["id"],
            "subtotal": amount,
            "subtotal_excluding_tax": amount,
            "total": amount,
            "total_discount_amounts": [],
            "total_excluding_tax": amount,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": created,
        }
    )
    return obj


def event(
    event_type: str,
    obj: Obj,
    *,
    created: int,
    pending_webhooks: int,
    previous_attributes: Obj | None = None,
) -> Obj:
    data: Obj = {"object": copy.deepcopy(obj)}
    if previous_attributes is not None:
        data["previous_attributes"] = copy.deepcopy(previous_attributes)
    return {
        "id": new_id("evt_"),
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": data,
        "livemode": False,
        "pending_webhooks": pending_webhooks,
        "type": event_type,
        # Filled in by the API handler whose call caused the event (``StripeApi.done``).
        "request": {"id": None, "idempotency_key": None},
    }
