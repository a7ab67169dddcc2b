"""Baseline for the benchmarks: the smallest reasonable aiohttp streaming reverse proxy.

One shared ClientSession, request and response bodies streamed, hop-by-hop headers dropped.
No identity, no billing, no X-Forwarded-*: whatever the gate costs on top of this is its own.

    python bench/bare_proxy.py --port 8090 --upstream http://127.0.0.1:8081

``--port 0`` (the default) picks a free port and reports it (a ``port_chosen`` line).
"""

import argparse
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.processes import serve_app

# Hop-by-hop headers, plus Host: the client session sets the upstream's own.
DROPPED = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection"}
    | {"te", "trailer", "trailers", "transfer-encoding", "upgrade", "host"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Copy headers minus hop-by-hop ones, including those named in ``Connection``."""
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in DROPPED | named)


async def handle(request: web.Request) -> web.StreamResponse:
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    async with request.app[SESSION].request(
        request.method,
        url,
        headers=end_to_end(request.headers),
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        resp.headers.extend(end_to_end(upstream.headers))
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def client_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="http://127.0.0.1:8081")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", handle)
    serve_app(app, args.host, args.port, access_log=None)


if __name__ == "__main__":
    main()
