"""Forward auth: ``GET {GATE_PREFIX}/auth`` for nginx ``auth_request``, Caddy ``forward_auth``
and Traefik ``ForwardAuth``.

The proxy in front of the app asks the gate about each request with a subrequest that carries
the original request's headers (Cookie, Accept, …) and names the original request in
``X-Original-URI`` + ``X-Original-Method`` (nginx, set in its config) or ``X-Forwarded-Uri`` +
``X-Forwarded-Method`` (+ ``X-Forwarded-Host`` / ``-Proto``; Caddy and Traefik send these). The
gate runs the same check as on its own proxy path (:func:`gateway.gate.check`) and answers:

| case | default (Caddy, Traefik) | ``?mode=nginx`` |
|---|---|---|
| TCP peer not in ``TRUSTED_PROXIES`` | 403 | 403 |
| billing off, public path, gate path | 200 | 200 |
| allowed | 200 + ``X-Gate-User/-Email/-Status/-Plan`` | same |
| browser, not signed in / not paying | 303 to subscribe (absolute) | 401 ``redirect`` |
| API, not signed in | 401 JSON | 401 ``unauthorized`` |
| API, not paying | 402 JSON | 401 ``payment_required`` |
| Stripe down, ``ON_STRIPE_ERROR=deny`` | 503 (HTML page or JSON) | 401 ``unavailable`` |
| malformed path, no original URI | 400 JSON | 403 |

(nginx mode: the word is the ``X-Gate-Denial`` header.)

Which mode: ``?mode=nginx`` or ``?mode=default`` when given; without ``?mode``, nginx mode when
the original request is named by ``X-Original-URI`` alone — nginx's own documented
``auth_request`` setup does that, and Caddy and Traefik send ``X-Forwarded-Uri`` — so that a
plain nginx config never turns a denial into a 500.

Why two modes: Caddy and Traefik hand a non-2xx auth answer to the client as it is, so the
gate's own denial works unchanged. nginx's ``auth_request`` only understands 2xx, 401 and 403
and turns anything else into a 500, so in nginx mode every denial the user should see is a 401
that says what happened in ``X-Gate-Denial`` and where to go in ``X-Gate-Location`` (the absolute
subscribe URL with ``next`` = the original URI; absent for ``unavailable``: sending a payer to
the landing page during a Stripe outage would tell them they have not paid). The example config
(``deploy/nginx/gateway-forward-auth.conf``) turns that into a 303, a 401/402 JSON or a 503.

Trust: the original-request headers and the identity they carry are believed only from a
``TRUSTED_PROXIES`` peer; anyone else gets 403, so the endpoint is no oracle for who has paid.
Redirects are made absolute from the trusted ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` (the
host the user is on) only when that host is in ``ALLOWED_HOSTS``, else from ``PUBLIC_URL``, else
left relative: a forged ``X-Forwarded-Host`` never reaches a Location or a JSON URL. The gate's
pages must be reachable on that host under ``GATE_PREFIX`` (route ``GATE_PREFIX`` to the gate
without auth); a check of a gate path answers 200.

A missing ``X-Original-Method`` / ``X-Forwarded-Method`` counts as ``GET``.
"""

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

from aiohttp import hdrs, web

from gateway import responses
from gateway.forwarded import ClientInfo, PublicOrigin, TrustedNetworks, client_info
from gateway.gate import check
from gateway.logs import log_event
from gateway.metrics import FORWARD_AUTH
from gateway.model import Denial
from gateway.paths import PublicPaths, normalize_path
from gateway.services import SERVICES
from gateway.settings import Settings

__all__ = ["DENIAL_HEADER", "LOCATION_HEADER", "add_routes", "auth_handler"]

#: nginx mode: what kind of denial a 401 stands for (rendered by :mod:`gateway.responses`).
DENIAL_HEADER = responses.DENIAL_HEADER
#: nginx mode: where to send the user (absolute subscribe URL).
LOCATION_HEADER = responses.LOCATION_HEADER

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_URI_HEADERS = ("X-Original-URI", "X-Forwarded-Uri")
_METHOD_HEADERS = ("X-Original-Method", "X-Forwarded-Method")
_METHOD = re.compile(r"[A-Za-z]{1,32}")
# A Host (name or IPv4, or a bracketed IPv6) with an optional port; anything else is not used
# to build a Location.
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def add_routes(app: web.Application, settings: Settings) -> None:
    """Register ``GET {GATE_PREFIX}/auth`` (billing on or off)."""
    app.router.add_get(f"{settings.gate_prefix}/auth", auth_handler(settings))


def auth_handler(settings: Settings) -> Handler:
    trusted = TrustedNetworks(settings.trusted_proxies)
    prefix = settings.gate_prefix
    gate_paths = PublicPaths((prefix, f"{prefix}/*"))
    billing = settings.billing_enabled
    origin = PublicOrigin(settings)

    async def auth(request: web.Request) -> web.StreamResponse:
        mode = _mode(request)
        response = await _answer(request, mode == "nginx")
        FORWARD_AUTH[(mode, response.status)] += 1
        return response

    async def _answer(request: web.Request, nginx: bool) -> web.StreamResponse:
        client = client_info(request, trusted)
        if not client.peer_trusted:
            log_event(
                log,
                "forward_auth_refused",
                level=logging.INFO,
                peer=request.remote or "-",
                reason="peer not in TRUSTED_PROXIES",
            )
            return responses.forbidden("forward auth answers trusted proxies only")
        if not billing:
            return responses.forward_auth_allowed(_NO_HEADERS)
        original = _original_request(request.headers)
        if original is None:
            log_event(
                log,
                "forward_auth_bad_request",
                level=logging.WARNING,
                reason="no valid X-Original-URI/X-Forwarded-Uri or method header",
                rid=client.request_id,
            )
            if nginx:
                return responses.forbidden("missing or malformed original request headers")
            message = "X-Original-URI or X-Forwarded-Uri (and a method) required"
            return responses.error_json(400, responses.error_body("bad_request", message))
        method, uri = original
        path = normalize_path(uri)
        if path is not None and gate_paths.matches(path, uri):
            return responses.forward_auth_allowed(_NO_HEADERS)
        svc = request.app[SERVICES]
        verdict = await check(request, client, svc, method=method, raw_path=uri)
        if not isinstance(verdict, Denial):
            return responses.forward_auth_allowed(verdict)
        base = _public_base(request.headers, client, origin)
        return responses.forward_auth_denial(request, verdict, settings, nginx=nginx, base=base)

    return auth


def _mode(request: web.Request) -> str:
    """``nginx`` or ``default`` (see the module docstring, "Which mode")."""
    asked = request.query.get("mode")
    if asked is not None:
        return "nginx" if asked == "nginx" else "default"
    headers = request.headers
    if _URI_HEADERS[0] in headers and _URI_HEADERS[1] not in headers:
        return "nginx"
    return "default"


def _original_request(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """(method, raw URI) of the request being authorized, or None when unusable."""
    uri = next((v for h in _URI_HEADERS if (v := headers.get(h))), None)
    if uri is None or not uri.startswith("/"):
        return None
    method = next((v for h in _METHOD_HEADERS if (v := headers.get(h))), "GET")
    if not _METHOD.fullmatch(method):
        return None
    return method.upper(), uri


def _public_base(headers: Mapping[str, str], client: ClientInfo, origin: PublicOrigin) -> str:
    """``scheme://host`` the redirect starts with: with ``ALLOWED_HOSTS``, the host the user is
    on (the trusted proxy's X-Forwarded-Host; the caller has checked the peer) when it is on the
    list; else PUBLIC_URL; else "" (relative redirects). Never an unlisted host."""
    if headers.get(hdrs.X_FORWARDED_HOST) and _HOST.fullmatch(client.host):
        return origin.base(client)
    return origin.public_url
