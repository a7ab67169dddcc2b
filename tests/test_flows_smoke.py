"""Smoke test of the stack helper: subscribe end to end and reach the app."""

from pathlib import Path

from tests.stack import running_stack


async def test_subscribe_then_app(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url("/api/search?q=x"), allow_redirects=False) as resp:
            assert resp.status == 401
        resp = await stack.subscribe(client, "alice@example.com", "/api/search?q=x")
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == "/api/search?q=x"
        async with client.get(stack.url("/api/search?q=x"), allow_redirects=False) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert body["query"] == "x"
