"""The cached paying request's hot path: remembered allowed verdicts (gateway.verdicts) and how
they end, L1 holds, the session's end, path classification, the upstream header plan and the
worker's GC threshold.

The gate runs against a real Entitlements (fake Stripe, real SQLite store) on the real clock:
verdicts are only remembered on the real clock. Time is moved by patching the clock of
``gateway.verdicts`` (the verdict's own deadline check).
"""

import dataclasses
import gc
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway import gate as gate_module
from gateway import server, verdicts
from gateway.entitlement import Entitlements, L1Entry, L1Hold
from gateway.forwarded import ClientInfo, TrustedNetworks
from gateway.gate import check
from gateway.identity import SessionCodec, identify
from gateway.mailer import LogMailer
from gateway.metrics import DECISIONS
from gateway.model import Denial, Identity, Lookup
from gateway.paths import MAX_MEMO_PATH, MEMO_PATHS, PublicPaths, normalize_path
from gateway.proxy_headers import PLAN_CACHE_SIZE, HeaderPolicy, build_request_headers
from gateway.services import Services
from gateway.settings import SESSION_COOKIE, Settings
from gateway.store import SQLiteStore
from gateway.stripe_api import StripeUnavailable
from gateway.verdicts import AllowedSessions
from tests.conftest import PRICE, FakeStripe, subscription
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
    base = make_settings(
        session_secret="s" * 48, public_paths=("/static/*",), identity_header="X-Forwarded-Email"
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "gate.sqlite3"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def fake() -> FakeStripe:
    f = FakeStripe()
    f.subscriptions[CUSTOMER] = [subscription("sub_1", datetime.now(UTC))]
    return f


def make_services(settings: Settings, store: SQLiteStore, fake: FakeStripe) -> Services:
    """What gate.check uses: settings, public paths, codec, entitlements (and its verdicts)."""
    return Services(
        settings=settings,
        store=store,
        stripe=fake,
        entitlements=Entitlements(settings, store, fake),
        codec=SessionCodec(settings),
        mailer=LogMailer(),
        login=None,  # type: ignore[arg-type]  # not used by the gate
        plans=None,  # type: ignore[arg-type]
        public_paths=PublicPaths(settings.public_paths),
        trusted=TrustedNetworks(settings.trusted_proxies),
    )


@pytest.fixture
async def svc(store: SQLiteStore, fake: FakeStripe) -> AsyncIterator[Services]:
    services = make_services(hot_settings(), store, fake)
    try:
        yield services
    finally:
        await services.entitlements.close()


class Later:
    """Moves the verdicts' clock forward (the real clock stays where it is)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        monkeypatch.setattr(verdicts, "_time", lambda: time.time() + self.offset)


@pytest.fixture
def later(monkeypatch: pytest.MonkeyPatch) -> Later:
    return Later(monkeypatch)


class SlowPathCounter:
    """Counts gate.check's full identify → entitlement → decision path."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = identify  # the function gate.check calls through its module global

        def counting(*args: Any, **kwargs: Any) -> Identity | None:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(gate_module, "identify", counting)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> SlowPathCounter:
    return SlowPathCounter(monkeypatch)


def cookie_header(svc: Services, extra: str = "theme=dark; ") -> str:
    return f"{extra}{SESSION_COOKIE}={svc.codec.dumps(CUSTOMER, EMAIL)}"


def request(cookie: str | None, path: str = "/app?x=1", **headers: str) -> web.Request:
    h = dict(headers)
    if cookie is not None:
        h["Cookie"] = cookie
    return make_mocked_request("GET", path, headers=h)


async def gate_answer(
    svc: Services, cookie: str | None, path: str = "/app?x=1", client: ClientInfo = UNTRUSTED
) -> Any:
    return await check(request(cookie, path), client, svc)


# --------------------------------------------------------------------------- verdicts


async def test_allowed_session_is_remembered_per_cookie_header(
    svc: Services, slow: SlowPathCounter
) -> None:
    cookie = cookie_header(svc)
    first = await gate_answer(svc, cookie)
    assert dict(first) == EXPECTED_HEADERS
    assert slow.calls == 1 and len(svc.allowed) == 1
    hits, allows = svc.entitlements.stats.l1_hits, DECISIONS["allow"]

    for _ in range(5):
        again = await gate_answer(svc, cookie, "/other/path?y=2")
        assert dict(again) == EXPECTED_HEADERS
    assert slow.calls == 1  # no cookie parse, no lookup, no decision
    assert svc.entitlements.stats.l1_hits == hits + 5  # still counted as L1 hits
    assert DECISIONS["allow"] == allows + 5
    with pytest.raises(TypeError):
        again["X-Gate-User"] = "someone else"  # shared between requests: read-only

    # Another Cookie header (same session, other cookies) is another key.
    await gate_answer(svc, cookie_header(svc, extra="theme=light; "))
    assert slow.calls == 2 and len(svc.allowed) == 2


async def test_forget_and_refresh_end_the_verdict(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    cookie = cookie_header(svc)
    await gate_answer(svc, cookie)
    svc.entitlements.forget(CUSTOMER)  # a webhook, `customer.deleted`, sign-out of a customer
    await gate_answer(svc, cookie)
    assert slow.calls == 2

    fake.subscriptions[CUSTOMER] = [subscription("sub_1", datetime.now(UTC), status="canceled")]
    await svc.entitlements.refresh(CUSTOMER, source="webhook")
    denied = await gate_answer(svc, cookie)
    assert isinstance(denied, Denial) and denied.status == 402
    assert slow.calls == 3
    denied = await gate_answer(svc, cookie)
    assert isinstance(denied, Denial) and denied.status == 402  # denials are not kept
    assert slow.calls == 4


async def test_new_l1_entry_ends_the_verdict(svc: Services, slow: SlowPathCounter) -> None:
    cookie = cookie_header(svc)
    await gate_answer(svc, cookie)
    ents = svc.entitlements
    lookup = ents.lookup_cached(Identity(EMAIL, CUSTOMER, "cookie"))
    assert lookup is not None
    ents._fill(CUSTOMER, Lookup(lookup.entitlement))  # e.g. a store read after L1_TTL
    await gate_answer(svc, cookie)
    assert slow.calls == 2


async def test_verdict_ends_with_the_l1_entry(
    svc: Services, slow: SlowPathCounter, later: Later
) -> None:
    cookie = cookie_header(svc)
    await gate_answer(svc, cookie)
    (_, entry, until, _) = svc.allowed._entries[cookie]
    assert until == pytest.approx(entry.until.timestamp())  # L1_TTL is the earliest end here
    later.offset = 2.0
    await gate_answer(svc, cookie)
    assert slow.calls == 1
    later.offset = svc.settings.l1_ttl + 0.5
    await gate_answer(svc, cookie)
    assert slow.calls == 2


async def test_verdict_never_outlives_the_access_or_the_session(
    store: SQLiteStore, fake: FakeStripe, svc: Services, slow: SlowPathCounter
) -> None:
    now = datetime.now(UTC)
    ends = now + timedelta(seconds=3)
    fake.subscriptions[CUSTOMER] = [subscription("sub_1", now, cancel_at=int(ends.timestamp()))]
    cookie = cookie_header(svc)
    assert dict(await gate_answer(svc, cookie))["X-Gate-Status"] == "active"
    until = svc.allowed._entries[cookie][2]
    assert until <= int(ends.timestamp())  # the cancellation, not L1_TTL (5 s)

    # A session that ends in about a second: its verdict ends with it.
    settings = dataclasses.replace(svc.settings, session_lifetime=3)
    svc.codec = SessionCodec(settings)
    signed = SessionCodec(settings, clock=lambda: time.time() - 2).dumps(CUSTOMER, EMAIL)
    cookie = f"{SESSION_COOKIE}={signed}"
    assert dict(await gate_answer(svc, cookie)) == EXPECTED_HEADERS
    assert svc.allowed._entries[cookie][2] <= time.time() + 1.01


async def test_trusted_identity_header_wins_over_a_remembered_cookie(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    cookie = cookie_header(svc)
    await gate_answer(svc, cookie, client=TRUSTED)
    assert len(svc.allowed) == 1
    req = request(cookie, **{"X-Forwarded-Email": "bob@example.com"})
    answer = await check(req, TRUSTED, svc)
    assert isinstance(answer, Denial) and answer.status == 402  # bob has no customer
    assert slow.calls == 2
    # From an untrusted peer the header means nothing: the remembered verdict answers.
    answer = await check(req, UNTRUSTED, svc)
    assert not isinstance(answer, Denial)
    assert dict(answer) == EXPECTED_HEADERS
    assert slow.calls == 2


async def test_path_checks_still_run_first(svc: Services, slow: SlowPathCounter) -> None:
    cookie = cookie_header(svc)
    await gate_answer(svc, cookie)
    assert dict(await gate_answer(svc, cookie, "/static/app.css")) == {}  # public: no X-Gate-*
    bad = await gate_answer(svc, cookie, "/static/%2e%2e/%00")
    assert isinstance(bad, Denial) and bad.status == 400
    assert slow.calls == 1


async def test_only_allowed_cookie_sessions_are_kept(
    svc: Services, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    assert isinstance(await gate_answer(svc, None), Denial)  # anonymous: 401
    assert isinstance(await gate_answer(svc, "theme=dark"), Denial)
    tampered = cookie_header(svc)[:-2] + "xx"
    assert isinstance(await gate_answer(svc, tampered), Denial)
    fake.subscriptions["cus_2"] = []
    unpaid = f"{SESSION_COOKIE}={svc.codec.dumps('cus_2', None)}"
    assert isinstance(await gate_answer(svc, unpaid), Denial)
    assert len(svc.allowed) == 0


async def test_fail_open_is_not_remembered(
    store: SQLiteStore, fake: FakeStripe, slow: SlowPathCounter
) -> None:
    svc = make_services(hot_settings(on_stripe_error="allow"), store, fake)
    fake.fail = StripeUnavailable("down", operation="subscriptions.list")
    try:
        answer = await gate_answer(svc, cookie_header(svc))
        assert dict(answer) == {"X-Gate-User": CUSTOMER, "X-Gate-Email": EMAIL}
        assert len(svc.allowed) == 0
    finally:
        await svc.entitlements.close()


def test_allowed_sessions_are_bounded(svc: Services) -> None:
    entry = L1Entry(Lookup(None), datetime.now(UTC) + timedelta(seconds=5), ())
    hold = L1Hold(entry, time.time() + 5, lambda: None)
    cache = AllowedSessions(svc.entitlements.stats, max_entries=3)
    for i in range(5):
        cache.put(f"c{i}", {"X-Gate-User": str(i)}, hold, time.time() + 60)
    assert len(cache) == 3
    assert cache.get("c0") is None and cache.get("c1") is None
    assert dict(cache.get("c4") or {}) == {"X-Gate-User": "4"}
    # Nothing kept for a verdict that is already over or rests on a dead entry.
    cache.put("past", {}, hold, time.time() - 1)
    entry.live = False
    cache.put("dead", {}, hold, time.time() + 60)
    assert cache.get("past") is None and cache.get("dead") is None
    assert cache.get("c4") is None  # its entry died meanwhile
    cache.clear()
    assert len(cache) == 0


# --------------------------------------------------------------------------- L1 holds


async def test_hold_follows_the_l1_entry(svc: Services) -> None:
    ents = svc.entitlements
    alice = Identity(EMAIL, CUSTOMER, "cookie")
    lookup = await ents.lookup(alice)
    hold = ents.hold(alice, lookup)
    assert hold is not None and hold.entry.live
    assert hold.until == pytest.approx(time.time() + svc.settings.l1_ttl, abs=1)
    assert ents.hold(alice, Lookup(lookup.entitlement)) is not None  # an equal one will do
    assert ents.hold(alice, Lookup(None)) is None  # not what L1 holds
    hold.touch()  # marks it recently used; no error while live
    ents.forget(CUSTOMER)
    assert not hold.entry.live
    assert ents.hold(alice, lookup) is None


async def test_no_hold_on_an_injected_clock(store: SQLiteStore, fake: FakeStripe) -> None:
    ents = Entitlements(hot_settings(), store, fake, clock=lambda: datetime.now(UTC))
    try:
        alice = Identity(EMAIL, CUSTOMER, "cookie")
        assert ents.hold(alice, await ents.lookup(alice)) is None
    finally:
        await ents.close()


async def test_evicted_and_expired_entries_die(store: SQLiteStore, fake: FakeStripe) -> None:
    ents = Entitlements(hot_settings(l1_max_entries=1), store, fake)
    try:
        fake.subscriptions["cus_2"] = [subscription("sub_2", datetime.now(UTC))]
        alice, bob = Identity(None, CUSTOMER, "cookie"), Identity(None, "cus_2", "cookie")
        hold = ents.hold(alice, await ents.lookup(alice))
        assert hold is not None
        await ents.lookup(bob)  # evicts alice (L1 holds one entry)
        assert not hold.entry.live
        hold = ents.hold(bob, await ents.lookup(bob))
        assert hold is not None
        ents._l1.get("cus_2", datetime.now(UTC) + timedelta(seconds=10))  # found expired
        assert not hold.entry.live
    finally:
        await ents.close()


# --------------------------------------------------------------------------- session end


def test_session_valid_until() -> None:
    settings = hot_settings(session_lifetime=100)
    codec = SessionCodec(settings)
    value = codec.dumps(CUSTOMER, EMAIL)
    assert codec.valid_until(value) is None  # not verified yet
    assert codec.loads(value) is not None
    end = codec.valid_until(value)
    assert end is not None and end == pytest.approx(time.time() + 100, abs=2)
    fixed = SessionCodec(settings, clock=lambda: 1_000.0)
    assert fixed.loads(fixed.dumps(CUSTOMER, None)) is not None
    assert fixed.valid_until(fixed.dumps(CUSTOMER, None)) is None  # injected clock


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
