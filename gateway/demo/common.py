"""Helpers shared by the demo app and its test/benchmark endpoints: query parameters with
bounds (a 400 JSON answer otherwise) and hashing a streamed body."""

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import BodyPartReader, web

__all__ = [
    "CHUNK_SIZE",
    "bad_request",
    "favicon_handler",
    "float_param",
    "hash_stream",
    "int_param",
]

CHUNK_SIZE = 64 * 1024

N = TypeVar("N", int, float)


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad_request", "message": message}),
        content_type="application/json",
    )


def _param(request: web.Request, name: str, parse: Callable[[str], N], what: str) -> N | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise bad_request(f"{name} must be {what}") from None


def _bounded(name: str, value: N, lo: N, hi: N) -> N:
    if not lo <= value <= hi:  # also rejects NaN
        raise bad_request(f"{name} must be between {lo} and {hi}")
    return value


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` as an integer in ``[lo, hi]`` (else a 400), or ``default``."""
    value = _param(request, name, int, "an integer")
    return default if value is None else _bounded(name, value, lo, hi)


def float_param(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    """Query parameter ``name`` as a number in ``[lo, hi]`` (else a 400), or ``default``."""
    value = _param(request, name, float, "a number")
    return default if value is None else _bounded(name, value, lo, hi)


async def hash_stream(reader: BodyPartReader | web.Request) -> tuple[int, "hashlib._Hash"]:
    digest = hashlib.sha256()
    size = 0
    if isinstance(reader, BodyPartReader):
        while chunk := await reader.read_chunk(CHUNK_SIZE):
            size += len(chunk)
            digest.update(chunk)
    else:
        async for chunk in reader.content.iter_chunked(CHUNK_SIZE):
            size += len(chunk)
            digest.update(chunk)
    return size, digest


def favicon_handler(letter: str, color: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A ``/favicon.ico`` handler: a one-letter SVG icon (browsers ask for it on every page;
    without it every page view logs a 404)."""
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
        f'<rect width="32" height="32" rx="7" fill="{color}"/>'
        '<text x="16" y="23" font-family="system-ui,sans-serif" font-size="19" '
        f'font-weight="700" fill="#fff" text-anchor="middle">{letter}</text></svg>'
    )

    async def favicon(request: web.Request) -> web.Response:
        return web.Response(
            text=svg, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    return favicon
