"""gateway.static_files: the gate's own files by exact name; anything else is the styled 404."""

from pathlib import Path

from gateway.static_files import STATIC_DIR
from tests.stack import running_stack


async def test_every_shipped_file_is_served_and_nothing_else(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        names = sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())
        assert {"gate.css", "badge.js", "favicon.svg"} <= set(names)
        for name in names:
            async with client.get(stack.url(f"/_gate/static/{name}")) as resp:
                assert resp.status == 200, name
                assert await resp.read() == (STATIC_DIR / name).read_bytes()
                etag = resp.headers["ETag"]
            async with client.get(
                stack.url(f"/_gate/static/{name}"), headers={"If-None-Match": etag}
            ) as resp:
                assert resp.status == 304, name  # conditional requests still work
        for path in ("/_gate/static/..%2f__init__.py", "/_gate/static/%2e%2e", "/_gate/static/x"):
            async with client.get(stack.url(path), headers={"Accept": "text/html"}) as resp:
                assert resp.status == 404, path
                assert "There is nothing here." in await resp.text(), path
