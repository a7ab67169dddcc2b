"""The Stripe double checks every ``/v1`` request against stripe-python's typed parameters
(:mod:`gateway.demo.stripe_double.params_check`): a parameter real Stripe would reject —
top-level or nested — answers Stripe's ``parameter_unknown`` error, over HTTP, through
stripe-python; what the library declares passes; every ``/v1`` route has its TypedDict."""

from typing import Any, cast

import pytest
import stripe
from aiohttp import web
from typing_extensions import is_typeddict

from gateway.demo.stripe_double import StripeDouble
from gateway.demo.stripe_double.params_check import ENDPOINTS, ParamsCheck


async def unknown(call: Any) -> str:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await call
    err = info.value
    assert err.http_status == 400
    assert err.code == "parameter_unknown"
    body = cast(dict[str, Any], err.json_body)["error"]
    assert body["type"] == "invalid_request_error"
    assert body["message"] == f"Received unknown parameter: {body['param']}"
    return str(body["param"])


async def test_unknown_parameters_are_refused_on_every_kind_of_endpoint(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus = double.create_customer("p@example.com")
    sub = double.create_subscription(cus["id"], "price_demo_monthly")
    v1 = double_client.v1
    calls: list[tuple[Any, str]] = [
        (v1.customers.create_async(cast(Any, {"email": "a@b.c", "colour": "red"})), "colour"),
        (v1.customers.list_async(cast(Any, {"emails": "a@b.c"})), "emails"),
        (v1.subscriptions.update_async(sub["id"], cast(Any, {"cancel": "true"})), "cancel"),
        (
            v1.subscriptions.update_async(
                sub["id"], cast(Any, {"pause_collection": {"behavior": "void", "until": "1"}})
            ),
            "pause_collection[until]",
        ),
        (
            v1.checkout.sessions.create_async(
                cast(
                    Any,
                    {
                        "mode": "subscription",
                        "success_url": "http://127.0.0.1/ok",
                        "line_items": [{"price": "price_demo_monthly", "qty": 1}],
                    },
                )
            ),
            "line_items[0][qty]",
        ),
        (
            v1.billing_portal.sessions.create_async(
                cast(Any, {"customer": cus["id"], "flow_data": {"kind": "x"}})
            ),
            "flow_data[kind]",
        ),
        (
            v1.billing.meter_events.create_async(
                cast(
                    Any,
                    {
                        "event_name": "analysis",
                        "payload": {"stripe_customer_id": cus["id"], "value": "1"},
                        "customer": cus["id"],
                    },
                )
            ),
            "customer",
        ),
        (v1.events.list_async(cast(Any, {"since": "1"})), "since"),
    ]
    for call, param in calls:
        assert await unknown(call) == param
    assert double.customers.keys() == {cus["id"]}  # nothing was created
    assert double.checkout_sessions == {} and double.meters.events == []


async def test_what_the_library_declares_passes_free_form_hashes_included(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus = await double_client.v1.customers.create_async(
        {"email": "ok@example.com", "metadata": {"any_key": "v", "other": "w"}, "expand": []}
    )
    assert cus.to_dict()["metadata"] == {"any_key": "v", "other": "w"}
    session = await double_client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "success_url": "http://127.0.0.1/ok",
            "line_items": [{"price": "price_demo_monthly", "quantity": 1}],
            "subscription_data": {"metadata": {"free": "form"}, "trial_period_days": 3},
            "metadata": {"x": "y"},
        },
        {"idempotency_key": "k-1"},  # a request option, never a parameter
    )
    assert session.status == "open"


def test_every_v1_route_of_the_double_has_its_typed_parameters() -> None:
    app = StripeDouble().make_app()
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/v1/")
        and route.method != "HEAD"
    }
    assert routes == set(ENDPOINTS)
    for cls in ENDPOINTS.values():
        assert is_typeddict(cls), cls  # each a params TypedDict the installed library ships


async def test_a_route_without_typed_parameters_is_refused(aiohttp_client: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    async def no_params(request: web.Request) -> dict[str, Any]:
        return {}

    app = web.Application(middlewares=[ParamsCheck(no_params).middleware])
    app.router.add_get("/v1/unmapped", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/v1/unmapped")
    assert resp.status == 500  # never answered unchecked
