"""The upstream connection pool follows the worker's limits (``gateway.proxy_http``,
``gateway.limits.UpstreamPool``): every WebSocket ``MAX_WEBSOCKETS`` admits gets an upstream
connection (the pool was a fixed 1,024, so the 1,025th socket waited and got a 504), and when the
pool is full anyway the next request or handshake is answered 503 + ``Retry-After`` at once.

Real servers: the gate is a subprocess with its own descriptor limit; the upstream (an echo
WebSocket and a route that holds requests) runs in this process on 127.0.0.1. Counts and waits
are bounded; "at once" is checked against a deadline far below the connect timeout, never as a
speed measurement.
"""

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.limits import RETRY_AFTER
from tests.conftest import GateProcess, Hold, eventually, spawn_gate

#: More than the old fixed pool of 1,024.
SOCKETS = 1100
#: The gate's descriptor limit: (3000 - 224) / 2 = 1,388 connections, enough for SOCKETS.
NOFILE = 3000
#: What the gate would wait for a pool slot before answering 504 (the old behaviour).
CONNECT_TIMEOUT = 8
#: "At once": well below CONNECT_TIMEOUT, generous for a loaded 2-core machine.
AT_ONCE = 3.0
OPEN_CONCURRENCY = 100


def _gate_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(autouse=True)
def enough_descriptors_here() -> None:
    """This process holds every client socket and every upstream-side socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * SOCKETS + 1000
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, f"RLIMIT_NOFILE hard {hard} < {need}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class Upstream:
    """``/ws`` echoes; ``/hold`` keeps each request open until :attr:`release` is set."""

    def __init__(self) -> None:
        self.hold = Hold()
        self.release = self.hold.release

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/hold", self.hold.handler)
        return app


@contextlib.asynccontextmanager
async def gate_in_front(
    tmp_path: Path, env: Mapping[str, str]
) -> AsyncIterator[tuple[GateProcess, Upstream]]:
    up = Upstream()
    server = TestServer(up.app(), host="127.0.0.1")
    await server.start_server()
    gate_env = {
        "BILLING_MODE": "off",
        "UPSTREAM_URL": str(server.make_url("")).rstrip("/"),
        "CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
        "LOG_LEVEL": "warning",
        **env,
    }
    gate = await spawn_gate(gate_env, tmp_path / "gate.log", preexec_fn=_gate_nofile)
    try:
        await gate.wait_ready()
        yield gate, up
    finally:
        up.release.set()
        await gate.kill_group()
        await server.close()


async def open_sockets(
    client: aiohttp.ClientSession, url: str, count: int
) -> list[aiohttp.ClientWebSocketResponse]:
    """``count`` WebSockets, each checked with one echo; fails on the first refusal."""
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(i: int) -> aiohttp.ClientWebSocketResponse:
        async with sem:
            ws = await client.ws_connect(url)
            await ws.send_str(f"m{i}")
            msg = await ws.receive(timeout=30)
            assert msg.data == f"m{i}", msg
            return ws

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def handshake_status(client: aiohttp.ClientSession, url: str) -> tuple[int, str, float]:
    """(status, Retry-After, seconds) of one more handshake, which must be refused."""
    start = time.monotonic()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_receive=30))
    took = time.monotonic() - start
    headers: Mapping[str, str] = refused.value.headers or {}
    return refused.value.status, headers.get("Retry-After", ""), took


async def test_every_websocket_max_websockets_admits_gets_an_upstream_and_the_next_a_fast_503(
    tmp_path: Path,
) -> None:
    env = {"MAX_WEBSOCKETS": str(SOCKETS), "MAX_WEBSOCKETS_PER_USER": str(SOCKETS)}
    async with (
        gate_in_front(tmp_path, env) as (gate, _up),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        ) as client,
    ):
        sockets = await open_sockets(client, gate.url("/ws"), SOCKETS)
        try:
            assert len(sockets) == SOCKETS
            status, retry_after, took = await handshake_status(client, gate.url("/ws"))
            assert (status, retry_after) == (503, str(RETRY_AFTER))
            assert took < AT_ONCE, f"the refusal took {took:.1f} s"
            # All of them still work, the first and the last.
            for ws in (sockets[0], sockets[-1]):
                await ws.send_str("still")
                assert (await ws.receive(timeout=30)).data == "still"
            # A slot freed is a slot for the next one (freed when the gate's handler ends,
            # which may be a moment after the client has its close frame: until then, 503).
            await sockets.pop().close()

            async def admitted() -> bool:
                try:
                    sockets.append(await client.ws_connect(gate.url("/ws")))
                except aiohttp.WSServerHandshakeError as refused:
                    assert refused.status == 503, refused
                    return False
                return True

            await eventually(admitted, "the freed slot admits the next WebSocket")
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))


async def test_a_full_upstream_pool_answers_503_at_once_not_504(tmp_path: Path) -> None:
    pool = 4
    env = {"UPSTREAM_MAX_CONNECTIONS": str(pool), "MAX_CONNECTIONS": "50"}
    async with (
        gate_in_front(tmp_path, env) as (gate, up),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
        ) as client,
    ):
        held = [asyncio.create_task(client.get(gate.url("/hold"))) for _ in range(pool)]
        try:
            deadline = time.monotonic() + 30
            while up.hold.in_flight < pool:
                assert time.monotonic() < deadline, (
                    f"only {up.hold.in_flight} requests reached /hold"
                )
                await asyncio.sleep(0.02)
            for accept in ("application/json", "text/html"):
                start = time.monotonic()
                async with client.get(gate.url("/hold"), headers={"Accept": accept}) as resp:
                    body = await resp.text()
                    took = time.monotonic() - start
                    assert resp.status == 503, body
                    assert resp.headers["Retry-After"] == str(RETRY_AFTER)
                    assert took < AT_ONCE, f"the refusal took {took:.1f} s"
                    if accept == "application/json":
                        assert (await resp.json())["error"] == "upstream_busy"
                    else:
                        assert "busy" in body and "Traceback" not in body
            status, retry_after, _took = await handshake_status(client, gate.url("/ws"))
            assert (status, retry_after) == (503, str(RETRY_AFTER))
            # Once the held requests end, the pool serves again.
            up.release.set()
            for task in held:
                resp = await task
                assert resp.status == 200
                resp.release()
            async with client.get(gate.url("/hold")) as resp:
                assert resp.status == 200
        finally:
            up.release.set()
            for task in held:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
