"""Red team of usage quotas (issue 19): the attacker's requests against real servers (gate,
app, Stripe double on 127.0.0.1). Each test is a hole that was open before its fix."""

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.model import ManualClock
from tests.stack import Stack, echoed_headers, running_stack
from tests.test_usage import ENV, JSON, get, post_usage, subscriber, usage_of

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


@pytest.mark.parametrize(
    "reported",
    [
        "analysis_tokens=99999999999999999999999",  # past a 64-bit integer
        "analysis_tokens=" + "9" * 5000,  # past Python's int-from-string limit
        "analysis_tokens=\u00b2",  # str.isdigit() says yes, int() says no
        "analysis_tokens=\u0663",  # an Arabic-Indic digit: int() takes it
    ],
)
async def test_a_wild_usage_header_neither_fails_the_request_nor_the_flush(
    stack: Stack, reported: str
) -> None:
    """One bad ``X-Gate-Usage`` from the app (a bug, a reflected value) must be refused and
    logged: never a 500, and never a flush that fails for every customer from then on."""
    usage = usage_of(stack)
    async with stack.session() as mallory, stack.session() as alice:
        victim = await subscriber(stack, alice)
        await subscriber(stack, mallory)
        async with mallory.get(stack.url(f"/api/plain?usage={reported}"), headers=JSON) as resp:
            assert resp.status == 200
            assert "X-Gate-Usage" not in resp.headers
        assert (await get(alice, stack.url("/api/analyze")))[0] == 200
        await usage.counters.flush()
        rows = {r.meter: r.used for r in await usage.sql.periods_of(victim, usage.clock.time())}
        assert rows == {"analysis": 1}
        # And the flush after goes through as well (nothing stuck pending).
        assert (await get(alice, stack.url("/api/analyze")))[0] == 200
        await usage.counters.flush()
        rows = {r.meter: r.used for r in await usage.sql.periods_of(victim, usage.clock.time())}
        assert rows == {"analysis": 2}


async def test_a_usage_report_cannot_push_the_count_past_the_store(stack: Stack) -> None:
    """``POST /_gate/usage`` caps one value; many reports of the cap must not overflow."""
    async with stack.session() as client:
        customer = await subscriber(stack, client)
    for n in range(3):
        body = {"user": customer, "meter": "analysis_tokens", "value": 10**12, "id": f"r{n}"}
        status, answer = await post_usage(stack, body)
        assert status == 200, answer
    usage = usage_of(stack)
    rows = {r.meter: r.used for r in await usage.sql.periods_of(customer, usage.clock.time())}
    assert rows == {"analysis_tokens": 3 * 10**12}


async def test_an_api_key_spends_the_same_quota_on_the_proxy_and_forward_auth(
    stack: Stack,
) -> None:
    """A key acts as its customer: its requests (remembered verdicts included, the spelling
    ``bearer`` in lower case too) spend the customer's quota, through the gate's proxy and
    through forward auth; past it, 429 for both."""
    keys = stack.services.apikeys
    assert keys is not None
    async with stack.session() as client:
        customer = await subscriber(stack, client)
    key, _ = await keys.create(customer, "job")
    statuses = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as script:
        for n in range(2):
            auth = f"{'bearer' if n else 'Bearer'} {key}"
            async with script.get(
                stack.url("/api/analyze"), headers={**JSON, "Authorization": auth}
            ) as resp:
                statuses.append(resp.status)
        nginx = {
            "X-Original-URI": "/api/Analyze/",
            "X-Original-Method": "HEAD",
            "Authorization": f"Bearer {key}",
        }
        for _ in range(2):
            async with script.get(stack.url("/_gate/auth"), headers=nginx) as resp:
                statuses.append(resp.status)
        async with script.get(
            stack.url("/api/analyze"), headers={**JSON, "Authorization": f"Bearer {key}"}
        ) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 200, 401, 429]


async def test_the_apps_usage_header_counts_on_remembered_verdicts_too(stack: Stack) -> None:
    """The second and later requests of a cookie or a key are answered from remembered
    verdicts: the app's ``X-Gate-Usage`` on their answers must still count."""
    keys = stack.services.apikeys
    assert keys is not None
    usage = usage_of(stack)
    async with stack.session() as client:
        customer = await subscriber(stack, client)
        for _ in range(3):
            url = stack.url("/api/plain?usage=analysis_tokens=10")
            async with client.get(url, headers=JSON) as resp:
                assert resp.status == 200
    key, _ = await keys.create(customer, "job")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as script:
        for _ in range(3):
            async with script.get(
                stack.url("/api/plain?usage=analysis_tokens=100"),
                headers={**JSON, "Authorization": f"Bearer {key}"},
            ) as resp:
                assert resp.status == 200
    await usage.counters.flush()
    rows = {r.meter: r.used for r in await usage.sql.periods_of(customer, usage.clock.time())}
    assert rows == {"analysis_tokens": 330}


async def test_a_downgrade_mid_period_does_not_keep_the_old_plans_reservation(
    tmp_path: Path,
) -> None:
    """Pro includes 500 analyses, Basic 3. A Pro customer makes one request (the worker
    reserves a block of Pro's quota), switches to Basic in the portal (prorated: they pay
    Basic from now), and goes on: Basic's 3 must hold, not the block reserved under Pro."""
    from tests.test_tiers import switch_plan
    from tests.tiers import BASIC, PRO
    from tests.tiers import subscriber as tier_subscriber

    env = {
        "STRIPE_PRICE_IDS": f"{BASIC},{PRO}",
        "USAGE_RULES": "/api/echo/analyze*=analysis",
        "PRICE_QUOTAS": f"{PRO}=analysis:500,{BASIC}=analysis:3",
    }
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        _, sub = await tier_subscriber(stack, client, "pat@example.com", PRO)
        assert (await get(client, stack.url("/api/echo/analyze")))[0] == 200
        await switch_plan(stack, sub, BASIC)
        status, body, _ = await get(client, stack.url("/api/echo/plain"))
        assert status == 200 and echoed_headers(body)["x-gate-plan"] == [BASIC]
        statuses = [(await get(client, stack.url("/api/echo/analyze")))[0] for _ in range(6)]
        assert statuses == [200, 200, 429, 429, 429, 429]


async def test_forward_auth_past_a_free_quota_sends_back_to_the_original_path(
    stack: Stack,
) -> None:
    """Caddy/Traefik (passthrough) past a free quota: the Subscribe link must bring the user
    back to the page they were on, not to the gate's forward-auth endpoint."""
    async with stack.session() as client:
        cus = stack.double.create_customer("free@example.com")
        await stack.sign_in(client, cus["id"], cus["email"])
        original = {"X-Forwarded-Uri": "/api/analyze?q=1", "X-Forwarded-Method": "GET", **JSON}
        auth = stack.url("/_gate/auth?mode=passthrough")
        async with client.get(auth, headers=original) as resp:
            assert resp.status == 200
        async with client.get(auth, headers=original) as resp:
            assert resp.status == 429
            body = await resp.json()
        assert (
            "_gate%2Fauth" not in body["upgrade_url"] and "/_gate/auth" not in body["upgrade_url"]
        )
        assert body["upgrade_url"].startswith("/_gate/subscribe?next=/api/analyze")
