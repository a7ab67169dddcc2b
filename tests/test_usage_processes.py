"""Usage quotas as real gate processes: exactly the quota admitted with ``WORKERS=2`` on SQLite
and with 3 replicas on PostgreSQL (150 concurrent requests from one customer, quota 50);
nothing lost on ``SIGTERM``; after ``kill -9`` under load, the units counted (and reported to
the Stripe double) are at most those served, and at least those served minus the flush window."""

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from gateway.demo.stripe_double import StripeDouble
from gateway.sessions import Sessions
from gateway.store import SQLiteStore
from gateway.store.usage import UsageSQL
from tests.conftest import GateProcess, make_settings, spawn_gate
from tests.replicas import running_replicas
from tests.stack import billing_env, upstream_and_double

PRICE = "price_demo_monthly"
PATH = "/api/echo/analyze"
USAGE = {
    "USAGE_RULES": "/api/echo/analyze=analysis",
    "PRICE_QUOTAS": f"{PRICE}=analysis:50",
    "ALLOWED_HOSTS": "127.0.0.1:*",
    "STRIPE_MAX_RETRIES": "0",
    "LOG_LEVEL": "info",
}


async def statuses(urls: list[str], cookie: str) -> list[int]:
    """One GET per URL, all at once (one connection each), with ``cookie``."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one(url: str) -> int:
            headers = {"Cookie": cookie, "Accept": "application/json"}
            async with client.get(url, headers=headers) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(u) for u in urls)))


def customer(double: StripeDouble, email: str, **options: object) -> str:
    cus = double.create_customer(email)
    double.create_subscription(cus["id"], PRICE, **options)
    return str(cus["id"])


async def sqlite_session(env: Mapping[str, str], customer_id: str) -> str:
    """A session in the gate's SQLite store (as a sign-in writes it); its Cookie header."""
    store = SQLiteStore(env["DATABASE_PATH"])
    await store.open()
    try:
        value = await Sessions(make_settings(env), store).create(customer_id, "a@example.com")
    finally:
        await store.close()
    return f"gate_session={value}"


async def used_in_store(path: str, customer_id: str) -> int:
    store = SQLiteStore(path)
    await store.open()
    try:
        rows = await UsageSQL(store).periods_of(customer_id, time.time())
    finally:
        await store.close()
    return sum(r.used for r in rows if r.meter == "analysis")


@asynccontextmanager
async def sqlite_gate(
    tmp_path: Path, extra: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[GateProcess, StripeDouble, dict[str, str]]]:
    async with upstream_and_double() as (upstream, double, _server):
        double.meters.seed(double.add_price)
        env = {
            **billing_env(upstream, double),
            **USAGE,
            "DATABASE_PATH": str(tmp_path / "gate.sqlite3"),
            **(extra or {}),
        }
        gate = await spawn_gate(env, tmp_path / "gate.log")
        try:
            await gate.wait_ready(60.0)
            yield gate, double, env
        finally:
            await gate.kill_group()


async def test_workers_2_on_sqlite_admit_exactly_the_quota(tmp_path: Path) -> None:
    async with sqlite_gate(tmp_path, {"WORKERS": "2"}) as (gate, double, env):
        cus = customer(double, "a@example.com")
        cookie = await sqlite_session(env, cus)
        got = await statuses([gate.url(PATH)] * 150, cookie)
        assert sorted(set(got)) == [200, 429], got
        assert got.count(200) == 50
        assert got.count(429) == 100


async def test_three_replicas_on_postgres_admit_exactly_the_quota(
    tmp_path: Path, pg_url: str
) -> None:
    async with running_replicas(tmp_path, pg_url, env=USAGE) as replicas:
        cus = customer(replicas.double, "a@example.com")
        cookie = await replicas.new_session(cus, "a@example.com")
        urls = [replicas.gates[i % 3].url(PATH) for i in range(150)]
        got = await statuses(urls, cookie)
        assert got.count(200) == 50, got
        assert got.count(429) == 100
        # And later requests on any replica are refused too.
        assert await statuses([g.url(PATH) for g in replicas.gates], cookie) == [429] * 3


async def test_sigterm_loses_nothing(tmp_path: Path) -> None:
    # A flush interval far longer than the test: only the shutdown's flush can save the units.
    slow = {"USAGE_FLUSH_INTERVAL": "10m", "METER_REPORT_INTERVAL": "1h", "PRICE_QUOTAS": ""}
    async with sqlite_gate(tmp_path, slow) as (gate, double, env):
        cus = customer(double, "a@example.com")
        cookie = await sqlite_session(env, cus)
        got = await statuses([gate.url(PATH)] * 37, cookie)
        assert got == [200] * 37
        gate.proc.send_signal(signal.SIGTERM)
        assert await gate.wait_exit(60.0) == 0, gate.log()
        assert await used_in_store(env["DATABASE_PATH"], cus) == 37


async def test_kill_9_under_load_counts_at_most_what_was_served(tmp_path: Path) -> None:
    fast = {"USAGE_FLUSH_INTERVAL": "1s", "METER_REPORT_INTERVAL": "2s", "PRICE_QUOTAS": ""}
    async with sqlite_gate(tmp_path, fast) as (gate, double, env):
        cus = customer(double, "a@example.com")
        cookie = await sqlite_session(env, cus)
        served: list[float] = []  # when each 200 came back (monotonic)
        stop = asyncio.Event()

        async def load(client: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                try:
                    async with client.get(gate.url(PATH), headers={"Cookie": cookie}) as resp:
                        await resp.read()
                        if resp.status == 200:
                            served.append(time.monotonic())
                except aiohttp.ClientError:
                    return  # the gate is gone

        async with aiohttp.ClientSession() as client:
            tasks = [asyncio.create_task(load(client)) for _ in range(8)]
            started = time.monotonic()
            deadline = started + 60
            # Several flushes' worth of load (and at least 300 requests) before the kill.
            while (len(served) < 300 or time.monotonic() < started + 5) and (
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            killed_at = time.monotonic()
            await gate.kill_group()  # SIGKILL, no shutdown
            stop.set()
            await asyncio.gather(*tasks)
        total = len(served)
        assert total >= 300
        used = await used_in_store(env["DATABASE_PATH"], cus)
        # Never more than served; at most the last flush window (1 s, plus slack for a loaded
        # machine: 3 s) lost.
        window = sum(1 for t in served if t > killed_at - 4.0)
        print(f"served={total} counted={used} lost={total - used} (last 4 s: {window})")
        assert used <= total
        assert used >= total - window
        assert used > 0
        # A new gate on the same store reports what was counted to Stripe, never more.
        gate2 = await spawn_gate(env, tmp_path / "gate2.log")
        try:
            await gate2.wait_ready(60.0)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                events = double.meters.customer_events(cus)
                if sum(int(e["payload"]["value"]) for e in events) >= used:
                    break
                await asyncio.sleep(0.2)
            events = double.meters.customer_events(cus)
            assert sum(int(e["payload"]["value"]) for e in events) == used
        finally:
            await gate2.kill_group()
