"""The proxy configs this project ships, run for real in tests, and the stack helpers their
tests share: ``deploy/nginx/gateway-forward-auth.conf`` and ``deploy/caddy/Caddyfile`` with
only their addresses (and nginx's cache directory) replaced."""

import contextlib
from collections.abc import Mapping

import aiohttp
from yarl import URL

from gateway.demo.shipped_configs import NGINX_CACHE_DIR, caddy_forward_auth, nginx_forward_auth
from gateway.settings import SESSION_COOKIE
from tests.conftest import ROOT
from tests.proxies import running_caddy, running_nginx
from tests.stack import Stack, echoed_headers

__all__ = [
    "CACHE_DIR",
    "CADDYFILE",
    "NGINX_EXAMPLE",
    "echo_as_paying_user",
    "paying_user",
    "running_shipped_caddy",
    "running_shipped_nginx",
    "shipped_caddy_site",
    "shipped_nginx_site",
    "sign_in",
]

NGINX_EXAMPLE = ROOT / "deploy" / "nginx" / "gateway-forward-auth.conf"
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"


async def sign_in(
    stack: Stack, client: aiohttp.ClientSession, customer_id: str, email: str
) -> None:
    """A real gate session for ``customer_id``, its cookie sent to every 127.0.0.1 port."""
    value = await stack.services.sessions.create(customer_id, email)
    client.cookie_jar.update_cookies({SESSION_COOKIE: value}, response_url=URL(stack.base))


async def paying_user(stack: Stack, client: aiohttp.ClientSession, email: str) -> str:
    """Subscribe through the real journey; the customer id."""
    resp = await stack.subscribe(client, email)
    assert resp.status == 303, resp.status
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


def shipped_caddy_site(port: int, gate_port: int, app_port: int) -> str:
    """``deploy/caddy/Caddyfile`` with its site address and the two ports replaced."""
    return caddy_forward_auth(
        CADDYFILE.read_text(), port=port, gate=f"127.0.0.1:{gate_port}", app=f"127.0.0.1:{app_port}"
    )


def running_shipped_caddy(
    gate_port: int, app_port: int
) -> contextlib.AbstractAsyncContextManager[str]:
    """Caddy in the foreground with the shipped Caddyfile (tests/proxies.py); its base URL."""
    return running_caddy(lambda port: shipped_caddy_site(port, gate_port, app_port))
