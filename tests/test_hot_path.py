"""The cached paying request's hot path: remembered allowed verdicts (Services.verdicts,
gateway.l1.Verdicts) for cookie sessions and trusted identity-header users, and how they end,
the session's end, path classification, the upstream header plan and the worker's GC threshold.

The gate runs against a real Entitlements (fake Stripe, real SQLite store) on one injected
manual clock shared by the entitlement cache, the session cache and the gate, as the services
share one: time moves by advancing it, and the production hot path is what runs. Sessions are
real server-side sessions in that store.
"""

import contextlib
import gc
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway import gate as gate_module
from gateway import server
from gateway.entitlement import Entitlements, EntitlementStats
from gateway.forwarded import ClientInfo
from gateway.gate import check
from gateway.identity import Who, identify_from
from gateway.l1 import L1, L1Entry, Verdicts
from gateway.metrics import DECISIONS
from gateway.model import Clock, Denial, Identity, Lookup, ManualClock, Pass
from gateway.paths import MAX_MEMO_PATH, MEMO_PATHS, PublicPaths, normalize_path
from gateway.proxy_headers import PLAN_CACHE_SIZE, HeaderPolicy, build_request_headers
from gateway.services import Services, open_services
from gateway.sessions import SessionEntry, Sessions
from gateway.settings import SESSION_COOKIE, Settings
from gateway.store import Backend
from gateway.stripe_api import StripeAPI, StripeUnavailable
from tests.conftest import PRICE, FakeStripe, changed, owned, subscription
from tests.conftest import billing_settings as make_settings
from tests.conftest import make_settings as default_settings

EMAIL = "alice@example.com"
CUSTOMER = "cus_1"
UNTRUSTED = ClientInfo("203.0.113.9", "http", "gate.example", False, "203.0.113.9", "rid")
TRUSTED = ClientInfo("10.0.0.1", "http", "gate.example", True, "10.0.0.1", "rid")
EXPECTED_HEADERS = {
    "X-Gate-User": CUSTOMER,
    "X-Gate-Email": EMAIL,
    "X-Gate-Status": "active",
    "X-Gate-Plan": PRICE,
}


def hot_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "session_secret": "s" * 48,
        "public_paths": ("/static/*",),
        "identity_header": "X-Forwarded-Email",
    }
    return make_settings(**{**base, **overrides})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(float(int(time.time())))  # whole seconds, as Stripe's timestamps


@pytest.fixture
def fake(clock: ManualClock) -> FakeStripe:
    f = FakeStripe()
    f.subscriptions[CUSTOMER] = [subscription("sub_1", clock.now())]
    return f


@contextlib.asynccontextmanager
async def services(
    tmp_path: Path, fake: FakeStripe, clock: ManualClock, **overrides: Any
) -> AsyncIterator[Services]:
    """The gate's services as the server builds them (:func:`open_services`), on ``clock``,
    with ``fake`` behind the Stripe door and a real SQLite store."""

    async def stripe(_settings: Settings, _clock: Clock) -> StripeAPI:
        return fake

    path = tmp_path / f"gate-{len(list(tmp_path.glob('gate-*.sqlite3')))}.sqlite3"
    settings = hot_settings(database_path=str(path), **overrides)
    async with open_services(settings, clock=clock, stripe=stripe) as svc:
        yield svc


@pytest.fixture
async def svc(tmp_path: Path, fake: FakeStripe, clock: ManualClock) -> AsyncIterator[Services]:
    async with services(tmp_path, fake, clock) as s:
        yield s


@pytest.fixture
def store(svc: Services) -> Backend:
    return svc.store


class SlowPathCounter:
    """Counts gate.check's full identify → entitlement → decision path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = identify_from  # the function gate.check calls through its module global

        def counting(*args: Any, **kwargs: Any) -> Awaitable[Who]:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(gate_module, "identify_from", counting)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> SlowPathCounter:
    return SlowPathCounter(monkeypatch)


# One real session of CUSTOMER per Sessions (per test): every cookie_header of a test names it.
_SESSION_OF: "weakref.WeakKeyDictionary[Sessions, str]" = weakref.WeakKeyDictionary()


async def session_value(svc: Services) -> str:
    """The cookie value of CUSTOMER's session (created through the session service on first
    use, on the services' clock)."""
    value = _SESSION_OF.get(svc.sessions)
    if value is None:
        value = await svc.sessions.create(CUSTOMER, EMAIL)
        _SESSION_OF[svc.sessions] = value
    return value


async def cookie_header(svc: Services, extra: str = "theme=dark; ") -> str:
    return f"{extra}{SESSION_COOKIE}={await session_value(svc)}"


def request(cookie: str | None, path: str = "/app?x=1", **headers: str) -> web.Request:
    h = dict(headers)
    if cookie is not None:
        h["Cookie"] = cookie
    return make_mocked_request("GET", path, headers=h)


async def gate_answer(
    svc: Services, cookie: str | None, path: str = "/app?x=1", client: ClientInfo = UNTRUSTED
) -> Any:
    return await check(request(cookie, path), client, svc)


def kept(svc: Services) -> int:
    return len(svc.verdicts)  # a function call: mypy must not narrow it


def headers_of(verdict: object) -> dict[str, str]:
    """The upstream headers of an allowed verdict."""
    assert isinstance(verdict, Pass), verdict
    return dict(verdict.headers)


def until_of(verdicts: Verdicts, key: str, header: bool = False) -> float | None:
    """When the verdict remembered for ``key`` ends, if one is (and still holds)."""
    verdict = verdicts.remembered(key, None, header)
    return verdict.until if verdict is not None else None


# --------------------------------------------------------------------------- verdicts


async def test_allowed_session_is_remembered_per_cookie_header(
    svc: Services, slow: SlowPathCounter
) -> None:
    cookie = await cookie_header(svc)
    first = await gate_answer(svc, cookie)
    assert headers_of(first) == EXPECTED_HEADERS
    assert slow.calls == 1 and kept(svc) == 1
    hits, allows = svc.entitlements.stats.l1_hits, DECISIONS["allow"]

    for _ in range(5):
        again = await gate_answer(svc, cookie, "/other/path?y=2")
        assert headers_of(again) == EXPECTED_HEADERS
    assert slow.calls == 1  # no cookie parse, no lookup, no decision
    assert svc.entitlements.stats.l1_hits == hits + 5  # still counted as L1 hits
    assert DECISIONS["allow"] == allows + 5
    with pytest.raises(TypeError):
        again.headers["X-Gate-User"] = "someone else"  # shared between requests: read-only

    # Another Cookie header (same session, other cookies) is another key.
    await gate_answer(svc, await cookie_header(svc, extra="theme=light; "))
    assert slow.calls == 2 and kept(svc) == 2


async def test_forget_and_refresh_end_the_verdict(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter, clock: ManualClock
) -> None:
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie)
    svc.entitlements.forget(CUSTOMER)  # a webhook, `customer.deleted`, sign-out of a customer
    await gate_answer(svc, cookie)
    assert slow.calls == 2

    fake.subscriptions[CUSTOMER] = [subscription("sub_1", clock.now(), status="canceled")]
    await svc.entitlements.refresh(CUSTOMER, source="webhook")
    denied = await gate_answer(svc, cookie)
    assert isinstance(denied, Denial) and denied.status == 402
    assert slow.calls == 3
    denied = await gate_answer(svc, cookie)
    assert isinstance(denied, Denial) and denied.status == 402  # denials are not kept
    assert slow.calls == 4


@pytest.mark.parametrize(
    "change",
    ["link_customer", "delete_customer", "grant_customer", "grant_email", "revoke"],
)
async def test_every_change_of_the_customer_ends_the_verdict(
    svc: Services, slow: SlowPathCounter, clock: ManualClock, change: str
) -> None:
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie)
    await gate_answer(svc, cookie)
    assert slow.calls == 1
    ents = svc.entitlements
    until = clock.now() + timedelta(days=3)
    if change == "link_customer":
        await ents.link_customer(CUSTOMER, EMAIL)
    elif change == "delete_customer":
        await ents.delete_customer(CUSTOMER)
    elif change == "grant_customer":
        await ents.grant(CUSTOMER, until, "test")
    elif change == "grant_email":
        await ents.grant(EMAIL, until, "test")
    else:
        assert not await ents.revoke(CUSTOMER)
    assert ents.verdicts.remembered(cookie) is None
    await gate_answer(svc, cookie)
    assert slow.calls == 2


async def test_new_l1_entry_ends_the_verdict(svc: Services, slow: SlowPathCounter) -> None:
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie)
    ents = svc.entitlements
    lookup = ents.lookup_cached(Identity(EMAIL, CUSTOMER, "cookie"))
    assert lookup is not None
    ents._fill(CUSTOMER, Lookup(lookup.entitlement))  # e.g. a store read after L1_TTL
    await gate_answer(svc, cookie)
    assert slow.calls == 2


async def test_verdict_ends_with_the_l1_entry(
    svc: Services, slow: SlowPathCounter, clock: ManualClock
) -> None:
    cookie = await cookie_header(svc)
    start = clock.time()
    await gate_answer(svc, cookie)
    # L1_TTL is the earliest end here (the session lasts 30 days, the period 30 days).
    assert until_of(svc.verdicts, cookie) == start + svc.settings.l1_ttl
    clock.advance(2.0)
    await gate_answer(svc, cookie)
    assert slow.calls == 1
    clock.advance(svc.settings.l1_ttl - 2.0)  # exactly the end: over
    assert svc.verdicts.remembered(cookie) is None
    await gate_answer(svc, cookie)
    assert slow.calls == 2  # and the slow path reads the store again, on the same clock


async def test_verdict_never_outlives_the_access_or_the_session(
    store: Backend, fake: FakeStripe, svc: Services, slow: SlowPathCounter, clock: ManualClock
) -> None:
    now = clock.now()
    ends = now + timedelta(seconds=3)
    fake.subscriptions[CUSTOMER] = [subscription("sub_1", now, cancel_at=int(ends.timestamp()))]
    cookie = await cookie_header(svc)
    assert headers_of(await gate_answer(svc, cookie))["X-Gate-Status"] == "active"
    until = until_of(svc.verdicts, cookie)
    assert until == ends.timestamp()  # the cancellation, not L1_TTL (5 s)
    clock.advance(3)
    denied = await gate_answer(svc, cookie)  # the access has ended: decided again, denied
    assert isinstance(denied, Denial) and denied.status == 402
    assert slow.calls == 2

    # A session signed 2 s ago that lasts 3 s: its verdict ends with it, in 1 s.
    fake.subscriptions[CUSTOMER] = [subscription("sub_1", clock.now())]  # renewed
    await svc.entitlements.refresh(CUSTOMER, source="webhook")
    settings = changed(svc.settings, session_lifetime=3)
    svc.sessions = Sessions(settings, store, clock)
    earlier = Sessions(settings, store, ManualClock(clock.time() - 2))
    cookie = f"{SESSION_COOKIE}={await earlier.create(CUSTOMER, EMAIL)}"
    assert headers_of(await gate_answer(svc, cookie)) == EXPECTED_HEADERS
    assert until_of(svc.verdicts, cookie) == clock.time() - 2 + 3
    clock.advance(1)
    answer = await gate_answer(svc, cookie)  # the session has ended: not signed in
    assert isinstance(answer, Denial) and answer.status == 401


async def test_trusted_identity_header_wins_over_a_remembered_cookie(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie, client=TRUSTED)
    assert kept(svc) == 1
    req = request(cookie, **{"X-Forwarded-Email": "bob@example.com"})
    answer = await check(req, TRUSTED, svc)
    assert isinstance(answer, Denial) and answer.status == 402  # bob has no customer
    assert slow.calls == 2
    # From an untrusted peer the header means nothing: the remembered verdict answers.
    answer = await check(req, UNTRUSTED, svc)
    assert not isinstance(answer, Denial)
    assert headers_of(answer) == EXPECTED_HEADERS
    assert slow.calls == 2


# --------------------------------------------------------------------------- identity header


def named(value: str, path: str = "/app?x=1", cookie: str | None = None) -> web.Request:
    return request(cookie, path, **{"X-Forwarded-Email": value})


async def test_a_header_users_next_requests_take_the_remembered_path(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    """A paying user named by the trusted identity header is decided once, then answered from
    the verdict remembered for that header value, as a cookie session is."""
    fake.customers[EMAIL] = [CUSTOMER]
    first = await check(named(EMAIL), TRUSTED, svc)
    assert headers_of(first) == EXPECTED_HEADERS
    assert isinstance(first, Pass) and first.remembered == "header"
    assert slow.calls == 1 and kept(svc) == 1
    hits, stripe_calls = svc.entitlements.stats.l1_hits, dict(fake.calls)
    for i in range(5):
        again = await check(named(EMAIL, f"/other?i={i}"), TRUSTED, svc)
        assert again is first  # the one remembered verdict, handed out as it is
    assert slow.calls == 1  # no identify, no lookup, no decision
    assert svc.entitlements.stats.l1_hits == hits + 5
    assert dict(fake.calls) == stripe_calls
    assert until_of(svc.verdicts, EMAIL, header=True) == first.until
    # The value as sent is the key: another spelling of the same email is decided (and then
    # remembered on its own), never answered from this one.
    other_spelling = await check(named(" Alice@Example.com"), TRUSTED, svc)
    assert headers_of(other_spelling) == EXPECTED_HEADERS
    assert slow.calls == 2 and kept(svc) == 2


async def test_a_header_verdict_is_never_reused_for_another_value_or_an_untrusted_peer(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    fake.customers[EMAIL] = [CUSTOMER]
    assert headers_of(await check(named(EMAIL), TRUSTED, svc)) == EXPECTED_HEADERS
    assert slow.calls == 1
    # Another value: decided, and refused (bob has no customer), whatever was remembered.
    bob = await check(named("bob@example.com"), TRUSTED, svc)
    assert isinstance(bob, Denial) and bob.status == 402
    assert slow.calls == 2
    # The same value from a peer that is not trusted means nothing: not signed in.
    for _ in range(2):
        stranger = await check(named(EMAIL), UNTRUSTED, svc)
        assert isinstance(stranger, Denial) and stranger.status == 401
    assert slow.calls == 4
    # A header verdict is never looked up as a cookie's, nor a cookie's as a header's.
    assert svc.verdicts.remembered(EMAIL) is None
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie)
    assert svc.verdicts.remembered(cookie, None, True) is None
    assert svc.verdicts.remembered(cookie) is not None
    # Neither a believed header that is not an email: the cookie decides, and nothing is
    # remembered for either (the header was believed, so the cookie's verdict is not used).
    before = kept(svc)
    answer = await check(named("not an email", cookie=cookie), TRUSTED, svc)
    assert headers_of(answer) == EXPECTED_HEADERS
    assert isinstance(answer, Pass) and not answer.remembered
    assert kept(svc) == before


@pytest.mark.parametrize("change", ["cancel", "forget", "revoke_email_grant", "l1_end"])
async def test_a_header_verdict_ends_with_the_customers_change_or_its_l1_entry(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter, clock: ManualClock, change: str
) -> None:
    fake.customers[EMAIL] = [CUSTOMER]
    assert headers_of(await check(named(EMAIL), TRUSTED, svc)) == EXPECTED_HEADERS
    assert svc.verdicts.remembered(EMAIL, None, True) is not None
    ents = svc.entitlements
    if change == "cancel":  # the webhook's re-read finds the subscription canceled
        fake.subscriptions[CUSTOMER] = [subscription("sub_1", clock.now(), status="canceled")]
        await ents.apply_event(CUSTOMER, int(clock.time()))
    elif change == "forget":
        ents.forget(CUSTOMER)
    elif change == "revoke_email_grant":  # an operator's revoke for the email
        assert not await ents.revoke(EMAIL)
    else:
        clock.advance(svc.settings.l1_ttl)
    assert svc.verdicts.remembered(EMAIL, None, True) is None  # at once
    answer = await check(named(EMAIL), TRUSTED, svc)
    assert slow.calls == 2
    if change == "cancel":
        assert isinstance(answer, Denial) and answer.status == 402
    else:
        assert headers_of(answer) == EXPECTED_HEADERS


async def test_path_checks_still_run_first(svc: Services, slow: SlowPathCounter) -> None:
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie)
    assert (
        headers_of(await gate_answer(svc, cookie, "/static/app.css")) == {}
    )  # public: no X-Gate-*
    bad = await gate_answer(svc, cookie, "/static/%2e%2e/%00")
    assert isinstance(bad, Denial) and bad.status == 400
    assert slow.calls == 1


async def test_only_allowed_cookie_sessions_are_kept(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    assert isinstance(await gate_answer(svc, None), Denial)  # anonymous: 401
    assert isinstance(await gate_answer(svc, "theme=dark"), Denial)
    tampered = (await cookie_header(svc))[:-2] + "xx"
    assert isinstance(await gate_answer(svc, tampered), Denial)
    fake.subscriptions["cus_2"] = []
    unpaid = f"{SESSION_COOKIE}={await svc.sessions.create('cus_2', None)}"
    assert isinstance(await gate_answer(svc, unpaid), Denial)
    assert kept(svc) == 0


async def test_fail_open_is_not_remembered(
    tmp_path: Path, fake: FakeStripe, slow: SlowPathCounter, clock: ManualClock
) -> None:
    async with services(tmp_path, fake, clock, on_stripe_error="allow") as svc:
        fake.fail = StripeUnavailable("down", operation="subscriptions.list")
        answer = await gate_answer(svc, await cookie_header(svc))
        assert headers_of(answer) == {"X-Gate-User": CUSTOMER, "X-Gate-Email": EMAIL}
        assert kept(svc) == 0


def test_verdicts_are_bounded(clock: ManualClock) -> None:
    l1 = L1(10, clock)
    lookup = Lookup(None)
    l1.put("cus_1", L1Entry(lookup, clock.time() + 5, ("cus_1",)))
    stats = EntitlementStats()
    cache = Verdicts(l1, clock, stats, max_entries=3)
    session = SessionEntry(Identity(None, "cus_1", "cookie"), "h", clock.time() + 60)
    for i in range(5):
        cache.put(f"c{i}", "cus_1", lookup, {"X-Gate-User": str(i)}, clock.time() + 60, session)
    assert len(cache) == 3
    assert cache.remembered("c0") is None and cache.remembered("c1") is None
    c4 = cache.remembered("c4")
    assert c4 is not None and c4.remembered and dict(c4.headers) == {"X-Gate-User": "4"}
    assert stats.l1_hits == 1  # the one hit
    assert until_of(cache, "c4") == clock.time() + 5  # never past the L1 entry
    # Nothing kept for a verdict that is already over, rests on another lookup or on no entry.
    cache.put("past", "cus_1", lookup, {}, clock.time() - 1, session)
    cache.put("other", "cus_1", Lookup(None, stale=True), {}, clock.time() + 60, session)
    cache.put("none", "cus_2", lookup, {}, clock.time() + 60, session)
    assert (
        cache.remembered("past") is None
        and cache.remembered("other") is None
        and cache.remembered("none") is None
    )
    # ... nor on a dead session entry; and a live one that ends first ends the verdict.
    gone = SessionEntry(Identity(None, "cus_1", "cookie"), "g", clock.time() + 60, live=False)
    cache.put("revoked", "cus_1", lookup, {}, clock.time() + 60, gone)
    assert cache.remembered("revoked") is None
    short = SessionEntry(Identity(None, "cus_1", "cookie"), "s", clock.time() + 2)
    cache.put("short", "cus_1", lookup, {}, clock.time() + 60, short)
    assert until_of(cache, "short") == clock.time() + 2
    short.live = False  # revoked on this worker
    assert cache.remembered("short") is None
    l1.drop("cus_1")
    cache.put("dead", "cus_1", lookup, {}, clock.time() + 60, session)
    assert cache.remembered("dead") is None
    assert cache.remembered("c4") is None  # its entry died meanwhile
    cache.clear()
    assert len(cache) == 0


# --------------------------------------------------------------------------- verdicts and L1


async def test_verdict_follows_the_l1_entry(svc: Services, clock: ManualClock) -> None:
    ents = svc.entitlements
    alice = Identity(EMAIL, CUSTOMER, "cookie")
    lookup = await ents.lookup(alice)
    end = clock.time() + 3600
    session = SessionEntry(alice, "h", end)
    ents.verdicts.put("c", alice.key, lookup, {"X-Gate-User": CUSTOMER}, end, session)
    assert until_of(ents.verdicts, "c") == clock.time() + svc.settings.l1_ttl
    ents.verdicts.put("equal", alice.key, Lookup(lookup.entitlement), {}, end, session)
    ents.verdicts.put("other", alice.key, Lookup(None), {}, end, session)  # not what L1 holds
    assert (
        ents.verdicts.remembered("c") is not None and ents.verdicts.remembered("equal") is not None
    )
    assert ents.verdicts.remembered("other") is None
    ents.forget(CUSTOMER)
    assert ents.verdicts.remembered("c") is None and ents.verdicts.remembered("equal") is None
    ents.verdicts.put("c", alice.key, lookup, {}, end, session)  # that entry is gone
    assert ents.verdicts.remembered("c") is None


async def test_a_verdict_answers_only_paths_whose_feature_it_carries(
    svc: Services, clock: ManualClock
) -> None:
    """Tiers: the verdict remembers the customer's features; a path needing another one
    misses (and is decided, and refused, on the slow path) without ending the verdict."""
    ents = svc.entitlements
    alice = Identity(EMAIL, CUSTOMER, "cookie")
    lookup = await ents.lookup(alice)
    end = clock.time() + 3600
    session = SessionEntry(alice, "h", end)
    kept = ents.verdicts.put("c", alice.key, lookup, {}, end, session, frozenset({"search"}))
    assert ents.verdicts.remembered("c") is kept  # no feature needed
    assert ents.verdicts.remembered("c", "search") is kept
    assert ents.verdicts.remembered("c", "analysis") is None
    assert ents.verdicts.remembered("c") is kept and len(ents.verdicts) == 1
    ents.verdicts.put("plain", alice.key, lookup, {}, end, session)  # no features at all
    assert ents.verdicts.remembered("plain", "search") is None


async def test_verdicts_work_on_an_injected_clock(
    store: Backend, fake: FakeStripe, clock: ManualClock
) -> None:
    """The fast paths no longer switch themselves off on an injected clock."""
    async with owned(Entitlements(hot_settings(), store, fake, clock)) as ents:
        alice = Identity(EMAIL, CUSTOMER, "cookie")
        forever = SessionEntry(alice, "h", 1e12)
        kept = ents.verdicts.put(
            "c", alice.key, await ents.lookup(alice), {"a": "1"}, 1e12, forever
        )
        assert ents.verdicts.remembered("c") == kept and dict(kept.headers) == {"a": "1"}
        assert kept.remembered
        clock.advance(4.999)
        assert ents.verdicts.remembered("c") is not None
        clock.advance(0.001)
        assert ents.verdicts.remembered("c") is None  # L1_TTL (5 s) on the injected clock


async def test_evicted_and_expired_entries_end_verdicts(
    store: Backend, fake: FakeStripe, clock: ManualClock
) -> None:
    async with owned(Entitlements(hot_settings(l1_max_entries=1), store, fake, clock)) as ents:
        fake.subscriptions["cus_2"] = [subscription("sub_2", clock.now())]
        alice, bob = Identity(None, CUSTOMER, "cookie"), Identity(None, "cus_2", "cookie")
        forever = SessionEntry(alice, "h", 1e12)
        ents.verdicts.put("alice", alice.key, await ents.lookup(alice), {}, 1e12, forever)
        assert ents.verdicts.remembered("alice") is not None
        await ents.lookup(bob)  # evicts alice (L1 holds one entry)
        assert ents.verdicts.remembered("alice") is None
        ents.verdicts.put("bob", bob.key, await ents.lookup(bob), {}, 1e12, forever)
        assert ents.verdicts.remembered("bob") is not None
        clock.advance(10)
        assert ents.lookup_cached(bob) is None  # found expired
        assert ents.verdicts.remembered("bob") is None


# --------------------------------------------------------------------------- session end


async def test_verdict_dies_when_its_session_is_revoked_here(
    svc: Services, slow: SlowPathCounter
) -> None:
    cookie = await cookie_header(svc)
    await gate_answer(svc, cookie)
    await gate_answer(svc, cookie)
    assert slow.calls == 1 and kept(svc) == 1  # the remembered verdict answers
    assert await svc.sessions.revoke(await session_value(svc))  # sign-out on this worker
    assert svc.verdicts.remembered(cookie) is None  # at once, no waiting
    answer = await gate_answer(svc, cookie)
    assert isinstance(answer, Denial) and answer.status == 401
    assert slow.calls == 2


async def test_verdict_never_outlives_the_session_cache_entry(
    svc: Services, store: Backend, slow: SlowPathCounter, clock: ManualClock
) -> None:
    """Another worker's revocation: this one's verdict (and session entry) end within L1_TTL
    of when the session was read here, whatever the L1 entry says."""
    start = clock.time()
    value = await session_value(svc)  # read (created) here at start: believed until +L1_TTL
    cookie = f"{SESSION_COOKIE}={value}"
    clock.advance(3)
    await gate_answer(svc, cookie)  # the entitlement is read now: its L1 entry lasts to +8
    assert until_of(svc.verdicts, cookie) == start + svc.settings.l1_ttl
    other_worker = Sessions(svc.settings, store, clock)
    assert await other_worker.revoke(value)
    clock.advance(1.9)
    assert not isinstance(await gate_answer(svc, cookie), Denial)  # the documented bound
    assert slow.calls == 1  # from the verdict: no store I/O on the hot path
    clock.advance(0.1)  # L1_TTL after the session was read: the verdict is over...
    assert svc.verdicts.remembered(cookie) is None
    answer = await gate_answer(svc, cookie)  # ...and the store says revoked
    assert isinstance(answer, Denial) and answer.status == 401
    assert slow.calls == 2


async def test_session_cache_expiry_on_the_hot_path(
    svc: Services, slow: SlowPathCounter, clock: ManualClock
) -> None:
    """While the session entry lives, the slow path (a new Cookie header for the same
    session) reads no store; after L1_TTL it reads once, and again only L1_TTL later."""
    value = await session_value(svc)
    sessions = svc.sessions
    reads = sessions.reads
    for i in range(4):  # distinct headers: no remembered verdict, the full path each time
        await gate_answer(svc, f"n={i}; {SESSION_COOKIE}={value}")
    assert slow.calls == 4 and sessions.reads == reads
    clock.advance(svc.settings.l1_ttl)
    for i in range(4):
        await gate_answer(svc, f"m={i}; {SESSION_COOKIE}={value}")
    assert sessions.reads == reads + 1


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "raw",
    [
        "/app?x=1",
        "/static/app.css",
        "/static/app.css?v=2",
        "/static/../api",
        "/static/%2e%2e/api",
        "/static//x",
        "/a%00b",
        "/a#b?c",
        "/static?x=/static/",
        "/",
        "",
    ],
)
def test_classify_is_normalize_then_matches(raw: str) -> None:
    public = PublicPaths(["/static/*", "/favicon.ico"])
    for _ in range(2):  # computed, then remembered
        path, is_public = public.classify(raw)
        assert path == normalize_path(raw)
        assert is_public == (path is not None and public.matches(path, raw))


def test_classify_memo_is_bounded() -> None:
    public = PublicPaths(["/static/*"])
    for i in range(MEMO_PATHS + 10):
        public.classify(f"/p/{i}?q={i}")
    assert len(public._memo) <= MEMO_PATHS
    public.classify("/" + "a" * MAX_MEMO_PATH)
    assert "/" + "a" * MAX_MEMO_PATH not in public._memo


# --------------------------------------------------------------------------- upstream headers


def upstream(
    headers: list[tuple[str, str]], client: ClientInfo = UNTRUSTED, **kw: Any
) -> list[tuple[str, str]]:
    policy = kw.pop("policy", None) or HeaderPolicy.from_settings(default_settings())
    req = make_mocked_request("GET", "/", headers=CIMultiDict(headers))
    return list(build_request_headers(req, client, policy, kw.pop("gate", {})).items())


def test_gate_cookie_stripped_from_every_cookie_header() -> None:
    out = upstream([("Cookie", "a=1"), ("Cookie", f"{SESSION_COOKIE}=x; b=2"), ("X-A", "1")])
    assert [v for k, v in out if k == "Cookie"] == ["a=1", "b=2"]
    out = upstream([("Cookie", f"{SESSION_COOKIE}=x"), ("X-A", "1")])
    assert "Cookie" not in dict(out)
    out = upstream([("Cookie", "a=1"), ("X-A", "1")])
    assert out[0] == ("Cookie", "a=1")  # untouched, in place


def test_header_plan_is_remembered_and_bounded() -> None:
    policy = HeaderPolicy.from_settings(default_settings())
    for _ in range(2):
        out = dict(
            upstream(
                [("Host", "h"), ("X-Gate-User", "forged"), ("Connection", "x-a"), ("X-A", "1")],
                policy=policy,
                gate={"X-Gate-Status": "active"},
            )
        )
        assert "X-Gate-User" not in out and "X-A" not in out and "Host" not in out
        assert out["X-Gate-Status"] == "active"
    assert len(policy._plans) == 1
    for i in range(PLAN_CACHE_SIZE + 5):
        upstream([(f"X-H{i}", "1")], policy=policy)
    assert len(policy._plans) <= PLAN_CACHE_SIZE
    trusted = dict(upstream([("Forwarded", "for=1.2.3.4")], client=TRUSTED, policy=policy))
    assert trusted["Forwarded"] == "for=1.2.3.4"
    untrusted = dict(upstream([("Forwarded", "for=1.2.3.4")], policy=policy))
    assert "Forwarded" not in untrusted  # the plan is per peer trust


def test_stripped_cookies_memo_is_bounded() -> None:
    policy = HeaderPolicy.from_settings(default_settings())
    for i in range(PLAN_CACHE_SIZE + 5):
        assert policy.strip_gate_cookie(f"a={i}; {SESSION_COOKIE}=x") == f"a={i};"[:-1]
    assert len(policy._cookies) <= PLAN_CACHE_SIZE
    assert policy.strip_gate_cookie("a=1") == "a=1"


# --------------------------------------------------------------------------- GC


@pytest.fixture
def gc_threshold() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_tune_gc_raises_the_young_threshold_only(gc_threshold: None) -> None:
    gc.set_threshold(700, 10, 10)
    server.tune_gc()
    assert gc.get_threshold() == (server.GC_GEN0_THRESHOLD, 10, 10)
    gc.set_threshold(50_000, 5, 5)
    server.tune_gc()
    assert gc.get_threshold() == (50_000, 5, 5)
