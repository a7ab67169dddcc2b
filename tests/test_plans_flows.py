"""Selling every plan, end to end (gate + demo app + Stripe double, real servers): the landing
page, a forged price, the yearly plan, each Checkout option reaching Stripe, a trial without a
card until its end, a promotion code, and the past-due deep link into the portal."""

import html
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.stack import (
    Stack,
    checkout_form,
    form_fields,
    me,
    open_portal,
    running_stack,
    status_of,
)

HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
ALL_PRICES = "price_demo_monthly,price_demo_yearly,price_basic_monthly,price_basic_yearly"
DAY = 86_400


async def text_of(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url, headers=HTML, allow_redirects=False) as resp:
        assert resp.status == 200, url
        return html.unescape(await resp.text())


async def sign_in_new(stack: Stack, client: aiohttp.ClientSession, email: str) -> None:
    """``client`` signed in as a new customer with no subscription yet: a free trial is only
    for a visitor the gate knows (an anonymous one confirms an email first, test_trials.py)."""
    customer = stack.double.create_customer(email)
    await stack.sign_in(client, customer["id"], email)


def only_session(stack: Stack) -> dict[str, Any]:
    sessions = list(stack.double.checkout_sessions.values())
    assert len(sessions) == 1, sessions
    return sessions[0]


# --------------------------------------------------------------------------- landing page


async def test_landing_page_shows_every_plan_grouped_by_product(tmp_path: Path) -> None:
    env = {"STRIPE_PRICE_IDS": ALL_PRICES, "TRIAL_DAYS": "14"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        page = await text_of(client, stack.url("/_gate/subscribe?next=/"))
    assert "<h1>Choose your plan</h1>" in page
    assert "<h1>PatentLLM</h1>" not in page  # the brand is in the header already
    assert page.count("PatentLLM Pro</h2>") == 1 and page.count("PatentLLM Basic</h2>") == 1
    assert page.index("PatentLLM Pro</h2>") < page.index("PatentLLM Basic</h2>")  # setting order
    for price, label in [
        ("price_demo_monthly", "$19.00 / month"),
        ("price_demo_yearly", "$190.00 / year"),
        ("price_basic_monthly", "$9.00 / month"),
        ("price_basic_yearly", "$90.00 / year"),
    ]:
        assert checkout_form(page, price)["price"] == price
        assert label in page
    assert len(re.findall(r'action="/_gate/checkout"', page)) == 4
    # the first plan keeps the ids the existing journeys use
    assert '<p class="price" id="plan-price">$19.00 / month</p>' in page
    assert form_fields(page, "/_gate/checkout")["price"] == "price_demo_monthly"
    # the monthly/yearly switch, without JavaScript
    assert 'id="interval-month" checked' in page and 'id="interval-year"' in page
    assert "<script" not in page
    assert re.search(r'class="option interval-year" data-price="price_demo_yearly"', page)
    # marketing features from Stripe, a trial badge, the yearly saving
    for feature in ("LLM analysis of claims", "Export to PDF and CSV", "Saved searches"):
        assert f"<li>{feature}</li>" in page
    assert page.count("14-day free trial</p>") == 2
    assert "Save 17% compared with monthly" in page
    assert "Start free trial" in page


#: A price in a zero-decimal currency: Stripe's 1900 is 1,900 yen (JPY has no minor unit).
YEN: dict[str, Any] = {
    "id": "price_yen",
    "unit_amount": 1900,
    "currency": "jpy",
    "recurring": {"interval": "month"},
    "product": "prod_yen",
    "product_name": "PatentLLM Japan",
    "marketing_features": ["検索"],
}


async def test_zero_decimal_currency_and_a_single_interval(tmp_path: Path) -> None:
    env = {"STRIPE_PRICE_IDS": "price_yen"}
    async with (
        running_stack(tmp_path, env, double_kwargs={"prices": [YEN]}) as stack,
        stack.session() as client,
    ):
        page = await text_of(client, stack.url("/_gate/subscribe"))
    assert '<p class="price" id="plan-price">¥1,900 / month</p>' in page
    assert "<li>検索</li>" in page
    assert 'id="interval-year"' not in page  # one interval: no switch
    assert "free trial" not in page


async def test_stripe_pages_show_a_zero_decimal_price_as_the_landing_page_does(
    tmp_path: Path,
) -> None:
    """The double's hosted Checkout and portal read ¥1,900 as the landing page (and Stripe's own
    pages) do, never as 19.00; the 20 % code's discount too (¥380)."""
    env = {"STRIPE_PRICE_IDS": "price_yen", "ALLOW_PROMOTION_CODES": "true"}
    async with (
        running_stack(tmp_path, env, double_kwargs={"prices": [YEN]}) as stack,
        stack.session() as client,
    ):
        landing = await text_of(client, stack.url("/_gate/subscribe"))
        assert '<p class="price" id="plan-price">¥1,900 / month</p>' in landing
        checkout_url = await stack.start_checkout(client)
        checkout = await text_of(client, checkout_url)
        assert '<p class="price" id="price">¥1,900 / month</p>' in checkout
        pay = {"email": "yuki@example.com", "promotion_code": "WELCOME20"}
        async with client.post(f"{checkout_url}/pay", data=pay, allow_redirects=False) as resp:
            assert resp.status == 303, await resp.text()
        paid = await text_of(client, checkout_url)
        assert '<p id="discount">Discount applied: -¥380</p>' in paid
        customer_id = only_session(stack)["customer"]
        await stack.sign_in(client, customer_id, "yuki@example.com")
        portal = await text_of(client, await open_portal(stack, client))
        assert '<p class="price">¥1,900 / month</p>' in portal
        assert "19.00" not in checkout + paid + portal


# --------------------------------------------------------------------------- forged price


@pytest.mark.parametrize(
    "price",
    [
        "price_forged",
        "price_basic_monthly",  # a real price on the account, but not one this gate sells
        "price_demo_monthly,price_basic_monthly",
        "",
    ],
)
async def test_forged_price_is_refused_with_a_clear_400(tmp_path: Path, price: str) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        page = await text_of(client, stack.url("/_gate/subscribe"))
        form = {**form_fields(page, "/_gate/checkout"), "price": price}
        async with client.post(
            stack.url("/_gate/checkout"), data=form, headers=HTML, allow_redirects=False
        ) as resp:
            body = await resp.text()
            status = resp.status
        if price == "":  # no choice at all: the first plan, as before plans existed
            assert status == 303
            session = only_session(stack)
            assert stack.double.checkout_lines[session["id"]][0] == "price_demo_monthly"
            return
        assert status == 400, body
        assert "Unknown plan" in body and "Nothing was charged" in body
        assert "Traceback" not in body
        assert not stack.double.checkout_sessions  # Stripe was never asked
        async with client.post(
            stack.url("/_gate/checkout"), data=form, headers=JSON, allow_redirects=False
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "unknown_plan"


# --------------------------------------------------------------------------- yearly plan


async def test_yearly_plan_purchase(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "yara@example.com", price="price_demo_yearly")
        assert resp.status == 303 and resp.headers["Location"] == "/"
        session = only_session(stack)
        assert stack.double.checkout_lines[session["id"]][0] == "price_demo_yearly"
        sub = stack.double.subscriptions[session["subscription"]]
        assert sub["items"]["data"][0]["price"]["recurring"]["interval"] == "year"
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        info = await me(stack, client)
        days = stack.days_left("yara@example.com")
        assert info["price_id"] == "price_demo_yearly" and info["days_left"] == days
        assert 365 <= days <= 366
        ends_on = stack.ends_on("yara@example.com")
        assert info["summary"] == f"Pro · renews on {ends_on} (in {days} days)"
        page = await text_of(client, stack.url("/_gate/account"))
        assert f'<dd id="account-date">{ends_on}</dd>' in page
        assert '<dd id="account-status">Active</dd>' in page


# --------------------------------------------------------------------------- checkout options

OPTION_CASES: list[tuple[dict[str, str], dict[str, Any]]] = [
    ({}, {"trial": 0, "collection": "always", "promo": False, "tax": False}),
    ({"TRIAL_DAYS": "14"}, {"trial": 14, "collection": "always", "missing": "create_invoice"}),
    (
        {"TRIAL_DAYS": "7", "TRIAL_WITHOUT_CARD": "true"},
        {"trial": 7, "collection": "if_required", "missing": "cancel"},
    ),
    ({"ALLOW_PROMOTION_CODES": "true"}, {"promo": True}),
    ({"AUTOMATIC_TAX": "true"}, {"tax": True}),
]


@pytest.mark.parametrize(("env", "expected"), OPTION_CASES)
async def test_each_checkout_option_reaches_stripe(
    tmp_path: Path, env: dict[str, str], expected: dict[str, Any]
) -> None:
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await sign_in_new(stack, client, "opal@example.com")
        await stack.start_checkout(client)
        session = only_session(stack)
        options = stack.double.checkout_options[session["id"]]
        if "trial" in expected:
            assert options["trial_period_days"] == expected["trial"]
        if "collection" in expected:
            assert session["payment_method_collection"] == expected["collection"]
        if "missing" in expected:
            assert options["missing_payment_method"] == expected["missing"]
        if "promo" in expected:
            assert session["allow_promotion_codes"] is expected["promo"]
        if "tax" in expected:
            assert session["automatic_tax"]["enabled"] is expected["tax"]


# --------------------------------------------------------------------------- trial without card


async def test_trial_without_a_card_gives_access_until_the_trial_ends(tmp_path: Path) -> None:
    env = {"TRIAL_DAYS": "5", "TRIAL_WITHOUT_CARD": "true"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        checkout = await text_of(client, stack.url("/_gate/subscribe"))
        assert "5-day free trial · no card needed" in checkout
        await sign_in_new(stack, client, "tina@example.com")
        resp = await stack.subscribe(client, "tina@example.com", pay={"without_card": "1"})
        assert resp.status == 303, await resp.text()
        sub = stack.double.subscriptions[only_session(stack)["subscription"]]
        assert sub["status"] == "trialing" and sub["default_payment_method"] is None
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        info = await me(stack, client)
        assert info["summary"] == "Trial · ends in 5 days" and info["status_text"] == "Trial"
        page = await text_of(client, stack.url("/_gate/account"))
        assert '<dd id="account-status">Trial</dd>' in page
        assert f'<dd id="account-date">{stack.ends_on("tina@example.com")}</dd>' in page

        await stack.double.advance_time(4 * DAY)  # Stripe's clock; still in the trial
        assert sub["status"] == "trialing"
        assert await status_of(client, stack.url("/api/search?q=x")) == 200

        # The trial ends with no card: Stripe cancels (missing_payment_method=cancel), the
        # webhook reaches the gate, access ends.
        await stack.double.advance_time(DAY + 60)
        assert sub["status"] == "canceled"
        assert await status_of(client, stack.url("/api/search?q=x")) == 402
        info = await me(stack, client)
        assert info["allowed"] is False and info["status_text"] == "Ended"
        landing = await text_of(client, stack.url("/_gate/subscribe"))
        assert (
            "Your subscription has ended — it was canceled. Subscribe again to continue." in landing
        )


async def test_trial_with_a_card_keeps_access_after_the_trial(tmp_path: Path) -> None:
    env = {"TRIAL_DAYS": "3", "TRIAL_WITHOUT_CARD": "true"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await sign_in_new(stack, client, "carl@example.com")
        assert (await stack.subscribe(client, "carl@example.com")).status == 303
        await stack.double.advance_time(3 * DAY + 60)
        sub = stack.double.subscriptions[only_session(stack)["subscription"]]
        assert sub["status"] == "active"
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        assert (await me(stack, client))["summary"].startswith("Pro · renews on ")


# --------------------------------------------------------------------------- promotion code


async def test_promotion_code_is_accepted(tmp_path: Path) -> None:
    env = {"ALLOW_PROMOTION_CODES": "true"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "pia@example.com", pay={"promotion_code": "WELCOME20"})
        assert resp.status == 303
        session = only_session(stack)
        assert session["amount_total"] == 1520 and session["discounts"]
        invoice = stack.double.invoices[session["invoice"]]
        assert (invoice["subtotal"], invoice["total"]) == (1900, 1520)
        assert await status_of(client, stack.url("/api/search?q=x")) == 200


# --------------------------------------------------------------------------- past due


async def test_past_due_account_deep_links_to_the_card_update(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        assert (await stack.subscribe(client, "pat@example.com")).status == 303
        sub_id = only_session(stack)["subscription"]
        await stack.double.set_status(sub_id, "past_due")
        page = await text_of(client, stack.url("/_gate/account"))
        assert '<p class="lead summary" id="account-summary">Payment failed — update your card' in (
            page
        )
        assert '<dd id="account-status">Payment failed</dd>' in page
        form = form_fields(page, "/_gate/portal")
        assert form["flow"] == "payment_method_update"
        async with client.post(
            stack.url("/_gate/portal"), data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            portal_url = resp.headers["Location"]
        portal = next(iter(stack.double.portal_sessions.values()))
        assert portal["flow"]["type"] == "payment_method_update"
        assert portal["flow"]["after_completion"]["redirect"]["return_url"] == stack.url(
            "/_gate/account"
        )
        async with client.get(portal_url) as resp:
            screen = await resp.text()
        assert 'id="flow-payment-method-update"' in screen
        target = str(URL(portal_url).join(URL(f"/portal/{portal['id']}/payment-method")))
        async with client.post(target, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == stack.url("/_gate/account")
        assert stack.double.subscriptions[sub_id]["status"] == "active"
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        page = await text_of(client, stack.url("/_gate/account"))
        assert 'name="flow"' not in page


async def test_unknown_portal_flow_is_ignored(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        assert (await stack.subscribe(client, "ola@example.com")).status == 303
        page = await text_of(client, stack.url("/_gate/account"))
        form = {**form_fields(page, "/_gate/portal"), "flow": "subscription_cancel"}
        async with client.post(
            stack.url("/_gate/portal"), data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        portal = next(iter(stack.double.portal_sessions.values()))
        assert portal["flow"] is None  # the portal's home page, no forged deep link


async def test_automatic_tax_for_a_returning_customer_collects_the_address(
    tmp_path: Path,
) -> None:
    """Stripe refuses automatic tax for an existing customer unless Checkout may save the
    address it collects (``customer_update[address]=auto``); the gate asks for it."""
    async with running_stack(tmp_path, {"AUTOMATIC_TAX": "true"}) as stack:
        cus = stack.double.create_customer("ret@example.com")
        async with stack.session() as client:
            await stack.sign_in(client, cus["id"], "ret@example.com")
            await stack.start_checkout(client)
        session = only_session(stack)
        assert session["customer"] == cus["id"] and session["automatic_tax"]["enabled"]
