"""Headless-Chromium journey through the tiers: a Basic subscriber opens the Pro
feature (the demo's LLM analysis, ``FEATURE_RULES=/api/stream*=analysis``), sees the gate's
answer in the app with its "Upgrade to Pro" link, the upgrade page, confirms yearly Pro in the
double's portal and is back on the app's page, uses the Pro feature, downgrades and sees the
upgrade page again. Screenshots (desktop and mobile) of each step are kept in
``test-artifacts/browser/``. Real servers (``tests.stack``), real clicks, no fixed sleeps;
Chromium is Debian's (the test fails, never skips, without it).
"""

import re
from pathlib import Path

import pytest
from playwright.async_api import Page, ViewportSize, expect

from gateway.settings import SESSION_COOKIE
from tests.browser import TIMEOUT_MS, open_browser, screenshot
from tests.stack import Stack
from tests.tiers import BASIC, PRO, tiers_stack

pytestmark = pytest.mark.browser

T = TIMEOUT_MS


def on_double(stack: Stack, kind: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(f"{stack.double.public_url}/{kind}/") + r"[^/]+$")


DESKTOP = ViewportSize(width=1000, height=800)
MOBILE = ViewportSize(width=390, height=844)
YEARLY = "price_demo_yearly"


async def shots(page: Page, name: str) -> None:
    """``<name>.png`` (desktop) and ``<name>-mobile.png``, full pages, kept with the others."""
    await screenshot(page, name)
    await page.set_viewport_size(MOBILE)
    await screenshot(page, f"{name}-mobile")
    await page.set_viewport_size(DESKTOP)


async def expect_upgrade_page(page: Page) -> None:
    await page.wait_for_url(re.compile(r"/_gate/upgrade\?feature=analysis"), timeout=T)
    await expect(page.locator("#upgrade-title")).to_have_text(
        "Upgrade to use LLM analysis of claims", timeout=T
    )


async def switch_in_portal(page: Page, price: str) -> None:
    """On the double's portal page: choose ``price``, Switch plan (webhooks are delivered
    before the page answers)."""
    await page.select_option("#price", price)
    await page.click("#switch-price")
    await expect(page.locator("#price option[value='" + price + "']")).to_have_count(0)


async def analyze(page: Page, path: str = "/") -> str:
    """Click the demo app's Analyze (an SSE stream through the gate) on ``path``; its final
    status."""
    await page.goto(path)
    await page.click("#analyze-btn")
    status = page.locator("#stream-status")
    await expect(status).not_to_have_text(re.compile("idle|streaming"), timeout=T)
    return await status.inner_text()


async def test_basic_subscriber_upgrades_uses_pro_and_downgrades(tmp_path: Path) -> None:
    async with (
        tiers_stack(tmp_path, INJECT_BADGE="true") as stack,
        open_browser(stack, "tiers-journey") as gb,
    ):
        customer_id = str(stack.double.create_customer("tiers@example.com")["id"])
        stack.double.create_subscription(customer_id, BASIC)
        cookie = await stack.services.sessions.create(customer_id, "tiers@example.com", "")
        page = await gb.new_page()
        await page.context.add_cookies(
            [{"name": SESSION_COOKIE, "value": cookie, "url": stack.base}]
        )

        # Basic, on a page of the app: search works, the Pro feature is refused, and the app
        # shows the gate's answer with its link (not a bare "error").
        app_page = "/?q=battery"
        assert await analyze(page, app_page) == "refused (402)"
        await expect(page.locator("#stream")).to_contain_text("Your plan does not include")
        upgrade_link = page.locator("#stream-upgrade")
        await expect(upgrade_link).to_have_text("Upgrade to Pro", timeout=T)
        badge = page.locator("#gate-badge")
        await expect(badge).to_contain_text("Includes: Patent search", timeout=T)
        await shots(page, "tiers-app")
        # The badge keeps clear of the app: the page's last content can scroll above it.
        room = await page.evaluate("getComputedStyle(document.body).paddingBottom")
        assert float(room.removesuffix("px")) >= 40, room

        await upgrade_link.click()
        await expect_upgrade_page(page)
        await expect(page.locator(f"#plan-{YEARLY} .plan-name")).to_have_text(
            "PatentLLM Pro", timeout=T
        )
        await expect(page.locator(f"#switch-{YEARLY}")).to_have_text(
            "Switch to PatentLLM Pro, yearly", timeout=T
        )
        await expect(page.locator(f"#switch-{PRO}")).to_have_text(
            "Switch to PatentLLM Pro, monthly", timeout=T
        )
        await shots(page, "upgrade")

        # Switch to yearly Pro: the portal asks to confirm exactly that price ...
        await page.click(f"#switch-{YEARLY}")
        await page.wait_for_url(on_double(stack, "portal"), timeout=T)
        await expect(page.locator("#flow-subscription-update-confirm")).to_have_text(
            "Confirm your new plan", timeout=T
        )
        await expect(page.locator("#new-plan")).to_have_text(
            "PatentLLM Pro — $190.00 / year", timeout=T
        )
        await shots(page, "portal-confirm")
        # ... and once confirmed, the browser is back on the page it came from.
        await page.click("#confirm-update")
        await page.wait_for_url(stack.url(app_page), timeout=T)
        await expect(page.locator("#q")).to_have_value("battery", timeout=T)
        await expect(badge).to_contain_text("LLM analysis of claims", timeout=T)
        await shots(page, "tiers-back-on-the-page")

        # Pro: the analysis streams, the chat socket (Pro too) is open.
        assert await analyze(page) == "done"
        await expect(page.locator("#ws-status")).to_have_text("open", timeout=T)

        # Downgraded elsewhere (another tab, the dashboard): the gate closes the socket with
        # 4402 and the badge, still on this page, follows it to the next api/me.
        sub_id = stack.double.customer_subscriptions(customer_id)[0]["id"]
        item_id = stack.double.get_subscription(sub_id)["items"]["data"][0]["id"]
        await stack.double.update_subscription(sub_id, {"items": [{"id": item_id, "price": BASIC}]})
        await expect(page.locator("#ws-status")).to_contain_text("closed 4402", timeout=T)
        await expect(badge).not_to_contain_text("LLM analysis", timeout=T)
        await expect(badge).to_contain_text("Basic · renews", timeout=T)
        await shots(page, "tiers-badge-after-downgrade")

        # Upgrade and downgrade in the portal: the feature is gone again.
        await page.goto("/_gate/account")
        await page.click("#manage-billing")
        await page.wait_for_url(on_double(stack, "portal"), timeout=T)
        await switch_in_portal(page, YEARLY)
        await page.goto("/_gate/account")
        await page.click("#manage-billing")
        await page.wait_for_url(on_double(stack, "portal"), timeout=T)
        await switch_in_portal(page, BASIC)
        assert await analyze(page) == "refused (402)"
        await page.goto("/api/stream?n=1&delay=0")  # opened as a page: the upgrade page
        await expect_upgrade_page(page)
