"""``GET {prefix}/upgrade?feature=…&next=…``: the page a subscriber lands on when a path needs a
feature their plan lacks (``FEATURE_RULES``; the gate sends navigations here, APIs get its URL
as ``upgrade_url``). It names the sold plans that include the feature
(:class:`gateway.feature_catalog.FeatureCatalog`): Checkout for each when the visitor has no
subscription, the billing portal's plan switch (``flow=subscription_update``) when they have one.
"""

import secrets

from aiohttp import web

from gateway.feature_catalog import FeatureCatalog
from gateway.pages.common import identity_of, lookup_of, render, services
from gateway.paths import safe_next
from gateway.responses import feature_message
from gateway.rules import access
from gateway.stripe_api import StripeError

__all__ = ["upgrade"]


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
    catalog = svc.feature_catalog or FeatureCatalog(settings, svc.stripe, svc.plans, svc.clock)
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
