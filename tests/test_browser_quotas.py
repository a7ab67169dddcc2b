"""Headless-Chromium journey through a usage quota, with the demo's configuration
(``gateway.demo.runner.DEMO_ENV`` and its catalog on the double, ``seed_demo_double``) and a
Basic quota of 3 instead of 20 (fewer clicks): buy Basic on the double's Checkout, analyse
until the quota is used up, read the gate's answer in the app ("You've used your 3 analyses
this period · resets on … · Upgrade") and the account page's bar, upgrade to Pro in the
double's portal and go on analysing (what was used stays: 4 of 500). Real servers
(``tests.stack``), real clicks, no fixed sleeps; Chromium is Debian's (fails, never skips,
without it)."""

import re
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from gateway.demo.runner import DEMO_ENV, seed_demo_double
from tests.browser import TIMEOUT_MS, open_browser, screenshot
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.browser

T = TIMEOUT_MS
BASIC = "price_basic_monthly"
PRO = "price_demo_monthly"
QUOTAS = f"{BASIC}=analysis:3,price_basic_yearly=analysis:3,{PRO}=analysis:500"


def on_double(stack: Stack, kind: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(f"{stack.double.public_url}/{kind}/") + r"[^/]+$")


async def analyze(page: Page) -> str:
    """Click the demo app's Analyze (an SSE stream through the gate); its final status."""
    await page.click("#analyze-btn")
    status = page.locator("#stream-status")
    await expect(status).not_to_have_text(re.compile("idle|streaming"), timeout=T * 3)
    return await status.inner_text()


def resets_on(stack: Stack, email: str) -> str:
    """The day the customer's period ends, as the gate writes it (``6 Jan 2027``)."""
    end = stack.period_end(email)
    return f"{end.day} {end:%b %Y}"


async def test_use_up_the_basic_quota_upgrade_and_go_on(tmp_path: Path) -> None:
    env = {**DEMO_ENV, "PRICE_QUOTAS": QUOTAS}
    async with (
        running_stack(tmp_path, env) as stack,
        open_browser(stack, "quota-journey") as gb,
    ):
        seed_demo_double(stack.double)
        page = await gb.new_page()

        # Buy Basic: the landing page says what it includes.
        await page.goto("/")
        await page.wait_for_url(re.compile(r"/_gate/subscribe"), timeout=T)
        await expect(page.locator("#product-prod_basic .features")).to_contain_text(
            "20 LLM analyses a month", timeout=T
        )
        # (the first plan's button keeps the plain id ``subscribe``)
        await page.click(f"form:has(input[name=price][value={BASIC}]) button")
        await page.wait_for_url(on_double(stack, "checkout"), timeout=T)
        await page.fill("#email", "quota@example.com")
        await page.click("#pay")
        await page.wait_for_url(stack.url("/"), timeout=T)
        day = resets_on(stack, "quota@example.com")

        # Three analyses: each streams, and the app sees the gate's count.
        for n in (1, 2, 3):
            assert await analyze(page) == "done"
            await expect(page.locator("#quota")).to_have_text(f"used analysis={n}/3", timeout=T)

        # The fourth: the gate's quota answer, in the app, with the way on.
        assert await analyze(page) == "refused (429)"
        stream = page.locator("#stream")
        await expect(stream).to_contain_text(
            f"You've used your 3 analyses this period · resets on {day} · Upgrade", timeout=T
        )
        upgrade = page.locator("#stream-upgrade")
        await expect(upgrade).to_have_attribute("href", "/_gate/account", timeout=T)
        badge = page.locator("#gate-badge")
        await expect(badge).to_contain_text(f"3 of 3 analyses used · resets on {day}", timeout=T)
        await screenshot(page, "quota-app")
        # Opened as a page, the analysis is the gate's quota page.
        quota_page = await page.context.new_page()  # another tab, the same cookies
        resp = await quota_page.goto("/api/stream?n=1&delay=0")
        assert resp is not None and resp.status == 429
        await expect(quota_page.locator("body")).to_contain_text(
            f"You've used your 3 analyses this period · resets on {day}", timeout=T
        )
        await screenshot(quota_page, "quota-page")
        await quota_page.close()

        # Upgrade: the account page (its bar), Manage billing, Pro monthly in the portal.
        await upgrade.click()
        await page.wait_for_url(stack.url("/_gate/account"), timeout=T)
        await expect(page.locator("#usage-analysis .usage-text")).to_have_text(
            f"3 of 3 analyses used · resets on {day}", timeout=T
        )
        await screenshot(page, "quota-account")
        await page.click("#manage-billing")
        await page.wait_for_url(on_double(stack, "portal"), timeout=T)
        await page.select_option("#price", PRO)
        await page.click("#switch-price")
        await expect(page.locator(f"#price option[value='{PRO}']")).to_have_count(0, timeout=T)

        # Pro: the analyses go on; what was used this period stays counted.
        await page.goto("/")
        assert await analyze(page) == "done"
        await expect(page.locator("#quota")).to_have_text("used analysis=4/500", timeout=T)
        await page.goto("/_gate/account")
        await expect(page.locator("#usage-analysis .usage-text")).to_contain_text(
            "4 of 500 analyses used · resets on", timeout=T
        )
