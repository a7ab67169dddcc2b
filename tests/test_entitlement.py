"""gateway.entitlement: L1 → store → Stripe, singleflight, negative caching, stale-if-error,
circuit breaker, grants, refresh and webhook ordering.

Unit tests drive a counting fake of the StripeAPI protocol and a real SQLite store on tmp_path
with an injected clock (no sleeps); integration tests use the real StripeClientAPI against the
Stripe double served on 127.0.0.1.
"""

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway import rules
from gateway.changes import Change
from gateway.demo.stripe_double import StripeDouble
from gateway.entitlement import PAYLOAD_SOURCE, Entitlements
from gateway.model import Entitlement, Identity, Lookup, ManualClock
from gateway.plans import PLAN_CACHE_SECONDS
from gateway.store import SQLiteStore
from gateway.stripe_api import StripeBreakerOpen, StripeRejected, StripeUnavailable
from gateway.stripe_breaker import BREAKER_COOLDOWN, BREAKER_THRESHOLD
from gateway.stripe_client import StripeClientAPI
from tests.conftest import PRICE, FakeStripe, eventually, owned, subscription
from tests.conftest import billing_settings as make_settings
from tests.stores import opened


class Clock(ManualClock):
    """The services' one clock, standing still until moved; called, it is the datetime (the
    store's clock)."""

    def __init__(self) -> None:
        super().__init__(datetime.now(UTC).replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.now()


class CountingStore(SQLiteStore):
    """The real store, counting every SQLite round trip (reads and writes)."""

    io = 0

    async def _read(self, op: str, sql: str, params: Iterable[Any] = ()) -> Any:
        self.io += 1
        return await super()._read(op, sql, params)

    async def _submit(self, op: str, work: Any, *, transaction: bool) -> Any:
        self.io += 1
        return await super()._submit(op, work, transaction=transaction)


def who(customer_id: str | None = "cus_1", email: str | None = None) -> Identity:
    return Identity(email, customer_id, "header" if customer_id is None else "cookie")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[CountingStore]:
    async with opened(CountingStore(str(tmp_path / "gate.sqlite3"), clock=clock)) as s:
        yield s


@pytest.fixture
async def ents(store: CountingStore, fake: FakeStripe, clock: Clock) -> AsyncIterator[Entitlements]:
    async with owned(Entitlements(make_settings(), store, fake, clock)) as e:
        yield e


def breaker_state(ents: Entitlements) -> str:
    return ents.breaker.state  # a function call: mypy must not narrow it across time


def allowed(lookup: Lookup, clock: Clock) -> bool:
    return rules.access(lookup.entitlement, make_settings(), clock()).allowed


# --- layers -----------------------------------------------------------------------------------


async def test_l1_hit_does_no_store_io_and_no_stripe_call(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    first = await ents.lookup(who())
    assert first.entitlement is not None and first.entitlement.status == "active"
    assert allowed(first, clock)
    assert fake.calls["list_subscriptions"] == 1
    io = store.io

    for _ in range(100):
        assert await ents.lookup(who()) == first
    assert ents.lookup_cached(who()) == first
    assert store.io == io  # no SQLite round trip
    assert fake.calls["list_subscriptions"] == 1
    assert ents.stats.l1_hits == 101

    await store.close()  # and no store at all: still answered from memory
    assert ents.lookup_cached(who()) == first
    assert await ents.lookup(who()) == first


async def test_store_hit_after_l1_expiry_then_stripe_after_cache_ttl(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    await ents.lookup(who())
    clock.advance(6)  # past L1_TTL (5 s)
    assert ents.lookup_cached(who()) is None
    io = store.io
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and not lookup.stale
    assert fake.calls["list_subscriptions"] == 1
    assert ents.stats.store_hits == 1
    assert store.io > io
    assert ents.lookup_cached(who()) == lookup  # refilled L1

    clock.advance(3600)  # past CACHE_TTL
    await ents.lookup(who())
    assert fake.calls["list_subscriptions"] == 2


async def test_l1_is_bounded_lru(store: CountingStore, fake: FakeStripe, clock: Clock) -> None:
    async with owned(Entitlements(make_settings(l1_max_entries=3), store, fake, clock)) as ents:
        for i in range(3):
            await ents.lookup(who(f"cus_{i}"))
        assert ents.lookup_cached(who("cus_0")) is not None  # cus_0 becomes most recent
        await ents.lookup(who("cus_3"))
        assert ents.lookup_cached(who("cus_1")) is None  # least recently used: evicted
        assert ents.lookup_cached(who("cus_0")) is not None
        assert ents.lookup_cached(who("cus_3")) is not None


async def test_l1_disabled_with_zero_ttl(
    store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    async with owned(Entitlements(make_settings(l1_ttl=0.0), store, fake, clock)) as ents:
        fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
        await ents.lookup(who())
        assert ents.lookup_cached(who()) is None
        await ents.lookup(who())
        assert fake.calls["list_subscriptions"] == 1
        assert ents.stats.store_hits == 1


# --- singleflight -----------------------------------------------------------------------------


async def test_singleflight_200_concurrent_cold_lookups_one_stripe_call(
    ents: Entitlements, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    lookups = await fake.held(ents.lookup(who()) for _ in range(200))
    fake.release()
    results = await asyncio.gather(*lookups)
    assert fake.calls["list_subscriptions"] == 1
    assert all(r == results[0] and r.entitlement is not None for r in results)


async def test_cancelled_first_caller_does_not_cancel_the_others(
    ents: Entitlements, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    lookups = await fake.held(ents.lookup(who()) for _ in range(10))
    lookups[0].cancel()
    lookups[5].cancel()
    fake.release()
    results = await asyncio.gather(*lookups, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[5], asyncio.CancelledError)
    good = [r for i, r in enumerate(results) if i not in (0, 5)]
    assert all(isinstance(r, Lookup) and r.entitlement is not None for r in good)
    assert fake.calls["list_subscriptions"] == 1
    assert ents.lookup_cached(who()) is not None  # the shared work finished and filled L1


async def test_close_cancels_and_awaits_in_flight_work(
    store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    ents = Entitlements(make_settings(), store, fake, clock)
    fake.gate = asyncio.Event()
    waiters = [asyncio.create_task(ents.lookup(who())) for _ in range(3)]
    refresh = asyncio.create_task(ents.refresh("cus_2"))
    await fake.entered.wait()
    await ents.close()
    results = await asyncio.gather(*waiters, refresh, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    # closed: still answers (inline, no owned tasks left behind)
    fake.gate = None
    assert (await ents.lookup(who("cus_3"))).entitlement is not None


# --- negative caching -------------------------------------------------------------------------


async def test_non_payer_is_negative_cached(
    ents: Entitlements, fake: FakeStripe, clock: Clock
) -> None:
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and lookup.entitlement.status == "none"
    assert not allowed(lookup, clock)
    assert fake.calls["list_subscriptions"] == 1
    clock.advance(30)  # past L1, within NEGATIVE_CACHE_TTL
    await ents.lookup(who())
    assert fake.calls["list_subscriptions"] == 1
    clock.advance(31)  # past NEGATIVE_CACHE_TTL
    await ents.lookup(who())
    assert fake.calls["list_subscriptions"] == 2


async def test_email_without_customer_is_negative_cached_and_never_lists_subscriptions(
    ents: Entitlements, fake: FakeStripe, clock: Clock
) -> None:
    ident = who(None, "nobody@example.com")
    assert await ents.lookup(ident) == Lookup(None)
    assert fake.calls == Counter({"find_customers": 1})
    assert await ents.lookup(ident) == Lookup(None)  # L1
    clock.advance(30)
    assert await ents.lookup(ident) == Lookup(None)  # store: negative email lookup
    assert fake.calls == Counter({"find_customers": 1})
    clock.advance(31)
    assert await ents.lookup(ident) == Lookup(None)
    assert fake.calls == Counter({"find_customers": 2})


async def test_email_case(ents: Entitlements, fake: FakeStripe) -> None:
    """Stripe compares emails case-sensitively: asked as given, then lower-cased."""
    fake.customers["Mixed@Example.com"] = ["cus_mixed"]
    fake.customers["lower@example.com"] = ["cus_lower"]
    assert await ents.customers_for_email("Mixed@Example.com") == ["cus_mixed"]
    assert fake.calls["find_customers"] == 1
    assert await ents.customers_for_email("mixed@example.com") == ["cus_mixed"]  # stored
    assert fake.calls["find_customers"] == 1
    assert await ents.customers_for_email("Lower@Example.com") == ["cus_lower"]
    assert fake.calls["find_customers"] == 3


async def test_email_singleflight(ents: Entitlements, fake: FakeStripe) -> None:
    tasks = await fake.held(ents.customers_for_email("x@example.com") for _ in range(50))
    fake.release()
    assert await asyncio.gather(*tasks) == [[]] * 50
    assert fake.calls["find_customers"] == 1


async def test_email_identity_maps_to_customers_and_best_wins(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.customers["pay@example.com"] = ["cus_old", "cus_new"]
    fake.subscriptions["cus_old"] = [subscription("sub_old", clock(), status="canceled")]
    fake.subscriptions["cus_new"] = [subscription("sub_new", clock())]
    lookup = await ents.lookup(who(None, "pay@example.com"))
    assert lookup.entitlement is not None
    assert lookup.entitlement.customer_id == "cus_new" and allowed(lookup, clock)
    assert set(await store.customer_ids_for_email("pay@example.com")) == {"cus_old", "cus_new"}
    clock.advance(6)
    await ents.lookup(who(None, "pay@example.com"))  # mapping from the store now
    assert fake.calls["find_customers"] == 1
    assert fake.calls["list_subscriptions"] == 2


async def test_header_user_sees_access_right_after_checkout(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    ident = who(None, "new@example.com")
    assert await ents.lookup(ident) == Lookup(None)  # negative, in L1 and store
    # Checkout completes: /success (or the webhook) stores the mapping and refreshes.
    fake.subscriptions["cus_9"] = [subscription("sub_9", clock())]
    await store.put_customer("cus_9", "new@example.com")
    await ents.refresh("cus_9", source="success")
    lookup = await ents.lookup(ident)
    assert lookup.entitlement is not None and allowed(lookup, clock)
    assert fake.calls["find_customers"] == 1


# --- TTLs -------------------------------------------------------------------------------------


async def test_cache_never_outlives_the_period_end(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    end = clock() + timedelta(minutes=10)
    fake.subscriptions["cus_1"] = [
        subscription("sub_1", clock(), period_end=end, cancel_at_period_end=True)
    ]
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and lookup.entitlement.expires_at == end
    stored = await store.get_entitlement("cus_1")
    assert stored is not None and stored.expires_at == end

    clock.set(end - timedelta(seconds=2))
    assert (await ents.lookup(who())).entitlement == lookup.entitlement  # store hit, L1 filled
    clock.set(end)
    assert ents.lookup_cached(who()) is None  # L1 entry ends with the period
    fake.subscriptions["cus_1"] = [
        subscription("sub_1", clock(), status="canceled", period_end=end)
    ]
    after = await ents.lookup(who())
    assert fake.calls["list_subscriptions"] == 2
    assert after.entitlement is not None and after.entitlement.status == "canceled"


# --- restart ----------------------------------------------------------------------------------


async def test_restart_keeps_state_without_stripe_calls(
    tmp_path: Path, fake: FakeStripe, clock: Clock
) -> None:
    path = str(tmp_path / "gate.sqlite3")
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    store = SQLiteStore(path, clock=clock)
    await store.open()
    ents = Entitlements(make_settings(), store, fake, clock)
    before = await ents.lookup(who())
    await ents.close()
    await store.close()

    fresh_fake = FakeStripe()
    store = SQLiteStore(path, clock=clock)
    await store.open()
    async with owned(Entitlements(make_settings(), store, fresh_fake, clock)) as ents:
        clock.advance(60)
        after = await ents.lookup(who())
        assert after.entitlement == before.entitlement
        assert not fresh_fake.calls
        assert ents.stats.store_hits == 1
        await store.close()


# --- failures ---------------------------------------------------------------------------------


async def test_stale_if_error_within_and_after_the_window(
    ents: Entitlements, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [
        subscription("sub_1", clock(), period_end=clock() + timedelta(days=60))
    ]
    fresh = await ents.lookup(who())
    fake.fail = StripeUnavailable("down", operation="subscriptions.list")

    clock.advance(2 * 3600)  # cache expired, Stripe down
    stale = await ents.lookup(who())
    assert stale.stale and stale.entitlement == fresh.entitlement and stale.error is None
    assert allowed(stale, clock)
    assert ents.stats.stale_served == 1
    assert ents.lookup_cached(who()) == stale  # briefly cached: the store is spared too

    clock.advance(23 * 3600)  # 25 h after the last good read: past STALE_IF_ERROR
    gone = await ents.lookup(who())
    assert gone == Lookup(None, error="stripe_unavailable")
    assert ents.lookup_cached(who()) is None  # errors are not cached


async def test_nothing_cached_and_stripe_down_is_an_error(
    ents: Entitlements, fake: FakeStripe
) -> None:
    fake.fail = StripeUnavailable("down", operation="subscriptions.list")
    assert await ents.lookup(who()) == Lookup(None, error="stripe_unavailable")
    assert await ents.lookup(who(None, "u@example.com")) == Lookup(None, error="stripe_unavailable")
    assert ents.stats.errors == 2


async def test_customer_gone_from_stripe_has_no_subscription(
    ents: Entitlements, fake: FakeStripe
) -> None:
    fake.fail = StripeRejected("No such customer", operation="x", http_status=404)
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and lookup.entitlement.status == "none"
    assert lookup.error is None


async def test_other_rejections_are_errors_not_denials(
    ents: Entitlements, fake: FakeStripe
) -> None:
    fake.fail = StripeRejected("Invalid API key", operation="x", http_status=401)
    assert await ents.lookup(who()) == Lookup(None, error="stripe_rejected")


async def test_store_failure_still_answers_from_stripe(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    await store.close()
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and allowed(lookup, clock)


# --- grants -----------------------------------------------------------------------------------


async def test_grants_take_precedence(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    until = clock() + timedelta(days=7)
    await store.put_grant("cus_1", until, "beta")
    lookup = await ents.lookup(who())
    ent = lookup.entitlement
    assert ent is not None and (ent.source, ent.status, ent.period_end) == (
        "grant",
        "active",
        until,
    )
    assert allowed(lookup, clock)
    assert not fake.calls

    await store.put_grant("vip@example.com", until, "press")
    by_mail = await ents.lookup(who(None, "VIP@example.com"))
    assert by_mail.entitlement is not None and by_mail.entitlement.source == "grant"
    assert allowed(by_mail, clock)
    assert not fake.calls  # not even an email → customer lookup


async def test_expired_grant_is_ignored(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    await store.put_grant("cus_1", clock() - timedelta(seconds=1), "over")
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and lookup.entitlement.source == "stripe"
    assert fake.calls["list_subscriptions"] == 1


async def test_grant_entry_ends_with_the_grant(
    ents: Entitlements, store: CountingStore, clock: Clock
) -> None:
    await store.put_grant("cus_1", clock() + timedelta(seconds=3), "short")
    await ents.lookup(who())
    clock.advance(3)
    assert ents.lookup_cached(who()) is None


@pytest.mark.parametrize("subject", ["cus_1", "vip@example.com"])
async def test_grant_and_revoke_through_the_owner_take_effect_at_once(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock, subject: str
) -> None:
    fake.subscriptions["cus_1"] = []  # no subscription: denied, and cached in L1
    identity = who("cus_1", "vip@example.com")
    assert not allowed(await ents.lookup(identity), clock)
    assert ents.lookup_cached(identity) is not None
    await ents.grant(subject, clock() + timedelta(days=7), "press")
    assert ents.lookup_cached(identity) is None  # L1 dropped: no waiting for L1_TTL
    granted = await ents.lookup(identity)
    assert granted.entitlement is not None and granted.entitlement.source == "grant"
    assert await ents.revoke(subject)
    assert ents.lookup_cached(identity) is None
    assert not allowed(await ents.lookup(identity), clock)
    assert not await ents.revoke(subject)  # nothing left to revoke


async def test_link_and_delete_customer_through_the_owner(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    header = who(None, "new@example.com")
    assert (await ents.lookup(header)).entitlement is None  # no customer: cached as such
    fake.subscriptions["cus_9"] = [subscription("sub_9", clock())]
    await ents.link_customer("cus_9", "new@example.com")  # checkout completed
    assert ents.lookup_cached(header) is None  # the "no customer" answer is gone
    assert allowed(await ents.lookup(header), clock)
    assert await ents.customer_ids() == ["cus_9"]
    assert (await ents.stored("cus_9")) is not None
    await ents.delete_customer("cus_9")  # customer.deleted
    assert ents.lookup_cached(header) is None
    assert await ents.customer_ids() == [] and await ents.stored("cus_9") is None
    assert await store.customer_ids_for_email("new@example.com") == []


# --- refresh and webhook ordering -------------------------------------------------------------


async def test_refresh_writes_store_and_l1(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    assert allowed(await ents.lookup(who()), clock)
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock(), status="canceled")]
    assert allowed(await ents.lookup(who()), clock)  # still cached
    ent = await ents.refresh("cus_1", source="webhook", event_created=123)
    assert ent.status == "canceled" and ent.source == "webhook"
    assert ent.event_created >= int(clock().timestamp())  # stamped with the read time
    assert await store.get_entitlement("cus_1") == ent
    cached = ents.lookup_cached(who())
    assert cached is not None and cached.entitlement == ent
    assert fake.calls["list_subscriptions"] == 2


async def test_refresh_raises_when_stripe_is_down(ents: Entitlements, fake: FakeStripe) -> None:
    fake.fail = StripeUnavailable("down", operation="subscriptions.list")
    with pytest.raises(StripeUnavailable):
        await ents.refresh("cus_1")


async def test_refresh_always_reads_after_it_was_asked(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    """A refresh never reuses a read that started before it; refreshes queued behind one
    running read share the next read (3 webhooks for one checkout → 2 reads, not 4)."""
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock(), status="incomplete")]
    (lookup,) = await fake.held([ents.lookup(who())])  # a read is out, it will see "incomplete"
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]  # the payment lands
    refreshes = [asyncio.create_task(ents.refresh("cus_1", source="webhook")) for _ in range(3)]
    await asyncio.sleep(0)
    fake.release()
    first = await lookup
    assert first.entitlement is not None and first.entitlement.status == "incomplete"
    results = await asyncio.gather(*refreshes)
    assert all(r.status == "active" for r in results)
    assert fake.calls["list_subscriptions"] == 2
    stored = await store.get_entitlement("cus_1")
    assert stored is not None and stored.status == "active"


async def test_apply_if_newer_orders_webhook_states(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    read = await ents.refresh("cus_1")
    now_ts = int(clock().timestamp())

    old_event = rules.summarize(
        "cus_1",
        [subscription("sub_1", clock(), status="canceled")],
        make_settings(),
        clock(),
        source="webhook",
        event_created=now_ts - 100,
    )
    assert not await ents.apply_if_newer(old_event)  # older than the last Stripe read
    assert await store.get_entitlement("cus_1") == read
    assert ents.lookup_cached(who()) is not None

    new_event = dataclasses.replace(old_event, event_created=now_ts + 100)
    assert await ents.apply_if_newer(new_event)
    # Stored marked as a payload state (re-read from Stripe before it is served).
    marked = dataclasses.replace(new_event, source=PAYLOAD_SOURCE)
    assert await store.get_entitlement("cus_1") == marked
    assert ents.lookup_cached(who()) is None  # dropped from L1
    # payloads are applied while Stripe is down
    fake.fail = StripeUnavailable("down", operation="subscriptions.list")
    lookup = await ents.lookup(who())
    assert lookup.entitlement == marked and not allowed(lookup, clock)
    fake.fail = None

    # and a Stripe read that started before that event does not overwrite it
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    again = await ents.refresh("cus_1")
    assert again == marked

    # A payload of the same second as the stored state is not applied (cannot be ordered).
    same = dataclasses.replace(new_event, status="active")
    assert not await ents.apply_if_newer(same)
    assert await store.get_entitlement("cus_1") == marked


async def test_forget_drops_l1(ents: Entitlements, fake: FakeStripe, clock: Clock) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    fake.customers["a@example.com"] = ["cus_1"]
    await ents.lookup(who())
    await ents.lookup(who(None, "a@example.com"))
    ents.forget("cus_1")
    assert ents.lookup_cached(who()) is None
    assert ents.lookup_cached(who(None, "a@example.com")) is None


# --- integration: real StripeClientAPI against the Stripe double ---------------------------


@pytest.fixture
def double() -> StripeDouble:
    return StripeDouble()


@pytest.fixture
async def live(
    aiohttp_server: AiohttpServer, double: StripeDouble, store: CountingStore, clock: Clock
) -> AsyncIterator[tuple[Entitlements, StripeClientAPI]]:
    server: TestServer = await aiohttp_server(double.app, host="127.0.0.1")
    settings = make_settings(stripe_api_base=f"http://127.0.0.1:{server.port}")
    api = await StripeClientAPI.create(settings, clock=clock)
    try:
        async with owned(Entitlements(settings, store, api, clock)) as ents:
            yield ents, api
    finally:
        await api.close()


def list_calls(double: StripeDouble) -> int:
    return sum(1 for method, path in double.calls if (method, path) == ("GET", "/v1/subscriptions"))


async def test_double_singleflight_and_cache(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble, clock: Clock
) -> None:
    ents, api = live
    cus = double.create_customer("paid@example.com")
    double.create_subscription(cus["id"], PRICE)
    double.faults.latency = 0.05
    results = await asyncio.gather(*(ents.lookup(who(cus["id"])) for _ in range(200)))
    assert list_calls(double) == 1
    assert api.calls["subscriptions.list"] == 1
    assert all(r == results[0] and allowed(r, clock) for r in results)
    await ents.lookup(who(cus["id"]))
    assert list_calls(double) == 1


async def test_double_header_identity(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble, clock: Clock
) -> None:
    ents, _ = live
    cus = double.create_customer("hdr@example.com")
    double.create_subscription(cus["id"], "price_demo_yearly")
    lookup = await ents.lookup(who(None, "hdr@example.com"))
    assert lookup.entitlement is not None and lookup.entitlement.customer_id == cus["id"]
    assert allowed(lookup, clock)
    assert await ents.lookup(who(None, "stranger@example.com")) == Lookup(None)
    assert list_calls(double) == 1  # the stranger cost a customer search, no subscription list


@pytest.mark.parametrize("fault", ["500", "429", "drop"])
async def test_double_stale_if_error(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble, clock: Clock, fault: str
) -> None:
    ents, _ = live
    cus = double.create_customer("stale@example.com")
    double.create_subscription(cus["id"], PRICE)
    fresh = await ents.lookup(who(cus["id"]))
    clock.advance(2 * 3600)
    if fault == "drop":
        double.faults.drop_always()
    else:
        double.faults.fail_always(int(fault))
    stale = await ents.lookup(who(cus["id"]))
    assert stale.stale and stale.entitlement == fresh.entitlement
    unknown = await ents.lookup(who("cus_unknown"))
    assert unknown == Lookup(None, error="stripe_unavailable")
    double.faults.reset()


async def test_double_status_change_via_refresh(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble, clock: Clock
) -> None:
    ents, _ = live
    cus = double.create_customer("change@example.com")
    sub = double.create_subscription(cus["id"], PRICE)
    assert allowed(await ents.lookup(who(cus["id"])), clock)
    await double.set_status(sub["id"], "unpaid")
    ent = await ents.refresh(cus["id"], source="webhook")
    assert ent.status == "unpaid"
    lookup = await ents.lookup(who(cus["id"]))
    assert lookup.entitlement == ent and not allowed(lookup, clock)


async def open_breaker(ents: Entitlements, double: StripeDouble) -> None:
    """Stripe down (the double answers 500 until its faults are reset) and
    ``BREAKER_THRESHOLD`` lookups of different customers: enough failures to open the breaker."""
    double.faults.fail_always(500)
    for i in range(BREAKER_THRESHOLD):
        await ents.lookup(who(f"cus_{i}"))


async def test_circuit_breaker_opens_then_half_opens_and_closes(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble, clock: Clock
) -> None:
    ents, api = live
    await open_breaker(ents, double)
    assert breaker_state(ents) == "open"
    assert api.calls["subscriptions.list"] == list_calls(double) == BREAKER_THRESHOLD

    assert await ents.lookup(who("cus_x")) == Lookup(None, error="stripe_unavailable")
    # Skipped: the request never reached the double.
    assert api.calls["subscriptions.list"] == list_calls(double) == BREAKER_THRESHOLD
    assert ents.stats.breaker_skips == 1
    with pytest.raises(StripeBreakerOpen, match="breaker"):
        await ents.refresh("cus_x")

    clock.advance(BREAKER_COOLDOWN)
    assert breaker_state(ents) == "half_open"
    await ents.lookup(who("cus_y"))  # the probe fails: open again
    assert list_calls(double) == BREAKER_THRESHOLD + 1
    assert breaker_state(ents) == "open"

    clock.advance(BREAKER_COOLDOWN)
    double.faults.reset()
    cus = double.create_customer("z@example.com")
    double.create_subscription(cus["id"], PRICE)
    assert (await ents.lookup(who(cus["id"]))).entitlement is not None  # probe succeeds
    assert breaker_state(ents) == "closed"
    await ents.lookup(who("cus_w"))
    assert list_calls(double) == BREAKER_THRESHOLD + 3
    assert ents.breaker.opened == 2


async def test_half_open_lets_one_probe_through(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble, clock: Clock
) -> None:
    ents, _ = live
    await open_breaker(ents, double)
    clock.advance(BREAKER_COOLDOWN)
    double.faults.reset()
    cus = double.create_customer("a@example.com")
    double.create_subscription(cus["id"], PRICE)
    release = double.faults.hold = asyncio.Event()
    probe = asyncio.create_task(ents.lookup(who(cus["id"])))
    await eventually(lambda: list_calls(double) == BREAKER_THRESHOLD + 1, "the probe at Stripe")
    other = await ents.lookup(who("cus_b"))  # while the probe is out: skipped
    assert other.error == "stripe_unavailable"
    assert list_calls(double) == BREAKER_THRESHOLD + 1
    release.set()
    assert (await probe).entitlement is not None
    assert breaker_state(ents) == "closed"


async def test_double_rejections_are_errors_and_keep_the_breaker_closed(
    live: tuple[Entitlements, StripeClientAPI], double: StripeDouble
) -> None:
    ents, api = live
    double.api_key = "sk_test_another"  # the gate's key is refused: 401
    for i in range(2 * BREAKER_THRESHOLD):
        assert await ents.lookup(who(f"cus_{i}")) == Lookup(None, error="stripe_rejected")
    assert breaker_state(ents) == "closed"  # Stripe answered every time
    assert api.calls["subscriptions.list"] == 2 * BREAKER_THRESHOLD


async def test_double_unknown_customer_is_no_subscription(
    live: tuple[Entitlements, StripeClientAPI],
) -> None:
    ents, _ = live
    lookup = await ents.lookup(who("cus_doesnotexist"))
    assert lookup.error is None
    assert lookup.entitlement is None or lookup.entitlement.status == "none"


async def test_entitlement_round_trips_through_store_exactly(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [
        subscription("sub_1", clock(), status="past_due", cancel_at=int(clock().timestamp()) + 99)
    ]
    ent = await ents.refresh("cus_1")
    got = await store.get_entitlement("cus_1")
    assert isinstance(got, Entitlement) and got == ent
    assert got.period_start is not None


async def test_every_change_is_announced_once_on_changes(
    ents: Entitlements, fake: FakeStripe, clock: Clock
) -> None:
    seen: list[Change] = []
    stop = ents.changes.listen(seen.append)
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    await ents.refresh("cus_1", source="webhook")
    await ents.link_customer("cus_2", "two@example.com")
    await ents.grant("three@example.com", clock() + timedelta(days=1), "")
    await ents.delete_customer("cus_2")
    assert seen == [
        Change("customer", "cus_1"),
        Change("customer", "cus_2"),
        Change("everyone"),
        Change("customer", "cus_2"),
    ]
    stop()
    ents.forget("cus_1")
    assert len(seen) == 4  # stopped listening


# --- features (tiers) -------------------------------------------------------------------------

TIERS_ENV: dict[str, Any] = {"feature_rules": ("/api/analysis/*=analysis",)}


async def test_features_are_read_with_the_subscriptions_stored_and_kept_when_stripe_fails(
    store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    fake.features["prod_1"] = ["analysis", "search"]
    async with owned(Entitlements(make_settings(**TIERS_ENV), store, fake, clock)) as ents:
        first = await ents.lookup(who())
        assert first.entitlement is not None
        assert first.entitlement.features == {"analysis", "search"}
        assert fake.calls["list_product_features"] == 1
        assert ents.stats.stripe_calls == 2  # the subscriptions and the product's features
        stored = await store.get_entitlement("cus_1")
        assert stored is not None and stored.features == {"analysis", "search"}
        # Concurrent misses (cache expired) share one read of both (singleflight).
        clock.advance(2 * 3600)
        await asyncio.gather(*(ents.lookup(who()) for _ in range(5)))
        assert fake.calls["list_subscriptions"] == 2
        assert fake.calls["list_product_features"] == 2
        # Stripe down after the cache expired: the stored features are served (stale-if-error).
        clock.advance(2 * 3600)
        fake.fail = StripeUnavailable("down", operation="subscriptions.list")
        stale = await ents.lookup(who())
        assert stale.stale and stale.entitlement is not None
        assert stale.entitlement.features == {"analysis", "search"}


async def test_a_refresh_reads_changed_features(
    store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    """A plan change (another product) shows at once; a product's own features are kept
    PLAN_CACHE_SECONDS (as the landing page's plans)."""
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    fake.features["prod_1"] = ["search"]
    fake.features["prod_2"] = ["analysis", "search"]
    async with owned(Entitlements(make_settings(**TIERS_ENV), store, fake, clock)) as ents:
        assert (await ents.lookup(who())).entitlement.features == {"search"}  # type: ignore[union-attr]
        fake.subscriptions["cus_1"] = [subscription("sub_1", clock(), product="prod_2")]
        await ents.refresh("cus_1", source="webhook", event_created=int(clock().timestamp()))
        assert ents.lookup_cached(who()) is not None
        lookup = await ents.lookup(who())
        assert lookup.entitlement is not None
        assert lookup.entitlement.features == {"analysis", "search"}
        fake.features["prod_2"] = ["search"]  # a feature detached from the product
        clock.advance(PLAN_CACHE_SECONDS + 1)
        await ents.refresh("cus_1", source="webhook", event_created=int(clock().timestamp()))
        lookup = await ents.lookup(who())
        assert lookup.entitlement is not None and lookup.entitlement.features == {"search"}


async def test_no_features_call_without_feature_rules_or_without_access(
    ents: Entitlements, store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    fake.subscriptions["cus_1"] = [subscription("sub_1", clock())]
    fake.features["prod_1"] = ["analysis"]
    lookup = await ents.lookup(who())
    assert lookup.entitlement is not None and lookup.entitlement.features == frozenset()
    assert fake.calls["list_product_features"] == 0
    fake.subscriptions["cus_2"] = [subscription("sub_2", clock(), status="canceled")]
    async with owned(Entitlements(make_settings(**TIERS_ENV), store, fake, clock)) as tiers:
        await tiers.lookup(who("cus_2"))
    assert fake.calls["list_product_features"] == 0  # no access: its features count for nothing


async def test_features_come_only_from_the_subscriptions_the_rules_accept(
    store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    """A Basic customer who also holds Pro subscriptions the rules refuse (an unsold price, a
    legacy Plan, paused, incomplete) and a Pro item on an unsold price in the Basic
    subscription: Basic's features only, and Pro's product is never even read."""
    now = clock()
    basic = subscription("sub_basic", now, product="prod_basic")
    basic["items"]["data"].append(
        {"id": "si_extra", "price": {"id": "price_unsold", "product": "prod_pro"}}
    )
    legacy = subscription("sub_legacy", now, product="prod_pro")
    legacy["items"]["data"][0]["plan"] = legacy["items"]["data"][0].pop("price")
    legacy["items"]["data"][0]["plan"]["id"] = "plan_legacy"
    fake.subscriptions["cus_1"] = [
        basic,
        subscription("sub_unsold", now, price="price_unsold", product="prod_pro"),
        legacy,
        subscription("sub_paused", now, product="prod_pro", pause_collection={"behavior": "void"}),
        subscription("sub_paused2", now, product="prod_pro", status="paused"),
        subscription("sub_incomplete", now, product="prod_pro", status="incomplete"),
    ]
    fake.features["prod_basic"] = ["search"]
    fake.features["prod_pro"] = ["analysis", "search"]
    async with owned(Entitlements(make_settings(**TIERS_ENV), store, fake, clock)) as ents:
        lookup = await ents.lookup(who())
        assert lookup.entitlement is not None
        assert lookup.entitlement.subscription_id == "sub_basic"
        assert lookup.entitlement.features == {"search"}
        assert fake.calls["list_product_features"] == 1  # prod_basic only


async def test_product_features_cost_one_call_per_product_per_cache_lifetime(
    store: CountingStore, fake: FakeStripe, clock: Clock
) -> None:
    """Stripe calls stay bounded: many customers on one product (concurrently, too) read its
    features once per PLAN_CACHE_SECONDS; a customer read is one subscriptions call."""
    for n in range(6):
        fake.subscriptions[f"cus_{n}"] = [subscription(f"sub_{n}", clock())]
    fake.features["prod_1"] = ["analysis"]
    async with owned(Entitlements(make_settings(**TIERS_ENV), store, fake, clock)) as ents:
        await asyncio.gather(*(ents.lookup(who(f"cus_{n}")) for n in range(3)))
        await ents.lookup(who("cus_3"))
        assert fake.calls["list_subscriptions"] == 4
        assert fake.calls["list_product_features"] == 1
        # Stripe fails after the product's lifetime: its last answer keeps serving.
        clock.advance(PLAN_CACHE_SECONDS + 1)
        fake.features["prod_1"] = []
        calls = fake.calls["list_product_features"]
        fake.fail = StripeUnavailable("down", operation="products.features.list")
        assert await ents.products.get("prod_1") == {"analysis"}
        fake.fail = None
        lookup = await ents.lookup(who("cus_4"))
        assert lookup.entitlement is not None and lookup.entitlement.features == frozenset()
        assert fake.calls["list_product_features"] == calls + 2
