"""Functional flows: the whole product on 127.0.0.1 (demo upstream, Stripe double, gate), spoken
to over real HTTP by clients with their own cookie jars ("browsers").

Each test starts its own stack (``tests.stack.running_stack``) with the settings it is about.
Waiting is always a poll against a deadline (``tests.conftest.eventually``), never a fixed
sleep.
"""

import asyncio
import html
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from gateway.demo.stripe_double import DEFAULT_PRICES
from gateway.mailer import LogMailer
from gateway.settings import SESSION_COOKIE
from tests.conftest import eventually
from tests.probes import probe_upstream_app
from tests.stack import (
    Stack,
    confirm_email,
    echoed_headers,
    follow_link,
    form_fields,
    me,
    open_portal,
    page_form,
    portal_action,
    request_link,
    running_stack,
    status_of,
    subscribed,
)

HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
PRICE = "price_demo_monthly"
OTHER_PRICE: dict[str, Any] = {
    "id": "price_other_monthly",
    "unit_amount": 900,
    "currency": "usd",
    "nickname": "Other",
    "recurring": {"interval": "month"},
    "product": "prod_other",
    "product_name": "Another Product",
}


# --------------------------------------------------------------------------- helpers


def subscription_id(stack: Stack, customer_id: str) -> str:
    subs = stack.double.customer_subscriptions(customer_id)
    assert len(subs) == 1
    return str(subs[0]["id"])


def paying_customer(stack: Stack, email: str, price: str = PRICE) -> str:
    """A customer with an active subscription, seeded on the double (no events)."""
    customer_id = str(stack.double.create_customer(email)["id"])
    stack.double.create_subscription(customer_id, price)
    return customer_id


def stripe_reads(stack: Stack) -> int:
    return sum(1 for _, path in stack.double.calls if path == "/v1/subscriptions")


def recording_upstream() -> tuple[web.Application, list[str]]:
    """The demo upstream app, recording the raw path of every request it receives."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.raw_path)
        response: web.StreamResponse = await handler(request)
        return response

    app = probe_upstream_app()
    app.middlewares.append(record)
    return app, seen


async def raw_get(port: int, raw_target: str) -> int:
    """GET ``raw_target`` exactly as written (no client-side normalization); the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {raw_target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Accept: application/json\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def pay(client: aiohttp.ClientSession, checkout_url: str, email: str) -> str:
    """Pay on the double's Checkout page; the gate's success URL it redirects to."""
    async with client.post(
        f"{checkout_url}/pay", data={"email": email}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
        return resp.headers["Location"]


def has_session_cookie(client: aiohttp.ClientSession) -> bool:
    return any(c.key == SESSION_COOKIE for c in client.cookie_jar)


# --------------------------------------------------------------------------- 1. landing


async def test_anonymous_browser_is_sent_to_landing_with_plan_price_and_sign_in(
    tmp_path: Path,
) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(stack.url("/"), headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/_gate/subscribe?next=/"
        async with client.get(stack.url("/_gate/subscribe?next=/"), headers=HTML) as resp:
            assert resp.status == 200
            page = await resp.text()
        assert '<h2 id="plan-name">PatentLLM Pro</h2>' in page
        assert '<p class="price" id="plan-price">$19.00 / month</p>' in page
        assert re.search(r'<a id="signin" href="/_gate/login\?next=/">Sign in</a>', page)
        assert form_fields(page, "/_gate/checkout")["next"] == "/"


# --------------------------------------------------------------------------- 2. paid journey


async def test_checkout_sets_session_cookie_and_app_works(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "alice@example.com", "/?q=laser")
        assert resp.status == 303
        assert resp.headers["Location"] == "/?q=laser"
        cookie = resp.cookies[SESSION_COOKIE]
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Lax"
        assert cookie["path"] == "/"
        async with client.get(stack.url("/?q=laser"), headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 200
            assert "text/html" in resp.headers["Content-Type"]
            assert "/api/search" in await resp.text()  # the app's own page
        async with client.get(stack.url("/api/search?q=laser"), headers=JSON) as resp:
            assert resp.status == 200
            assert (await resp.json())["query"] == "laser"


async def test_upstream_gets_gate_headers_but_never_the_gate_cookie(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client, "alice@example.com")
        async with client.get(
            stack.url("/api/echo"),
            headers={**JSON, "X-Gate-User": "cus_evil", "X-Gate-Role": "admin"},
            cookies={"theme": "dark"},
        ) as resp:
            assert resp.status == 200
            headers = echoed_headers(await resp.json())
        cookies = "; ".join(headers.get("cookie", []))
        assert "theme=dark" in cookies  # the app's own cookies pass
        assert SESSION_COOKIE not in cookies
        assert headers["x-gate-user"] == [customer_id]
        # The email typed on Stripe's Checkout page is not verified: not told to the app...
        assert "x-gate-email" not in headers
        assert headers["x-gate-status"] == ["active"]
        assert headers["x-gate-plan"] == [PRICE]
        assert "x-gate-role" not in headers  # every client-sent X-Gate-* header is dropped
        # ...until the user signs in with it (the emailed link proves the address).
        await confirm_email(stack, client, "alice@example.com")
        async with client.get(stack.url("/api/echo"), headers=JSON) as resp:
            headers = echoed_headers(await resp.json())
        assert headers["x-gate-user"] == [customer_id]
        assert headers["x-gate-email"] == ["alice@example.com"]


# --------------------------------------------------------------------------- 3. denials


async def test_signed_in_user_without_subscription_gets_402_json(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client)
        await stack.double.cancel_subscription(subscription_id(stack, customer_id))
        async with client.get(
            stack.url("/api/search?q=x"), headers=JSON, allow_redirects=False
        ) as resp:
            assert resp.status == 402
            body = await resp.json()
        assert body["error"] == "subscription_required"
        assert body["subscribe_url"].startswith("/_gate/subscribe")
        # A browser's POST (form submit, fetch) gets JSON too, never a redirect.
        async with client.post(
            stack.url("/api/echo"), headers=HTML, data=b"x", allow_redirects=False
        ) as resp:
            assert resp.status == 402
            assert (await resp.json())["error"] == "subscription_required"


async def test_anonymous_api_and_browser_post_get_401_json(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        async with client.get(
            stack.url("/api/search?q=x"), headers=JSON, allow_redirects=False
        ) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "login_required"
        async with client.post(
            stack.url("/api/echo"), headers=HTML, data=b"x", allow_redirects=False
        ) as resp:
            assert resp.status == 401
            assert "Location" not in resp.headers
            assert (await resp.json())["error"] == "login_required"


async def test_anonymous_websocket_is_refused_before_upgrade(tmp_path: Path) -> None:
    upstream, seen = recording_upstream()
    async with running_stack(tmp_path, upstream_app=upstream) as stack, stack.session() as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await client.ws_connect(stack.url("/ws"))
        assert err.value.status == 401
        assert "/ws" not in seen


async def test_paid_user_websocket_echoes(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        async with client.ws_connect(stack.url("/ws"), protocols=["chat.v1"]) as ws:
            assert ws.protocol == "chat.v1"
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "hello"
            await ws.send_bytes(b"\x00\x01")
            assert await ws.receive_bytes(timeout=5) == b"\x00\x01"


async def test_paid_user_sse_streams_events(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        async with client.get(
            stack.url("/api/stream?n=3&delay=0.05"), headers={"Accept": "text/event-stream"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(resp.content.readline(), 5)
            assert first == b"id: 0\n"  # the first event arrives before the stream ends
            rest = (await asyncio.wait_for(resp.content.read(), 5)).decode()
        assert "id: 1\n" in rest and "id: 2\n" in rest
        assert "event: done\n" in rest


# --------------------------------------------------------------------------- 4. portal


async def test_portal_cancel_at_period_end_keeps_access_until_period_ends(
    tmp_path: Path,
) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        portal_url = await open_portal(stack, client)
        await portal_action(client, portal_url, "cancel-at-period-end")  # webhook delivered
        info = await me(stack, client)
        assert info["allowed"] is True
        assert info["ends_kind"] == "ends"
        days = info["days_left"]
        assert days == stack.days_left("alice@example.com")
        ends_on = stack.ends_on("alice@example.com")  # "1 Jan 2027", from the double's clock
        assert info["summary"] == f"Ends on {ends_on} — won't renew. Resume in billing"
        async with client.get(stack.url("/_gate/account"), headers=HTML) as resp:
            text = html.unescape(await resp.text())
        assert f"Ends on {ends_on} — won't renew. Resume in billing" in text
        assert f'<dd id="account-days">{days} days</dd>' in text
        assert '<dd id="account-plan">Pro</dd>' in text  # the summary's name for it
        assert ">active<" not in text and "T00:" not in text  # no raw Stripe words or ISO dates
        assert await status_of(client, stack.url("/api/search?q=x")) == 200

        await stack.double.advance_time((days + 1) * 86400)  # period ends: canceled, webhook
        assert await status_of(client, stack.url("/api/search?q=x")) == 402
        async with client.get(stack.url("/_gate/account"), headers=HTML) as resp:
            text = html.unescape(await resp.text())
        # Ended, with its date; no "Cancel, change plan" for a subscription that is over.
        assert f'<dt>Ended on</dt><dd id="account-date">{ends_on}</dd>' in text, text[
            text.find("facts") :
        ][:900]
        assert "Cancel, change plan" not in text and 'id="ended-note"' in text
        assert 'id="account-days"' not in text
        async with client.get(stack.url("/"), headers=HTML, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/_gate/subscribe?next=/"


async def test_portal_cancel_now_denies_after_webhook(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        assert await status_of(client, stack.url("/api/search?q=x")) == 200  # now in L1
        portal_url = await open_portal(stack, client)
        await portal_action(client, portal_url, "cancel-now")
        assert await status_of(client, stack.url("/api/search?q=x")) == 402
        assert (await me(stack, client))["status"] == "canceled"


async def test_cancel_without_webhooks_is_seen_when_the_cache_expires(tmp_path: Path) -> None:
    env = {"CACHE_TTL": "2s", "L1_TTL": "0", "NEGATIVE_CACHE_TTL": "1s"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        stack.double.deliver_webhooks = False
        await subscribed(stack, client)
        reads = stripe_reads(stack)
        await portal_action(client, await open_portal(stack, client), "cancel-now")
        assert not stack.double.deliveries
        # No webhook: the cached entitlement still answers, without asking Stripe.
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert stripe_reads(stack) == reads

        async def denied() -> bool:
            return await status_of(client, stack.url("/api/search?q=x")) == 402

        await eventually(denied, "the cached entitlement to expire and Stripe to be re-read")
        assert stripe_reads(stack) > reads


# --------------------------------------------------------------------------- 5. past_due


@pytest.mark.parametrize(("grace", "expected"), [(None, 402), ("3d", 200)])
async def test_past_due_access_follows_grace_setting(
    tmp_path: Path, grace: str | None, expected: int
) -> None:
    env = {"PAST_DUE_GRACE": grace} if grace else {}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client)
        await stack.double.set_status(subscription_id(stack, customer_id), "past_due")
        assert (await me(stack, client))["status"] == "past_due"
        assert await status_of(client, stack.url("/api/search?q=x")) == expected


# --------------------------------------------------------------------------- 6. price allowlist


@pytest.mark.parametrize(("allow_any", "expected"), [("false", 402), ("true", 200)])
async def test_subscription_to_unlisted_price(
    tmp_path: Path, allow_any: str, expected: int
) -> None:
    prices = [*DEFAULT_PRICES, OTHER_PRICE]
    async with (
        running_stack(
            tmp_path, {"ALLOW_ANY_PRICE": allow_any}, double_kwargs={"prices": prices}
        ) as stack,
        stack.session() as client,
    ):
        customer_id = paying_customer(stack, "carol@example.com", OTHER_PRICE["id"])
        await stack.sign_in(client, customer_id, "carol@example.com")
        assert await status_of(client, stack.url("/api/search?q=x")) == expected
        info = await me(stack, client)
        assert info["price_id"] == OTHER_PRICE["id"]
        assert info["allowed"] is (expected == 200)


# --------------------------------------------------------------------------- 7. email sign-in


def title_of(page: str) -> str:
    match = re.search(r"<h1[^>]*>([^<]*)</h1>", page)
    assert match, page
    return match.group(1)


async def test_sign_in_link_on_a_new_device_is_single_use(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        async with stack.session() as device_a:
            await subscribed(stack, device_a, "alice@example.com")
        async with stack.session() as device_b:
            assert await status_of(device_b, stack.url("/api/search?q=x")) == 401
            page = await request_link(stack, device_b, "Alice@Example.com")
            assert title_of(page) == "Check your inbox"
            mailer = stack.services.mailer
            assert isinstance(mailer, LogMailer)
            email, link = mailer.sent[-1]
            assert email == "alice@example.com"
            assert link.startswith(stack.url("/_gate/login/verify?"))
            assert not has_session_cookie(device_b)  # opening the link alone signs nobody in
            # The confirm page names the account and says why a click is needed; opening it
            # twice (a mail scanner first) uses nothing up.
            for _ in range(2):
                async with device_b.get(link, headers=HTML) as resp:
                    confirm = html.unescape(await resp.text())
                assert "Continue as <strong>alice@example.com</strong>" in confirm
                assert "scanners" in confirm

            resp = await follow_link(stack, device_b, link)
            assert resp.status == 303
            assert resp.headers["Location"] == "/api/search"
            assert SESSION_COOKIE in resp.cookies
            assert await status_of(device_b, stack.url("/api/search?q=x")) == 200

        async with stack.session() as device_c:
            resp = await follow_link(stack, device_c, link)
            assert resp.status == 400
            page = await resp.text()
            assert title_of(page) == "This sign-in link was already used"  # not "expired"
            async with device_c.get(link, headers=HTML) as used:
                assert "Continue as" not in await used.text()  # no email for a spent link
            assert "expired" not in page
            assert SESSION_COOKIE not in resp.cookies
            assert await status_of(device_c, stack.url("/api/search?q=x")) == 401


async def test_sign_in_for_unknown_email_shows_the_same_page(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client, "alice@example.com")
        async with stack.session() as other:
            known = await request_link(stack, other, "alice@example.com")
            unknown = await request_link(stack, other, "nobody@example.com")
        assert title_of(known) == "Check your inbox"
        # Word for word the same page, but for the address the user typed.
        assert known.replace("alice@", "someone@") == unknown.replace("nobody@", "someone@")


async def test_sign_in_links_are_rate_limited_per_ip_and_address(tmp_path: Path) -> None:
    """Per client IP, and per address (a cool-down: one mail, whoever asks); requests from
    other IPs never lock an address out, and no request takes away a link already sent."""
    async with (
        running_stack(tmp_path, {"LOGIN_RATE_LIMIT": "3"}) as stack,
        stack.session() as client,
    ):
        mailer = stack.services.mailer
        assert isinstance(mailer, LogMailer)
        attacker = {"X-Forwarded-For": "203.0.113.1"}
        for _ in range(5):
            page = await request_link(stack, client, "alice@example.com", attacker)
            assert title_of(page) == "Check your inbox"  # the same page when limited
        assert [e for e, _ in mailer.sent] == ["alice@example.com"]  # the cool-down
        await request_link(stack, client, "bob@example.com", attacker)  # that IP's limit
        assert len(mailer.sent) == 1
        await request_link(stack, client, "alice@example.com", {"X-Forwarded-For": "198.51.100.7"})
        assert len(mailer.sent) == 1  # alice asks too: the link in her inbox is the one...
        async with stack.session() as alice:
            resp = await follow_link(stack, alice, mailer.sent[0][1])
            assert title_of(await resp.text()) == "No subscription yet"  # ...and it works
        await request_link(stack, client, "bob@example.com", {"X-Forwarded-For": "203.0.113.9"})
        assert [e for e, _ in mailer.sent][-1] == "bob@example.com"


# --------------------------------------------------------------------------- 8. identity header


async def test_trusted_identity_header_from_loopback_is_believed(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path, {"IDENTITY_HEADER": "X-Forwarded-Email"}) as stack,
        stack.session() as client,
    ):
        customer_id = paying_customer(stack, "bob@example.com")
        async with client.get(
            stack.url("/api/echo"), headers={**JSON, "X-Forwarded-Email": "bob@example.com"}
        ) as resp:
            assert resp.status == 200
            headers = echoed_headers(await resp.json())
        assert headers["x-gate-email"] == ["bob@example.com"]
        assert headers["x-gate-user"] == [customer_id]
        assert headers["x-gate-status"] == ["active"]
        assert await status_of(client, stack.url("/api/echo")) == 401  # the header is the key


async def test_identity_header_from_untrusted_peer_is_ignored_and_stripped(
    tmp_path: Path,
) -> None:
    env = {
        "IDENTITY_HEADER": "X-Forwarded-Email",
        "TRUSTED_PROXIES": "10.0.0.0/8",
        "PUBLIC_PATHS": "/api/echo",
    }
    claim = {"X-Forwarded-Email": "bob@example.com", "X-Gate-User": "cus_evil"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        paying_customer(stack, "bob@example.com")
        assert await status_of(client, stack.url("/api/search?q=x"), {**JSON, **claim}) == 401
        async with client.get(
            stack.url("/"), headers={**HTML, **claim}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        async with client.get(stack.url("/api/echo"), headers={**JSON, **claim}) as resp:
            assert resp.status == 200  # public path: proxied anonymously
            headers = echoed_headers(await resp.json())
        assert "x-forwarded-email" not in headers
        assert "x-gate-email" not in headers and "x-gate-user" not in headers


# --------------------------------------------------------------------------- 9. public paths


async def test_public_prefix_is_proxied_but_dot_segment_tricks_are_gated(tmp_path: Path) -> None:
    upstream, seen = recording_upstream()
    async with running_stack(
        tmp_path, {"PUBLIC_PATHS": "/static/*"}, upstream_app=upstream
    ) as stack:
        port = stack.gate_server.port
        assert port is not None
        assert await raw_get(port, "/static/x") == 404  # the upstream's 404: it was proxied
        assert seen == ["/static/x"]
        for trick in (
            "/static/../api/search",
            "/static/%2e%2e/api/search",
            "/static%2f..%2fapi/search",
            "/static/..%2fapi/search",
        ):
            assert await raw_get(port, trick) in (400, 401), trick
        assert await raw_get(port, "/api/search") == 401
        assert seen == ["/static/x"]  # none of them reached the upstream


# --------------------------------------------------------------------------- 10. next safety


@pytest.mark.parametrize(
    "evil", ["//evil.com", "https://evil.com", "/%2F%2Fevil.com", "/\\evil.com"]
)
async def test_landing_drops_unsafe_next(tmp_path: Path, evil: str) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        url = stack.url("/_gate/subscribe").rstrip("/")
        async with client.get(URL(url).with_query(next=evil), headers=HTML) as resp:
            page = await resp.text()
        assert form_fields(page, "/_gate/checkout")["next"] == "/"


async def test_success_redirect_never_leaves_the_origin(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        async with stack.session() as client:
            resp = await stack.subscribe(client, "alice@example.com", "//evil.com")
            assert resp.status == 303
            assert resp.headers["Location"] == "/"
        async with stack.session() as client:  # a success URL whose next was tampered with
            success_url = await pay(client, await stack.start_checkout(client), "bob@example.com")
            tampered = URL(success_url).update_query(next="//evil.com")
            async with client.get(tampered, allow_redirects=False) as resp:
                assert resp.status == 303
                assert resp.headers["Location"] == "/"


# --------------------------------------------------------------------------- 11. CSRF


async def test_checkout_requires_csrf_token_and_same_origin(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        form = await page_form(client, stack.url("/_gate/subscribe"), "/_gate/checkout")
        without = {k: v for k, v in form.items() if k != "csrf"}
        async with client.post(
            stack.url("/_gate/checkout"), data=without, headers=HTML, allow_redirects=False
        ) as resp:
            assert resp.status == 403
        async with client.post(
            stack.url("/_gate/checkout"),
            data=form,
            headers={**HTML, "Origin": "http://evil.example"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 403
        async with (
            stack.session() as other_browser,  # a token without its cookie
            other_browser.post(
                stack.url("/_gate/checkout"), data=form, allow_redirects=False
            ) as resp,
        ):
            assert resp.status == 403
        assert not stack.double.checkout_sessions
        async with client.post(
            stack.url("/_gate/checkout"),
            data=form,
            headers={"Origin": stack.base},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"].startswith(stack.double.public_base + "/checkout/")


# --------------------------------------------------------------------------- 12. success


async def test_success_for_unpaid_checkout_is_402(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        session_id = (await stack.start_checkout(client)).rsplit("/", 1)[1]
        async with client.get(
            stack.url(f"/_gate/success?session_id={session_id}"),
            headers=HTML,
            allow_redirects=False,
        ) as resp:
            assert resp.status == 402
            assert SESSION_COOKIE not in resp.cookies
        assert not has_session_cookie(client)


@pytest.mark.parametrize("session_id", ["cs_test_doesnotexist", "bogus", ""])
async def test_success_with_bogus_session_is_400(tmp_path: Path, session_id: str) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        url = stack.url(f"/_gate/success?session_id={session_id}")
        resp = await client.get(url, headers=HTML, allow_redirects=False)
        await resp.read()
        assert resp.status == 400
        assert SESSION_COOKIE not in resp.cookies


async def test_success_opened_in_another_browser_asks_for_email_sign_in(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack:
        async with stack.session() as payer:
            success_url = await pay(payer, await stack.start_checkout(payer), "alice@example.com")
        async with stack.session() as other:
            async with other.get(success_url, headers=HTML, allow_redirects=False) as resp:
                assert resp.status == 200
                page = await resp.text()
                assert SESSION_COOKIE not in resp.cookies
            assert "sign in with the email" in page
            assert 'href="/_gate/login?next=/"' in page
            assert not has_session_cookie(other)
            assert await status_of(other, stack.url("/api/search?q=x")) == 401


# --------------------------------------------------------------------------- 13. Stripe down


async def test_landing_shows_friendly_503_when_stripe_is_down(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        stack.double.faults.fail_always(500)
        async with client.get(stack.url("/_gate/subscribe?next=/"), headers=HTML) as resp:
            assert resp.status == 503
            assert "text/html" in resp.headers["Content-Type"]
            page = await resp.text()
        assert "Billing is temporarily unavailable" in page
        assert "Traceback" not in page and "Internal Server Error" not in page


async def test_cached_payer_keeps_access_while_stripe_is_down(tmp_path: Path) -> None:
    env = {"CACHE_TTL": "1s", "L1_TTL": "0"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await subscribed(stack, client)
        stack.double.faults.fail_always(500)
        reads = stripe_reads(stack)

        async def stripe_was_asked() -> bool:
            assert await status_of(client, stack.url("/api/search?q=x")) == 200
            return stripe_reads(stack) > reads

        await eventually(stripe_was_asked, "the cache to expire and Stripe to be asked")
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        info = await me(stack, client)
        assert info["allowed"] is True and info["stale"] is True


@pytest.mark.parametrize(("on_error", "expected"), [("deny", 503), ("allow", 200)])
async def test_unknown_user_while_stripe_is_down(
    tmp_path: Path, on_error: str, expected: int
) -> None:
    async with (
        running_stack(tmp_path, {"ON_STRIPE_ERROR": on_error}) as stack,
        stack.session() as client,
    ):
        customer_id = paying_customer(stack, "dave@example.com")
        await stack.sign_in(client, customer_id, "dave@example.com")
        stack.double.faults.fail_always(500)
        async with client.get(
            stack.url("/api/search?q=x"), headers=JSON, allow_redirects=False
        ) as resp:
            assert resp.status == expected
            body = await resp.json()
        if expected == 503:
            assert body["error"] == "billing_unavailable"
            assert resp.headers["Retry-After"]
        else:
            assert body["query"] == "x"


# --------------------------------------------------------------------------- 14. webhooks


async def test_webhook_with_bad_signature_is_rejected_and_not_recorded(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        customer_id = await subscribed(stack, client)
        sub = stack.double.subscriptions[subscription_id(stack, customer_id)]
        event = stack.double.record("customer.subscription.updated", sub, None)
        payload = json.dumps(event)
        url = stack.url("/_gate/webhooks/stripe")
        forged = stack.double.sign(payload).replace("v1=", "v1=0")
        for signature in (forged, None):
            headers = {"Content-Type": "application/json"}
            if signature is not None:
                headers["Stripe-Signature"] = signature
            async with client.post(url, data=payload, headers=headers) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"] == "invalid_signature"
        headers = {
            "Content-Type": "application/json",
            "Stripe-Signature": stack.double.sign(payload),
        }
        async with client.post(url, data=payload, headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] != "duplicate"  # the forged one left no trace


async def test_double_delivers_every_event_to_the_gate(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        await stack.double.wait_deliveries()
        deliveries = stack.double.deliveries
        assert deliveries
        assert all(status == 200 for _, status in deliveries), deliveries
        delivered = {event_id for event_id, _ in deliveries}
        types = {e["type"] for e in stack.double.events if e["id"] in delivered}
        assert {
            "checkout.session.completed",
            "customer.subscription.created",
            "invoice.paid",
        } <= types


# --------------------------------------------------------------------------- 15. logout


async def test_logout_clears_the_session(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        form = await page_form(client, stack.url("/_gate/account"), "/_gate/logout")
        async with client.post(
            stack.url("/_gate/logout"), data={}, headers=HTML, allow_redirects=False
        ) as resp:
            assert resp.status == 403  # no CSRF token: still signed in
        assert has_session_cookie(client)
        async with client.post(
            stack.url("/_gate/logout"), data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/_gate/subscribe?signed_out=1"
            assert resp.cookies[SESSION_COOKIE].value == ""
        assert not has_session_cookie(client)
        assert await status_of(client, stack.url("/api/search?q=x")) == 401
        # The landing says so; the bare landing does not.
        async with client.get(stack.url("/_gate/subscribe?signed_out=1"), headers=HTML) as resp:
            assert 'id="signed-out">You are signed out.' in await resp.text()
        async with client.get(stack.url("/_gate/subscribe"), headers=HTML) as resp:
            assert "signed out" not in await resp.text()


# --------------------------------------------------------------------------- 16. gate routes


async def test_health_readiness_and_unknown_gate_paths(tmp_path: Path) -> None:
    upstream, seen = recording_upstream()
    async with running_stack(tmp_path, upstream_app=upstream) as stack, stack.session() as client:
        async with client.get(stack.url("/_gate/healthz")) as resp:
            assert resp.status == 200
        async with client.get(stack.url("/_gate/readyz")) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["status"] == "ok"
        assert body["checks"]["store"] == "ok"
        assert await status_of(client, stack.url("/_gate/nonexistent")) == 404
        assert await status_of(client, stack.url("/_gate/nonexistent"), HTML) == 404
        assert seen == []


# --------------------------------------------------------------------------- 17. restart


async def test_restarted_gate_serves_payer_from_store_without_stripe(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        await subscribed(stack, client)
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        await stack.restart_gate()
        calls = list(stack.double.calls)
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert stack.double.calls == calls
