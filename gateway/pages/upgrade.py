"""``GET {prefix}/upgrade?feature=…&next=…``: the page a subscriber lands on when a path needs a
feature their plan lacks (``FEATURE_RULES``; the gate sends navigations here, APIs get its URL
as ``upgrade_url``). It names the sold plans that include the feature
(:class:`gateway.feature_catalog.FeatureCatalog`): Checkout for each when the visitor has no
subscription, the billing portal's plan switch (``flow=subscription_update``) when they have one.
"""

import secrets
from typing import Any

from aiohttp import web

from gateway.feature_catalog import FeatureCatalog
from gateway.model import Identity
from gateway.pages.common import base_url, identity_of, lookup_of, render, services
from gateway.paths import safe_next
from gateway.responses import feature_message
from gateway.rules import access
from gateway.services import Services
from gateway.stripe_api import StripeError

__all__ = ["PLAN_SWITCH_FLOW", "plan_switch_flow", "upgrade"]

#: The ``flow`` form field of the upgrade page's "Switch to …" buttons.
PLAN_SWITCH_FLOW = "subscription_update"


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
    catalog = svc.feature_catalog or FeatureCatalog(settings, svc.plans, svc.entitlements.products)
    plans = await catalog.plans_with(feature) if feature else []
    return render(
        request,
        "upgrade.html",
        {
            "feature": feature or "this feature",
            "message": feature_message(feature),
            "plans": plans,
            "subscriber": subscriber,
            "next": next_path,
            "form_id": secrets.token_urlsafe(16),
        },
    )


async def plan_switch_flow(
    request: web.Request, svc: Services, identity: Identity | None, next_path: str | None
) -> dict[str, Any] | None:
    """Stripe's ``flow_data`` for the portal's plan switch (``subscription_update``) of the
    signed-in customer's current subscription — its id from the gate's own lookup, never from
    the form — returning to ``next_path`` (validated) when done; None when there is none (the
    portal's home page then offers the switch)."""
    try:
        lookup = await lookup_of(svc, identity)
    except StripeError:
        return None
    ent = lookup.entitlement if lookup is not None else None
    if ent is None or ent.subscription_id is None or ent.source == "grant":
        return None
    back = base_url(request, svc) + safe_next(next_path)
    return {
        "type": PLAN_SWITCH_FLOW,
        PLAN_SWITCH_FLOW: {"subscription": ent.subscription_id},
        "after_completion": {"type": "redirect", "redirect": {"return_url": back}},
    }
