"""The account: the ``account`` page (with the user's active sessions), ``logout/everywhere``,
its ``api/me`` JSON (which the badge reads), and what those routes say when billing is off."""

import logging
from urllib.parse import quote

from aiohttp import hdrs, web

from gateway.accounts import account_summary, session_list
from gateway.apikeys.pages import section as api_keys_section
from gateway.decision import wants_html
from gateway.logs import log_event
from gateway.model import Lookup
from gateway.pages.common import form_post, identity_of, lookup_of, render, services
from gateway.pages.upgrade import catalog_of
from gateway.responses import see_other
from gateway.services import SETTINGS, Services
from gateway.sessions import clear_session, session_cookie
from gateway.stripe_api import StripeError
from gateway.teams.pages import team_context
from gateway.usage.views import usage_of_customer

__all__ = ["account", "api_me", "billing_disabled", "logout_everywhere"]

log = logging.getLogger("gateway.pages")


async def _plan_name(svc: Services, lookup: Lookup | None) -> None:
    """Read the plan's name (cached) before the summary is built, which only looks it up."""
    if lookup and lookup.entitlement and lookup.entitlement.price_id:
        try:
            await svc.plans.get(lookup.entitlement.price_id)
        except StripeError as exc:  # the page shows the price id instead of the name
            log_event(
                log, "plan_unavailable", price=lookup.entitlement.price_id, error=type(exc).__name__
            )


async def account(request: web.Request) -> web.Response:
    svc = services(request)
    prefix = svc.settings.gate_prefix
    identity = await identity_of(request, svc)
    if identity is None:
        return see_other(f"{prefix}/login?next={quote(prefix + '/account')}")
    lookup = await lookup_of(svc, identity)
    await _plan_name(svc, lookup)
    summary = account_summary(svc.settings, svc.plans, identity, lookup, svc.clock.now())
    devices: list[dict[str, object]] = []
    if identity.customer_id:
        value = session_cookie(request.headers.get(hdrs.COOKIE))
        current = svc.sessions.handle_of(value) if value else None
        devices = session_list(await svc.sessions.active(identity.customer_id), current)
    # Signed in through Checkout only: the email Stripe has is shown to its owner, marked as
    # not confirmed (the app is not told it: X-Gate-Email carries verified emails only).
    unconfirmed = None
    if identity.email is None and identity.customer_id:
        unconfirmed = await svc.store.customer_email(identity.customer_id)
    team = await team_context(svc, identity, lookup, request.query.get("team"))
    keys = await api_keys_section(svc, identity)
    usage = await usage_of_customer(svc.usage, identity, lookup) if svc.usage else []
    return render(
        request,
        "account.html",
        {
            "identity": identity,
            "summary": summary,
            "sessions": devices,
            "unconfirmed": unconfirmed,
            "team": team,
            **keys,
            "usage": usage,
        },
    )


@form_post
async def logout_everywhere(
    request: web.Request, svc: Services, form: dict[str, str]
) -> web.Response:
    """Sign out everywhere: revoke every session of the signed-in user, this one included."""
    identity = await identity_of(request, svc)
    if identity is not None and identity.customer_id:
        count = await svc.sessions.revoke_all(identity.customer_id)
        log_event(log, "signed_out_everywhere", customer=identity.customer_id, sessions=count)
    response = see_other(f"{svc.settings.gate_prefix}/subscribe?signed_out=everywhere")
    clear_session(response, svc.settings)
    return response


async def api_me(request: web.Request) -> web.Response:
    svc = services(request)
    identity = await identity_of(request, svc)
    lookup = await lookup_of(svc, identity)
    await _plan_name(svc, lookup)  # the badge says "Basic · renews …", not "Subscription"
    summary = account_summary(svc.settings, svc.plans, identity, lookup, svc.clock.now())
    if summary["features"]:  # for people (the badge): Stripe's names of the features
        summary["feature_names"] = await catalog_of(svc).names(summary["features"])
    if svc.usage is not None:  # every meter this period: "17 of 20 analyses used · …"
        summary["usage"] = await usage_of_customer(svc.usage, identity, lookup)
    summary["account_url"] = f"{svc.settings.gate_prefix}/account"
    summary["subscribe_url"] = f"{svc.settings.gate_prefix}/subscribe"
    return web.json_response(summary, headers={"Cache-Control": "no-store"})


async def billing_disabled(request: web.Request) -> web.Response:
    """``subscribe``, ``account``, ``login`` and ``api/me`` with billing off: open to all."""
    settings = request.app[SETTINGS]
    if not wants_html(request.headers.get("Accept")):
        return web.json_response({"billing_enabled": False, "allowed": True})
    return render(
        request,
        "message.html",
        {
            "title": "Billing is disabled",
            "message": f"{settings.app_name} is open to everyone right now.",
            "link": "/",
            "link_text": f"Open {settings.app_name}",
        },
    )
