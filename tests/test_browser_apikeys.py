"""The account page's "API keys" section in a real Chromium: a paying user creates a key (shown
once), the key works from a script, the page lists it by its start only, and Revoke ends it."""

from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import expect

from gateway.settings import SESSION_COOKIE
from tests.browser import TIMEOUT_MS, open_browser
from tests.stack import running_stack, subscribed

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


async def status_with_key(url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    async with aiohttp.ClientSession() as script, script.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_create_and_revoke_a_key_in_the_browser(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with running_stack(tmp_path) as stack, open_browser(stack, request.node.name) as gb:
        async with stack.session() as client:
            customer_id = await subscribed(stack, client, "browser-key@example.com")
        cookie = await stack.services.sessions.create(customer_id, None, "Chromium")
        page = await gb.new_page()
        await page.context.add_cookies(
            [{"name": SESSION_COOKIE, "value": cookie, "url": stack.base}]
        )
        await page.goto("/_gate/account")
        await expect(page.locator("#api-keys")).to_have_text("API keys", timeout=TIMEOUT_MS)
        await page.fill("input[name=name]", "notebook")
        await page.select_option("select[name=expires]", "30")
        await page.click("#create-api-key")
        key = (await page.locator("#api-key-value").inner_text()).strip()
        assert key.startswith("gk_test_") and len(key) == 44
        assert await status_with_key(stack.url("/api/echo"), key) == 200
        await page.click("#message-link")
        await expect(page.locator("#api-key-list")).to_contain_text(key[:12], timeout=TIMEOUT_MS)
        assert key not in await page.content()
        await page.click("#api-key-list button:has-text('Revoke')")
        await page.wait_for_url("**/_gate/account*", timeout=TIMEOUT_MS)
        assert await status_with_key(stack.url("/api/echo"), key) == 401
