"""Buying and managing a subscription: the landing page (``subscribe``), Stripe Checkout
(``checkout``, ``success``) and Stripe's billing portal (``portal``).

Every Stripe failure becomes a friendly page (HTML) or JSON with a retry, never a 500.
"""

import hashlib
import logging
import secrets
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.accounts import account_summary
from gateway.emails import valid_email
from gateway.identity import set_session
from gateway.logs import log_event
from gateway.metered import checkout_line_items
from gateway.pages.common import (
    CSRF_KEY,
    base_url,
    form_post,
    identity_of,
    lookup_of,
    render,
    services,
    stripe_down,
)
from gateway.pages.upgrade import PLAN_SWITCH_FLOW, plan_switch_flow
from gateway.paths import safe_next
from gateway.plans import checkout_options
from gateway.responses import error_page, see_other
from gateway.services import Services
from gateway.settings import Settings
from gateway.store import StoreError
from gateway.stripe_api import StripeError, StripeRejected, StripeUnavailable
from gateway.teams.checkout import line_item, seat_quantity
from gateway.trials import trial_offer

__all__ = ["checkout", "portal", "subscribe", "success"]

log = logging.getLogger("gateway.pages")

#: The cookie that binds a Checkout to the browser that started it.
CHECKOUT_COOKIE = "gate_checkout"


async def subscribe(request: web.Request) -> web.Response:
    svc = services(request)
    next_path = safe_next(request.query.get("next"))
    identity = await identity_of(request, svc)
    try:
        offers = await svc.plans.offers()
    except StripeRejected as exc:
        if not exc.not_found:
            return stripe_down(request, str(request.rel_url))
        # STRIPE_PRICE_IDS names a price Stripe does not know: the operator's to fix, and
        # no retry helps (logged as an error at startup and by `gateway check`).
        log_event(log, "price_unknown", level=logging.ERROR, setting="STRIPE_PRICE_IDS")
        return error_page(
            request,
            svc.settings,
            "billing_not_configured",
            "Billing is not configured",
            "Subscriptions cannot be sold here yet: this site's billing is not set up "
            "correctly. Nothing was charged. Please tell the site's operator.",
            status=503,
        )
    except StripeError:
        return stripe_down(request, f"{svc.settings.gate_prefix}/subscribe?next={quote(next_path)}")
    summary = None
    if identity is not None:
        try:
            lookup = await lookup_of(svc, identity)
            summary = account_summary(svc.settings, svc.plans, identity, lookup, svc.clock.now())
        except StripeError:
            summary = None
    # Only a trial this visitor may have is promised (the cached state; Checkout checks again).
    offer = await trial_offer(
        svc.entitlements, svc.settings, identity, fresh=False, store=svc.store
    )
    return render(
        request,
        "subscribe.html",
        {
            "offers": offers,
            "first_price": svc.settings.stripe_price_ids[0],
            "switch": any(offer.switch for offer in offers),
            "trial_days": offer.days,
            "trial_without_card": svc.settings.trial_without_card,
            "trial_note": offer.note(identity),
            "next": next_path,
            "identity": identity,
            "summary": summary,
            "form_id": secrets.token_urlsafe(16),
            "canceled": request.query.get("canceled") == "1",
            "signed_out": request.query.get("signed_out") if identity is None else None,
            "seat_prices": svc.settings.seat_price_ids,
            "max_seats": svc.settings.max_seats,
        },
    )


@form_post
async def checkout(request: web.Request, svc: Services, form: dict[str, str]) -> web.Response:
    settings = svc.settings
    next_path = safe_next(form.get("next"))
    base = base_url(request, svc)
    # The plan the user chose; only a price the landing page sells (a forged one is refused).
    price_id = form.get("price") or settings.stripe_price_ids[0]
    if not svc.plans.sells(price_id):
        log_event(log, "checkout_price_refused", price=price_id[:80])
        return error_page(
            request,
            settings,
            "unknown_plan",
            "Unknown plan",
            "That plan is not sold here. Nothing was charged. Please choose a plan on the "
            "subscribe page.",
            status=400,
            retry_url=f"{settings.gate_prefix}/subscribe?next={quote(next_path)}",
        )
    quantity = seat_quantity(settings, price_id, form.get("seats"))
    if quantity is None:
        return error_page(
            request,
            settings,
            "bad_seats",
            "Choose the number of seats",
            f"A team plan is sold for 1 to {settings.max_seats} seats. Nothing was charged.",
            status=400,
            retry_url=f"{settings.gate_prefix}/subscribe?next={quote(next_path)}",
        )
    identity = await identity_of(request, svc)
    # One trial per customer and per mailbox, decided afresh from Stripe (gateway.trials).
    offer = await trial_offer(svc.entitlements, settings, identity, fresh=True, store=svc.store)
    if offer.reason == "confirm_email":
        # Anonymous: Stripe's page would take any email, each a new customer with a new trial.
        back = f"{settings.gate_prefix}/subscribe?next={quote(next_path, safe='')}"
        return see_other(f"{settings.gate_prefix}/login?trial=1&next={quote(back, safe='')}")
    form_id = form.get("form_id", "")[:64] or secrets.token_urlsafe(16)
    # One page, several plans: the price is part of the reference (and so of the idempotency
    # key), or going back and choosing another plan would replay the first Checkout; so is the
    # trial, which the same form may no longer get.
    key = f"{form_id}|{price_id}|{offer.days}" + (f"|{quantity}" if quantity > 1 else "")
    reference = "gate_" + hashlib.sha256(key.encode()).hexdigest()[:32]
    params: dict[str, Any] = {
        **checkout_options(settings, trial=offer.days > 0),
        "mode": "subscription",
        "line_items": [
            line_item(settings, price_id, quantity),
            *checkout_line_items(price_id, settings.metered_price_map)[1:],
        ],
        "client_reference_id": reference,
        "success_url": f"{base}{settings.gate_prefix}/success?session_id={{CHECKOUT_SESSION_ID}}"
        f"&next={quote(next_path, safe='')}",
        "cancel_url": f"{base}{settings.gate_prefix}/subscribe?canceled=1"
        f"&next={quote(next_path, safe='')}",
        "metadata": {"gate": "1"},
    }
    if identity and identity.customer_id:
        params["customer"] = identity.customer_id
        if settings.automatic_tax:
            # Stripe Tax needs the customer's address: Checkout collects it and saves it on
            # the existing customer (else Stripe refuses the session).
            params["customer_update"] = {"address": "auto"}
    elif identity and identity.email:
        params["customer_email"] = identity.email
    try:
        session = await svc.stripe.create_checkout_session(params, f"checkout-{reference}")
    except StripeError as exc:
        log_event(log, "checkout_failed", error=type(exc).__name__)
        return stripe_down(request, f"{settings.gate_prefix}/subscribe?next={quote(next_path)}")
    log_event(log, "checkout_created", session=session.get("id"), trial=offer.reason)
    response = see_other(str(session["url"]))
    # Binds the Checkout to this browser: /success signs in only the browser that started it.
    response.set_cookie(
        CHECKOUT_COOKIE,
        request.app[CSRF_KEY].bind(reference),
        httponly=True,
        samesite="Lax",
        secure=settings.secure_cookies,
        max_age=86400,
        path=settings.gate_prefix,
    )
    return response


def _unknown_checkout(request: web.Request, settings: Settings) -> web.Response:
    return error_page(
        request,
        settings,
        "unknown_checkout",
        "Unknown checkout",
        "That checkout link is not valid.",
        status=400,
        retry_url=f"{settings.gate_prefix}/subscribe",
    )


async def success(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    settings = svc.settings
    next_path = safe_next(request.query.get("next"))
    session_id = request.query.get("session_id", "")
    if not session_id.startswith("cs_") or len(session_id) > 255:
        return _unknown_checkout(request, settings)
    try:
        session = await svc.stripe.get_checkout_session(session_id)
    except StripeUnavailable:
        return stripe_down(request, str(request.rel_url))
    except StripeError:
        return _unknown_checkout(request, settings)
    customer_id = _customer_of(session)
    if session.get("status") != "complete" or not customer_id:
        return error_page(
            request,
            settings,
            "payment_not_completed",
            "Payment not completed",
            "This checkout has not been completed yet.",
            status=402,
            retry_url=f"{settings.gate_prefix}/subscribe?next={quote(next_path)}",
        )
    email = _email_of(session)
    try:
        await svc.entitlements.link_customer(customer_id, email)
    except StoreError as exc:
        # Stripe confirmed the payment: the user gets in on that (the session names the
        # customer; the refresh below fills the cache). The email link is written again by
        # the checkout.session.completed webhook, which Stripe retries until it is stored.
        log_event(log, "success_store_failed", customer=customer_id, error=str(exc))
    try:
        await svc.entitlements.refresh(customer_id, source="success")
    except StripeError as exc:  # the next request looks it up again
        log_event(log, "success_sync_failed", customer=customer_id, error=type(exc).__name__)
    bound = request.app[CSRF_KEY].unbind(request.cookies.get(CHECKOUT_COOKIE, ""))
    if bound is None or bound != session.get("client_reference_id"):
        # Paid, but from another browser (or the link was shared): ask for the email link.
        log_event(log, "success_unbound", customer=customer_id)
        return render(
            request,
            "message.html",
            {
                "title": "Thank you — payment received",
                "message": "To continue on this device, sign in with the email you paid with.",
                "link": f"{settings.gate_prefix}/login?next={quote(next_path)}",
                "link_text": "Sign in",
            },
        )
    # Stripe's Checkout does not verify the email typed on its page: the new session (and so
    # X-Gate-Email, what the app is told) carries it only when this browser had proven it
    # already (signed in with it by an email link, or a trusted identity header).
    prior = await identity_of(request, svc)
    verified = email if email is not None and prior is not None and prior.email == email else None
    response = see_other(next_path)
    try:
        await set_session(response, svc.sessions, request, customer_id, verified)
    except StoreError as exc:
        # A session is a stored row (revocable): none can be issued without a write. Stripe
        # has the payment; this same link (the checkout cookie is kept) finishes the sign-in.
        log_event(log, "success_session_failed", customer=customer_id, error=str(exc))
        return error_page(
            request,
            settings,
            "store_unavailable",
            "Payment received — almost there",
            "Your subscription is active, but we could not sign you in on this device just "
            "now. Press Try again in a moment to continue.",
            retry_url=str(request.rel_url),
        )
    log_event(log, "signed_in", via="checkout", customer=customer_id)
    response.del_cookie(CHECKOUT_COOKIE, path=settings.gate_prefix)
    return response


def _customer_of(session: dict[str, Any]) -> str | None:
    customer = session.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return customer if isinstance(customer, str) and customer.startswith("cus_") else None


def _email_of(session: dict[str, Any]) -> str | None:
    details = session.get("customer_details")
    email = details.get("email") if isinstance(details, dict) else None
    return valid_email(email or session.get("customer_email"), source="stripe_checkout")


#: The portal flows the account page deep-links into (``flow`` form field → Stripe's
#: ``flow_data[type]``). Flows naming a subscription are not offered here: the form would
#: have to carry its id.
PORTAL_FLOWS = ("payment_method_update",)


def portal_flow(flow: str, return_url: str) -> dict[str, Any] | None:
    """Stripe's ``flow_data`` for a ``flow`` the account page asked for (else ``None``: the
    portal's home page); done, the portal sends the user back to the account page."""
    if flow not in PORTAL_FLOWS:
        return None
    return {
        "type": flow,
        "after_completion": {"type": "redirect", "redirect": {"return_url": return_url}},
    }


@form_post
async def portal(request: web.Request, svc: Services, form: dict[str, str]) -> web.Response:
    identity = await identity_of(request, svc)
    customer_id = identity.customer_id if identity else None
    if identity and not customer_id and identity.email:
        try:
            ids = await svc.entitlements.customers_for_email(identity.email)
        except StripeError:
            return stripe_down(request, f"{svc.settings.gate_prefix}/account")
        customer_id = ids[0] if ids else None
    if not customer_id:
        return see_other(f"{svc.settings.gate_prefix}/subscribe")
    return_url = f"{base_url(request, svc)}{svc.settings.gate_prefix}/account"
    flow_data = portal_flow(form.get("flow", ""), return_url)
    if form.get("flow") == PLAN_SWITCH_FLOW:  # the upgrade page's plan switch
        flow_data = await plan_switch_flow(
            request, svc, identity, form.get("next"), form.get("price")
        )
    try:
        session = await svc.stripe.create_portal_session(customer_id, return_url, flow_data)
    except StripeError as exc:
        log_event(log, "portal_failed", customer=customer_id, error=type(exc).__name__)
        return stripe_down(request, f"{svc.settings.gate_prefix}/account")
    # Whatever the user changes in the portal arrives by webhook; drop L1 so it is read soon.
    svc.entitlements.forget(customer_id)
    return see_other(str(session["url"]))
