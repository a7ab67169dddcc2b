"""The demo upstream as the tests and benchmarks run it: the demo app
(:func:`gateway.demo.upstream.create_upstream_app`) plus endpoints that exist for them, not for
the demo's story: ``/api/echo`` (exactly what reached the upstream), deterministic byte streams
and fixed bodies, several ``Set-Cookie``, any status code, a pre-gzipped body, slow answers and
server-sent events released one by one by the client (``/api/stepped``)."""

import argparse
import asyncio
import functools
import gzip
import json
import logging
from collections.abc import Mapping

from aiohttp import web

from gateway.demo.common import CHUNK_SIZE, bad_request, float_param, hash_stream, int_param
from gateway.demo.upstream import create_upstream_app
from tests.processes import serve_app

__all__ = [
    "MAX_FIXED_BYTES",
    "MAX_STEPPED",
    "MAX_STREAM_BYTES",
    "STEP_WAIT",
    "add_probe_routes",
    "deterministic_bytes",
    "main",
    "probe_upstream_app",
]

log = logging.getLogger("gateway.demo.upstream")

# Largest body /api/fixed serves; bodies are cached, so keep the bound modest.
MAX_FIXED_BYTES = 16 * 1024 * 1024
MAX_STREAM_BYTES = 1 << 40

# 64 KiB of the byte pattern 0,1,...,255 repeated: byte i of any /api/bytes or /api/fixed
# body is i % 256, whatever the chunking.
_BLOCK = bytes(range(256)) * (CHUNK_SIZE // 256)


def deterministic_bytes(n: int, offset: int = 0) -> bytes:
    """Return the ``n`` bytes that ``/api/bytes`` and ``/api/fixed`` serve from ``offset`` on."""
    start = offset % 256
    reps = (start + n) // len(_BLOCK) + 1
    return (_BLOCK * reps)[start : start + n]


async def api_echo(request: web.Request) -> web.Response:
    """Report exactly what reached the upstream: method, raw path, query, headers, body hash."""
    size, digest = await hash_stream(request)
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "query": request.query_string,
            "headers": headers,
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )


async def api_bytes(request: web.Request) -> web.StreamResponse:
    """Stream ``n`` deterministic bytes with chunked encoding, 64 KiB per write."""
    n = int_param(request, "n", 1024, 0, MAX_STREAM_BYTES)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    remaining = n
    try:
        while remaining > 0:
            step = min(remaining, CHUNK_SIZE)
            # _BLOCK is a whole number of 256-byte periods, so every write starts at phase 0.
            await resp.write(_BLOCK if step == CHUNK_SIZE else _BLOCK[:step])
            remaining -= step
        await resp.write_eof()
    except ConnectionResetError:
        log.debug("event=bytes_client_gone remaining=%d", remaining)
    return resp


@functools.lru_cache(maxsize=32)
def _fixed_body(n: int) -> bytes:
    return deterministic_bytes(n)


_FIXED_HEADERS: Mapping[str, str] = {"Content-Type": "application/octet-stream"}


async def api_fixed(request: web.Request) -> web.Response:
    """``n`` deterministic bytes with a Content-Length; cached, so cheap enough to benchmark."""
    n = int_param(request, "n", 1024, 0, MAX_FIXED_BYTES)
    return web.Response(body=_fixed_body(n), headers=_FIXED_HEADERS)


async def api_cookies(request: web.Request) -> web.Response:
    """Set two cookies (two ``Set-Cookie`` headers) and report the cookies received."""
    resp = web.json_response({"received": dict(request.cookies)})
    resp.set_cookie("demo_theme", "dark", path="/", samesite="Lax")
    resp.set_cookie("demo_session", "abc123", path="/", httponly=True, samesite="Lax")
    return resp


async def api_status(request: web.Request) -> web.Response:
    """Answer with the status code in the path; 204 and 304 carry no body."""
    try:
        code = int(request.match_info["code"])
    except ValueError:
        raise bad_request("status code must be an integer") from None
    if not 200 <= code <= 599:
        raise bad_request("status code must be between 200 and 599")
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


_GZIP_PAYLOAD = json.dumps(
    {"compressed": True, "message": "pre-gzipped by the upstream " * 20}
).encode()
# mtime=0 keeps the compressed bytes identical across runs.
_GZIP_BODY = gzip.compress(_GZIP_PAYLOAD, mtime=0)


async def api_gzip(request: web.Request) -> web.Response:
    """A body that is already gzip-compressed, sent with ``Content-Encoding: gzip``."""
    return web.Response(
        body=_GZIP_BODY,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )


async def api_slow(request: web.Request) -> web.Response:
    """Sleep ``delay`` seconds, then answer (for timeout tests)."""
    delay = float_param(request, "delay", 1.0, 0.0, 3600.0)
    await asyncio.sleep(delay)
    return web.json_response({"slept": delay})


#: Streams of /api/stepped waiting for their next /api/step, by key.
_STEPS: web.AppKey[dict[str, asyncio.Event]] = web.AppKey("stepped_streams", dict)
#: At most this many stepped streams at once (the rest get 503).
MAX_STEPPED = 100
#: A stepped stream waits this long for a step, then ends with ``event: timeout``.
STEP_WAIT = 30.0


async def api_stepped(request: web.Request) -> web.StreamResponse:
    """Server-sent events ``data: 1`` … ``data: n``, each after the previous one was released by
    ``/api/step?key=…``, then ``event: done``. Unlike ``/api/stream`` it sends no
    ``X-Accel-Buffering`` (as an app that knows nothing of its proxy): a proxy that buffers the
    answer never delivers the first event, and the client waiting for it before it releases the
    next finds out."""
    key = request.query.get("key", "")
    n = int_param(request, "n", 3, 1, 100)
    steps = request.app[_STEPS]
    if not key or key in steps:
        raise bad_request("key must be given and not in use")
    if len(steps) >= MAX_STEPPED:
        raise web.HTTPServiceUnavailable(text="too many stepped streams")
    released = steps[key] = asyncio.Event()
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await resp.prepare(request)
        for i in range(1, n + 1):
            await resp.write(f"data: {i}\n\n".encode())
            if i < n:
                try:
                    await asyncio.wait_for(released.wait(), STEP_WAIT)
                except TimeoutError:
                    await resp.write(b"event: timeout\ndata: no step\n\n")
                    return resp
                released.clear()
        await resp.write(b"event: done\ndata: end\n\n")
    finally:
        steps.pop(key, None)
    return resp


async def api_step(request: web.Request) -> web.Response:
    """Let the ``/api/stepped`` stream ``key`` send its next event (404: no such stream)."""
    released = request.app[_STEPS].get(request.query.get("key", ""))
    if released is None:
        raise web.HTTPNotFound(text="no stepped stream with that key")
    released.set()
    return web.Response(status=204)


def add_probe_routes(app: web.Application) -> None:
    """Register the test and benchmark endpoints."""
    app.router.add_route("*", "/api/echo", api_echo)
    app.router.add_route("*", "/api/echo/{tail:.*}", api_echo)
    app.router.add_get("/api/bytes", api_bytes)
    app.router.add_get("/api/fixed", api_fixed)
    app.router.add_get("/api/cookies", api_cookies)
    app.router.add_get("/api/status/{code}", api_status)
    app.router.add_get("/api/gzip", api_gzip)
    app.router.add_get("/api/slow", api_slow)
    app.router.add_get("/api/stepped", api_stepped)
    app.router.add_get("/api/step", api_step)
    app[_STEPS] = {}


def probe_upstream_app() -> web.Application:
    """The demo upstream app with the test and benchmark endpoints."""
    app = create_upstream_app()
    add_probe_routes(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.probes [--host H] [--port P]``: serve :func:`probe_upstream_app` (the
    benchmarks' upstream); port 0 (the default) picks a free one and reports it
    (:func:`tests.processes.serve_app`)."""
    parser = argparse.ArgumentParser(prog="python -m tests.probes", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve_app(probe_upstream_app(), args.host, args.port, access_log=None)


if __name__ == "__main__":
    main()
