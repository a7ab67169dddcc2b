"""The demo upstream app: one short test per route."""

import asyncio
import gzip
import hashlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from gateway.demo.upstream import create_upstream_app
from tests.conftest import ROOT
from tests.probes import deterministic_bytes, probe_upstream_app
from tests.processes import reported_port, spawn, stop
from tests.shipped import assert_events_stream

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(probe_upstream_app())


async def test_index_has_the_stable_element_ids(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "PatentLLM (demo)" in html
    for element_id in (
        "q",
        "search-btn",
        "results",
        "analyze-btn",
        "stream",
        "stream-status",
        "ws-input",
        "ws-send",
        "ws-log",
        "ws-status",
        "upload-form",
    ):
        assert f'id="{element_id}"' in html
    # No external resources: everything is inline and same-origin.
    assert "http://" not in html and "https://" not in html and "src=" not in html


async def test_healthz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.text() == "ok"


async def test_search_ranks_matching_patents(client: Client) -> None:
    resp = await client.get("/api/search", params={"q": "lithium battery"})
    assert resp.status == 200
    data = await resp.json()
    assert data["query"] == "lithium battery"
    assert data["results"], data
    assert all(r["id"].startswith("US-") for r in data["results"])
    assert data["results"][0]["score"] == 1.0
    assert "battery" in data["results"][0]["title"].lower()
    every = await (await client.get("/api/search")).json()
    assert len(every["results"]) == 10


async def test_stream_sends_events_as_they_are_produced(client: Client) -> None:
    # A minute between events: the first one can only be here if it was sent as produced,
    # while the stream goes on (no clock read: the behaviour, not a duration, is asserted).
    resp = await client.get("/api/stream", params={"q": "claims", "n": "3", "delay": "60"})
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    first = await resp.content.readuntil(b"\n\n")
    assert first == b"id: 0\ndata: claims\n\n"
    assert not resp.content.at_eof()
    resp.close()


async def test_stream_ends_with_a_done_event(client: Client) -> None:
    resp = await client.get("/api/stream", params={"q": "claims", "n": "3", "delay": "0"})
    assert resp.status == 200
    events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    assert events[0] == "id: 0\ndata: claims"
    assert [e.split("\n")[0] for e in events[:3]] == ["id: 0", "id: 1", "id: 2"]
    assert len(events) == 4
    assert events[-1] == "event: done\ndata: end"


async def test_stream_rejects_bad_parameters(client: Client) -> None:
    resp = await client.get("/api/stream", params={"n": "lots"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "bad_request"


async def test_websocket_echo_protocols_and_close_codes(client: Client) -> None:
    async with client.ws_connect("/ws", protocols=("chat.v2",)) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01\xff"
        await ws.close(code=4001, message=b"bye")
        assert ws.close_code == 4001

    async with client.ws_connect("/ws") as ws:
        await ws.send_str("close:4002:server says bye")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4002, "server says bye")


async def test_upload_raw_and_multipart(client: Client) -> None:
    payload = deterministic_bytes(300_000)
    expected = hashlib.sha256(payload).hexdigest()

    resp = await client.post("/api/upload", data=payload)
    assert await resp.json() == {"mode": "raw", "bytes": 300_000, "sha256": expected}

    form = aiohttp.FormData()
    form.add_field("note", "not a file")
    form.add_field("file", payload, filename="claims.bin")
    data = await (await client.post("/api/upload", data=form)).json()
    assert (data["mode"], data["bytes"], data["sha256"]) == ("multipart", 300_000, expected)
    assert [p["name"] for p in data["parts"]] == ["note", "file"]


async def test_echo_reports_what_reached_the_upstream(client: Client) -> None:
    headers = [("X-Dup", "one"), ("X-Dup", "two"), ("Cookie", "a=1")]
    body = b"x" * 1000
    resp = await client.patch("/api/echo/a%2Fb/c?x=1&x=2", headers=headers, data=body)
    assert resp.status == 200
    data: dict[str, Any] = await resp.json()
    assert data["method"] == "PATCH"
    assert data["path"] == "/api/echo/a%2Fb/c?x=1&x=2"
    assert data["query"] == "x=1&x=2"
    assert [v for k, v in data["headers"] if k == "X-Dup"] == ["one", "two"]
    assert data["body_bytes"] == 1000
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()

    plain = await (await client.get("/api/echo")).json()
    assert (plain["method"], plain["path"], plain["body_bytes"]) == ("GET", "/api/echo", 0)


async def test_bytes_streams_chunked_deterministic_data(client: Client) -> None:
    n = 200_000
    resp = await client.get("/api/bytes", params={"n": str(n)})
    assert resp.status == 200
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in resp.headers
    assert await resp.read() == deterministic_bytes(n)


async def test_fixed_has_content_length(client: Client) -> None:
    resp = await client.get("/api/fixed", params={"n": "102400"})
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "102400"
    assert await resp.read() == deterministic_bytes(102_400)


async def test_cookies_sets_two_set_cookie_headers(client: Client) -> None:
    resp = await client.get("/api/cookies")
    assert resp.status == 200
    set_cookies = resp.headers.getall("Set-Cookie")
    assert len(set_cookies) == 2
    assert any(c.startswith("demo_theme=dark") for c in set_cookies)
    assert any(c.startswith("demo_session=abc123") and "HttpOnly" in c for c in set_cookies)


@pytest.mark.parametrize("code", [200, 204, 304, 404, 500, 503])
async def test_status_answers_the_requested_code(client: Client, code: int) -> None:
    resp = await client.get(f"/api/status/{code}")
    assert resp.status == code
    body = await resp.read()
    if code in (204, 304):
        assert body == b""
    else:
        assert json.loads(body) == {"status": code}


async def test_gzip_body_is_pre_compressed(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(probe_upstream_app(), auto_decompress=False)
    resp = await client.get("/api/gzip")
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    raw = await resp.read()
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["compressed"] is True


async def test_slow_waits_before_answering(client: Client) -> None:
    start = time.monotonic()
    resp = await client.get("/api/slow", params={"delay": "0.2"})
    assert resp.status == 200
    assert await resp.json() == {"slept": 0.2}
    assert time.monotonic() - start >= 0.2


async def test_the_probe_upstream_process_reports_its_free_port(tmp_path: Path) -> None:
    """``python -m tests.probes`` (the benchmarks' upstream) on port 0 says where it listens."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tests.probes"]
    child = spawn("upstream", argv, tmp_path / "upstream.log", env=env, cwd=ROOT)
    try:
        port = await asyncio.to_thread(reported_port, child, 30.0)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert await resp.text() == "ok"
            async with session.get(f"http://127.0.0.1:{port}/api/fixed?n=300") as resp:
                assert await resp.read() == deterministic_bytes(300)
    finally:
        await asyncio.to_thread(stop, child)


async def test_stepped_stream_waits_for_each_step(client: Client) -> None:
    resp = await client.get("/api/stepped", params={"key": "k1", "n": "2"})
    assert resp.status == 200
    assert "X-Accel-Buffering" not in resp.headers  # like an app that knows nothing of proxies
    assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
    assert (await client.get("/api/step", params={"key": "k1"})).status == 204
    assert await resp.text() == "data: 2\n\nevent: done\ndata: end\n\n"
    assert (await client.get("/api/step", params={"key": "k1"})).status == 404  # it ended


@pytest.mark.parametrize("query", [{}, {"key": "k", "n": "0"}, {"key": "k", "n": "x"}])
async def test_stepped_stream_rejects_bad_parameters(client: Client, query: dict[str, str]) -> None:
    assert (await client.get("/api/stepped", params=query)).status == 400


async def test_the_stream_check_catches_a_proxy_that_holds_the_answer(
    aiohttp_server: Any,
) -> None:
    """``tests.shipped.assert_events_stream`` (what the nginx, Caddy and replica tests run)
    fails through a proxy that reads the whole answer before it sends any of it."""
    upstream = await aiohttp_server(probe_upstream_app())

    async def holding(request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as session,
            session.get(upstream.make_url(request.path_qs)) as resp,
        ):
            body = await resp.read()
            return web.Response(body=body, status=resp.status, content_type=resp.content_type)

    proxy = web.Application()
    proxy.router.add_get("/{tail:.*}", holding)
    server = await aiohttp_server(proxy)
    async with aiohttp.ClientSession() as client:
        with pytest.raises(TimeoutError):
            await assert_events_stream(client, str(server.make_url("")).rstrip("/"), 1.0)


async def test_the_demo_app_has_no_test_endpoints(aiohttp_client: Any) -> None:
    """The wheel's demo app is the demo's own; the test endpoints come with the tests."""
    demo = await aiohttp_client(create_upstream_app())
    assert (await demo.get("/api/search?q=x")).status == 200
    for path in ("/api/echo", "/api/fixed", "/api/bytes", "/api/status/500", "/api/stepped"):
        assert (await demo.get(path)).status == 404, path


async def test_stream_shows_the_gates_quota_first(client: Client) -> None:
    resp = await client.get(
        "/api/stream",
        params={"n": "1", "delay": "0"},
        headers={"X-Gate-Quota": "analysis=3/20,tokens=10/100"},
    )
    body = await resp.text()
    assert body.startswith("event: quota\ndata: analysis=3/20,tokens=10/100\n\nid: 0\n")
    assert body.count("event: done\n") == 1
    plain = await client.get("/api/stream", params={"n": "1", "delay": "0"})
    assert "event: quota" not in await plain.text()
