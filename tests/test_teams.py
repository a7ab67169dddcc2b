"""Teams and seats against real servers (the gate, the demo upstream, the Stripe double): the
attacker's requests first, then an owner's and their members' journeys."""

import argparse
import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import admin
from tests.conftest import stripe_library
from tests.stack import API_KEY, Stack, checkout_form, confirm_email, form_fields, open_portal
from tests.teams import (
    HTML,
    SEAT,
    account_page,
    buy_seats,
    dashboard,
    echo,
    invitation_link,
    invite,
    join,
    member_joins,
    post_account_form,
    team_stack,
    team_subscription,
    team_with_two_members,
)

DEADLINE = 30.0


async def until_status(
    stack: Stack, client: aiohttp.ClientSession, want: int, deadline: float = DEADLINE
) -> None:
    """Poll ``/api/echo`` until it answers ``want`` (a bound, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    status = 0
    while loop.time() < end:
        status, _ = await echo(stack, client)
        if status == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still {status}, wanted {want}")


# --- the attacker's requests ----------------------------------------------------------------------


async def test_an_invitation_link_works_once(tmp_path: Path) -> None:
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        assert await invite(stack, owner, "bob@firm.example") == "invited"
        link = invitation_link(stack, "bob@firm.example")
        async with stack.session() as bob, stack.session() as thief:
            first = await join(stack, bob, link)
            assert first.status == 303
            again = await join(stack, thief, link)
            assert again.status == 400
            assert "gate_session" not in again.headers.get("Set-Cookie", "")
            assert (await echo(stack, thief))[0] == 401
            assert (await echo(stack, bob))[0] == 200


async def test_an_invitation_is_for_its_email_only(tmp_path: Path) -> None:
    """Mallory, signed in with her own email, posts Bob's invitation (with her address in the
    form, too): refused, nothing used; Bob's link still works, and the member is Bob."""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        assert await invite(stack, owner, "bob@firm.example") == "invited"
        link = invitation_link(stack, "bob@firm.example")
        async with stack.session() as mallory, stack.session() as bob:
            stack.double.create_customer("mallory@evil.example")
            await stack.sign_in(mallory, "", "mallory@evil.example")
            async with mallory.get(link, headers=HTML) as resp:
                page = await resp.text()
            form = {**form_fields(page, "/_gate/team/join"), "email": "mallory@evil.example"}
            async with mallory.post(
                stack.url("/_gate/team/join"), data=form, headers=HTML, allow_redirects=False
            ) as resp:
                assert resp.status == 403, await resp.text()
            assert (await echo(stack, mallory))[0] == 402
            assert (await join(stack, bob, link)).status == 303
            status, seen = await echo(stack, bob)
            assert status == 200
            assert seen["x-gate-user"] == ["bob@firm.example"]
            assert seen["x-gate-team"] == [team]
            assert stack.services.teams is not None
            assert "mallory@evil.example" not in stack.services.teams.members


async def test_a_member_cannot_forge_the_team_headers(tmp_path: Path) -> None:
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            forged = {
                "X-Gate-Team": "cus_other",
                "X-Gate-Role": "owner",
                "X_Gate_Role": "owner",
                "X-Gate-User": "olga@firm.example",
            }
            status, seen = await echo(stack, bob, **forged)
            assert status == 200
            assert seen["x-gate-team"] == [team]
            assert seen["x-gate-role"] == ["member"]
            assert seen["x-gate-user"] == ["bob@firm.example"]
            assert "x_gate_role" not in seen


async def test_a_member_cannot_post_the_owners_forms(tmp_path: Path) -> None:
    async with team_with_two_members(tmp_path, seats=5) as (stack, owner, _, bob, carol):
        page = await account_page(stack, bob)
        assert "managed by olga@firm.example" in page
        assert 'id="manage-billing"' not in page and 'id="team-members"' not in page
        # Bob's own valid CSRF token, the owner's forms: refused (authorization).
        csrf = form_fields(page, "/_gate/logout")["csrf"]
        for action, fields in (
            ("team/invite", {"email": "eve@evil.example"}),
            ("team/remove", {"email": "carol@firm.example"}),
            ("team/seats/confirm", {"seats": "1"}),
        ):
            async with bob.post(
                stack.url(f"/_gate/{action}"),
                data={"csrf": csrf, **fields},
                headers=HTML,
                allow_redirects=False,
            ) as resp:
                assert resp.status == 403, (action, resp.status)
        # The owner's session, a forged cross-site form (no CSRF token): refused too.
        async with owner.post(
            stack.url("/_gate/team/remove"),
            data={"email": "carol@firm.example"},
            headers={**HTML, "Origin": "https://evil.example"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 403
        assert (await echo(stack, carol))[0] == 200
        teams = stack.services.teams
        assert teams is not None and set(teams.members) == {
            "bob@firm.example",
            "carol@firm.example",
        }


async def test_invitation_spam_is_rate_limited(tmp_path: Path) -> None:
    async with (
        team_stack(tmp_path, {"LOGIN_RATE_LIMIT": "3", "MAX_SEATS": "50"}) as stack,
        stack.session() as owner,
    ):
        await buy_seats(stack, owner, "olga@firm.example", 50)
        outcomes = [await invite(stack, owner, f"p{i}@spam.example") for i in range(5)]
        assert outcomes == ["invited"] * 3 + ["rate_limited"] * 2
        page = await account_page(stack, owner, "?team=rate_limited")
        assert "Too many invitations" in page


# --- the journeys ---------------------------------------------------------------------------------


async def test_three_seats_the_owner_and_two_members(tmp_path: Path) -> None:
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        sub = team_subscription(stack, team)
        assert sub["items"]["data"][0]["quantity"] == 3
        async with stack.session() as visitor:
            landing = await (await visitor.get(stack.url("/_gate/subscribe"), headers=HTML)).text()
        assert "$12.00 per seat / month" in landing
        assert 'name="seats"' in landing and 'max="20"' in landing
        page = await account_page(stack, owner)
        assert 'Seats used: <strong id="seats-used">1</strong> of <strong id="seats-paid">3' in page
        status, seen = await echo(stack, owner)
        assert seen["x-gate-role"] == ["owner"] and seen["x-gate-team"] == [team]
        bob = await member_joins(stack, owner, "bob@firm.example")
        assert await invite(stack, owner, "carol@firm.example") == "invited"  # pending counts
        assert await invite(stack, owner, "dave@firm.example") == "no_seat"
        page = await account_page(stack, owner, "?team=no_seat")
        assert "Every seat is taken" in page and "Add seats" in page
        async with bob:
            status, seen = await echo(stack, bob)
            assert status == 200
            assert seen["x-gate-team"] == [team]
            assert seen["x-gate-role"] == ["member"]
            assert seen["x-gate-status"] == ["active"]
            assert seen["x-gate-plan"] == [SEAT]
        page = await account_page(stack, owner)
        assert "bob@firm.example" in page and "carol@firm.example" in page


async def test_removing_a_member_ends_their_sessions_and_socket(tmp_path: Path) -> None:
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            ws = await bob.ws_connect(stack.url("/ws"))
            await ws.send_str("hello")
            assert (await ws.receive(timeout=DEADLINE)).type == aiohttp.WSMsgType.TEXT
            resp = await post_account_form(
                stack, owner, "team/remove", {"email": "bob@firm.example"}
            )
            assert resp.status == 303
            assert (await echo(stack, bob))[0] == 401  # at once, on this worker
            msg = await ws.receive(timeout=DEADLINE)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=DEADLINE)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            assert 4401 in (msg.data, ws.close_code), (msg, ws.close_code)
            await ws.close()


async def test_lowering_seats_below_the_members_is_refused_on_the_account_page(
    tmp_path: Path,
) -> None:
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            resp = await post_account_form(stack, owner, "team/seats", {"seats": "1"})
            assert resp.status == 303 and "seats_below_members" in resp.headers["Location"]
            page = await account_page(stack, owner, "?team=seats_below_members")
            assert "Remove members or invitations first" in page


async def test_fewer_seats_from_stripe_remove_the_newest_members(tmp_path: Path) -> None:
    async with team_with_two_members(tmp_path) as (stack, owner, team, bob, carol):
        sub = team_subscription(stack, team)
        item = sub["items"]["data"][0]["id"]
        # The dashboard (or the portal) lowers the quantity: a webhook tells the gate.
        await dashboard(
            stack,
            "POST",
            f"/v1/subscriptions/{sub['id']}",
            {"items[0][id]": item, "items[0][quantity]": "2"},
        )
        await until_status(stack, carol, 401)
        assert (await echo(stack, bob))[0] == 200
        page = await account_page(stack, owner)
        assert "Seats were lowered to 2 in Stripe: carol@firm.example lost access" in page


async def test_the_team_cancels_and_every_member_is_out(tmp_path: Path) -> None:
    async with team_with_two_members(tmp_path) as (stack, owner, team, bob, carol):
        sub = team_subscription(stack, team)
        await dashboard(stack, "DELETE", f"/v1/subscriptions/{sub['id']}")
        for member in (bob, carol):
            await until_status(stack, member, 401)
        assert (await echo(stack, owner))[0] == 402


async def test_own_subscription_and_membership_the_best_access_wins(tmp_path: Path) -> None:
    """Bob pays for Pro himself and is a member of a Team: he gets the best of the two (here
    both allow: the later end wins); once the team ends, his own subscription still lets him in."""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        own = stack.double.create_customer("bob@firm.example")
        stack.double.create_subscription(own["id"], "price_demo_yearly")
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            status, seen = await echo(stack, bob)
            assert status == 200
            # The yearly Pro ends later than the monthly Team: his own access is the best.
            assert seen["x-gate-plan"] == ["price_demo_yearly"]
            assert "x-gate-team" not in seen
            sub = team_subscription(stack, team)
            await dashboard(stack, "DELETE", f"/v1/subscriptions/{sub['id']}")
            async with stack.session() as again:
                await stack.sign_in(again, own["id"], "bob@firm.example")
                status, seen = await echo(stack, again)
                assert status == 200 and seen["x-gate-plan"] == ["price_demo_yearly"]


async def test_raising_seats_shows_stripes_prorated_preview_then_changes_the_quantity(
    tmp_path: Path,
) -> None:
    """3 → 5 seats: the preview is Stripe's (the double prorates as Stripe documents for
    create_prorations: the remaining share of the period, old quantity credited, new charged),
    the confirmation updates the item's quantity and the Team section says 5."""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        sub = team_subscription(stack, team)
        start, end = stack.double.period(sub)
        resp = await post_account_form(stack, owner, "team/seats", {"seats": "5"})
        assert resp.status == 200
        page = await resp.text()
        assert "Change seats from 3 to 5" in page
        # Computed here from the double's clock as Stripe documents it; the page rounds to cents.
        share = (end - stack.double.now()) / (end - start)
        expected = round(1200 * 5 * share) - round(1200 * 3 * share)
        assert f"${expected / 100:.2f}" in page, (expected, page)
        # the next invoice: 5 seats at $12, plus the proration
        assert f"${(6000 + expected) / 100:.2f}" in page
        confirm = form_fields(page, "/_gate/team/seats/confirm")
        async with owner.post(
            stack.url("/_gate/team/seats/confirm"),
            data=confirm,
            headers=HTML,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303, await resp.text()
        assert sub["items"]["data"][0]["quantity"] == 5
        page = await account_page(stack, owner)
        assert 'id="seats-paid">5<' in page


async def test_the_preview_is_an_invoice_with_proration_lines(tmp_path: Path) -> None:
    """The double's create_preview through the real stripe library: Stripe's invoice shape, and
    Stripe's error shape for a bad item."""
    import stripe

    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 2)
        sub = team_subscription(stack, team)
        item = sub["items"]["data"][0]["id"]
        async with stripe_library(stack.double.public_url, API_KEY) as client:
            inv = await client.v1.invoices.create_preview_async(
                {
                    "customer": team,
                    "subscription": sub["id"],
                    "subscription_details": {
                        "items": [{"id": item, "quantity": 4}],
                        "proration_behavior": "create_prorations",
                    },
                }
            )
            assert inv.object == "invoice"
            prorations = [
                line
                for line in inv.lines.data
                if line.parent
                and line.parent.subscription_item_details
                and line.parent.subscription_item_details.proration
            ]
            assert [line.quantity for line in prorations] == [2, 4]
            assert prorations[0].amount < 0 < prorations[1].amount
            try:
                await client.v1.invoices.create_preview_async(
                    {
                        "subscription": sub["id"],
                        "subscription_details": {"items": [{"id": "si_nope", "quantity": 4}]},
                    }
                )
            except stripe.InvalidRequestError as exc:
                assert exc.param == "subscription_details[items][0]"
            else:
                raise AssertionError("a bad item was previewed")


async def test_the_team_cli_lists_adds_and_removes_members(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway team`` on the running gate's store: a member added from the CLI gets in; one
    removed from it is refused (on SQLite: within L1_TTL, as any revocation from another
    process)."""
    async with team_stack(tmp_path, {"L1_TTL": "1s"}) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        settings = stack.settings

        async def cli(*words: str) -> int:
            return await admin.run("team", argparse.Namespace(words=list(words)), settings)

        assert await cli("add", team, "bob@firm.example") == 0
        assert await cli(team) == 0
        out = capsys.readouterr().out
        assert "bob@firm.example: added" in out
        assert f"team {team}: 2 of 3 seats used" in out and "member   bob@firm.example" in out
        async with stack.session() as bob:
            # Bob signs in with an ordinary email link: a member without a customer of his own.
            await confirm_email(stack, bob, "bob@firm.example")
            status, seen = await echo(stack, bob)
            assert status == 200 and seen["x-gate-role"] == ["member"]
            assert await cli("remove", team, "bob@firm.example") == 0
            await until_status(stack, bob, 401)
        assert await cli("remove", team, "bob@firm.example") == 1
        assert await cli("frobnicate") == 1  # not a customer


async def test_lowering_seats_in_the_portal_below_the_members(tmp_path: Path) -> None:
    """The owner lowers the quantity in the portal (subscription_update with quantity) below
    the people in the team: Stripe allows it; the webhook takes access from the newest member
    and the owner's Team section says who and why."""
    async with team_with_two_members(tmp_path) as (stack, owner, team, bob, carol):
        portal = await open_portal(stack, owner)
        async with owner.get(portal, headers=HTML) as resp:
            assert 'id="update-quantity' in await resp.text()
        sub = team_subscription(stack, team)
        async with owner.post(
            f"{portal}/subscriptions/{sub['id']}/update-quantity",
            data={"quantity": "2"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303, await resp.text()
        assert sub["items"]["data"][0]["quantity"] == 2
        await until_status(stack, carol, 401)
        assert (await echo(stack, bob))[0] == 200
        page = await account_page(stack, owner)
        assert "carol@firm.example lost access (newest members first)" in page
        assert 'id="seats-paid">2<' in page


async def test_a_members_own_subscription_ends_their_member_sessions(tmp_path: Path) -> None:
    """Bob, a member, pays for his own subscription (his email on Checkout): his member
    sessions end (he signs in again and gets the best of both)."""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob, stack.session() as bobs_laptop:
            assert (await echo(stack, bob))[0] == 200
            resp = await stack.subscribe(bobs_laptop, "bob@firm.example", price="price_demo_yearly")
            assert resp.status == 303
            await until_status(stack, bob, 401)
            assert (await echo(stack, bobs_laptop))[0] == 200


async def test_seat_counts_out_of_range_are_refused_as_stripe_and_the_gate_do(
    tmp_path: Path,
) -> None:
    """The landing page refuses 0 or more than MAX_SEATS seats with a page saying the range
    (nothing sent to Stripe); the double refuses a quantity outside adjustable_quantity as
    Stripe does (its error shape, through the real library)."""
    import stripe

    async with team_stack(tmp_path) as stack, stack.session() as visitor:
        async with visitor.get(stack.url("/_gate/subscribe"), headers=HTML) as resp:
            page = await resp.text()
        for seats in ("0", "21", "x"):
            form = {**checkout_form(page, SEAT), "seats": seats}
            async with visitor.post(
                stack.url("/_gate/checkout"), data=form, headers=HTML, allow_redirects=False
            ) as resp:
                assert resp.status == 400
                assert "1 to 20 seats" in await resp.text()
        assert not stack.double.checkout_sessions
        async with stripe_library(stack.double.public_url, API_KEY) as client:
            line: dict[str, Any] = {
                "price": SEAT,
                "quantity": 30,
                "adjustable_quantity": {"enabled": True, "minimum": 1, "maximum": 20},
            }
            try:
                params: Any = {
                    "mode": "subscription",
                    "success_url": "http://x/",
                    "line_items": [line],
                }
                await client.v1.checkout.sessions.create_async(params)
            except stripe.InvalidRequestError as exc:
                assert exc.param == "line_items[0][quantity]"
            else:
                raise AssertionError("a quantity above the maximum was accepted")
