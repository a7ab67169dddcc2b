"""Sign-out signs out: the attacker's replay of a ``gate_session`` cookie copied
before sign-out, on the same gate and on a second gate sharing the DATABASE_PATH (after
``L1_TTL``); sign out everywhere; a new session on every sign-in; the account page's list.

Everything runs against real servers (tests/stack.py): the demo upstream, the Stripe double and
the gate; the second gate is another app instance on the same settings and database file, with
its own in-process caches, as a second worker would be.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.mailer import LogMailer
from gateway.server import runner_kwargs
from gateway.settings import SESSION_COOKIE
from tests.stack import (
    Stack,
    follow_link,
    form_fields,
    replay,
    request_link,
    running_stack,
    session_value,
    until_refused,
)

HTML = {"Accept": "text/html"}
#: Short enough for the test to wait it out, long enough for the cache to be in play.
L1_TTL = "1s"
DEADLINE = 30.0  # seconds: a bound for waiting, never an assertion on timing


async def post_account_form(stack: Stack, client: aiohttp.ClientSession, action: str) -> int:
    """Press a button of the account page (``/_gate/logout`` or ``/_gate/logout/everywhere``)
    with the page's own CSRF token; the status of the answer."""
    async with client.get(stack.url("/_gate/account"), headers=HTML) as resp:
        assert resp.status == 200, resp.status
        page = await resp.text()
    form = form_fields(page, action)
    async with client.post(stack.url(action), data=form, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


@asynccontextmanager
async def second_gate(stack: Stack) -> AsyncIterator[str]:
    """Another gate on the same settings and DATABASE_PATH (a second worker); its base URL."""
    server = TestServer(
        create_app(stack.settings, stripe_factory=stack.stripe_factory), host="127.0.0.1"
    )
    await server.start_server(**runner_kwargs(stack.settings))
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_a_cookie_copied_before_sign_out_is_refused_after_it(tmp_path: Path) -> None:
    async with running_stack(tmp_path, {"L1_TTL": L1_TTL}) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "victim@example.com")
        assert resp.status == 303
        stolen = session_value(client)
        assert await replay(stack.base, stolen) == 200  # the copy works while signed in
        assert await replay(stack.base, stolen) == 200  # (and from the remembered verdict)
        assert await post_account_form(stack, client, "/_gate/logout") == 303
        # Same worker: refused at once, no waiting for a cache to expire.
        assert await replay(stack.base, stolen) in (401, 402, 303)
        assert await replay(stack.base, stolen, "/") in (401, 402, 303)


async def test_sign_out_reaches_a_second_gate_within_l1_ttl(tmp_path: Path) -> None:
    async with running_stack(tmp_path, {"L1_TTL": L1_TTL}) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "victim2@example.com")
        assert resp.status == 303
        stolen = session_value(client)
        async with second_gate(stack) as other:
            # The second worker knows the session too (and caches its verdict).
            assert await replay(other, stolen) == 200
            assert await replay(other, stolen) == 200
            assert await post_account_form(stack, client, "/_gate/logout") == 303
            assert await replay(stack.base, stolen) != 200
            # The other worker did not hear of it: it stops once its cache entry ends.
            assert await until_refused(other, stolen) in (401, 402, 303)


async def test_sign_out_everywhere_ends_every_session_of_that_user_only(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path, {"L1_TTL": L1_TTL}) as stack,
        stack.session() as laptop,
        stack.session() as phone,
        stack.session() as stranger,
    ):
        assert (await stack.subscribe(laptop, "many@example.com")).status == 303
        customer = (await stack.services.store.customer_ids_for_email("many@example.com"))[0]
        await stack.sign_in(phone, customer, "many@example.com", user_agent="Firefox/120 Android")
        assert (await stack.subscribe(stranger, "other@example.com")).status == 303
        phone_cookie, laptop_cookie = session_value(phone), session_value(laptop)
        stranger_cookie = session_value(stranger)
        async with second_gate(stack) as other:
            for value in (phone_cookie, laptop_cookie, stranger_cookie):
                assert await replay(stack.base, value) == 200
                assert await replay(other, value) == 200
            assert await post_account_form(stack, laptop, "/_gate/logout/everywhere") == 303
            # The landing page says so (as it does after a plain sign-out).
            async with laptop.get(
                stack.url("/_gate/subscribe?signed_out=everywhere"), headers=HTML
            ) as resp:
                assert 'id="signed-out">You are signed out on every device.<' in await resp.text()
            for value in (phone_cookie, laptop_cookie):
                assert await replay(stack.base, value) != 200
                assert await until_refused(other, value) in (401, 402, 303)
            # Somebody else's session is untouched, on both workers.
            assert await replay(stack.base, stranger_cookie) == 200
            assert await replay(other, stranger_cookie) == 200
        assert await stack.services.sessions.active(customer) == []


async def test_every_sign_in_gets_a_new_session_id(tmp_path: Path) -> None:
    """No fixation: signing in (Checkout, then the email link, twice) never keeps the cookie
    the browser came with, nor reuses an id; the browser's previous session is replaced."""
    async with running_stack(tmp_path) as stack, stack.session() as client:
        assert (await stack.subscribe(client, "fix@example.com")).status == 303
        values = [session_value(client)]
        mailer = stack.services.mailer
        assert isinstance(mailer, LogMailer)
        for _ in range(2):
            await request_link(stack, client, "fix@example.com")
            _, link = mailer.sent[-1]
            assert (await follow_link(stack, client, link)).status == 303
            values.append(session_value(client))
        assert len(set(values)) == 3
        customer = (await stack.services.store.customer_ids_for_email("fix@example.com"))[0]
        handles = {stack.services.sessions.handle_of(v) for v in values}
        assert len(handles) == 3
        active = [row.id_hash for row in await stack.services.sessions.active(customer)]
        assert active == [stack.services.sessions.handle_of(values[-1])]
        assert await replay(stack.base, values[-1]) == 200
        for value in values[:-1]:  # the replaced sessions no longer get in
            assert await replay(stack.base, value) != 200


async def test_the_account_page_lists_the_active_sessions(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path) as stack,
        stack.session(
            headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"}
        ) as laptop,
        stack.session() as phone,
    ):
        assert (await stack.subscribe(laptop, "list@example.com")).status == 303
        customer = (await stack.services.store.customer_ids_for_email("list@example.com"))[0]
        ua = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1"
        await stack.sign_in(phone, customer, "list@example.com", user_agent=ua)
        async with laptop.get(stack.url("/_gate/account"), headers=HTML) as resp:
            page = await resp.text()
        assert 'id="sessions"' in page
        assert 'Chrome on Linux <span class="small">(this device)</span>' in page
        assert "Safari on iOS</td>" in page  # the other device, not marked as this one
        assert page.count('<tr class="session') == 2
        assert 'id="sign-out-everywhere"' in page
        form = form_fields(page, "/_gate/logout/everywhere")
        assert form.get("csrf")
        # The button is CSRF-protected like the other forms: without the token, nothing ends.
        async with laptop.post(
            stack.url("/_gate/logout/everywhere"), data={}, allow_redirects=False
        ) as resp:
            assert resp.status in (400, 403)
        assert len(await stack.services.sessions.active(customer)) == 2


async def test_sign_out_closes_a_socket_opened_with_a_copied_cookie(tmp_path: Path) -> None:
    """The revocation is announced (Changes.session): the watch closes that user's open
    WebSockets at once, including one the attacker opened with the copied cookie."""
    env = {"WS_RECHECK_INTERVAL": "1h"}  # no periodic re-check: only the announcement acts
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        assert (await stack.subscribe(client, "ws-victim@example.com")).status == 303
        stolen = session_value(client)
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as attacker,
            attacker.ws_connect(
                stack.url("/ws"), headers={"Cookie": f"{SESSION_COOKIE}={stolen}"}
            ) as ws,
        ):
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=DEADLINE) == "hello"
            assert await post_account_form(stack, client, "/_gate/logout") == 303
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == 4401
