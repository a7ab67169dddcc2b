"""gateway.stripe_client: the real StripeClientAPI against the local Stripe double (and a few
misbehaving servers), with the door inside it (``_call``: token bucket and circuit breaker for
every request of every operation), billing off, and webhook signature verification."""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.demo.stripe_double import DEFAULT_API_KEY, StripeDouble
from gateway.model import ManualClock
from gateway.ratelimit import TokenBucket
from gateway.stripe_api import (
    StripeAPI,
    StripeBreakerOpen,
    StripeRejected,
    StripeUnavailable,
    map_error,
    redact,
)
from gateway.stripe_breaker import BREAKER_COOLDOWN, BREAKER_THRESHOLD
from gateway.stripe_client import StripeClientAPI
from gateway.stripe_webhooks import WebhookMalformed, WebhookSignatureInvalid, verify_webhook
from tests.conftest import base_url, client_settings, live_and_canceled


def api_calls(double: StripeDouble, path: str) -> int:
    return sum(1 for _, p in double.calls if p == path)


# --- reads ------------------------------------------------------------------------------------


async def test_list_subscriptions_all_statuses_as_plain_dicts(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    customer_id, live, ended = live_and_canceled(double, "a@example.com")

    subs = await api.list_subscriptions(customer_id)

    assert {s["id"] for s in subs} == {live, ended}  # status=all: canceled too
    for sub in subs:
        assert type(sub) is dict
        assert type(sub["items"]) is dict and type(sub["items"]["data"][0]) is dict
        assert sub["items"]["data"][0]["price"]["id"] in ("price_demo_monthly", "price_demo_yearly")
    assert await api.list_subscriptions(double.create_customer("c@example.com")["id"]) == []


async def test_list_subscriptions_reads_every_page(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    cus = double.create_customer("many@example.com")
    created = {
        double.create_subscription(cus["id"], "price_demo_monthly")["id"] for _ in range(150)
    }
    subs = await api.list_subscriptions(cus["id"])
    assert [s["id"] for s in subs if s["id"] in created] == [s["id"] for s in subs]
    assert {s["id"] for s in subs} == created
    assert len(subs) == 150
    assert api.calls["subscriptions.list"] == 2  # limit=100 pages
    assert api_calls(double, "/v1/subscriptions") == 2


async def test_find_and_get_customers(
    api: StripeClientAPI, double: StripeDouble, double_server: TestServer
) -> None:
    first = double.create_customer("same@example.com")
    second = double.create_customer("same@example.com")
    double.create_customer("other@example.com")
    found = await api.find_customers("same@example.com")
    assert {c["id"] for c in found} == {first["id"], second["id"]}
    assert await api.find_customers("nobody@example.com") == []

    got = await api.get_customer(first["id"])
    assert got is not None and got["email"] == "same@example.com"
    assert await api.get_customer("cus_missing") is None

    async with (
        aiohttp.ClientSession() as http,
        http.delete(
            f"{base_url(double_server)}/v1/customers/{second['id']}",
            headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        ) as resp,
    ):
        assert resp.status == 200
    assert await api.get_customer(second["id"]) is None  # deleted → None


async def test_create_customer_is_idempotent(api: StripeClientAPI) -> None:
    one = await api.create_customer("new@example.com", "cus-new-1")
    again = await api.create_customer("new@example.com", "cus-new-1")
    other = await api.create_customer("new@example.com", "cus-new-2")
    assert one["id"] == again["id"] != other["id"]
    assert one["email"] == "new@example.com"


async def test_get_price_expands_product(api: StripeClientAPI) -> None:
    price = await api.get_price("price_demo_monthly")
    assert price["id"] == "price_demo_monthly"
    assert isinstance(price["product"], dict) and price["product"]["name"]


async def test_checkout_and_portal_sessions(api: StripeClientAPI, double: StripeDouble) -> None:
    cus = double.create_customer("buyer@example.com")
    params = {
        "mode": "subscription",
        "customer": cus["id"],
        "client_reference_id": "ref-1",
        "line_items": [{"price": "price_demo_monthly", "quantity": 1}],
        "success_url": "http://127.0.0.1/_gate/success?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://127.0.0.1/_gate/subscribe",
        "metadata": {"gate": "1"},
    }
    session = await api.create_checkout_session(params, "checkout-ref-1")
    again = await api.create_checkout_session(params, "checkout-ref-1")
    assert session["id"].startswith("cs_") and session["id"] == again["id"]
    assert session["url"]
    got = await api.get_checkout_session(session["id"])
    assert got["client_reference_id"] == "ref-1"
    assert got["customer"] == cus["id"]
    portal = await api.create_portal_session(cus["id"], "http://127.0.0.1/_gate/account")
    assert portal["url"] and portal["customer"] == cus["id"]
    with pytest.raises(StripeRejected) as err:
        await api.get_checkout_session("cs_missing")
    assert err.value.not_found


async def test_list_events_oldest_first_and_filtered(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    cus = double.create_customer("events@example.com")
    sub = double.create_subscription(cus["id"], "price_demo_monthly")
    await double.set_status(sub["id"], "past_due")
    await double.set_status(sub["id"], "active")
    events = await api.list_events(0, ["customer.subscription.updated"])
    assert len(events) >= 2
    assert {e["type"] for e in events} == {"customer.subscription.updated"}
    created = [e["created"] for e in events]
    assert created == sorted(created)
    everything = await api.list_events(0, [])
    assert len(everything) >= len(events)
    assert await api.list_events(double.now() + 3600, []) == []


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, StripeUnavailable),
        (502, StripeUnavailable),
        (503, StripeUnavailable),
        (429, StripeUnavailable),
        (400, StripeRejected),
        (401, StripeRejected),
        (403, StripeRejected),
        (404, StripeRejected),
    ],
)
async def test_http_errors_are_mapped(
    api: StripeClientAPI, double: StripeDouble, status: int, expected: type[Exception]
) -> None:
    double.faults.fail_next(1, status)
    with pytest.raises(expected) as err:
        await api.list_subscriptions("cus_x")
    assert isinstance(err.value, StripeUnavailable | StripeRejected)
    assert err.value.http_status == status
    assert err.value.operation == "subscriptions.list"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert api.failures[expected.__name__] == 1
    assert await api.list_subscriptions("cus_x") == []  # the next call is fine again


async def test_dropped_connection_is_unavailable(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    double.faults.drop_next(1)
    with pytest.raises(StripeUnavailable) as err:
        await api.list_subscriptions("cus_x")
    assert err.value.http_status is None
    assert "APIConnectionError" in str(err.value)


async def test_timeout_is_unavailable(double_server: TestServer, double: StripeDouble) -> None:
    api = await StripeClientAPI.create(client_settings(base_url(double_server), stripe_timeout=0.2))
    try:
        double.faults.latency = 2.0
        started = time.monotonic()
        with pytest.raises(StripeUnavailable):
            await api.list_subscriptions("cus_x")
        assert time.monotonic() - started < 1.5
    finally:
        double.faults.reset()
        await api.close()


async def test_library_retries_transient_failures(
    double_server: TestServer, double: StripeDouble
) -> None:
    api = await StripeClientAPI.create(
        client_settings(base_url(double_server), stripe_max_retries=1)
    )
    try:
        double.faults.drop_next(1)
        assert await api.list_subscriptions("cus_x") == []
        # the library retried: two requests reached the double, one call went through ours
        assert api_calls(double, "/v1/subscriptions") == 2
        assert api.calls["subscriptions.list"] == 1
    finally:
        await api.close()


async def test_connection_refused_is_unavailable() -> None:
    api = await StripeClientAPI.create(client_settings("http://127.0.0.1:9"))
    try:
        with pytest.raises(StripeUnavailable):
            await api.get_price("price_demo_monthly")
    finally:
        await api.close()


async def test_wrong_key_is_rejected_without_leaking_it(double_server: TestServer) -> None:
    secret = "sk_test_wrongWRONGwrong1234567890"
    api = await StripeClientAPI.create(
        dataclasses.replace(client_settings(base_url(double_server)), stripe_secret_key=secret)
    )
    try:
        with pytest.raises(StripeRejected) as err:
            await api.list_subscriptions("cus_x")
        assert err.value.http_status == 401
        assert secret not in str(err.value) and secret not in repr(err.value)
        assert "7890" not in str(err.value)
    finally:
        await api.close()


@pytest.mark.parametrize(
    ("body", "status", "content_type"),
    [
        ("<html>Bad gateway</html>", 502, "text/html"),
        ("not json at all", 200, "text/plain"),
    ],
)
async def test_non_json_answers_are_unavailable(
    aiohttp_server: AiohttpServer, body: str, status: int, content_type: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body, status=status, content_type=content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    srv = await aiohttp_server(app, host="127.0.0.1")
    api = await StripeClientAPI.create(client_settings(base_url(srv)))
    try:
        with pytest.raises(StripeUnavailable):
            await api.list_subscriptions("cus_x")
    finally:
        await api.close()


def test_map_error_redacts_secrets() -> None:
    key = "sk_live_abcdefghijklmnop0123"
    exc = stripe.InvalidRequestError(  # type: ignore[no-untyped-call]
        f"Invalid API Key provided: {key}; also rk_test_zzz999 and whsec_abc",
        param=None,
        http_status=400,
    )
    err = map_error("customers.retrieve", exc, key)
    assert isinstance(err, StripeRejected)
    assert key not in str(err) and "rk_test_zzz999" not in str(err) and "whsec_abc" not in str(err)
    assert "<redacted>" in str(err)
    assert redact("key sk_test_123 here") == "key <redacted> here"
    assert isinstance(map_error("x", TimeoutError()), StripeUnavailable)
    assert isinstance(map_error("x", aiohttp.ServerDisconnectedError()), StripeUnavailable)
    assert isinstance(map_error("x", stripe.APIError("boom", http_status=409)), StripeUnavailable)
    assert isinstance(map_error("x", stripe.StripeError("?", http_status=502)), StripeUnavailable)
    assert isinstance(map_error("x", stripe.PermissionError("no", http_status=403)), StripeRejected)


# --- lifecycle and rate limit -----------------------------------------------------------------


async def test_closed_client_fails_fast(double_server: TestServer) -> None:
    api = await StripeClientAPI.create(client_settings(base_url(double_server)))
    await api.close()
    await api.close()  # idempotent
    with pytest.raises(StripeUnavailable, match="closed"):
        await api.list_subscriptions("cus_x")


def test_create_needs_a_running_loop() -> None:
    coro = StripeClientAPI.create(client_settings("http://127.0.0.1:9"))
    with pytest.raises(RuntimeError):
        coro.send(None)


async def test_calls_go_through_the_rate_limiter(
    double_server: TestServer, double: StripeDouble
) -> None:
    api = await StripeClientAPI.create(client_settings(base_url(double_server)))
    api.limiter = TokenBucket(20, burst=1)
    try:
        started = time.monotonic()
        await asyncio.gather(*(api.list_subscriptions("cus_x") for _ in range(5)))
        # 1 token at once, then one every 50 ms: 4 waits
        assert time.monotonic() - started >= 0.19
        assert api.calls["subscriptions.list"] == 5
    finally:
        await api.close()


def test_default_rate_follows_the_key() -> None:
    settings = client_settings("http://127.0.0.1:9")
    assert settings.stripe_rate == 20  # test key
    assert dataclasses.replace(settings, stripe_rate_limit=7).stripe_rate == 7


async def test_token_bucket_with_a_fake_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(10, burst=2, clock=lambda: now[0])
    assert bucket.try_acquire() and bucket.try_acquire()
    assert not bucket.try_acquire()
    now[0] += 0.1  # one token back
    assert bucket.try_acquire()
    assert not bucket.try_acquire()
    now[0] += 10  # refills up to the burst only
    assert await bucket.acquire() == 0.0
    assert await bucket.acquire() == 0.0
    assert not bucket.try_acquire()
    with pytest.raises(ValueError):
        TokenBucket(0)


# --- the door: every operation through one limiter and one breaker --------------------------

#: Every StripeAPI operation, called through the door with harmless arguments.
OPERATIONS: dict[str, Any] = {
    "subscriptions.list": lambda api: api.list_subscriptions("cus_x"),
    "customers.list": lambda api: api.find_customers("a@example.com"),
    "customers.retrieve": lambda api: api.get_customer("cus_x"),
    "customers.create": lambda api: api.create_customer("a@example.com", "idem-1"),
    "prices.retrieve": lambda api: api.get_price("price_demo_monthly"),
    "checkout.sessions.create": lambda api: api.create_checkout_session(
        {
            "mode": "subscription",
            "line_items": [{"price": "price_demo_monthly", "quantity": 1}],
            "success_url": "http://127.0.0.1/ok",
            "cancel_url": "http://127.0.0.1/no",
        },
        "idem-2",
    ),
    "checkout.sessions.retrieve": lambda api: api.get_checkout_session("cs_x"),
    "billing_portal.sessions.create": lambda api: api.create_portal_session(
        "cus_x", "http://127.0.0.1/back"
    ),
    "events.list": lambda api: api.list_events(0, []),
}


def breaker_state(api: StripeClientAPI) -> str:
    return api.breaker.state  # a function call: mypy must not narrow it across time


@pytest.fixture
async def door(double_server: TestServer) -> AsyncIterator[tuple[StripeClientAPI, ManualClock]]:
    clock = ManualClock()
    settings = client_settings(base_url(double_server))
    api = await StripeClientAPI.create(settings, clock=clock)
    try:
        yield api, clock
    finally:
        await api.close()


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
async def test_every_operation_passes_the_breaker(
    door: tuple[StripeClientAPI, ManualClock], double: StripeDouble, operation: str
) -> None:
    api, clock = door
    call = OPERATIONS[operation]
    double.faults.fail_always(503)
    for _ in range(BREAKER_THRESHOLD):
        with pytest.raises(StripeUnavailable) as err:
            await call(api)
        assert not isinstance(err.value, StripeBreakerOpen)  # really asked Stripe
    assert breaker_state(api) == "open" and api.breaker.opened == 1
    sent = len(double.calls)
    with pytest.raises(StripeBreakerOpen, match="circuit breaker open"):
        await call(api)
    assert len(double.calls) == sent  # skipped: Stripe was not asked
    # Any other operation is skipped too: one breaker for every Stripe call.
    with pytest.raises(StripeBreakerOpen):
        await OPERATIONS["prices.retrieve"](api)
    double.faults.reset()
    clock.advance(BREAKER_COOLDOWN)
    assert breaker_state(api) == "half_open"
    # The probe reaches Stripe; an unknown object is an answer, which closes the breaker too.
    with contextlib.suppress(StripeRejected):
        await call(api)
    assert breaker_state(api) == "closed"
    assert len(double.calls) == sent + 1


async def test_create_builds_one_limiter_and_one_breaker() -> None:
    settings = client_settings("http://127.0.0.1:9")
    clock = ManualClock()
    api: StripeAPI = await StripeClientAPI.create(settings, clock=clock)
    try:
        assert isinstance(api, StripeClientAPI)
        assert api.limiter is not None and api.limiter.rate == settings.stripe_rate
        assert api.breaker.state == "closed" and api.breaker.opened == 0
        assert not api.calls and not api.failures
    finally:
        await api.close()


class CountingBucket(TokenBucket):
    """The real token bucket, counting the tokens taken."""

    taken = 0

    async def acquire(self) -> float:
        self.taken += 1
        return await super().acquire()


async def test_a_paginated_list_takes_one_token_per_page(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    for _ in range(150):  # two pages of 100
        double.create_customer("many@example.com")
    bucket = api.limiter = CountingBucket(1000)
    found = await api.find_customers("many@example.com")
    assert len(found) == 150
    assert bucket.taken == api.calls["customers.list"] == 2


async def test_rejections_do_not_open_the_breaker(
    door: tuple[StripeClientAPI, ManualClock], double: StripeDouble
) -> None:
    api, _ = door
    double.faults.fail_always(400)
    for _ in range(BREAKER_THRESHOLD + 2):
        with pytest.raises(StripeRejected):
            await api.get_price("price_demo_monthly")
    assert api.breaker.state == "closed"


async def test_billing_off_is_always_unavailable_without_io() -> None:
    api = StripeClientAPI.off()
    for _ in range(BREAKER_THRESHOLD):
        for call in OPERATIONS.values():
            with pytest.raises(StripeUnavailable, match="billing is off") as err:
                await call(api)
            assert not isinstance(err.value, StripeBreakerOpen)
    assert api.breaker.state == "closed"  # nothing was asked: nothing failed
    assert not api.calls and not api.failures
    await api.close()
    await api.close()  # idempotent


# --- webhook signatures -------------------------------------------------------------------------

SECRETS = ("whsec_old", "whsec_new")


def signed(payload: bytes, secret: str, at: int | None = None) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=int(time.time()) if at is None else at
    )
    return header


EVENT = (
    b'{"id": "evt_1", "object": "event", "type": "invoice.paid", "created": 1,'
    b' "data": {"object": {"id": "in_1"}}}'
)


@pytest.mark.parametrize("secret", SECRETS)
def test_verify_webhook_accepts_any_secret_of_a_rotation(secret: str) -> None:
    event = verify_webhook(EVENT, signed(EVENT, secret), SECRETS)
    assert event["id"] == "evt_1" and event["data"]["object"] == {"id": "in_1"}
    assert type(event) is dict and type(event["data"]) is dict  # plain dicts, no StripeObject


@pytest.mark.parametrize(
    "header",
    [None, "", "t=1,v1=abc", signed(EVENT, "whsec_other"), signed(EVENT, SECRETS[0], at=1)],
)
def test_verify_webhook_rejects_bad_signatures(header: str | None) -> None:
    with pytest.raises(WebhookSignatureInvalid):
        verify_webhook(EVENT, header, SECRETS)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "JSONDecodeError"),
        (b"[1, 2]", "AttributeError"),
        (b'{"id": "evt_1", "object": "event"}', "missing id, type, created or data.object"),
    ],
)
def test_verify_webhook_rejects_malformed_events(body: bytes, reason: str) -> None:
    with pytest.raises(WebhookMalformed) as err:
        verify_webhook(body, signed(body, SECRETS[1]), SECRETS)
    assert str(err.value) == reason
