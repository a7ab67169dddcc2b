"""gateway.replicas and gateway.store.bus on a real PostgreSQL, in one process: the bus (a
change crosses, is not echoed, is not sent on; a reconnect drops everything), the lease (one
holder; a dead holder's lease expires), and what keeps a paying user in while the store cannot
be read (the entitlement and the session a process knew)."""

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.changes import Change, Changes
from gateway.entitlement import Entitlements
from gateway.logs import _FIELDS_ATTR
from gateway.model import Identity, ManualClock
from gateway.replicas import ReplicaBus, StoreLeases
from gateway.sessions import Sessions
from gateway.store import PostgresStore, SQLiteStore, StoreError, parse_database_url
from gateway.store.bus import PgChannel, PgLeases
from tests.conftest import PRICE, FakeStripe, billing_settings, subscription
from tests.postgres import PostgresServer

pytestmark = pytest.mark.timeout(120)

DEADLINE = 10.0


async def opened(url: str) -> PostgresStore:
    store = PostgresStore(parse_database_url(url), connect_timeout=1.0, command_timeout=1.0)
    await store.open()
    return store


async def until(predicate: object, what: str) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        await asyncio.sleep(0.01)


async def test_bus_carries_a_change_once_and_never_echoes(pg_url: str) -> None:
    store = await opened(pg_url)
    heard_a: list[Change] = []
    heard_b: list[Change] = []
    changes_a, changes_b = Changes(), Changes()
    changes_a.listen(heard_a.append)
    changes_b.listen(heard_b.append)
    bus_a = ReplicaBus(PgChannel(store), changes_a, replica_id="a")
    bus_b = ReplicaBus(PgChannel(store), changes_b, replica_id="b")
    await bus_a.start()
    await bus_b.start()
    try:
        changes_a.customer("cus_1")
        changes_a.session("handle1", "cus_1")
        await until(lambda: len(heard_b) == 2, "B hears both")
        assert heard_b == [
            Change("customer", "cus_1", remote=True),
            Change("session", "handle1", "cus_1", remote=True),
        ]
        assert heard_a == [Change("customer", "cus_1"), Change("session", "handle1", "cus_1")]
        await until(lambda: bus_a.sent == 2, "A sent both")
        assert bus_b.sent == 0  # a remote change is not sent on
        assert bus_a.received == 0  # its own NOTIFYs are heard back and ignored
    finally:
        await bus_a.close()
        await bus_b.close()
        await store.close()


async def test_bus_reconnects_and_drops_everything(
    pg_url: str, pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = await opened(pg_url)
    heard: list[Change] = []
    changes = Changes()
    changes.listen(heard.append)
    bus = ReplicaBus(PgChannel(store), changes, replica_id="r", ping_every=0.2)
    await bus.start()
    try:
        assert bus.connected.is_set()
        await asyncio.to_thread(pg_server.stop)
        await until(lambda: not bus.connected.is_set(), "the loss is noticed")
        assert heard == []  # nothing is dropped while the database is away
        await asyncio.to_thread(pg_server.start)
        await until(lambda: bus.connected.is_set(), "reconnected")
        assert heard == [Change("everyone", remote=True)]
        assert bus.reconnects == 1
        (said,) = [r for r in caplog.records if r.getMessage() == "replica_bus_reconnected"]
        assert getattr(said, _FIELDS_ATTR)["dropped"] == "everything"
    finally:
        if not pg_server.running:
            pg_server.start()
        await bus.close()
        await store.close()


async def test_lease_has_one_holder_and_expires_with_a_dead_one(pg_url: str) -> None:
    store = await opened(pg_url)
    try:
        leases = PgLeases(store)
        assert await leases.acquire("cus:1", "a", 0.3)
        assert not await leases.acquire("cus:1", "b", 0.3)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while not await leases.acquire("cus:1", "b", 5.0):  # "a" died holding it
            assert loop.time() < deadline, "the lease never expired"
            await asyncio.sleep(0.05)
        await leases.release("cus:1", "a")  # too late: not a's any more
        assert not await leases.acquire("cus:1", "c", 5.0)
        await leases.release("cus:1", "b")
        assert await StoreLeases(leases, "c").acquire("cus:1")
    finally:
        await store.close()


class FailingReads(SQLiteStore):
    """The real store, whose reads fail while ``down`` (the database is away)."""

    down = False

    async def get_entitlement(self, customer_id: str):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreError("store get_entitlement failed: connection refused")
        return await super().get_entitlement(customer_id)

    async def get_grant(self, customer_or_email: str):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreError("store get_grant failed: connection refused")
        return await super().get_grant(customer_or_email)

    async def get_session(self, id_hash: str):  # type: ignore[no-untyped-def]
        if self.down:
            raise StoreError("store get_session failed: connection refused")
        return await super().get_session(id_hash)


async def test_store_down_keeps_a_paying_user_in(tmp_path: Path) -> None:
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    settings = billing_settings()
    store = FailingReads(str(tmp_path / "gate.sqlite3"), clock=clock.now)
    await store.open()
    stripe = FakeStripe()
    stripe.subscriptions["cus_1"] = [subscription("sub_1", clock.now(), price=PRICE)]
    changes = Changes()
    ents = Entitlements(settings, store, stripe, clock, changes)
    sessions = Sessions(settings, store, clock, changes)
    try:
        cookie = await sessions.create("cus_1", "pay@example.com")
        assert (await ents.lookup(Identity(None, "cus_1", "cookie"))).entitlement is not None
        assert stripe.calls["list_subscriptions"] == 1
        store.down = True
        clock.advance(60)  # past L1_TTL (5 s): the in-process entries have ended
        identity = await sessions.resolve(cookie)
        assert identity == Identity("pay@example.com", "cus_1", "cookie")
        lookup = await ents.lookup(identity)
        assert lookup.entitlement is not None and lookup.entitlement.status == "active"
        assert stripe.calls["list_subscriptions"] == 1  # no Stripe call for it either
        assert ents.stats.known_served == 1
        # A change heard from another replica still drops it.
        changes.announce(Change("session", sessions.handle_of(cookie) or "", "cus_1", remote=True))
        assert await sessions.resolve(cookie) is None
        clock.advance(2 * 3600)  # past CACHE_TTL: what this process knew is too old
        assert (await ents.lookup(identity)).entitlement is not None
        assert stripe.calls["list_subscriptions"] == 2  # so Stripe is asked again
    finally:
        await ents.close()
        await store.close()
