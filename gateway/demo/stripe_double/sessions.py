"""Checkout Sessions and Billing Portal sessions of the Stripe test double.

Creating them from the API's parameters, validated as Stripe does (a Checkout Session's options:
:func:`~gateway.demo.stripe_double.promotions.checkout_options`; a portal ``flow_data`` flow:
:func:`portal_flow`), in Stripe's shapes; and completing a Checkout Session as its hosted
page's Pay button does (:func:`complete_checkout`).
"""

from __future__ import annotations

from typing import Any

from gateway.demo.stripe_double import invoicing, objects, promotions
from gateway.demo.stripe_double.form import (
    ApiError,
    Params,
    missing,
    one_of,
    param_dict,
    param_int,
    param_list,
    param_required,
    param_str,
)
from gateway.demo.stripe_double.objects import Obj
from gateway.demo.stripe_double.subscriptions import SubscriptionLifecycle

__all__ = [
    "AFTER_COMPLETION",
    "CHECKOUT_LIFETIME",
    "PORTAL_FLOWS",
    "checkout_session",
    "complete_checkout",
    "create_checkout_session",
    "create_portal_session",
    "customer_details",
    "portal_flow",
    "portal_session",
]

#: A Checkout Session expires a day after it was created, as on Stripe.
CHECKOUT_LIFETIME = 86_400


# --- objects ------------------------------------------------------------------------------------


def checkout_session(
    session_id: str,
    *,
    created: int,
    url: str,
    price_obj: Obj,
    quantity: int,
    params: Params,
    customer_id: str | None,
) -> Obj:
    amount = price_obj["unit_amount"] * quantity
    obj: Obj = objects.nulls(
        "after_expiration allow_promotion_codes billing_address_collection client_secret "
        "consent consent_collection currency_conversion custom_text customer_account "
        "customer_creation customer_details discounts integration_identifier invoice "
        "invoice_creation locale managed_payments origin_context payment_intent payment_link "
        "payment_method_collection payment_method_configuration_details permissions "
        "recovered_from saved_payment_method_options setup_intent shipping_address_collection "
        "shipping_cost submit_type subscription ui_mode wallet_options collected_information"
    )
    obj.update(
        {
            "id": session_id,
            "object": "checkout.session",
            "adaptive_pricing": {"enabled": False},
            "amount_subtotal": amount,
            "amount_total": amount,
            "automatic_tax": {
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "cancel_url": param_str(params, "cancel_url"),
            "client_reference_id": param_str(params, "client_reference_id"),
            "created": created,
            "currency": price_obj["currency"],
            "custom_fields": [],
            "customer": customer_id,
            "customer_email": param_str(params, "customer_email"),
            "expires_at": created + CHECKOUT_LIFETIME,
            "livemode": False,
            "metadata": dict(params.get("metadata") or {}),
            "mode": "subscription",
            "payment_method_collection": "always",
            "payment_method_options": {},
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "phone_number_collection": {"enabled": False},
            "shipping_options": [],
            "status": "open",
            "success_url": param_str(params, "success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": url,
        }
    )
    return obj


def customer_details(customer_obj: Obj) -> Obj:
    return {
        "address": objects.address(),
        "business_name": None,
        "email": customer_obj["email"],
        "individual_name": None,
        "name": customer_obj["name"],
        "phone": None,
        "tax_exempt": "none",
        "tax_ids": [],
    }


def portal_session(
    session_id: str, *, created: int, customer_id: str, return_url: str | None, url: str
) -> Obj:
    return {
        "id": session_id,
        "object": "billing_portal.session",
        "configuration": "bpc_double_default",
        "created": created,
        "customer": customer_id,
        "customer_account": None,
        "flow": None,
        "livemode": False,
        "locale": None,
        "on_behalf_of": None,
        "return_url": return_url,
        "url": url,
    }


# --- Checkout -----------------------------------------------------------------------------------


def create_checkout_session(double: SubscriptionLifecycle, params: Params) -> Obj:
    """A Checkout Session (``mode=subscription``, one line item) from the API's parameters,
    validated as Stripe does; its options and line kept for the hosted page."""
    mode = param_required(params, "mode")
    if mode != "subscription":
        raise ApiError(400, "The double supports mode=subscription only.", param="mode")
    param_required(params, "success_url")
    lines = param_list(params, "line_items")
    if not lines or not isinstance(lines[0], dict):
        raise ApiError(
            400,
            "The double supports one licensed line item, then metered ones.",
            param="line_items",
        )
    metered = invoicing.meter_items(double, lines[1:], "line_items", first=1)
    price = double.get_price(
        param_required(lines[0], "price"), param="line_items[0][price]", status=400
    )
    quantity = param_int(lines[0], "quantity", 1) or 1
    customer_id = param_str(params, "customer")
    if customer_id and param_str(params, "customer_email"):
        raise ApiError(
            400,
            "You may only specify one of these parameters: customer, customer_email.",
            param="customer_email",
        )
    if customer_id:
        double.get_customer(customer_id, param="customer", status=400)
    options = promotions.checkout_options(params, double.now())
    update = param_dict(params, "customer_update") or {}
    if options["automatic_tax"]["enabled"] and customer_id and not update.get("address"):
        raise ApiError(
            400,
            "Automatic tax calculation in Checkout requires a valid address on the "
            "Customer. Add a valid address or pass customer_update[address]=auto.",
            param="customer_update[address]",
        )
    session_id = objects.new_id("cs_test_", 58)
    session = checkout_session(
        session_id,
        created=double.now(),
        price_obj=price,
        quantity=quantity,
        url=f"{double.public_base}/checkout/{session_id}",
        params=params,
        customer_id=customer_id or None,
    )
    session["allow_promotion_codes"] = options["allow_promotion_codes"]
    session["payment_method_collection"] = options["payment_method_collection"]
    session["automatic_tax"] = options["automatic_tax"]
    double.checkout_sessions[session_id] = session
    double.checkout_options[session_id] = options
    if metered:
        double.checkout_metered[session_id] = metered
    double.checkout_lines[session_id] = (
        price["id"],
        quantity,
        param_dict(params, "subscription_data") or {},
    )
    return session


def complete_checkout(
    double: SubscriptionLifecycle,
    session: Obj,
    email: str | None,
    out: list[Obj],
    *,
    promotion_code: str | None = None,
    with_card: bool = True,
) -> Obj:
    """What paying on the hosted Checkout page does: the customer (a new one for ``email``
    unless the session has one), the subscription and its first invoice, the session completed
    (events into ``out``). A ``promotion_code`` typed in; ``with_card=False``: no card given
    (refused whenever money is due)."""
    if session["status"] == "complete":
        return session
    if session["status"] != "open":
        raise ApiError(400, "This Checkout Session is no longer active.")
    options = double.checkout_options.get(session["id"]) or promotions.checkout_options(
        {}, double.now()
    )
    price_id, quantity, sub_data = double.checkout_lines[session["id"]]
    # Only what the session asked for (subscription_data), never the price's own days.
    trial_days = param_int(sub_data, "trial_period_days", 0) or 0
    trial_end = options.get("trial_end")
    promo = None
    if promotion_code:
        if not options["allow_promotion_codes"]:
            raise ApiError(400, "Promotion codes are not accepted here.", param="promotion_code")
        promo = promotions.find_code(double.promotion_codes, promotion_code, double.now())
        if promo is None:
            raise ApiError(400, "This code is invalid.", param="promotion_code")
    price = double.get_price(price_id)
    due = 0 if trial_days or trial_end else int(price["unit_amount"]) * quantity
    if promo is not None and due:
        coupon = double.coupons[promo["promotion"]["coupon"]]
        due -= promotions.discount_amount(due, coupon, str(price["currency"]))
    # Stripe: with payment_method_collection=if_required, "Checkout will not collect a
    # payment method when the total due for the session is 0. This may occur if the
    # Checkout Session includes a free trial or a discount"
    # (https://docs.stripe.com/api/checkout/sessions/create#create_checkout_session-payment_method_collection).
    # So the card may be skipped only then; whenever money is due, it is asked for.
    if not with_card and not (due == 0 and options["payment_method_collection"] == "if_required"):
        raise ApiError(400, "Enter your card details.", param="card")
    customer_id = session["customer"]
    if customer_id is None:
        email = email or session["customer_email"]
        if not email or "@" not in email:
            raise ApiError(400, "Enter a valid email address.", param="email")
        customer_id = double.new_customer(email, None, {}, out)["id"]
    sub = double.new_subscription(
        customer_id,
        price_id,
        trial_days=trial_days,
        trial_end=trial_end,
        quantity=quantity,
        metadata=param_dict(sub_data, "metadata"),
        out=out,
        payment_method=objects.new_id("pm_") if with_card else None,
        missing_payment_method=options["missing_payment_method"],
        promotion_code=promo,
        checkout_session=session["id"],
        metered=double.checkout_metered.get(session["id"], ()),
    )
    invoice = double.invoices[sub["latest_invoice"]]
    off = sum(d["amount"] for d in invoice["total_discount_amounts"])
    session.update(
        {
            "status": "complete",
            "payment_status": "no_payment_required" if due == 0 else "paid",
            "customer": customer_id,
            "subscription": sub["id"],
            "invoice": sub["latest_invoice"],
            "url": None,
            "customer_details": customer_details(double.customers[customer_id]),
        }
    )
    if promo is not None:
        coupon_id = promo["promotion"]["coupon"]
        session["discounts"] = [{"coupon": coupon_id, "promotion_code": promo["id"]}]
        session["total_details"]["amount_discount"] = off
        session["amount_total"] = session["amount_subtotal"] - off
    if session["automatic_tax"]["enabled"]:
        session["automatic_tax"]["status"] = "complete"
    double.record("checkout.session.completed", session, out)
    return session


# --- Billing Portal -----------------------------------------------------------------------------


def create_portal_session(double: SubscriptionLifecycle, params: Params) -> Obj:
    """A Billing Portal session for ``customer`` (with a ``flow_data`` flow, validated)."""
    customer_id = param_required(params, "customer")
    double.get_customer(customer_id, param="customer", status=400)
    session_id = objects.new_id("bps_")
    flow = param_dict(params, "flow_data")
    session = portal_session(
        session_id,
        created=double.now(),
        customer_id=customer_id,
        return_url=param_str(params, "return_url"),
        url=f"{double.public_base}/portal/{session_id}",
    )
    if flow is not None:
        session["flow"] = portal_flow(double, customer_id, flow)
    double.portal_sessions[session_id] = session
    return session


#: Stripe's ``flow_data[type]`` values, and the subscription parameter each one needs.
PORTAL_FLOWS = {
    "payment_method_update": None,
    "subscription_cancel": "subscription_cancel",
    "subscription_update": "subscription_update",
    "subscription_update_confirm": "subscription_update_confirm",
}
AFTER_COMPLETION = ("portal_homepage", "redirect", "hosted_confirmation")


def _confirm_items(double: SubscriptionLifecycle, sub: Obj, items: list[Any]) -> list[Obj]:
    """``flow_data[subscription_update_confirm][items]`` checked as Stripe does: exactly one
    item (subscriptions with several are not updatable this way), the subscription's own, and
    an active price to move it to."""
    param = "flow_data[subscription_update_confirm][items]"
    if not items:
        raise ApiError(400, f"Missing required param: {param}.", param=param)
    if len(items) > 1:
        raise ApiError(400, "Only one subscription item may be updated in this flow.", param=param)
    item = items[0] if isinstance(items[0], dict) else {}
    item_id = param_str(item, "id")
    own = [i["id"] for i in sub["items"]["data"]]
    if not item_id:
        raise ApiError(400, f"Missing required param: {param}[0][id].", param=f"{param}[0][id]")
    if item_id not in own:
        raise ApiError(
            400,
            f"The subscription item {item_id} does not belong to subscription {sub['id']}.",
            param=f"{param}[0][id]",
        )
    result: Obj = {"id": item_id, "price": None, "quantity": None}
    price_id = param_str(item, "price")
    if price_id:
        price = double.prices.get(price_id)
        if price is None or not price["active"]:
            raise missing("price", price_id, param=f"{param}[0][price]", status=400)
        result["price"] = price_id
    result["quantity"] = param_int(item, "quantity")
    return [result]


def portal_flow(double: SubscriptionLifecycle, customer_id: str, flow: Params) -> Obj:
    """A portal session's ``flow`` (Stripe's shape) from ``flow_data``, validated as Stripe
    does: a known type, its subscription (the customer's own), an ``after_completion``."""
    kind = one_of(param_required(flow, "type"), PORTAL_FLOWS, "flow_data[type]")
    result: Obj = {
        "type": kind,
        "coupon": None,
        "subscription_cancel": None,
        "subscription_update": None,
        "subscription_update_confirm": None,
    }
    key = PORTAL_FLOWS[kind]
    if key is not None:
        detail = param_dict(flow, key) or {}
        sub_id = param_str(detail, "subscription")
        if not sub_id:
            raise ApiError(
                400,
                f"Missing required param: flow_data[{key}][subscription].",
                param=f"flow_data[{key}][subscription]",
            )
        sub = double.subscriptions.get(sub_id)
        if sub is None or sub["customer"] != customer_id:
            raise missing(
                "subscription", sub_id, param=f"flow_data[{key}][subscription]", status=400
            )
        result[key] = {"subscription": sub_id}
        if kind == "subscription_update_confirm":
            result[key]["items"] = _confirm_items(double, sub, param_list(detail, "items"))
            result[key]["discounts"] = param_list(detail, "discounts")
    after = param_dict(flow, "after_completion") or {}
    after_type = one_of(
        param_str(after, "type") or "portal_homepage",
        AFTER_COMPLETION,
        "flow_data[after_completion][type]",
    )
    redirect = param_dict(after, "redirect") or {}
    if after_type == "redirect" and not param_str(redirect, "return_url"):
        raise ApiError(
            400,
            "Missing required param: flow_data[after_completion][redirect][return_url].",
            param="flow_data[after_completion][redirect][return_url]",
        )
    result["after_completion"] = {
        "type": after_type,
        "redirect": {"return_url": param_str(redirect, "return_url")}
        if after_type == "redirect"
        else None,
        "hosted_confirmation": {"custom_message": None}
        if after_type == "hosted_confirmation"
        else None,
    }
    return result
