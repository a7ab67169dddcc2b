"""``GET {prefix}/upgrade?feature=…&next=…``: the page a subscriber lands on when a path needs a
feature their plan lacks (``FEATURE_RULES``; the gate sends navigations here, APIs get its URL
as ``upgrade_url``). It names the sold plans that include the feature
(:class:`gateway.feature_catalog.FeatureCatalog`): Checkout for each when the visitor has no
subscription, the billing portal's confirmation of the chosen plan when they have one.
"""

import logging
import secrets
from typing import Any

from aiohttp import web

from gateway.feature_catalog import FeatureCatalog
from gateway.logs import log_event
from gateway.model import Identity
from gateway.pages.common import base_url, identity_of, lookup_of, render, services
from gateway.paths import safe_next
from gateway.responses import feature_message
from gateway.rules import access
from gateway.services import Services
from gateway.stripe_api import StripeError

__all__ = ["CONFIRM_FLOW", "PLAN_SWITCH_FLOW", "catalog_of", "plan_switch_flow", "upgrade"]

#: The ``flow`` form field of the upgrade page's "Switch to …" buttons.
PLAN_SWITCH_FLOW = "subscription_update"
#: Stripe's flow that confirms one chosen price for the subscription's item.
CONFIRM_FLOW = "subscription_update_confirm"

log = logging.getLogger("gateway.pages")


async def upgrade(request: web.Request) -> web.Response:
    svc = services(request)
    settings = svc.settings
    next_path = safe_next(request.query.get("next"))
    raw = request.query.get("feature", "")
    # Only a feature some rule names: the page never echoes arbitrary text as a feature.
    feature = raw if raw in settings.feature_table.features else None
    identity = await identity_of(request, svc)
    subscriber = False
    if identity is not None:
        try:
            lookup = await lookup_of(svc, identity)
        except StripeError:
            lookup = None
        ent = lookup.entitlement if lookup is not None else None
        subscriber = bool(
            ent and ent.subscription_id and access(ent, settings, svc.clock.now()).allowed
        )
    catalog = catalog_of(svc)
    plans = await catalog.plans_with(feature) if feature else []
    name = catalog.name_of(feature) if feature else None  # Stripe's name for people
    return render(
        request,
        "upgrade.html",
        {
            "feature": name or "this feature",
            "message": (
                f"Your plan does not include {name}. These plans do:"
                if name and plans
                else feature_message(name)
            ),
            "plans": plans,
            "subscriber": subscriber,
            "next": next_path,
            "form_id": secrets.token_urlsafe(16),
        },
    )


def catalog_of(svc: Services) -> FeatureCatalog:
    """The process's feature catalog (one built on the spot for an app wired without it)."""
    return svc.feature_catalog or FeatureCatalog(svc.settings, svc.plans, svc.entitlements.products)


async def plan_switch_flow(
    request: web.Request,
    svc: Services,
    identity: Identity | None,
    next_path: str | None,
    price_id: str | None = None,
) -> dict[str, Any] | None:
    """Stripe's ``flow_data`` for the portal's plan switch of the signed-in customer's current
    subscription — its id from the gate's own lookup, never from the form — returning to
    ``next_path`` (validated) when done; None when there is none (the portal's home page then
    offers the switch).

    With ``price_id`` (the plan the user chose on the upgrade page; only a sold one, not the
    current one) it is ``subscription_update_confirm`` with the subscription's item and that
    price, so the portal asks to confirm exactly that plan; without it, or when the item
    cannot be read now, ``subscription_update`` (the user picks the plan in the portal)."""
    try:
        lookup = await lookup_of(svc, identity)
    except StripeError:
        return None
    ent = lookup.entitlement if lookup is not None else None
    if ent is None or ent.subscription_id is None or ent.source == "grant":
        return None
    after = {
        "type": "redirect",
        "redirect": {"return_url": base_url(request, svc) + safe_next(next_path)},
    }
    if price_id and svc.plans.sells(price_id) and price_id != ent.price_id:
        item_id = await _item_of(svc, ent.customer_id, ent.subscription_id)
        if item_id is not None:
            return {
                "type": CONFIRM_FLOW,
                CONFIRM_FLOW: {
                    "subscription": ent.subscription_id,
                    "items": [{"id": item_id, "price": price_id, "quantity": 1}],
                },
                "after_completion": after,
            }
    return {
        "type": PLAN_SWITCH_FLOW,
        PLAN_SWITCH_FLOW: {"subscription": ent.subscription_id},
        "after_completion": after,
    }


async def _item_of(svc: Services, customer_id: str, subscription_id: str) -> str | None:
    """The id of the subscription's one item (Stripe's confirm flow updates one item; a
    subscription with several is not updatable this way), read from Stripe."""
    try:
        subs = await svc.stripe.list_subscriptions(customer_id)
    except StripeError as exc:
        log_event(log, "plan_switch_item_unavailable", error=type(exc).__name__)
        return None
    for sub in subs:
        if sub.get("id") != subscription_id:
            continue
        items = sub.get("items")
        data = items.get("data") if isinstance(items, dict) else None
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
            item_id = data[0].get("id")
            return item_id if isinstance(item_id, str) and item_id else None
    return None
