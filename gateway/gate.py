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
A request with an API key (``API_KEY_HEADER``: :mod:`gateway.apikeys`) is decided by the key
alone — its own remembered verdicts (rate-limited), else the key cache, then the customer's
entitlement as for a session — never redirected, and the app is told ``X-Gate-Key``; a key in
the query string is refused. With ``FEATURE_RULES``, the path's required feature is matched first
(:class:`gateway.features.FeatureRules`, remembered per path), decided with the other facts, and
a remembered verdict is only used for a path whose feature it carries.
"""

import logging
from dataclasses import replace
from types import MappingProxyType

from aiohttp import hdrs, web

from gateway.apikeys.keys import INVALID_KEY, KEY_IN_URL, ApiKeys, KeyEntry, key_in_url
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
    "X-Gate-Team",
    "X-Gate-Role",
    "X-Gate-Key",  # the API key's id (requests with a key only; never the key)
    "X-Gate-Quota",
)
_USER, _EMAIL, _STATUS, _PLAN, _FEATURES, _TEAM, _ROLE, _KEY, _QUOTA = UPSTREAM_HEADERS

_PUBLIC = Pass(MappingProxyType({}))
_BAD_PATH = Denial("bad_request", 400, "bad_request")


def gate_headers(
    identity: Identity | None,
    lookup: Lookup | None,
    features: frozenset[str] = frozenset(),
    team: tuple[str, str] | None = None,
) -> dict[str, str]:
    """``X-Gate-User/-Email/-Status/-Plan/-Features`` for an allowed request (``features``:
    the customer's, comma-separated and sorted; no header without any), and ``X-Gate-Team``
    / ``X-Gate-Role`` with ``team`` (the team's customer id, ``owner`` or ``member``: a
    member's ``X-Gate-User`` is their email, the team's customer being the team's).

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
    if team is not None:
        headers[_TEAM], headers[_ROLE] = team
        if team[1] == "member" and identity.email:
            headers[_USER] = identity.email
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
    # An API key decides alone: never with the cookie or identity header beside it.
    keys = svc.apikeys
    key = keys.credential(headers) if keys is not None else None
    key_entry: KeyEntry | None = None
    if "gk_" in raw_path and key_in_url(raw_path):
        DECISIONS.inc("api_key")
        return KEY_IN_URL
    if key is not None and keys is not None:
        first = await _key_first(keys, key, feature)
        if not isinstance(first, KeyEntry):
            DECISIONS.inc("allow" if isinstance(first, Pass) else first.kind)
            return first
        key_entry = first
    # A believed identity header wins over the cookie (trusted_identity_header has the rule).
    # Without IDENTITY_HEADER, not even the call.
    named = (
        trusted_identity_header(headers, settings, client.peer_trusted)
        if settings.identity_header and key_entry is None
        else None
    )
    cookie = headers.get(hdrs.COOKIE) if key_entry is None else None
    if named is not None:
        remembered = svc.verdicts.remembered(named, feature, True)
    elif cookie is not None:
        remembered = svc.verdicts.remembered(cookie, feature)
    else:
        remembered = None
    if remembered is not None:
        DECISIONS.inc("allow")
        return remembered
    if key_entry is not None:
        identity, session = key_entry.identity, None
    else:
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
    if key_entry is not None:
        facts = replace(facts, is_navigation=False)  # a script: never a redirect
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
    team = svc.teams.role(identity, lookup) if svc.teams is not None and identity else None
    upstream = gate_headers(identity, lookup, verdict.features, team)
    if key_entry is not None:
        upstream[_KEY] = key_entry.key_id
    if verdict.access is None or identity is None or lookup is None:
        return Pass(upstream)  # billing off, fail open: nothing to remember (nor to count)
    if key_entry is not None and key is not None and keys is not None:
        return _remember(svc, key, False, identity, lookup, upstream, verdict, key_entry, keys)
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
    keys: ApiKeys | None = None,
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
    verdicts = keys.verdicts if keys is not None else svc.verdicts  # an API key's own
    return verdicts.put(
        key,
        svc.entitlements.key_of(identity),
        lookup,
        headers,
        until,
        guard,
        allow.features,
        header=header,
    )


async def _key_first(keys: ApiKeys, key: str, feature: str | None) -> Pass | Denial | KeyEntry:
    """An API key's remembered verdict (rate-limited), else its cache entry (the customer it
    acts as), else its denial: ``401 invalid_api_key`` (a key sent twice comes as ``""``),
    ``429`` or ``503``."""
    if not key:
        return INVALID_KEY
    return keys.remembered(key, feature) or await keys.resolve(key)
