"""gateway.metered: ``CHECKOUT_METERED_PRICES`` parsed and validated, and a Checkout of a price
with overage subscribing to its metered price too (gate + demo app + Stripe double, real
servers), the subscription as the gate reads it carrying the item's meter."""

from pathlib import Path

import pytest

from gateway.demo.stripe_double.meters import DEMO_METER_ID, DEMO_METERED_PRICE
from gateway.metered import checkout_line_items, parse_metered_prices
from gateway.settings import SettingsError
from tests.conftest import make_settings
from tests.stack import running_stack

METERED = str(DEMO_METERED_PRICE["id"])


def test_items_parse_into_metered_prices_per_price() -> None:
    parsed = parse_metered_prices(
        ["price_a=price_m", " price_b = price_m|price_n ", "", "price_a=price_n"]
    )
    assert parsed == {"price_a": ("price_m", "price_n"), "price_b": ("price_m", "price_n")}
    assert checkout_line_items("price_b", parsed) == [
        {"price": "price_b", "quantity": 1},
        {"price": "price_m"},
        {"price": "price_n"},
    ]
    assert checkout_line_items("price_c", parsed) == [{"price": "price_c", "quantity": 1}]


@pytest.mark.parametrize("bad", ["price_a", "price_a=", "=price_m", "price_a=price_a", "a b=c"])
def test_a_bad_item_is_a_one_line_error_naming_the_setting(bad: str) -> None:
    with pytest.raises(SettingsError, match=r"^CHECKOUT_METERED_PRICES is invalid: "):
        make_settings({"CHECKOUT_METERED_PRICES": bad})


async def test_checkout_of_a_price_with_overage_subscribes_to_its_metered_price(
    tmp_path: Path,
) -> None:
    env = {"CHECKOUT_METERED_PRICES": f"price_demo_monthly={METERED}"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        stack.double.meters.seed(stack.double.add_price)
        resp = await stack.subscribe(client, "over@example.com", price="price_demo_monthly")
        assert resp.status == 303
        (session,) = stack.double.checkout_sessions.values()
        assert stack.double.checkout_metered[session["id"]] == (METERED,)
        sub = stack.double.subscriptions[session["subscription"]]
        licensed, metered = sub["items"]["data"]
        assert licensed["price"]["id"] == "price_demo_monthly" and licensed["quantity"] == 1
        assert metered["price"]["recurring"]["meter"] == DEMO_METER_ID
        assert metered["price"]["recurring"]["usage_type"] == "metered"
        assert "quantity" not in metered
        info = await client.get(stack.url("/_gate/api/me"), headers={"Accept": "application/json"})
        assert (await info.json())["price_id"] == "price_demo_monthly"  # the sold one counts


async def test_checkout_of_another_price_has_one_line_item(tmp_path: Path) -> None:
    env = {"CHECKOUT_METERED_PRICES": f"price_demo_monthly={METERED}"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        stack.double.meters.seed(stack.double.add_price)
        await stack.subscribe(client, "yearly@example.com", price="price_demo_yearly")
        (session,) = stack.double.checkout_sessions.values()
        assert session["id"] not in stack.double.checkout_metered
        sub = stack.double.subscriptions[session["subscription"]]
        assert len(sub["items"]["data"]) == 1
