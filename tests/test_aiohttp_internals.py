"""The private parts of aiohttp the connection limiter (``gateway.connections``) relies on, in
one place: an aiohttp upgrade that renames or drops one fails here by name, before any limit
silently stops working. (The upstream request's internals are pinned in
``tests/test_proxy_http.py::test_aiohttp_request_internals_we_rely_on``.)"""

import asyncio
import inspect

import aiohttp
from aiohttp import http_parser, web, web_protocol


def slots_of(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


async def test_server_keeps_its_handler_kwargs_and_hooks() -> None:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response()

    server = web.Server(handler, keepalive_timeout=7.0)
    # ConnectionLimiter builds its handlers with exactly what Server.__call__ passes.
    assert isinstance(server._kwargs, dict)
    assert server._kwargs.get("keepalive_timeout") == 7.0
    # ...and wraps these two (the one hook between "head parsed" and "handler runs").
    assert callable(server.request_factory) and callable(server.request_handler)
    parameters = list(inspect.signature(server.request_factory).parameters)
    assert parameters == ["message", "payload", "protocol", "writer", "task"]
    protocol = server()
    assert isinstance(protocol, web_protocol.RequestHandler)


async def test_tcp_site_keeps_what_limited_site_reads() -> None:
    # LimitedSite.start replaces TCPSite.start and reads/sets these.
    assert {"_runner", "_host", "_port", "_backlog", "_reuse_port", "_server", "_bound_port"} <= (
        slots_of(web.TCPSite)
    )
    site_start = inspect.getsource(web.TCPSite.start)
    assert "self._bound_port" in site_start and "create_server" in site_start


def test_request_handler_hooks_the_limiter_overrides() -> None:
    for name in (
        "connection_made",
        "data_received",
        "log_access",
        "pause_reading",
        "resume_reading",
        "connection_lost",
        "force_close",
    ):
        assert callable(getattr(web.RequestHandler, name, None)), name
    # log_access is the synchronous "response done" hook: still called by finish_response.
    assert "log_access" in inspect.getsource(web_protocol.RequestHandler.finish_response)


def test_parsed_heads_and_writers_keep_their_fields() -> None:
    for field in ("method", "upgrade"):  # the C parser's class or the Python fallback's
        assert hasattr(http_parser.RawRequestMessage, field), field
    assert hasattr(aiohttp.http_writer.StreamWriter, "output_size")
    assert asyncio.iscoroutinefunction(aiohttp.streams.StreamReader.readany)
