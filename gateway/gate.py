"""The billing gate on the request path: identity → entitlement → decision.

``check`` runs for every proxied request when billing is on. It returns either a denial
response (redirect, 401/402/503) or the ``X-Gate-*`` headers to send upstream. The common case —
a paying user whose entitlement is in the in-process L1 cache — does no I/O at all; once a
session has been allowed, its next requests (same ``Cookie`` header) are answered from
``Entitlements.cached_verdict`` after the path checks, without parsing the cookie or deciding
again, for as long as that L1 entry, the session and the access last.
"""

import logging
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

from aiohttp import hdrs, web

from gateway.decision import decide, denial_body, request_facts
from gateway.forwarded import ClientInfo
from gateway.identity import identify, session_cookie
from gateway.logs import log_event
from gateway.metrics import DECISIONS
from gateway.model import Decision, Identity, Lookup
from gateway.paths import safe_next
from gateway.proxy_http import error_response
from gateway.rules import access
from gateway.services import Services

log = logging.getLogger("gateway.gate")

#: A denial, or the headers for upstream (read-only: allowed verdicts are shared).
GateResult = web.StreamResponse | Mapping[str, str]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

_DENIAL_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{title}</title><link rel="stylesheet" href="{prefix}/static/gate.css"></head>
<body><main class="card"><h1>{title}</h1><p class="lead">{message}</p>
<p><a class="button" href="{retry}">Try again</a></p></main></body></html>"""


def denial_response(
    decision: Decision, accepts_html: bool, path_qs: str, svc: Services
) -> web.Response:
    if decision.kind == "redirect":
        return web.Response(
            status=303, headers={"Location": decision.location or "/", "Cache-Control": "no-store"}
        )
    body = denial_body(decision, svc.settings)
    if decision.kind == "unavailable" and accepts_html:
        page = _DENIAL_PAGE.format(
            title="Billing is temporarily unavailable",
            message="We could not check your subscription right now. Please try again in a moment.",
            prefix=svc.settings.gate_prefix,
            retry=_html_attr(path_qs),
        )
        return web.Response(
            status=decision.status,
            text=page,
            content_type="text/html",
            headers={"Retry-After": "30", "Cache-Control": "no-store"},
        )
    headers = {"Cache-Control": "no-store"}
    if decision.kind == "unavailable":
        headers["Retry-After"] = "30"
    return web.json_response(body, status=decision.status, headers=headers)


def _html_attr(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )


def gate_headers(identity: Identity | None, lookup: Lookup | None) -> dict[str, str]:
    if identity is None:
        return {}
    ent = lookup.entitlement if lookup else None
    headers = {"X-Gate-User": identity.customer_id or (ent.customer_id if ent else identity.key)}
    if identity.email:
        headers["X-Gate-Email"] = identity.email
    if ent is not None:
        headers["X-Gate-Status"] = ent.status
        if ent.price_id:
            headers["X-Gate-Plan"] = ent.price_id
    return headers


async def check(
    request: web.Request,
    client: ClientInfo,
    svc: Services,
    *,
    method: str | None = None,
    raw_path: str | None = None,
) -> GateResult:
    """Allow (→ headers for upstream) or deny (→ response) one request.

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
        DECISIONS["bad_request"] += 1
        return error_response(request, 400, "bad_request", "Malformed path.")
    if public:
        DECISIONS["allow"] += 1
        return _NO_HEADERS
    # A session already allowed (entitlements.cached_verdict): one dict lookup, a clock read. Not
    # when a trusted identity header is present: it would win over the cookie.
    cookie = headers.get(hdrs.COOKIE)
    if cookie is not None:
        if settings.identity_header and client.peer_trusted and settings.identity_header in headers:
            cookie = None
        else:
            allowed = svc.entitlements.cached_verdict(cookie)
            if allowed is not None:
                DECISIONS["allow"] += 1
                return allowed
    identity = identify(request, svc.codec, settings, client.peer_trusted)
    lookup: Lookup | None = None
    if identity is not None:
        lookup = svc.entitlements.lookup_cached(identity)
        if lookup is None:
            lookup = await svc.entitlements.lookup(identity)
    query = request.rel_url.raw_query_string if own_path else raw_path.partition("?")[2]
    facts = request_facts(method or request.method, path, query, headers)
    now = svc.clock.now()
    decision = decide(facts, identity, lookup, settings, now)
    DECISIONS[decision.kind] += 1
    if decision.kind == "allow":
        result = gate_headers(identity, lookup)
        if cookie is not None and identity is not None and lookup is not None:
            return _remember(svc, cookie, identity, lookup, result, now)
        return result
    if decision.kind == "unavailable":
        log_event(log, "denied", reason=decision.reason, path=path)
    return denial_response(decision, facts.accepts_html, safe_next(raw_path), svc)


def _remember(
    svc: Services,
    cookie: str,
    identity: Identity,
    lookup: Lookup,
    headers: dict[str, str],
    now: datetime,
) -> Mapping[str, str]:
    """Keep an allowed verdict of a cookie session for the next requests with this ``Cookie``
    header, when it rests on a live L1 entry and access the rules grant (not fail-open)."""
    if identity.source != "cookie" or not svc.settings.billing_enabled:
        return headers
    ent = lookup.entitlement
    if ent is None or lookup.error is not None:
        return headers
    acc = access(ent, svc.settings, now)
    if not acc.allowed:
        return headers
    value = session_cookie(cookie)
    session_end = svc.codec.valid_until(value) if value else None
    if session_end is None:
        return headers
    until = session_end
    if acc.ends_at is not None and acc.ends_kind != "renews":
        # A scheduled end (cancellation, trial end, grace, grant): access stops there.
        until = min(until, acc.ends_at.timestamp())
    return svc.entitlements.remember_verdict(cookie, identity, lookup, headers, until)
