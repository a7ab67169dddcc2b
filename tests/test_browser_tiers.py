"""Headless-Chromium journey through the tiers (issue 11): a Basic subscriber opens the Pro
feature (the demo's LLM analysis, ``FEATURE_RULES=/api/stream*=analysis``), sees the upgrade
page, switches plan in the double's portal, uses the Pro feature, downgrades and sees the
upgrade page again. Real servers (``tests.stack``), real clicks, no fixed sleeps; Chromium is
Debian's (the test fails, never skips, without it).
"""

import re
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from gateway.settings import SESSION_COOKIE
from tests.browser import ARTIFACTS, TIMEOUT_MS, open_browser
from tests.stack import Stack
from tests.tiers import BASIC, PRO, tiers_stack

pytestmark = pytest.mark.browser

T = TIMEOUT_MS


def on_double(stack: Stack, kind: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(f"{stack.double.public_url}/{kind}/") + r"[^/]+$")


SHOTS = ARTIFACTS / "browser"  # like tests/test_browser.py's success screenshots


async def expect_upgrade_page(page: Page) -> None:
    await page.wait_for_url(re.compile(r"/_gate/upgrade\?feature=analysis"), timeout=T)
    await expect(page.locator("#upgrade-title")).to_have_text("Upgrade to use analysis", timeout=T)


async def switch_in_portal(page: Page, price: str) -> None:
    """On the double's portal page: choose ``price``, Switch plan (webhooks are delivered
    before the page answers)."""
    await page.select_option("#price", price)
    await page.click("#switch-price")
    await expect(page.locator("#price option[value='" + price + "']")).to_have_count(0)


async def analyze(page: Page) -> str:
    """Click the demo app's Analyze (an SSE stream through the gate); its final status."""
    await page.goto("/")
    await page.click("#analyze-btn")
    status = page.locator("#stream-status")
    await expect(status).not_to_have_text(re.compile("idle|streaming"), timeout=T)
    return await status.inner_text()


async def test_basic_subscriber_upgrades_uses_pro_and_downgrades(tmp_path: Path) -> None:
    async with tiers_stack(tmp_path) as stack, open_browser(stack, "tiers-journey") as gb:
        customer_id = str(stack.double.create_customer("tiers@example.com")["id"])
        stack.double.create_subscription(customer_id, BASIC)
        cookie = await stack.services.sessions.create(customer_id, "tiers@example.com", "")
        page = await gb.new_page()
        await page.context.add_cookies(
            [{"name": SESSION_COOKIE, "value": cookie, "url": stack.base}]
        )

        # Basic: search works, the Pro feature is refused (the stream errors) ...
        assert await analyze(page) == "error"
        # ... and opening it leads to the upgrade page, naming Pro.
        await page.goto("/api/stream?n=1&delay=0")
        await expect_upgrade_page(page)
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / "upgrade.png"), full_page=True)
        await expect(page.locator("#plan-price_demo_monthly .plan-name")).to_have_text(
            "PatentLLM Pro", timeout=T
        )
        # Switch plan: the button opens the portal's plan-switch flow for this subscription,
        # which returns to the Pro feature once done (and now it streams).
        await page.click(f"#switch-{PRO}")
        await page.wait_for_url(on_double(stack, "portal"), timeout=T)
        await expect(page.locator("#flow-subscription-update")).to_have_text(
            "Change your plan", timeout=T
        )
        await page.select_option("#price", PRO)
        await page.click("#switch-price")
        await page.wait_for_url(stack.url("/api/stream?n=1&delay=0"), timeout=T)

        # Pro: the analysis streams.
        assert await analyze(page) == "done"

        # Downgrade in the portal: the feature is gone again.
        await page.goto("/_gate/account")
        await page.click("#manage-billing")
        await page.wait_for_url(on_double(stack, "portal"), timeout=T)
        await switch_in_portal(page, BASIC)
        assert await analyze(page) == "error"
        await page.goto("/api/stream?n=1&delay=0")
        await expect_upgrade_page(page)
