"""Forward auth behind real proxies written the way their own documentation shows.

- nginx with a plain ``auth_request`` config copied from nginx's documentation (no
  ``?mode=…``, no ``error_page``): no denial may become a 500 for the user;
- Caddy (Debian's ``caddy``) running the shipped ``deploy/caddy/Caddyfile`` with only its site
  address and ports replaced: the gate's own answers (303, 401, 402, 503) reach the client,
  a paying user reaches the app with the gate's headers, WebSockets pass;
- the shipped forward-auth configs (``deploy/nginx/gateway-forward-auth.conf``, the Caddyfile
  and ``deploy/traefik/dynamic.yml`` with a real Traefik 3), the same tests for each: the
  anonymous browser's redirect, the gate's headers reaching the app, underscore spellings of
  them dropped. (Every forged header: tests/test_forward_auth_forged.py.)
"""

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiohttp
import pytest

from gateway.gate import UPSTREAM_HEADERS
from gateway.settings import SESSION_COOKIE
from tests.proxies import running_nginx
from tests.shipped import (
    FORWARD_AUTH_PROXIES,
    GATE_COOKIE_CASES,
    assert_a_payer_streams,
    cookie_of,
    echo_as_paying_user,
    paying_user,
    sign_in,
    stack_behind,
)
from tests.stack import Stack, echoed_headers

HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}


def underscore_spellings(names: Iterable[str]) -> dict[str, str]:
    """A forged value for every spelling of each of ``names`` that a WSGI app reads as the
    name itself (``X_Gate_User``, ``x_gate_user``, ``X_GATE_USER``, ``X-Gate_User``)."""
    spellings: dict[str, str] = {}
    for name in names:
        underscored = name.replace("-", "_")
        mixed = "_".join(name.rsplit("-", 1))
        for spelling in (underscored, underscored.lower(), underscored.upper(), mixed):
            spellings[spelling] = f"forged-{name.lower()}"
    return spellings


def docs_nginx_site(port: int, gate_port: int, app_port: int) -> str:
    """ngx_http_auth_request_module's documented example, pointed at the gate and the app."""
    return f"""
server {{
    listen 127.0.0.1:{port};
    location / {{
        auth_request /auth;
        proxy_pass http://127.0.0.1:{app_port};
    }}
    location = /auth {{
        internal;
        proxy_pass http://127.0.0.1:{gate_port}/_gate/auth;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header X-Original-URI $request_uri;
    }}
}}
"""


def running_docs_nginx(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """nginx in the foreground with :func:`docs_nginx_site`; its base URL."""
    return running_nginx(lambda port: docs_nginx_site(port, gate_port, app_port))


@pytest.fixture
async def docs_nginx(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    async with stack_behind(tmp_path, running_docs_nginx) as both:
        yield both


@pytest.fixture(params=["caddy", "traefik"])
async def passthrough(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Stack, str]]:
    """The stack behind each shipped config that asks for the gate's own answers."""
    async with stack_behind(tmp_path, SHIPPED[request.param]) as both:
        yield both


SHIPPED = FORWARD_AUTH_PROXIES


@pytest.fixture(params=list(SHIPPED))
async def shipped(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Stack, str]]:
    """The stack behind each forward-auth config this project ships (nginx, Caddy, Traefik)."""
    async with stack_behind(tmp_path, SHIPPED[request.param]) as both:
        yield both


# --------------------------------------------------------------------------- nginx, docs config


async def test_docs_nginx_denials_are_never_a_500(docs_nginx: tuple[Stack, str]) -> None:
    stack, base = docs_nginx
    non_payer = stack.double.create_customer("nora@example.com")
    async with stack.session() as anonymous, stack.session() as unpaid:
        await sign_in(stack, unpaid, non_payer["id"], "nora@example.com")
        for client in (anonymous, unpaid):
            for headers in (HTML, JSON):
                async with client.get(
                    f"{base}/api/echo", headers=headers, allow_redirects=False
                ) as resp:
                    assert resp.status == 401, (headers, resp.status)
        stack.double.faults.fail_always(500)  # Stripe down, nothing cached for a new user
        late = stack.double.create_customer("lena@example.com")
        await sign_in(stack, unpaid, late["id"], "lena@example.com")
        async with unpaid.get(f"{base}/", headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 401, resp.status


async def test_docs_nginx_lets_a_paying_user_through(docs_nginx: tuple[Stack, str]) -> None:
    stack, base = docs_nginx
    async with stack.session() as client:
        await paying_user(stack, client, "paul@example.com")
        async with client.get(f"{base}/api/echo?q=1", headers=JSON) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["path"] == "/api/echo?q=1"


# --------------------------------------------------------------------------- both shipped files


async def test_anonymous_browser_is_sent_to_subscribe(shipped: tuple[Stack, str]) -> None:
    stack, base = shipped
    async with stack.session() as client:
        async with client.get(f"{base}/docs?x=1", headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
            assert resp.headers["Cache-Control"] == "no-store"
        assert location == f"{base}/_gate/subscribe?next=/docs%3Fx%3D1"
        # the landing page is served by the gate, through the proxy
        async with client.get(location, headers=HTML) as resp:
            assert resp.status == 200
            assert 'action="/_gate/checkout"' in await resp.text()


#: The app's own credential (HTTP Basic), which every proxy must pass on untouched.
APP_AUTHORIZATION = "Basic YXBwOnNlY3JldA=="


async def test_paying_user_reaches_the_app_with_gate_headers(shipped: tuple[Stack, str]) -> None:
    stack, base = shipped
    spoofed = {
        **JSON,
        "X-Gate-User": "cus_spoofed",
        "X-Gate-Plan": "price_free",
        "Cookie": "theme=dark",
        "Authorization": APP_AUTHORIZATION,
    }
    customer_id, seen = await echo_as_paying_user(stack, base, "nina@example.com", spoofed)
    assert seen["x-gate-user"] == [customer_id]
    assert seen["x-gate-email"] == ["nina@example.com"]
    assert seen["x-gate-status"] == ["active"]
    assert seen["x-gate-plan"] == ["price_demo_monthly"]
    # the app keeps its own cookies and Authorization but never sees the gate's session cookie
    assert SESSION_COOKIE not in " ".join(seen.get("cookie", []))
    assert "theme=dark" in " ".join(seen.get("cookie", []))
    assert seen["authorization"] == [APP_AUTHORIZATION]


async def test_proxy_drops_underscore_spellings_of_the_gate_headers(
    shipped: tuple[Stack, str],
) -> None:
    """A WSGI app reads ``X_Gate_User`` as ``HTTP_X_GATE_USER``: the proxy must not pass it
    on (nginx: ``underscores_in_headers off``, its default, which the example keeps; Caddy:
    the Caddyfile's ``request_header -*_*``; Traefik: the example's
    ``authResponseHeadersRegex``)."""
    stack, base = shipped
    spoofed = {**JSON, **underscore_spellings(UPSTREAM_HEADERS)}
    _, seen = await echo_as_paying_user(stack, base, "ulla@example.com", spoofed)
    assert not {name for name in seen if "_" in name}, seen
    assert not [value for values in seen.values() for value in values if "forged" in value]


# --------------------------------------------------------------------------- Caddy, Traefik


async def test_passthrough_api_denials_are_the_gates_json(
    passthrough: tuple[Stack, str],
) -> None:
    stack, base = passthrough
    non_payer = stack.double.create_customer("ines@example.com")
    async with stack.session() as anonymous, stack.session() as unpaid:
        async with anonymous.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "login_required"
        await sign_in(stack, unpaid, non_payer["id"], "ines@example.com")
        async with unpaid.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 402
            assert (await resp.json())["error"] == "subscription_required"
        stack.double.faults.fail_always(500)
        late = stack.double.create_customer("jon@example.com")
        await sign_in(stack, unpaid, late["id"], "jon@example.com")
        async with unpaid.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "billing_unavailable"


async def test_passthrough_proxies_pass_a_paying_users_websocket_and_streams(
    passthrough: tuple[Stack, str],
) -> None:
    stack, base = passthrough
    await assert_a_payer_streams(stack, base, "lars@example.com")


async def test_passthrough_proxies_strip_only_the_gate_cookie(
    passthrough: tuple[Stack, str],
) -> None:
    """Every pair the gate reads as its cookie goes, however many (a second one, spaces around
    the name or "=", a quoted value), nothing else: Caddy by its own regular expressions,
    Traefik by the Cookie the gate hands back (``authResponseHeaders``)."""
    stack, base = passthrough
    async with stack.session() as client:
        await paying_user(stack, client, "otto@example.com")
        session = cookie_of(stack, client)
    thrice = "; ".join([f"{SESSION_COOKIE}={session}"] * 3) + "; b=2"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain:
        for sent, expected in [*GATE_COOKIE_CASES, (thrice, "b=2")]:
            cookie = sent.format(s=session)
            async with plain.get(f"{base}/api/echo", headers={**JSON, "Cookie": cookie}) as resp:
                assert resp.status == 200, await resp.text()
                seen = echoed_headers(await resp.json())
            # Caddy leaves an empty Cookie header when the gate's was the only cookie, Traefik none.
            assert seen.get("cookie", [""]) == [expected or ""], sent
