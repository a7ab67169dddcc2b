"""Every refusal and error, on every surface, in the one JSON schema (or an escaped page)."""

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from aiohttp import WSServerHandshakeError, web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.decision import decide, request_facts
from gateway.model import Denial, Identity, Lookup, RequestFacts
from gateway.responses import (
    DENIAL_HEADER,
    LOCATION_HEADER,
    bad_handshake,
    denial_body,
    denial_response,
    error_page,
    error_response,
    forbidden,
    forward_auth_denial,
    upstream_failure,
    websocket_refused,
)
from gateway.settings import Settings, load_settings

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
ERR = "stripe: APIConnectionError"
NOT_PAYING = Lookup(None)  # signed in, no subscription
USER = Identity(email="ada@example.com", customer_id="cus_1", source="cookie")
_ON = {"BILLING_MODE": "on", "STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_PRICE_IDS": "price_A"}
ON = load_settings(_ON, demo=True)
REQUESTS = {
    "navigation": ("GET", {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}),
    "api-get": ("GET", {"Accept": "application/json"}),
    "api-post": ("POST", {"Accept": "application/json"}),
    "websocket": ("GET", {"Upgrade": "websocket", "Connection": "Upgrade"}),
}
SCHEMA = {"error", "message", "subscribe_url", "login_url", "retry_url"}
HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}


def facts(kind: str, path: str = "/app") -> RequestFacts:
    method, headers = REQUESTS[kind]
    return request_facts(method, path, "", CIMultiDict(headers))


def denial(kind: str, lookup: Lookup | None, path: str = "/app", settings: Settings = ON) -> Denial:
    d = decide(facts(kind, path), None if lookup is None else USER, lookup, settings, NOW)
    assert isinstance(d, Denial) and d.next_path == path
    return d


def request(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("GET", "/x", headers=CIMultiDict(headers))


# --------------------------------------------------------------------------- denial bodies


def test_denial_body_subscription_required() -> None:
    assert denial_body(denial("api-get", NOT_PAYING), "/_gate") == {
        "error": "subscription_required",
        "message": "An active subscription is required to use this app.",
        "subscribe_url": "/_gate/subscribe",
    }


def test_denial_body_login_required() -> None:
    billing = load_settings({**_ON, "GATE_PREFIX": "/billing"}, demo=True)
    body = denial_body(denial("websocket", None, settings=billing), "/billing")
    assert body["error"] == "login_required"
    assert body["login_url"] == "/billing/login"
    assert body["subscribe_url"] == "/billing/subscribe"


def test_denial_body_unavailable() -> None:
    body = denial_body(denial("api-get", Lookup(None, error=ERR)), "/_gate")
    assert body["error"] == "billing_unavailable"
    assert set(body) == {"error", "message", "subscribe_url"}


def test_denial_body_of_a_redirect_keeps_next() -> None:
    d = denial("navigation", NOT_PAYING)
    assert denial_body(d, "/_gate")["subscribe_url"] == "/_gate/subscribe?next=/app"


def test_unavailable_asks_to_retry() -> None:
    d = denial("api-get", Lookup(None, error=ERR))
    assert (d.kind, d.status, d.retry_after) == ("unavailable", 503, 30)
    resp = denial_response(request(JSON), d, ON)
    assert resp.headers["Retry-After"] == "30"


# --------------------------------------------------------------------------- one schema

HANDSHAKE = WSServerHandshakeError(None, (), status=403, message="no")  # type: ignore[arg-type]
SURFACES: dict[str, Callable[[web.Request], web.Response]] = {
    "redirect-as-json": lambda r: denial_response(r, denial("api-get", NOT_PAYING), ON),
    "login": lambda r: denial_response(r, denial("api-post", None), ON),
    "unavailable": lambda r: denial_response(r, denial("api-get", Lookup(None, error=ERR)), ON),
    "bad-path": lambda r: denial_response(r, Denial("bad_request", 400, "bad_request"), ON),
    "not-found": lambda r: error_response(r, ON, 404, "not_found", "There is nothing here."),
    "upstream-down": lambda r: upstream_failure(r, ON, ConnectionError("refused")),
    "upstream-timeout": lambda r: upstream_failure(r, ON, TimeoutError()),
    "ws-refused": lambda r: websocket_refused(r, ON, HANDSHAKE),
    "ws-bad-handshake": lambda r: bad_handshake(),
    "page": lambda r: error_page(r, ON, "unknown_checkout", "Unknown", "Not valid.", status=400),
    "page-retry": lambda r: error_page(
        r, ON, "billing_unavailable", "Down", "Later.", retry_url="/a"
    ),
    "forward-auth-forbidden": lambda r: forbidden("trusted proxies only"),
    "forward-auth-bad-path": lambda r: forward_auth_denial(
        r, Denial("bad_request", 400, "bad_request"), ON, nginx=False, base=""
    ),
}


@pytest.mark.parametrize("surface", list(SURFACES))
def test_every_json_error_has_the_one_schema(surface: str) -> None:
    resp = SURFACES[surface](request(JSON))
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.status >= 400
    assert resp.body is not None
    body = json.loads(resp.body)  # type: ignore[arg-type]
    assert set(body) <= SCHEMA
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert all(
        isinstance(v, str) and v.startswith("/") for k, v in body.items() if k.endswith("_url")
    )


def test_page_retry_url_is_in_the_json_too() -> None:
    resp = error_page(request(JSON), ON, "billing_unavailable", "Down", "Later.", retry_url="/a")
    assert json.loads(resp.body)["retry_url"] == "/a"  # type: ignore[arg-type]
    assert resp.status == 503 and resp.headers["Retry-After"] == "30"


# --------------------------------------------------------------------------- pages


def test_pages_are_templates_and_escape_what_they_show() -> None:
    d = replace(denial("api-get", Lookup(None, error=ERR)), next_path='/a"><script>x</script>')
    resp = denial_response(request(HTML), d, ON)
    assert resp.status == 503 and resp.content_type == "text/html"
    assert resp.text is not None
    assert "Billing is temporarily unavailable" in resp.text
    assert "<script>x" not in resp.text
    assert 'href="/a&#34;&gt;&lt;script&gt;x&lt;/script&gt;"' in resp.text
    assert "/_gate/static/gate.css" in resp.text  # the gate's own look, from base.html
    page = error_page(request(HTML), ON, "x", "<b>T</b>", "<i>m</i>", status=400)
    assert page.text is not None and "<b>" not in page.text and "&lt;i&gt;m" in page.text


@pytest.mark.parametrize(
    ("kind", "lookup", "denial_kind", "location"),
    [
        ("navigation", NOT_PAYING, "redirect", "https://h/_gate/subscribe?next=/app"),
        ("api-get", None, "unauthorized", "https://h/_gate/subscribe?next=/app"),
        (
            "api-get",
            NOT_PAYING,
            "payment_required",
            "https://h/_gate/subscribe?next=/app",
        ),
        ("api-get", Lookup(None, error=ERR), "unavailable", None),
    ],
)
def test_forward_auth_nginx_answers_401_with_the_kind(
    kind: str, lookup: Lookup | None, denial_kind: str, location: str | None
) -> None:
    resp = forward_auth_denial(
        request(JSON), denial(kind, lookup), ON, nginx=True, base="https://h"
    )
    assert resp.status == 401
    assert resp.headers[DENIAL_HEADER] == denial_kind
    assert resp.headers.get(LOCATION_HEADER) == location


def test_forward_auth_default_makes_the_redirect_absolute() -> None:
    d = denial("navigation", NOT_PAYING)
    resp = forward_auth_denial(request(HTML), d, ON, nginx=False, base="https://h")
    assert (resp.status, resp.headers["Location"]) == (303, "https://h/_gate/subscribe?next=/app")
    assert d.location == "/_gate/subscribe?next=/app"  # the verdict itself is unchanged


# -------------------------------------------------------------------------- links and framing


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("/_gate/subscribe?next=%2F%2Fevil.example%2F", "/_gate/subscribe?next=%2F"),
        ("/_gate/account?next=https://evil.example/", "/_gate/account?next=%2F"),
        ("/_gate/login?next=/app%3Fx%3D1", "/_gate/login?next=/app%3Fx%3D1"),
        (
            "/_gate/success?session_id=cs_1&next=%2Fapp",
            "/_gate/success?session_id=cs_1&next=%2Fapp",
        ),
        ("//evil.example/", None),
        ("https://evil.example/", None),
    ],
)
def test_try_again_links_are_local_with_a_validated_next(raw: str, shown: str | None) -> None:
    """Whatever a handler passes as ``retry_url``, the page and the JSON show only a local
    link whose ``next`` passed safe_next."""
    page = error_page(request(HTML), ON, "internal_error", "T", "M", status=500, retry_url=raw)
    text = page.text or ""
    assert "evil" not in text
    if shown is None:
        assert 'id="retry"' not in text
    else:
        assert f'id="retry" href="{shown.replace("&", "&amp;")}"' in text
    answer = error_page(request(JSON), ON, "internal_error", "T", "M", status=500, retry_url=raw)
    assert json.loads(answer.text or "").get("retry_url") == shown


def test_every_page_refuses_framing_and_json_needs_not() -> None:
    page = error_page(request(HTML), ON, "x", "T", "M", status=400)
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert "X-Frame-Options" not in error_page(request(JSON), ON, "x", "T", "M").headers
