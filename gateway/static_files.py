"""The gate's static files (``GATE_PREFIX/static/NAME``: its stylesheet, badge script, icon).

Served by exact name from the files the package ships, so nothing else on disk can be reached
(no directory listing, no ``..``) and a missing file is the gate's own styled 404 page (or the
JSON error), not a bare "404: Not Found".
"""

from pathlib import Path

from aiohttp import web

from gateway.responses import error_response
from gateway.services import SETTINGS

__all__ = ["STATIC_DIR", "add_routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"


def add_routes(app: web.Application, prefix: str) -> None:
    """Register ``GET {prefix}/static/{name}`` for the files of :data:`STATIC_DIR`."""
    files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}

    async def static_file(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            message = "There is nothing here."
            return error_response(request, request.app[SETTINGS], 404, "not_found", message)
        # FileResponse answers conditional and range requests (ETag, Last-Modified).
        return web.FileResponse(path)

    app.router.add_get(f"{prefix}/static/{{name}}", static_file)
