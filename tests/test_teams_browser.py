"""Teams in real Chromium: the owner buys 3 seats on the landing page (changed to 3 again on
the double's Checkout, whose quantity is adjustable), invites two people from the account page;
each joins from their own browser context and uses the app; the third invitation is refused."""

from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.browser import TIMEOUT_MS, open_browser
from tests.stack import Stack
from tests.teams import SEAT, invitation_link, team_stack

T = TIMEOUT_MS


async def _invite(page: Page, email: str) -> None:
    await page.goto("/_gate/account")
    await page.fill("#invite-email", email)
    await page.click("#invite")
    await page.wait_for_url("**/_gate/account?team=*", timeout=T)


async def _join(stack: Stack, page: Page, email: str) -> None:
    await page.goto(invitation_link(stack, email))
    await expect(page.locator("#join-email")).to_contain_text(email, timeout=T)
    await page.click("#join-team")
    await page.wait_for_url(stack.url("/"), timeout=T)


async def test_buy_three_seats_and_two_members_use_the_app(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with team_stack(tmp_path) as stack, open_browser(stack, request.node.name) as gb:
        owner = await gb.new_page()
        await owner.goto("/_gate/subscribe")
        await expect(owner.locator("#plan-price")).to_have_text(
            "$12.00 per seat / month", timeout=T
        )
        await owner.fill(f"#seats-{SEAT}", "2")
        await owner.click("#subscribe")
        await owner.wait_for_url(f"{stack.double.public_url}/checkout/**", timeout=T)
        quantity = owner.locator("#quantity")
        await expect(quantity).to_have_value("2", timeout=T)
        await quantity.fill("3")  # adjustable_quantity: changed on Stripe's page
        await owner.fill("#email", "olga@firm.example")
        await owner.click("#pay")
        await owner.wait_for_url(stack.url("/"), timeout=T)
        [sub] = list(stack.double.subscriptions.values())
        assert sub["items"]["data"][0]["quantity"] == 3

        await _invite(owner, "bob@firm.example")
        await _invite(owner, "carol@firm.example")
        await _invite(owner, "dave@firm.example")
        await expect(owner.locator("#team-note")).to_contain_text("Every seat is taken", timeout=T)
        await expect(owner.locator("#seats-used")).to_have_text("3", timeout=T)

        for email in ("bob@firm.example", "carol@firm.example"):
            member = await gb.new_page()  # a browser context of their own
            await _join(stack, member, email)
            await member.fill("#q", "battery")
            await member.click("#search-btn")
            await expect(member.locator("#results li")).to_have_count(2, timeout=T)
            await member.goto("/_gate/account")
            await expect(member.locator("#team-managed")).to_contain_text(
                "olga@firm.example", timeout=T
            )
            assert await member.locator("#manage-billing").count() == 0
