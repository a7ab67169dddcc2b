"""The account page's Team tables in a real Chromium: the owner sees a member (with Remove) and
a pending invitation (with Cancel) in their own tables; each button POSTs its row's email, and
the row is gone when the page comes back."""

from pathlib import Path

import pytest
from playwright.async_api import expect

from gateway.settings import SESSION_COOKIE
from tests.browser import TIMEOUT_MS, open_browser, screenshot
from tests.teams import buy_seats, invite, member_joins, team_stack

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

T = TIMEOUT_MS
OWNER = "olga@firm.example"


async def test_remove_a_member_and_cancel_an_invitation_from_the_tables(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with team_stack(tmp_path) as stack, open_browser(stack, request.node.name) as gb:
        async with stack.session() as client:
            team = await buy_seats(stack, client, OWNER, 3)
            async with await member_joins(stack, client, "bob@firm.example"):
                pass
            assert await invite(stack, client, "carol@firm.example") == "invited"
        cookie = await stack.services.sessions.create(team, OWNER, "Chromium")
        page = await gb.new_page()
        await page.context.add_cookies(
            [{"name": SESSION_COOKIE, "value": cookie, "url": stack.base}]
        )
        await page.goto("/_gate/account")

        members = page.locator("#team-members")
        await expect(members.locator("thead th")).to_have_text(
            ["Member", "Joined", "Last seen", ""], timeout=T
        )
        bob = members.locator('tr.member[data-email="bob@firm.example"]')
        await expect(bob.locator("td")).to_have_count(4, timeout=T)
        await expect(bob.locator("td").first).to_have_text("bob@firm.example")
        assert await members.locator("tr.suspended").count() == 0
        invitations = page.locator("#team-invitations")
        await expect(invitations.locator("thead th")).to_have_text(
            ["Invited", "Link expires", ""], timeout=T
        )
        carol = invitations.locator('tr.invitation[data-email="carol@firm.example"]')
        await expect(carol.locator("td")).to_have_count(3, timeout=T)
        await expect(page.locator("#seats-used")).to_have_text("3", timeout=T)
        await screenshot(page, "team-tables")

        await carol.locator("button.cancel-invitation").click()
        await page.wait_for_url("**/_gate/account?team=canceled*", timeout=T)
        await expect(page.locator("#team-note")).to_have_text("Invitation canceled.", timeout=T)
        assert await page.locator("#team-invitations").count() == 0
        await expect(page.locator("#seats-used")).to_have_text("2", timeout=T)

        await page.locator('#team-members tr[data-email="bob@firm.example"] .remove-member').click()
        await page.wait_for_url("**/_gate/account?team=removed*", timeout=T)
        await expect(page.locator("#team-note")).to_contain_text("Member removed", timeout=T)
        assert await page.locator("#team-members").count() == 0
        await expect(page.locator("#seats-used")).to_have_text("1", timeout=T)
