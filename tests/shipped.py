"""The proxy configs this project ships, run for real in tests, and the stack helpers their
tests share: ``deploy/nginx/gateway-forward-auth.conf``, ``deploy/nginx/replicas.conf``,
``deploy/caddy/Caddyfile`` and ``deploy/traefik/dynamic.yml`` with only their addresses (and
nginx's cache directory) replaced (:mod:`tests.shipped_configs`)."""

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType
from yarl import URL

from gateway.settings import SESSION_COOKIE
from tests.proxies import running_caddy, running_nginx, running_traefik
from tests.shipped_configs import (
    CADDY_EXAMPLE,
    NGINX_CACHE_DIR,
    NGINX_EXAMPLE,
    REPLICAS_EXAMPLE,
    TRAEFIK_EXAMPLE,
    caddy_forward_auth,
    nginx_forward_auth,
    nginx_replicas,
    traefik_forward_auth,
)
from tests.stack import Stack, confirm_email, echoed_headers, running_stack

__all__ = [
    "CACHE_DIR",
    "FORWARD_AUTH_PROXIES",
    "GATE_COOKIE_CASES",
    "ProxyRunner",
    "assert_a_payer_streams",
    "assert_anonymous_websocket_refused",
    "assert_events_stream",
    "assert_websocket_echoes",
    "cookie_of",
    "echo_as_paying_user",
    "paying_user",
    "running_shipped_caddy",
    "running_shipped_nginx",
    "running_shipped_nginx_passing_identity",
    "running_shipped_replicas",
    "running_shipped_traefik",
    "shipped_caddy_site",
    "shipped_nginx_site",
    "sign_in",
    "stack_behind",
]

#: ``Cookie`` headers a client sends (``{s}``: its valid session) and what the app must get of
#: them through a shipped config that strips the gate's cookie (None: no cookie at all): every
#: pair the gate itself reads as its cookie goes (:func:`gateway.sessions.session_cookie`
#: trims the name and takes a quoted value), and nothing else.
GATE_COOKIE_CASES: list[tuple[str, str | None]] = [
    ("gate_session={s}", None),
    ("gate_session={s}; theme=dark", "theme=dark"),
    ("theme=dark; gate_session={s}", "theme=dark"),
    ("a=1; gate_session={s}; b=2", "a=1; b=2"),
    ("xgate_session=1; gate_session={s}", "xgate_session=1"),
    # a second gate_session (a parent domain's, or the client's own), spaces, quotes
    ("a=1; gate_session={s}; gate_session={s}", "a=1"),
    ("gate_session={s}; gate_session=other; b=2", "b=2"),
    ("gate_session ={s}", None),
    ("gate_session = {s}; a=1", "a=1"),
    (" gate_session={s};b=2", "b=2"),
    ("a=1;gate_session\t={s}", "a=1"),
    ('a=1; gate_session="{s}"', "a=1"),
]

#: How long a streamed event may take to come through a proxy before the test calls it held.
STREAM_DEADLINE = 10.0


async def sign_in(
    stack: Stack, client: aiohttp.ClientSession, customer_id: str, email: str
) -> None:
    """A real gate session for ``customer_id``, its cookie sent to every 127.0.0.1 port."""
    value = await stack.services.sessions.create(customer_id, email)
    client.cookie_jar.update_cookies({SESSION_COOKIE: value}, response_url=URL(stack.base))


def cookie_of(stack: Stack, client: aiohttp.ClientSession) -> str:
    """The value of the gate's session cookie in ``client``'s jar."""
    return client.cookie_jar.filter_cookies(URL(stack.base))[SESSION_COOKIE].value


async def paying_user(stack: Stack, client: aiohttp.ClientSession, email: str) -> str:
    """Subscribe through the real journey, then confirm the email with the sign-in link (so
    the app is told it: X-Gate-Email carries verified emails only); the customer id."""
    resp = await stack.subscribe(client, email)
    assert resp.status == 303, resp.status
    await confirm_email(stack, client, email)
    customer_id: str = (await stack.services.store.customer_ids_for_email(email))[0]
    return customer_id


async def echo_as_paying_user(
    stack: Stack, base: str, email: str, headers: Mapping[str, str]
) -> tuple[str, dict[str, list[str]]]:
    """A new paying user's ``GET /api/echo?q=1`` through the proxy at ``base`` with
    ``headers`` (asserted to reach the app); their customer id and the headers the app saw."""
    async with stack.session() as client:
        customer_id = await paying_user(stack, client, email)
        async with client.get(f"{base}/api/echo?q=1", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body["path"] == "/api/echo?q=1"
    return customer_id, echoed_headers(body)


#: The shipped auth cache directory; the tests put it under nginx's temp prefix (a relative
#: ``proxy_cache_path`` is relative to ``nginx -p``).
CACHE_DIR = NGINX_CACHE_DIR


def shipped_nginx_site(port: int, gate_port: int, app_port: int) -> str:
    """The example config with its three addresses and its cache directory replaced, nothing
    else."""
    return nginx_forward_auth(
        NGINX_EXAMPLE.read_text(),
        port=port,
        gate=f"127.0.0.1:{gate_port}",
        app=f"127.0.0.1:{app_port}",
        cache_dir="gateway-auth-cache",
    )


def running_shipped_nginx(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """nginx in the foreground with the example config (tests/proxies.py); its base URL."""
    return running_nginx(lambda port: shipped_nginx_site(port, gate_port, app_port))


#: The example's lines that drop a client's identity header, and what its comment says they
#: become behind an auth proxy that sets the header (and drops the client's own).
NGINX_DROPS_IDENTITY = 'proxy_set_header X-Forwarded-Email "";'
NGINX_PASSES_IDENTITY = "proxy_set_header X-Forwarded-Email $http_x_forwarded_email;"


def running_shipped_nginx_passing_identity(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """:func:`running_shipped_nginx` as its comment says to change it behind an auth proxy
    that sets ``X-Forwarded-Email`` (``IDENTITY_HEADER``): the header passed on, not dropped."""

    def site(port: int) -> str:
        text = shipped_nginx_site(port, gate_port, app_port)
        assert text.count(NGINX_DROPS_IDENTITY) == 3, "the example drops it in three places"
        return text.replace(NGINX_DROPS_IDENTITY, NGINX_PASSES_IDENTITY)

    return running_nginx(site)


def shipped_caddy_site(port: int, gate_port: int, app_port: int) -> str:
    """``deploy/caddy/Caddyfile`` with its site address and the two ports replaced."""
    return caddy_forward_auth(
        CADDY_EXAMPLE.read_text(),
        port=port,
        gate=f"127.0.0.1:{gate_port}",
        app=f"127.0.0.1:{app_port}",
    )


def running_shipped_caddy(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """Caddy in the foreground with the shipped Caddyfile (tests/proxies.py); its base URL."""
    return running_caddy(lambda port: shipped_caddy_site(port, gate_port, app_port))


def running_shipped_traefik(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """Traefik with the shipped ``dynamic.yml`` (its gate and app addresses and its host
    replaced); its base URL once it routes the gate's pages."""
    dynamic = traefik_forward_auth(
        TRAEFIK_EXAMPLE.read_text(), gate=f"127.0.0.1:{gate_port}", app=f"127.0.0.1:{app_port}"
    )
    return running_traefik(dynamic, "/_gate/healthz")


def running_shipped_replicas(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """nginx with the shipped ``replicas.conf``, its three replicas all the one gate at
    ``gate_port`` (the gate proxies to the app itself: ``app_port`` is not nginx's business)."""
    gates = [f"127.0.0.1:{gate_port}"] * 3
    return running_nginx(
        lambda port: nginx_replicas(REPLICAS_EXAMPLE.read_text(), port=port, gates=gates)
    )


#: Starts a proxy in front of (gate port, app port); its base URL.
ProxyRunner = Callable[[int, int], contextlib.AbstractAsyncContextManager[str]]

#: The shipped forward-auth configs, by proxy.
FORWARD_AUTH_PROXIES: dict[str, ProxyRunner] = {
    "nginx": running_shipped_nginx,
    "caddy": running_shipped_caddy,
    "traefik": running_shipped_traefik,
}


@contextlib.asynccontextmanager
async def stack_behind(
    tmp_path: Path, proxy: ProxyRunner, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[Stack, str]]:
    """The stack (gate with billing on, demo upstream, Stripe double; ``env`` on top) with
    ``proxy`` in front of it: the stack and the proxy's base URL."""
    async with running_stack(tmp_path, env) as stack:
        gate_port, app_port = stack.gate_server.port, stack.upstream.port
        assert gate_port is not None and app_port is not None
        async with proxy(gate_port, app_port) as base:
            yield stack, base


async def assert_websocket_echoes(client: aiohttp.ClientSession, base: str) -> None:
    """The demo upstream's ``/ws`` echo answers ``client`` through the proxy at ``base``."""
    async with client.ws_connect(f"{base}/ws") as ws:
        await ws.send_str("hello")
        msg = await ws.receive(timeout=10)
        assert msg.type is WSMsgType.TEXT and "hello" in msg.data


async def assert_anonymous_websocket_refused(stack: Stack, base: str) -> None:
    """A client without a session gets a 401 for the ``/ws`` handshake through ``base``."""
    async with stack.session() as anonymous:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await anonymous.ws_connect(f"{base}/ws")
        assert refused.value.status == 401


async def assert_events_stream(
    client: aiohttp.ClientSession, base: str, deadline: float = STREAM_DEADLINE
) -> None:
    """The demo upstream's server-sent events (3 events and ``done``) reach ``client`` whole
    through the proxy at ``base``; and they pass one by one as the app writes them, even from
    an app that does not send ``X-Accel-Buffering: no``: each event of ``/api/stepped`` is read
    before the client lets the app write the next, so a proxy that buffered the answer would
    deliver nothing (the read times out)."""
    async with client.get(f"{base}/api/stream?n=3&delay=0.05") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = await resp.text()
    assert body.count("data: ") == 4 and "event: done" in body
    key = secrets.token_hex(8)
    async with asyncio.timeout(deadline):  # a proxy holding the answer holds its head too
        resp = await client.get(f"{base}/api/stepped?key={key}&n=3")
    try:
        assert resp.status == 200
        assert "X-Accel-Buffering" not in resp.headers
        for i in range(1, 4):
            async with asyncio.timeout(deadline):
                event = await resp.content.readuntil(b"\n\n")
            assert event == f"data: {i}\n\n".encode()
            if i < 3:
                async with client.get(f"{base}/api/step", params={"key": key}) as step:
                    assert step.status == 204
        assert await resp.text() == "event: done\ndata: end\n\n"
    finally:
        resp.release()


async def assert_a_payer_streams(stack: Stack, base: str, email: str, *, times: int = 1) -> None:
    """A paying user's WebSocket echoes and events stream pass the proxy at ``base`` (``times``
    each, in turns); an anonymous WebSocket handshake there is refused."""
    async with stack.session() as client:
        await paying_user(stack, client, email)
        for _ in range(times):
            await assert_websocket_echoes(client, base)
            await assert_events_stream(client, base)
    await assert_anonymous_websocket_refused(stack, base)
