"""Signing in on a new device with an emailed link (``login``, ``login/verify``), and out
(``logout``)."""

import logging
from urllib.parse import quote

from aiohttp import hdrs, web

from gateway.accounts import best_customer
from gateway.emails import valid_email
from gateway.forwarded import client_info
from gateway.identity import clear_session, session_cookie, set_session
from gateway.logs import log_event
from gateway.mailer import MailError
from gateway.pages.common import base_url, form_post, render, services, stripe_down
from gateway.paths import safe_next
from gateway.responses import error_page, see_other
from gateway.services import SETTINGS, Services
from gateway.stripe_api import StripeError
from gateway.trials import customer_for_new_email

__all__ = ["login_form", "login_submit", "login_verify", "login_verify_form", "logout"]

log = logging.getLogger("gateway.pages")

_EMAIL_MAX = 254

# What a sign-in link that does not work says, by :class:`gateway.signin.Redeemed` outcome.
_LINK_REFUSED = {
    "used": (
        "This sign-in link was already used",
        "Each link works once. If you are not signed in on this device, ask for a new one.",
    ),
    "expired": (
        "This sign-in link has expired",
        "Links work for a limited time. Ask for a new one.",
    ),
    "invalid": (
        "This sign-in link is not valid",
        "Check that the whole link was copied, or ask for a new one.",
    ),
}


async def login_form(request: web.Request) -> web.Response:
    next_path = safe_next(request.query.get("next"))
    # ``trial=1``: sent here by the free trial's Subscribe button (gateway.trials).
    trial = request.query.get("trial") == "1" and request.app[SETTINGS].trial_days > 0
    return render(request, "login.html", {"next": next_path, "trial": trial})


@form_post
async def login_submit(request: web.Request, svc: Services, form: dict[str, str]) -> web.Response:
    typed = form.get("email", "").strip()[:_EMAIL_MAX]
    email = valid_email(typed)
    next_path = safe_next(form.get("next"))
    if email is None:
        return render(
            request,
            "login.html",
            {"next": next_path, "email": typed, "error": "Please enter a valid email address."},
            status=400,
        )
    client = client_info(request, svc.trusted)
    link_base = (
        f"{base_url(request, svc)}{svc.settings.gate_prefix}/login/verify"
        f"?next={quote(next_path, safe='')}"
    )
    try:
        await svc.login.request(email, client.ip, link_base)
    except MailError:
        return error_page(
            request,
            svc.settings,
            "mail_unavailable",
            "We could not send the email",
            "Sending the sign-in link failed. Please try again in a few minutes.",
            retry_url=f"{svc.settings.gate_prefix}/login?next={quote(next_path)}",
        )
    # Same page whether or not the email belongs to a customer.
    return render(
        request,
        "message.html",
        {
            "title": "Check your inbox",
            "message": f"If {email} can sign in, a link is on its way. It works once, "
            f"for {int(svc.settings.login_token_ttl // 60)} minutes; links sent earlier "
            "keep working.",
        },
    )


async def login_verify_form(request: web.Request) -> web.Response:
    # GET never consumes the token: mail scanners prefetch links. The button POSTs it.
    token = request.query.get("token", "")
    svc = services(request)
    email = await svc.login.peek(token)  # names the account; the POST still decides
    return render(
        request,
        "login_verify.html",
        {"token": token, "email": email, "next": safe_next(request.query.get("next"))},
    )


@form_post
async def login_verify(request: web.Request, svc: Services, form: dict[str, str]) -> web.Response:
    next_path = safe_next(form.get("next"))
    redeemed = await svc.login.redeem(form.get("token", ""))
    email = redeemed.email
    prefix = svc.settings.gate_prefix
    if email is None:
        title, message = _LINK_REFUSED[redeemed.outcome]
        return render(
            request,
            "message.html",
            {
                "title": title,
                "message": message,
                "link": f"{prefix}/login?next={quote(next_path)}",
                "link_text": "Send a new link",
            },
            status=400,
        )
    try:
        customer_id = await best_customer(svc.entitlements, svc.settings, email, svc.clock.now())
    except StripeError:
        return stripe_down(request, f"{prefix}/login")
    if customer_id is None and svc.settings.trial_days > 0:
        # A new subscriber confirmed the email: a customer for it, so the trial's Checkout
        # names it (one trial per email can then be told) and this browser is signed in.
        try:
            customer_id = await customer_for_new_email(svc.stripe, svc.entitlements, email)
        except StripeError:
            return stripe_down(request, f"{prefix}/login?next={quote(next_path)}")
    if customer_id is None and svc.teams is not None and await svc.teams.team_of(email):
        customer_id = ""  # a team member without a customer of their own: the team's access
    if customer_id is None:
        return render(
            request,
            "message.html",
            {
                "title": "No subscription yet",
                "message": f"{email} has no subscription. Subscribe to continue.",
                "link": f"{prefix}/subscribe?next={quote(next_path)}",
                "link_text": "Subscribe",
            },
        )
    log_event(log, "signed_in", via="email", customer=customer_id)
    response = see_other(next_path)
    await set_session(response, svc.sessions, request, customer_id, email)
    return response


@form_post
async def logout(request: web.Request, svc: Services, form: dict[str, str]) -> web.Response:
    # Revoke the session itself, not only the cookie: a copy taken earlier must not get in.
    value = session_cookie(request.headers.get(hdrs.COOKIE))
    if value:
        await svc.sessions.revoke(value)
    response = see_other(f"{svc.settings.gate_prefix}/subscribe?signed_out=1")
    clear_session(response, svc.settings)
    return response
