"""Usage quotas and Stripe Meters through the whole stack (gate, app, Stripe double, each a real
server on 127.0.0.1): counting, the refusal past a quota on every surface, overage, the app's
own reports, renewal, and the outbox to Stripe's meter events (Stripe down included)."""

import argparse
import json
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway import admin
from gateway.demo.stripe_double.meters import DEMO_METERED_PRICE
from gateway.model import ManualClock
from gateway.usage.service import Usage
from tests.shipped import (
    running_shipped_caddy,
    running_shipped_nginx,
    running_shipped_traefik,
    stack_behind,
)
from tests.stack import PRICES, Stack, echoed_headers, running_stack, session_value
from tests.stores import set_read_only

PRICE = "price_demo_monthly"
METERED = str(DEMO_METERED_PRICE["id"])
SECRET = "r" * 32
HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
ENV = {
    "USAGE_RULES": "/api/analyze*=analysis,/ws=analysis",
    "USAGE_METERS": "analysis_tokens",
    "PRICE_QUOTAS": f"{PRICE}=analysis:3",
    "FREE_QUOTAS": "analysis:1",
    "USAGE_REPORT_SECRET": SECRET,
    "METER_REPORT_INTERVAL": "60s",
    "TRUSTED_PROXIES": "127.0.0.1/32",
}


def app_upstream() -> web.Application:
    """The app: an analysis endpoint (echoes the gate's headers; ``?usage=`` makes it report
    ``X-Gate-Usage``), a WebSocket, and a page."""

    async def analyze(request: web.Request) -> web.Response:
        headers = {}
        if "usage" in request.query:
            headers["X-Gate-Usage"] = request.query["usage"]
        seen = {k: v for k, v in request.headers.items() if k.lower().startswith("x-gate-")}
        return web.json_response({"gate": seen}, headers=headers)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(msg.data)
        return sock

    app = web.Application()
    app.router.add_route("*", "/api/analyze", analyze)
    app.router.add_route("*", "/api/analyze/{tail:.*}", analyze)
    app.router.add_get("/ws", ws)
    app.router.add_get("/api/plain", analyze)
    return app


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def stack(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path, ENV, upstream_app=app_upstream(), clock=clock) as stack:
        stack.double.meters.seed(stack.double.add_price)
        yield stack


def usage_of(stack: Stack) -> Usage:
    usage = stack.services.usage
    assert usage is not None
    return usage


async def subscriber(stack: Stack, client: aiohttp.ClientSession, **options: Any) -> str:
    """A customer with a subscription to PRICE on the double, signed in with ``client``."""
    cus = stack.double.create_customer(f"u{len(stack.double.customers)}@example.com")
    stack.double.create_subscription(cus["id"], PRICE, **options)
    await stack.sign_in(client, cus["id"], cus["email"])
    return str(cus["id"])


async def get(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, Mapping[str, str]]:
    async with client.get(url, headers=headers or JSON, allow_redirects=False) as resp:
        text = await resp.text()
        body: Any = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, body, dict(resp.headers)


async def analyses(stack: Stack, client: aiohttp.ClientSession, times: int) -> None:
    """``times`` requests from ``client`` to the metered path, each one allowed."""
    for _ in range(times):
        status, body, _ = await get(client, stack.url("/api/analyze"))
        assert status == 200, body


async def report_window(stack: Stack, clock: ManualClock, seconds: float = 120) -> int:
    """The counters flushed, the gate's clock ``seconds`` on (past the window), one round of
    the reporter: the windows it sent to Stripe."""
    usage = usage_of(stack)
    await usage.counters.flush()
    clock.advance(seconds)
    return await usage.reporter.round()


async def reported(stack: Stack, clock: ManualClock, times: int) -> str:
    """A new subscriber with the metered price makes ``times`` analyses; then their window is
    closed and sent to Stripe in one reporter round. Their customer id."""
    async with stack.session() as client:
        customer = await subscriber(stack, client, metered=(METERED,))
        await analyses(stack, client, times)
    assert await report_window(stack, clock) == 1
    return customer


def period_end(stack: Stack, customer_id: str) -> int:
    sub = next(s for s in stack.double.subscriptions.values() if s["customer"] == customer_id)
    return int(max(i["current_period_end"] for i in sub["items"]["data"]))


async def test_past_the_quota_an_api_gets_429_with_the_facts(stack: Stack) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client)
        seen = []
        for _ in range(3):
            status, body, _ = await get(client, stack.url("/api/analyze/run"))
            assert status == 200, body
            seen.append(body["gate"]["X-Gate-Quota"])
        assert seen == ["analysis=1/3", "analysis=2/3", "analysis=3/3"]
        status, body, headers = await get(client, stack.url("/api/analyze/run"))
        assert status == 429
        resets = datetime.fromtimestamp(period_end(stack, customer), UTC)
        assert body["error"] == "quota_exceeded"
        assert body["meter"] == "analysis"
        assert (body["limit"], body["used"]) == (3, 3)
        assert body["resets_at"] == resets.isoformat().replace("+00:00", "Z")
        assert body["upgrade_url"] == "/_gate/account"
        assert body["message"]
        assert headers["Cache-Control"] == "no-store"
        # Unmetered paths go on.
        status, body, _ = await get(client, stack.url("/api/plain"))
        assert status == 200 and "X-Gate-Quota" not in body["gate"]


async def test_past_the_quota_a_browser_gets_the_page(stack: Stack) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client)
        await analyses(stack, client, 3)
        status, page, _ = await get(client, stack.url("/api/analyze"), HTML)
        assert status == 429
        resets = datetime.fromtimestamp(period_end(stack, customer), UTC)
        day = f"{resets.day} {resets:%b %Y}"
        assert f"You've used your 3 analyses this period · resets on {day}" in page
        assert 'href="/_gate/account"' in page and "Upgrade" in page


async def test_a_websocket_counts_once_and_is_refused_before_upgrading(stack: Stack) -> None:
    async with stack.session() as client:
        await subscriber(stack, client)
        for _ in range(3):
            async with client.ws_connect(stack.url("/ws")) as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "hi"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with client.ws_connect(stack.url("/ws")):
                pass
        assert refused.value.status == 429


async def test_forward_auth_refuses_past_the_quota_and_is_never_cacheable(stack: Stack) -> None:
    async with stack.session() as client:
        await subscriber(stack, client)
        auth = stack.url("/_gate/auth")
        nginx = {"X-Original-URI": "/api/analyze", "X-Original-Method": "GET"}
        for _ in range(3):
            async with client.get(auth, headers=nginx) as resp:
                assert resp.status == 200
                assert resp.headers["Cache-Control"] == "no-store"
                assert resp.headers["X-Gate-Quota"].startswith("analysis=")
        # An unmetered path is not cacheable either: the proxy's cache has no path in its key.
        async with client.get(auth, headers={**nginx, "X-Original-URI": "/api/plain"}) as resp:
            assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        async with client.get(auth, headers=nginx) as resp:
            assert resp.status == 401
            assert resp.headers["X-Gate-Denial"] == "quota_exceeded"
            body = json.loads(resp.headers["X-Gate-Denial-Body"])
            assert body["error"] == "quota_exceeded" and body["limit"] == 3
        passthrough = {"X-Forwarded-Uri": "/api/analyze", "X-Forwarded-Method": "GET"}
        async with client.get(f"{auth}?mode=passthrough", headers=passthrough) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"] == "quota_exceeded"


async def test_a_client_cannot_forge_quota_or_usage_headers(stack: Stack) -> None:
    async with stack.session() as client:
        await subscriber(stack, client)
        forged = {**JSON, "X-Gate-Quota": "analysis=0/1000", "X-Gate-Usage": "analysis=-50"}
        status, body, _ = await get(client, stack.url("/api/analyze"), forged)
        assert status == 200
        assert body["gate"]["X-Gate-Quota"] == "analysis=1/3"  # the gate's, not the client's
        assert "X-Gate-Usage" not in body["gate"]
        status, body, _ = await get(client, stack.url("/api/plain"), forged)
        assert "X-Gate-Quota" not in body["gate"] and "X-Gate-Usage" not in body["gate"]
        # The request header counted nothing: two more analyses, then the quota.
        await analyses(stack, client, 2)
        assert (await get(client, stack.url("/api/analyze")))[0] == 429


async def test_the_apps_usage_header_is_counted_and_removed(stack: Stack) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client)
        url = stack.url("/api/plain?usage=analysis_tokens=1834,analysis=2,bogus=5,analysis=x")
        async with client.get(url, headers=JSON) as resp:
            assert resp.status == 200
            assert "X-Gate-Usage" not in resp.headers
        usage = usage_of(stack)
        await usage.counters.flush()
        now = usage.clock.time()
        rows = {r.meter: r.used for r in await usage.sql.periods_of(customer, now)}
        assert rows == {"analysis_tokens": 1834, "analysis": 2}
        # A bad value is logged, never a 500.
        async with client.get(stack.url("/api/plain?usage=analysis=-1"), headers=JSON) as resp:
            assert resp.status == 200 and "X-Gate-Usage" not in resp.headers
        # The reported units count against the quota: one more analysis, then 429.
        assert (await get(client, stack.url("/api/analyze")))[0] == 200
        assert (await get(client, stack.url("/api/analyze")))[0] == 429


async def test_free_quota_for_a_signed_in_customer_without_subscription(stack: Stack) -> None:
    async with stack.session() as client:
        cus = stack.double.create_customer("free@example.com")
        await stack.sign_in(client, cus["id"], cus["email"])
        assert (await get(client, stack.url("/api/analyze")))[0] == 200
        status, body, _ = await get(client, stack.url("/api/analyze"))
        assert status == 429 and body["limit"] == 1
        assert body["upgrade_url"].startswith("/_gate/subscribe")
        # Other paths still need a subscription.
        assert (await get(client, stack.url("/api/plain")))[0] == 402


async def test_renewal_resets_the_count(stack: Stack, clock: ManualClock) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client)
        await analyses(stack, client, 3)
        assert (await get(client, stack.url("/api/analyze")))[0] == 429
        ahead = period_end(stack, customer) - stack.double.now() + 5
        await stack.double.advance_time(ahead)
        clock.advance(ahead)
        await stack.sign_in(client, customer)  # a month on: the old session has expired
        status, body, _ = await get(client, stack.url("/api/analyze"))
        assert status == 200, body
        assert body["gate"]["X-Gate-Quota"] == "analysis=1/3"


async def test_overage_is_allowed_and_reported_once_per_window(
    stack: Stack, clock: ManualClock
) -> None:
    customer = await reported(stack, clock, 5)
    usage = usage_of(stack)
    events = stack.double.meters.customer_events(customer)
    assert [int(e["payload"]["value"]) for e in events] == [5]
    assert usage.reporter.calls == 1
    assert await usage.reporter.round() == 0  # nothing twice


async def test_stripe_down_loses_nothing_and_sends_in_order(
    stack: Stack, clock: ManualClock
) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client, metered=(METERED,))
        usage = usage_of(stack)
        assert (await get(client, stack.url("/api/analyze")))[0] == 200  # entitlement cached
        sent = 1
        stack.double.faults.fail_always(500)
        for _window in range(3):  # 3 windows while Stripe is down: counting goes on
            await analyses(stack, client, 2)
            sent += 2
            assert await report_window(stack, clock, 60) == 0
        stack.double.faults.reset()
        clock.advance(60)
        await usage.reporter.round()
        events = stack.double.meters.customer_events(customer)
        assert sum(int(e["payload"]["value"]) for e in events) == sent == 7
        stamps = [int(e["timestamp"]) for e in events]
        assert stamps == sorted(stamps) and len(events) == 3


async def test_a_lost_answer_is_a_duplicate_and_counts_once(
    stack: Stack, clock: ManualClock
) -> None:
    customer = await reported(stack, clock, 4)
    usage = usage_of(stack)
    # As if Stripe's answer had been lost: the row is unsent again, and is sent again.
    await stack.services.store._execute(
        "test", "UPDATE usage_windows SET sent_at = NULL, claimed_by = NULL"
    )
    assert await usage.sql.pending_windows() == 1
    assert await usage.reporter.round() == 1  # Stripe: duplicate identifier = sent
    events = stack.double.meters.customer_events(customer)
    assert sum(int(e["payload"]["value"]) for e in events) == 4
    assert await usage.sql.pending_windows() == 0


async def post_usage(
    stack: Stack, body: object, secret: str = SECRET, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """The app's own report, ``POST /_gate/usage`` with ``body`` (and more ``headers``): the
    status and the JSON answer."""
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            stack.url("/_gate/usage"),
            json=body,
            headers={"Authorization": f"Bearer {secret}", **(headers or {})},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_usage_reports_refuse_a_wrong_secret_unknown_meter_bad_value(stack: Stack) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client)
    good = {"user": customer, "meter": "analysis", "value": 1, "id": "r1"}
    status, body = await post_usage(stack, good, secret="x" * 32)
    assert status == 403 and body["error"] == "forbidden"
    status, body = await post_usage(stack, {**good, "meter": "nope"})
    assert status == 400 and body["error"] == "unknown_meter"
    for value in (-1, 1.5, "3", True):
        status, body = await post_usage(stack, {**good, "value": value})
        assert status == 400 and body["error"] == "bad_request", value
    status, body = await post_usage(stack, ["not", "an", "object"])
    assert status == 400
    usage = usage_of(stack)
    assert await usage.sql.periods_of(customer, usage_of(stack).clock.time()) == []
    # A replayed id counts once.
    assert await post_usage(stack, good) == (200, {"counted": True})
    assert await post_usage(stack, good) == (200, {"counted": False})
    rows = await usage.sql.periods_of(customer, usage_of(stack).clock.time())
    assert [(r.meter, r.used) for r in rows] == [("analysis", 1)]


async def test_usage_reports_from_outside_the_network_are_refused(tmp_path: Path) -> None:
    # The gate's peer (127.0.0.1) is no trusted proxy here, and not in USAGE_REPORT_FROM.
    env = {**ENV, "USAGE_REPORT_FROM": "10.0.0.0/8", "TRUSTED_PROXIES": "10.9.9.9/32"}
    async with running_stack(tmp_path, env, upstream_app=app_upstream()) as stack:
        cus = stack.double.create_customer("x@example.com")
        body = {"user": cus["id"], "meter": "analysis", "value": 1, "id": "r1"}
        status, answer = await post_usage(stack, body)
        assert status == 403 and answer["error"] == "forbidden"
        # A forged X-Forwarded-For naming an address inside the network changes nothing.
        status, answer = await post_usage(stack, body, headers={"X-Forwarded-For": "10.1.2.3"})
        assert status == 403 and answer["error"] == "forbidden"
        usage = stack.services.usage
        assert usage is not None
        assert await usage.sql.periods_of(str(cus["id"]), usage.clock.time()) == []


@pytest.mark.parametrize("proxy", ["nginx", "caddy", "traefik"])
async def test_behind_each_shipped_proxy_the_quota_holds(tmp_path: Path, proxy: str) -> None:
    """Forward auth through the shipped configs: the app gets the gate's ``X-Gate-Quota``, and
    past the quota the client gets the 429 JSON (nginx builds it from the gate's 401)."""
    runners = {
        "nginx": running_shipped_nginx,
        "caddy": running_shipped_caddy,
        "traefik": running_shipped_traefik,
    }
    env = {"USAGE_RULES": "/api/echo/analyze=analysis", "PRICE_QUOTAS": f"{PRICE}=analysis:2"}
    async with (
        stack_behind(tmp_path, runners[proxy], env) as (stack, base),
        stack.session() as client,
    ):
        await subscriber(stack, client)
        cookie = {"Cookie": f"gate_session={session_value(client)}", **JSON}
        forged = {**cookie, "X-Gate-Quota": "analysis=0/999"}
        for n in (1, 2):
            async with client.get(base + "/api/echo/analyze", headers=forged) as resp:
                assert resp.status == 200, await resp.text()
                seen = echoed_headers(await resp.json())
                assert seen["x-gate-quota"] == [f"analysis={n}/2"]
        async with client.get(base + "/api/echo/analyze", headers=cookie) as resp:
            assert resp.status == 429, await resp.text()
            body = await resp.json()
        assert body["error"] == "quota_exceeded"
        assert (body["meter"], body["limit"], body["used"]) == ("analysis", 2, 2)


async def test_api_me_and_the_account_page_show_the_usage(stack: Stack) -> None:
    async with stack.session() as client:
        customer = await subscriber(stack, client)
        await analyses(stack, client, 2)
        resets = datetime.fromtimestamp(period_end(stack, customer), UTC)
        text = f"2 of 3 analyses used · resets on {resets.day} {resets:%b %Y}"
        status, me, _ = await get(client, stack.url("/_gate/api/me"))
        assert status == 200
        assert [(u["meter"], u["used"], u["limit"], u["text"]) for u in me["usage"]] == [
            ("analysis", 2, 3, text)
        ]
        status, page, _ = await get(client, stack.url("/_gate/account"), HTML)
        assert status == 200 and text in page and 'value="67"' in page


async def test_the_cli_shows_usage_and_reconciles_with_stripe(
    stack: Stack, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    month = f"{datetime.fromtimestamp(clock.time(), UTC):%Y-%m}"  # of the analyses below
    customer = await reported(stack, clock, 4)
    usage = usage_of(stack)
    args = argparse.Namespace(command="usage", user=customer, period=None)
    assert await admin.run("usage", args, stack.settings) == 0
    out = capsys.readouterr().out
    assert f"{customer}  analysis  4 of 3 analyses used" in out and "1 billed as overage" in out
    args = argparse.Namespace(command="usage", user="reconcile", period=month)
    assert await admin.run("usage", args, stack.settings) == 0
    out = capsys.readouterr().out
    assert f"{customer}  analysis  counted=4  sent=4  pending=0  stripe=4  ok" in out
    # Counted but not yet in Stripe: reconcile says so.
    async with stack.session() as client:
        await stack.sign_in(client, customer)
        assert (await get(client, stack.url("/api/analyze")))[0] == 200
    await usage.counters.flush()
    assert await admin.run("usage", args, stack.settings) == 0
    assert "counted=5  sent=4  pending=1  stripe=4  pending" in capsys.readouterr().out
    # Stripe holding less than was sent is a difference.
    stack.double.meters.events.clear()
    assert await admin.run("usage", args, stack.settings) == 1
    assert "DIFFERS" in capsys.readouterr().out


async def test_a_store_that_cannot_reserve_refuses_with_503_never_admits(stack: Stack) -> None:
    async with stack.session() as client:
        await subscriber(stack, client)
        assert (await get(client, stack.url("/api/plain")))[0] == 200  # entitlement cached
        await set_read_only(stack.services.store, True)
        try:
            status, body, headers = await get(client, stack.url("/api/analyze"))
            assert status == 503 and body["error"] == "billing_unavailable"
            assert headers["Retry-After"]
        finally:
            await set_read_only(stack.services.store, False)
        assert (await get(client, stack.url("/api/analyze")))[0] == 200


async def test_a_sold_price_without_a_quota_is_named_at_startup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator who limits one price and forgets another hears of it: the forgotten price
    would be unlimited on the meter. One warning per (price, meter), naming PRICE_QUOTAS."""
    caplog.set_level("WARNING", logger="gateway.usage")
    async with running_stack(tmp_path, ENV, upstream_app=app_upstream()):
        pass
    fields = [
        getattr(r, "gate_fields", {})
        for r in caplog.records
        if r.getMessage() == "usage_price_unlimited"
    ]
    named = {(f.get("price"), f.get("meter")) for f in fields}
    assert all(f.get("setting") == "PRICE_QUOTAS" for f in fields)
    others = [p for p in PRICES.split(",") if p != PRICE]
    assert others and named >= {(p, "analysis") for p in others}
    assert (PRICE, "analysis") not in named
