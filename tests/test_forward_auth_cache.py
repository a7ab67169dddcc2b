"""Forward auth at nginx speed: the shipped nginx config caches the gate's allow answers.

Through a real nginx running ``deploy/nginx/gateway-forward-auth.conf`` (auth cache on) and a
real Caddy running ``deploy/caddy/Caddyfile`` (no auth cache): a paying user passes and most of
their requests never reach the gate (nginx); a sign-out or a cancellation takes effect within
the documented bound (``L1_TTL``, here 2 s: waited for with a generous deadline, and the time
it took is printed); one user's cached allow never answers another user (another cookie, no
cookie, an identity header); WebSockets and SSE streams pass; denials are never cached and
still reach the user as 303 / 401 / 402 / 503. And the gate with ``WORKERS=2`` behind nginx.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gateway.metrics import FORWARD_AUTH
from gateway.settings import SESSION_COOKIE
from tests.conftest import StartGate
from tests.proxies import running_nginx
from tests.shipped import (
    assert_a_payer_streams,
    assert_events_stream,
    cookie_of,
    paying_user,
    running_shipped_caddy,
    running_shipped_nginx,
    running_shipped_nginx_passing_identity,
    shipped_nginx_site,
    stack_behind,
)
from tests.stack import Stack, echoed_headers, form_fields, running_stack

HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
L1_TTL = 2
#: The documented bound is L1_TTL (+1 s of rounding); this only stops a broken test from
#: hanging on a loaded machine, it is not the bound.
DEADLINE = L1_TTL + 30


def nginx_allows() -> float:
    """The gate's 200 answers to nginx so far (in this process)."""
    return float(FORWARD_AUTH[("nginx", 200)])


async def status_with(base: str, path: str, headers: dict[str, str]) -> int:
    """One request from a fresh client with exactly ``headers`` (no cookie jar)."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain,
        plain.get(base + path, headers=headers, allow_redirects=False) as resp,
    ):
        await resp.read()
        return resp.status


async def seconds_until_refused(base: str, cookie: str) -> float:
    """Replay the session ``cookie`` until it is refused (401); the seconds that took."""
    headers = {**JSON, "Cookie": f"{SESSION_COOKIE}={cookie}"}
    started = time.monotonic()
    while (status := await status_with(base, "/api/echo", headers)) == 200:
        assert time.monotonic() - started < DEADLINE, "still allowed long after the bound"
        await asyncio.sleep(0.05)
    assert status == 401, status
    return time.monotonic() - started


async def press(base: str, client: aiohttp.ClientSession, action: str) -> None:
    """A button of the account page, through the proxy at ``base`` (its own CSRF token)."""
    async with client.get(f"{base}/_gate/account", headers=HTML) as resp:
        assert resp.status == 200, resp.status
        form = form_fields(await resp.text(), action)
    async with client.post(f"{base}{action}", data=form, allow_redirects=False) as resp:
        assert resp.status == 303, resp.status


async def sign_out_through(stack: Stack, base: str, email: str) -> tuple[float, dict[str, str]]:
    """A new paying user passes through the proxy at ``base`` and signs out there: the seconds
    until their session cookie is refused, and the request headers that carry it."""
    async with stack.session() as client:
        await paying_user(stack, client, email)
        cookie = cookie_of(stack, client)
        headers = {**JSON, "Cookie": f"{SESSION_COOKIE}={cookie}"}
        assert await status_with(base, "/api/echo", headers) == 200  # cached now (nginx)
        await press(base, client, "/_gate/logout")
    return await seconds_until_refused(base, cookie), headers


async def cancel_after_paying(
    stack: Stack, client: aiohttp.ClientSession, base: str, email: str
) -> None:
    """``client`` becomes a paying user, passes through ``base``, then their subscription is
    canceled (the webhook reaches the gate before this returns)."""
    customer_id = await paying_user(stack, client, email)
    assert cookie_of(stack, client)  # signed in by the cookie, not by anything else
    async with client.get(f"{base}/api/echo", headers=JSON) as resp:
        assert resp.status == 200
    (sub,) = stack.double.customer_subscriptions(customer_id)
    await stack.double.cancel_subscription(sub["id"])


@pytest.fixture
async def cached_nginx(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    """The stack behind the shipped nginx config, ``L1_TTL`` short so that waits are short."""
    async with stack_behind(tmp_path, running_shipped_nginx, {"L1_TTL": f"{L1_TTL}s"}) as both:
        yield both


@pytest.fixture
async def caddy(tmp_path: Path) -> AsyncIterator[tuple[Stack, str]]:
    """The stack behind the shipped Caddyfile, ``L1_TTL`` as for nginx."""
    async with stack_behind(tmp_path, running_shipped_caddy, {"L1_TTL": f"{L1_TTL}s"}) as both:
        yield both


# --------------------------------------------------------------------------- what the gate says


async def test_gate_lets_only_remembered_cookie_allows_be_cached(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path, {"L1_TTL": f"{L1_TTL}s", "PUBLIC_PATHS": "/static/*"}) as stack,
        stack.session() as client,
    ):
        url = stack.url("/_gate/auth")

        async def cache_control(uri: str, **extra: str) -> tuple[int, str]:
            headers = {**JSON, "X-Original-URI": uri, **extra}
            async with client.get(url, headers=headers, allow_redirects=False) as resp:
                return resp.status, resp.headers["Cache-Control"]

        assert await cache_control("/api/x") == (401, "no-store")  # anonymous
        assert await cache_control("/static/a.css") == (200, "no-store")  # public: any cookie
        await paying_user(stack, client, "cara@example.com")
        status, allowed = await cache_control("/api/x")
        assert status == 200 and allowed.startswith("max-age=")
        assert 0 < int(allowed.removeprefix("max-age=")) <= L1_TTL
        # the same cookie on a public or a gate path: no headers for the app, so not cached
        assert await cache_control("/static/a.css") == (200, "no-store")
        assert await cache_control("/_gate/account") == (200, "no-store")
        # a non-payer's cookie: a denial, never cached
        other = stack.double.create_customer("dora@example.com")
        async with stack.session() as unpaid:
            await stack.sign_in(unpaid, other["id"], "dora@example.com")
            headers = {**JSON, "X-Original-URI": "/api/x"}
            async with unpaid.get(url, headers=headers) as resp:
                assert (resp.status, resp.headers["Cache-Control"]) == (401, "no-store")


#: Cookie headers on which nginx's ``$cookie_gate_session`` (the auth cache key) and the gate
#: may read different values: nginx matches the name in any case, after a comma, and skips only
#: spaces before "="; the gate takes the first ``;``-separated pair whose trimmed name is its own.
UNCLEAR_COOKIES = (
    "GATE_SESSION={k}; gate_session={p}",
    "x=1,gate_session={k}; gate_session={p}",
    "gate_session\t={p}; gate_session={k}",
    "gate_session={p}; gate_session={k}",
    "a=1;gate_session={p}",  # read alike, but not browsers' form: not cached either
)


async def test_gate_lets_an_allow_be_cached_only_for_a_cookie_both_read_alike(
    tmp_path: Path,
) -> None:
    """The gate itself, not only the nginx config, decides that an allow is cacheable only
    for a ``Cookie`` header naming its cookie once, in the form browsers send (at the start or
    after ``"; "``): any other spelling may be keyed by nginx on another value than the one the
    gate decided on (a payer's allow kept under a made-up value anyone could send). So a config
    without the shipped ``proxy_no_cache`` map still caches nothing it should not."""
    async with (
        running_stack(tmp_path, {"L1_TTL": f"{L1_TTL}s"}) as stack,
        stack.session() as client,
    ):
        await paying_user(stack, client, "nell@example.com")
        session = cookie_of(stack, client)

        async def cache_control(cookie: str) -> tuple[int, str]:
            headers = {**JSON, "X-Original-URI": "/api/x", "Cookie": cookie}
            async with (
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain,
                plain.get(stack.url("/_gate/auth"), headers=headers) as resp,
            ):
                return resp.status, resp.headers["Cache-Control"]

        for browser_form in (
            f"{SESSION_COOKIE}={session}",
            f"a=1; {SESSION_COOKIE}={session}; b=2",
        ):
            status, allowed = await cache_control(browser_form)
            assert status == 200 and allowed.startswith("max-age="), (browser_form, allowed)
        for spelling in UNCLEAR_COOKIES:
            cookie = spelling.format(p=session, k="made-up")
            assert await cache_control(cookie) == (200, "no-store"), cookie


async def test_gate_never_lets_an_identity_header_allow_be_cached(tmp_path: Path) -> None:
    env = {"L1_TTL": f"{L1_TTL}s", "IDENTITY_HEADER": "X-Forwarded-Email"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await paying_user(stack, client, "ella@example.com")
        headers = {**JSON, "X-Original-URI": "/api/x", "X-Forwarded-Email": "ella@example.com"}
        async with aiohttp.ClientSession() as plain:
            for _ in range(2):  # also once the gate has remembered whatever it remembers
                async with plain.get(stack.url("/_gate/auth"), headers=headers) as resp:
                    assert (resp.status, resp.headers["Cache-Control"]) == (200, "no-store")


# --------------------------------------------------------------------------- nginx, cached


async def test_nginx_answers_a_paying_user_from_its_cache(cached_nginx: tuple[Stack, str]) -> None:
    stack, base = cached_nginx
    async with stack.session() as client:
        customer_id = await paying_user(stack, client, "fay@example.com")
        asked = nginx_allows()
        for i in range(20):
            async with client.get(f"{base}/api/echo?i={i}", headers=JSON) as resp:
                assert resp.status == 200, await resp.text()
                seen = echoed_headers(await resp.json())
            # a cached answer still carries the gate's headers to the app
            assert seen["x-gate-user"] == [customer_id]
            assert seen["x-gate-email"] == ["fay@example.com"]
            assert SESSION_COOKIE not in " ".join(seen.get("cookie", []))
    # 20 requests within a few seconds: nginx asked the gate about once per L1_TTL, not 20 times
    assert nginx_allows() - asked < 20 / 2, nginx_allows() - asked


async def test_nginx_sign_out_ends_the_cached_allow_within_the_bound(
    cached_nginx: tuple[Stack, str],
) -> None:
    stack, base = cached_nginx
    took, headers = await sign_out_through(stack, base, "gina@example.com")
    print(f"nginx: sign-out took effect after {took:.2f} s (bound: L1_TTL={L1_TTL} s + 1 s)")
    # and stays refused (nothing cached for it any more)
    assert await status_with(base, "/api/echo", headers) == 401


async def test_nginx_cancellation_ends_the_cached_allow_within_the_bound(
    cached_nginx: tuple[Stack, str],
) -> None:
    stack, base = cached_nginx
    async with stack.session() as client:
        await cancel_after_paying(stack, client, base, "hana@example.com")
        started = time.monotonic()
        while True:
            async with client.get(f"{base}/api/echo", headers=JSON) as resp:
                if resp.status != 200:
                    break
            assert time.monotonic() - started < DEADLINE, "still allowed long after the bound"
            await asyncio.sleep(0.05)
        assert resp.status == 402  # signed in, no longer paying
        print(f"nginx: cancellation took effect after {time.monotonic() - started:.2f} s")


@pytest.mark.parametrize("identity", [True, False], ids=["identity-header", "cookies-only"])
@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
async def test_never_answers_one_user_with_anothers_allow(
    tmp_path: Path, proxy: str, identity: bool
) -> None:
    """nginx from its auth cache, Caddy from the gate's own verdict cache: another cookie, no
    cookie, a forged one or another identity header never gets the payer's allow. With
    ``IDENTITY_HEADER`` set and without. As the files ship, a client's identity header is
    dropped either way (nobody's word: the cookie decides); with it set, nginx runs as its
    comment says to change it behind an auth proxy that sets the header (passed on, believed:
    the auth cache is keyed on it too)."""
    env = {"L1_TTL": f"{L1_TTL}s"}
    believed = identity and proxy == "nginx"
    if identity:
        env["IDENTITY_HEADER"] = "X-Forwarded-Email"
    nginx = running_shipped_nginx_passing_identity if identity else running_shipped_nginx
    runner = {"nginx": nginx, "caddy": running_shipped_caddy}[proxy]
    async with (
        stack_behind(tmp_path, runner, env) as (stack, base),
        stack.session() as payer,
    ):
        await paying_user(stack, payer, "ida@example.com")
        cookie = f"{SESSION_COOKIE}={cookie_of(stack, payer)}"
        assert await status_with(base, "/api/echo", {**JSON, "Cookie": cookie}) == 200
        unpaid = stack.double.create_customer("jana@example.com")
        async with stack.session() as other:
            value = await stack.sign_in(other, unpaid["id"], "jana@example.com")
        others = {
            "no cookie": {**JSON},
            "another cookie": {**JSON, "Cookie": f"{SESSION_COOKIE}={value}"},
            "a forged cookie": {**JSON, "Cookie": f"{SESSION_COOKIE}=x{cookie[-20:]}"},
            "an app cookie only": {**JSON, "Cookie": "theme=dark"},
            # the believed identity header names someone else: the gate decides by it
            "the cookie + another identity": {
                **JSON,
                "Cookie": cookie,
                "X-Forwarded-Email": "jana@example.com",
            },
        }
        expected = {
            "another cookie": 402,
            "the cookie + another identity": 402 if believed else 200,
        }
        for _ in range(3):  # the payer's allow is in the cache all along
            assert await status_with(base, "/api/echo", {**JSON, "Cookie": cookie}) == 200
            for case, headers in others.items():
                got = await status_with(base, "/api/echo", headers)
                assert got == expected.get(case, 401), case
        # a paying identity-header user's allow is not cached for a request without it (and
        # where it is not believed the header alone is nobody)
        ida = {**JSON, "X-Forwarded-Email": "ida@example.com"}
        assert await status_with(base, "/api/echo", ida) == (200 if believed else 401)
        assert await status_with(base, "/api/echo", JSON) == 401


@pytest.mark.parametrize(
    "spelling",
    [
        "GATE_SESSION={k}; gate_session={p}",  # nginx matches the name in any case
        "x=1,gate_session={k}; gate_session={p}",  # and splits pairs at commas too
        "gate_session\t={p}; gate_session={k}",  # the gate trims a tab, nginx only spaces
        "gate_session={p}; gate_session={k}",  # the same name twice
    ],
)
async def test_nginx_caches_under_the_cookie_the_gate_decided_on(
    cached_nginx: tuple[Stack, str], spelling: str
) -> None:
    """The gate takes the first ``;``-separated pair whose trimmed name is its cookie; nginx's
    auth cache must never key an allow on another pair. Else a payer sends ``GATE_SESSION=K;
    gate_session=P`` (P their session: the gate allows; K any string nginx reads as the
    cookie), nginx keeps the allow under K, and anyone sending ``gate_session=K`` is let in on
    the payer's subscription, renewed as often as they like."""
    stack, base = cached_nginx
    async with stack.session() as payer:
        await paying_user(stack, payer, "mona@example.com")
        session = cookie_of(stack, payer)
    key = "shared-by-mona"
    minted = {**JSON, "Cookie": spelling.format(p=session, k=key)}
    assert await status_with(base, "/api/echo", minted) == 200
    assert await status_with(base, "/api/echo", minted) == 200  # cached now, if at all
    borrowed = {**JSON, "Cookie": f"{SESSION_COOKIE}={key}"}
    assert await status_with(base, "/api/echo", borrowed) == 401


def running_nginx_without_the_cookie_map(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """The shipped nginx config with its auth cache's cookie map taken out of ``proxy_no_cache``
    (an operator's edit, or a config of their own): only the gate's answer decides."""

    def site(port: int) -> str:
        text = shipped_nginx_site(port, gate_port, app_port)
        line = "proxy_no_cache $gateway_uncached $upstream_http_x_gate_denial;"
        assert text.count(line) == 1
        return text.replace(line, "proxy_no_cache $upstream_http_x_gate_denial;")

    return running_nginx(site)


async def test_nginx_caches_under_the_cookie_the_gate_decided_on_without_the_map(
    tmp_path: Path,
) -> None:
    """The same attack through a config without the cookie map: the gate's ``no-store`` on
    every spelling both parsers may read differently keeps the made-up key out."""
    env = {"L1_TTL": f"{L1_TTL}s"}
    async with stack_behind(tmp_path, running_nginx_without_the_cookie_map, env) as (stack, base):
        async with stack.session() as payer:
            await paying_user(stack, payer, "nina@example.com")
            session = cookie_of(stack, payer)
        for n, spelling in enumerate(UNCLEAR_COOKIES):
            key = f"shared-by-nina-{n}"
            minted = {**JSON, "Cookie": spelling.format(p=session, k=key)}
            assert await status_with(base, "/api/echo", minted) == 200
            assert await status_with(base, "/api/echo", minted) == 200  # cached now, if at all
            borrowed = {**JSON, "Cookie": f"{SESSION_COOKIE}={key}"}
            assert await status_with(base, "/api/echo", borrowed) == 401, spelling


async def test_nginx_never_caches_a_denial(cached_nginx: tuple[Stack, str]) -> None:
    """A non-payer who subscribes passes at once; denials keep their 303/401/402/503."""
    stack, base = cached_nginx
    async with stack.session() as client:
        customer = stack.double.create_customer("kim@example.com")
        await stack.sign_in(client, customer["id"], "kim@example.com")
        for _ in range(2):
            async with client.get(f"{base}/api/echo", headers=JSON) as resp:
                assert resp.status == 402
            async with client.get(f"{base}/", headers=HTML, allow_redirects=False) as resp:
                assert resp.status == 303
        sub = stack.double.create_subscription(customer["id"], "price_demo_monthly")
        await stack.double.emit("customer.subscription.created", sub)  # the webhook
        async with client.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 200, await resp.text()
    async with stack.session() as anonymous:
        for _ in range(2):
            async with anonymous.get(f"{base}/api/echo", headers=JSON) as resp:
                assert resp.status == 401
        stack.double.faults.fail_always(500)
        late = stack.double.create_customer("lou@example.com")
        await stack.sign_in(anonymous, late["id"], "lou@example.com")
        for _ in range(2):
            async with anonymous.get(f"{base}/", headers=HTML, allow_redirects=False) as resp:
                assert resp.status == 503


async def test_nginx_passes_websockets_and_streams_with_the_cache(
    cached_nginx: tuple[Stack, str],
) -> None:
    stack, base = cached_nginx
    await assert_a_payer_streams(stack, base, "mia@example.com", times=2)  # 2nd: auth cache


async def test_nginx_in_front_of_two_workers(tmp_path: Path, gate_process: StartGate) -> None:
    """``WORKERS=2`` behind the shipped config: a paying user passes; a sign-out on one worker
    ends the session on the other within the bound (each worker keeps its own caches)."""
    async with running_stack(tmp_path) as stack:
        gate = await gate_process(
            {
                **stack.process_env(),
                "STRIPE_MAX_RETRIES": "0",
                "L1_TTL": f"{L1_TTL}s",
                "WORKERS": "2",
                "ALLOWED_HOSTS": "127.0.0.1:*",
            }
        )
        assert stack.upstream.port is not None
        site = lambda port: shipped_nginx_site(port, gate.port, stack.upstream.port or 0)  # noqa: E731
        customer = stack.double.create_customer("nell@example.com")
        stack.double.create_subscription(customer["id"], "price_demo_monthly")
        async with running_nginx(site) as base, stack.session() as client:
            value = await stack.sign_in(client, customer["id"], "nell@example.com")
            client.cookie_jar.update_cookies({SESSION_COOKIE: value}, response_url=URL(base))
            for i in range(10):
                async with client.get(f"{base}/api/echo?i={i}", headers=JSON) as resp:
                    assert resp.status == 200, await resp.text()
                    seen = echoed_headers(await resp.json())
                assert seen["x-gate-user"] == [customer["id"]]
            await press(base, client, "/_gate/logout")
            took = await seconds_until_refused(base, value)
            print(f"WORKERS=2: sign-out took effect after {took:.2f} s")


# --------------------------------------------------------------------------- Caddy (no cache)


async def test_caddy_sign_out_and_cancellation_take_effect(caddy: tuple[Stack, str]) -> None:
    """Caddy asks the gate about every request: the gate's own verdict cache decides, and a
    sign-out or a cancellation on this (only) worker ends it at once."""
    stack, base = caddy
    took, _ = await sign_out_through(stack, base, "nora@example.com")
    print(f"Caddy: sign-out took effect after {took:.2f} s")
    async with stack.session() as client:
        await cancel_after_paying(stack, client, base, "olav@example.com")
        async with client.get(f"{base}/api/echo", headers=JSON) as resp:
            assert resp.status == 402
        async with client.get(f"{base}/", headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 303


async def test_caddy_passes_streams(caddy: tuple[Stack, str]) -> None:
    stack, base = caddy
    async with stack.session() as client:
        await paying_user(stack, client, "sue@example.com")
        await assert_events_stream(client, base)
