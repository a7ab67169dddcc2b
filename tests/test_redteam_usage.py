"""Red team of usage quotas (issue 19): the attacker's requests against real servers (gate,
app, Stripe double on 127.0.0.1). Each test is a hole that was open before its fix."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.model import ManualClock
from tests.stack import Stack, running_stack
from tests.test_usage import ENV, JSON, get, subscriber

DONE = web.AppKey("done", list[str])


def app_upstream() -> web.Application:
    """The app: ``/api/analyze`` does the costly work for GET (and so for HEAD, as aiohttp,
    Flask, Express and Rails serve HEAD with the GET handler) and counts the work it did;
    ``/api/plain?usage=`` reports ``X-Gate-Usage`` as the app was told."""
    done: list[str] = []

    async def analyze(request: web.Request) -> web.Response:
        done.append(request.method)
        return web.json_response({"ok": True})

    async def plain(request: web.Request) -> web.Response:
        headers = {}
        if "usage" in request.query:
            headers["X-Gate-Usage"] = request.query["usage"]
        return web.json_response({"ok": True}, headers=headers)

    app = web.Application()
    app[DONE] = done
    app.router.add_get("/api/analyze", analyze)
    app.router.add_get("/api/plain", plain)
    return app


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    env = {**ENV, "USAGE_RULES": "GET /api/analyze=analysis"}
    async with running_stack(
        tmp_path, env, upstream_app=app_upstream(), clock=ManualClock()
    ) as stack:
        yield stack


async def test_head_on_a_get_rule_counts_like_the_get(stack: Stack) -> None:
    """``HEAD`` runs the app's GET handler (the work is done, the answer's headers tell
    the result); a ``GET`` rule must count it, else the quota is unlimited through HEAD."""
    async with stack.session() as client:
        await subscriber(stack, client)
        statuses = []
        for _ in range(5):
            async with client.head(stack.url("/api/analyze"), headers=JSON) as resp:
                statuses.append(resp.status)
        assert statuses == [200, 200, 200, 429, 429]
        assert (await get(client, stack.url("/api/analyze")))[0] == 429
    assert stack.upstream.app[DONE] == ["HEAD"] * 3
