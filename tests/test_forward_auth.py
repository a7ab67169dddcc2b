"""Forward auth (``GET /_gate/auth``): with a real nginx running the example config
``deploy/nginx/gateway-forward-auth.conf`` in front of the demo upstream, and called directly
the way nginx ``auth_request``, Caddy ``forward_auth`` and Traefik ``ForwardAuth`` call it
(all three run for real in tests/test_forward_auth_proxies.py and test_forward_auth_forged.py)."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from gateway.gate import UPSTREAM_HEADERS
from gateway.settings import SESSION_COOKIE
from tests.conftest import ROOT, GateFactory, gate_settings
from tests.shipped import (
    GATE_COOKIE_CASES,
    cookie_of,
    paying_user,
    running_shipped_nginx,
    sign_in,
    stack_behind,
)
from tests.stack import Stack, echoed_headers, form_fields, running_stack

HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
AUTH = "/_gate/auth"
PASS = "/_gate/auth?mode=passthrough"  # Caddy, Traefik: the gate's own answers
GATE_HEADERS = ("X-Gate-User", "X-Gate-Email", "X-Gate-Status", "X-Gate-Plan")
FORWARDED_PAIR = ("X-Forwarded-Uri", "X-Forwarded-Method")  # what Caddy and Traefik set


# --------------------------------------------------------------------------- helpers


def forwarded(
    uri: str, method: str = "GET", host: str = "app.example.com", proto: str = "https", **extra: str
) -> dict[str, str]:
    """The headers Caddy / Traefik add to a forward-auth request."""
    return {
        "X-Forwarded-Method": method,
        "X-Forwarded-Uri": uri,
        "X-Forwarded-Host": host,
        "X-Forwarded-Proto": proto,
        **extra,
    }


# --------------------------------------------------------------------------- nginx


@pytest.fixture
async def nginx_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    """The stack (gate with billing on, demo upstream, Stripe double) with nginx in front of
    the upstream, asking the gate through ``auth_request``."""
    async with stack_behind(tmp_path, running_shipped_nginx) as both:
        yield both


async def test_nginx_anonymous_api_gets_401_json(nginx_stack: tuple[Stack, str]) -> None:
    stack, base = nginx_stack
    async with stack.session() as client:
        async with client.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 401
            body = await resp.json()
        assert body["error"] == "login_required"
        assert body["subscribe_url"] == "/_gate/subscribe"
        # a non-GET browser request is not a navigation: 401 as well, never a redirect
        async with client.post(
            f"{base}/api/echo", headers=HTML, data=b"x", allow_redirects=False
        ) as resp:
            assert resp.status == 401


# The anonymous redirect, the gate headers and the underscore spellings through the shipped
# nginx config: tests/test_forward_auth_proxies.py, for nginx and Caddy alike.


async def test_nginx_strips_only_the_gate_cookie(nginx_stack: tuple[Stack, str]) -> None:
    """Every pair the gate reads as its cookie goes (a second one, spaces around the name or
    "=", a quoted value), nothing else; a header naming it a third time loses every cookie."""
    stack, base = nginx_stack
    async with stack.session() as client:
        await paying_user(stack, client, "otto@example.com")
        session = cookie_of(stack, client)
    thrice = "; ".join([f"{SESSION_COOKIE}={session}"] * 3) + "; b=2"
    cases = [*GATE_COOKIE_CASES, (thrice, None)]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain:
        for sent, expected in cases:
            cookie = sent.format(s=session)
            async with plain.get(f"{base}/api/echo", headers={**JSON, "Cookie": cookie}) as resp:
                assert resp.status == 200, sent
                seen = echoed_headers(await resp.json())
            assert seen.get("cookie") == ([expected] if expected else None), sent


async def test_nginx_signed_in_non_payer_api_gets_402(nginx_stack: tuple[Stack, str]) -> None:
    stack, base = nginx_stack
    customer = stack.double.create_customer("olga@example.com")
    async with stack.session() as client:
        await sign_in(stack, client, customer["id"], "olga@example.com")
        async with client.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 402
            assert (await resp.json())["error"] == "subscription_required"
        async with client.get(f"{base}/", headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == f"{base}/_gate/subscribe?next=/"


async def test_nginx_whole_journey_through_the_proxy(nginx_stack: tuple[Stack, str]) -> None:
    """Landing → Checkout on the double → success → the app: every gate page via nginx, and
    Stripe's return URL points at nginx's host, not the gate's."""
    stack, base = nginx_stack
    async with stack.session() as client:
        async with client.get(f"{base}/api/echo", headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 303
            landing = resp.headers["Location"]
        async with client.get(landing, headers=HTML) as resp:
            form = form_fields(await resp.text(), "/_gate/checkout")
        async with client.post(f"{base}/_gate/checkout", data=form, allow_redirects=False) as resp:
            assert resp.status == 303, await resp.text()
            checkout_url = resp.headers["Location"]
        async with client.post(
            f"{checkout_url}/pay", data={"email": "pia@example.com"}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            success_url = resp.headers["Location"]
        assert success_url.startswith(f"{base}/_gate/success?")
        async with client.get(success_url, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/api/echo"
        async with client.get(f"{base}/api/echo", headers=HTML) as resp:
            assert resp.status == 200
            seen = echoed_headers(await resp.json())
        assert seen["x-gate-user"][0].startswith("cus_")
        assert "x-gate-email" not in seen  # typed on Checkout: not verified, not told


async def test_nginx_blocks_the_auth_endpoint_and_metrics_from_clients(
    nginx_stack: tuple[Stack, str],
) -> None:
    stack, base = nginx_stack
    async with stack.session() as client:
        for path in ("/_gate/auth?mode=nginx", "/_gate/metrics", "/_gate//auth"):
            async with client.get(base + path, headers={"X-Original-URI": "/"}) as resp:
                assert resp.status == 404, path


async def test_nginx_stripe_down_gives_503(nginx_stack: tuple[Stack, str]) -> None:
    stack, base = nginx_stack
    customer = stack.double.create_customer("quinn@example.com")
    stack.double.faults.fail_always(500)
    async with stack.session() as client:
        await sign_in(stack, client, customer["id"], "quinn@example.com")
        async with client.get(f"{base}/", headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "30"
            assert (await resp.json())["error"] == "billing_unavailable"


# --------------------------------------------------------------------------- nginx mode, direct


async def test_nginx_mode_answers_only_200_401_403(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        url = stack.url(f"{AUTH}?mode=nginx")
        base_headers = {
            "X-Original-Method": "GET",
            "X-Forwarded-Host": "app.example.com",
            "X-Forwarded-Proto": "https",
        }

        async def ask(uri: str | None, **headers: str) -> aiohttp.ClientResponse:
            hdrs = {**base_headers, **headers}
            if uri is not None:
                hdrs["X-Original-URI"] = uri
            async with client.get(url, headers=hdrs, allow_redirects=False) as resp:
                await resp.read()
                return resp

        resp = await ask("/page?a=b", Accept="text/html")
        assert resp.status == 401
        assert resp.headers["X-Gate-Denial"] == "redirect"
        assert resp.headers["X-Gate-Location"] == (
            "https://app.example.com/_gate/subscribe?next=/page%3Fa%3Db"
        )
        resp = await ask("/api/x", Accept="application/json")
        assert (resp.status, resp.headers["X-Gate-Denial"]) == (401, "unauthorized")
        assert resp.headers["X-Gate-Location"] == (
            "https://app.example.com/_gate/subscribe?next=/api/x"
        )
        # malformed path and missing URI: 403 (a 400 would be a 500 in nginx)
        assert (await ask("/a/..;/b")).status == 403
        assert (await ask(None)).status == 403

        customer = stack.double.create_customer("rita@example.com")
        await sign_in(stack, client, customer["id"], "rita@example.com")
        resp = await ask("/api/x", Accept="application/json")
        assert (resp.status, resp.headers["X-Gate-Denial"]) == (401, "payment_required")

        stack.double.faults.fail_always(500)
        other = stack.double.create_customer("sam@example.com")
        await sign_in(stack, client, other["id"], "sam@example.com")
        resp = await ask("/", Accept="text/html")
        assert (resp.status, resp.headers["X-Gate-Denial"]) == (401, "unavailable")
        assert "X-Gate-Location" not in resp.headers


@pytest.mark.parametrize(
    ("query", "headers", "answer"),
    [
        ("", {"X-Original-URI": "/page"}, (401, "redirect")),  # nginx's documented setup
        ("?mode=nginx", {"X-Original-URI": "/page"}, (401, "redirect")),
        ("?mode=anything", {"X-Original-URI": "/page"}, (401, "redirect")),
        ("?mode=passthrough", {"X-Forwarded-Uri": "/page"}, (303, None)),  # Caddy, Traefik
        # never guessed from headers: each mode reads its own pair only (see below)
        ("", {"X-Forwarded-Uri": "/page"}, (403, "forbidden")),
        ("?mode=passthrough", {"X-Original-URI": "/page"}, (400, None)),
    ],
)
async def test_only_passthrough_asked_for_gives_other_statuses_than_200_401_403(
    tmp_path: Path, query: str, headers: dict[str, str], answer: tuple[int, str | None]
) -> None:
    async with (
        running_stack(tmp_path) as stack,
        stack.session() as client,
        client.get(
            stack.url(AUTH + query), headers={**HTML, **headers}, allow_redirects=False
        ) as resp,
    ):
        assert (resp.status, resp.headers.get("X-Gate-Denial")) == answer
        if answer[0] == 401:  # the JSON error body says where to go, for a proxy that shows it
            body = await resp.json()
            assert body["error"] == "login_required"
            assert body["subscribe_url"] == resp.headers["X-Gate-Location"]


@pytest.mark.parametrize("mode", ["", "?mode=nginx", "?mode=passthrough"])
async def test_each_mode_reads_the_original_request_from_its_own_headers_only(
    tmp_path: Path, mode: str
) -> None:
    """A proxy passes the client's headers on and sets only its mode's pair (nginx:
    ``X-Original-URI``/``-Method``; Caddy, Traefik: ``X-Forwarded-Uri``/``-Method``): the
    other pair is the client's. Naming a gate path or a public one there must not decide the
    request (the bypass through the shipped Caddyfile: ``X-Original-URI: /_gate/x``)."""
    passthrough = mode == "?mode=passthrough"
    nginx_pair, caddy_pair = ("X-Original-URI", "X-Original-Method"), FORWARDED_PAIR
    (own_uri, own_method), (other_uri, other_method) = (
        (caddy_pair, nginx_pair) if passthrough else (nginx_pair, caddy_pair)
    )
    malformed = 400 if passthrough else 403
    async with (
        running_stack(tmp_path, {"PUBLIC_PATHS": "/static/*"}) as stack,
        stack.session() as client,
    ):

        async def ask(headers: dict[str, str]) -> int:
            async with client.get(
                stack.url(AUTH + mode), headers={**JSON, **headers}, allow_redirects=False
            ) as resp:
                return resp.status

        for forged in ("/_gate/x", "/static/app.css", "/_gate"):
            spoof = {other_uri: forged, other_method: "GET"}
            assert await ask({own_uri: "/api/x", own_method: "POST", **spoof}) == 401, forged
            # the other pair alone is no original request at all
            assert await ask(spoof) == malformed, forged
        # the mode's own pair decides: a gate path is allowed
        assert await ask({own_uri: "/_gate/x", other_uri: "/api/x"}) == 200
        # sent twice (a proxy that adds its own beside the client's): refused, never guessed
        for name, first, second in ((own_uri, "/_gate/x", "/api/x"), (own_method, "GET", "GET")):
            twice = [("Accept", "application/json"), (name, first), (name, second)]
            if name == own_method:
                twice.append((own_uri, "/_gate/x"))
            async with client.get(stack.url(AUTH + mode), headers=twice) as resp:
                assert resp.status == malformed, name


# --------------------------------------------------------------------------- Caddy / Traefik


async def test_passthrough_anonymous_browser_gets_absolute_redirect(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(
            stack.url(PASS), headers={**HTML, **forwarded("/docs?x=1")}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == (
                "https://app.example.com/_gate/subscribe?next=/docs%3Fx%3D1"
            )
            assert resp.headers["Cache-Control"] == "no-store"
        # `next` stays same-origin whatever the original URI looked like
        for uri, expected in (
            ("//evil.example/x", "/evil.example/x"),
            ("/%2F%2Fevil.example", "/evil.example"),
            ("/a/../b", "/b"),
        ):
            async with client.get(
                stack.url(PASS), headers={**HTML, **forwarded(uri)}, allow_redirects=False
            ) as resp:
                assert resp.status == 303, uri
                location = URL(resp.headers["Location"])
            assert (location.host, location.path) == ("app.example.com", "/_gate/subscribe")
            assert location.query["next"] == expected, uri
        # a Host no browser would send is not used to build the redirect
        bad = forwarded("/", host="evil.example/@x")
        async with client.get(
            stack.url(PASS), headers={**HTML, **bad}, allow_redirects=False
        ) as resp:
            assert resp.headers["Location"] == "/_gate/subscribe?next=/"


async def test_passthrough_api_denials_are_the_gates_own(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url(PASS), headers={**JSON, **forwarded("/api/x")}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "login_required"
        post = forwarded("/api/x", method="POST")
        async with client.get(
            stack.url(PASS), headers={**HTML, **post}, allow_redirects=False
        ) as resp:
            assert resp.status == 401  # not a navigation: never a redirect
        customer = stack.double.create_customer("tess@example.com")
        await sign_in(stack, client, customer["id"], "tess@example.com")
        async with client.get(stack.url(PASS), headers={**JSON, **forwarded("/api/x")}) as resp:
            assert resp.status == 402
            body = await resp.json()
        assert body["error"] == "subscription_required"
        stack.double.faults.fail_always(500)
        await sign_in(
            stack, client, stack.double.create_customer("uma@example.com")["id"], "uma@example.com"
        )
        async with client.get(stack.url(PASS), headers={**HTML, **forwarded("/")}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "30"
            assert "Billing is temporarily unavailable" in await resp.text()


async def test_passthrough_paying_user_gets_200_and_gate_headers(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await paying_user(stack, client, "vera@example.com")
        async with client.get(
            stack.url(PASS), headers={**JSON, **forwarded("/api/x", method="POST")}
        ) as resp:
            assert resp.status == 200
            assert await resp.read() == b""
            got = {h: resp.headers.get(h) for h in GATE_HEADERS}
        assert got == {
            "X-Gate-User": customer_id,
            "X-Gate-Email": "vera@example.com",
            "X-Gate-Status": "active",
            "X-Gate-Plan": "price_demo_monthly",
        }
        # nginx mode: the same 200
        nginx_headers = {**JSON, "X-Original-URI": "/api/x", "X-Original-Method": "GET"}
        async with client.get(stack.url(f"{AUTH}?mode=nginx"), headers=nginx_headers) as resp:
            assert resp.status == 200
            assert resp.headers["X-Gate-User"] == customer_id


async def test_passthrough_public_gate_and_malformed_paths(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path, {"PUBLIC_PATHS": "/static/*"}) as stack,
        stack.session() as client,
    ):
        for uri in ("/static/app.css", "/_gate/subscribe?next=/", "/_gate/"):
            async with client.get(
                stack.url(PASS), headers={**HTML, **forwarded(uri)}, allow_redirects=False
            ) as resp:
                assert resp.status == 200, uri
                assert "X-Gate-User" not in resp.headers
        # The bare prefix is not routed to the gate by the shipped configs: decided as the app.
        for uri in ("/_gate", "/_gate?x=1"):
            async with client.get(stack.url(PASS), headers={**JSON, **forwarded(uri)}) as resp:
                assert resp.status == 401, uri
        # an ambiguous path is not taken for a gate path (the app may read it differently)
        async with client.get(
            stack.url(PASS), headers={**JSON, **forwarded("/x/..%2f_gate/a")}, allow_redirects=False
        ) as resp:
            assert resp.status == 401
        async with client.get(stack.url(PASS), headers={**JSON, **forwarded("/a/..;/b")}) as resp:
            assert resp.status == 400
        async with client.get(stack.url(PASS), headers=JSON) as resp:
            assert resp.status == 400  # no X-Forwarded-Uri / X-Original-URI
            assert (await resp.json())["error"] == "bad_request"
        bad_method = forwarded("/", method="GE T")
        async with client.get(stack.url(PASS), headers={**JSON, **bad_method}) as resp:
            assert resp.status == 400


@pytest.mark.parametrize("mode", ["", "?mode=nginx"])
async def test_untrusted_peer_gets_403_even_with_a_valid_cookie(tmp_path: Path, mode: str) -> None:
    env = {"TRUSTED_PROXIES": "10.0.0.0/8"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await paying_user(stack, client, "walt@example.com")
        headers = {**JSON, **forwarded("/api/x"), "X-Original-URI": "/api/x"}
        async with client.get(stack.url(AUTH + mode), headers=headers) as resp:
            assert resp.status == 403
            assert "X-Gate-User" not in resp.headers
            assert (await resp.json())["error"] == "forbidden"


async def test_billing_off_allows_everything(upstream: Any, gate: GateFactory) -> None:
    up = await upstream(web.Application())
    client: TestClient[web.Request, web.Application] = await gate(gate_settings(up))
    resp = await client.get(AUTH, headers={**HTML, **forwarded("/anything")}, allow_redirects=False)
    assert resp.status == 200
    assert "X-Gate-User" not in resp.headers
    # still answered to trusted proxies only
    untrusted = gate_settings(up, trusted_proxies=())
    other: TestClient[web.Request, web.Application] = await gate(untrusted)
    assert (await other.get(AUTH, headers=forwarded("/"))).status == 403


def test_example_configs_ask_for_passthrough_and_say_what_is_tested() -> None:
    caddy = (ROOT / "deploy" / "caddy" / "Caddyfile").read_text()
    traefik = (ROOT / "deploy" / "traefik" / "dynamic.yml").read_text()
    for text in (caddy, traefik):  # tests/test_forward_auth_proxies.py runs both
        assert "untested" not in text.lower()
        assert "/_gate/auth?mode=passthrough" in text
        for header in UPSTREAM_HEADERS:
            assert header in text
