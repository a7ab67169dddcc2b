"""Helpers shared by the demo app and its test/benchmark endpoints: query parameters with
bounds (a 400 JSON answer otherwise) and hashing a streamed body."""

import hashlib
import json

from aiohttp import BodyPartReader, web

__all__ = ["CHUNK_SIZE", "bad_request", "float_param", "hash_stream", "int_param"]

CHUNK_SIZE = 64 * 1024


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad_request", "message": message}),
        content_type="application/json",
    )


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}")
    return value


def float_param(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(f"{name} must be a number") from None
    if not lo <= value <= hi:  # also rejects NaN
        raise bad_request(f"{name} must be between {lo} and {hi}")
    return value


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
