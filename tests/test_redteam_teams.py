"""Red team of teams and seats (issue 21) with usage quotas (issue 19): the attacker's (or the
unlucky app's) requests against real servers (gate, demo app, Stripe double on 127.0.0.1)."""

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from gateway.mailer import LogMailer
from tests.stack import Stack, form_fields, request_link
from tests.teams import (
    HTML,
    SEAT,
    buy_seats,
    echo,
    invitation_link,
    invite,
    member_joins,
    post_account_form,
    team_stack,
)
from tests.test_usage import SECRET, post_usage

USAGE = {
    "USAGE_RULES": "/api/echo/analyze*=analysis",
    "USAGE_METERS": "analysis_tokens",
    "USAGE_REPORT_SECRET": SECRET,
    "TRUSTED_PROXIES": "127.0.0.1/32",
}


async def report(stack: Stack, user: str, report_id: str, value: int = 5) -> tuple[int, Any]:
    """The README's Streamlit snippet: ``POST /_gate/usage`` with the ``X-Gate-User`` the app
    received."""
    body = {"user": user, "meter": "analysis_tokens", "value": value, "id": report_id}
    return await post_usage(stack, body, SECRET)


async def used(stack: Stack, customer_id: str) -> dict[str, int]:
    usage = stack.services.usage
    assert usage is not None
    await usage.counters.flush()
    return {r.meter: r.used for r in await usage.sql.periods_of(customer_id, usage.clock.time())}


async def test_a_members_usage_report_counts_on_the_team(tmp_path: Path) -> None:
    """A Streamlit app reports a member's work with the ``X-Gate-User`` it got — the member's
    email. Before, every such report was refused (400: ``cus_…`` only): a team's members used
    the app unmetered and unbilled. After the member's removal the report counts nowhere."""
    async with (
        team_stack(tmp_path, USAGE) as stack,
        stack.session() as owner,
    ):
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            status, seen = await echo(stack, bob)
            assert status == 200
            user = seen["x-gate-user"][0]
            assert user == "bob@firm.example"
            assert await report(stack, user, "r1") == (200, {"counted": True})
            assert await report(stack, user, "r1") == (200, {"counted": False})
            assert await used(stack, team) == {"analysis_tokens": 5}
            # The owner's own reports (X-Gate-User = the customer id) pool with the member's.
            assert await report(stack, team, "r2") == (200, {"counted": True})
            assert await used(stack, team) == {"analysis_tokens": 10}
            resp = await post_account_form(
                stack, owner, "team/remove", {"email": "bob@firm.example"}
            )
            assert resp.status == 303
            status, answer = await report(stack, user, "r3")
            assert status == 404 and answer["error"] == "unknown_user"
            assert await used(stack, team) == {"analysis_tokens": 10}
        # An address that is nobody's: the same 404.
        status, answer = await report(stack, "nobody@else.example", "r4")
        assert status == 404 and answer["error"] == "unknown_user"


async def test_an_invitation_posted_by_eight_browsers_at_once_joins_one(
    tmp_path: Path, database_env: dict[str, str]
) -> None:
    """The link forwarded around and pressed at once in eight browsers: exactly one joins
    (the store's conditional update), the others get the "already used" page and no
    session."""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        assert await invite(stack, owner, "bob@firm.example") == "invited"
        link = invitation_link(stack, "bob@firm.example")
        browsers = [stack.session() for _ in range(8)]
        try:
            forms = []
            for client in browsers:
                async with client.get(link, headers=HTML) as resp:
                    forms.append(form_fields(await resp.text(), "/_gate/team/join"))

            async def press(client: aiohttp.ClientSession, form: dict[str, str]) -> int:
                async with client.post(
                    stack.url("/_gate/team/join"), data=form, headers=HTML, allow_redirects=False
                ) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(
                *(press(c, f) for c, f in zip(browsers, forms, strict=True))
            )
            assert sorted(statuses) == [303] + [400] * 7, statuses
            allowed = [(await echo(stack, c))[0] for c in browsers]
            assert sorted(allowed) == [200] + [401] * 7
            assert stack.services.teams is not None
            assert list(stack.services.teams.members) == ["bob@firm.example"]
        finally:
            for client in browsers:
                await client.close()


async def test_a_member_by_identity_header_is_never_the_owner(tmp_path: Path) -> None:
    """Behind an auth proxy (``IDENTITY_HEADER``), a member added by another process (the
    CLI's ``gateway team add``, another worker's join: this worker's in-memory map does not
    know yet) must be a member: before, the gate told the app ``X-Gate-Role: owner`` for them
    until the map's next reload (``L1_TTL``). The owner's forms refused them already (held)."""
    env = {"IDENTITY_HEADER": "X-Forwarded-Email", "L1_TTL": "1h"}
    async with team_stack(tmp_path, env) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 4)
        carol = await member_joins(stack, owner, "carol@firm.example")
        await carol.close()
        teams = stack.services.teams
        assert teams is not None
        # Another process adds Bob (the store; this worker's map is not told).
        added = await stack.services.store.add_member(
            team, "bob@firm.example", 4, stack.services.clock.now()
        )
        assert added == "added"
        async with stack.session(headers={"X-Forwarded-Email": "bob@firm.example"}) as bob:
            status, seen = await echo(stack, bob)
            assert status == 200
            assert (seen["x-gate-team"], seen["x-gate-role"]) == ([team], ["member"])
            page = await (await bob.get(stack.url("/_gate/account"), headers=HTML)).text()
            csrf = form_fields(page, "/_gate/logout")["csrf"]
            async with bob.post(
                stack.url("/_gate/team/remove"),
                data={"csrf": csrf, "email": "carol@firm.example"},
                headers=HTML,
                allow_redirects=False,
            ) as resp:
                assert resp.status == 403, resp.headers.get("Location")
        assert "carol@firm.example" in teams.members


async def test_a_member_cannot_mint_a_key_that_outlives_the_membership(tmp_path: Path) -> None:
    """A member posts the API-key form (with a valid CSRF token): no key acts as the team —
    so none can outlive their removal. (Held: a member's session names no customer.)"""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            page = await (await bob.get(stack.url("/_gate/account"), headers=HTML)).text()
            csrf = form_fields(page, "/_gate/logout")["csrf"]
            async with bob.post(
                stack.url("/_gate/api-keys"),
                data={"csrf": csrf, "name": "mine", "expires": "none"},
                headers=HTML,
                allow_redirects=False,
            ) as resp:
                text = await resp.text()
                assert "gk_test_" not in text and resp.status in (303, 403), resp.status
        keys = stack.services.apikeys
        assert keys is not None
        for customer in {c["id"] for c in stack.double.customers.values()}:
            assert await keys.of_customer(str(customer)) == []


def mails_to(stack: Stack, email: str) -> int:
    mailer = stack.services.mailer
    assert isinstance(mailer, LogMailer)
    return sum(1 for to, _ in mailer.sent if to == email)


async def test_re_inviting_one_address_does_not_mail_it_again_and_again(tmp_path: Path) -> None:
    """A new invitation of the same address replaces the pending one (no seat spent), so an
    owner could mail a victim ``LOGIN_RATE_LIMIT`` invitations a minute, forever (7,200 a
    day at the default). An address gets an invitation mail at most once per
    ``LOGIN_LINK_COOLDOWN``, as a sign-in link."""
    env = {"LOGIN_RATE_LIMIT": "20"}
    async with team_stack(tmp_path, env) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 3)
        outcomes = [await invite(stack, owner, "victim@else.example") for _ in range(6)]
        assert outcomes == ["invited"] + ["rate_limited"] * 5
        assert mails_to(stack, "victim@else.example") == 1
        # Nor through its other spellings (one inbox: ``+tags``, Gmail's dots).
        assert await invite(stack, owner, "victim+2@else.example") == "rate_limited"
        assert await invite(stack, owner, "Victim+x@Else.Example") == "rate_limited"
        # Other addresses are not held up by it.
        assert await invite(stack, owner, "bob@firm.example") == "invited"


async def test_invitations_leave_sign_in_links_their_half_of_the_mail_budget(
    tmp_path: Path,
) -> None:
    """Invitations spend the gate's global mail budget (``LOGIN_EMAILS_PER_MINUTE``). Owners
    who invite must not take all of it: before, six teams (five invitations a minute each at
    the defaults) held every sign-in link of every user refused (``global_cap``). Invitations
    take only the shared half; the other half stays for sign-in from networks that had none."""
    env = {"LOGIN_EMAILS_PER_MINUTE": "4", "LOGIN_RATE_LIMIT": "20"}
    async with team_stack(tmp_path, env) as stack, stack.session() as owner:
        await buy_seats(stack, owner, "olga@firm.example", 10)
        outcomes = [await invite(stack, owner, f"p{i}@firm.example") for i in range(4)]
        assert outcomes == ["invited"] * 2 + ["rate_limited"] * 2
        stack.double.create_customer("user@example.com")
        async with stack.session() as user:
            await request_link(stack, user, "user@example.com")
        assert mails_to(stack, "user@example.com") == 1


async def test_members_get_the_seat_subscription_not_the_owners_own_plan(tmp_path: Path) -> None:
    """The owner pays for seats of one price and, for themselves, another plan: the members'
    access is the seat subscription's, never the owner's personal plan. (Held.)"""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", 3)
        bob = await member_joins(stack, owner, "bob@firm.example")
        async with bob:
            status, seen = await echo(stack, bob)
            assert status == 200 and seen["x-gate-plan"] == [SEAT]
            stack.double.create_subscription(team, "price_demo_yearly")  # the owner's own plan
            stack.services.entitlements.forget(team)
            status, seen = await echo(stack, bob)
            assert status == 200
            assert seen["x-gate-plan"] == [SEAT], seen.get("x-gate-plan")
            assert seen["x-gate-role"] == ["member"]
