"""The Stripe double's catalog, Checkout options (trials with and without a card, promotion
codes, automatic tax) and portal ``flow_data``, driven by the real ``stripe`` library and plain
HTTP for the hosted pages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.demo.stripe_double import StripeDouble

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "stripe" / "fixtures3.json"
DAY = 86_400
GATE = "http://gate.test/_gate"


@pytest.fixture
async def hooks(aiohttp_server: AiohttpServer, double: StripeDouble) -> list[str]:
    """The event types the double delivers, in order."""
    seen: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(json.loads(await request.read())["type"])
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    srv = await aiohttp_server(app, host="127.0.0.1")
    double.webhook_urls = [str(srv.make_url("/hook"))]
    return seen


async def checkout(double_client: stripe.StripeClient, **extra: Any) -> stripe.checkout.Session:
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": extra.pop("price", "price_demo_monthly"), "quantity": 1}],
        "customer_email": "new@example.com",
        "success_url": f"{GATE}/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{GATE}/subscribe",
        **extra,
    }
    return await double_client.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]


async def pay(
    http: aiohttp.ClientSession, session: stripe.checkout.Session, **fields: str
) -> tuple[int, str]:
    async with http.post(
        f"{session.url}/pay",
        data={"email": "new@example.com", **fields},
        allow_redirects=False,
    ) as resp:
        return resp.status, await resp.text()


async def page(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()


# --- catalog ----------------------------------------------------------------------------------


async def test_catalog_has_two_products_with_marketing_features(
    double_client: stripe.StripeClient,
) -> None:
    prices = {p.id: p for p in (await double_client.v1.prices.list_async({"limit": 10})).data}
    assert set(prices) == {
        "price_demo_monthly",
        "price_demo_yearly",
        "price_basic_monthly",
        "price_basic_yearly",
    }
    assert (
        prices["price_basic_monthly"].unit_amount,
        prices["price_basic_yearly"].unit_amount,
    ) == (
        900,
        9000,
    )
    pro = await double_client.v1.products.retrieve_async("prod_demo")
    basic = await double_client.v1.products.retrieve_async("prod_basic")
    assert (pro.name, basic.name) == ("PatentLLM Pro", "PatentLLM Basic")
    assert [f.name for f in pro.marketing_features][:2] == [
        "Patent search",
        "LLM analysis of claims",
    ]
    assert all(set(f.to_dict()) == {"name"} for f in basic.marketing_features)
    expanded = await double_client.v1.prices.retrieve_async(
        "price_demo_yearly", {"expand": ["product"]}
    )
    assert expanded.product.id == "prod_demo"  # type: ignore[union-attr]


async def test_promotion_code_and_coupon_have_stripes_shape(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    found = await double_client.v1.promotion_codes.list_async({"code": "welcome20"})
    assert [p.code for p in found.data] == ["WELCOME20"]  # the default demo code
    promo = await double_client.v1.promotion_codes.retrieve_async(found.data[0].id)
    coupon = await double_client.v1.coupons.retrieve_async(promo.promotion.coupon)  # type: ignore[arg-type]
    assert coupon.percent_off == 20 and coupon.duration == "once"
    if FIXTURES.exists():  # the same keys as Stripe's own examples
        resources = json.loads(FIXTURES.read_text())["resources"]
        assert set(promo.to_dict()) == set(resources["promotion_code"])
        assert set(coupon.to_dict()) == set(resources["coupon"])
        discount = double.add_promotion_code("X", amount_off=100)
        assert discount["object"] == "promotion_code"


# --- Checkout options ---------------------------------------------------------------------------


async def test_checkout_records_and_validates_the_options(
    double_client: stripe.StripeClient,
) -> None:
    session = await checkout(
        double_client,
        allow_promotion_codes=True,
        automatic_tax={"enabled": True},
        payment_method_collection="if_required",
        subscription_data={
            "trial_period_days": 14,
            "trial_settings": {"end_behavior": {"missing_payment_method": "cancel"}},
        },
    )
    assert session.allow_promotion_codes is True
    assert session.payment_method_collection == "if_required"
    assert session.automatic_tax.enabled is True
    assert session.automatic_tax.liability.type == "self"  # type: ignore[union-attr]
    plain = await checkout(double_client)
    assert plain.allow_promotion_codes is False and plain.automatic_tax.enabled is False
    assert plain.payment_method_collection == "always"

    bad: list[dict[str, Any]] = [
        {"payment_method_collection": "sometimes"},
        {"subscription_data": {"trial_period_days": 0}},
        {"subscription_data": {"trial_period_days": 731}},
        {
            "subscription_data": {
                "trial_settings": {"end_behavior": {"missing_payment_method": "x"}}
            }
        },
        {"allow_promotion_codes": True, "discounts": [{"coupon": "X"}]},
        {"automatic_tax": {"liability": {"type": "self"}}},
    ]
    for extra in bad:
        with pytest.raises(stripe.InvalidRequestError) as err:
            await checkout(double_client, **extra)
        assert err.value.http_status == 400, extra


async def test_trial_with_a_card_converts_to_active(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    session = await checkout(
        double_client,
        payment_method_collection="if_required",
        subscription_data={
            "trial_period_days": 7,
            "trial_settings": {"end_behavior": {"missing_payment_method": "cancel"}},
        },
    )
    text = await page(http, str(session.url))
    assert 'id="trial"' in text and "7-day free trial" in text
    assert 'id="pay-without-card"' in text and 'id="card"' in text
    assert await pay(http, session) == (303, "303: See Other")
    sub = next(iter(double.subscriptions.values()))
    assert sub["status"] == "trialing" and sub["default_payment_method"].startswith("pm_")
    assert sub["trial_end"] - sub["trial_start"] == 7 * DAY
    done = await double_client.v1.checkout.sessions.retrieve_async(session.id)
    assert done.payment_status == "no_payment_required"
    await double.advance_time(8 * DAY)
    assert sub["status"] == "active"


@pytest.mark.parametrize(
    ("behavior", "status", "events"),
    [
        ("cancel", "canceled", ["customer.subscription.deleted"]),
        ("pause", "paused", ["customer.subscription.paused", "customer.subscription.updated"]),
    ],
)
async def test_trial_without_a_card_ends_as_configured(
    double_client: stripe.StripeClient,
    double: StripeDouble,
    http: aiohttp.ClientSession,
    hooks: list[str],
    behavior: str,
    status: str,
    events: list[str],
) -> None:
    session = await checkout(
        double_client,
        payment_method_collection="if_required",
        subscription_data={
            "trial_period_days": 5,
            "trial_settings": {"end_behavior": {"missing_payment_method": behavior}},
        },
    )
    assert (await pay(http, session, without_card="1"))[0] == 303
    sub = next(iter(double.subscriptions.values()))
    assert sub["status"] == "trialing" and sub["default_payment_method"] is None
    assert sub["trial_settings"]["end_behavior"]["missing_payment_method"] == behavior
    hooks.clear()
    await double.advance_time(4 * DAY)
    assert sub["status"] == "trialing" and hooks == []
    await double.advance_time(2 * DAY)
    assert sub["status"] == status
    assert hooks == events
    assert not [i for i in double.invoices.values() if i["billing_reason"] == "subscription_cycle"]


async def test_card_is_required_without_a_card_free_trial(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    trial_with_card = await checkout(double_client, subscription_data={"trial_period_days": 5})
    text = await page(http, str(trial_with_card.url))
    assert 'id="pay-without-card"' not in text
    status, body = await pay(http, trial_with_card, without_card="1")
    assert status == 400 and "Enter your card details." in body
    no_trial = await checkout(double_client, payment_method_collection="if_required")
    status, body = await pay(http, no_trial, without_card="1")
    assert status == 400 and not double.subscriptions


async def test_no_trial_unless_the_session_asks_for_one(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    """Stripe: a Checkout Session starts a trial only with ``subscription_data.trial_period_days``
    or ``subscription_data.trial_end``; a price's own (legacy) trial days do not count."""
    double.prices["price_demo_monthly"]["recurring"]["trial_period_days"] = 14
    session = await checkout(double_client, payment_method_collection="if_required")
    text = await page(http, str(session.url))
    assert 'id="trial"' not in text and 'id="pay-without-card"' not in text
    status, body = await pay(http, session, without_card="1")
    assert status == 400 and "Enter your card details." in body
    assert await pay(http, session) == (303, "303: See Other")
    sub = next(iter(double.subscriptions.values()))
    assert sub["status"] == "active" and sub["trial_start"] is None and sub["trial_end"] is None
    assert double.invoices[sub["latest_invoice"]]["amount_paid"] == 1900


async def test_trial_end_starts_a_trial_until_then(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    end = double.now() + 3 * DAY
    session = await checkout(
        double_client,
        payment_method_collection="if_required",
        subscription_data={"trial_end": end},
    )
    assert 'id="pay-without-card"' in await page(http, str(session.url))
    assert (await pay(http, session, without_card="1"))[0] == 303
    sub = next(iter(double.subscriptions.values()))
    assert sub["status"] == "trialing" and sub["trial_end"] == end
    assert double.period(sub)[1] == end
    # Stripe: trial_end "has to be at least 48 hours in the future", and one of the two only.
    bad: list[dict[str, Any]] = [
        {"trial_end": double.now() + DAY},
        {"trial_end": end, "trial_period_days": 3},
    ]
    for sub_data in bad:
        with pytest.raises(stripe.InvalidRequestError) as err:
            await checkout(double_client, subscription_data=sub_data)
        assert err.value.http_status == 400, sub_data


@pytest.mark.parametrize(
    ("coupon", "card_needed"),
    [({"percent_off": 100}, False), ({"percent_off": 50}, True), ({"amount_off": 1900}, False)],
)
async def test_if_required_skips_the_card_only_when_nothing_is_due(
    double_client: stripe.StripeClient,
    double: StripeDouble,
    http: aiohttp.ClientSession,
    coupon: dict[str, Any],
    card_needed: bool,
) -> None:
    """``payment_method_collection=if_required``: no card when the session's total due is 0
    (a trial, or a discount that takes the whole first invoice); a card whenever money is due."""
    double.add_promotion_code("FIRSTFREE", duration="once", currency="usd", **coupon)
    session = await checkout(
        double_client, payment_method_collection="if_required", allow_promotion_codes=True
    )
    status, body = await pay(http, session, without_card="1", promotion_code="FIRSTFREE")
    if card_needed:
        assert status == 400 and "Enter your card details." in body
        assert not double.subscriptions
        return
    assert status == 303, body
    sub = next(iter(double.subscriptions.values()))
    assert sub["status"] == "active" and sub["default_payment_method"] is None
    assert double.invoices[sub["latest_invoice"]]["total"] == 0
    done = await double_client.v1.checkout.sessions.retrieve_async(session.id)
    assert done.payment_status == "no_payment_required" and done.amount_total == 0


async def test_promotion_code_discounts_the_invoice(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    session = await checkout(double_client, allow_promotion_codes=True)
    text = await page(http, str(session.url))
    assert 'id="promotion-code"' in text
    assert 'id="promotion-hint">Test double: try <code>WELCOME20</code>' in text  # the demo's
    status, body = await pay(
        http, session, email="typed@example.com", card="4000 0000 0000 0077", promotion_code="NOPE"
    )
    assert status == 400 and "This code is invalid." in body
    # The page comes back with what was typed (Stripe's does), not a blank form.
    assert 'id="email" value="typed@example.com"' in body
    assert 'id="card" value="4000 0000 0000 0077"' in body
    assert 'id="promotion-code" autocomplete="off" value="NOPE"' in body
    assert await pay(http, session, promotion_code="welcome20") == (303, "303: See Other")
    done = await double_client.v1.checkout.sessions.retrieve_async(session.id)
    assert done.amount_subtotal == 1900 and done.amount_total == 1520
    assert done.total_details.amount_discount == 380  # type: ignore[union-attr]
    promo = next(iter(double.promotion_codes.values()))
    assert done.discounts[0].promotion_code == promo["id"]  # type: ignore[index]
    assert promo["times_redeemed"] == 1
    invoice = await double_client.v1.invoices.retrieve_async(str(done.invoice))
    assert (invoice.subtotal, invoice.total, invoice.amount_paid) == (1900, 1520, 1520)
    assert invoice.total_discount_amounts[0].amount == 380  # type: ignore[index]
    # "once": the renewal is charged in full
    await double.advance_time(32 * DAY)
    renewal = [i for i in double.invoices.values() if i["billing_reason"] == "subscription_cycle"]
    assert renewal and renewal[0]["total"] == 1900


async def test_repeating_amount_off_code_and_limits(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    double.add_promotion_code(
        "TENOFF", amount_off=1000, duration="forever", max_redemptions=1, currency="usd"
    )
    double.add_promotion_code("OLD", percent_off=50, active=False)
    first = await checkout(double_client, allow_promotion_codes=True, price="price_demo_yearly")
    assert await pay(http, first, promotion_code="TENOFF") == (303, "303: See Other")
    inv = double.invoices[double.checkout_sessions[first.id]["invoice"]]
    assert inv["total"] == 19000 - 1000
    await double.advance_time(370 * DAY)  # forever: the renewal is discounted too
    renewal = [i for i in double.invoices.values() if i["billing_reason"] == "subscription_cycle"]
    assert renewal[0]["total"] == 18000
    second = await checkout(double_client, allow_promotion_codes=True)
    status, _ = await pay(http, second, promotion_code="TENOFF")  # redeemed once already
    assert status == 400
    status, _ = await pay(http, second, promotion_code="OLD")  # inactive
    assert status == 400
    not_allowed = await checkout(double_client)
    status, body = await pay(http, not_allowed, promotion_code="WELCOME20")
    assert status == 400 and "not accepted" in body


async def test_automatic_tax_is_marked_on_the_session(
    double_client: stripe.StripeClient, http: aiohttp.ClientSession
) -> None:
    session = await checkout(double_client, automatic_tax={"enabled": True})
    assert session.automatic_tax.status == "requires_location_inputs"
    assert 'id="tax"' in await page(http, str(session.url))
    await pay(http, session)
    done = await double_client.v1.checkout.sessions.retrieve_async(session.id)
    assert done.automatic_tax.enabled is True and done.automatic_tax.status == "complete"


# --- portal flow_data -------------------------------------------------------------------------


async def test_portal_payment_method_update_flow_pays_a_past_due_subscription(
    double_client: stripe.StripeClient,
    double: StripeDouble,
    http: aiohttp.ClientSession,
    hooks: list[str],
) -> None:
    cus = double.create_customer("late@example.com")
    sub = double.create_subscription(cus["id"], "price_demo_monthly")
    await double.set_status(sub["id"], "past_due")
    hooks.clear()
    portal = await double_client.v1.billing_portal.sessions.create_async(
        {
            "customer": cus["id"],
            "return_url": f"{GATE}/account",
            "flow_data": {
                "type": "payment_method_update",
                "after_completion": {
                    "type": "redirect",
                    "redirect": {"return_url": f"{GATE}/account?updated=1"},
                },
            },
        }
    )
    assert portal.flow.type == "payment_method_update"  # type: ignore[union-attr]
    assert portal.flow.after_completion.type == "redirect"  # type: ignore[union-attr]
    text = await page(http, portal.url)
    assert 'id="flow-payment-method-update"' in text and 'id="save-card"' in text
    assert 'id="flow-note"' in text
    async with http.post(f"{portal.url}/payment-method", allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == f"{GATE}/account?updated=1"
    assert sub["status"] == "active"
    assert double.customers[cus["id"]]["invoice_settings"]["default_payment_method"]
    assert hooks == ["customer.updated", "customer.subscription.updated"]
    # done: the session now shows the portal's home page
    assert 'id="flow-payment-method-update"' not in await page(http, portal.url)


async def test_portal_flow_data_is_validated_and_subscription_flows_land_on_their_screen(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    cus = double.create_customer("a@example.com")
    other = double.create_customer("b@example.com")
    sub = double.create_subscription(cus["id"], "price_basic_monthly")
    theirs = double.create_subscription(other["id"], "price_basic_monthly")
    bad: list[dict[str, Any]] = [
        {"type": "nope"},
        {"type": "subscription_update"},
        {"type": "subscription_update", "subscription_update": {"subscription": theirs["id"]}},
        {"type": "payment_method_update", "after_completion": {"type": "redirect"}},
    ]
    for flow in bad:
        with pytest.raises(stripe.InvalidRequestError) as err:
            await double_client.v1.billing_portal.sessions.create_async(
                {"customer": cus["id"], "flow_data": flow}  # type: ignore[arg-type]
            )
        assert err.value.http_status == 400, flow
    update = await double_client.v1.billing_portal.sessions.create_async(
        {
            "customer": cus["id"],
            "flow_data": {
                "type": "subscription_update",
                "subscription_update": {"subscription": sub["id"]},
            },
        }
    )
    text = await page(http, update.url)
    assert 'id="flow-subscription-update"' in text and 'id="switch-price"' in text
    cancel = await double_client.v1.billing_portal.sessions.create_async(
        {
            "customer": cus["id"],
            "flow_data": {
                "type": "subscription_cancel",
                "subscription_cancel": {"subscription": sub["id"]},
            },
        }
    )
    assert 'id="flow-subscription-cancel"' in await page(http, cancel.url)
    plain = await double_client.v1.billing_portal.sessions.create_async({"customer": cus["id"]})
    assert plain.flow is None


async def test_portal_confirm_flow_needs_the_subscriptions_item_and_confirms_its_price(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    cus = double.create_customer("c@example.com")
    sub = double.create_subscription(cus["id"], "price_basic_monthly")
    other = double.create_subscription(
        double.create_customer("d@example.com")["id"], "price_basic_monthly"
    )
    item = sub["items"]["data"][0]["id"]

    def confirm(items: list[dict[str, Any]] | None) -> dict[str, Any]:
        detail: dict[str, Any] = {"subscription": sub["id"]}
        if items is not None:
            detail["items"] = items
        return {
            "type": "subscription_update_confirm",
            "subscription_update_confirm": detail,
            "after_completion": {"type": "redirect", "redirect": {"return_url": f"{GATE}/x"}},
        }

    for items in (
        None,  # Stripe: items is required
        [{"price": "price_demo_yearly"}],  # the item's id too
        [{"id": other["items"]["data"][0]["id"], "price": "price_demo_yearly"}],  # not its item
        [{"id": item, "price": "price_nope"}],
        [{"id": item, "price": "price_demo_yearly"}, {"id": item, "price": "price_demo_monthly"}],
    ):
        with pytest.raises(stripe.InvalidRequestError) as err:
            await double_client.v1.billing_portal.sessions.create_async(
                {"customer": cus["id"], "flow_data": confirm(items)}  # type: ignore[arg-type]
            )
        assert err.value.http_status == 400, items
    params = {
        "customer": cus["id"],
        "flow_data": confirm([{"id": item, "price": "price_demo_yearly"}]),
    }
    session = await double_client.v1.billing_portal.sessions.create_async(params)  # type: ignore[arg-type]
    text = await page(http, session.url)
    assert 'id="flow-subscription-update-confirm"' in text
    assert 'id="current-plan">PatentLLM Basic — $9.00 / month<' in text
    assert 'id="new-plan">PatentLLM Pro — $190.00 / year<' in text
    assert 'id="switch-price"' not in text  # no other choice on the confirm screen
    form = f"{session.url}/subscriptions/{sub['id']}/switch-price"
    async with http.post(form, data={"price": "price_demo_yearly"}, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == f"{GATE}/x"
    assert sub["items"]["data"][0]["price"]["id"] == "price_demo_yearly"


async def test_automatic_tax_with_an_existing_customer_needs_customer_update(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus = double.create_customer("tax@example.com")
    base: dict[str, Any] = {"customer_email": None, "customer": cus["id"]}
    with pytest.raises(stripe.InvalidRequestError) as err:
        await checkout(double_client, automatic_tax={"enabled": True}, **base)
    assert err.value.param == "customer_update[address]"
    ok = await checkout(
        double_client, automatic_tax={"enabled": True}, customer_update={"address": "auto"}, **base
    )
    assert ok.automatic_tax.enabled is True


async def test_hosted_pages_name_products_read_dates_and_have_a_favicon(
    double_client: stripe.StripeClient, double: StripeDouble, http: aiohttp.ClientSession
) -> None:
    cus = double.create_customer("e@example.com")
    double.create_subscription(cus["id"], "price_basic_monthly")
    portal = await double_client.v1.billing_portal.sessions.create_async(
        {"customer": cus["id"], "return_url": f"{GATE}/account"}
    )
    text = await page(http, portal.url)
    # The plan dropdown names the product of each price, not just "Yearly".
    assert '<option value="price_demo_yearly">PatentLLM Pro — $190.00 / year</option>' in text
    assert '<option value="price_basic_yearly">PatentLLM Basic — $90.00 / year</option>' in text
    assert re.search(r'class="when">Renews on \d{1,2} [A-Z][a-z]{2} \d{4}<', text), text
    assert not re.search(r"\d{4}-\d{2}-\d{2}", text)  # no ISO dates
    base = portal.url.split("/portal/")[0]
    async with http.get(f"{base}/favicon.ico") as resp:
        assert resp.status == 200 and resp.content_type == "image/svg+xml"


async def test_another_gate_can_subscribe_to_the_doubles_webhooks(
    double: StripeDouble, double_server: TestServer, http: aiohttp.ClientSession
) -> None:
    base = double.public_url
    mine = "http://127.0.0.1:9/_gate/webhooks/stripe"
    async with http.post(f"{base}/_double/webhooks", data={"url": mine}) as resp:
        assert resp.status == 200 and mine in (await resp.json())["webhook_urls"]
    assert mine in double.webhook_urls
    async with http.post(f"{base}/_double/webhooks", data={"url": "file:///etc"}) as resp:
        assert resp.status == 400
    async with http.post(f"{base}/_double/webhooks", data={"remove": mine}) as resp:
        assert mine not in (await resp.json())["webhook_urls"]
