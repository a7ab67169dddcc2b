"""The billing gate on the request path: identity → entitlement → decision.

``check`` runs for every proxied request when billing is on. It returns either a denial
response (redirect, 401/402/503) or the ``X-Gate-*`` headers to send upstream. The common case —
a paying user whose entitlement is in the in-process L1 cache — does no I/O at all.
"""

import logging

from aiohttp import web

from gateway.decision import decide, denial_body, request_facts
from gateway.forwarded import ClientInfo
from gateway.identity import identify
from gateway.logs import log_event
from gateway.metrics import DECISIONS
from gateway.model import Decision, Identity, Lookup, utcnow
from gateway.paths import normalize_path, safe_next
from gateway.services import Services

log = logging.getLogger("gateway.gate")

GateResult = web.StreamResponse | dict[str, str]

_DENIAL_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{title}</title><link rel="stylesheet" href="{prefix}/static/gate.css"></head>
<body><main class="card"><h1>{title}</h1><p class="lead">{message}</p>
<p><a class="button" href="{retry}">Try again</a></p></main></body></html>"""


def bad_path_response(accepts_html: bool) -> web.Response:
    if accepts_html:
        return web.Response(
            status=400, text="<h1>Bad request</h1><p>Malformed path.</p>", content_type="text/html"
        )
    return web.json_response({"error": "bad_request", "message": "malformed path"}, status=400)


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
    if raw_path is None:
        raw_path = request.raw_path
        query = request.rel_url.raw_query_string
    else:
        query = raw_path.partition("?")[2]
    path = normalize_path(raw_path)
    headers = request.headers
    if path is None:
        DECISIONS["bad_request"] += 1
        return bad_path_response("text/html" in headers.get("Accept", ""))
    if svc.public_paths.matches(path, raw_path):
        DECISIONS["allow"] += 1
        return {}
    identity = identify(request, svc.codec, settings, client.peer_trusted)
    lookup: Lookup | None = None
    if identity is not None:
        lookup = svc.entitlements.lookup_cached(identity)
        if lookup is None:
            lookup = await svc.entitlements.lookup(identity)
    facts = request_facts(method or request.method, path, query, headers)
    decision = decide(facts, identity, lookup, settings, utcnow())
    DECISIONS[decision.kind] += 1
    if decision.kind == "allow":
        return gate_headers(identity, lookup)
    if decision.kind == "unavailable":
        log_event(log, "denied", reason=decision.reason, path=path)
    return denial_response(decision, facts.accepts_html, safe_next(raw_path), svc)
