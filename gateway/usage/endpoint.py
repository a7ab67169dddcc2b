"""``POST {GATE_PREFIX}/usage``: the app reports usage the gate cannot see (a Streamlit app's
work over its one WebSocket), as JSON ``{"user", "meter", "value", "id"}``.

Only from ``USAGE_REPORT_FROM`` (the client IP as resolved through ``TRUSTED_PROXIES``) with
``Authorization: Bearer USAGE_REPORT_SECRET`` (compared in constant time); ``user`` is the
``X-Gate-User`` value the app received (the Stripe customer id, or a team member's email:
their units are the team's), ``meter`` one of
``USAGE_RULES`` / ``USAGE_METERS``, ``value`` a whole number ≥ 0, ``id`` the app's unique id for
the report (a retry with the same id counts once: 200 ``{"counted": false}``). The units are
durable in the store when the answer is 200. Refusals are the gate's JSON errors: 403
``forbidden`` (network, secret), 400 ``bad_request`` (body), 404 ``unknown_user``, 503 when the
store is unavailable.
"""

import hmac
import logging
from typing import Any

from aiohttp import hdrs, web

from gateway.emails import valid_email
from gateway.forwarded import TrustedNetworks, client_info
from gateway.logs import log_event
from gateway.model import Identity
from gateway.responses import error_body, error_json
from gateway.services import SERVICES
from gateway.settings import Settings
from gateway.store.base import StoreError
from gateway.stripe_api import StripeError
from gateway.usage.service import MAX_UNITS

__all__ = ["add_routes", "usage_report"]

log = logging.getLogger("gateway.usage")

_MAX_ID = 200


def add_routes(app: web.Application, settings: Settings) -> None:
    app.router.add_post(f"{settings.gate_prefix}/usage", usage_report)


def _refuse(
    status: int, code: str, message: str, reason: str, request: web.Request
) -> web.Response:
    log_event(
        log,
        "usage_report_refused",
        level=logging.WARNING,
        reason=reason,
        peer=request.remote or "-",
    )
    return error_json(status, error_body(code, message))


async def usage_report(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    settings = svc.settings
    client = client_info(request, TrustedNetworks(settings.trusted_proxies))
    allowed = TrustedNetworks(settings.usage_report_from)
    if client.ip not in allowed:
        return _refuse(
            403, "forbidden", "Usage reports come from the app's network only.", "network", request
        )
    secret = settings.usage_report_secret
    given = request.headers.get(hdrs.AUTHORIZATION, "")
    if not secret or not hmac.compare_digest(given.encode(), f"Bearer {secret}".encode()):
        return _refuse(403, "forbidden", "Wrong or missing usage report secret.", "secret", request)
    usage = svc.usage
    if usage is None:
        return _refuse(404, "not_found", "No usage meters are configured.", "no meters", request)
    try:
        body: Any = await request.json()
    except ValueError:
        return _refuse(400, "bad_request", "Expected a JSON object.", "json", request)
    if not isinstance(body, dict):
        return _refuse(400, "bad_request", "Expected a JSON object.", "json", request)
    user, meter, value, report_id = (body.get(k) for k in ("user", "meter", "value", "id"))
    member = valid_email(user) if isinstance(user, str) and "@" in user else None
    if not isinstance(user, str) or not (user.startswith("cus_") or member):
        return _refuse(
            400,
            "bad_request",
            "user: the X-Gate-User value (cus_…, or a team member's email).",
            "user",
            request,
        )
    if not isinstance(meter, str) or meter not in usage.config.meters:
        return _refuse(
            400, "unknown_meter", "meter: not one of the gate's meters.", "meter", request
        )
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UNITS:
        return _refuse(400, "bad_request", "value: a whole number ≥ 0.", "value", request)
    if not isinstance(report_id, str) or not 0 < len(report_id) <= _MAX_ID:
        return _refuse(
            400,
            "bad_request",
            f"id: a unique string of at most {_MAX_ID} characters.",
            "id",
            request,
        )
    try:
        if member is not None:
            # A team member's X-Gate-User is their email: their usage is the team's (the
            # lookup the gate made for their request); only a current member's is counted.
            team_of = svc.entitlements.team_of
            if team_of is None or await team_of(member) is None:
                return _refuse(404, "unknown_user", "No such customer.", "user unknown", request)
            lookup = await svc.entitlements.lookup(Identity(member, None, "cookie"))
        else:
            lookup = await svc.entitlements.lookup(Identity(None, user, "cookie"))
        ent = lookup.entitlement
        if ent is None:
            return _refuse(404, "unknown_user", "No such customer.", "user unknown", request)
        counted = await usage.report(ent, meter, value, report_id)
    except (StoreError, StripeError) as exc:
        log_event(log, "usage_report_unavailable", level=logging.WARNING, error=str(exc))
        return error_json(
            503,
            error_body("unavailable", "Usage cannot be recorded right now; retry."),
            {hdrs.RETRY_AFTER: "5"},
        )
    return web.json_response({"counted": counted}, headers={hdrs.CACHE_CONTROL: "no-store"})
