"""Every refusal and error the gate answers with, on every surface, rendered in one place.

The gate decides with values (:class:`~gateway.model.Denial`, error codes); this module turns
them into responses for

- proxied requests: :func:`denial_response` (303 / 401 / 402 / 503 / 400) and
  :func:`error_response` (400 / 404, and 502 / 504 through :func:`upstream_failure`);
- forward auth: :func:`forward_auth_allowed`, :func:`forward_auth_denial` (the default answer
  for Caddy and Traefik, the 401 + ``X-Gate-Denial`` answer for nginx) and :func:`forbidden`;
- WebSocket upgrades: :func:`websocket_refused`, :func:`bad_handshake`;
- the gate's own pages: :func:`error_page`, and :func:`render_html` for every template.

One JSON schema for all of them (documented in the README, "Error answers")::

    {"error": "<code>", "message": "<for people>",
     "subscribe_url": "…", "login_url": "…", "retry_url": "…"}   # the URLs only where useful

HTML goes to requests whose ``Accept`` asks for it (:func:`gateway.decision.wants_html`, the
one test of that), as a Jinja2 template from ``gateway/templates`` (autoescaped). Every answer
here carries ``Cache-Control: no-store`` (but a forward-auth allow that may be cached); every
page also ``X-Frame-Options: DENY`` and ``Content-Security-Policy: frame-ancestors 'none'`` (no
framing: the gate's buttons — Continue, Subscribe, Manage billing — cannot be clickjacked). A
"Try again" link is only ever a local path whose ``next`` passed
:func:`gateway.paths.safe_next` (:func:`safe_link`).
"""

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jinja2
from aiohttp import WSServerHandshakeError, hdrs, web
from multidict import CIMultiDict

from gateway.decision import RETRY_AFTER, subscribe_url, wants_html
from gateway.logs import log_event
from gateway.model import Denial
from gateway.paths import safe_next
from gateway.settings import Settings

__all__ = [
    "DENIAL_HEADER",
    "FRAME_HEADERS",
    "LOCATION_HEADER",
    "bad_handshake",
    "bad_host",
    "denial_body",
    "denial_response",
    "error_body",
    "error_json",
    "error_page",
    "error_response",
    "feature_message",
    "forbidden",
    "forward_auth_allowed",
    "forward_auth_denial",
    "log_upstream_error",
    "render_html",
    "safe_link",
    "see_other",
    "upstream_failure",
    "websocket_refused",
]

log = logging.getLogger(__name__)

#: Forward auth, nginx mode: what kind of denial a 401 stands for.
DENIAL_HEADER = "X-Gate-Denial"
#: Forward auth, nginx mode: where to send the user (absolute subscribe URL).
LOCATION_HEADER = "X-Gate-Location"

_NO_STORE = "no-store"
#: Sent with every gate page: it may not be framed (clickjacking).
FRAME_HEADERS: Mapping[str, str] = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}

# Loaded once per process; templates are files of the package, so no reload checks.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent / "templates")),
    autoescape=jinja2.select_autoescape(default=True),
    auto_reload=False,
)

# What people are told, per error code (JSON ``message``; the HTML page unless it has its own).
_MESSAGES = {
    "subscription_required": "An active subscription is required to use this app.",
    "login_required": "Sign in to use this app.",
    "billing_unavailable": "Billing is temporarily unavailable. Please try again in a moment.",
    "bad_request": "Malformed path.",
    "bad_host": "This server does not answer for that host name.",
    "invalid_api_key": "This API key is not valid (unknown, expired or revoked).",
    "api_key_in_url": "API keys go in the request's header (Authorization: Bearer gk_…), never "
    "in the URL: URLs end up in logs. Revoke this key and create a new one.",
    "rate_limited": "Too many requests with this API key. Please slow down.",
}
# Page titles of the plain HTTP errors ("502 Bad Gateway").
_TITLES = {
    "bad_gateway": "Bad Gateway",
    "gateway_timeout": "Gateway Timeout",
    "bad_request": "Bad Request",
    "not_found": "Not Found",
    "bad_host": "Bad Request",
    "upstream_busy": "Service Unavailable",
}
MSG_UNREACHABLE = "The app is not reachable right now. Please try again in a moment."
MSG_TIMEOUT = "The app took too long to answer. Please try again in a moment."
_UNAVAILABLE_TITLE = "Billing is temporarily unavailable"
_UNAVAILABLE_PAGE = "We could not check your subscription right now. Please try again in a moment."


# --------------------------------------------------------------------------- building blocks


def error_body(code: str, message: str, **urls: str | None) -> dict[str, str]:
    """The one JSON error shape: ``error`` and ``message``, plus the URLs that are given."""
    body = {"error": code, "message": message}
    body.update({name: url for name, url in urls.items() if url})
    return body


def error_json(
    status: int, body: Mapping[str, str], headers: Mapping[str, str] | None = None
) -> web.Response:
    """``body`` (see :func:`error_body`) as a JSON answer that no cache keeps."""
    return web.json_response(
        dict(body), status=status, headers={hdrs.CACHE_CONTROL: _NO_STORE, **(headers or {})}
    )


def render_html(
    settings: Settings,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A page from ``gateway/templates``; ``app_name``, ``prefix`` and ``billing_enabled``
    come from ``settings`` (``context`` may override them)."""
    ctx = {
        "app_name": settings.app_name,
        "prefix": settings.gate_prefix,
        "billing_enabled": settings.billing_enabled,
        **context,
    }
    text = _TEMPLATES.get_template(template).render(ctx)
    return web.Response(
        status=status,
        text=text,
        content_type="text/html",
        headers={hdrs.CACHE_CONTROL: _NO_STORE, **FRAME_HEADERS, **(headers or {})},
    )


def safe_link(url: str | None) -> str | None:
    """``url`` if it is a local link fit for a page, with every ``next`` in its query passed
    through :func:`~gateway.paths.safe_next` (an unsafe one becomes ``/``); None for anything
    else (an absolute or protocol-relative URL)."""
    if not url or safe_next(url, "") != url:
        return None
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if all(name != "next" or safe_next(value) == value for name, value in pairs):
        return url
    cleaned = [(name, safe_next(value) if name == "next" else value) for name, value in pairs]
    return f"{parts.path}?{urlencode(cleaned)}"


def see_other(location: str) -> web.Response:
    """A 303 to ``location`` that no cache keeps."""
    return web.Response(
        status=303, headers={hdrs.LOCATION: location, hdrs.CACHE_CONTROL: _NO_STORE}
    )


def error_response(
    request: web.BaseRequest,
    settings: Settings,
    status: int,
    code: str,
    message: str,
    *,
    title: str | None = None,
    retry_url: str | None = None,
    headers: Mapping[str, str] | None = None,
    urls: Mapping[str, str] | None = None,
) -> web.Response:
    """An error page for browsers (``Accept`` with HTML), the JSON error for everything else.

    ``title`` defaults to "<status> <name>" (``502 Bad Gateway``); ``retry_url`` is the page's
    "Try again" link and the JSON's ``retry_url``; ``urls`` are more JSON links."""
    if wants_html(request.headers.get(hdrs.ACCEPT)):
        return render_html(
            settings,
            "error.html",
            {
                "title": title or f"{status} {_TITLES.get(code, code)}",
                "message": message,
                "retry_url": safe_link(retry_url),
            },
            status=status,
            headers=headers,
        )
    return error_json(
        status, error_body(code, message, retry_url=safe_link(retry_url), **(urls or {})), headers
    )


# --------------------------------------------------------------------------- denials


def feature_message(feature: str | None) -> str:
    """What people are told when their plan lacks ``feature``."""
    if not feature:
        return "Your plan does not include this part of the app."
    return f"Your plan does not include {feature}. Upgrade to a plan with {feature} to use it."


def denial_body(denial: Denial, prefix: str) -> dict[str, str]:
    """The JSON body of a refusal: the error code, its message, and where to subscribe (and
    sign in, for ``login_required``); for ``feature_required`` the feature and
    ``upgrade_url`` (the upgrade page naming the plans that include it)."""
    if denial.kind == "feature_required":
        body = error_body(
            denial.reason, feature_message(denial.feature), upgrade_url=denial.location
        )
        body["feature"] = denial.feature or ""
        return body
    if denial.kind == "bad_request":
        return error_body(denial.reason, _MESSAGES["bad_request"])
    if denial.kind in ("api_key", "rate_limited"):  # no page to send a script to
        return error_body(denial.reason, _MESSAGES[denial.reason])
    return error_body(
        denial.reason,
        _MESSAGES[denial.reason],
        subscribe_url=denial.location or f"{prefix}/subscribe",
        login_url=f"{prefix}/login" if denial.reason == "login_required" else None,
    )


def denial_response(request: web.BaseRequest, denial: Denial, settings: Settings) -> web.Response:
    """A refusal on the proxied path: a 303 for navigations (to the subscribe page, or the
    upgrade page for a missing feature), JSON 401 / 402 for APIs, 503 (a page for browsers,
    JSON otherwise) when billing is unavailable, 400 for a bad path."""
    if denial.kind == "redirect" or (denial.kind == "feature_required" and denial.status == 303):
        return see_other(denial.location or "/")
    if denial.kind == "bad_request":
        return error_response(request, settings, 400, "bad_request", _MESSAGES["bad_request"])
    headers: dict[str, str] | None = None
    if denial.retry_after:
        headers = {hdrs.RETRY_AFTER: str(denial.retry_after)}
    if denial.kind == "unavailable" and wants_html(request.headers.get(hdrs.ACCEPT)):
        return render_html(
            settings,
            "error.html",
            {
                "title": _UNAVAILABLE_TITLE,
                "message": _UNAVAILABLE_PAGE,
                "retry_url": safe_link(denial.next_path),
            },
            status=denial.status,
            headers=headers,
        )
    return error_json(denial.status, denial_body(denial, settings.gate_prefix), headers)


# --------------------------------------------------------------------------- forward auth


def forward_auth_allowed(
    headers: Mapping[str, str], max_age: int = 0, credentials: CIMultiDict[str] | None = None
) -> web.Response:
    """Forward auth: let the request through, with ``headers`` for the proxy to copy.

    ``max_age`` > 0 (the caller has made sure the answer holds that long for every request with
    the same session cookie: see :mod:`gateway.forward_auth`) sends ``Cache-Control:
    max-age=N``, which the shipped nginx config's auth cache obeys; otherwise ``no-store``.
    ``credentials``: the request's ``Cookie`` and ``Authorization`` as the app may have them
    (:func:`gateway.proxy_headers.app_credentials`), for a proxy that sets them on the app's
    request from this answer. The answer goes to the proxy only (nginx's internal auth
    location, Caddy's and Traefik's forward auth), never to a browser."""
    cache = f"max-age={max_age}" if max_age > 0 else _NO_STORE
    out = CIMultiDict(headers)
    out[hdrs.CACHE_CONTROL] = cache
    if credentials:
        out.extend(credentials)
    return web.Response(status=200, headers=out)


def forward_auth_denial(
    request: web.BaseRequest, denial: Denial, settings: Settings, *, nginx: bool, base: str
) -> web.Response:
    """Forward auth: a refusal, for the proxy in front to pass on.

    Passthrough (``nginx=False``; Caddy, Traefik hand the answer to the client as it is): the
    proxied path's own answer (``feature_required``: the 303 to the upgrade page or the 402),
    its redirect made absolute with ``base`` (``scheme://host``, may
    be empty). Default (``nginx=True``; ``auth_request`` understands 2xx / 401 / 403 only): a
    401 naming the kind in ``X-Gate-Denial`` (a navigation lacking a feature: ``redirect``, to
    the upgrade page) and the absolute subscribe (or upgrade) URL in ``X-Gate-Location`` (none
    for ``unavailable``: that would tell a payer they have not paid),
    with the gate's JSON error body; a bad path is a 403.
    """
    if not nginx:
        if denial.location and denial.location.startswith("/") and base:
            denial = replace(denial, location=base + denial.location)
        return denial_response(request, denial, settings)
    if denial.kind == "bad_request":  # no user-facing page to send them to
        return forbidden("malformed request path", denial="bad_request")
    kind: str = denial.kind
    if kind == "api_key":
        kind = denial.reason  # invalid_api_key | api_key_in_url
    if kind == "feature_required" and denial.status == 303:
        # A navigation: nginx sends it on (303) to X-Gate-Location, the upgrade page, as it
        # does with every redirect; APIs get ``feature_required`` (the config's 402).
        kind = "redirect"
    headers: dict[str, str] = {DENIAL_HEADER: kind}
    if denial.kind == "rate_limited" and denial.retry_after:
        headers[hdrs.RETRY_AFTER] = str(denial.retry_after)
    body = denial_body(denial, settings.gate_prefix)
    if denial.kind not in ("unavailable", "api_key", "rate_limited"):
        location = denial.location or subscribe_url(settings, denial.next_path)
        headers[LOCATION_HEADER] = base + location if location.startswith("/") else location
        # feature_required: X-Gate-Location is the upgrade page
        url_key = "upgrade_url" if denial.kind == "feature_required" else "subscribe_url"
        body[url_key] = headers[LOCATION_HEADER]
    # nginx drops this body; a proxy that passes the 401 on (Caddy without ?mode=passthrough)
    # shows the user what to do instead of an empty page.
    return error_json(401, body, headers)


def forbidden(message: str, *, denial: str = "forbidden") -> web.Response:
    """Forward auth: 403 JSON (``X-Gate-Denial`` says why, for nginx)."""
    return error_json(403, error_body("forbidden", message), {DENIAL_HEADER: denial})


# --------------------------------------------------------------------------- upstream


def log_upstream_error(
    logger: logging.Logger,
    event: str,
    request: web.BaseRequest,
    exc: BaseException,
    request_id: str,
    *,
    detail: str | None = None,
    **fields: object,
) -> None:
    """Log a failed upstream request (a warning): ``fields`` first, then the request's method
    and path, the exception's type and ``detail`` (default: its text), and the request id."""
    log_event(
        logger,
        event,
        level=logging.WARNING,
        **fields,
        method=request.method,
        path=request.path,
        error=type(exc).__name__,
        detail=str(exc) if detail is None else detail,
        rid=request_id,
    )


def upstream_failure(
    request: web.BaseRequest, settings: Settings, exc: BaseException, request_id: str = "-"
) -> web.Response:
    """Log an upstream failure (before any response byte was sent) and answer 502, or 504
    for a timeout."""
    timeout = isinstance(exc, TimeoutError)
    status, code = (504, "gateway_timeout") if timeout else (502, "bad_gateway")
    log_upstream_error(log, "upstream_error", request, exc, request_id, status=status)
    message = MSG_TIMEOUT if timeout else MSG_UNREACHABLE
    return error_response(request, settings, status, code, message)


def websocket_refused(
    request: web.BaseRequest,
    settings: Settings,
    exc: WSServerHandshakeError,
    request_id: str = "-",
) -> web.Response:
    """The app refused the WebSocket handshake: logged, and a 502 for the client (which was
    not upgraded)."""
    log_upstream_error(
        log,
        "websocket_refused",
        request,
        exc,
        request_id,
        detail=exc.message,
        upstream_status=exc.status,
    )
    message = "The app refused the WebSocket connection."
    return error_response(request, settings, 502, "bad_gateway", message)


def bad_host(request: web.BaseRequest, settings: Settings) -> web.Response:
    """A request for a host that is not in ``ALLOWED_HOSTS``: 400, a page or the JSON error."""
    return error_response(request, settings, 400, "bad_host", _MESSAGES["bad_host"])


def bad_handshake() -> web.Response:
    """A WebSocket upgrade that is not a valid handshake: 400 JSON."""
    return error_json(400, error_body("bad_request", "Invalid WebSocket handshake."))


# --------------------------------------------------------------------------- gate pages


def error_page(
    request: web.BaseRequest,
    settings: Settings,
    code: str,
    title: str,
    message: str,
    *,
    status: int = 503,
    retry_url: str | None = None,
) -> web.Response:
    """A gate page's failure: the error page for browsers, the JSON error otherwise (503s
    ask to come back in :data:`RETRY_AFTER` seconds)."""
    headers: dict[str, str] | None = None
    if status == 503:
        headers = {hdrs.RETRY_AFTER: str(RETRY_AFTER)}
    return error_response(
        request,
        settings,
        status,
        code,
        message,
        title=title,
        retry_url=retry_url,
        headers=headers,
    )
