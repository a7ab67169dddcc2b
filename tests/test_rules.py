"""Access rules: Stripe subscriptions → Entitlement → Access (pure, table-driven)."""

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.model import Access, Entitlement
from gateway.rules import access, feature_sources, summarize
from gateway.settings import Settings, load_settings

FIXTURE = Path(__file__).parent / "fixtures" / "stripe_subscription.json"
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
PRICE = "price_1PgafmB7WZ01zgkW6dKueIc5"  # the fixture's price
OTHER_PRICE = "price_other"
PLAN = "plan_legacy_monthly"


def settings(**overrides: Any) -> Settings:
    return load_settings(
        {"BILLING_MODE": "on", "STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_PRICE_IDS": PRICE},
        demo=True,
        **overrides,
    )


S = settings()


def ts(dt: datetime) -> int:
    return int(dt.timestamp())


def fixture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


def make_sub(
    *,
    status: str = "active",
    sub_id: str = "sub_1",
    price: str | None = PRICE,
    plan: str | None = None,
    period_start: datetime | None = NOW - 10 * DAY,
    period_end: datetime | None = NOW + 20 * DAY,
    shape: str = "items",  # items (API ≥ 2025-03-31) | top (older API versions)
    cancel_at_period_end: bool = False,
    cancel_at: datetime | None = None,
    trial_end: datetime | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    """The fixture subscription, varied. Defaults: a plain active monthly subscription."""
    sub = fixture()
    sub["id"] = sub_id
    sub["status"] = status
    sub["cancel_at_period_end"] = cancel_at_period_end
    sub["cancel_at"] = ts(cancel_at) if cancel_at else None
    sub["canceled_at"] = None
    sub["ended_at"] = None
    sub["trial_start"] = ts(NOW - 3 * DAY) if trial_end else None
    sub["trial_end"] = ts(trial_end) if trial_end else None
    sub["pause_collection"] = (
        {"behavior": "mark_uncollectible", "resumes_at": None} if paused else None
    )
    item = sub["items"]["data"][0]
    if price is None:
        del item["price"]
    else:
        item["price"]["id"] = price
    if plan is None:
        item.pop("plan", None)
    else:
        item["plan"]["id"] = plan
    for holder in (item, sub):
        holder.pop("current_period_start", None)
        holder.pop("current_period_end", None)
    holder = item if shape == "items" else sub
    if period_start is not None:
        holder["current_period_start"] = ts(period_start)
    if period_end is not None:
        holder["current_period_end"] = ts(period_end)
    return sub


def one(sub: dict[str, Any], s: Settings = S, now: datetime = NOW) -> Entitlement:
    return summarize("cus_1", [sub], s, now)


def ent(status: str = "active", **fields: Any) -> Entitlement:
    values: dict[str, Any] = {
        "customer_id": "cus_1",
        "status": status,
        "checked_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "price_id": PRICE,
        "period_start": NOW - 10 * DAY,
        "period_end": NOW + 20 * DAY,
    }
    values.update(fields)
    return Entitlement(**values)


# --------------------------------------------------------------------------- reading Stripe


def test_fixture_as_is_reads_every_field() -> None:
    """Stripe's own example object, unchanged: every field lands where it should."""
    e = summarize("cus_QXg1o8vcGmoR32", [fixture()], S, NOW, source="webhook", event_created=42)
    assert e.customer_id == "cus_QXg1o8vcGmoR32"
    assert e.status == "active"
    assert e.subscription_id == "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"
    assert e.price_id == PRICE
    assert e.period_end == datetime.fromtimestamp(976287773, UTC)
    assert e.period_start == datetime.fromtimestamp(1896570518, UTC)
    assert e.cancel_at_period_end is True
    assert e.cancel_at == datetime.fromtimestamp(1234567890, UTC)
    assert e.trial_end == datetime.fromtimestamp(1234567890, UTC)
    assert e.paused is True
    assert (e.source, e.event_created, e.checked_at) == ("webhook", 42, NOW)
    # Canceling at a period end (2000, before cancel_at in 2009) long past: ended.
    assert access(e, S, NOW) == Access(False, "ended", e.period_end, "ends")
    assert e.expires_at == NOW + timedelta(seconds=S.negative_cache_ttl)


@pytest.mark.parametrize("shape", ["items", "top"])
def test_period_end_both_shapes(shape: str) -> None:
    e = one(make_sub(shape=shape))
    assert e.period_end == datetime.fromtimestamp(ts(NOW + 20 * DAY), UTC)
    assert e.period_start == datetime.fromtimestamp(ts(NOW - 10 * DAY), UTC)
    acc = access(e, S, NOW)
    assert acc == Access(True, "active", e.period_end, "renews")
    assert acc.days_left(NOW) == 20


def test_item_period_wins_over_top_level_and_latest_item_counts() -> None:
    sub = make_sub(period_end=NOW + 5 * DAY)
    sub["current_period_end"] = ts(NOW + 99 * DAY)  # stale top-level copy: ignored
    second = copy.deepcopy(sub["items"]["data"][0])
    second["id"] = "si_2"
    second["current_period_start"] = ts(NOW - 1 * DAY)
    second["current_period_end"] = ts(NOW + 9 * DAY)
    sub["items"]["data"].append(second)
    e = one(sub)
    assert e.period_end == datetime.fromtimestamp(ts(NOW + 9 * DAY), UTC)
    assert e.period_start == datetime.fromtimestamp(ts(NOW - 1 * DAY), UTC)


def test_legacy_plan_without_price() -> None:
    e = one(make_sub(price=None, plan=PLAN), settings(stripe_price_ids=(PLAN,)))
    assert e.price_id == PLAN
    assert access(e, settings(stripe_price_ids=(PLAN,)), NOW).allowed
    assert access(e, S, NOW).reason == "price_not_allowed"


def test_price_wins_over_plan_and_unexpanded_ids() -> None:
    assert one(make_sub(plan=PLAN)).price_id == PRICE
    sub = make_sub()
    sub["items"]["data"][0]["price"] = PRICE  # unexpanded
    assert one(sub).price_id == PRICE


def test_first_allowed_item_price_is_kept() -> None:
    sub = make_sub(price=OTHER_PRICE)
    addon = copy.deepcopy(sub["items"]["data"][0])
    addon["price"]["id"] = PRICE
    sub["items"]["data"].append(addon)
    e = one(sub)
    assert e.price_id == PRICE
    assert access(e, S, NOW).allowed
    assert one(make_sub(price=OTHER_PRICE)).price_id == OTHER_PRICE


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s.pop("items"),
        lambda s: s.__setitem__("items", {"data": "nope"}),
        lambda s: s.__setitem__("items", None),
        lambda s: s["items"]["data"].__setitem__(0, "si_123"),
    ],
)
def test_malformed_items_do_not_raise(mangle: Any) -> None:
    sub = make_sub(shape="top")
    mangle(sub)
    e = one(sub)
    assert e.price_id is None
    assert access(e, S, NOW) == Access(False, "price_not_allowed")


def test_missing_status_and_odd_timestamps() -> None:
    sub = make_sub()
    del sub["status"]
    sub["cancel_at"] = "soon"
    sub["trial_end"] = True  # a bool is not a timestamp
    e = one(sub)
    assert (e.status, e.cancel_at, e.trial_end) == ("unknown", None, None)
    assert access(e, S, NOW) == Access(False, "unknown_status")


# --------------------------------------------------------------------------- several subscriptions


def statuses_of(*subs: dict[str, Any], s: Settings = S) -> tuple[str, str | None]:
    e = summarize("cus_1", list(subs), s, NOW)
    return e.status, e.subscription_id


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
@pytest.mark.parametrize(
    ("subs", "winner"),
    [
        ([make_sub(status="canceled", sub_id="a"), make_sub(sub_id="b")], "b"),
        (
            [
                make_sub(status="past_due", sub_id="a"),
                make_sub(status="trialing", sub_id="b", trial_end=NOW + DAY),
            ],
            "b",
        ),
        # among granting ones: the latest access end
        (
            [
                make_sub(sub_id="a", period_end=NOW + 5 * DAY),
                make_sub(sub_id="b", period_end=NOW + 25 * DAY),
            ],
            "b",
        ),
        (
            [
                make_sub(sub_id="a", period_end=NOW + 20 * DAY),
                make_sub(sub_id="b", cancel_at_period_end=True, period_end=NOW + 40 * DAY),
            ],
            "b",
        ),
        (
            [
                make_sub(sub_id="a", period_end=NOW + 20 * DAY, cancel_at=NOW + 2 * DAY),
                make_sub(sub_id="b", period_end=NOW + 10 * DAY),
            ],
            "b",
        ),
        # among non-granting ones: the most telling
        ([make_sub(status="canceled", sub_id="a"), make_sub(status="past_due", sub_id="b")], "b"),
        (
            [
                make_sub(status="incomplete_expired", sub_id="a"),
                make_sub(status="incomplete", sub_id="b"),
            ],
            "b",
        ),
        (
            [
                make_sub(status="incomplete_expired", sub_id="a"),
                make_sub(status="canceled", sub_id="b"),
            ],
            "b",
        ),
        ([make_sub(status="unpaid", sub_id="a"), make_sub(status="paused", sub_id="b")], "a"),
        # a subscription to someone else's price says less than our canceled one
        ([make_sub(price=OTHER_PRICE, sub_id="a"), make_sub(status="canceled", sub_id="b")], "b"),
    ],
)
def test_best_subscription_wins(subs: list[dict[str, Any]], winner: str, reverse: bool) -> None:
    ordered = list(reversed(subs)) if reverse else subs
    assert summarize("cus_1", ordered, S, NOW).subscription_id == winner


def test_allow_any_price_lets_other_prices_win() -> None:
    subs = [make_sub(price=OTHER_PRICE, sub_id="a"), make_sub(status="canceled", sub_id="b")]
    assert statuses_of(*subs, s=settings(allow_any_price=True)) == ("active", "a")


# --------------------------------------------------------------------------- price allowlist


@pytest.mark.parametrize(
    ("price_ids", "allow_any", "allowed"),
    [
        ((PRICE,), False, True),
        ((OTHER_PRICE, PRICE), False, True),
        ((OTHER_PRICE,), False, False),
        ((), False, False),  # empty allowlist: fail closed
        ((OTHER_PRICE,), True, True),
        ((), True, True),
    ],
)
def test_price_allowlist(price_ids: tuple[str, ...], allow_any: bool, allowed: bool) -> None:
    # Unchecked on purpose: the loader refuses an empty STRIPE_PRICE_IDS with billing on, and
    # the rules must still fail closed if one ever got through.
    s = replace(settings(), stripe_price_ids=price_ids, allow_any_price=allow_any)
    acc = access(one(make_sub(), s), s, NOW)
    assert acc.allowed is allowed
    assert acc.reason == ("active" if allowed else "price_not_allowed")


@pytest.mark.parametrize("status", ["active", "trialing", "past_due"])
def test_price_checked_for_granting_statuses(status: str) -> None:
    e = ent(status, price_id=OTHER_PRICE, trial_end=NOW + DAY)
    assert access(e, settings(past_due_grace=30 * 86400.0), NOW).reason == "price_not_allowed"


# --------------------------------------------------------------------------- the status table


@pytest.mark.parametrize(
    "status", ["incomplete", "incomplete_expired", "unpaid", "canceled", "paused", "none"]
)
def test_denied_statuses(status: str) -> None:
    e = one(make_sub(status=status)) if status != "none" else summarize("cus_1", [], S, NOW)
    assert access(e, S, NOW) == Access(False, status)
    assert e.expires_at <= NOW + timedelta(seconds=S.negative_cache_ttl)


def test_unknown_status_denied() -> None:
    assert access(ent("future_status"), S, NOW) == Access(False, "unknown_status")


def test_no_subscriptions_and_no_entitlement() -> None:
    e = summarize("cus_1", [], S, NOW, source="success", event_created=7)
    assert (e.status, e.subscription_id, e.price_id, e.period_end) == ("none", None, None, None)
    assert (e.source, e.event_created, e.checked_at) == ("success", 7, NOW)
    assert e.expires_at == NOW + timedelta(seconds=S.negative_cache_ttl)
    assert access(e, S, NOW) == Access(False, "none")
    assert access(None, S, NOW) == Access(False, "none")


def test_active_renews() -> None:
    e = one(make_sub())
    assert access(e, S, NOW) == Access(True, "active", e.period_end, "renews")


def test_active_past_period_end_still_allowed() -> None:
    """Stripe renews within minutes; its status is the truth, so access continues."""
    e = one(make_sub(period_end=NOW - timedelta(minutes=5)))
    acc = access(e, S, NOW)
    assert acc == Access(True, "active", e.period_end, "renews")
    assert acc.days_left(NOW) == 0
    # ...and the entitlement is re-checked soon rather than cached for an hour.
    assert e.expires_at == NOW + timedelta(seconds=S.negative_cache_ttl)


@pytest.mark.parametrize("days", [1, 5, 29])
def test_cancel_at_period_end_ends_in_n_days(days: int) -> None:
    e = one(make_sub(cancel_at_period_end=True, period_end=NOW + days * DAY))
    acc = access(e, S, NOW)
    assert acc == Access(True, "canceling", e.period_end, "ends")
    assert acc.days_left(NOW) == days
    assert acc.days_left(NOW + timedelta(hours=1)) == days  # ceil: "1 day" until it ended


def test_cancel_at_period_end_passed_is_denied() -> None:
    e = one(make_sub(cancel_at_period_end=True, period_end=NOW - timedelta(seconds=1)))
    assert access(e, S, NOW) == Access(False, "ended", e.period_end, "ends")


def test_cancel_at_before_period_end() -> None:
    e = one(make_sub(cancel_at=NOW + 3 * DAY, period_end=NOW + 20 * DAY))
    acc = access(e, S, NOW)
    assert acc == Access(True, "canceling", e.cancel_at, "ends")
    assert acc.days_left(NOW) == 3
    assert access(e, S, NOW + 4 * DAY) == Access(False, "ended", e.cancel_at, "ends")


def test_trialing() -> None:
    e = one(make_sub(status="trialing", trial_end=NOW + 7 * DAY, period_end=NOW + 7 * DAY))
    acc = access(e, S, NOW)
    assert acc == Access(True, "trialing", e.trial_end, "trial_ends")
    assert acc.days_left(NOW) == 7
    assert access(e, S, NOW + 8 * DAY) == Access(False, "trial_ended", e.trial_end, "trial_ends")


def test_trialing_without_trial_end_uses_period_end() -> None:
    e = ent("trialing", trial_end=None)
    assert access(e, S, NOW) == Access(True, "trialing", e.period_end, "trial_ends")


def test_trial_set_to_cancel_ends() -> None:
    end = NOW + 7 * DAY
    e = one(make_sub(status="trialing", trial_end=end, period_end=end, cancel_at_period_end=True))
    assert access(e, S, NOW) == Access(True, "canceling", e.period_end, "ends")


@pytest.mark.parametrize(
    ("grace_days", "unpaid_since_days", "allowed"),
    [
        (0, 0.01, False),  # default: no grace at all
        (3, 1, True),
        (3, 2.99, True),
        (3, 3.01, False),
        (7, 8, False),
    ],
)
def test_past_due_grace(grace_days: int, unpaid_since_days: float, allowed: bool) -> None:
    s = settings(past_due_grace=grace_days * 86400.0)
    start = NOW - timedelta(days=unpaid_since_days)
    # Stripe already advanced the period: period_end is a whole unpaid month away.
    e = one(make_sub(status="past_due", period_start=start, period_end=start + 30 * DAY), s)
    acc = access(e, s, NOW)
    assert acc.allowed is allowed
    if allowed:
        assert acc == Access(True, "past_due_grace", start + grace_days * DAY, "ends")
        assert acc.ends_at is not None
        assert e.expires_at == min(NOW + timedelta(seconds=s.cache_ttl), acc.ends_at)
    else:
        assert acc.reason == "past_due"
        assert e.expires_at == NOW + timedelta(seconds=s.negative_cache_ttl)


def test_past_due_grace_needs_period_start_and_stops_at_cancel() -> None:
    s = settings(past_due_grace=5 * 86400.0)
    assert access(ent("past_due", period_start=None), s, NOW) == Access(False, "past_due")
    e = ent("past_due", period_start=NOW - DAY, cancel_at=NOW + DAY)
    assert access(e, s, NOW) == Access(True, "past_due_grace", NOW + DAY, "ends")
    assert not access(e, s, NOW + 2 * DAY).allowed


@pytest.mark.parametrize(
    ("status", "paused_access", "allowed"),
    [
        ("active", False, False),
        ("active", True, True),
        ("trialing", False, False),
        ("trialing", True, True),
    ],
)
def test_pause_collection(status: str, paused_access: bool, allowed: bool) -> None:
    s = settings(paused_access=paused_access)
    e = one(make_sub(status=status, paused=True, trial_end=NOW + 5 * DAY), s)
    assert e.paused is True
    acc = access(e, s, NOW)
    assert (acc.allowed, acc.reason) == (allowed, "collection_paused")


def test_pause_does_not_revive_an_ended_subscription() -> None:
    e = one(make_sub(paused=True, cancel_at=NOW - DAY), settings(paused_access=True))
    assert access(e, settings(paused_access=True), NOW).reason == "ended"


@pytest.mark.parametrize(
    ("period_end", "expected"),
    [
        (NOW + 30 * DAY, Access(True, "grant", NOW + 30 * DAY, "ends")),
        (NOW - DAY, Access(False, "grant_expired", NOW - DAY, "ends")),
        (None, Access(True, "grant")),
    ],
)
def test_operator_grant(period_end: datetime | None, expected: Access) -> None:
    # A grant ignores status and price: it is the operator's word.
    e = ent("none", source="grant", price_id=None, period_end=period_end)
    assert access(e, S, NOW) == expected


def test_stale_entitlement_decides_by_its_state() -> None:
    e = ent("active", expires_at=NOW - timedelta(hours=5))
    assert access(e, S, NOW).allowed


# --------------------------------------------------------------------------- cache lifetime


@pytest.mark.parametrize(
    ("sub", "expected_expiry"),
    [
        (make_sub(period_end=NOW + 20 * DAY), NOW + timedelta(hours=1)),
        (make_sub(period_end=NOW + timedelta(minutes=10)), NOW + timedelta(minutes=10)),
        (make_sub(cancel_at=NOW + timedelta(minutes=5)), NOW + timedelta(minutes=5)),
        (
            make_sub(cancel_at_period_end=True, period_end=NOW + timedelta(minutes=7)),
            NOW + timedelta(minutes=7),
        ),
        (
            make_sub(status="trialing", trial_end=NOW + timedelta(minutes=2)),
            NOW + timedelta(minutes=2),
        ),
        (make_sub(status="canceled"), NOW + timedelta(seconds=60)),
        (make_sub(price=OTHER_PRICE), NOW + timedelta(seconds=60)),
    ],
    ids=["ttl", "period-end", "cancel-at", "canceling", "trial-end", "negative", "price"],
)
def test_expires_at(sub: dict[str, Any], expected_expiry: datetime) -> None:
    e = one(sub)
    assert e.expires_at == expected_expiry
    assert e.checked_at == NOW


def test_ttl_never_past_period_end_with_long_cache_ttl() -> None:
    s = settings(cache_ttl=30 * 86400.0)
    e = one(make_sub(period_end=NOW + 2 * DAY), s)
    assert e.expires_at == e.period_end


def test_negative_ttl_setting() -> None:
    s = settings(negative_cache_ttl=15.0)
    assert one(make_sub(status="unpaid"), s).expires_at == NOW + timedelta(seconds=15)
    assert summarize("cus_1", [], s, NOW).expires_at == NOW + timedelta(seconds=15)


# --------------------------------------------------------------------------- features

PRODUCT = "prod_QXg1hqf4jFNsqG"  # the fixture's


def with_product(sub: dict[str, Any], product: str) -> dict[str, Any]:
    for item in sub["items"]["data"]:
        for key in ("price", "plan"):
            if isinstance(item.get(key), dict):
                item[key]["product"] = product
    return sub


def test_feature_sources_are_the_accepted_subscriptions_allowed_items() -> None:
    s = settings(stripe_price_ids=(PRICE, PLAN))
    accepted = make_sub(sub_id="sub_ok")
    extra = copy.deepcopy(accepted["items"]["data"][0])
    extra["price"] = {"id": OTHER_PRICE, "product": "prod_pro"}  # an unsold item beside it
    accepted["items"]["data"].append(extra)
    refused = [
        with_product(make_sub(sub_id="sub_unsold", price=OTHER_PRICE), "prod_pro"),
        with_product(make_sub(sub_id="sub_legacy", price=None, plan="plan_unsold"), "prod_pro"),
        with_product(make_sub(sub_id="sub_paused", paused=True), "prod_pro"),
        with_product(make_sub(sub_id="sub_paused2", status="paused"), "prod_pro"),
        with_product(make_sub(sub_id="sub_incomplete", status="incomplete"), "prod_pro"),
        with_product(make_sub(sub_id="sub_unpaid", status="unpaid"), "prod_pro"),
        with_product(make_sub(sub_id="sub_ended", cancel_at=NOW - DAY), "prod_pro"),
    ]
    assert feature_sources([accepted, *refused], s, NOW) == ((PRICE, PRODUCT),)
    # A sold legacy Plan counts, read from the plan (no price on the item).
    legacy = with_product(make_sub(price=None, plan=PLAN), "prod_old")
    assert feature_sources([legacy], s, NOW) == ((PLAN, "prod_old"),)
    # What the rules let in counts: PAUSED_ACCESS, a past-due grace, ALLOW_ANY_PRICE.
    paused = with_product(make_sub(paused=True), "prod_pro")
    assert feature_sources([paused], settings(paused_access=True), NOW) == ((PRICE, "prod_pro"),)
    assert feature_sources([refused[0]], settings(allow_any_price=True), NOW) == (
        (OTHER_PRICE, "prod_pro"),
    )
    grace = make_sub(status="past_due", period_start=NOW - DAY)
    assert feature_sources([grace], settings(past_due_grace=3 * 86400.0), NOW) == (
        (PRICE, PRODUCT),
    )
    assert feature_sources([grace], S, NOW) == ()


def test_an_unexpanded_price_has_no_known_product() -> None:
    sub = make_sub()
    sub["items"]["data"][0]["price"] = PRICE
    assert feature_sources([sub], S, NOW) == ((PRICE, None),)


def test_cache_lifetime_ends_with_the_first_granting_subscription() -> None:
    """Two granting subscriptions: the features of both are the customer's, so the cached
    state ends when the first of them does (its features go with it)."""
    renewing = make_sub(sub_id="sub_basic", period_end=NOW + 20 * DAY)
    ending = make_sub(sub_id="sub_pro", cancel_at=NOW + timedelta(minutes=5))
    for subs in ([renewing, ending], [ending, renewing]):
        e = summarize("cus_1", subs, S, NOW)
        assert e.subscription_id == "sub_basic"  # the best still wins
        assert e.expires_at == NOW + timedelta(minutes=5)
    refused = make_sub(sub_id="sub_x", price=OTHER_PRICE, cancel_at=NOW + timedelta(minutes=1))
    assert summarize("cus_1", [renewing, refused], S, NOW).expires_at == NOW + timedelta(hours=1)


# --------------------------------------------------------------------------- time zones


def test_all_datetimes_are_utc() -> None:
    e = one(make_sub(status="trialing", trial_end=NOW + DAY, cancel_at=NOW + 2 * DAY))
    for value in (
        e.checked_at,
        e.expires_at,
        e.period_end,
        e.period_start,
        e.cancel_at,
        e.trial_end,
    ):
        assert value is not None
        assert value.tzinfo is not None
        assert value.utcoffset() == timedelta(0)
    acc = access(e, S, NOW)
    assert acc.ends_at is not None and acc.ends_at.tzinfo is not None


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        summarize("cus_1", [make_sub()], S, datetime(2026, 1, 1))


def test_other_timezone_now_compares_correctly() -> None:
    tokyo = NOW.astimezone(ZoneInfo("Asia/Tokyo"))
    e = summarize("cus_1", [make_sub(cancel_at=NOW + DAY)], S, tokyo)
    assert access(e, S, tokyo) == Access(True, "canceling", e.cancel_at, "ends")
