"""The aiohttp application: the gate's own routes under ``GATE_PREFIX``, then a catch-all that
resolves the client (trusted proxies), asks the gate, and proxies.

The request path is kept lean on purpose (it is benchmarked against a bare aiohttp proxy): no
middlewares, objects built once here and captured by the handler, no per-request lookups in
the app mapping.
"""

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import billing
from gateway.forwarded import (
    CLIENT_KEY,
    ORIGIN,
    ClientInfo,
    PublicOrigin,
    TrustedNetworks,
    client_info,
)
from gateway.gate import GateVerdict, check
from gateway.limits import Limits
from gateway.model import Clock, Denial
from gateway.proxy_http import UpstreamProxy
from gateway.responses import bad_host, denial_response, error_response
from gateway.services import CLOCK, SERVICES, SETTINGS, StripeFactory
from gateway.settings import Settings
from gateway.usage.hook import USAGE_ENTITLEMENT, by_api_key, count_request, quota_response
from gateway.usage.service import QuotaExceeded
from gateway.watch import Watch

__all__ = ["ORIGIN", "PROXY", "TRUSTED", "Gate", "create_app", "gate_not_found", "healthz"]

#: The gate: given the request and its resolved client, a :data:`~gateway.gate.GateVerdict`:
#: a :class:`~gateway.model.Pass` with the headers to add upstream (``X-Gate-User`` etc.) for
#: an allowed request, or a :class:`~gateway.model.Denial` (rendered by
#: :func:`gateway.responses.denial_response`).
Gate = Callable[[web.Request, ClientInfo], Awaitable[GateVerdict]]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROXY = web.AppKey("proxy", UpstreamProxy)
TRUSTED = web.AppKey("trusted", TrustedNetworks)

_NO_GATE_HEADERS: Mapping[str, str] = MappingProxyType({})


def create_app(
    settings: Settings,
    extra_setup: Callable[[web.Application], None] | None = None,
    *,
    gate: Gate | None = None,
    stripe_factory: StripeFactory | None = None,
    clock: Clock | None = None,
    limits: Limits | None = None,
) -> web.Application:
    """Build the application.

    ``extra_setup(app)`` runs after the built-in gate routes and before the catch-all: register
    gate routes (under ``settings.gate_prefix``) and ``cleanup_ctx`` entries there.
    ``gate`` is the billing hook between client resolution and the proxy (None: the billing
    gate when billing is on, else allow all). ``stripe_factory`` replaces the Stripe client
    (tests exercise failure paths with it); ``clock`` the services' clock (tests move a
    :class:`~gateway.model.ManualClock` instead of waiting); ``limits`` the plan made once at
    startup (:func:`gateway.server.serve`; None: planned here from the current open-file limit).
    """
    app = web.Application()
    if gate is None and settings.billing_enabled:
        gate = check  # with the app's services
    # Open WebSockets and streams are asked the gate again while they last (gateway.watch).
    watch = Watch(gate, settings.ws_recheck_interval) if gate is not None else None
    proxy = UpstreamProxy(settings, watch, limits)
    trusted = TrustedNetworks(settings.trusted_proxies)
    app[SETTINGS] = settings
    app[PROXY] = proxy
    app[TRUSTED] = trusted
    app[ORIGIN] = PublicOrigin(settings)
    if clock is not None:
        app[CLOCK] = clock
    if settings.allowed_hosts:
        app.middlewares.append(_host_guard(settings, trusted, app[ORIGIN]))

    app.router.add_get(f"{settings.gate_prefix}/healthz", healthz)
    billing.install(app, settings, stripe_factory)
    if extra_setup is not None:
        extra_setup(app)
    # Anything else under the prefix is the gate's, never the upstream's.
    app.router.add_route("*", f"{settings.gate_prefix}/{{tail:.*}}", gate_not_found)
    app.router.add_route("*", "/{tail:.*}", _proxy_handler(proxy, trusted, gate, settings))

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        await proxy.start()
        if watch is not None:
            svc = app.get(SERVICES)  # built before this context (billing.install added it)
            if svc is not None:
                watch.listen(svc.changes)
            watch.start()
        try:
            yield
        finally:
            if watch is not None:
                await watch.close()
            await proxy.close()

    async def close_websockets(app: web.Application) -> None:
        await proxy.close_websockets()

    app.cleanup_ctx.append(upstream_session)
    app.on_shutdown.append(close_websockets)
    return app


def _host_guard(settings: Settings, trusted: TrustedNetworks, origin: PublicOrigin) -> Middleware:
    """``ALLOWED_HOSTS``: a request for any other host is a 400, before any handler runs (as
    Django does). Installed only when the list is set, so the default hot path has no
    middleware. Probes and forward auth are exempt: they build no URL from the host (forward
    auth falls back to ``PUBLIC_URL`` or a relative redirect), and a 400 there would fail a
    liveness probe or become a 500 in nginx's ``auth_request``."""
    p = settings.gate_prefix
    exempt = frozenset(f"{p}/{name}" for name in ("healthz", "readyz", "metrics", "auth"))

    @web.middleware
    async def host_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in exempt and not origin.host_allowed(client_info(request, trusted)):
            return bad_host(request, settings)
        return await handler(request)

    return host_guard


def _proxy_handler(
    proxy: UpstreamProxy, trusted: TrustedNetworks, gate: Gate | None, settings: Settings
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    if gate is None:

        async def forward(request: web.Request) -> web.StreamResponse:
            client = client_info(request, trusted)
            request[CLIENT_KEY] = client
            return await proxy.handle(request, client, _NO_GATE_HEADERS)

        return forward

    metering = bool(settings.usage)
    if metering:

        def usage_of_response(request: web.Request, values: list[str]) -> None:
            svc = request.app.get(SERVICES)
            if svc is not None and svc.usage is not None:
                svc.usage.on_response(request.get(USAGE_ENTITLEMENT), values)

        proxy.on_usage = usage_of_response

    async def gated(request: web.Request) -> web.StreamResponse:
        client = client_info(request, trusted)
        request[CLIENT_KEY] = client
        # gate hook: identity → entitlement → decision
        verdict = await gate(request, client)
        if isinstance(verdict, Denial):
            return denial_response(request, verdict, settings)
        if metering and (svc := request.app.get(SERVICES)) is not None:
            # usage: count the allowed request, or refuse it past its quota
            counted = await count_request(svc, request, verdict, request.method, request.raw_path)
            if isinstance(counted, QuotaExceeded):
                now = svc.clock.now()
                script = by_api_key(svc, request)
                return quota_response(request, settings, counted, now, script=script)
            if isinstance(counted, Denial):
                return denial_response(request, counted, settings)
            verdict = counted
        return await proxy.handle(request, client, verdict.headers)

    return gated


async def healthz(request: web.Request) -> web.Response:
    """Liveness, answered locally (never proxied). ``pid`` tells workers apart."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def gate_not_found(request: web.Request) -> web.Response:
    """Anything under ``GATE_PREFIX`` that is not a gate route: 404, never the upstream's."""
    message = "There is nothing here."
    return error_response(request, request.app[SETTINGS], 404, "not_found", message)
