"""What the teams' tests share: a stack selling a $12 seat price beside the demo's plans, and the
steps of an owner (buy seats, invite, remove) and of an invitee (open the link, join)."""

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

from gateway.demo.stripe_double.state import DEFAULT_PRICES
from gateway.mailer import LogMailer
from tests.stack import Stack, checkout_form, form_fields, pay_as_browser, running_stack

SEAT = "price_team_seat"
SEAT_PRICE: dict[str, Any] = {
    "id": SEAT,
    "unit_amount": 1200,
    "currency": "usd",
    "nickname": "Team monthly",
    "recurring": {"interval": "month"},
    "product": "prod_team",
    "product_name": "PatentLLM Team",
    "marketing_features": ["Patent search", "One invoice for the firm"],
}
ENV = {
    "STRIPE_PRICE_IDS": f"{SEAT},price_demo_monthly,price_demo_yearly",
    "SEAT_PRICE_IDS": SEAT,
    "MAX_SEATS": "20",
}
HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}


def team_subscription(stack: Stack, team: str) -> dict[str, Any]:
    """The team's one subscription, as the double holds it (changes to it show here)."""
    [sub] = [s for s in stack.double.subscriptions.values() if s["customer"] == team]
    return sub


async def dashboard(
    stack: Stack, method: str, path: str, data: dict[str, str] | None = None
) -> None:
    """What the Stripe Dashboard does: a call to the double's own API (its webhooks follow)."""
    async with (
        aiohttp.ClientSession() as api,
        api.request(
            method,
            f"{stack.double.public_url}{path}",
            data=data,
            headers={"Authorization": "Bearer sk_test_stack"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


@asynccontextmanager
async def team_stack(tmp_path: Path, env: dict[str, str] | None = None) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path, {**ENV, **(env or {})}, double_kwargs={"prices": [SEAT_PRICE, *DEFAULT_PRICES]}
    ) as stack:
        yield stack


async def buy_seats(stack: Stack, client: aiohttp.ClientSession, email: str, seats: int) -> str:
    """The landing page's seat chooser → Checkout → pay → success; the owner's customer id."""
    await pay_as_browser(
        client, stack.url, email, lambda page: {**checkout_form(page, SEAT), "seats": str(seats)}
    )
    async with client.get(stack.url("/_gate/api/me"), headers=JSON) as resp:
        customer_id = (await resp.json())["customer_id"]
    assert isinstance(customer_id, str)
    return customer_id


class TwoMembers(NamedTuple):
    """A team owned by olga@firm.example that bob@ and then carol@firm.example joined: the
    stack, the browsers of the three (open), and the team's customer id."""

    stack: Stack
    owner: aiohttp.ClientSession
    team: str
    bob: aiohttp.ClientSession
    carol: aiohttp.ClientSession


@asynccontextmanager
async def team_with_two_members(tmp_path: Path, seats: int = 3) -> AsyncIterator[TwoMembers]:
    """:func:`team_stack` with Olga's team of ``seats`` seats, Bob and Carol members (Carol
    the newest)."""
    async with team_stack(tmp_path) as stack, stack.session() as owner:
        team = await buy_seats(stack, owner, "olga@firm.example", seats)
        bob = await member_joins(stack, owner, "bob@firm.example")
        carol = await member_joins(stack, owner, "carol@firm.example")
        async with bob, carol:
            yield TwoMembers(stack, owner, team, bob, carol)


async def account_page(stack: Stack, client: aiohttp.ClientSession, query: str = "") -> str:
    async with client.get(stack.url("/_gate/account" + query), headers=HTML) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


async def post_account_form(
    stack: Stack, client: aiohttp.ClientSession, action: str, fields: dict[str, str]
) -> aiohttp.ClientResponse:
    """POST one of the account page's forms (with its CSRF token) and ``fields``; the response
    (read)."""
    page = await account_page(stack, client)
    form = {**form_fields(page, f"/_gate/{action}"), **fields}
    resp = await client.post(
        stack.url(f"/_gate/{action}"), data=form, headers=HTML, allow_redirects=False
    )
    await resp.read()
    return resp


async def invite(stack: Stack, owner: aiohttp.ClientSession, email: str) -> str:
    """The owner's Invite form; the outcome the account page is sent back with."""
    resp = await post_account_form(stack, owner, "team/invite", {"email": email})
    assert resp.status == 303, resp.status
    found = re.search(r"team=([a-z_]+)", resp.headers["Location"])
    assert found, resp.headers["Location"]
    return found.group(1)


def invitation_link(stack: Stack, email: str) -> str:
    mailer = stack.services.mailer
    assert isinstance(mailer, LogMailer)
    links = [link for to, link in mailer.sent if to == email and "/team/join" in link]
    assert links, (email, mailer.sent)
    return links[-1]


async def join(stack: Stack, client: aiohttp.ClientSession, link: str) -> aiohttp.ClientResponse:
    """Open the invitation (its page) and press Join; the POST's response (read)."""
    async with client.get(link, headers=HTML) as resp:
        page = await resp.text()
        status = resp.status
    if status != 200:  # a used link: its page has no form; post the token as a browser would
        token = link.rsplit("token=", 1)[1]
        async with client.get(stack.url("/_gate/login"), headers=HTML) as resp:
            csrf = form_fields(await resp.text(), "/_gate/login")["csrf"]
        form = {"csrf": csrf, "token": token}
    else:
        form = form_fields(page, "/_gate/team/join")
    resp = await client.post(
        stack.url("/_gate/team/join"), data=form, headers=HTML, allow_redirects=False
    )
    await resp.read()
    return resp


async def member_joins(
    stack: Stack, owner: aiohttp.ClientSession, email: str
) -> aiohttp.ClientSession:
    """``owner`` invites ``email``, who joins from a browser of their own (returned, open)."""
    assert await invite(stack, owner, email) == "invited"
    client = stack.session()
    resp = await join(stack, client, invitation_link(stack, email))
    assert resp.status == 303, resp.status
    return client


async def echo(
    stack: Stack, client: aiohttp.ClientSession, **headers: str
) -> tuple[int, dict[str, list[str]]]:
    """``/api/echo`` through the gate: the status and the headers the app saw."""
    async with client.get(stack.url("/api/echo"), headers={**JSON, **headers}) as resp:
        if resp.status != 200:
            return resp.status, {}
        body = await resp.json()
    seen: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return 200, seen
