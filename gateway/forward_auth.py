"""Forward auth: ``GET {GATE_PREFIX}/auth`` for nginx ``auth_request``, Caddy ``forward_auth``
and Traefik ``ForwardAuth``.

The proxy in front of the app asks the gate about each request with a subrequest that carries
the original request's headers (Cookie, Accept, …), names the original request in the two
headers of the mode it asks for and the public host in ``X-Forwarded-Host`` / ``-Proto``. The
gate runs the same check as on its own proxy path (:func:`gateway.gate.check`) and answers:

| case | default, ``?mode=nginx`` | ``?mode=passthrough`` (Caddy, Traefik) |
|---|---|---|
| original request from | ``X-Original-URI``/``-Method`` | ``X-Forwarded-Uri``/``-Method`` |
| TCP peer not in ``TRUSTED_PROXIES`` | 403 | 403 |
| billing off, public path, gate path | 200 | 200 |
| allowed | 200 + :data:`~gateway.gate.UPSTREAM_HEADERS` (+ ``max-age``, below) | same |
| browser, not signed in / not paying | 401 ``redirect`` | 303 to subscribe (absolute) |
| API, not signed in | 401 ``unauthorized`` | 401 JSON |
| API, not paying | 401 ``payment_required`` | 402 JSON |
| Stripe down, ``ON_STRIPE_ERROR=deny`` | 401 ``unavailable`` | 503 (HTML page or JSON) |
| malformed path, no (or two) original URI / method | 403 | 400 JSON |

(Default: the word is the ``X-Gate-Denial`` header, and the 401 carries the gate's JSON error
body with ``subscribe_url``.)

Only the mode's own pair is read, never the other as a fallback: a proxy passes the client's
headers on and sets only its own pair (nginx: ``proxy_set_header``; Caddy and Traefik: always
``X-Forwarded-Uri``/``-Method``), so the other pair is the client's (``X-Original-URI: /_gate/x``
sent through Caddy for ``/api/x`` would be decided as a gate path while the app gets ``/api/x``).
A header of the pair sent twice is refused (a proxy adding its own beside the client's).

Why the default answers only 200, 401 and 403: nginx's ``auth_request`` understands 2xx, 401
and 403 and turns any other status into a 500 for the user, so a config written from nginx's
own documentation (no ``?mode``) must never see a 303, 402 or 503 — oauth2-proxy answers
202/401 for the same reason. Every denial the user should see is a 401 that says what happened
in ``X-Gate-Denial`` and where to go in ``X-Gate-Location`` (the absolute subscribe URL with
``next`` = the original URI; absent for ``unavailable``: sending a payer to the landing page
during a Stripe outage would tell them they have not paid). The shipped nginx example
(``deploy/nginx/gateway-forward-auth.conf``) turns that into a 303, a 401/402 JSON or a 503.
Caddy and Traefik hand a non-2xx auth answer to the client as it is, so their examples opt in
to the gate's own answers with ``?mode=passthrough``. The mode is never guessed from headers:
nginx configs copied from other projects' docs send ``X-Forwarded-Uri`` too (ignored here).

Trust: the original-request headers and the identity they carry are believed only from a
``TRUSTED_PROXIES`` peer; anyone else gets 403, so the endpoint is no oracle for who has paid.
A trusted proxy still passes on whatever else the client sent, so the shipped examples drop the
client's own copies of the headers the gate reads (and of ``X-Gate-*``) before they ask.
Redirects are made absolute from the trusted ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` (the
host the user is on) only when that host is in ``ALLOWED_HOSTS``, else from ``PUBLIC_URL``, else
left relative: a forged ``X-Forwarded-Host`` never reaches a Location or a JSON URL. The gate's
pages must be reachable on that host under ``GATE_PREFIX`` (route ``GATE_PREFIX`` to the gate
without auth); a check of a gate path (``GATE_PREFIX/…``, not the bare prefix, which the shipped
configs send to the app) answers 200.

A missing ``X-Original-Method`` / ``X-Forwarded-Method`` counts as ``GET``.

Caching (the shipped nginx config keeps allow answers in ``proxy_cache``, keyed on the session
cookie's value and the identity header): a 200 says ``Cache-Control: max-age=N`` only when it is
the gate's own remembered verdict for that cookie session (see :func:`_cacheable_for`), N = what
is left of it (at most ``L1_TTL``); every other answer, every denial, and an allow the gate
remembers for an identity header say ``no-store``. So nginx's cache ends about when the gate's
verdict would, and a sign-out or cancellation takes effect within ``L1_TTL`` + 2 s. The
question itself is answered like a proxied request: the original request's ``Cookie`` (or
identity header) goes through :func:`gateway.gate.check`, whose remembered verdicts answer a
paying user without parsing the cookie.
"""

import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy

from gateway import responses
from gateway.forwarded import ClientInfo, PublicOrigin, TrustedNetworks, client_info
from gateway.gate import check
from gateway.logs import log_event
from gateway.metrics import FORWARD_AUTH
from gateway.model import Denial, Pass
from gateway.paths import PublicPaths, normalize_path
from gateway.proxy_headers import HeaderPolicy, app_credentials
from gateway.services import SERVICES, Services
from gateway.settings import SESSION_COOKIE, Settings
from gateway.usage.hook import by_api_key, count_request, quota_forward_auth
from gateway.usage.service import QuotaExceeded

__all__ = [
    "DENIAL_HEADER",
    "LOCATION_HEADER",
    "ORIGINAL_REQUEST_HEADERS",
    "add_routes",
    "auth_handler",
]

#: nginx mode: what kind of denial a 401 stands for (rendered by :mod:`gateway.responses`).
DENIAL_HEADER = responses.DENIAL_HEADER
#: nginx mode: where to send the user (absolute subscribe URL).
LOCATION_HEADER = responses.LOCATION_HEADER

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
#: The (URI, method) headers each mode reads the original request from, and nothing else.
ORIGINAL_REQUEST_HEADERS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "nginx": ("X-Original-URI", "X-Original-Method"),
        "passthrough": ("X-Forwarded-Uri", "X-Forwarded-Method"),
    }
)
_METHOD = re.compile(r"[A-Za-z]{1,32}")
_BROWSER_FORM_COOKIE = re.compile(rf"(?:^|; ){re.escape(SESSION_COOKIE)}=[^;\s]")
# A Host (name or IPv4, or a bracketed IPv6) with an optional port; anything else is not used
# to build a Location.
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def add_routes(app: web.Application, settings: Settings) -> None:
    """Register ``GET {GATE_PREFIX}/auth`` (billing on or off)."""
    app.router.add_get(f"{settings.gate_prefix}/auth", auth_handler(settings))


def auth_handler(settings: Settings) -> Handler:
    trusted = TrustedNetworks(settings.trusted_proxies)
    prefix = settings.gate_prefix
    # Only what the shipped configs route to the gate (``/_gate/…``): the bare prefix goes to
    # the app behind Caddy and Traefik, so it is decided like any app path.
    gate_paths = PublicPaths((f"{prefix}/*",))
    billing = settings.billing_enabled
    origin = PublicOrigin(settings)
    policy = HeaderPolicy.from_settings(settings)

    async def auth(request: web.Request) -> web.StreamResponse:
        mode = _mode(request)
        response = await _answer(request, mode)
        FORWARD_AUTH.inc((mode, response.status))
        return response

    async def _answer(request: web.Request, mode: str) -> web.StreamResponse:
        nginx = mode == "nginx"
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
        credentials = None if nginx else app_credentials(request.headers, policy)
        if not billing:
            return responses.forward_auth_allowed(_NO_HEADERS, 0, credentials)
        uri_header, method_header = ORIGINAL_REQUEST_HEADERS[mode]
        original = _original_request(request.headers, uri_header, method_header)
        if original is None:
            message = f"one {uri_header} (a path) and at most one valid {method_header} required"
            log_event(
                log,
                "forward_auth_bad_request",
                level=logging.WARNING,
                reason=f"mode={mode}: {message}",
                rid=client.request_id,
            )
            if nginx:
                return responses.forbidden(message)
            return responses.error_json(400, responses.error_body("bad_request", message))
        method, uri = original
        path = normalize_path(uri)
        if path is not None and gate_paths.matches(path, uri):
            return responses.forward_auth_allowed(_NO_HEADERS, 0, credentials)
        svc = request.app[SERVICES]
        verdict = await check(request, client, svc, method=method, raw_path=uri)
        if not isinstance(verdict, Denial) and svc.usage is not None:
            counted = await count_request(svc, request, verdict, method, uri)
            if isinstance(counted, QuotaExceeded):
                base = _public_base(request.headers, client, origin)
                return quota_forward_auth(
                    request,
                    settings,
                    counted,
                    svc.clock.now(),
                    nginx=nginx,
                    base=base,
                    next_path=uri,
                    script=by_api_key(svc, request),
                )
            verdict = counted
        if not isinstance(verdict, Denial):
            max_age = _cacheable_for(verdict, svc, request.headers)
            return responses.forward_auth_allowed(verdict.headers, max_age, credentials)
        base = _public_base(request.headers, client, origin)
        return responses.forward_auth_denial(request, verdict, settings, nginx=nginx, base=base)

    return auth


def _cacheable_for(verdict: Pass, svc: Services, headers: CIMultiDictProxy[str]) -> int:
    """Whole seconds the proxy may reuse this allow for every request with the same session
    cookie (the shipped nginx config's auth cache, keyed on it), or 0 (``no-store``).

    Only a verdict *remembered for the cookie* qualifies (``verdict.remembered == "cookie"``:
    billing on, allowed by the rules, resting on a live L1 entry and a live session cache entry;
    never a public or a gate path) whose ``Cookie`` header both parsers read alike
    (:func:`_cookie_read_alike`), or for an API key (``"key"``: the shipped nginx cache key
    names the ``Authorization`` header too; the key's cache entry ends within 1 s, so such an
    allow is kept at most 1 s, rounded up). A verdict the gate remembers for a trusted identity
    header stays the gate's own: the proxy's cache is not keyed on that header in every config,
    so it is asked each time (and answers from memory). Only for what is left of it
    (``verdict.until``, which is never past the session cache entry's end, ``L1_TTL`` after the
    session was read from the store, nor past the L1 entry's end or a scheduled end of the
    access). So the proxy's cache ends about when the gate's own verdict would: it adds at most
    the rounding to whole seconds (up here, and nginx's own whole-second clock: 2 s together) to
    the revocation bound the other workers have anyway (``L1_TTL``). Rounded up, not down: a
    verdict with less than a second left would otherwise be asked about on every request until
    it ends (a tenth of a paying user's requests at the default ``L1_TTL``, measured by the
    bench)."""
    if (verdict.remembered != "cookie" and verdict.remembered != "key") or svc.usage is not None:
        # With usage meters the proxy's cache (keyed on the cookie, not the path) would answer
        # a metered path without asking: every request asks (the gate answers from memory).
        return 0
    if verdict.remembered == "cookie" and not _cookie_read_alike(headers):
        return 0
    if verdict.remembered == "key" and svc.settings.api_key_rate.strip():
        # API_KEY_RATE: the gate counts each request of a key; a cached allow would let
        # through whatever the client sends while it lasts.
        return 0
    # The proxy's cache key has no path, so an allow may only be reused for every
    # path when the customer has every feature FEATURE_RULES name (else a Basic customer's
    # allowed /api/search would answer for a Pro-only path).
    rules = svc.settings.feature_table
    if rules and not rules.features <= verdict.features:
        return 0
    left = verdict.until - svc.clock.time()
    return max(0, min(math.ceil(left), math.ceil(svc.settings.l1_ttl))) if left > 0 else 0


def _cookie_read_alike(headers: CIMultiDictProxy[str]) -> bool:
    """Whether the ``Cookie`` header names the session cookie once, in the form browsers send
    (``gate_session=`` at the start or after ``"; "``, a value after it). Only there does
    nginx's ``$cookie_gate_session`` (the shipped auth cache's key: any case, after a comma
    too, spaces skipped before ``=``) read the value the gate decided on; on any other
    spelling a payer could have their allow kept under a made-up value anyone could then send.
    The shipped config's ``proxy_no_cache`` map says the same; this holds without it.
    (nginx joins repeated ``Cookie`` headers with ``"; "``, so they are joined here too.)"""
    joined = "; ".join(headers.getall(hdrs.COOKIE, ()))
    return (
        joined.lower().count(SESSION_COOKIE.lower()) == 1
        and _BROWSER_FORM_COOKIE.search(joined) is not None
    )


def _mode(request: web.Request) -> str:
    """``passthrough`` when asked for (``?mode=passthrough``), else ``nginx``: the answers that
    are safe behind any proxy (see the module docstring)."""
    # nginx asks with ``?mode=nginx`` (or nothing): no query parsing on its every question.
    if "passthrough" not in request.query_string:
        return "nginx"
    return "passthrough" if request.query.get("mode") == "passthrough" else "nginx"


def _original_request(
    headers: CIMultiDictProxy[str], uri_header: str, method_header: str
) -> tuple[str, str] | None:
    """(method, raw URI) of the request being authorized, from the mode's own two headers
    only; None when unusable (missing, malformed or sent more than once)."""
    uris = headers.getall(uri_header, ())
    if len(uris) != 1 or not uris[0].startswith("/"):
        return None
    methods = headers.getall(method_header, ("GET",))
    if len(methods) != 1 or not _METHOD.fullmatch(methods[0]):
        return None
    return methods[0].upper(), uris[0]


def _public_base(headers: Mapping[str, str], client: ClientInfo, origin: PublicOrigin) -> str:
    """``scheme://host`` the redirect starts with: with ``ALLOWED_HOSTS``, the host the user is
    on (the trusted proxy's X-Forwarded-Host; the caller has checked the peer) when it is on the
    list; else PUBLIC_URL; else "" (relative redirects). Never an unlisted host."""
    if headers.get(hdrs.X_FORWARDED_HOST) and _HOST.fullmatch(client.host):
        return origin.base(client)
    return origin.public_url
