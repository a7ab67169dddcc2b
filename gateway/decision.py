"""The verdict for one request (pure, no I/O): allow, or how to refuse.

``decide(facts, identity, lookup, settings, now, public=...)`` returns the verdict and the
:class:`~gateway.model.Access` it computed on the way (None where the rules were not asked), so
no caller asks the rules again. It applies, in order:

| Condition | Verdict (`reason`) |
|---|---|
| billing not enforced (`BILLING_MODE=off`, or `auto` without a live key) | allow (`billing_off`) |
| `public=True` (the caller matched `PUBLIC_PATHS`) | allow (`public`) |
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
:func:`gateway.paths.safe_next`. Only ``redirect`` and ``feature_required`` decisions carry a
``location``.
"""

import functools
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote, urlsplit

from gateway.model import Access, Decision, Denial, Identity, Lookup, RequestFacts
from gateway.paths import safe_next
from gateway.rules import access, features
from gateway.settings import Settings

__all__ = [
    "RETRY_AFTER",
    "back_of",
    "decide",
    "denial_of",
    "request_facts",
    "subscribe_url",
    "upgrade_url",
    "wants_html",
]

#: Seconds a client is asked to wait (``Retry-After``) when billing is unavailable.
RETRY_AFTER = 30

_ALLOW_BILLING_OFF = Decision("allow", 200, "billing_off")
_ALLOW_PUBLIC = Decision("allow", 200, "public")
_ALLOW_FAIL_OPEN = Decision("allow", 200, "fail_open")
_LOGIN_REQUIRED = Decision("unauthorized", 401, "login_required")
_PAYMENT_REQUIRED = Decision("payment_required", 402, "subscription_required")
_UNAVAILABLE = Decision("unavailable", 503, "billing_unavailable")

# Characters kept as they are when re-quoting a path or query for `next` ("%" keeps escapes).
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"


def decide(
    facts: RequestFacts,
    identity: Identity | None,
    lookup: Lookup | None,
    settings: Settings,
    now: datetime,
    *,
    public: bool = False,
) -> tuple[Decision, Access | None]:
    """The verdict for one request (see the module docstring's table), and the access the
    rules granted or refused (None when the verdict did not need the rules)."""
    if not settings.billing_enabled:
        return _ALLOW_BILLING_OFF, None
    if public:
        return _ALLOW_PUBLIC, None
    if identity is None:
        return _deny(facts, settings, "login_required"), None
    ent = lookup.entitlement if lookup is not None else None
    if ent is None and lookup is not None and lookup.error is not None:
        return (_ALLOW_FAIL_OPEN if settings.on_stripe_error == "allow" else _UNAVAILABLE), None
    acc = access(ent, settings, now)
    if acc.allowed:
        feature = facts.feature
        if feature is not None and feature not in features(ent, acc, settings):
            return _feature_required(facts, settings, feature), acc
        return _allow(acc.reason), acc
    return _deny(facts, settings, "subscription_required"), acc


@functools.lru_cache(maxsize=64)
def _allow(reason: str) -> Decision:
    """The shared allow verdict for an access reason (a handful of them): no new object per
    request."""
    return Decision("allow", 200, reason)


def _feature_required(facts: RequestFacts, settings: Settings, feature: str) -> Decision:
    navigation = facts.is_navigation and not facts.is_websocket
    status = 303 if navigation else 402
    location = upgrade_url(settings, feature, _next_of(facts) if navigation else facts.back)
    return Decision("feature_required", status, "feature_required", location, feature)


def _next_of(facts: RequestFacts) -> str:
    next_path = quote(facts.path, safe=_PATH_SAFE)
    if facts.query:
        next_path += "?" + quote(facts.query, safe=_QUERY_SAFE)
    return next_path


def _deny(facts: RequestFacts, settings: Settings, reason: str) -> Decision:
    if facts.is_navigation and not facts.is_websocket:
        return Decision("redirect", 303, reason, subscribe_url(settings, _next_of(facts)))
    return _LOGIN_REQUIRED if reason == "login_required" else _PAYMENT_REQUIRED


def denial_of(decision: Decision, next_path: str) -> Denial:
    """The refusal a non-allow ``decision`` stands for, as the gate hands it on: with the
    validated ``next_path`` (see :func:`gateway.paths.safe_next`) and, when billing is
    unavailable, :data:`RETRY_AFTER`."""
    kind = decision.kind
    if kind == "allow":
        raise ValueError("denial_of() of an allow decision")
    retry_after = RETRY_AFTER if kind == "unavailable" else None
    return Denial(
        kind,
        decision.status,
        decision.reason,
        decision.location,
        next_path,
        retry_after,
        decision.feature,
    )


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
) -> RequestFacts:
    """What :func:`decide` needs to know about a request.

    ``headers`` should be case-insensitive (aiohttp's ``request.headers``); for a plain dict the
    canonical (``Sec-Fetch-Mode``) and lower-case spellings are tried. ``query`` is best passed
    raw (``request.rel_url.raw_query_string``); a decoded one is re-quoted for ``next``.
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
