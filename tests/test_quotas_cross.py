"""Usage quotas with the other ways in, against real servers (the demo upstream with its
probes, the Stripe double, the gate): an API key's requests count against its customer's
quota and are refused past it with 429 JSON (a script: never a page, never a redirect); team
members and the owner share the team customer's quota, and each is told the team's count in
``X-Gate-Quota``; the demo's own configuration shows a Basic customer "N of 20 analyses
used" on the account page and in ``api/me`` (the badge)."""

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.apikeys.keys import ApiKeys
from gateway.demo.runner import DEMO_ENV, seed_demo_double
from tests.stack import Stack, running_stack, subscribed
from tests.teams import SEAT, buy_seats, member_joins, team_stack

pytestmark = pytest.mark.timeout(120)

JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html,application/xhtml+xml"}
METERED = "/api/echo"
QUOTA_ENV = {
    "USAGE_RULES": f"{METERED}*=analysis",
    "PRICE_QUOTAS": "price_demo_monthly=analysis:3,price_demo_yearly=analysis:3",
}


async def call(
    client: aiohttp.ClientSession, stack: Stack, headers: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    """The metered path: (status, JSON body or text, response headers); never followed."""
    async with client.get(stack.url(METERED), headers=headers, allow_redirects=False) as resp:
        text = await resp.text()
        body: Any = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, body, dict(resp.headers)


def quota_seen(body: Any) -> str | None:
    """The ``X-Gate-Quota`` the app saw (``/api/echo`` echoes the request's headers)."""
    values = [v for k, v in body["headers"] if k.lower() == "x-gate-quota"]
    assert len(values) <= 1, values
    return values[0] if values else None


def assert_quota_refusal(status: int, body: Any, headers: dict[str, str], used: int) -> None:
    assert status == 429, (status, body)
    assert headers["Content-Type"].startswith("application/json"), headers
    assert "Location" not in headers and "Set-Cookie" not in headers, headers
    assert body["error"] == "quota_exceeded"
    assert (body["meter"], body["limit"], body["used"]) == ("analysis", 3, used)


def keys_of(stack: Stack) -> ApiKeys:
    keys = stack.services.apikeys
    assert keys is not None
    return keys


async def test_an_api_key_counts_on_its_customers_quota_and_gets_429_json(
    tmp_path: Path,
) -> None:
    async with running_stack(tmp_path, QUOTA_ENV) as stack, stack.session() as browser:
        customer_id = await subscribed(stack, browser, "keys@example.com")
        key, _ = await keys_of(stack).create(customer_id, "nightly")
        bearer = {"Authorization": f"Bearer {key}", **JSON}
        async with aiohttp.ClientSession() as script:  # no cookie jar of the browser's
            # One unit in the browser, two with the key: one count, the customer's.
            status, body, _ = await call(browser, stack, JSON)
            assert status == 200 and quota_seen(body) == "analysis=1/3"
            for n in (2, 3):
                status, body, _ = await call(script, stack, bearer)
                assert status == 200, body
                assert quota_seen(body) == f"analysis={n}/3"
            # Past it: 429 JSON for the key, whatever its Accept says (a script).
            assert_quota_refusal(*await call(script, stack, bearer), used=3)
            with_html = {"Authorization": f"Bearer {key}", **HTML}
            assert_quota_refusal(*await call(script, stack, with_html), used=3)
            # Forward auth in passthrough mode (Caddy, Traefik) answers the key the same.
            forwarded = {"X-Forwarded-Uri": METERED, "X-Forwarded-Method": "GET", **with_html}
            async with script.get(
                stack.url("/_gate/auth?mode=passthrough"), headers=forwarded, allow_redirects=False
            ) as resp:
                refusal = (resp.status, await resp.json(), dict(resp.headers))
            assert_quota_refusal(*refusal, used=3)
            # The customer's browser is past it too (the page, for a browser).
            status, page, _ = await call(browser, stack, HTML)
            assert status == 429 and "You've used your 3 analyses this period" in page


async def test_team_members_share_the_team_customers_quota(tmp_path: Path) -> None:
    env = {"USAGE_RULES": f"{METERED}*=analysis", "PRICE_QUOTAS": f"{SEAT}=analysis:3"}
    async with team_stack(tmp_path, env) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "owner@firm.example", 3)
        async with (
            await member_joins(stack, owner, "ana@firm.example") as ana,
            await member_joins(stack, owner, "ben@firm.example") as ben,
        ):
            # One unit each, in turns; each is told the team's count, not their own.
            for n, client in enumerate((ana, owner, ben), start=1):
                status, body, _ = await call(client, stack, JSON)
                assert status == 200, body
                assert quota_seen(body) == f"analysis={n}/3"
            # The team's quota is used up: refused whoever asks, with the team's count.
            for client in (ana, ben, owner):
                assert_quota_refusal(*await call(client, stack, JSON), used=3)
            # api/me (the badge) of a member shows the team's usage.
            async with ana.get(stack.url("/_gate/api/me"), headers=JSON) as resp:
                me = await resp.json()
            assert [(u["meter"], u["used"], u["limit"]) for u in me["usage"]] == [
                ("analysis", 3, 3)
            ]


async def test_the_demos_basic_plan_shows_its_analyses_on_the_account_page(
    tmp_path: Path,
) -> None:
    env = {**DEMO_ENV, "STRIPE_PRICE_IDS": "price_basic_monthly,price_demo_monthly"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        seed_demo_double(stack.double)
        customer = stack.double.create_customer("basic@example.com")
        stack.double.create_subscription(customer["id"], "price_basic_monthly")
        await stack.sign_in(client, customer["id"], "basic@example.com")
        for _ in range(2):  # the demo's Analyze: an SSE stream on /api/stream
            async with client.get(
                stack.url("/api/stream?n=1&delay=0"), headers={"Accept": "text/event-stream"}
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert "analysis=" in await resp.text()
        end = stack.period_end("basic@example.com")
        text = f"2 of 20 analyses used · resets on {end.day} {end:%b %Y}"
        async with client.get(stack.url("/_gate/account"), headers=HTML) as resp:
            page = await resp.text()
        assert resp.status == 200 and text in page and 'value="10"' in page
        async with client.get(stack.url("/_gate/api/me"), headers=JSON) as resp:
            me = await resp.json()
        assert [u["text"] for u in me["usage"]] == [text]
