"""What the gate's page handlers share: their services, who is asking, the public base URL,
templates with a CSRF token, CSRF-checked (and authorized) forms, and the "Stripe is down"
page."""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from yarl import URL

from gateway.csrf import CSRF
from gateway.forwarded import ORIGIN, PublicOrigin, client_info
from gateway.identity import identify
from gateway.logs import log_event
from gateway.model import Identity, Lookup
from gateway.responses import error_page, render_html
from gateway.services import SERVICES, SETTINGS, Services

__all__ = [
    "CSRF_KEY",
    "Authorize",
    "Handler",
    "authorized_form",
    "base_url",
    "checked_form",
    "form_post",
    "identity_of",
    "lookup_of",
    "render",
    "services",
    "stripe_down",
]

log = logging.getLogger("gateway.pages")

CSRF_KEY = web.AppKey("gate_csrf", CSRF)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def base_url(request: web.Request, svc: Services) -> str:
    """``scheme://host`` every absolute URL of a page starts with (sign-in links, Stripe
    return URLs): ``PUBLIC_URL``, or with ``ALLOWED_HOSTS`` the request's validated host
    (:class:`gateway.forwarded.PublicOrigin`) — never the request's Host alone."""
    origin = request.app.get(ORIGIN) or PublicOrigin(svc.settings)  # an app not from create_app
    return origin.base(client_info(request, svc.trusted))


async def identity_of(request: web.Request, svc: Services) -> Identity | None:
    client = client_info(request, svc.trusted)
    who = await identify(request.headers, svc.sessions, svc.settings, client.peer_trusted)
    return who.identity


async def lookup_of(svc: Services, identity: Identity | None) -> Lookup | None:
    if identity is None:
        return None
    return await svc.entitlements.lookup(identity)


def render(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    """A page template with this browser's CSRF form token (and its nonce cookie, when new)."""
    csrf = request.app[CSRF_KEY]
    new_cookies: dict[str, str] = {}
    token = csrf.token(request, new_cookies)
    response = render_html(
        request.app[SETTINGS],
        template,
        {"csrf_token": token, **context},
        status=status,
    )
    for nonce in new_cookies.values():
        csrf.set_cookie(response, nonce)
    return response


async def checked_form(request: web.Request) -> dict[str, str] | web.Response:
    """The POSTed form if its CSRF token and Origin are valid, else a 403 page."""
    svc = services(request)
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    origin = str(URL(base_url(request, svc)).origin())
    if not request.app[CSRF_KEY].valid(request, fields.get("csrf", ""), origin):
        log_event(log, "csrf_rejected", path=request.path)
        return error_page(
            request,
            svc.settings,
            "form_expired",
            "This form has expired",
            "Please go back, reload the page and try again.",
            status=403,
            retry_url=f"{svc.settings.gate_prefix}/subscribe",
        )
    return fields


FormHandler = Callable[[web.Request, Services, dict[str, str]], Awaitable[web.Response]]


def form_post(handler: FormHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A POST handler run only with a valid CSRF token and Origin (:func:`checked_form`; else
    its 403 page); ``handler`` gets the services and the form's fields."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.Response:
        form = await checked_form(request)
        if isinstance(form, web.Response):
            return form
        return await handler(request, services(request), form)

    return checked


T = TypeVar("T")

#: Who may send a form (the signed-in owner of what it changes, with what the handler needs),
#: or the answer refusing it.
Authorize = Callable[[web.Request, Services, dict[str, str]], Awaitable[T | web.Response]]
AuthorizedHandler = Callable[[web.Request, Services, dict[str, str], T], Awaitable[web.Response]]


def authorized_form(
    authorize: Authorize[T],
) -> Callable[[AuthorizedHandler[T]], Callable[[web.Request], Awaitable[web.Response]]]:
    """A :func:`form_post` handler run only when ``authorize`` (given the request, the services
    and the checked form) finds who may send it; the handler gets what it found as its last
    argument. When it refuses, its answer (a sign-in redirect, a 403 page) is the response."""

    def decorate(
        handler: AuthorizedHandler[T],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        @form_post
        @functools.wraps(handler)
        async def authorized(
            request: web.Request, svc: Services, form: dict[str, str]
        ) -> web.Response:
            found = await authorize(request, svc, form)
            if isinstance(found, web.Response):
                return found
            return await handler(request, svc, form, found)

        return authorized

    return decorate


def stripe_down(request: web.Request, retry_url: str) -> web.Response:
    """Stripe could not be reached (or refused): 503, nothing was charged."""
    return error_page(
        request,
        services(request).settings,
        "billing_unavailable",
        "Billing is temporarily unavailable",
        "We could not reach our payment provider. Nothing was charged. "
        "Please try again in a moment.",
        retry_url=retry_url,
    )
