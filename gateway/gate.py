"""The billing gate on the request path: identity → entitlement → decision, as a value.

``check`` runs for every proxied request (and every forward-auth question) when billing is on.
It returns a :data:`GateVerdict`: the ``X-Gate-*`` headers to send upstream (allowed), or a
:class:`~gateway.model.Denial` saying how the request is refused; :mod:`gateway.responses`
renders denials for each surface. The common case — a paying user whose entitlement is in the
in-process L1 cache — does no I/O at all; once a session has been allowed, its next requests
(same ``Cookie`` header) are answered from ``Entitlements.cached_verdict`` after the path checks,
without parsing the cookie or deciding again, for as long as that L1 entry, the session cache
entry (at most ``L1_TTL``; at once when the session is revoked on this worker) and the access
last. With ``FEATURE_RULES``, the path's required feature is matched first
(:class:`gateway.features.FeatureRules`, remembered per path), decided with the other facts, and
a remembered verdict is only used for a path whose feature it carries.
"""

import logging
from collections.abc import Mapping
from types import MappingProxyType

from aiohttp import hdrs, web

from gateway.decision import back_of, decide, denial_of, request_facts
from gateway.forwarded import ORIGIN, ClientInfo
from gateway.identity import identify, session_cookie
from gateway.identity_header import trusted_identity_header
from gateway.logs import log_event
from gateway.metrics import DECISIONS
from gateway.model import Access, Denial, Identity, Lookup
from gateway.paths import safe_next
from gateway.rules import features as granted_features
from gateway.services import Services

__all__ = ["UPSTREAM_HEADERS", "GateVerdict", "check", "gate_headers"]

log = logging.getLogger("gateway.gate")

#: What :func:`check` decides: the headers for upstream when the request is allowed, or a
#: :class:`Denial`. Allowed is the (read-only) headers mapping itself, not a wrapper: a
#: remembered verdict is handed out as it is, so the hot path allocates nothing for it.
GateVerdict = Mapping[str, str] | Denial

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
)
_USER, _EMAIL, _STATUS, _PLAN, _FEATURES = UPSTREAM_HEADERS

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
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
    svc: Services,
    *,
    method: str | None = None,
    raw_path: str | None = None,
) -> GateVerdict:
    """Allow (→ headers for upstream) or deny (→ :class:`Denial`) one request.

    ``method`` and ``raw_path`` (path + query, as sent) default to the request's own; forward
    auth passes the original request's (``X-Original-URI`` / ``X-Forwarded-Uri``) instead.
    """
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
        return _NO_HEADERS
    feature = settings.feature_table.required(path, raw_path) if settings.feature_rules else None
    cookie = headers.get(hdrs.COOKIE)
    if cookie is not None:
        # A believed identity header wins over the cookie (trusted_identity_header has the
        # rule): then no per-cookie verdict. Without IDENTITY_HEADER, not even the call.
        if (
            settings.identity_header
            and trusted_identity_header(headers, settings, client.peer_trusted) is not None
        ):
            cookie = None
        else:
            allowed = svc.entitlements.cached_verdict(cookie, feature)  # remembered verdicts
            if allowed is not None:
                DECISIONS.inc("allow")
                return allowed
    identity = await identify(request, svc.sessions, settings, client.peer_trusted)
    lookup: Lookup | None = None
    if identity is not None:
        lookup = svc.entitlements.lookup_cached(identity)
        if lookup is None:
            lookup = await svc.entitlements.lookup(identity)
    query = request.rel_url.raw_query_string if own_path else raw_path.partition("?")[2]
    back = "/"
    if feature is not None:  # only a feature refusal sends a browser back (see decision)
        back = back_of(headers.get(hdrs.REFERER), _origins(request, client), settings.gate_prefix)
    facts = request_facts(method or request.method, path, query, headers, feature, back)
    decision, acc = decide(facts, identity, lookup, settings, svc.clock.now())
    DECISIONS.inc(decision.kind)
    if decision.kind == "allow":
        ent = lookup.entitlement if lookup is not None else None
        features = granted_features(ent, acc, settings) if acc is not None else frozenset()
        result = gate_headers(identity, lookup, features)
        if cookie is not None and identity is not None and lookup is not None and acc:
            return _remember(svc, cookie, identity, lookup, acc, result, features)
        return result
    if decision.kind == "unavailable":
        log_event(log, "denied", reason=decision.reason, path=path)
    return denial_of(decision, safe_next(raw_path))


def _origins(request: web.Request, client: ClientInfo) -> tuple[str, ...]:
    """The gate's own origin for this request: the public one (``PUBLIC_URL``, or the
    validated host with ``ALLOWED_HOSTS``), else (none configured: billing off, tests) the one
    the client used."""
    origin = request.app.get(ORIGIN)
    public = origin.base(client) if origin is not None else ""
    return (public or (f"{client.scheme}://{client.host}" if client.host else ""),)


# ------------------------------------------------------------------ remembered verdicts
# (Entitlements.cached_verdict answers them in check; what is remembered, and until when, here.)


def _remember(
    svc: Services,
    cookie: str,
    identity: Identity,
    lookup: Lookup,
    acc: Access,
    headers: dict[str, str],
    features: frozenset[str],
) -> Mapping[str, str]:
    """Keep an allowed verdict of a cookie session for the next requests with this ``Cookie``
    header, when it rests on a live L1 entry and access the rules granted (``acc``, from
    :func:`decide`; not fail-open)."""
    if identity.source != "cookie" or not svc.settings.billing_enabled:
        return headers
    ent = lookup.entitlement
    if ent is None or lookup.error is not None or not acc.allowed:
        return headers
    value = session_cookie(cookie)
    # The session cache entry the identity came from: the verdict dies with it (revocation
    # on this worker) and never outlives it (L1_TTL: revocations elsewhere).
    session = svc.sessions.entry(value) if value else None
    if session is None or session.identity != identity:
        return headers
    until = session.until
    if acc.ends_at is not None and acc.ends_kind != "renews":
        # A scheduled end (cancellation, trial end, grace, grant): access stops there.
        until = min(until, acc.ends_at.timestamp())
    return svc.entitlements.remember_verdict(
        cookie, identity, lookup, headers, until, session, features
    )
