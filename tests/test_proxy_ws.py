"""WebSocket proxying through a real gate to a real upstream."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import PROXY
from tests.conftest import GateFactory, Upstream, closed_port, gate_settings


class WsUpstream:
    """Echoes frames; a few commands make it ping, close with a code, or drop the socket."""

    def __init__(self) -> None:
        self.handshake_headers: dict[str, list[str]] = {}
        self.closed_with: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self.done = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/ws", self.ws)
        self.app.router.add_get("/refuse", self.refuse)
        self.app.router.add_get("/hang", self.hang)

    async def refuse(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="no")

    async def hang(self, request: web.Request) -> web.Response:
        await self.done.wait()  # never answers the handshake (until teardown)
        return web.Response(status=500)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self.handshake_headers = {k: request.headers.getall(k) for k in request.headers}
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    await self.command(ws, msg.data, request)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
                else:
                    break
            if not self.closed_with.done():
                got = (
                    (msg.data, msg.extra or "")
                    if msg.type is WSMsgType.CLOSE
                    else (ws.close_code, "")
                )
                self.closed_with.set_result(got)
        finally:
            self.done.set()
        return ws

    async def command(self, ws: web.WebSocketResponse, text: str, request: web.Request) -> None:
        if text == "ping-me":
            await ws.ping(b"up")
            await ws.send_str("after-ping")
        elif text == "close-me":
            await ws.close(code=4002, message=b"nope")
        elif text == "drop":
            assert request.transport is not None
            request.transport.abort()
        else:
            await ws.send_str(f"echo:{text}")


@pytest.fixture
async def ws_up(upstream: Upstream) -> AsyncIterator[tuple[WsUpstream, TestServer]]:
    up = WsUpstream()
    server = await upstream(up.app)
    yield up, server


WsGate = tuple[WsUpstream, TestClient[web.Request, web.Application]]


@pytest.fixture
async def ws_gate(ws_up: tuple[WsUpstream, TestServer], gate: GateFactory) -> WsGate:
    """The gate, with the default settings, in front of ``ws_up``; its client."""
    up, server = ws_up
    return up, await gate(gate_settings(server))


def pump_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "_pump"]


async def until(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Wait (polling the loop, no fixed sleep) until ``condition()`` holds."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


PING = object()  # in an exchange: the client pings (the gate answers), nothing comes back
Exchange = list[tuple[object, object]]


@pytest.mark.parametrize(
    ("protocols", "picked", "exchange"),
    [
        (
            ("chat.v1", "chat.v2"),
            "chat.v2",  # the upstream's pick
            [
                ("hello", "echo:hello"),
                (b"\x00\x01\x02", b"\x02\x01\x00"),
                ("h\u00e9llo \u2603", "echo:h\u00e9llo \u2603"),
            ],
        ),
        (("other",), None, [("x", "echo:x")]),  # the upstream picks none
        # An upstream ping does not break the socket; a client ping is answered by the gate.
        ((), None, [("ping-me", "after-ping"), (PING, None), ("still", "echo:still")]),
    ],
    ids=["frames-and-subprotocol", "no-subprotocol", "pings"],
)
async def test_frames_both_ways(
    ws_gate: WsGate,
    protocols: tuple[str, ...],
    picked: str | None,
    exchange: Exchange,
) -> None:
    _, client = ws_gate
    async with client.ws_connect("/ws", protocols=protocols) as ws:
        assert ws.protocol == picked
        for sent, expected in exchange:
            if sent is PING:
                await ws.ping(b"client")
            elif isinstance(sent, bytes):
                await ws.send_bytes(sent)
                assert await ws.receive_bytes(timeout=5) == expected
            else:
                assert isinstance(sent, str)
                await ws.send_str(sent)
                assert await ws.receive_str(timeout=5) == expected


@pytest.mark.parametrize(
    ("vanish", "upstream_sees"),
    [(False, (4001, "bye")), (True, (aiohttp.WSCloseCode.GOING_AWAY, ""))],
    ids=["close-code-and-reason", "client-vanishes"],
)
async def test_client_side_end_reaches_upstream(
    ws_gate: WsGate,
    vanish: bool,
    upstream_sees: tuple[int, str],
) -> None:
    up, client = ws_gate
    ws = await client.ws_connect("/ws")
    await ws.send_str("a")
    assert await ws.receive_str(timeout=5) == "echo:a"
    if vanish:
        ws._response.connection.transport.abort()  # type: ignore[union-attr]  # no close frame
    else:
        await ws.close(code=4001, message=b"bye")
    assert await asyncio.wait_for(up.closed_with, 5) == upstream_sees
    await asyncio.wait_for(up.done.wait(), 5)
    await ws.close()


@pytest.mark.parametrize(
    ("command", "code", "reason"),
    [
        ("close-me", 4002, "nope"),  # relayed as the upstream sent it
        ("drop", aiohttp.WSCloseCode.INTERNAL_ERROR, None),  # vanished: 1011
    ],
    ids=["close-code-and-reason", "upstream-vanishes"],
)
async def test_upstream_side_end_reaches_client(
    ws_gate: WsGate,
    command: str,
    code: int,
    reason: str | None,
) -> None:
    _, client = ws_gate
    async with client.ws_connect("/ws") as ws:
        await ws.send_str(command)
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == code
        if reason is not None:
            assert msg.extra == reason
            assert ws.close_code == code


async def test_pump_tasks_do_not_leak(ws_gate: WsGate) -> None:
    _, client = ws_gate
    baseline = set(asyncio.all_tasks())
    for close_from_upstream in (False, True):
        async with client.ws_connect("/ws") as ws:
            await ws.send_str("a")
            assert await ws.receive_str(timeout=5) == "echo:a"
            assert len(pump_tasks()) == 2
            if close_from_upstream:
                await ws.send_str("close-me")
                assert (await ws.receive(timeout=5)).type is WSMsgType.CLOSE
        await until(lambda: not pump_tasks())
    # Gate handler, pumps, upstream handler: every task the sockets started has ended.
    await until(lambda: not asyncio.all_tasks() - baseline - {asyncio.current_task()})


async def test_cookies_and_auth_forwarded_on_handshake(ws_gate: WsGate) -> None:
    up, client = ws_gate
    headers = {
        "Cookie": "app=1; gate_session=secret",
        "Authorization": "Bearer t",
        "X-Gate-User": "spoofed",
        "Origin": "http://front.example",
    }
    async with client.ws_connect("/ws", headers=headers) as ws:
        await ws.send_str("a")
        await ws.receive_str(timeout=5)
    seen = {k.lower(): v for k, v in up.handshake_headers.items()}
    assert seen["cookie"] == ["app=1"]
    assert seen["authorization"] == ["Bearer t"]
    assert seen["origin"] == ["http://front.example"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert "x-gate-user" not in seen
    assert "sec-websocket-extensions" not in seen  # no compression on the local hop


@pytest.mark.parametrize(
    ("path", "down", "status"),
    [("/refuse", False, 502), ("/hang", False, 504), ("/ws", True, 502)],
    ids=["upstream-refuses-upgrade", "upstream-never-answers", "upstream-down"],
)
async def test_failed_upstream_handshake_is_answered_before_upgrading(
    ws_up: tuple[WsUpstream, TestServer],
    gate: GateFactory,
    path: str,
    down: bool,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, server = ws_up
    target = f"http://127.0.0.1:{closed_port()}" if down else server
    client = await gate(gate_settings(target, read_timeout=0.3))
    with caplog.at_level(logging.WARNING), pytest.raises(aiohttp.WSServerHandshakeError) as err:
        # The test client is loopback, a trusted peer by default: its request id is kept.
        await client.ws_connect(path, headers={"X-Request-Id": "ws-rid-7"})
    assert err.value.status == status
    up.done.set()  # lets a hanging upstream handler end
    failures = [
        getattr(r, "gate_fields", {})
        for r in caplog.records
        if r.getMessage() in ("upstream_error", "websocket_refused")
    ]
    assert [f.get("rid") for f in failures] == ["ws-rid-7"], failures


async def test_bad_handshake_is_400(ws_gate: WsGate) -> None:
    _, client = ws_gate
    async with client.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade"}) as r:
        assert r.status == 400  # no Sec-WebSocket-Key


async def test_shutdown_closes_sockets_with_1001(ws_gate: WsGate) -> None:
    up, client = ws_gate
    async with client.ws_connect("/ws") as ws:
        await ws.send_str("a")
        await ws.receive_str(timeout=5)
        await client.app[PROXY].close_websockets()
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
        assert msg.extra == "server shutting down"
    code, reason = await asyncio.wait_for(up.closed_with, 5)
    assert (code, reason) == (aiohttp.WSCloseCode.GOING_AWAY, "server shutting down")


async def test_idle_socket_outlives_read_timeout(
    ws_up: tuple[WsUpstream, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(ws_up[1], read_timeout=0.2))
    async with client.ws_connect("/ws") as ws:
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.6)  # idle for 3x the HTTP read timeout
        await ws.send_str("still here")
        assert await ws.receive_str(timeout=5) == "echo:still here"


@pytest.mark.parametrize("protocols", [("chat.v1", "chat.v2"), ()], ids=["offered", "none"])
async def test_no_false_protocol_overlap_warning(
    ws_gate: WsGate,
    caplog: pytest.LogCaptureFixture,
    protocols: tuple[str, ...],
) -> None:
    """The gate's handshake probe made aiohttp log "Client protocols [...] don't
    overlap server-known ones ()" for every socket whose client offers a subprotocol."""
    _, client = ws_gate
    with caplog.at_level(logging.DEBUG):
        async with client.ws_connect("/ws", protocols=protocols) as ws:
            assert ws.protocol == ("chat.v2" if protocols else None)
            await ws.send_str("x")
            assert await ws.receive_str(timeout=5) == "echo:x"
    noisy = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "overlap" in r.getMessage()
    ]
    assert noisy == []
