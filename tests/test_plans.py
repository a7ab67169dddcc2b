"""``plans.format_amount``: Stripe amounts in each currency's real minor unit."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.accounts import STATUS_TEXT, describe, format_day, in_days, short_plan
from gateway.model import Access
from gateway.plans import checkout_options, format_amount, group_offers, plan_from_price
from gateway.settings import SettingsError
from tests.conftest import make_settings


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (1900, "usd", "$19.00"),
        (1900, "USD", "$19.00"),
        (1234567, "gbp", "£12,345.67"),
        (999, "eur", "€9.99"),
        (5, "usd", "$0.05"),
        # zero-decimal currencies: the amount is whole units
        (1900, "jpy", "¥1,900"),
        (19000, "krw", "₩19,000"),
        (50000, "vnd", "₫50,000"),
        (1500, "clp", "CLP1,500"),
        (700, "ugx", "UGX700"),
        # three-decimal currencies: thousandths
        (1900, "kwd", "KWD1.900"),
        (None, "usd", "—"),
    ],
)
def test_format_amount(amount: int | None, currency: str, shown: str) -> None:
    assert format_amount(amount, currency) == shown


# --- plans, offers, checkout options -----------------------------------------------------------


def price(
    pid: str, amount: int, interval: str, product: str = "prod_pro", count: int = 1
) -> dict[str, Any]:
    return {
        "id": pid,
        "unit_amount": amount,
        "currency": "usd",
        "recurring": {"interval": interval, "interval_count": count},
        "product": {
            "id": product,
            "name": f"PatentLLM {product[5:].title()}",
            "marketing_features": [{"name": "Search"}, {"name": "Export"}, {}],
        },
    }


def test_plan_from_price_reads_product_and_features() -> None:
    plan = plan_from_price(price("p_m", 1900, "month"))
    assert plan.name == "PatentLLM Pro" and plan.product_id == "prod_pro"
    assert plan.features == ("Search", "Export")
    assert (plan.label, plan.cadence, plan.unit_amount) == ("$19.00 / month", "Monthly", 1900)
    assert plan_from_price(price("p_q", 5000, "month", count=3)).cadence == "Every 3 months"
    bare = plan_from_price({"id": "p", "product": "prod_x", "unit_amount": 5, "currency": "usd"})
    assert bare.product_id == "prod_x" and bare.features == () and bare.cadence == "One-time"


def test_offers_group_by_product_with_switch_and_saving() -> None:
    plans = [
        plan_from_price(price("pro_m", 1900, "month")),
        plan_from_price(price("basic_m", 900, "month", "prod_basic")),
        plan_from_price(price("pro_y", 19000, "year")),
    ]
    pro, basic = group_offers(plans)
    assert [p.price_id for p in pro.plans] == ["pro_m", "pro_y"] and pro.switch
    assert [p.price_id for p in basic.plans] == ["basic_m"] and not basic.switch
    assert pro.switch_class(pro.plans[1]) == "interval-year"
    assert basic.switch_class(basic.plans[0]) == ""  # always shown
    assert pro.yearly_saving(pro.plans[1]) == 17
    assert pro.yearly_saving(pro.plans[0]) is None
    dear = group_offers([plans[0], plan_from_price(price("pro_y2", 30000, "year"))])[0]
    assert dear.yearly_saving(dear.plans[1]) is None  # not a saving: not claimed


@pytest.mark.parametrize(
    ("env", "params"),
    [
        ({}, {}),
        ({"TRIAL_DAYS": "14"}, {"subscription_data": {"trial_period_days": 14}}),
        (
            {"TRIAL_DAYS": "7", "TRIAL_WITHOUT_CARD": "true"},
            {
                "payment_method_collection": "if_required",
                "subscription_data": {
                    "trial_period_days": 7,
                    "trial_settings": {"end_behavior": {"missing_payment_method": "cancel"}},
                },
            },
        ),
        ({"ALLOW_PROMOTION_CODES": "true"}, {"allow_promotion_codes": True}),
        ({"AUTOMATIC_TAX": "true"}, {"automatic_tax": {"enabled": True}}),
    ],
)
def test_checkout_options(env: dict[str, str], params: dict[str, object]) -> None:
    assert checkout_options(make_settings(env)) == params


def test_trial_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="TRIAL_WITHOUT_CARD=true needs a trial"):
        make_settings({"TRIAL_WITHOUT_CARD": "true"})
    with pytest.raises(SettingsError, match="TRIAL_DAYS='731' is invalid"):
        make_settings({"TRIAL_DAYS": "731"})
    with pytest.raises(SettingsError, match="TRIAL_DAYS"):
        make_settings({"TRIAL_DAYS": "-1"})


NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("acc", "words"),
    [
        (Access(True, "active", JAN_1, "renews"), "Pro · renews on 1 Jan 2027 (in 31 days)"),
        (Access(True, "active"), "Pro · active"),
        (
            Access(True, "canceling", JAN_1, "ends"),
            "Ends on 1 Jan 2027 — won't renew. Resume in billing",
        ),
        (Access(True, "trialing", NOW + timedelta(days=5), "trial_ends"), "Trial · ends in 5 days"),
        (Access(True, "trialing", NOW + timedelta(hours=3), "trial_ends"), "Trial · ends in 1 day"),
        (Access(False, "past_due"), "Payment failed — update your card"),
        (Access(True, "past_due_grace", JAN_1, "ends"), "Payment failed — update your card"),
        (Access(False, "unpaid"), "Payment failed — update your card"),
        (Access(False, "ended", NOW - timedelta(days=1), "ends"), "Ended on 30 Nov 2026"),
        (Access(False, "trial_ended", NOW, "trial_ends"), "Trial ended on 1 Dec 2026"),
        (Access(True, "grant"), "Free access"),
        (Access(True, "grant", JAN_1, "ends"), "Free access · ends on 1 Jan 2027 (in 31 days)"),
        (
            Access(False, "collection_paused", JAN_1, "renews"),
            "Payments paused — resume in billing",
        ),
        (Access(False, "canceled"), "Ended"),
        (Access(False, "none"), "No subscription"),
        (Access(False, "incomplete"), "Payment not completed"),
        (Access(False, "paused"), "Paused — add a card in billing to continue"),
        (Access(False, "something_new"), "Unknown — see billing"),
    ],
)
def test_describe_in_plain_words(acc: Access, words: str) -> None:
    assert describe(acc, NOW, "Pro") == words
    for raw in ("active", "trialing", "past_due", "canceling", "2027-01-01"):
        assert raw not in words.replace("Pro · active", "")


def test_every_access_reason_has_plain_words() -> None:
    reasons = {"active", "trialing", "canceling", "grant", "grant_expired", "price_not_allowed"}
    reasons |= {"trial_ended", "ended", "collection_paused", "past_due_grace", "past_due"}
    reasons |= {"incomplete", "incomplete_expired", "unpaid", "canceled", "paused", "none"}
    assert reasons <= set(STATUS_TEXT)
    assert all("_" not in text for text in STATUS_TEXT.values())


def test_short_plan_and_dates() -> None:
    assert short_plan("PatentLLM Pro", "PatentLLM") == "Pro"
    assert short_plan("PatentLLM", "PatentLLM") == "PatentLLM"
    assert short_plan("Team plan", "PatentLLM") == "Team plan"
    assert short_plan(None, "PatentLLM") == "Subscription"
    assert format_day(JAN_1) == "1 Jan 2027"
    assert (in_days(0), in_days(1), in_days(2)) == ("today", "in 1 day", "in 2 days")
