"""Stripe errors are classified by HTTP status (``gateway.stripe_api.map_error``): any 4xx but
408, 409 and 429 is a rejection, never an outage, with or without a JSON body.

Real parts: the real ``stripe`` library through the gate's one Stripe client (breaker and rate
limiter inside) against a Stripe-compatible server on 127.0.0.1 that answers unknown objects with a
plain-text ``404`` (as a proxy, a mock server or an API gateway in front of Stripe may).
"""

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.stripe_api import StripeAPI, StripeRejected, StripeUnavailable
from gateway.stripe_breaker import BREAKER_THRESHOLD
from gateway.stripe_client import StripeClientAPI
from tests.conftest import make_settings

LEGACY_PLAN = {
    "id": "gold_legacy",
    "object": "plan",
    "active": True,
    "amount": 900,
    "currency": "usd",
    "interval": "month",
    "interval_count": 1,
    "product": {"id": "prod_gold", "object": "product", "name": "Gold", "active": True},
}


class PlainServer:
    """``/v1/prices/*`` and unknown plans: plain-text 404; ``/v1/plans/gold_legacy``: a Plan;
    ``/v1/customers/busy``: the given status with a plain-text body."""

    def __init__(self) -> None:
        self.calls = 0
        self.status = 409

    async def price(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.Response(status=404, text="404 page not found")

    async def plan(self, request: web.Request) -> web.Response:
        self.calls += 1
        if request.match_info["id"] == LEGACY_PLAN["id"]:
            return web.json_response(LEGACY_PLAN)
        return web.Response(status=404, text="Not Found")

    async def busy(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.Response(status=self.status, text="try again")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/prices/{id}", self.price)
        app.router.add_get("/v1/plans/{id}", self.plan)
        app.router.add_get("/v1/customers/{id}", self.busy)
        return app


@pytest.fixture
async def plain() -> AsyncIterator[tuple[PlainServer, StripeAPI]]:
    server = PlainServer()
    test_server = TestServer(server.app(), host="127.0.0.1")
    await test_server.start_server()
    settings = make_settings(
        stripe_secret_key="sk_test_plain",
        stripe_api_base=f"http://127.0.0.1:{test_server.port}",
        stripe_max_retries=0,
    )
    api = await StripeClientAPI.create(settings)
    try:
        yield server, api
    finally:
        await api.close()
        await test_server.close()


async def test_a_plain_text_404_is_a_rejection_and_never_opens_the_breaker(
    plain: tuple[PlainServer, StripeAPI],
) -> None:
    server, api = plain
    for _ in range(3 * BREAKER_THRESHOLD):  # every landing-page view asks for the price
        with pytest.raises(StripeRejected) as rejected:
            await api.get_price("price_nope")
        assert rejected.value.not_found
        assert rejected.value.http_status == 404
    # The breaker is closed: the next call reaches the server (an open one would not call).
    calls = server.calls
    with pytest.raises(StripeRejected):
        await api.get_price("price_nope")
    assert server.calls > calls


async def test_the_legacy_plan_fallback_follows_a_plain_text_404(
    plain: tuple[PlainServer, StripeAPI],
) -> None:
    _server, api = plain
    price = await api.get_price("gold_legacy")
    assert price["id"] == "gold_legacy"
    assert price["unit_amount"] == 900


@pytest.mark.parametrize(
    ("status", "transient"),
    [(400, False), (403, False), (408, True), (409, True), (429, True), (502, True)],
)
async def test_plain_text_answers_are_classified_by_status(
    plain: tuple[PlainServer, StripeAPI], status: int, transient: bool
) -> None:
    server, api = plain
    server.status = status
    expected = StripeUnavailable if transient else StripeRejected
    with pytest.raises(expected) as raised:
        await api.get_customer("busy")
    assert type(raised.value) is expected
