"""Coupons, promotion codes and discounts of the Stripe test double, and the Checkout options
it validates (trials, card collection, promotion codes, automatic tax).

Pure builders and checks (no state): objects in the shapes of ``shared/stripe/fixtures3.json``
(``coupon``, ``promotion_code``, ``discount``), the amount a coupon takes off, and an invoice
with a discount applied (``discounts``, ``total_discount_amounts``, lower ``total``).
"""

from __future__ import annotations

from gateway.demo.stripe_double.form import (
    ApiError,
    Params,
    one_of,
    param_bool,
    param_dict,
    param_int,
    param_str,
)
from gateway.demo.stripe_double.objects import Obj, new_id

__all__ = [
    "DEFAULT_PROMOTION_CODES",
    "MISSING_PAYMENT_METHOD",
    "apply_discount",
    "checkout_options",
    "coupon",
    "discount",
    "discount_amount",
    "find_code",
    "promotion_code",
    "redeemed",
]

#: What the demo sells with (``ALLOW_PROMOTION_CODES=true`` on the gate): 20 % off once.
DEFAULT_PROMOTION_CODES: list[Obj] = [
    {"code": "WELCOME20", "percent_off": 20, "duration": "once", "name": "20% off"},
]
#: Stripe's ``trial_settings.end_behavior.missing_payment_method`` values.
MISSING_PAYMENT_METHOD = ("cancel", "create_invoice", "pause")
PAYMENT_METHOD_COLLECTION = ("always", "if_required")
MAX_TRIAL_DAYS = 730
#: Stripe: ``subscription_data.trial_end`` "has to be at least 48 hours in the future"
#: (https://docs.stripe.com/api/checkout/sessions/create).
MIN_TRIAL_END = 48 * 3600


def coupon(spec: Obj, created: int) -> Obj:
    """A coupon from ``spec``: ``percent_off`` or ``amount_off`` (+ ``currency``),
    ``duration`` (once | repeating | forever), ``duration_in_months``, ``name``."""
    percent, amount = spec.get("percent_off"), spec.get("amount_off")
    if (percent is None) == (amount is None):
        raise ValueError("a coupon takes exactly one of percent_off and amount_off")
    duration = str(spec.get("duration", "once"))
    if duration not in ("once", "repeating", "forever"):
        raise ValueError(f"unknown coupon duration {duration!r}")
    return {
        "amount_off": None if amount is None else int(amount),
        "created": created,
        "currency": str(spec.get("currency", "usd")) if amount is not None else None,
        "duration": duration,
        "duration_in_months": spec.get("duration_in_months") if duration == "repeating" else None,
        "id": str(spec.get("coupon_id") or new_id("", 8).upper()),
        "livemode": False,
        "max_redemptions": None,
        "metadata": {},
        "name": spec.get("name"),
        "object": "coupon",
        "percent_off": None if percent is None else float(percent),
        "redeem_by": None,
        "times_redeemed": 0,
        "valid": True,
    }


def promotion_code(spec: Obj, coupon_obj: Obj, created: int) -> Obj:
    """A promotion code (the customer-facing ``code``) for ``coupon_obj``."""
    return {
        "active": bool(spec.get("active", True)),
        "code": str(spec["code"]),
        "created": created,
        "customer": None,
        "expires_at": spec.get("expires_at"),
        "id": new_id("promo_"),
        "livemode": False,
        "max_redemptions": spec.get("max_redemptions"),
        "metadata": {},
        "object": "promotion_code",
        "restrictions": {
            "first_time_transaction": False,
            "minimum_amount": None,
            "minimum_amount_currency": None,
        },
        "times_redeemed": 0,
        "promotion": {"coupon": coupon_obj["id"], "type": "coupon"},
        "customer_account": None,
    }


def find_code(promotion_codes: dict[str, Obj], code: str, now: int) -> Obj | None:
    """The redeemable promotion code a customer typed (case-insensitive, as on Stripe):
    active, not expired, under its redemption limit. ``None`` otherwise."""
    wanted = code.strip().upper()
    for promo in promotion_codes.values():
        if promo["code"].upper() != wanted or not promo["active"]:
            continue
        if promo["expires_at"] is not None and promo["expires_at"] <= now:
            continue
        limit = promo["max_redemptions"]
        if limit is not None and promo["times_redeemed"] >= limit:
            continue
        return promo
    return None


def discount_amount(amount: int, coupon_obj: Obj, currency: str) -> int:
    """What ``coupon_obj`` takes off ``amount`` (never more than the amount)."""
    if coupon_obj["percent_off"] is not None:
        return min(amount, round(amount * float(coupon_obj["percent_off"]) / 100))
    if coupon_obj["currency"] != currency:
        return 0
    return min(amount, int(coupon_obj["amount_off"]))


def discount(
    coupon_obj: Obj,
    promo: Obj | None,
    *,
    start: int,
    customer_id: str,
    subscription_id: str | None,
    checkout_session: str | None,
) -> Obj:
    """A ``discount`` object: a coupon applied to a subscription."""
    months = coupon_obj["duration_in_months"]
    return {
        "checkout_session": checkout_session,
        "customer": customer_id,
        "end": start + int(months) * 30 * 86_400 if months else None,
        "id": new_id("di_"),
        "invoice": None,
        "invoice_item": None,
        "object": "discount",
        "promotion_code": promo["id"] if promo else None,
        "start": start,
        "subscription": subscription_id,
        "subscription_item": None,
        "source": {"coupon": coupon_obj["id"], "type": "coupon"},
        "customer_account": None,
    }


def apply_discount(invoice: Obj, discount_obj: Obj, coupon_obj: Obj) -> int:
    """Take ``coupon_obj`` off ``invoice`` (its first line and totals); the amount taken."""
    off = discount_amount(int(invoice["subtotal"]), coupon_obj, str(invoice["currency"]))
    total = int(invoice["subtotal"]) - off
    paid = invoice["status"] == "paid"
    line = invoice["lines"]["data"][0]
    line["discounts"] = [discount_obj["id"]]
    line["discount_amounts"] = [{"amount": off, "discount": discount_obj["id"]}]
    invoice.update(
        {
            "discounts": [discount_obj["id"]],
            "total_discount_amounts": [{"amount": off, "discount": discount_obj["id"]}],
            "total": total,
            "total_excluding_tax": total,
            "amount_due": total,
            "amount_paid": total if paid else 0,
            "amount_remaining": 0 if paid else total,
        }
    )
    return off


def checkout_options(params: Params, now: int) -> Obj:
    """Validate the Checkout Session options the gate sets, as Stripe does; their values as
    the session shows them (``allow_promotion_codes``, ``payment_method_collection``,
    ``automatic_tax``) plus ``missing_payment_method`` (the trial's end behaviour) and the
    trial asked for (``trial_period_days``, ``trial_end``; 0 / None: no trial).

    As on Stripe (https://docs.stripe.com/payments/checkout/free-trials): a session starts a
    trial only with ``subscription_data.trial_period_days`` or ``subscription_data.trial_end``
    (a price's own ``recurring.trial_period_days`` is not applied by Checkout)."""
    sub_data = param_dict(params, "subscription_data") or {}
    trial_days = param_int(sub_data, "trial_period_days")
    if trial_days is not None and not 1 <= trial_days <= MAX_TRIAL_DAYS:
        raise ApiError(
            400,
            f"subscription_data[trial_period_days] must be between 1 and {MAX_TRIAL_DAYS}.",
            param="subscription_data[trial_period_days]",
        )
    trial_end = param_int(sub_data, "trial_end")
    if trial_end is not None and trial_days is not None:
        raise ApiError(
            400,
            "You may only specify one of these parameters: subscription_data[trial_end], "
            "subscription_data[trial_period_days].",
            param="subscription_data[trial_end]",
        )
    if trial_end is not None and trial_end < now + MIN_TRIAL_END:
        raise ApiError(
            400,
            "subscription_data[trial_end] must be at least 48 hours in the future.",
            param="subscription_data[trial_end]",
        )
    collection = one_of(
        param_str(params, "payment_method_collection") or "always",
        PAYMENT_METHOD_COLLECTION,
        "payment_method_collection",
    )
    promotion_codes = param_bool(params, "allow_promotion_codes")
    if promotion_codes and params.get("discounts"):
        raise ApiError(
            400,
            "You may only specify one of these parameters: allow_promotion_codes, discounts.",
            param="allow_promotion_codes",
        )
    tax = param_dict(params, "automatic_tax")
    tax_enabled = bool(tax is not None and param_bool(tax, "enabled"))
    if tax is not None and param_bool(tax, "enabled") is None:
        raise ApiError(
            400, "Missing required param: automatic_tax[enabled].", param="automatic_tax[enabled]"
        )
    end = param_dict(param_dict(sub_data, "trial_settings") or {}, "end_behavior") or {}
    missing_pm = one_of(
        param_str(end, "missing_payment_method") or "create_invoice",
        MISSING_PAYMENT_METHOD,
        "subscription_data[trial_settings][end_behavior][missing_payment_method]",
        label="missing_payment_method",
    )
    return {
        "allow_promotion_codes": bool(promotion_codes),
        "payment_method_collection": collection,
        "automatic_tax": {
            "enabled": tax_enabled,
            "liability": {"type": "self"} if tax_enabled else None,
            "provider": "stripe" if tax_enabled else None,
            "status": "requires_location_inputs" if tax_enabled else None,
        },
        "missing_payment_method": missing_pm,
        "trial_period_days": trial_days or 0,
        "trial_end": trial_end,
    }


def redeemed(promo: Obj, coupon_obj: Obj) -> None:
    """Count one redemption of ``promo`` (and its coupon)."""
    promo["times_redeemed"] += 1
    coupon_obj["times_redeemed"] += 1
