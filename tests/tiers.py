"""Shared by the tiers tests (tests/test_tiers.py, tests/test_browser_tiers.py): the stack
with the demo's Basic and Pro plans, their features attached in the Stripe double
(``search`` on both, ``analysis`` and ``export`` on Pro), and ``FEATURE_RULES`` making the
demo's ``/api/stream`` and ``/ws`` Pro-only."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.stack import Stack, running_stack

BASIC = "price_basic_monthly"
PRO = "price_demo_monthly"
ENV = {
    "STRIPE_PRICE_IDS": f"{BASIC},{PRO},price_demo_yearly",
    "FEATURE_RULES": "/api/stream*=analysis,/ws=analysis",
    "WS_RECHECK_INTERVAL": "1h",  # only announced changes close sockets here
}


@asynccontextmanager
async def tiers_stack(tmp_path: Path, **env: str) -> AsyncIterator[Stack]:
    """``running_stack`` selling Basic and Pro with ``FEATURE_RULES``; the double's features
    attached unless the test names ``PRICE_FEATURES`` (an account without Entitlements)."""
    async with running_stack(tmp_path, {**ENV, **env}) as stack:
        if "PRICE_FEATURES" not in env:
            stack.double.entitlements.seed()
        yield stack


async def subscriber(
    stack: Stack, client: aiohttp.ClientSession, email: str, price: str
) -> tuple[str, str]:
    """A signed-in customer with an active subscription to ``price``: (customer, subscription)."""
    customer_id = str(stack.double.create_customer(email)["id"])
    sub = stack.double.create_subscription(customer_id, price)
    await stack.sign_in(client, customer_id, email)
    return customer_id, str(sub["id"])


@asynccontextmanager
async def basic_and_pro(
    stack: Stack,
) -> AsyncIterator[tuple[aiohttp.ClientSession, aiohttp.ClientSession]]:
    """The clients of two signed-in customers of ``stack``: one on Basic, one on Pro."""
    async with stack.session() as basic, stack.session() as pro:
        await subscriber(stack, basic, "basic@example.com", BASIC)
        await subscriber(stack, pro, "pro@example.com", PRO)
        yield basic, pro
