"""The billing gate on the request path: identity → entitlement → decision, as a value.

``check`` runs for every proxied request (and every forward-auth question) when billing is on.
It returns a :data:`GateVerdict`: a :class:`~gateway.model.Pass` (the ``X-Gate-*`` headers to
send upstream, and whether the verdict is remembered) or a :class:`~gateway.model.Denial`
saying how the request is refused; :mod:`gateway.responses` renders denials for each surface.

The common case — a paying user whose entitlement is in the in-process L1 cache — does no I/O
at all. Once a user has been allowed, their next requests are answered from the remembered
verdicts (``Services.verdicts``, :class:`gateway.l1.Verdicts`) after the path checks, without
parsing the cookie or deciding again: keyed on the raw ``Cookie`` header for a cookie session,
on the header's value for a user named by the trusted identity header (looked up only when the
peer is trusted; a value is never reused for another). A remembered verdict lasts as long as
the L1 entry it rests on (any change of the customer ends it), the session cache entry (cookie
users: at most ``L1_TTL``; at once when the session is revoked on this worker) and the access.
With ``FEATURE_RULES``, the path's required feature is matched first
(:class:`gateway.features.FeatureRules`, remembered per path), decided with the other facts, and
a remembered verdict is only used for a path whose feature it carries.
"""

import logging
from types import MappingProxyType

from aiohttp import hdrs, web

from gateway.decision import back_of, decide, request_facts
from gateway.forwarded import ORIGIN, ClientInfo
from gateway.identity import identify_from
from gateway.identity_header import trusted_identity_header
from gateway.l1 import Guard
from gateway.logs import log_event
from gateway.metrics import DECISIONS
from gateway.model import Allow, Denial, Identity, Lookup, Pass
from gateway.services import SERVICES, Services
from gateway.usage.hook import free_entitlement

__all__ = ["UPSTREAM_HEADERS", "GateVerdict", "check", "gate_headers"]

log = logging.getLogger("gateway.gate")

#: What :func:`check` decides: a :class:`Pass` (the headers for upstream; a remembered verdict
#: is handed out as it is kept, so the hot path allocates nothing for it), or a :class:`Denial`.
GateVerdict = Pass | Denial

#: Every header the gate tells the app about an allowed request, in the order it sets them: what
#: a proxy in front of the app (the shipped nginx, Caddy and Traefik examples) must set from the
#: gate's answer, or remove, so a client's own copy never reaches the app. The tests build their
#: table of forged headers from this tuple.
UPSTREAM_HEADERS = (
    "X-Gate-User",
    "X-Gate-Email",
    "X-Gate-Status",
    "X-Gate-Plan",
    "X-Gate-Features",
    "X-Gate-Quota",
)
_USER, _EMAIL, _STATUS, _PLAN, _FEATURES, _QUOTA = UPSTREAM_HEADERS

_PUBLIC = Pass(MappingProxyType({}))
_BAD_PATH = Denial("bad_request", 400, "bad_request")


def gate_headers(
    identity: Identity | None, lookup: Lookup | None, features: frozenset[str] = frozenset()
) -> dict[str, str]:
    """``X-Gate-User/-Email/-Status/-Plan/-Features`` for an allowed request (``features``:
    the customer's, comma-separated and sorted; no header without any).

    A value that cannot be sent in an HTTP header (CR, LF, NUL or another control character,
    or a character outside Latin-1 — e.g. from a session issued before emails were checked)
    is dropped and logged, so it can neither fail the request nor inject a header."""
    if identity is None:
        return {}
    ent = lookup.entitlement if lookup else None
    headers = {_USER: identity.customer_id or (ent.customer_id if ent else identity.key)}
    if identity.email:
        headers[_EMAIL] = identity.email
    if ent is not None:
        headers[_STATUS] = ent.status
        if ent.price_id:
            headers[_PLAN] = ent.price_id
    if features:
        headers[_FEATURES] = ",".join(sorted(features))
    for name, value in list(headers.items()):
        if any(c < " " or "\x7f" <= c <= "\x9f" or c > "\xff" for c in value):
            del headers[name]
            # Not the value: it is personal data and whatever an attacker put in it.
            log_event(log, "upstream_header_dropped", level=logging.WARNING, header=name)
    return headers


async def check(
    request: web.Request,
    client: ClientInfo,
    svc: Services | None = None,
    *,
    method: str | None = None,
    raw_path: str | None = None,
) -> GateVerdict:
    """Allow (→ :class:`Pass`) or deny (→ :class:`Denial`) one request.

    ``svc`` defaults to the app's services (the proxy's gate hook passes none). ``method`` and
    ``raw_path`` (path + query, as sent) default to the request's own; forward auth passes the
    original request's (``X-Original-URI`` / ``X-Forwarded-Uri``) instead.
    """
    if svc is None:
        svc = request.app[SERVICES]
    settings = svc.settings
    own_path = raw_path is None
    if raw_path is None:
        raw_path = request.raw_path
    path, public = svc.public_paths.classify(raw_path)
    headers = request.headers
    if path is None:
        DECISIONS.inc("bad_request")
        return _BAD_PATH
    if public:
        DECISIONS.inc("allow")
        return _PUBLIC
    feature = settings.feature_table.required(path, raw_path) if settings.feature_rules else None
    # A believed identity header wins over the cookie (trusted_identity_header has the rule).
    # Without IDENTITY_HEADER, not even the call.
    named = (
        trusted_identity_header(headers, settings, client.peer_trusted)
        if settings.identity_header
        else None
    )
    cookie = headers.get(hdrs.COOKIE)
    if named is not None:
        remembered = svc.verdicts.remembered(named, feature, True)
    elif cookie is not None:
        remembered = svc.verdicts.remembered(cookie, feature)
    else:
        remembered = None
    if remembered is not None:
        DECISIONS.inc("allow")
        return remembered
    identity, session = await identify_from(named, cookie, svc.sessions, settings)
    lookup: Lookup | None = None
    if identity is not None:
        lookup = svc.entitlements.lookup_cached(identity)
        if lookup is None:
            lookup = await svc.entitlements.lookup(identity)
    query = request.rel_url.raw_query_string if own_path else raw_path.partition("?")[2]
    back = "/"
    if feature is not None:  # only a feature refusal sends a browser back (see decision)
        back = back_of(headers.get(hdrs.REFERER), _origins(request, client), settings.gate_prefix)
    facts = request_facts(method or request.method, path, query, headers, feature, back, raw_path)
    verdict = decide(facts, identity, lookup, settings, svc.clock.now())
    if isinstance(verdict, Denial) and verdict.reason == "subscription_required":
        # FREE_QUOTAS: a signed-in customer without a subscription may use a metered path.
        free = free_entitlement(svc, method or request.method, raw_path, identity, lookup)
        if free is not None:
            DECISIONS.inc("allow")
            return Pass(gate_headers(identity, lookup), entitlement=free)
    DECISIONS.inc(verdict.kind)
    if isinstance(verdict, Denial):
        if verdict.kind == "unavailable":
            log_event(log, "denied", reason=verdict.reason, path=path)
        return verdict
    upstream = gate_headers(identity, lookup, verdict.features)
    if verdict.access is None or identity is None or lookup is None:
        return Pass(upstream)  # billing off, fail open: nothing to remember (nor to count)
    # Remembered under what the identity came from (a believed header that is not an email
    # falls back to the cookie: then neither is remembered).
    if identity.source == "header" and named is not None:
        return _remember(svc, named, True, identity, lookup, upstream, verdict, _NO_SESSION)
    if identity.source == "cookie" and named is None and cookie is not None and session is not None:
        return _remember(svc, cookie, False, identity, lookup, upstream, verdict, session)
    return Pass(upstream, entitlement=lookup.entitlement)


def _origins(request: web.Request, client: ClientInfo) -> tuple[str, ...]:
    """The gate's own origin for this request: the public one (``PUBLIC_URL``, or the
    validated host with ``ALLOWED_HOSTS``), else (none configured: billing off, tests) the one
    the client used."""
    origin = request.app.get(ORIGIN)
    public = origin.base(client) if origin is not None else ""
    return (public or (f"{client.scheme}://{client.host}" if client.host else ""),)


# ------------------------------------------------------------------ remembered verdicts
# (Services.verdicts answers them in check; what is remembered, and until when, here.)


class _NoSession:
    """The guard of an identity-header verdict: no session of the gate's to end it (the auth
    proxy in front owns the user's sign-in); its L1 entry and the access bound it."""

    live = True
    until = float("inf")


_NO_SESSION = _NoSession()


def _remember(
    svc: Services,
    key: str,
    header: bool,
    identity: Identity,
    lookup: Lookup,
    headers: dict[str, str],
    allow: Allow,
    guard: Guard,
) -> Pass:
    """Keep an allowed verdict for the next requests with this ``Cookie`` header (``header``:
    this identity-header value), when it rests on a live L1 entry and access the rules
    granted (``allow.access``; not fail-open) and, for a cookie, on the session cache entry the
    identity came from (it dies with it: revocation on this worker; and never outlives it:
    ``L1_TTL``, revocations elsewhere)."""
    acc = allow.access
    if acc is None or lookup.entitlement is None or lookup.error is not None or not acc.allowed:
        return Pass(headers, entitlement=lookup.entitlement)
    until = guard.until
    if acc.ends_at is not None and acc.ends_kind != "renews":
        # A scheduled end (cancellation, trial end, grace, grant): access stops there.
        until = min(until, acc.ends_at.timestamp())
    return svc.verdicts.put(
        key, identity.key, lookup, headers, until, guard, allow.features, header=header
    )
