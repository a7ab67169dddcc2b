"""The shipped nginx config keeps its auth-cache files open (``open_file_cache``): a replaced
or expired cache entry is never answered from a held handle of the old file.

A real nginx runs ``deploy/nginx/gateway-forward-auth.conf`` in front of two small servers of
this test: a gate whose answer the test changes (an allow for one plan, ``max-age=1``; then
an allow for another plan; then a refusal) and an app that echoes the ``X-Gate-Plan`` it gets.
When the gate's answer changes, nginx replaces its cache file once the old one expires
(a new file renamed over the old: a new inode). The bound is the old answer's own expiry,
as without the open file cache: each answer is checked within it (generous deadlines), and
after the change is seen, every further request gets the new answer, never the old file's.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.shipped import running_shipped_nginx

MAX_AGE = 1
#: Only stops a broken test from hanging on a loaded machine; not the bound.
DEADLINE = MAX_AGE + 30
COOKIE = {"Cookie": "gate_session=session-of-one-user", "Accept": "application/json"}


@dataclass
class StubGate:
    """The gate's answer to ``/_gate/auth``: an allow naming ``plan``, or (``plan`` None) a
    refusal; ``asks`` counts the questions."""

    plan: str | None = "basic"
    asks: int = 0
    seen: list[str] = field(default_factory=list)

    async def auth(self, request: web.Request) -> web.Response:
        self.asks += 1
        if self.plan is None:
            return web.Response(
                status=401, headers={"X-Gate-Denial": "unauthorized", "Cache-Control": "no-store"}
            )
        return web.Response(
            headers={
                "Cache-Control": f"max-age={MAX_AGE}",
                "X-Gate-User": "cus_one",
                "X-Gate-Status": "active",
                "X-Gate-Plan": self.plan,
            }
        )


async def app_echo(request: web.Request) -> web.Response:
    return web.json_response({"plan": request.headers.get("X-Gate-Plan", "")})


async def serving(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def nginx() -> AsyncIterator[tuple[StubGate, str]]:
    stub = StubGate()
    gate = web.Application()
    gate.router.add_get("/_gate/auth", stub.auth)
    app = web.Application()
    app.router.add_get("/api/plan", app_echo)
    gate_runner, gate_port = await serving(gate)
    app_runner, app_port = await serving(app)
    try:
        async with running_shipped_nginx(gate_port, app_port) as base:
            yield stub, base
    finally:
        await gate_runner.cleanup()
        await app_runner.cleanup()


async def answer(client: aiohttp.ClientSession, base: str) -> tuple[int, str]:
    """(status, the plan the app was told) of one request with the session cookie."""
    async with client.get(base + "/api/plan", headers=COOKIE) as resp:
        body = await resp.json()
        return resp.status, body.get("plan", "") if resp.status == 200 else ""


async def seconds_until(client: aiohttp.ClientSession, base: str, want: tuple[int, str]) -> float:
    started = time.monotonic()
    while (got := await answer(client, base)) != want:
        assert time.monotonic() - started < DEADLINE, f"still {got} long after the bound"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_replaced_cache_entry_is_never_answered_from_the_old_file(
    nginx: tuple[StubGate, str],
) -> None:
    stub, base = nginx
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        assert await answer(client, base) == (200, "basic")
        asks = stub.asks
        for _ in range(5):
            assert await answer(client, base) == (200, "basic")
        assert stub.asks <= asks + 1, "the allow was not cached"

        stub.plan = "pro"  # the gate's answer changes: nginx replaces the file on expiry
        took = await seconds_until(client, base, (200, "pro"))
        print(f"new allow seen after {took:.2f} s")
        for _ in range(40):  # the held handle of the replaced file never answers again
            assert await answer(client, base) == (200, "pro")
            await asyncio.sleep(0.02)

        stub.plan = None  # revoked: denials are never cached, the old file has expired
        took = await seconds_until(client, base, (401, ""))
        print(f"refusal seen after {took:.2f} s")
        for _ in range(40):
            assert await answer(client, base) == (401, "")
            await asyncio.sleep(0.02)
