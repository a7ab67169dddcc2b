"""The verdict table: every Stripe status, kind of request and billing mode; and the edges."""

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from multidict import CIMultiDict

from gateway.decision import back_of, decide, request_facts, subscribe_url
from gateway.model import Allow, Denial, Entitlement, Identity, Lookup, RequestFacts
from gateway.paths import safe_next
from gateway.settings import Settings, load_settings
from tests.conftest import changed

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
PRICE = "price_A"

_KEYS = {"STRIPE_PRICE_IDS": PRICE}
MODES: dict[str, Settings] = {
    "off": load_settings({"BILLING_MODE": "off"}, demo=True),
    "on": load_settings(
        {"BILLING_MODE": "on", "STRIPE_SECRET_KEY": "sk_test_1", **_KEYS}, demo=True
    ),
    "auto-test-key": load_settings({"STRIPE_SECRET_KEY": "sk_test_1", **_KEYS}, demo=True),
    "auto-live-key": load_settings(
        {"STRIPE_SECRET_KEY": "rk_live_1", "STRIPE_WEBHOOK_SECRET": "whsec_1", **_KEYS}, demo=True
    ),
}
ENFORCED = {"off": False, "on": True, "auto-test-key": False, "auto-live-key": True}
ON = MODES["on"]

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "navigation": ("GET", {"Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "navigate"}),
    "api-get": ("GET", {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}),
    "api-post": ("POST", {"Accept": BROWSER_ACCEPT, "Content-Type": "application/json"}),
    "websocket": (
        "GET",
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-Fetch-Mode": "websocket"},
    ),
    "head": ("HEAD", {"Accept": BROWSER_ACCEPT}),
}

# What a refused request gets, per kind of request (DESIGN "What a denied request gets"):
# (signed in but not paying, not signed in).
DENIED: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {
    "navigation": (("redirect", 303), ("redirect", 303)),
    "api-get": (("payment_required", 402), ("unauthorized", 401)),
    "api-post": (("payment_required", 402), ("unauthorized", 401)),
    "websocket": (("payment_required", 402), ("unauthorized", 401)),
    "head": (("redirect", 303), ("redirect", 303)),
}
DENIED_NO_SUBSCRIPTION = {kind: answers[0] for kind, answers in DENIED.items()}
DENIED_NOT_SIGNED_IN = {kind: answers[1] for kind, answers in DENIED.items()}
# Every Stripe status, and whether it grants access (with PAST_DUE_GRACE=0, PAUSED_ACCESS=false).
STATUSES = {
    "active": True,
    "trialing": True,
    "past_due": False,
    "incomplete": False,
    "incomplete_expired": False,
    "unpaid": False,
    "canceled": False,
    "paused": False,
    "none": False,
}

USER = Identity(email="ada@example.com", customer_id="cus_1", source="cookie")


def facts(kind: str, path: str = "/app", query: str = "") -> RequestFacts:
    method, headers = REQUESTS[kind]
    return request_facts(method, path, query, CIMultiDict(headers))


def ent(status: str, **fields: Any) -> Entitlement:
    values: dict[str, Any] = {
        "customer_id": "cus_1",
        "status": status,
        "checked_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "subscription_id": None if status == "none" else "sub_1",
        "price_id": None if status == "none" else PRICE,
        "period_start": NOW - 10 * DAY,
        "period_end": NOW + 20 * DAY,
        "trial_end": NOW + 5 * DAY if status == "trialing" else None,
    }
    values.update(fields)
    return Entitlement(**values)


# --------------------------------------------------------------------------- the big table


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(REQUESTS))
@pytest.mark.parametrize("status", list(STATUSES))
def test_status_x_request_x_mode(status: str, kind: str, mode: str) -> None:
    d = decide(facts(kind), USER, Lookup(ent(status)), MODES[mode], NOW)
    if not ENFORCED[mode]:
        assert d == Allow("billing_off")
        assert d.access is None  # the rules were not asked
        return
    if STATUSES[status]:
        # The access the verdict rests on comes with it (callers never ask the rules again).
        assert isinstance(d, Allow) and d.reason == status
        assert d.access is not None and d.access.allowed and d.access.reason == status
    else:
        assert isinstance(d, Denial)
        expected_kind, expected_status = DENIED_NO_SUBSCRIPTION[kind]
        assert (d.kind, d.status, d.reason) == (
            expected_kind,
            expected_status,
            "subscription_required",
        )
        assert d.next_path == "/app" and d.retry_after is None
        if d.kind == "redirect":
            assert d.location == "/_gate/subscribe?next=/app"
        else:
            assert d.location is None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(REQUESTS))
def test_not_signed_in(kind: str, mode: str) -> None:
    d = decide(facts(kind), None, None, MODES[mode], NOW)
    if not ENFORCED[mode]:
        assert isinstance(d, Allow) and d.access is None
        return
    assert isinstance(d, Denial)
    expected_kind, expected_status = DENIED_NOT_SIGNED_IN[kind]
    assert (d.kind, d.status, d.reason) == (expected_kind, expected_status, "login_required")


# Special cases, with billing on: (id, kind, identity, lookup, settings changes,
# expected (kind, status, reason)). Public paths never reach decide (the gate answers them).
ERR = "stripe: APIConnectionError"
Expected = tuple[str, int, str]
PAY: Expected = ("payment_required", 402, "subscription_required")
SUBSCRIBE: Expected = ("redirect", 303, "subscription_required")
DOWN: Expected = ("unavailable", 503, "billing_unavailable")
LOGIN: Expected = ("unauthorized", 401, "login_required")


def allow(reason: str) -> Expected:
    return ("allow", 200, reason)


def summary(d: Allow | Denial) -> Expected:
    """(kind, status, reason) of a verdict; an allow is 200."""
    return ("allow", 200, d.reason) if isinstance(d, Allow) else (d.kind, d.status, d.reason)


FAILED = Lookup(None, error=ERR)  # Stripe failed, nothing known
OPEN = {"on_stripe_error": "allow"}
GRACE = {"past_due_grace": 3 * 86400.0}
HEADER_USER = Identity("ada@example.com", None, "header")


def stale(entitlement: Entitlement) -> Lookup:
    return Lookup(entitlement, stale=True, error=ERR)


CASES: list[tuple[str, str, Identity | None, Lookup | None, dict[str, Any], bool, Expected]] = [
    ("no-customer-nav", "navigation", USER, Lookup(None), {}, False, SUBSCRIBE),
    ("no-customer-api", "api-get", USER, Lookup(None), {}, False, PAY),
    ("lookup-not-done", "api-get", USER, None, {}, False, PAY),
    (
        "header-identity",
        "navigation",
        HEADER_USER,
        Lookup(ent("active")),
        {},
        False,
        allow("active"),
    ),
    ("stripe-down-deny-nav", "navigation", USER, FAILED, {}, False, DOWN),
    ("stripe-down-deny-api", "api-post", USER, FAILED, {}, False, DOWN),
    ("stripe-down-deny-ws", "websocket", USER, FAILED, {}, False, DOWN),
    ("stripe-down-allow-nav", "navigation", USER, FAILED, OPEN, False, allow("fail_open")),
    ("stripe-down-allow-ws", "websocket", USER, FAILED, OPEN, False, allow("fail_open")),
    ("stripe-down-anonymous", "api-get", None, FAILED, OPEN, False, LOGIN),
    (
        "stale-active",
        "api-get",
        USER,
        stale(ent("active", expires_at=NOW - 3 * DAY)),
        {},
        False,
        allow("active"),
    ),
    (
        "stale-canceled",
        "api-get",
        USER,
        stale(ent("canceled", expires_at=NOW - 3 * DAY)),
        {},
        False,
        PAY,
    ),
    (
        "stale-canceling-ended",
        "navigation",
        USER,
        stale(ent("active", cancel_at_period_end=True, period_end=NOW - DAY)),
        {},
        False,
        SUBSCRIBE,
    ),
    (
        "canceling-still-on",
        "api-get",
        USER,
        Lookup(ent("active", cancel_at_period_end=True, period_end=NOW + DAY)),
        {},
        False,
        allow("canceling"),
    ),
    (
        "past-due-grace",
        "api-get",
        USER,
        Lookup(ent("past_due", period_start=NOW - DAY)),
        GRACE,
        False,
        allow("past_due_grace"),
    ),
    (
        "past-due-grace-over",
        "navigation",
        USER,
        Lookup(ent("past_due", period_start=NOW - 4 * DAY)),
        GRACE,
        False,
        SUBSCRIBE,
    ),
    ("paused-collection", "api-get", USER, Lookup(ent("active", paused=True)), {}, False, PAY),
    (
        "paused-collection-allowed",
        "api-get",
        USER,
        Lookup(ent("active", paused=True)),
        {"paused_access": True},
        False,
        allow("collection_paused"),
    ),
    ("other-price", "websocket", USER, Lookup(ent("active", price_id="price_B")), {}, False, PAY),
    (
        "other-price-any-allowed",
        "websocket",
        USER,
        Lookup(ent("active", price_id="price_B")),
        {"allow_any_price": True},
        False,
        allow("active"),
    ),
    (
        "grant",
        "navigation",
        USER,
        Lookup(ent("none", source="grant", period_end=NOW + DAY)),
        {},
        False,
        allow("grant"),
    ),
    (
        "grant-expired",
        "api-get",
        USER,
        Lookup(ent("none", source="grant", period_end=NOW - DAY)),
        {},
        False,
        PAY,
    ),
]


@pytest.mark.parametrize(
    ("kind", "identity", "lookup", "changes", "_", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_cases(
    kind: str,
    identity: Identity | None,
    lookup: Lookup | None,
    changes: dict[str, Any],
    _: bool,
    expected: Expected,
) -> None:
    d = decide(facts(kind), identity, lookup, changed(ON, **changes), NOW)
    assert summary(d) == expected
    if isinstance(d, Allow) and d.access is not None:  # the rules were asked and granted
        assert d.access.allowed
    if isinstance(d, Denial):
        assert d.retry_after == (30 if d.kind == "unavailable" else None)


def test_billing_off_allows_even_when_stripe_is_down() -> None:
    d = decide(facts("api-get"), USER, Lookup(None, error=ERR), MODES["off"], NOW)
    assert d.kind == "allow"


# --------------------------------------------------------------------------- redirect target


@pytest.mark.parametrize(
    ("path", "query", "expected_next"),
    [
        ("/", "", "/"),
        ("/app", "", "/app"),
        ("/app", "x=1&y=2", "/app?x=1&y=2"),
        ("/search", "q=caf%C3%A9", "/search?q=caf%C3%A9"),
        ("/a b/ü", "", "/a%20b/%C3%BC"),  # a normalized (decoded) path is re-quoted
        ("/search", "q=a b", "/search?q=a%20b"),  # a decoded query too
        ("/x?y", "", "/x%3Fy"),  # a decoded %3F stays part of the path
        ("/p", "next=//evil.example", "/p?next=//evil.example"),  # harmless inside the query
        ("//evil.example", "", "/"),  # never produced by normalize_path, still refused
        ("/\\evil.example", "", "/"),
        ("/" + "a" * 3000, "", "/"),
    ],
)
def test_redirect_next(path: str, query: str, expected_next: str) -> None:
    d = decide(facts("navigation", path, query), USER, Lookup(ent("canceled")), ON, NOW)
    assert isinstance(d, Denial) and d.kind == "redirect" and d.location is not None
    url = urlsplit(d.location)
    assert (url.scheme, url.netloc, url.path) == ("", "", "/_gate/subscribe")
    (next_value,) = parse_qs(url.query)["next"]
    assert next_value == expected_next
    assert safe_next(next_value) == next_value


def test_redirect_uses_gate_prefix() -> None:
    s = changed(ON, gate_prefix="/billing")
    d = decide(facts("head", "/app"), None, None, s, NOW)
    assert d == Denial("redirect", 303, "login_required", "/billing/subscribe?next=/app", "/app")


@pytest.mark.parametrize(
    ("next_path", "url"),
    [
        ("/app?x=1", "/_gate/subscribe?next=/app%3Fx%3D1"),
        ("/a#frag", "/_gate/subscribe?next=/a%23frag"),
        ("//evil.example", "/_gate/subscribe?next=/"),
        ("https://evil.example", "/_gate/subscribe?next=/"),
        ("", "/_gate/subscribe?next=/"),
    ],
)
def test_subscribe_url(next_path: str, url: str) -> None:
    assert subscribe_url(ON, next_path) == url


# --------------------------------------------------------------------------- request facts


@pytest.mark.parametrize(
    ("method", "headers", "html", "ws", "nav"),
    [
        ("GET", {"Accept": BROWSER_ACCEPT}, True, False, True),
        ("get", {"Accept": BROWSER_ACCEPT}, True, False, True),
        ("HEAD", {"Accept": "TEXT/HTML"}, True, False, True),
        ("GET", {"Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "navigate"}, True, False, True),
        ("GET", {"Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "cors"}, True, False, False),
        ("GET", {"Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "no-cors"}, True, False, False),
        (
            "GET",
            {"Accept": BROWSER_ACCEPT, "X-Requested-With": "XMLHttpRequest"},
            True,
            False,
            False,
        ),
        ("POST", {"Accept": BROWSER_ACCEPT, "Sec-Fetch-Mode": "navigate"}, True, False, False),
        ("PUT", {"Accept": BROWSER_ACCEPT}, True, False, False),
        ("GET", {"Accept": "*/*"}, False, False, False),  # curl
        ("GET", {}, False, False, False),
        ("GET", {"Accept": "application/json"}, False, False, False),
        ("GET", {"Upgrade": "websocket", "Connection": "Upgrade"}, False, True, False),
        ("GET", {"Upgrade": "WebSocket", "Connection": "keep-alive, Upgrade"}, False, True, False),
        (
            "GET",
            {"Upgrade": "websocket", "Connection": "Upgrade", "Accept": BROWSER_ACCEPT},
            True,
            True,
            False,
        ),
        ("GET", {"Upgrade": "websocket"}, False, False, False),  # no Connection: upgrade
        ("GET", {"Connection": "Upgrade", "Upgrade": "h2c"}, False, False, False),
    ],
)
def test_request_facts(
    method: str, headers: dict[str, str], html: bool, ws: bool, nav: bool
) -> None:
    f = request_facts(method, "/p", "q=1", CIMultiDict(headers))
    assert (f.accepts_html, f.is_websocket, f.is_navigation) == (html, ws, nav)
    assert (f.method, f.path, f.query) == (method.upper(), "/p", "q=1")


def test_request_facts_plain_dict_lower_case_headers() -> None:
    f = request_facts("GET", "/", "", {"accept": "text/html", "sec-fetch-mode": "navigate"})
    assert f.is_navigation
    f = request_facts("GET", "/", "", {"upgrade": "websocket", "connection": "upgrade"})
    assert f.is_websocket


def test_allow_carries_the_features_and_the_access() -> None:
    """The gate never asks the rules again: the customer's features (none without a rule that
    names them here) and the access come with the allow."""
    entitlement = ent("active", features=frozenset({"search"}))
    a = decide(facts("api-get"), USER, Lookup(entitlement), ON, NOW)
    b = decide(facts("navigation"), USER, Lookup(entitlement), ON, NOW)
    assert isinstance(a, Allow) and a == b
    assert a.features == frozenset({"search"}) and a.access is not None
    assert a.access.ends_kind == "renews"


def test_denial_next_path_is_the_target_as_sent_validated() -> None:
    method, headers = REQUESTS["api-get"]
    sent = request_facts(method, "/a b", "x=1", CIMultiDict(headers), target="/a%20b?x=1")
    assert decide(sent, None, None, ON, NOW) == Denial(
        "unauthorized", 401, "login_required", None, "/a%20b?x=1"
    )
    evil = request_facts(method, "/x", "", CIMultiDict(headers), target="//evil.example")
    denial = decide(evil, None, None, ON, NOW)
    assert isinstance(denial, Denial) and denial.next_path == "/"


# --------------------------------------------------------------------------- features (tiers)

TIERS = load_settings(
    {
        "BILLING_MODE": "on",
        "STRIPE_SECRET_KEY": "sk_test_1",
        "STRIPE_PRICE_IDS": f"{PRICE},price_B",
        "FEATURE_RULES": "/api/analysis/*=analysis",
        "PRICE_FEATURES": "price_B=analysis",
    },
    demo=True,
)
# Per kind of request: what a paying customer without the feature gets.
FEATURE_DENIED = {
    "navigation": 303,
    "api-get": 402,
    "api-post": 402,
    "websocket": 402,
    "head": 303,
}


def feature_facts(kind: str, feature: str | None) -> RequestFacts:
    method, headers = REQUESTS[kind]
    return request_facts(
        method, "/api/analysis/x", "q=1", CIMultiDict(headers), feature, back="/search?q=1"
    )


@pytest.mark.parametrize("kind", list(REQUESTS))
@pytest.mark.parametrize(
    ("entitlement", "allowed"),
    [
        (ent("active", features=frozenset({"analysis"})), True),  # Stripe's entitlements
        (ent("active", price_id="price_B"), True),  # PRICE_FEATURES
        (ent("active"), False),  # paying, for a plan without it
        (ent("active", features=frozenset({"search"})), False),
        (ent("active", source="grant"), True),  # an operator grant carries every feature
        (ent("trialing", features=frozenset({"analysis"})), True),
    ],
)
def test_feature_required(entitlement: Entitlement, allowed: bool, kind: str) -> None:
    decision = decide(feature_facts(kind, "analysis"), USER, Lookup(entitlement), TIERS, NOW)
    if allowed:
        assert isinstance(decision, Allow) and "analysis" in decision.features
        assert decision.access is not None and decision.access.allowed
        return
    assert isinstance(decision, Denial)
    assert decision.kind == "feature_required" and decision.reason == "feature_required"
    assert decision.status == FEATURE_DENIED[kind]
    assert decision.feature == "analysis"
    # A navigation returns to the page it asked for; an API call or a socket to the page
    # that made it (``back``), never to the API path.
    target = "/api/analysis/x%3Fq%3D1" if FEATURE_DENIED[kind] == 303 else "/search%3Fq%3D1"
    assert decision.location == f"/_gate/upgrade?feature=analysis&next={target}"


@pytest.mark.parametrize(
    ("referer", "back"),
    [
        (None, "/"),
        ("", "/"),
        ("https://app.example.com/page?x=1", "/page?x=1"),
        ("HTTPS://APP.EXAMPLE.COM/page", "/page"),
        ("https://app.example.com", "/"),
        ("https://other.example.com/page", "/"),
        ("http://app.example.com/page", "/"),  # another scheme is another origin
        ("https://app.example.com:8443/page", "/"),
        ("https://app.example.com/_gate/upgrade?feature=x", "/"),
        ("https://app.example.com/_gate", "/"),
        ("https://app.example.com/_gateway/x", "/_gateway/x"),
        ("https://app.example.com/%2F%2Fevil.example", "/"),
        ("https://app.example.com/\\evil.example", "/"),
        ("https://[bad/x", "/"),
    ],
)
def test_back_of_takes_only_a_page_of_the_gates_own_origin(referer: str | None, back: str) -> None:
    assert back_of(referer, ("https://app.example.com",), "/_gate") == back


def test_no_feature_needed_means_any_access() -> None:
    decision = decide(feature_facts("api-get", None), USER, Lookup(ent("active")), TIERS, NOW)
    assert decision.kind == "allow"


@pytest.mark.parametrize("status", ["canceled", "past_due", "unpaid", "none"])
def test_features_without_access_do_not_count(status: str) -> None:
    """A canceled subscription's features are worth nothing: the refusal is about the
    subscription, not the feature."""
    entitlement = ent(status, features=frozenset({"analysis"}))
    decision = decide(feature_facts("api-get", "analysis"), USER, Lookup(entitlement), TIERS, NOW)
    assert decision.kind == "payment_required" and decision.reason == "subscription_required"
