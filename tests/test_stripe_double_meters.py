"""The Stripe double's Billing Meters over HTTP, through stripe-python as the gate calls it
(:class:`~gateway.stripe_client.StripeClientAPI`): meters in Stripe's shapes, meter events
validated as Stripe validates them (duplicate identifiers within 24 h, the timestamp window),
event summaries, metered prices on subscriptions and Checkout, and the graduated-tier lines of
the invoice a renewal makes."""

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp.test_utils import TestServer

from gateway.demo.stripe_double import DEFAULT_API_KEY, StripeDouble
from gateway.demo.stripe_double.meters import DEMO_METER_ID, DEMO_METERED_PRICE
from gateway.stripe_api import StripeDuplicateMeterEvent, StripeRejected
from gateway.stripe_client import StripeClientAPI
from tests.conftest import base_url

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "stripe" / "fixtures3.json"
METERED = str(DEMO_METERED_PRICE["id"])
DAY = 86_400


def fixture(kind: str) -> dict[str, Any]:
    for path in (FIXTURES, Path("/work/shared/stripe/fixtures3.json")):
        if path.exists():
            resources: dict[str, Any] = json.loads(path.read_text())["resources"]
            return dict(resources[kind])
    raise AssertionError(f"fixtures3.json not found (looked at {FIXTURES})")


@pytest.fixture
def double() -> StripeDouble:
    d = StripeDouble()
    d.meters.seed(d.add_price)
    return d


async def send(
    api: StripeClientAPI, double: StripeDouble, customer: str, value: int, ident: str, **kw: Any
) -> dict[str, Any]:
    return await api.create_meter_event(
        event_name=kw.get("event_name", "analysis"),
        customer_id=customer,
        value=value,
        identifier=ident,
        timestamp=kw.get("timestamp", double.now()),
    )


# --- meters -------------------------------------------------------------------------------


async def test_meter_create_retrieve_list_have_stripes_shape(
    double_client: stripe.StripeClient, api: StripeClientAPI
) -> None:
    created = await double_client.v1.billing.meters.create_async(
        {
            "display_name": "Tokens",
            "event_name": "analysis_tokens",
            "default_aggregation": {"formula": "sum"},
            "value_settings": {"event_payload_key": "tokens"},
        }
    )
    assert set(created.to_dict()) == set(fixture("billing.meter"))
    assert created.value_settings.event_payload_key == "tokens"
    got = await double_client.v1.billing.meters.retrieve_async(created.id)
    assert got.to_dict() == created.to_dict()
    listed = await api.list_meters()
    assert {m["event_name"] for m in listed} == {"analysis", "analysis_tokens"}
    for m in listed:
        assert set(m) == set(fixture("billing.meter"))


async def test_meters_list_by_status_and_an_unknown_meter_is_stripes_404(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    tokens = double.meters.create_meter(
        {
            "display_name": "Tokens",
            "event_name": "tokens",
            "default_aggregation": {"formula": "sum"},
        }
    )
    double.meters.meters[tokens["id"]]["status"] = "inactive"
    meters = double_client.v1.billing.meters
    assert [m.id for m in (await meters.list_async()).data] == [tokens["id"], DEMO_METER_ID]
    assert [m.id for m in (await meters.list_async({"status": "active"})).data] == [DEMO_METER_ID]
    assert [m.id for m in (await meters.list_async({"status": "inactive"})).data] == [tokens["id"]]
    with pytest.raises(stripe.InvalidRequestError) as bad:
        await meters.list_async({"status": "paused"})
    assert bad.value.http_status == 400 and bad.value.param == "status"
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await meters.retrieve_async("mtr_nope")
    assert unknown.value.http_status == 404 and unknown.value.code == "resource_missing"


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        (
            {"default_aggregation[formula]": None},
            "default_aggregation[formula]",
            "parameter_missing",
        ),
        ({"default_aggregation[formula]": "avg"}, "default_aggregation[formula]", None),
        ({"event_time_window": "week"}, "event_time_window", None),
        ({"display_name": ""}, "display_name", "parameter_missing"),
        ({"event_name": None}, "event_name", "parameter_missing"),
    ],
)
async def test_a_meter_is_created_from_parameters_checked_as_stripe_does(
    double_server: TestServer,
    double: StripeDouble,
    change: dict[str, str | None],
    param: str,
    code: str | None,
) -> None:
    form = {
        "display_name": "Tokens",
        "event_name": "tokens",
        "default_aggregation[formula]": "sum",
        **change,
    }
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            base_url(double_server) + "/v1/billing/meters",
            data={k: v for k, v in form.items() if v is not None},
            headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        )
        error = (await resp.json())["error"]
    assert (resp.status, error["type"], error.get("param"), error.get("code")) == (
        400,
        "invalid_request_error",
        param,
        code,
    )
    assert [m["event_name"] for m in double.meters.meters.values()] == ["analysis"]


async def test_a_second_active_meter_for_an_event_name_is_refused(
    double_client: stripe.StripeClient,
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await double_client.v1.billing.meters.create_async(
            {
                "display_name": "Again",
                "event_name": "analysis",
                "default_aggregation": {"formula": "sum"},
            }
        )
    assert info.value.param == "event_name"


# --- meter events -------------------------------------------------------------------------


async def test_a_meter_event_has_stripes_shape_and_value_as_a_string(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    cus = double.create_customer("m@example.com")
    event = await send(api, double, cus["id"], 3, "id-1")
    assert set(event) == set(fixture("billing.meter_event"))
    assert event["payload"] == {"stripe_customer_id": cus["id"], "value": "3"}
    assert event["identifier"] == "id-1"
    assert double.meters.customer_events(cus["id"]) == [event]


async def test_a_duplicate_identifier_within_24_hours_is_refused_then_accepted_after(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    cus = double.create_customer("dup@example.com")
    await send(api, double, cus["id"], 1, "win-1")
    with pytest.raises(StripeDuplicateMeterEvent) as info:
        await send(api, double, cus["id"], 1, "win-1")
    assert info.value.duplicate and info.value.http_status == 400
    await double.advance_time(DAY - 60)
    with pytest.raises(StripeDuplicateMeterEvent):
        await send(api, double, cus["id"], 1, "win-1")
    await double.advance_time(60)
    await send(api, double, cus["id"], 1, "win-1")  # the 24 h window is over
    assert len(double.meters.customer_events(cus["id"])) == 2


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"event_name": "nope"}, "event_name", None),
        ({"customer": "cus_missing"}, "payload[stripe_customer_id]", "resource_missing"),
        ({"timestamp": -(35 * DAY + 60)}, "timestamp", "timestamp_too_far_in_past"),
        ({"timestamp": 301}, "timestamp", "timestamp_in_future"),
    ],
)
async def test_meter_events_stripe_refuses_are_refused(
    api: StripeClientAPI,
    double: StripeDouble,
    change: dict[str, Any],
    param: str,
    code: str | None,
) -> None:
    cus = double.create_customer("bad@example.com")
    kw: dict[str, Any] = {}
    if "event_name" in change:
        kw["event_name"] = change["event_name"]
    if "timestamp" in change:
        kw["timestamp"] = double.now() + change["timestamp"]
    with pytest.raises(StripeRejected) as info:
        await send(api, double, change.get("customer", cus["id"]), 1, "x", **kw)
    assert not isinstance(info.value, StripeDuplicateMeterEvent)
    assert info.value.http_status == 400 and info.value.code == code
    assert param in str(info.value) or info.value.code == code
    assert double.meters.events == []


async def test_the_timestamp_window_edges_are_accepted(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    cus = double.create_customer("edge@example.com")
    await send(api, double, cus["id"], 1, "old", timestamp=double.now() - 35 * DAY + 60)
    await send(api, double, cus["id"], 1, "ahead", timestamp=double.now() + 240)
    assert len(double.meters.events) == 2


async def test_a_value_that_is_not_an_integer_is_refused(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus = double.create_customer("float@example.com")
    for value in ("1.5", "ten", ""):
        with pytest.raises(stripe.InvalidRequestError) as info:
            await double_client.v1.billing.meter_events.create_async(
                {
                    "event_name": "analysis",
                    "payload": {"stripe_customer_id": cus["id"], "value": value},
                }
            )
        assert info.value.param == "payload[value]"
    assert double.meters.events == []


# --- summaries ----------------------------------------------------------------------------


async def test_summaries_sum_the_events_of_the_customer_per_window(
    api: StripeClientAPI, double: StripeDouble
) -> None:
    cus, other = double.create_customer("s@example.com"), double.create_customer("o@example.com")
    hour = (double.now() // 3600 - 2) * 3600  # two hours ago, on the hour
    for i, (at, value) in enumerate([(hour + 10, 2), (hour + 3599, 3), (hour + 3600, 5)]):
        await send(api, double, cus["id"], value, f"s-{i}", timestamp=at)
    await send(api, double, other["id"], 100, "o-1", timestamp=hour + 20)

    whole = await api.meter_event_summaries(
        meter_id=DEMO_METER_ID, customer_id=cus["id"], start_time=hour, end_time=hour + 7200
    )
    assert [s["aggregated_value"] for s in whole] == [10]
    assert set(whole[0]) == set(fixture("billing.meter_event_summary"))
    first_hour = await api.meter_event_summaries(
        meter_id=DEMO_METER_ID, customer_id=cus["id"], start_time=hour, end_time=hour + 3600
    )
    assert [s["aggregated_value"] for s in first_hour] == [5]  # end_time is exclusive

    hourly = await api.client.v1.billing.meters.event_summaries.list_async(
        DEMO_METER_ID,
        {
            "customer": cus["id"],
            "start_time": hour,
            "end_time": hour + 7200,
            "value_grouping_window": "hour",
        },
    )
    got = sorted((s.start_time, s.aggregated_value) for s in hourly.data)
    assert got == [(hour, 5), (hour + 3600, 5)]


async def test_summary_times_must_be_aligned(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    cus = double.create_customer("al@example.com")
    hour = (double.now() // 3600) * 3600
    with pytest.raises(stripe.InvalidRequestError) as info:
        await double_client.v1.billing.meters.event_summaries.list_async(
            DEMO_METER_ID, {"customer": cus["id"], "start_time": hour + 7, "end_time": hour + 60}
        )
    assert info.value.param == "start_time"
    with pytest.raises(stripe.InvalidRequestError) as info:
        await double_client.v1.billing.meters.event_summaries.list_async(
            DEMO_METER_ID,
            {
                "customer": cus["id"],
                "start_time": hour + 60,
                "end_time": hour + 3600,
                "value_grouping_window": "hour",
            },
        )
    assert info.value.param == "start_time"


# --- metered prices, subscriptions, invoices ------------------------------------------------


async def test_a_metered_price_is_tiered_on_the_meter(api: StripeClientAPI) -> None:
    price = await api.get_price(METERED)
    assert set(price) == set(fixture("price"))
    assert price["recurring"]["usage_type"] == "metered"
    assert price["recurring"]["meter"] == DEMO_METER_ID
    assert (price["billing_scheme"], price["tiers_mode"]) == ("tiered", "graduated")
    assert price["unit_amount"] is None


async def test_a_subscription_item_on_a_metered_price_has_no_quantity(
    double_client: stripe.StripeClient, api: StripeClientAPI, double: StripeDouble
) -> None:
    cus = double.create_customer("sub@example.com")
    with pytest.raises(stripe.InvalidRequestError) as info:
        await double_client.v1.subscriptions.create_async(
            {
                "customer": cus["id"],
                "items": [{"price": "price_demo_monthly"}, {"price": METERED, "quantity": 1}],
            }
        )
    assert info.value.param == "items[1][quantity]"
    await double_client.v1.subscriptions.create_async(
        {"customer": cus["id"], "items": [{"price": "price_demo_monthly"}, {"price": METERED}]}
    )
    (sub,) = await api.list_subscriptions(cus["id"])  # as the gate reads it
    licensed, metered = sub["items"]["data"]
    assert licensed["quantity"] == 1 and licensed["price"]["recurring"]["usage_type"] == "licensed"
    assert "quantity" not in metered
    assert metered["price"]["recurring"] == {
        "interval": "month",
        "interval_count": 1,
        "meter": DEMO_METER_ID,
        "trial_period_days": None,
        "usage_type": "metered",
    }


async def test_checkout_with_a_metered_line_item_subscribes_to_both(
    double_client: stripe.StripeClient, double: StripeDouble
) -> None:
    with pytest.raises(stripe.InvalidRequestError):
        await double_client.v1.checkout.sessions.create_async(
            {
                "mode": "subscription",
                "success_url": "http://127.0.0.1/ok",
                "line_items": [
                    {"price": "price_demo_monthly", "quantity": 1},
                    {"price": "price_basic_monthly"},  # not metered
                ],
            }
        )
    session = await double_client.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "success_url": "http://127.0.0.1/ok",
            "line_items": [{"price": "price_demo_monthly", "quantity": 1}, {"price": METERED}],
        }
    )
    done = await double.complete_checkout(session.id, "pay@example.com")
    sub = double.subscriptions[done["subscription"]]
    prices = [i["price"]["id"] for i in sub["items"]["data"]]
    assert prices == ["price_demo_monthly", METERED]
    assert double.invoices[sub["latest_invoice"]]["amount_due"] == 1900  # usage: in arrears


@pytest.mark.parametrize(("used", "overage"), [(0, 0), (500, 0), (501, 10), (520, 200)])
async def test_the_renewal_invoice_prices_the_periods_usage_by_graduated_tiers(
    api: StripeClientAPI, double: StripeDouble, used: int, overage: int
) -> None:
    cus = double.create_customer(f"tiers{used}@example.com")
    sub = double.create_subscription(cus["id"], "price_demo_monthly", metered=(METERED,))
    start, end = double.period(sub)
    if used:
        await send(api, double, cus["id"], used - 1, "u-1", timestamp=start)
        await send(api, double, cus["id"], 1, "u-2")
    await double.advance_time(end - double.now() + 1)  # the period ends: renewal
    await send(api, double, cus["id"], 7, "next", timestamp=double.now())  # next period's

    invoice = double.invoices[sub["latest_invoice"]]
    assert invoice["billing_reason"] == "subscription_cycle"
    assert invoice["amount_due"] == invoice["total"] == 1900 + overage
    usage = [
        line
        for line in invoice["lines"]["data"]
        if line["pricing"]["price_details"]["price"] == METERED
    ]
    assert sum(line["amount"] for line in usage) == overage
    assert sum(line["quantity"] for line in usage) == used
    assert all(line["period"] == {"start": start, "end": end} for line in usage)
    assert set(invoice["lines"]["data"][0]) == set(usage[0])


async def test_the_control_endpoint_lists_the_events_received_per_customer(
    api: StripeClientAPI, double: StripeDouble, double_server: TestServer
) -> None:
    a, b = double.create_customer("a@example.com"), double.create_customer("b@example.com")
    await send(api, double, a["id"], 2, "a-1")
    await send(api, double, b["id"], 5, "b-1")
    async with aiohttp.ClientSession() as http:
        url = double_server.make_url("/_double/meter_events")
        async with http.get(url, params={"customer": a["id"]}) as resp:
            events = (await resp.json())["data"]
        async with http.get(url) as resp:
            every = (await resp.json())["data"]
    assert [(e["identifier"], e["payload"]["value"]) for e in events] == [("a-1", "2")]
    assert [e["identifier"] for e in every] == ["a-1", "b-1"]
    assert all(set(e) == set(fixture("billing.meter_event")) for e in every)


async def test_a_prices_tiers_come_only_when_expanded(
    double_client: stripe.StripeClient,
) -> None:
    plain = await double_client.v1.prices.retrieve_async(METERED)
    assert "tiers" not in plain.to_dict()
    expanded = await double_client.v1.prices.retrieve_async(METERED, {"expand": ["tiers"]})
    tiers = expanded.to_dict()["tiers"]
    assert [(t["up_to"], t["unit_amount"], t["flat_amount"]) for t in tiers] == [
        (500, 0, None),
        (None, 10, None),
    ]
    assert {str(t["unit_amount_decimal"]) for t in tiers} == {"0", "10"}
    listed = await double_client.v1.prices.list_async({"expand": ["data.tiers"], "limit": 100})
    assert {p.id: len(p.to_dict()["tiers"]) for p in listed.data}[METERED] == 2
