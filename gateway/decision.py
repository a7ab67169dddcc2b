"""The verdict for one request (pure, no I/O): allow, or how to refuse.

``decide(facts, identity, lookup, settings, now)`` returns :class:`~gateway.model.Allow` (with
the customer's features and the :class:`~gateway.model.Access` the rules granted, so no caller
asks the rules again) or the :class:`~gateway.model.Denial` the gate hands on. Public paths
never get here (the gate answers them before). It applies, in order:

| Condition | Verdict (`reason`) |
|---|---|
| billing not enforced (`BILLING_MODE=off`, or `auto` without a live key) | allow (`billing_off`) |
| no identity | navigation: 303 subscribe [1]; other: 401 (`login_required`) |
| Stripe failed, nothing known (`lookup.error`) | `ON_STRIPE_ERROR`: 503 [2] or allow |
| allowed, path's feature not the customer's [4] | nav.: 303 upgrade; other: 402 [5] |
| `rules.access` allows (stale entitlements too) [3] | allow (the access reason) |
| otherwise | navigation: 303 subscribe; other: 402 (`subscription_required`) |

[1] The subscribe page offers "Already subscribed? Sign in"; the reason stays
``login_required``. "Other" is API/XHR/fetch, non-GET, and WebSocket upgrades (refused before
upgrading). [2] ``deny`` (default): 503 ``billing_unavailable`` for every kind of request,
navigation included (a redirect to the landing page would wrongly tell a payer they have not
paid); ``allow``: allow, reason ``fail_open``. [3] A stale entitlement (served past its lifetime
because Stripe failed) decides by its state, like a fresh one. [4] The feature is
:attr:`RequestFacts.feature` (the caller matched the rules); the customer's features are
:func:`gateway.rules.features` (only with access). [5] Reason ``feature_required``; the
decision carries the feature, and as ``location`` the upgrade page (:func:`upgrade_url`), where
a navigation is sent (303) and APIs are pointed (``upgrade_url``). Its ``next`` — where the
user returns once upgraded — is the navigated path itself, but for an API call or a stream
:attr:`RequestFacts.back`, the page that made the call (:func:`back_of`): returning a browser
to a path that answers JSON or an event stream would show it raw text.

"Navigation" is :attr:`RequestFacts.is_navigation` (GET/HEAD, ``Accept: text/html``, no
``X-Requested-With``, ``Sec-Fetch-Mode`` absent or ``navigate``); a WebSocket upgrade is never one.
The redirect goes to ``{GATE_PREFIX}/subscribe?next=<path?query>``, with ``next`` passed through
:func:`gateway.paths.safe_next`. Only ``redirect`` and ``feature_required`` denials carry a
``location``; every denial carries :attr:`RequestFacts.target` (the path and query as sent) as
its validated ``next_path``, and ``unavailable`` :data:`RETRY_AFTER`.
"""

from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote, urlsplit

from gateway.model import Allow, Denial, DenialKind, Identity, Lookup, RequestFacts
from gateway.paths import safe_next
from gateway.rules import access, features
from gateway.settings import Settings

__all__ = [
    "RETRY_AFTER",
    "back_of",
    "decide",
    "request_facts",
    "subscribe_url",
    "upgrade_url",
    "wants_html",
]

#: Seconds a client is asked to wait (``Retry-After``) when billing is unavailable.
RETRY_AFTER = 30

_ALLOW_BILLING_OFF = Allow("billing_off")
_ALLOW_FAIL_OPEN = Allow("fail_open")

# Characters kept as they are when re-quoting a path or query for `next` ("%" keeps escapes).
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"


def decide(
    facts: RequestFacts,
    identity: Identity | None,
    lookup: Lookup | None,
    settings: Settings,
    now: datetime,
) -> Allow | Denial:
    """The verdict for one request (see the module docstring's table)."""
    if not settings.billing_enabled:
        return _ALLOW_BILLING_OFF
    if identity is None:
        return _deny(facts, settings, "login_required")
    ent = lookup.entitlement if lookup is not None else None
    if ent is None and lookup is not None and lookup.error is not None:
        if settings.on_stripe_error == "allow":
            return _ALLOW_FAIL_OPEN
        return _denial(facts, "unavailable", 503, "billing_unavailable")
    acc = access(ent, settings, now)
    if acc.allowed:
        granted = features(ent, acc, settings)
        feature = facts.feature
        if feature is not None and feature not in granted:
            return _feature_required(facts, settings, feature)
        return Allow(acc.reason, granted, acc)
    return _deny(facts, settings, "subscription_required")


def _denial(
    facts: RequestFacts,
    kind: DenialKind,
    status: int,
    reason: str,
    location: str | None = None,
    feature: str | None = None,
) -> Denial:
    retry_after = RETRY_AFTER if kind == "unavailable" else None
    return Denial(kind, status, reason, location, safe_next(facts.target), retry_after, feature)


def _feature_required(facts: RequestFacts, settings: Settings, feature: str) -> Denial:
    navigation = facts.is_navigation and not facts.is_websocket
    status = 303 if navigation else 402
    location = upgrade_url(settings, feature, _next_of(facts) if navigation else facts.back)
    return _denial(facts, "feature_required", status, "feature_required", location, feature)


def _next_of(facts: RequestFacts) -> str:
    next_path = quote(facts.path, safe=_PATH_SAFE)
    if facts.query:
        next_path += "?" + quote(facts.query, safe=_QUERY_SAFE)
    return next_path


def _deny(facts: RequestFacts, settings: Settings, reason: str) -> Denial:
    if facts.is_navigation and not facts.is_websocket:
        location = subscribe_url(settings, _next_of(facts))
        return _denial(facts, "redirect", 303, reason, location)
    if reason == "login_required":
        return _denial(facts, "unauthorized", 401, reason)
    return _denial(facts, "payment_required", 402, reason)


def subscribe_url(settings: Settings, next_path: str) -> str:
    """``{prefix}/subscribe?next=…``; an unsafe ``next_path`` (see ``safe_next``) becomes ``/``."""
    target = safe_next(next_path)
    return f"{settings.gate_prefix}/subscribe?next={quote(target, safe='/')}"


def upgrade_url(settings: Settings, feature: str, next_path: str) -> str:
    """``{prefix}/upgrade?feature=…&next=…`` (the page naming the plans with ``feature``)."""
    target = quote(safe_next(next_path), safe="/")
    return f"{settings.gate_prefix}/upgrade?feature={quote(feature, safe='')}&next={target}"


def back_of(referer: str | None, origins: tuple[str, ...], prefix: str) -> str:
    """The page to return a browser to after its API call or stream was refused: the
    ``Referer``'s path and query when it is on one of the gate's own ``origins``
    (``scheme://host``) and is not a gate page, else the app's start page ``/``."""
    if not referer:
        return "/"
    try:
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
    except ValueError:
        return "/"
    if origin not in {o.lower().rstrip("/") for o in origins if o}:
        return "/"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = safe_next(path)
    if target == prefix or target.startswith((prefix + "/", prefix + "?")):
        return "/"
    return target


def request_facts(
    method: str,
    normalized_path: str,
    query: str,
    headers: Mapping[str, str],
    feature: str | None = None,
    back: str = "/",
    target: str | None = None,
) -> RequestFacts:
    """What :func:`decide` needs to know about a request.

    ``headers`` should be case-insensitive (aiohttp's ``request.headers``); for a plain dict the
    canonical (``Sec-Fetch-Mode``) and lower-case spellings are tried. ``query`` is best passed
    raw (``request.rel_url.raw_query_string``); a decoded one is re-quoted for ``next``.
    ``target`` is the path and query as sent (default: ``normalized_path?query``).
    """
    method = method.upper()
    # aiohttp's headers are case-insensitive; only a plain dict needs the lower-case retry.
    plain = isinstance(headers, dict)
    accepts_html = wants_html(_header(headers, "Accept", "accept", plain))
    upgrade = _header(headers, "Upgrade", "upgrade", plain)
    is_websocket = bool(upgrade) and "websocket" in upgrade.lower()
    if is_websocket:
        is_websocket = "upgrade" in _header(headers, "Connection", "connection", plain).lower()
    is_navigation = False
    if accepts_html and not is_websocket and (method == "GET" or method == "HEAD"):
        mode = _header(headers, "Sec-Fetch-Mode", "sec-fetch-mode", plain).lower()
        xhr = _header(headers, "X-Requested-With", "x-requested-with", plain)
        is_navigation = (not mode or mode == "navigate") and not xhr
    return RequestFacts(
        method=method,
        path=normalized_path,
        query=query,
        accepts_html=accepts_html,
        is_websocket=is_websocket,
        is_navigation=is_navigation,
        feature=feature,
        back=back,
        target=target if target is not None else normalized_path + (f"?{query}" if query else ""),
    )


def _header(headers: Mapping[str, str], name: str, lower: str, plain: bool) -> str:
    value = headers.get(name)
    if value is None and plain:
        value = headers.get(lower)
    return value or ""


def wants_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for HTML: the one test of it, for the verdict
    (navigation) and for every error page (:mod:`gateway.responses`)."""
    return accept is not None and "text/html" in accept.lower()
