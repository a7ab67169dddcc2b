"""Where usage meets the request path: the gate's free-quota allowance, the count of an
allowed request (proxy and forward auth alike), the app's ``X-Gate-Usage`` response header, and
the answers for a request past its quota (a page, 429 JSON, forward auth's 401 for nginx).

The count runs after :func:`gateway.gate.check` — on a remembered verdict too — and never on
the WebSocket re-checks (:mod:`gateway.watch` asks the gate, not this): an upgrade counts once.
"""

import json
from datetime import datetime

from aiohttp import hdrs, web

from gateway.decision import subscribe_url, wants_html
from gateway.model import Denial, Entitlement, Identity, Lookup, Pass
from gateway.responses import DENIAL_HEADER, LOCATION_HEADER, error_body, error_json, render_html
from gateway.services import Services
from gateway.settings import Settings
from gateway.usage.service import QuotaExceeded

__all__ = [
    "DENIAL_BODY_HEADER",
    "USAGE_ENTITLEMENT",
    "USAGE_HEADER",
    "by_api_key",
    "count_request",
    "free_entitlement",
    "meter_label",
    "quota_body",
    "quota_forward_auth",
    "quota_response",
    "reset_day",
]

#: The app's response header naming the units a request used (removed before the client).
USAGE_HEADER = "X-Gate-Usage"
#: nginx mode: the JSON body nginx answers a refusal with (its config cannot build one).
DENIAL_BODY_HEADER = "X-Gate-Denial-Body"
#: The request's entitlement, for the app's ``X-Gate-Usage`` of its response.
USAGE_ENTITLEMENT = web.RequestKey("gate_usage_entitlement", Entitlement)


def free_entitlement(
    svc: Services, method: str, raw_path: str, identity: Identity | None, lookup: Lookup | None
) -> Entitlement | None:
    """For a signed-in customer without a subscription on a path whose meter has a
    ``FREE_QUOTAS`` allowance: the entitlement to count it on (no subscription: the calendar
    month); else None (the refusal stands)."""
    usage = svc.usage
    if usage is None or not usage.config.free_quotas or identity is None:
        return None
    meter = usage.meter_for(method, raw_path)
    if meter is None or meter not in usage.config.free_quotas:
        return None
    ent = lookup.entitlement if lookup is not None else None
    customer_id = identity.customer_id or (ent.customer_id if ent is not None else None)
    if not customer_id:
        return None
    now = svc.clock.now()
    return Entitlement(customer_id=customer_id, status="none", checked_at=now, expires_at=now)


async def count_request(
    svc: Services, request: web.Request, verdict: Pass, method: str, raw_path: str
) -> Pass | QuotaExceeded | Denial:
    """Count an allowed request on its meter; the verdict (with ``X-Gate-Quota``) or the
    refusal."""
    usage = svc.usage
    if usage is None or verdict.entitlement is None:
        return verdict
    request[USAGE_ENTITLEMENT] = verdict.entitlement
    return await usage.on_request(method, raw_path, verdict)


# ---------------------------------------------------------------------------- answers


def meter_label(meter: str, count: int) -> str:
    """People's name for ``count`` units of ``meter`` (``analysis`` → ``analyses``)."""
    word = meter.replace("_", " ").replace("-", " ")
    if count == 1:
        return word
    if word.endswith("is"):
        return word[:-2] + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def reset_day(when: datetime) -> str:
    """``6 Jan 2027``."""
    return f"{when.day} {when:%b %Y}"


def _upgrade_url(settings: Settings, q: QuotaExceeded, next_path: str) -> str:
    if q.free:
        return subscribe_url(settings, next_path)
    return f"{settings.gate_prefix}/account"


def quota_body(settings: Settings, q: QuotaExceeded, next_path: str) -> dict[str, object]:
    """The 429 JSON: the one error schema plus the quota's facts."""
    period = "this month" if q.free else "this period"
    message = (
        f"You've used your {q.limit} {meter_label(q.meter, q.limit)} {period}; it resets on "
        f"{reset_day(q.resets_at)}."
    )
    body: dict[str, object] = dict(
        error_body("quota_exceeded", message, upgrade_url=_upgrade_url(settings, q, next_path))
    )
    body.update(
        meter=q.meter,
        limit=q.limit,
        used=q.used,
        resets_at=q.resets_at.isoformat().replace("+00:00", "Z"),
    )
    return body


def _retry_after(q: QuotaExceeded, now: datetime) -> str:
    return str(max(1, int((q.resets_at - now).total_seconds())))


def by_api_key(svc: Services, request: web.BaseRequest) -> bool:
    """Whether an allowed request came with an API key (a key decides alone): a script's, so
    its refusals are JSON whatever its ``Accept`` says, as the gate's other key denials."""
    keys = svc.apikeys
    return keys is not None and keys.credential(request.headers) is not None


def quota_response(
    request: web.BaseRequest,
    settings: Settings,
    q: QuotaExceeded,
    now: datetime,
    next_path: str | None = None,
    *,
    script: bool = False,
) -> web.Response:
    """Past the quota on the proxied path: a page for browsers, 429 JSON otherwise
    (WebSocket upgrades included: refused before upgrading; a ``script``, an API key's
    request, always JSON). ``next_path``: where the upgrade link comes back to (the request's
    own path unless forward auth names the original)."""
    if next_path is None:
        next_path = request.raw_path
    headers: dict[str, str] = {"Retry-After": _retry_after(q, now)}
    if (
        not script
        and wants_html(request.headers.get(hdrs.ACCEPT))
        and request.headers.get(hdrs.UPGRADE) is None
    ):
        return render_html(
            settings,
            "quota.html",
            {
                "limit": q.limit,
                "what": meter_label(q.meter, q.limit),
                "period": "this month" if q.free else "this period",
                "resets_on": reset_day(q.resets_at),
                "upgrade_url": _upgrade_url(settings, q, next_path),
                "upgrade_label": "Subscribe" if q.free else "Upgrade",
            },
            status=429,
            headers=headers,
        )
    body = quota_body(settings, q, next_path)
    return web.json_response(body, status=429, headers={hdrs.CACHE_CONTROL: "no-store", **headers})


def quota_forward_auth(
    request: web.BaseRequest,
    settings: Settings,
    q: QuotaExceeded,
    now: datetime,
    *,
    nginx: bool,
    base: str,
    next_path: str,
    script: bool = False,
) -> web.Response:
    """Forward auth past the quota: passthrough, the proxied path's answer (429 or the page;
    JSON for a ``script``); nginx, a 401 saying ``quota_exceeded`` with the upgrade URL and
    the 429 body to send."""
    if not nginx:
        return quota_response(request, settings, q, now, next_path, script=script)
    body = quota_body(settings, q, next_path)
    url = str(body["upgrade_url"])
    if url.startswith("/"):
        body["upgrade_url"] = base + url
    headers = {
        DENIAL_HEADER: "quota_exceeded",
        LOCATION_HEADER: str(body["upgrade_url"]),
        DENIAL_BODY_HEADER: json.dumps(body, ensure_ascii=True, separators=(",", ":")),
        hdrs.RETRY_AFTER: _retry_after(q, now),
    }
    return error_json(401, {k: str(v) for k, v in body.items()}, headers)
