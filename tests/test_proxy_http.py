"""HTTP proxying through a real gate to a real upstream, both on 127.0.0.1."""

import asyncio
import gzip
import hashlib
import inspect
import json
import os
import time
from collections.abc import AsyncIterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientRequest, web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from gateway.forwarded import ClientInfo
from gateway.gate import GateVerdict
from gateway.model import Denial, Pass
from gateway.proxy_headers import (
    HOP_BY_HOP,
    HeaderPolicy,
    build_request_headers,
    strip_cookie,
)
from gateway.proxy_http import _UpstreamRequest
from gateway.settings import load_settings
from tests.conftest import GateFactory, StartGate, Upstream, closed_port, gate_settings, served

UNTRUSTED = (ip_network("10.0.0.0/8"),)  # the loopback test client is not a trusted proxy


class Echo:
    """An upstream that reports exactly what reached it, plus a few special routes."""

    def __init__(self) -> None:
        self.release = asyncio.Event()  # set by a test to let a waiting handler go on
        self.started = asyncio.Event()  # set when a waiting handler has the request
        self.gone = asyncio.Event()  # set when a streaming handler ended abnormally
        self.app = web.Application()
        r = self.app.router
        specials = [self.head, self.gzip, self.cookies, self.hop, self.chunked, self.sse]
        specials += [self.wait, self.stall, self.forever, self.redirect]
        for handler in specials:  # GET /<name>
            r.add_get(f"/{handler.__name__}", handler)
        r.add_get("/status/{code}", self.status)
        r.add_post("/wait", self.wait)
        r.add_get("/truncated/{mode}", self.truncated)
        r.add_route("*", "/{tail:.*}", self.echo)

    async def echo(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": headers,
                "size": size,
                "sha256": digest.hexdigest(),
                "pid": os.getpid(),
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"v1"'})
        return web.Response(status=code, reason="Fine Thanks", text="body")

    async def head(self, request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def gzip(self, request: web.Request) -> web.Response:
        return web.Response(
            body=GZIPPED, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "b=2; Path=/x; Secure")
        return resp

    async def hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers=CIMultiDict(
                [
                    ("Connection", "keep-alive, X-Up-Hop"),
                    ("X-Up-Hop", "1"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Trailer", "X-T"),
                    ("Upgrade", "h2c"),
                    ("X-End-To-End", "kept"),
                ]
            ),
        )

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for part in (b"one,", b"two,", b"three"):
            await resp.write(part)
        return resp

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await self.release.wait()
        await resp.write(b"data: two\n\n")
        return resp

    async def wait(self, request: web.Request) -> web.Response:
        self.started.set()
        try:
            await self.release.wait()
        finally:
            if not self.release.is_set():
                self.gone.set()
        return web.Response(text="late")

    async def stall(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first")
        await self.release.wait()
        return resp

    async def forever(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"x" * 65536)
        finally:
            self.gone.set()

    async def truncated(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if request.match_info["mode"] == "length":
            resp.content_length = 100_000
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def redirect(self, request: web.Request) -> web.Response:
        target = request.query["to"]
        return web.Response(status=302, headers={"Location": target})


GZIPPED = gzip.compress(b"hello gzip " * 1000)


@pytest.fixture
async def echo(upstream: Upstream) -> AsyncIterator[tuple[Echo, TestServer]]:
    async with served(upstream, Echo()) as both:
        yield both


async def raw_http(
    port: int | None, head: bytes, body: bytes = b""
) -> tuple[int, CIMultiDict[str], bytes]:
    """Send bytes exactly as given (``Connection: close`` added) and read the whole answer."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers.add(name, value)
    return int(lines[0].split()[1]), headers, payload


def seen(payload: bytes | dict[str, Any]) -> CIMultiDict[str]:
    data = json.loads(payload) if isinstance(payload, bytes) else payload
    return CIMultiDict((k, v) for k, v in data["headers"])


# ---- paths, methods, bodies


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/c",
        "/x?a=1&a=2&b=%20+%2B&&=&flag",
        "//double//slash/",
        "/a/./b/../c",
        "/%2e%2e/etc",
        "/caf%C3%A9/~user/a;b=c/@:!$&'()*+,",
        "/q?next=%2F%2Fevil&x=%zz",
        "/",
    ],
)
async def test_path_and_query_forwarded_byte_exact(
    echo: tuple[Echo, TestServer], gate: GateFactory, target: str
) -> None:
    client = await gate(gate_settings(echo[1]))
    status, _, body = await raw_http(client.port, f"GET {target} HTTP/1.1\r\nHost: h".encode())
    assert status == 200
    assert json.loads(body)["raw_path"] == target


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_methods(echo: tuple[Echo, TestServer], gate: GateFactory, method: str) -> None:
    client = await gate(gate_settings(echo[1]))
    data = b"payload" if method not in ("GET", "OPTIONS") else None
    async with client.request(method, "/m", data=data) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert got["method"] == method
    assert got["size"] == (7 if data else 0)


async def test_absolute_form_target_is_refused(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]))
    status, _, body = await raw_http(client.port, b"GET http://evil.example/x HTTP/1.1\r\nHost: h")
    assert status == 400
    assert json.loads(body)["error"] == "bad_request"


async def test_content_length_preserved(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    client = await gate(gate_settings(echo[1]))
    body = os.urandom(300_000)
    async with client.post("/up", data=body) as resp:
        got = await resp.json()
    headers = seen(got)
    assert headers["Content-Length"] == "300000"
    assert "Transfer-Encoding" not in headers
    assert got["sha256"] == hashlib.sha256(body).hexdigest()


async def test_chunked_upload_stays_chunked(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]))
    parts = [os.urandom(50_000) for _ in range(5)]

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with client.post("/up", data=gen()) as resp:
        got = await resp.json()
    headers = seen(got)
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in headers
    assert got["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_no_headers_invented(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    """No Accept-Encoding/User-Agent/Accept/Content-Type the client did not send."""
    client = await gate(gate_settings(echo[1]))
    _, _, body = await raw_http(
        client.port, b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3", b"abc"
    )
    headers = seen(body)
    for name in ("Accept-Encoding", "User-Agent", "Accept", "Content-Type"):
        assert name not in headers
    assert json.loads(body)["size"] == 3


def test_aiohttp_request_internals_we_rely_on() -> None:
    """``_UpstreamRequest`` overrides steps of ``ClientRequest.__init__`` and sets the private
    ``_skip_auto_headers`` (see its docstring). If aiohttp renames or stops calling them, the
    proxy would silently invent Accept-Encoding & co. upstream: fail here, by name, instead."""
    source = inspect.getsource(ClientRequest)
    for hook in ("self.update_headers(", "self.update_auto_headers("):
        assert hook in source, f"aiohttp's ClientRequest no longer calls {hook}...)"
    params = list(inspect.signature(ClientRequest.update_auto_headers).parameters)
    assert params == ["self", "skip_auto_headers"], params
    assert source.count("self._skip_auto_headers") >= 3, "aiohttp changed _skip_auto_headers"
    assert "_skip_auto_headers" in ClientRequest.__annotations__


async def test_upstream_request_class_invents_no_headers() -> None:
    """The request class on its own: Host first, the given headers in order, nothing else
    (aiohttp's own ClientRequest adds Accept, Accept-Encoding, User-Agent, Content-Type)."""
    url = URL("http://127.0.0.1:9/x")
    given: CIMultiDict[str] = CIMultiDict([("X-A", "1"), ("x-b", "2")])
    loop = asyncio.get_running_loop()
    ours = _UpstreamRequest("POST", url, headers=given, data=b"abc", loop=loop)
    assert list(ours.headers.items()) == [
        ("Host", "127.0.0.1:9"),
        ("X-A", "1"),
        ("x-b", "2"),
        ("Content-Length", "3"),
    ]
    plain = ClientRequest("POST", url, headers=given, data=b"abc", loop=loop)
    assert {"Accept-Encoding", "User-Agent", "Content-Type"} <= set(plain.headers)  # the why


# ---- statuses and response bodies


@pytest.mark.parametrize("code", [200, 201, 299, 404, 418, 500, 503])
async def test_status_and_reason(
    echo: tuple[Echo, TestServer], gate: GateFactory, code: int
) -> None:
    client = await gate(gate_settings(echo[1]))
    async with client.get(f"/status/{code}") as resp:
        assert resp.status == code
        assert resp.reason == "Fine Thanks"
        assert await resp.read() == b"body"


@pytest.mark.parametrize("code", [204, 304])
async def test_empty_statuses(echo: tuple[Echo, TestServer], gate: GateFactory, code: int) -> None:
    client = await gate(gate_settings(echo[1]))
    status, headers, body = await raw_http(
        client.port, f"GET /status/{code} HTTP/1.1\r\nHost: h".encode()
    )
    assert (status, body) == (code, b"")
    assert headers["ETag"] == '"v1"'
    assert "Transfer-Encoding" not in headers


async def test_head_keeps_length_without_body(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]))
    status, headers, body = await raw_http(client.port, b"HEAD /head HTTP/1.1\r\nHost: h")
    assert (status, headers["Content-Length"], body) == (200, "5", b"")


async def test_gzip_passed_through_untouched(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]), auto_decompress=False)
    async with client.get("/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(GZIPPED))
        assert await resp.read() == GZIPPED


async def test_chunked_response(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    """Framing is per hop: a chunked body that is complete on arrival may leave with a length."""
    client = await gate(gate_settings(echo[1]))
    async with client.get("/chunked") as resp:
        assert await resp.read() == b"one,two,three"


async def test_multiple_set_cookie(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    client = await gate(gate_settings(echo[1]))
    async with client.get("/cookies") as resp:
        assert resp.headers.getall("Set-Cookie") == [
            "a=1; Path=/; HttpOnly",
            "b=2; Path=/x; Secure",
        ]


# ---- headers


async def test_hop_by_hop_removed_from_request(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]))
    head = (
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\nX-Keep: yes"
    )
    _, _, body = await raw_http(client.port, head)
    headers = seen(body)
    assert headers["X-Keep"] == "yes"
    for name in ["X-Hop", *HOP_BY_HOP]:
        if name != "connection":  # aiohttp's client states its own keep-alive
            assert name not in headers, name


async def test_hop_by_hop_removed_from_response(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]))
    async with client.get("/hop") as resp:
        for name in ("X-Up-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert name not in resp.headers, name
        assert resp.headers["X-End-To-End"] == "kept"


async def test_forwarded_headers_from_trusted_peer_are_appended(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1]))  # default TRUSTED_PROXIES: loopback
    async with client.get(
        "/x",
        headers={
            "X-Forwarded-For": "198.51.100.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "public.example",
            "X-Request-Id": "req-42",
            "Host": "front.example",
        },
    ) as resp:
        headers = seen(await resp.json())
    assert headers["X-Forwarded-For"] == "198.51.100.7, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"] == "public.example"
    assert headers["X-Request-Id"] == "req-42"
    assert headers["Host"] == f"127.0.0.1:{echo[1].port}"  # the upstream's own host


async def test_forwarded_headers_from_untrusted_peer_are_replaced(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1], trusted_proxies=UNTRUSTED))
    async with client.get(
        "/x",
        headers={
            "X-Forwarded-For": "198.51.100.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "X-Request-Id": "req-42",
            "X-Real-IP": "6.6.6.6",
            "Forwarded": "for=6.6.6.6",
            "Host": "front.example",
        },
    ) as resp:
        headers = seen(await resp.json())
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "front.example"
    assert headers["X-Request-Id"] != "req-42"
    assert "X-Real-IP" not in headers
    assert "Forwarded" not in headers


async def test_preserve_host(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    client = await gate(gate_settings(echo[1], preserve_host=True))
    async with client.get("/x", headers={"Host": "front.example"}) as resp:
        assert seen(await resp.json())["Host"] == "front.example"


@pytest.mark.parametrize(("trusted", "kept"), [((), False), (None, True)])
async def test_gate_and_identity_headers(
    echo: tuple[Echo, TestServer], gate: GateFactory, trusted: tuple[Any, ...] | None, kept: bool
) -> None:
    overrides: dict[str, Any] = {"identity_header": "X-Forwarded-Email"}
    if trusted is not None:
        overrides["trusted_proxies"] = UNTRUSTED
    client = await gate(gate_settings(echo[1], **overrides))
    async with client.get(
        "/x",
        headers={
            "X-Gate-User": "evil",
            "x-gate-status": "active",
            "X-Forwarded-Email": "a@example.com",
        },
    ) as resp:
        headers = seen(await resp.json())
    assert "X-Gate-User" not in headers
    assert "X-Gate-Status" not in headers
    assert ("X-Forwarded-Email" in headers) is kept


async def test_gate_hook_adds_headers_or_answers(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    async def hook(request: web.Request, client: ClientInfo) -> GateVerdict:
        if request.path == "/denied":
            return Denial("payment_required", 402, "subscription_required")
        return Pass({"X-Gate-User": "cus_123", "X-Gate-Status": "active"})

    client = await gate(gate_settings(echo[1]), gate=hook)
    async with client.get("/ok", headers={"X-Gate-User": "spoofed"}) as resp:
        headers = seen(await resp.json())
    assert headers.getall("X-Gate-User") == ["cus_123"]
    assert headers["X-Gate-Status"] == "active"
    async with client.get("/denied") as resp:
        assert resp.status == 402
        assert (await resp.json())["error"] == "subscription_required"
        assert resp.headers["Cache-Control"] == "no-store"


async def test_extra_setup_routes_answer_before_the_catch_all(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"pong": True})

    def setup(app: web.Application) -> None:
        app.router.add_get("/_gate/ping", ping)

    client = await gate(gate_settings(echo[1]), extra_setup=setup)
    async with client.get("/_gate/ping") as resp:
        assert await resp.json() == {"pong": True}
    async with client.get("/other") as resp:
        assert (await resp.json())["raw_path"] == "/other"


async def test_expect_continue(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    client = await gate(gate_settings(echo[1]))
    body = os.urandom(100_000)
    async with client.post("/up", data=body, expect100=True) as resp:
        got = await resp.json()
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert "Expect" not in seen(got)  # answered by the gate, not repeated upstream


@pytest.mark.parametrize(
    ("cookie", "forwarded"),
    [
        ("a=1; gate_session=xyz; b=2", "a=1; b=2"),
        ("gate_session=xyz", None),
        ('gate_session=xyz; a="q; r"', 'a="q; r"'),
        ("a=1;b=2", "a=1;b=2"),
        ("my_gate_session=1; gate_session_x=2", "my_gate_session=1; gate_session_x=2"),
        (" x=1 ;  gate_session=abc;y=2", "x=1 ;y=2"),
    ],
)
async def test_gate_cookie_stripped(
    echo: tuple[Echo, TestServer], gate: GateFactory, cookie: str, forwarded: str | None
) -> None:
    client = await gate(gate_settings(echo[1]))
    _, _, body = await raw_http(
        client.port, f"GET /x HTTP/1.1\r\nHost: h\r\nCookie: {cookie}".encode()
    )
    headers = seen(body)
    assert headers.get("Cookie") == forwarded


def test_strip_cookie_leaves_others_byte_exact() -> None:
    assert strip_cookie("a=1;  b=2 ; gate_session=1", "gate_session") == "a=1;  b=2"


def test_build_request_headers_pure() -> None:
    from aiohttp.test_utils import make_mocked_request

    settings = gate_settings("http://127.0.0.1:1")
    req = make_mocked_request(
        "GET", "/", headers={"Host": "h", "Connection": "x-a", "X-A": "1", "X-B": "2"}
    )
    client = ClientInfo("1.2.3.4", "https", "h", False, "9.9.9.9", "rid")
    policy = HeaderPolicy.from_settings(settings)
    out = build_request_headers(req, client, policy, {"X-Gate-User": "u"})
    assert dict(out) == {
        "X-B": "2",
        "X-Forwarded-For": "9.9.9.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "h",
        "X-Request-Id": "rid",
        "X-Gate-User": "u",
    }


async def test_location_rewritten_to_the_gate(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    server = echo[1]
    client = await gate(gate_settings(server))
    base = f"http://127.0.0.1:{server.port}"
    cases = {
        f"{base}/next?x=1": f"http://127.0.0.1:{client.port}/next?x=1",
        base: f"http://127.0.0.1:{client.port}/",
        "/relative": "/relative",
        "https://elsewhere.example/": "https://elsewhere.example/",
        f"{base}0/other-port": f"{base}0/other-port",
    }
    for location, expected in cases.items():
        async with client.get("/redirect", params={"to": location}, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == expected


# ---- streaming, timeouts, errors


async def test_sse_events_arrive_as_written(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    e, server = echo
    client = await gate(gate_settings(server))
    async with client.get("/sse") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b"data: one\n\n"
        e.release.set()  # only now may the upstream write the second event
        second = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert second == b"data: two\n\n"


async def test_client_disconnect_mid_stream_cancels_upstream(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    e, server = echo
    client = await gate(gate_settings(server))
    resp = await client.get("/forever")
    assert len(await resp.content.readexactly(10)) == 10
    resp.close()  # drops the connection
    await asyncio.wait_for(e.gone.wait(), 5)


async def test_client_disconnect_before_headers_cancels_upstream(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    e, server = echo
    client = await gate(gate_settings(server))
    task = asyncio.create_task(client.get("/wait"))
    await asyncio.wait_for(e.started.wait(), 5)
    task.cancel()  # closes the client connection
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(e.gone.wait(), 5)


@pytest.mark.parametrize(("accept", "kind"), [("application/json", "json"), ("text/html", "html")])
async def test_upstream_unreachable_is_502(gate: GateFactory, accept: str, kind: str) -> None:
    client = await gate(gate_settings(f"http://127.0.0.1:{closed_port()}"))
    async with client.get("/x", headers={"Accept": accept}) as resp:
        assert resp.status == 502
        text = await resp.text()
    assert "Traceback" not in text
    if kind == "json":
        assert json.loads(text)["error"] == "bad_gateway"
    else:
        assert resp.content_type == "text/html"
        assert "502 Bad Gateway" in text


@pytest.mark.parametrize("upload", [None, b"x" * 10_000], ids=["get", "after-upload"])
async def test_upstream_read_timeout_is_504(
    echo: tuple[Echo, TestServer], gate: GateFactory, upload: bytes | None
) -> None:
    client = await gate(gate_settings(echo[1], read_timeout=0.3))
    method = "GET" if upload is None else "POST"
    async with client.request(method, "/wait", data=upload) as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body["error"] == "gateway_timeout"
    assert body["message"]


async def test_upstream_idle_mid_stream_cuts_the_response(
    echo: tuple[Echo, TestServer], gate: GateFactory
) -> None:
    client = await gate(gate_settings(echo[1], read_timeout=0.3))
    async with client.get("/stall") as resp:
        assert resp.status == 200
        assert await resp.content.readexactly(5) == b"first"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.mark.parametrize("mode", ["length", "chunked"])
async def test_upstream_failure_mid_body_is_not_a_complete_response(
    echo: tuple[Echo, TestServer], gate: GateFactory, mode: str
) -> None:
    client = await gate(gate_settings(echo[1]))
    async with client.get(f"/truncated/{mode}") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_healthz_is_local(gate: GateFactory) -> None:
    client = await gate(gate_settings(f"http://127.0.0.1:{closed_port()}"))
    async with client.get("/_gate/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "pid": os.getpid()}


async def test_keepalive_connection_reuse(echo: tuple[Echo, TestServer], gate: GateFactory) -> None:
    client = await gate(gate_settings(echo[1]))
    for i in range(20):
        async with client.get(f"/k{i}") as resp:
            assert (await resp.json())["raw_path"] == f"/k{i}"


# ---- big bodies through a gate subprocess: memory stays flat


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


class BigBodies:
    BLOCK = os.urandom(1 << 20)

    def __init__(self, size: int) -> None:
        self.size = size
        self.app = web.Application()
        self.app.router.add_post("/upload", self.upload)
        self.app.router.add_get("/download", self.download)

    def expected(self) -> str:
        digest = hashlib.sha256()
        for _ in range(self.size // len(self.BLOCK)):
            digest.update(self.BLOCK)
        return digest.hexdigest()

    async def chunks(self) -> AsyncIterator[bytes]:
        for _ in range(self.size // len(self.BLOCK)):
            yield self.BLOCK

    async def upload(self, request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def download(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = self.size
        await resp.prepare(request)
        async for chunk in self.chunks():
            await resp.write(chunk)
        return resp


@pytest.mark.slow
async def test_big_bodies_stream_with_flat_memory(
    upstream: Upstream, gate_process: StartGate
) -> None:
    size = 1 << 30  # 1 GiB each way
    big = BigBodies(size)
    server = await upstream(big.app)
    proc = await gate_process(
        {"UPSTREAM_URL": f"http://127.0.0.1:{server.port}", "LOG_LEVEL": "warning"}
    )
    expected = big.expected()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(proc.url("/_gate/healthz")) as resp:  # warm up
            assert resp.status == 200
        async with session.post(proc.url("/upload"), data=b"warm") as resp:
            assert resp.status == 200
        before = rss_kib(proc.pid, "VmRSS")
        started = time.monotonic()

        async with session.post(proc.url("/upload"), data=big.chunks()) as resp:
            got = await resp.json()
        assert got == {"size": size, "sha256": expected}

        digest, received = hashlib.sha256(), 0
        async with session.get(proc.url("/download")) as resp:
            assert resp.headers["Content-Length"] == str(size)
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
                received += len(chunk)
        assert (received, digest.hexdigest()) == (size, expected)

    elapsed = time.monotonic() - started
    peak = rss_kib(proc.pid, "VmHWM")
    after = rss_kib(proc.pid, "VmRSS")
    grew_mb = (max(peak, after) - before) / 1024
    print(f"2 GiB through the gate in {elapsed:.1f}s; RSS {before} KiB -> peak {peak} KiB")
    assert grew_mb < 32, f"gate RSS grew {grew_mb:.1f} MB"


def test_preserve_host_setting_from_env() -> None:
    env = {"UPSTREAM_URL": "http://127.0.0.1:1", "BILLING_MODE": "off", "PRESERVE_HOST": "true"}
    assert load_settings(env).preserve_host is True
    assert gate_settings("http://127.0.0.1:1").preserve_host is False
