"""The gate's own pages under GATE_PREFIX: landing, Checkout, success, portal, account,
sign-in, sign-out, and the ``api/me`` JSON.

Every Stripe failure becomes a friendly page (HTML) or JSON with a retry, never a 500.
"""

import functools
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from gateway.csrf import CSRF
from gateway.forwarded import client_info
from gateway.identity import clear_session, identify, normalize_email, set_session
from gateway.logs import log_event
from gateway.mailer import MailError
from gateway.model import Access, Identity, Lookup, utcnow
from gateway.paths import safe_next
from gateway.rules import access
from gateway.services import SERVICES, SETTINGS, Services
from gateway.settings import Settings
from gateway.stripe_api import StripeError, StripeUnavailable

log = logging.getLogger("gateway.pages")

CSRF_KEY = web.AppKey("gate_csrf", CSRF)
_EMAIL_MAX = 254


# ---------------------------------------------------------------- helpers


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def base_url(request: web.Request, svc: Services) -> str:
    if svc.settings.public_url:
        return svc.settings.public_url
    client = client_info(request, svc.trusted)
    return f"{client.scheme}://{client.host}"


def _identity(request: web.Request, svc: Services) -> Identity | None:
    client = client_info(request, svc.trusted)
    return identify(request, svc.codec, svc.settings, client.peer_trusted)


def render(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    settings = request.app[SETTINGS]
    csrf = request.app[CSRF_KEY]
    new_cookies: dict[str, str] = {}
    ctx = {
        "app_name": settings.app_name,
        "prefix": settings.gate_prefix,
        "csrf_token": csrf.token(request, new_cookies),
        "billing_enabled": settings.billing_enabled,
        **context,
    }
    response = aiohttp_jinja2.render_template(template, request, ctx, status=status)
    response.headers["Cache-Control"] = "no-store"
    for nonce in new_cookies.values():
        csrf.set_cookie(response, nonce)
    return response


def error_page(
    request: web.Request,
    title: str,
    message: str,
    *,
    status: int = 503,
    retry_url: str | None = None,
) -> web.Response:
    if not _wants_html(request):
        return web.json_response(
            {"error": "billing_unavailable" if status == 503 else "error", "message": message},
            status=status,
        )
    return render(
        request,
        "error.html",
        {"title": title, "message": message, "retry_url": retry_url},
        status=status,
    )


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _stripe_down(request: web.Request, retry_url: str) -> web.Response:
    return error_page(
        request,
        "Billing is temporarily unavailable",
        "We could not reach our payment provider. Nothing was charged. "
        "Please try again in a moment.",
        retry_url=retry_url,
    )


async def _checked_form(request: web.Request) -> dict[str, str] | web.Response:
    """The POSTed form if its CSRF token and Origin are valid, else a 403 page."""
    svc = _svc(request)
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    origin = base_url(request, svc)
    if not request.app[CSRF_KEY].valid(request, fields.get("csrf", ""), _origin_of(origin)):
        log_event(log, "csrf_rejected", path=request.path)
        return error_page(
            request,
            "This form has expired",
            "Please go back, reload the page and try again.",
            status=403,
            retry_url=f"{svc.settings.gate_prefix}/subscribe",
        )
    return fields


def _origin_of(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _describe(acc: Access, now: datetime) -> str:
    days = acc.days_left(now)
    if acc.ends_kind is None or days is None:
        return ""
    unit = "day" if days == 1 else "days"
    return {
        "renews": f"renews in {days} {unit}",
        "ends": f"ends in {days} {unit}",
        "trial_ends": f"trial ends in {days} {unit}",
    }[acc.ends_kind]


async def _lookup(svc: Services, identity: Identity | None) -> Lookup | None:
    if identity is None:
        return None
    return await svc.entitlements.lookup(identity)


def account_summary(
    svc: Services, identity: Identity | None, lookup: Lookup | None, now: datetime
) -> dict[str, Any]:
    """The account facts shared by the account page, ``api/me`` and the badge."""
    settings = svc.settings
    ent = lookup.entitlement if lookup else None
    acc = access(ent, settings, now)
    return {
        "signed_in": identity is not None,
        "email": identity.email if identity else None,
        "customer_id": identity.customer_id if identity else None,
        "billing_enabled": settings.billing_enabled,
        "allowed": acc.allowed,
        "status": ent.status if ent else "none",
        "reason": acc.reason,
        "plan": svc.plans.name_for(ent.price_id if ent else None),
        "price_id": ent.price_id if ent else None,
        "ends_at": acc.ends_at.isoformat() if acc.ends_at else None,
        "ends_kind": acc.ends_kind,
        "days_left": acc.days_left(now),
        "summary": _describe(acc, now),
        "stale": bool(lookup and lookup.stale),
        "unavailable": bool(lookup and lookup.error),
    }


# ---------------------------------------------------------------- pages


async def subscribe(request: web.Request) -> web.Response:
    svc = _svc(request)
    next_path = safe_next(request.query.get("next"))
    identity = _identity(request, svc)
    try:
        plan = await svc.plans.primary()
    except StripeError:
        return _stripe_down(request, str(request.rel_url))
    summary = None
    if identity is not None:
        try:
            summary = account_summary(svc, identity, await _lookup(svc, identity), utcnow())
        except StripeError:
            summary = None
    return render(
        request,
        "subscribe.html",
        {
            "plan": plan,
            "next": next_path,
            "identity": identity,
            "summary": summary,
            "form_id": secrets.token_urlsafe(16),
            "canceled": request.query.get("canceled") == "1",
        },
    )


async def checkout(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await _checked_form(request)
    if isinstance(form, web.Response):
        return form
    settings = svc.settings
    next_path = safe_next(form.get("next"))
    base = base_url(request, svc)
    identity = _identity(request, svc)
    form_id = form.get("form_id", "")[:64] or secrets.token_urlsafe(16)
    reference = "gate_" + hashlib.sha256(form_id.encode()).hexdigest()[:32]
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": settings.stripe_price_ids[0], "quantity": 1}],
        "client_reference_id": reference,
        "success_url": f"{base}{settings.gate_prefix}/success?session_id={{CHECKOUT_SESSION_ID}}"
        f"&next={quote(next_path, safe='')}",
        "cancel_url": f"{base}{settings.gate_prefix}/subscribe?canceled=1"
        f"&next={quote(next_path, safe='')}",
        "metadata": {"gate": "1"},
    }
    if identity and identity.customer_id:
        params["customer"] = identity.customer_id
    elif identity and identity.email:
        params["customer_email"] = identity.email
    try:
        session = await svc.stripe.create_checkout_session(params, f"checkout-{reference}")
    except StripeError as exc:
        log_event(log, "checkout_failed", error=type(exc).__name__)
        return _stripe_down(request, f"{settings.gate_prefix}/subscribe?next={quote(next_path)}")
    log_event(log, "checkout_created", session=session.get("id"))
    response = see_other(str(session["url"]))
    # Binds the Checkout to this browser: /success signs in only the browser that started it.
    response.set_cookie(
        "gate_checkout",
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
        "Unknown checkout",
        "That checkout link is not valid.",
        status=400,
        retry_url=f"{settings.gate_prefix}/subscribe",
    )


async def success(request: web.Request) -> web.StreamResponse:
    svc = _svc(request)
    settings = svc.settings
    next_path = safe_next(request.query.get("next"))
    session_id = request.query.get("session_id", "")
    if not session_id.startswith("cs_") or len(session_id) > 255:
        return _unknown_checkout(request, settings)
    try:
        session = await svc.stripe.get_checkout_session(session_id)
    except StripeUnavailable:
        return _stripe_down(request, str(request.rel_url))
    except StripeError:
        return _unknown_checkout(request, settings)
    customer_id = _customer_of(session)
    if session.get("status") != "complete" or not customer_id:
        return error_page(
            request,
            "Payment not completed",
            "This checkout has not been completed yet.",
            status=402,
            retry_url=f"{settings.gate_prefix}/subscribe?next={quote(next_path)}",
        )
    email = _email_of(session)
    await svc.entitlements.link_customer(customer_id, email)
    try:
        await svc.entitlements.refresh(customer_id, source="success")
    except StripeError as exc:  # the next request looks it up again
        log_event(log, "success_sync_failed", customer=customer_id, error=type(exc).__name__)
    bound = request.app[CSRF_KEY].unbind(request.cookies.get("gate_checkout", ""))
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
    log_event(log, "signed_in", via="checkout", customer=customer_id)
    response = see_other(next_path)
    set_session(response, svc.codec, customer_id, email)
    response.del_cookie("gate_checkout", path=settings.gate_prefix)
    return response


def _customer_of(session: dict[str, Any]) -> str | None:
    customer = session.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return customer if isinstance(customer, str) and customer.startswith("cus_") else None


def _email_of(session: dict[str, Any]) -> str | None:
    details = session.get("customer_details")
    email = details.get("email") if isinstance(details, dict) else None
    email = email or session.get("customer_email")
    return str(email).lower() if email else None


async def portal(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await _checked_form(request)
    if isinstance(form, web.Response):
        return form
    identity = _identity(request, svc)
    customer_id = identity.customer_id if identity else None
    if identity and not customer_id and identity.email:
        try:
            ids = await svc.entitlements.customers_for_email(identity.email)
        except StripeError:
            return _stripe_down(request, f"{svc.settings.gate_prefix}/account")
        customer_id = ids[0] if ids else None
    if not customer_id:
        return see_other(f"{svc.settings.gate_prefix}/subscribe")
    return_url = f"{base_url(request, svc)}{svc.settings.gate_prefix}/account"
    try:
        session = await svc.stripe.create_portal_session(customer_id, return_url)
    except StripeError as exc:
        log_event(log, "portal_failed", customer=customer_id, error=type(exc).__name__)
        return _stripe_down(request, f"{svc.settings.gate_prefix}/account")
    # Whatever the user changes in the portal arrives by webhook; drop L1 so it is read soon.
    svc.entitlements.forget(customer_id)
    return see_other(str(session["url"]))


async def account(request: web.Request) -> web.Response:
    svc = _svc(request)
    identity = _identity(request, svc)
    if identity is None:
        return see_other(
            f"{svc.settings.gate_prefix}/login?next={quote(svc.settings.gate_prefix + '/account')}"
        )
    lookup = await _lookup(svc, identity)
    if lookup and lookup.entitlement and lookup.entitlement.price_id:
        try:
            await svc.plans.get(lookup.entitlement.price_id)
        except StripeError as exc:  # the page shows the price id instead of the name
            log_event(
                log, "plan_unavailable", price=lookup.entitlement.price_id, error=type(exc).__name__
            )
    summary = account_summary(svc, identity, lookup, utcnow())
    return render(request, "account.html", {"identity": identity, "summary": summary})


async def api_me(request: web.Request) -> web.Response:
    svc = _svc(request)
    identity = _identity(request, svc)
    lookup = await _lookup(svc, identity)
    summary = account_summary(svc, identity, lookup, utcnow())
    summary["account_url"] = f"{svc.settings.gate_prefix}/account"
    summary["subscribe_url"] = f"{svc.settings.gate_prefix}/subscribe"
    return web.json_response(summary, headers={"Cache-Control": "no-store"})


async def login_form(request: web.Request) -> web.Response:
    next_path = safe_next(request.query.get("next"))
    return render(request, "login.html", {"next": next_path})


async def login_submit(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await _checked_form(request)
    if isinstance(form, web.Response):
        return form
    typed = form.get("email", "").strip()[:_EMAIL_MAX]
    email = normalize_email(typed)
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
            f"for {int(svc.settings.login_token_ttl // 60)} minutes.",
        },
    )


async def login_verify_form(request: web.Request) -> web.Response:
    # GET never consumes the token: mail scanners prefetch links. The button POSTs it.
    token = request.query.get("token", "")
    return render(
        request, "login_verify.html", {"token": token, "next": safe_next(request.query.get("next"))}
    )


async def login_verify(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await _checked_form(request)
    if isinstance(form, web.Response):
        return form
    next_path = safe_next(form.get("next"))
    email = await svc.login.verify(form.get("token", ""))
    prefix = svc.settings.gate_prefix
    if email is None:
        return render(
            request,
            "message.html",
            {
                "title": "This sign-in link has expired",
                "message": "Links work once and for a limited time. Ask for a new one.",
                "link": f"{prefix}/login?next={quote(next_path)}",
                "link_text": "Send a new link",
            },
            status=400,
        )
    try:
        customer_id = await _best_customer(svc, email)
    except StripeError:
        return _stripe_down(request, f"{prefix}/login")
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
    set_session(response, svc.codec, customer_id, email)
    return response


async def _best_customer(svc: Services, email: str) -> str | None:
    """The customer with the best access among those with this email (Stripe allows several)."""
    ids = await svc.entitlements.customers_for_email(email)
    now = utcnow()
    best: tuple[tuple[bool, float], str] | None = None
    for customer_id in ids:
        lookup = await svc.entitlements.lookup(Identity(email, customer_id, "cookie"))
        acc = access(lookup.entitlement, svc.settings, now)
        rank = (acc.allowed, acc.ends_at.timestamp() if acc.ends_at else 0.0)
        if best is None or rank > best[0]:
            best = (rank, customer_id)
    return best[1] if best else None


async def logout(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await _checked_form(request)
    if isinstance(form, web.Response):
        return form
    response = see_other(f"{svc.settings.gate_prefix}/subscribe")
    clear_session(response, svc.settings)
    return response


async def billing_disabled(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    if not _wants_html(request):
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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(handler: Handler) -> Handler:
    """A bug or an unexpected failure (store, mail) in a page handler becomes a friendly
    page or JSON, logged with its traceback for the operator, never shown to the user."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("page_failed path=%s", request.path)
            return error_page(
                request,
                "Something went wrong",
                "The page could not be shown. Please try again in a moment.",
                status=500,
                retry_url=request.path_qs if request.method == "GET" else None,
            )

    return wrapper


def add_routes(app: web.Application, settings: Settings) -> None:
    p = settings.gate_prefix
    if not settings.billing_enabled:
        for path in ("subscribe", "account", "login"):
            app.router.add_get(f"{p}/{path}", billing_disabled)
        app.router.add_get(f"{p}/api/me", billing_disabled)
        return
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "subscribe", subscribe),
        ("POST", "checkout", checkout),
        ("GET", "success", success),
        ("POST", "portal", portal),
        ("GET", "account", account),
        ("GET", "api/me", api_me),
        ("GET", "login", login_form),
        ("POST", "login", login_submit),
        ("GET", "login/verify", login_verify_form),
        ("POST", "login/verify", login_verify),
        ("POST", "logout", logout),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, f"{p}/{path}", guarded(handler))
