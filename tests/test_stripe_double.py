"""The Stripe test double, driven by the real ``stripe`` library (and plain HTTP for pages)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.demo.stripe_double import DEFAULT_API_KEY, StripeDouble
from gateway.demo.stripe_double.form import ApiError, parse_form
from tests.conftest import live_and_canceled, subscriber

KEY = DEFAULT_API_KEY
SECRET = "whsec_double"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "stripe" / "fixtures3.json"


def keys(names: str) -> set[str]:
    return set(names.split())


# Top-level keys of Stripe's example objects (shared/stripe/fixtures3.json), kept here so the
# shape test runs even where that file is absent; when it is present it is checked as well.
FIXTURE_KEYS: dict[str, set[str]] = {
    "subscription": keys(
        "application application_fee_percent automatic_tax billing_cycle_anchor "
        "billing_cycle_anchor_config billing_mode billing_schedules billing_thresholds cancel_at "
        "cancel_at_period_end canceled_at cancellation_details collection_method created "
        "currency customer customer_account days_until_due default_payment_method "
        "default_source default_tax_rates description discounts ended_at id invoice_settings "
        "items latest_invoice livemode managed_payments metadata "
        "next_pending_invoice_item_invoice object on_behalf_of pause_collection "
        "payment_settings pending_invoice_item_interval pending_setup_intent pending_update "
        "schedule start_date status test_clock transfer_data trial_end trial_settings "
        "trial_start"
    ),
    "customer": keys(
        "address balance created currency default_source delinquent description discount email "
        "id invoice_prefix invoice_settings livemode metadata name next_invoice_sequence object "
        "phone preferred_locales shipping tax_exempt test_clock"
    ),
    "checkout.session": keys(
        "adaptive_pricing after_expiration allow_promotion_codes amount_subtotal amount_total "
        "automatic_tax billing_address_collection cancel_url client_reference_id client_secret "
        "collected_information consent consent_collection created currency currency_conversion "
        "custom_fields custom_text customer customer_account customer_creation customer_details "
        "customer_email discounts expires_at id integration_identifier invoice invoice_creation "
        "livemode locale managed_payments metadata mode object origin_context payment_intent "
        "payment_link payment_method_collection payment_method_configuration_details "
        "payment_method_options payment_method_types payment_status permissions "
        "phone_number_collection recovered_from saved_payment_method_options setup_intent "
        "shipping_address_collection shipping_cost shipping_options status submit_type "
        "subscription success_url total_details ui_mode url wallet_options"
    ),
    "subscription_item": keys(
        "billing_thresholds created current_period_end current_period_start discounts id "
        "metadata object plan price quantity subscription tax_rates"
    ),
    "price": keys(
        "active billing_scheme created currency custom_unit_amount id livemode lookup_key "
        "metadata nickname object product recurring tax_behavior tiers_mode transform_quantity "
        "type unit_amount unit_amount_decimal"
    ),
    "billing_portal.session": keys(
        "configuration created customer customer_account flow id livemode locale object "
        "on_behalf_of return_url url"
    ),
    "event": keys("api_version created data id livemode object pending_webhooks request type"),
}
# Keys of Stripe's examples the double leaves out on purpose (none so far).
OMITTED_KEYS: dict[str, set[str]] = {}


# --- fixtures ---------------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint recording what it receives (and verifying signatures)."""

    def __init__(self) -> None:
        self.bodies: list[tuple[bytes, str]] = []
        self.status = 200
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        self.bodies.append((await request.read(), request.headers["Stripe-Signature"]))
        return web.Response(status=self.status)

    def events(self) -> list[stripe.Event]:
        return [stripe.Webhook.construct_event(body, sig, SECRET) for body, sig in self.bodies]

    def types(self) -> list[str]:
        return [json.loads(body)["type"] for body, _ in self.bodies]


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer, double: StripeDouble) -> Receiver:
    rec = Receiver()
    srv = await aiohttp_server(rec.app, host="127.0.0.1")
    double.webhook_urls = [str(srv.make_url("/hook"))]
    return rec


def as_dict(obj: stripe.StripeObject) -> dict[str, Any]:
    result: dict[str, Any] = obj.to_dict()
    return result


# --- form parsing -----------------------------------------------------------------------------


def test_parse_form_nesting() -> None:
    params = parse_form(
        [
            ("email", "a@b.c"),
            ("metadata[plan]", "pro"),
            ("line_items[0][price]", "price_x"),
            ("line_items[0][quantity]", "2"),
            ("expand[]", "customer"),
            ("expand[]", "subscription"),
            ("items[1][id]", "si_2"),
            ("items[0][id]", "si_1"),
            ("empty", ""),
        ]
    )
    assert params == {
        "email": "a@b.c",
        "metadata": {"plan": "pro"},
        "line_items": [{"price": "price_x", "quantity": "2"}],
        "expand": ["customer", "subscription"],
        "items": [{"id": "si_1"}, {"id": "si_2"}],
        "empty": "",
    }
    with pytest.raises(ApiError):
        parse_form([("a", "1"), ("a[b]", "2")])


# --- customers, auth, errors ------------------------------------------------------------------


async def test_customer_create_list_retrieve(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    created = await double_client.v1.customers.create_async(
        {"email": "ann@example.com", "name": "Ann", "metadata": {"user": "u1"}}
    )
    await double_client.v1.customers.create_async({"email": "bob@example.com"})
    assert created.id.startswith("cus_") and created.object == "customer"
    assert created["metadata"]["user"] == "u1" and created.livemode is False
    assert abs(created.created - time.time()) < 5
    listed = await double_client.v1.customers.list_async({"email": "ann@example.com"})
    assert [c.id for c in listed.data] == [created.id]
    assert listed["object"] == "list" and listed.url == "/v1/customers" and not listed.has_more
    again = await double_client.v1.customers.retrieve_async(created.id)
    assert again.email == "ann@example.com" and again.name == "Ann"
    updated = await double_client.v1.customers.update_async(created.id, {"name": "Ann B"})
    assert updated.name == "Ann B"
    assert double.calls[0] == ("POST", "/v1/customers")
    assert ("GET", f"/v1/customers/{created.id}") in double.calls
    assert [e["type"] for e in double.events] == [
        "customer.created",
        "customer.created",
        "customer.updated",
    ]
    assert double.events[-1]["data"]["previous_attributes"] == {"name": "Ann"}


async def test_bad_or_missing_key_is_401(
    double_server: TestServer, http: aiohttp.ClientSession
) -> None:
    wrong = stripe.AIOHTTPClient(timeout=10.0)
    bad = stripe.StripeClient(
        "sk_test_wrong1234",
        http_client=wrong,
        max_network_retries=0,
        base_addresses={"api": str(double_server.make_url("/")).rstrip("/")},
    )
    try:
        with pytest.raises(stripe.AuthenticationError) as info:
            await bad.v1.customers.list_async()
    finally:
        await wrong.close_async()  # type: ignore[no-untyped-call]
    assert info.value.http_status == 401
    assert "Invalid API Key provided: sk_test_*****1234" in str(info.value)
    async with http.get(double_server.make_url("/v1/customers")) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert "did not provide an API key" in body["error"]["message"]


async def test_unknown_id_is_404(double_client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await double_client.v1.customers.retrieve_async("cus_nope")
    assert info.value.http_status == 404 and info.value.code == "resource_missing"
    assert info.value.param == "id" and "No such customer: 'cus_nope'" in str(info.value)
    with pytest.raises(stripe.InvalidRequestError):
        await double_client.v1.subscriptions.retrieve_async("sub_nope")
    with pytest.raises(stripe.InvalidRequestError) as bad_param:
        await double_client.v1.billing_portal.sessions.create_async({"customer": "cus_nope"})
    assert bad_param.value.http_status == 400 and bad_param.value.param == "customer"


async def test_unrecognized_url_is_stripe_404(
    double_server: TestServer, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with http.get(double_server.make_url("/v1/nothing"), headers=headers) as resp:
        assert resp.status == 404
        assert "Unrecognized request URL" in (await resp.json())["error"]["message"]


async def test_customer_delete_cancels_subscriptions(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus, sub = subscriber(double, "gone@example.com")
    deleted = await double_client.v1.customers.delete_async(cus["id"])
    assert deleted.deleted is True and deleted.id == cus["id"]
    assert double.subscriptions[sub["id"]]["status"] == "canceled"
    again = await double_client.v1.customers.retrieve_async(cus["id"])
    assert again["deleted"] is True
    assert [e["type"] for e in double.events] == [
        "customer.subscription.deleted",
        "customer.deleted",
    ]


# --- catalog ----------------------------------------------------------------------------------


async def test_prices_and_products(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    assert double.default_price_id == "price_demo_monthly"
    price = await double_client.v1.prices.retrieve_async(
        "price_demo_monthly", {"expand": ["product"]}
    )
    assert price.unit_amount == 1900 and price.currency == "usd"
    assert price.recurring is not None and price.recurring.interval == "month"
    assert not isinstance(price.product, str) and price.product.name == "PatentLLM Pro"
    yearly = await double_client.v1.prices.retrieve_async("price_demo_yearly")
    assert yearly.unit_amount == 19000 and yearly.product == "prod_demo"
    listed = await double_client.v1.prices.list_async({"active": True, "product": "prod_demo"})
    assert {p.id for p in listed.data} == {"price_demo_monthly", "price_demo_yearly"}
    product = await double_client.v1.products.retrieve_async("prod_demo")
    assert product.name == "PatentLLM Pro"


def test_prices_overridable() -> None:
    double = StripeDouble(
        prices=[{"id": "price_a", "unit_amount": 500, "product": "prod_a", "product_name": "A"}]
    )
    assert double.default_price_id == "price_a"
    assert list(double.prices) == ["price_a"] and double.products["prod_a"]["name"] == "A"


# --- subscriptions ----------------------------------------------------------------------------


async def test_subscription_list_default_excludes_canceled(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    customer_id, live, dead = live_and_canceled(double, "c@example.com")
    default = await double_client.v1.subscriptions.list_async({"customer": customer_id})
    assert [s.id for s in default.data] == [live]
    everything = await double_client.v1.subscriptions.list_async(
        {"customer": customer_id, "status": "all", "limit": 10}
    )
    assert [s.id for s in everything.data] == [dead, live]  # newest first
    canceled = await double_client.v1.subscriptions.list_async({"status": "canceled"})
    assert [s.id for s in canceled.data] == [dead]
    by_price = await double_client.v1.subscriptions.list_async(
        {"status": "all", "price": "price_demo_yearly"}
    )
    assert [s.id for s in by_price.data] == [dead]
    with pytest.raises(stripe.InvalidRequestError):
        await double_client.v1.subscriptions.list_async({"status": "bogus"})


async def test_pagination_with_starting_after(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    ids = [double.create_customer(f"u{i}@example.com")["id"] for i in range(5)]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = await double_client.v1.customers.list_async(params)  # type: ignore[arg-type]
        seen += [c.id for c in page.data]
        if not page.has_more:
            break
        params = {"limit": 2, "starting_after": page.data[-1].id}
    assert seen == list(reversed(ids))
    auto = [
        c.id
        async for c in (
            await double_client.v1.customers.list_async({"limit": 2})
        ).auto_paging_iter()
    ]
    assert auto == list(reversed(ids))


async def test_subscription_shape_and_update(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus, seeded = subscriber(double, "s@example.com")
    sub = await double_client.v1.subscriptions.retrieve_async(seeded["id"])
    item = sub["items"].data[0]
    assert sub.object == "subscription" and sub.customer == cus["id"] and sub.status == "active"
    assert item.object == "subscription_item" and item.price.id == "price_demo_monthly"
    assert item.price.object == "price" and item.id.startswith("si_")
    assert item.current_period_end > item.current_period_start
    assert "current_period_end" not in sub  # current API: on the items only
    assert str(sub["latest_invoice"]).startswith("in_")
    updated = await double_client.v1.subscriptions.update_async(
        seeded["id"],
        {
            "cancel_at_period_end": True,
            "metadata": {"k": "v"},
            "pause_collection": {"behavior": "void"},
        },
    )
    assert updated.cancel_at_period_end is True
    assert updated.cancel_at == item.current_period_end
    assert updated.pause_collection is not None
    assert updated.pause_collection.behavior == "void" and updated.metadata["k"] == "v"
    with pytest.raises(stripe.InvalidRequestError):  # all or nothing
        await double_client.v1.subscriptions.update_async(
            seeded["id"],
            {"cancel_at_period_end": False, "pause_collection": {"behavior": "bogus"}},
        )
    assert double.subscriptions[seeded["id"]]["cancel_at_period_end"] is True
    switched = await double_client.v1.subscriptions.update_async(
        seeded["id"],
        {
            "items": [{"id": item.id, "price": "price_demo_yearly"}],
            "pause_collection": "",
        },
    )
    assert switched["items"].data[0].price.id == "price_demo_yearly"
    assert switched.pause_collection is None
    canceled = await double_client.v1.subscriptions.cancel_async(seeded["id"])
    assert canceled.status == "canceled" and canceled.ended_at is not None
    assert [e["type"] for e in double.events] == [
        "customer.subscription.updated",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ]


async def test_legacy_plan_and_top_level_period_shapes(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus, legacy = subscriber(double, "old@example.com", legacy_plan=True)
    old_api = double.create_subscription(cus["id"], "price_demo_yearly", top_level_period=True)
    sub = await double_client.v1.subscriptions.retrieve_async(legacy["id"])
    item = sub["items"].data[0]
    assert "price" not in item and item.plan.id == "price_demo_monthly"
    assert item.plan.object == "plan" and item.plan.amount == 1900
    top = await double_client.v1.subscriptions.retrieve_async(old_api["id"])
    assert top["current_period_end"] == top["items"].data[0].current_period_end
    assert top["current_period_end"] - top["current_period_start"] >= 365 * 86_400
    await double.advance_time(366 * 86_400)
    renewed = double.subscriptions[old_api["id"]]
    assert renewed["current_period_start"] == top["current_period_end"]
    assert renewed["items"]["data"][0]["current_period_end"] == renewed["current_period_end"]


@pytest.mark.parametrize(
    ("status", "legacy", "entitled"),
    [
        ("active", False, True),
        ("active", True, True),  # a legacy item: the plan's product
        ("paused", False, True),  # Stripe keeps a paused subscription's entitlements
        ("past_due", False, True),
        ("incomplete", False, False),
        ("canceled", False, False),
    ],
)
async def test_active_entitlements_are_the_union_of_unended_subscriptions(
    double_client: stripe.StripeClient,
    double: StripeDouble,
    status: str,
    legacy: bool,
    entitled: bool,
) -> None:
    """Whatever the price: an account's every price entitles (the gate must filter)."""
    double.entitlements.seed()
    double.add_price({"id": "price_unsold", "unit_amount": 100, "product": "prod_demo"})
    cus = double.create_customer("e@example.com")
    double.create_subscription(cus["id"], "price_basic_monthly")
    double.create_subscription(cus["id"], "price_unsold", status=status, legacy_plan=legacy)
    listed = await double_client.v1.entitlements.active_entitlements.list_async(
        {"customer": cus["id"]}
    )
    keys = [e.lookup_key for e in listed.data]
    assert keys == (["analysis", "export", "search"] if entitled else ["search"])
    assert all(e.object == "entitlements.active_entitlement" for e in listed.data)


async def test_entitlement_features_list_newest_first_in_stripes_shape(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    double.entitlements.seed()
    listed = await double_client.v1.entitlements.features.list_async()
    assert [f.id for f in listed.data] == list(reversed(double.entitlements.features))
    assert {f.lookup_key for f in listed.data} == {"search", "analysis", "export"}
    assert all(f.object == "entitlements.feature" for f in listed.data)
    assert listed.url == "/v1/entitlements/features"


async def test_trial_subscription(double: StripeDouble) -> None:
    _, sub = subscriber(double, "t@example.com", trial_days=14)
    assert sub["status"] == "trialing"
    assert sub["trial_end"] - sub["trial_start"] == 14 * 86_400
    assert double.period(sub)[1] == sub["trial_end"]
    await double.advance_time(15 * 86_400)
    assert sub["status"] == "active" and double.period(sub)[0] == sub["trial_end"]


async def test_cancel_at_period_end_then_advance_time(
    double_client: stripe.StripeClient, double: StripeDouble, receiver: Receiver
) -> None:
    _, seeded = subscriber(double, "bye@example.com")
    await double_client.v1.subscriptions.update_async(seeded["id"], {"cancel_at_period_end": True})
    await double.wait_deliveries()
    assert receiver.types() == ["customer.subscription.updated"]
    await double.advance_time(10 * 86_400)
    assert double.subscriptions[seeded["id"]]["status"] == "active"
    await double.advance_time(25 * 86_400)
    sub = await double_client.v1.subscriptions.retrieve_async(seeded["id"])
    assert sub.status == "canceled" and sub.ended_at == double.period(seeded)[1]
    assert receiver.types()[-1] == "customer.subscription.deleted"
    deleted = await double_client.v1.events.list_async({"type": "customer.subscription.deleted"})
    assert [e.data.object.id for e in deleted.data] == [seeded["id"]]
    assert double.now() >= int(time.time()) + 35 * 86_400 - 1


async def test_renewal_emits_invoice_paid(double: StripeDouble, receiver: Receiver) -> None:
    cus, sub = subscriber(double, "r@example.com")
    first_end = double.period(sub)[1]
    await double.advance_time(32 * 86_400)
    assert sub["status"] == "active" and double.period(sub)[0] == first_end
    assert receiver.types() == ["customer.subscription.updated", "invoice.paid"]
    invoice = double.invoices[sub["latest_invoice"]]
    assert invoice["billing_reason"] == "subscription_cycle" and invoice["amount_paid"] == 1900
    assert invoice["customer"] == cus["id"] and invoice["subscription"] == sub["id"]


async def test_cancel_at_after_renewals(
    double_client: stripe.StripeClient, double: StripeDouble, receiver: Receiver
) -> None:
    _, sub = subscriber(double, "later@example.com")
    first_end = double.period(sub)[1]
    await double_client.v1.subscriptions.update_async(sub["id"], {"cancel_at": first_end + 86_400})
    await double.wait_deliveries()
    await double.advance_time(90 * 86_400)
    assert sub["status"] == "canceled" and sub["ended_at"] == first_end + 86_400
    assert receiver.types() == [
        "customer.subscription.updated",  # the API update
        "customer.subscription.updated",  # one renewal before cancel_at
        "invoice.paid",
        "customer.subscription.deleted",
    ]


async def test_set_status(double: StripeDouble, receiver: Receiver) -> None:
    _, sub = subscriber(double, "p@example.com")
    await double.set_status(sub["id"], "past_due")
    await double.set_status(sub["id"], "active", pause_collection={"behavior": "void"})
    await double.set_status(sub["id"], "active", cancel_at_period_end=True)
    assert sub["cancel_at"] == double.period(sub)[1]
    await double.set_status(sub["id"], "canceled")
    assert receiver.types() == ["customer.subscription.updated"] * 3 + [
        "customer.subscription.deleted"
    ]
    first = receiver.events()[0]
    assert first.data.object.status == "past_due"
    assert first.data["previous_attributes"]["status"] == "active"
    with pytest.raises(ValueError):
        await double.set_status(sub["id"], "bogus")


# --- checkout, webhooks, portal ---------------------------------------------------------------


async def test_checkout_pay_flow_delivers_signed_webhooks(
    double_client: stripe.StripeClient,
    double: StripeDouble,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    session = await double_client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "line_items": [{"price": "price_demo_monthly", "quantity": 1}],
            "customer_email": "new@example.com",
            "client_reference_id": "user-42",
            "success_url": "http://gate.test/_gate/success?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": "http://gate.test/_gate/subscribe",
            "metadata": {"user": "user-42"},
        }
    )
    assert session.id.startswith("cs_test_") and session.status == "open"
    assert session.payment_status == "unpaid" and session.mode == "subscription"
    assert session.url == f"{double.public_url}/checkout/{session.id}"
    async with http.get(session.url) as page:
        text = await page.text()
    assert page.status == 200 and "PatentLLM Pro" in text and "$19.00 / month" in text
    for marker in ('id="pay"', 'id="cancel"', 'id="email"', 'value="new@example.com"'):
        assert marker in text
    async with http.post(f"{session.url}/cancel", allow_redirects=False) as cancel:
        assert cancel.status == 303
        assert cancel.headers["Location"] == "http://gate.test/_gate/subscribe"
    async with http.post(
        f"{session.url}/pay", data={"email": "new@example.com"}, allow_redirects=False
    ) as paid:
        assert paid.status == 303
        assert paid.headers["Location"] == (
            f"http://gate.test/_gate/success?session_id={session.id}"
        )
    # delivered before the redirect was answered
    assert receiver.types() == [
        "customer.created",
        "customer.subscription.created",
        "invoice.paid",
        "checkout.session.completed",
    ]
    events = receiver.events()  # signatures verify with the webhook secret
    assert all(e.api_version == "2026-10-28.endive" and e.livemode is False for e in events)
    assert [d[1] for d in double.deliveries] == [200] * 4
    done = await double_client.v1.checkout.sessions.retrieve_async(
        session.id, {"expand": ["subscription", "customer"]}
    )
    assert done.status == "complete" and done.payment_status == "paid"
    assert done.client_reference_id == "user-42" and done.url is None
    sub, cus = done["subscription"], done["customer"]
    assert sub.status == "active" and cus.email == "new@example.com"
    assert sub.customer == cus.id and events[-1].data.object.subscription == sub.id
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(receiver.bodies[0][0], receiver.bodies[0][1], "whsec_x")
    # paying twice (double click) changes nothing
    async with http.post(
        f"{session.url}/pay", data={"email": "new@example.com"}, allow_redirects=False
    ) as again:
        assert again.status == 303
    assert len(double.subscriptions) == 1


async def test_checkout_with_existing_customer_and_bad_input(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    cus = double.create_customer("known@example.com")
    session = await double_client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": cus["id"],
            "line_items": [{"price": "price_demo_yearly", "quantity": 1}],
            "success_url": "http://gate.test/ok",
        }
    )
    paid = await double.complete_checkout(session.id)
    assert paid["customer"] == cus["id"] and len(double.customers) == 1
    assert double.subscriptions[paid["subscription"]]["items"]["data"][0]["price"]["id"] == (
        "price_demo_yearly"
    )
    with pytest.raises(stripe.InvalidRequestError) as missing_price:
        await double_client.v1.checkout.sessions.create_async(
            {
                "mode": "subscription",
                "success_url": "http://gate.test/ok",
                "line_items": [{"price": "price_nope", "quantity": 1}],
            }
        )
    assert missing_price.value.param == "line_items[0][price]"
    open_session = await double_client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "success_url": "http://gate.test/ok",
            "line_items": [{"price": "price_demo_monthly", "quantity": 1}],
        }
    )
    async with http.post(
        f"{open_session.url}/pay", data={"email": "nope"}, allow_redirects=False
    ) as bad:
        assert bad.status == 400 and 'id="error"' in await bad.text()


async def test_webhook_delivery_errors_are_recorded(double: StripeDouble) -> None:
    double.webhook_urls = ["http://127.0.0.1:9/hook"]  # discard port: nothing listens
    evt = await double.emit("customer.updated", {"id": "cus_x", "object": "customer"})
    assert evt["id"].startswith("evt_") and double.deliveries == [(evt["id"], 0)]
    double.deliver_webhooks = False
    await double.emit("customer.updated", {"id": "cus_x", "object": "customer"})
    assert len(double.deliveries) == 1 and len(double.events) == 2


async def test_receiver_error_status_is_recorded(
    double_server: TestServer, double: StripeDouble, receiver: Receiver
) -> None:
    receiver.status = 500
    evt = await double.emit("invoice.paid", {"id": "in_x", "object": "invoice"})
    assert double.deliveries == [(evt["id"], 500)]


async def test_portal_session_and_page_actions(
    double_client: stripe.StripeClient,
    double: StripeDouble,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    cus, sub = subscriber(double, "portal@example.com")
    portal = await double_client.v1.billing_portal.sessions.create_async(
        {"customer": cus["id"], "return_url": "http://gate.test/_gate/account"}
    )
    assert portal.object == "billing_portal.session" and portal.id.startswith("bps_")
    assert portal.url == f"{double.public_url}/portal/{portal.id}"
    async with http.get(portal.url) as page:
        text = await page.text()
    for marker in (
        'id="cancel-at-period-end"',
        'id="cancel-now"',
        'id="switch-price"',
        'id="return"',
        'href="http://gate.test/_gate/account"',
        "Renews on",
    ):
        assert marker in text
    action = f"{portal.url}/subscriptions/{sub['id']}"
    async with http.post(f"{action}/cancel-at-period-end", allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == f"/portal/{portal.id}"
    assert sub["cancel_at_period_end"] is True
    async with http.get(portal.url) as page:
        text = await page.text()
    assert 'id="resume"' in text and "Ends on" in text
    async with http.post(f"{action}/resume", allow_redirects=False) as resp:
        assert resp.status == 303
    assert sub["cancel_at_period_end"] is False and sub["cancel_at"] is None
    async with http.post(
        f"{action}/switch-price", data={"price": "price_demo_yearly"}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    assert sub["items"]["data"][0]["price"]["id"] == "price_demo_yearly"
    async with http.post(f"{action}/cancel-now", allow_redirects=False) as resp:
        assert resp.status == 303
    assert sub["status"] == "canceled"
    assert receiver.types() == ["customer.subscription.updated"] * 3 + [
        "customer.subscription.deleted"
    ]


# --- events -----------------------------------------------------------------------------------


async def test_events_list_and_retrieve(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    first = await double.emit("customer.created", {"id": "cus_1", "object": "customer"})
    await double.advance_time(100)
    second = await double.emit("invoice.paid", {"id": "in_1", "object": "invoice"})
    listed = await double_client.v1.events.list_async()
    assert [e.id for e in listed.data] == [second["id"], first["id"]]
    typed = await double_client.v1.events.list_async({"type": "invoice.*"})
    assert [e.id for e in typed.data] == [second["id"]]
    recent = await double_client.v1.events.list_async({"created": {"gte": second["created"]}})
    assert [e.id for e in recent.data] == [second["id"]]
    got = await double_client.v1.events.retrieve_async(first["id"])
    assert got.type == "customer.created" and got.data.object.id == "cus_1"
    assert got["request"]["id"] is None


# --- faults and idempotency -------------------------------------------------------------------


async def test_faults(double_client: stripe.StripeClient, double: StripeDouble) -> None:
    double.faults.fail_next(1, 500)
    with pytest.raises(stripe.APIError) as server_error:
        await double_client.v1.customers.list_async()
    assert server_error.value.http_status == 500
    await double_client.v1.customers.list_async()  # one fault only
    double.faults.fail_next(1, 429)
    with pytest.raises(stripe.RateLimitError):
        await double_client.v1.customers.list_async()
    double.faults.drop_next(1)
    with pytest.raises(stripe.APIConnectionError):
        await double_client.v1.customers.list_async()
    double.faults.fail_always(503)
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            await double_client.v1.customers.list_async()
    double.faults.reset()
    double.faults.latency = 0.3
    started = time.monotonic()
    await double_client.v1.customers.list_async()
    assert time.monotonic() - started >= 0.3
    double.faults.reset()
    assert len(double.calls) == 7  # one per call: a drop is not re-sent by aiohttp


async def test_latency_beyond_client_timeout(
    double_server: TestServer, double: StripeDouble
) -> None:
    http = stripe.AIOHTTPClient(timeout=0.2)
    slow = stripe.StripeClient(
        KEY,
        http_client=http,
        max_network_retries=0,
        base_addresses={"api": str(double_server.make_url("/")).rstrip("/")},
    )
    double.faults.latency = 1.0
    try:
        with pytest.raises((stripe.APIConnectionError, asyncio.TimeoutError)):
            await slow.v1.customers.list_async()
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
        double.faults.reset()


async def test_idempotency_key(double_client: stripe.StripeClient, double: StripeDouble) -> None:
    opts: Any = {"idempotency_key": "key-1"}
    first = await double_client.v1.customers.create_async({"email": "i@example.com"}, opts)
    again = await double_client.v1.customers.create_async({"email": "i@example.com"}, opts)
    assert first.id == again.id and len(double.customers) == 1
    assert again.last_response is not None
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    with pytest.raises(stripe.IdempotencyError):
        await double_client.v1.customers.create_async({"email": "other@example.com"}, opts)
    double.faults.fail_next(1)  # a faulted call is not saved: the retry executes
    with pytest.raises(stripe.APIError):
        await double_client.v1.customers.create_async(
            {"email": "j@example.com"}, {"idempotency_key": "key-2"}
        )
    made = await double_client.v1.customers.create_async(
        {"email": "j@example.com"}, {"idempotency_key": "key-2"}
    )
    assert made.email == "j@example.com" and len(double.customers) == 2


# --- shapes -----------------------------------------------------------------------------------


async def _sample_objects(
    double_client: stripe.StripeClient, double: StripeDouble
) -> dict[str, Any]:
    cus = await double_client.v1.customers.create_async({"email": "shape@example.com"})
    seeded = double.create_subscription(cus.id, "price_demo_monthly")
    sub = await double_client.v1.subscriptions.retrieve_async(seeded["id"])
    session = await double_client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": cus.id,
            "success_url": "http://gate.test/ok",
            "line_items": [{"price": "price_demo_monthly", "quantity": 1}],
        }
    )
    portal = await double_client.v1.billing_portal.sessions.create_async({"customer": cus.id})
    price = await double_client.v1.prices.retrieve_async("price_demo_monthly")
    events = await double_client.v1.events.list_async({"limit": 1})
    return {
        "customer": as_dict(cus),
        "subscription": as_dict(sub),
        "subscription_item": as_dict(sub["items"].data[0]),
        "checkout.session": as_dict(session),
        "billing_portal.session": as_dict(portal),
        "price": as_dict(price),
        "event": as_dict(events.data[0]),
    }


async def test_shapes_have_the_fixture_keys(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    samples = await _sample_objects(double_client, double)
    expected = {kind: set(keys) for kind, keys in FIXTURE_KEYS.items()}
    if FIXTURES.exists():
        resources = json.loads(FIXTURES.read_text())["resources"]
        for kind in expected:
            expected[kind] |= set(resources[kind])
    for kind, keys in expected.items():
        wanted = keys - OMITTED_KEYS.get(kind, set())
        missing = wanted - set(samples[kind])
        assert not missing, f"{kind} lacks {sorted(missing)}"
        assert samples[kind]["object"] == kind
    sub = samples["subscription"]
    assert sub["items"]["object"] == "list" and sub["items"]["url"].startswith(
        "/v1/subscription_items?subscription="
    )
    assert isinstance(sub["created"], int) and sub["livemode"] is False


# --- helpers over HTTP ------------------------------------------------------------------------


async def test_http_helpers(
    double_server: TestServer, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    _, sub = subscriber(double, "h@example.com")
    before = double.now()
    async with http.post(double_server.make_url("/_double/advance?seconds=3600")) as resp:
        assert resp.status == 200 and (await resp.json())["now"] >= before + 3600
    async with http.post(
        double_server.make_url(f"/_double/subscriptions/{sub['id']}/status"),
        data={"status": "past_due"},
    ) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "past_due"
    async with http.post(
        double_server.make_url("/_double/faults"),
        data={"fail_next": "2", "status": "429", "latency": "0.01"},
    ) as resp:
        faults = await resp.json()
    assert faults["fail_next"] == 2 and faults["fail_status"] == 429
    async with http.post(double_server.make_url("/_double/faults"), data={"reset": "1"}) as resp:
        assert (await resp.json())["fail_next"] == 0
    async with http.get(double_server.make_url("/_double/state")) as resp:
        state = await resp.json()
    assert state["subscriptions"][sub["id"]]["status"] == "past_due"
    assert state["events"][-1]["type"] == "customer.subscription.updated"
    async with http.get(double_server.make_url("/")) as resp:
        assert resp.status == 200 and sub["id"] in await resp.text()
    async with http.post(
        double_server.make_url("/_double/advance"),
        data={"seconds": "60", "next": "//evil.test/"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/"
