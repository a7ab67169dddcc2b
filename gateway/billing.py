"""The billing side of the app: static files, gate pages, the webhook endpoint and
``readyz`` (the gate that runs before the proxy is :func:`gateway.gate.check`).

``install(app, settings)`` is called by :func:`gateway.app.create_app`; with billing off it
installs only the pages that say so.
"""

import logging
import secrets

from aiohttp import web

from gateway import forward_auth, pages, static_files
from gateway.csrf import CSRF
from gateway.logs import log_event
from gateway.metrics import WEBHOOK_RESPONSES, metrics_handler
from gateway.services import SERVICES, SETTINGS, STRIPE_FACTORY, StripeFactory, services_ctx
from gateway.settings import Settings, billing_state
from gateway.usage import endpoint as usage_endpoint
from gateway.webhooks import handle_webhook

__all__ = ["install", "readyz", "webhook"]

log = logging.getLogger("gateway")


def install(
    app: web.Application, settings: Settings, stripe_factory: StripeFactory | None = None
) -> None:
    app[SETTINGS] = settings
    enabled, why = billing_state(settings)
    log_event(log, "billing", mode="on" if enabled else "off", reason=why)
    secret = settings.session_secret or secrets.token_hex(32)
    app[pages.CSRF_KEY] = CSRF(settings, secret)
    prefix = settings.gate_prefix
    static_files.add_routes(app, prefix)  # a missing file is the styled 404
    app.router.add_get(f"{prefix}/readyz", readyz)
    app.router.add_get(f"{prefix}/metrics", metrics_handler(settings))
    forward_auth.add_routes(app, settings)
    pages.add_routes(app, settings)
    if not settings.billing_enabled:
        return
    if stripe_factory is not None:
        app[STRIPE_FACTORY] = stripe_factory
    app.cleanup_ctx.append(services_ctx)
    app.router.add_post(f"{prefix}/webhooks/stripe", webhook)
    if settings.usage:
        usage_endpoint.add_routes(app, settings)


async def webhook(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    response = await handle_webhook(
        request, settings=svc.settings, store=svc.store, entitlements=svc.entitlements
    )
    WEBHOOK_RESPONSES.inc(response.status)
    return response


async def readyz(request: web.Request) -> web.Response:
    """Ready: settings were valid (or we would not run) and, with billing on, the store is
    writable (SQLite: ``DATABASE_PATH`` still the file it opened; PostgreSQL: the database
    reachable), ``checks.store`` naming the problem otherwise. Stripe is deliberately not
    checked: its outage must not pull every replica."""
    settings = request.app[SETTINGS]
    checks = {"settings": "ok"}
    ok = True
    if settings.billing_enabled:
        svc = request.app.get(SERVICES)
        problem = await svc.store.readiness() if svc is not None else "not writable"
        checks["store"] = problem or "ok"
        ok = problem is None
        if svc is not None:
            checks["stripe_breaker"] = svc.entitlements.breaker.state
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
    )
