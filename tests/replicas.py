"""Several gate processes sharing one PostgreSQL, for functional tests and the benchmark.

:func:`running_replicas` starts the demo upstream and the Stripe double in this process and N
``python -m gateway.server`` subprocesses (billing on, ``DATABASE_URL`` = the given database)
on their own ports, and kills their process groups afterwards. Helpers speak real HTTP to them.
"""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp

from gateway.demo.stripe_double import StripeDouble
from gateway.sessions import Sessions
from gateway.store import PostgresStore, parse_database_url
from tests.conftest import GateProcess, make_settings, spawn_gate
from tests.stack import (
    billing_env,
    form_fields,
    subscribed_cookie,
    upstream_and_double,
)

__all__ = ["Replicas", "running_replicas", "subscribe"]

HTML = {"Accept": "text/html"}
API = "/api/search?q=x"


@dataclasses.dataclass
class Replicas:
    gates: list[GateProcess]
    double: StripeDouble
    env: dict[str, str]

    def webhook_url(self, index: int) -> str:
        return self.gates[index].url("/_gate/webhooks/stripe")

    async def status(self, index: int, cookie: str, path: str = API) -> int:
        """One GET on replica ``index`` with ``cookie`` (a Cookie header value)."""
        return await get_status(self.gates[index].url(path), cookie)

    async def new_session(self, customer_id: str, email: str) -> str:
        """A server-side session for ``customer_id`` written straight to the shared database
        (as a sign-in on some replica would); the ``Cookie`` header that carries it."""
        settings = make_settings(self.env)
        store = PostgresStore(parse_database_url(self.env["DATABASE_URL"]))
        await store.open()
        try:
            value = await Sessions(settings, store).create(customer_id, email)
        finally:
            await store.close()
        return f"gate_session={value}"

    def customer_of(self, email: str) -> str:
        return str(next(c["id"] for c in self.double.customers.values() if c.get("email") == email))


async def get_status(url: str, cookie: str, session: aiohttp.ClientSession | None = None) -> int:
    headers = {"Cookie": cookie, "Accept": "application/json"}
    if session is not None:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            return resp.status
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.get(url, headers=headers, allow_redirects=False) as resp,
    ):
        await resp.read()
        return resp.status


async def until_all(replicas: Replicas, cookie: str, want: int, deadline_s: float) -> float:
    """Poll every replica until each answers ``want``; seconds it took. Fails at the deadline
    with the statuses seen (a deadline, not a timed assertion)."""
    start = time.monotonic()
    while True:
        statuses = [await replicas.status(i, cookie) for i in range(len(replicas.gates))]
        if all(s == want for s in statuses):
            return time.monotonic() - start
        if time.monotonic() - start > deadline_s:
            raise AssertionError(f"after {deadline_s}s the replicas answer {statuses}")
        await asyncio.sleep(0.02)


async def subscribe(gate: GateProcess, email: str) -> str:
    """Pay on the double the way a browser does, starting on ``gate``; the ``Cookie`` header
    it ends with."""
    return await subscribed_cookie(gate.url, email)


async def sign_out(gate: GateProcess, cookie: str) -> int:
    """Press "Sign out" on ``gate``'s account page (its own CSRF token); the answer's status."""
    headers = {"Cookie": cookie, **HTML}
    async with aiohttp.ClientSession() as client:
        async with client.get(gate.url("/_gate/account"), headers=headers) as resp:
            assert resp.status == 200, resp.status
            form = form_fields(await resp.text(), "/_gate/logout")
        async with client.post(
            gate.url("/_gate/logout"), data=form, headers=headers, allow_redirects=False
        ) as resp:
            await resp.read()
            return resp.status


async def wait_for_log(gate: GateProcess, text: str, deadline_s: float, count: int = 1) -> None:
    deadline = time.monotonic() + deadline_s
    while gate.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the log:\n{gate.log()[-3000:]}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_replicas(
    tmp_path: Path, database_url: str, count: int = 3, env: Mapping[str, str] | None = None
) -> AsyncIterator[Replicas]:
    """The upstream and the Stripe double here, ``count`` gate processes on one database."""
    async with upstream_and_double() as (upstream, double, _double_server):
        gate_env = {
            **billing_env(upstream, double),
            "ALLOWED_HOSTS": "127.0.0.1:*",
            "DATABASE_URL": database_url,
            "STRIPE_MAX_RETRIES": "0",
            "LOG_LEVEL": "info",
            **(env or {}),
        }
        gates: list[GateProcess] = []
        try:
            for i in range(count):
                gates.append(await spawn_gate(gate_env, tmp_path / f"replica-{i}.log"))
            await asyncio.gather(*(g.wait_ready(60.0) for g in gates))
            for gate in gates:  # every replica hears its peers before the test starts
                await wait_for_log(gate, "replica_bus_listening", 30.0)
            double.webhook_urls = [gates[0].url("/_gate/webhooks/stripe")]
            yield Replicas(gates, double, gate_env)
        finally:
            for gate in gates:
                await gate.kill_group()
