"""Shared fixtures: gate settings, an in-process gate in front of a test upstream, and a gate
running as a real subprocess (for RSS, workers and signals)."""

import asyncio
import contextlib
import copy
import dataclasses
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpServer

from gateway.app import create_app
from gateway.demo.stripe_double import DEFAULT_API_KEY, StripeDouble
from gateway.entitlement import Entitlements
from gateway.model import utcnow
from gateway.server import runner_kwargs
from gateway.settings import Settings, load_settings
from gateway.store import Backend
from gateway.stripe_breaker import CircuitBreaker
from gateway.stripe_client import StripeClientAPI
from tests.postgres import PostgresServer, running_postgres
from tests.processes import port_line
from tests.stores import BACKENDS, backend_url, new_store, opened

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


#: Where :func:`make_settings` points the gate unless told otherwise (nothing listens there).
NO_UPSTREAM = "http://127.0.0.1:9"


def make_settings(env: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
    """Settings built the way the gate builds them: the table's defaults, ``env`` (raw
    strings, as from the environment) and typed ``overrides``, through :func:`load_settings`
    and its consistency checks. ``UPSTREAM_URL`` defaults to :data:`NO_UPSTREAM`."""
    return load_settings({"UPSTREAM_URL": NO_UPSTREAM, **(env or {})}, **overrides)


def changed(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with ``changes``, built again through :func:`load_settings` and its
    consistency checks (``dataclasses.replace`` would skip them)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    values.update(changes)
    demo = values.pop("demo")
    return load_settings({}, demo=demo, **values)


def gate_settings(upstream: TestServer | str, **overrides: Any) -> Settings:
    """Billing-off settings pointing at ``upstream`` (a test server or a base URL)."""
    url = upstream if isinstance(upstream, str) else f"http://127.0.0.1:{upstream.port}"
    return make_settings({"UPSTREAM_URL": url, "BILLING_MODE": "off"}, **overrides)


GateFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def gate(aiohttp_client: Any) -> GateFactory:
    """``await gate(settings, gate=hook, extra_setup=fn, **client_kwargs)``: the gate app
    (``create_app``) served with the production runner options on a real port."""

    async def make(settings: Settings, **kwargs: Any) -> TestClient[web.Request, web.Application]:
        app = create_app(settings, kwargs.pop("extra_setup", None), gate=kwargs.pop("gate", None))
        server = TestServer(app)
        # Started here: TestServer ignores runner options given to its constructor.
        await server.start_server(**runner_kwargs(settings))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(server, **kwargs)
        return client

    return make


#: The ``upstream`` fixture: ``await upstream(app)`` serves ``app`` on 127.0.0.1.
Upstream = Callable[[web.Application], Awaitable[TestServer]]


class Releasable(Protocol):
    """A test upstream app whose handlers wait for ``release``."""

    @property
    def app(self) -> web.Application: ...

    @property
    def release(self) -> asyncio.Event: ...


class Hold:
    """An upstream route that keeps each request in progress until released."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.release = asyncio.Event()

    async def handler(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return web.Response(text="held")


R = TypeVar("R", bound=Releasable)


@contextlib.asynccontextmanager
async def served(upstream: Upstream, held: R) -> AsyncIterator[tuple[R, TestServer]]:
    """``held`` and its app served by ``upstream``; ``release`` set on the way out, so that a
    handler still waiting ends before the server stops."""
    server = await upstream(held.app)
    try:
        yield held, server
    finally:
        held.release.set()


@pytest.fixture
def upstream(aiohttp_server: Any) -> Upstream:
    """``await upstream(app)``: a real upstream app on 127.0.0.1."""

    async def make(app: web.Application) -> TestServer:
        server: TestServer = await aiohttp_server(app)
        return server

    return make


_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A port where nothing listens and, for the rest of the test run, nothing can: it is held
    bound (never listening), so connecting to it is refused. For "upstream unreachable" tests;
    unlike bind-close-reuse, no other program can start listening there in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    port: int = sock.getsockname()[1]
    return port


@dataclasses.dataclass
class GateProcess:
    proc: asyncio.subprocess.Process
    port: int  # 0 until ready when started with PORT=0
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, deadline_s: float = 20.0) -> None:
        """Poll (no fixed sleeps) until the gate logged its port and accepts connections."""
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"gate exited with {self.proc.returncode}:\n{self.log()}")
            if not self.port:
                self.port = port_line(self.log()) or 0
            if self.port:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    pass
                else:
                    writer.close()
                    await writer.wait_closed()
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"gate not listening:\n{self.log()}") from None
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill_group(self) -> None:
        """SIGKILL whatever is left of the process group (parent or orphaned workers: ours to
        kill) and reap the parent."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        await self.proc.wait()


StartGate = Callable[..., Awaitable[GateProcess]]


def checkout_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` over this PATH and a PYTHONPATH of the checkout: what a child ``python -m``
    of the tests gets (nothing else of the test run's environment)."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}


async def spawn_gate(
    env: Mapping[str, str], log_path: Path, *, preexec_fn: Callable[[], None] | None = None
) -> GateProcess:
    """Start ``python -m gateway.server`` with ``env`` (PORT=0 unless given), output to
    ``log_path``, in its own process group (so teardown reaps its workers too); not yet ready."""
    full_env = checkout_env({"HOST": "127.0.0.1", "PORT": "0", **env})
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.server",
            env=full_env,
            cwd=ROOT,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    return GateProcess(proc, int(full_env["PORT"]), log_path)


def run_gate_once(
    args: Sequence[str], env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the checkout with :func:`checkout_env` of ``env``, waited for:
    its exit code and its output as text."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=checkout_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
async def gate_process(
    tmp_path: Path,
) -> AsyncIterator[StartGate]:
    """``await gate_process(env)``: ``python -m gateway.server`` with ``env``, once it accepts
    connections (``ready=False``: right away). Unless ``env`` has PORT, the gate runs with
    PORT=0 and its port is read from its ``port_chosen`` log line: the kernel picks a free port
    at bind time, so there is no window in which another program could take it."""
    started: list[GateProcess] = []

    async def start(env: Mapping[str, str], *, ready: bool = True) -> GateProcess:
        log_path = tmp_path / f"gate-{len(started)}.log"
        gp = await spawn_gate({"BILLING_MODE": "off", **env}, log_path)
        started.append(gp)
        if ready:
            await gp.wait_ready()
        return gp

    yield start
    for gp in started:
        await gp.kill_group()


# ---- the Stripe double as its own server, driven by the real stripe library


@pytest.fixture
def double() -> StripeDouble:
    return StripeDouble()


@pytest.fixture
async def double_server(aiohttp_server: AiohttpServer, double: StripeDouble) -> TestServer:
    """``double`` on 127.0.0.1, its ``public_url`` set to where it listens."""
    srv: TestServer = await aiohttp_server(double.app, host="127.0.0.1")
    double.public_url = str(srv.make_url("/")).rstrip("/")
    return srv


def subscriber(
    double: StripeDouble, email: str, **options: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new customer of ``double`` and their monthly subscription (``options`` as for
    ``create_subscription``; no events)."""
    cus = double.create_customer(email)
    return cus, double.create_subscription(cus["id"], "price_demo_monthly", **options)


def live_and_canceled(double: StripeDouble, email: str) -> tuple[str, str, str]:
    """A customer of ``double`` with a live monthly and a canceled yearly subscription (made in
    that order), next to another customer's live one: (customer id, live id, canceled id)."""
    cus = double.create_customer(email)
    live = double.create_subscription(cus["id"], "price_demo_monthly")
    ended = double.create_subscription(cus["id"], "price_demo_yearly", status="canceled")
    other = double.create_customer(f"other-{email}")
    double.create_subscription(other["id"], "price_demo_monthly")
    return cus["id"], live["id"], ended["id"]


@contextlib.asynccontextmanager
async def stripe_library(
    api_base: str, api_key: str = DEFAULT_API_KEY
) -> AsyncIterator[stripe.StripeClient]:
    """The real stripe library's client for the double at ``api_base``, on this test's event
    loop (one per loop, as stripe-python needs), with no retries; closed on the way out."""
    http = stripe.AIOHTTPClient(timeout=10.0)
    try:
        yield stripe.StripeClient(
            api_key, http_client=http, base_addresses={"api": api_base}, max_network_retries=0
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


@pytest.fixture
async def double_client(double_server: TestServer) -> AsyncIterator[stripe.StripeClient]:
    """:func:`stripe_library` for ``double_server``, with the double's default key."""
    async with stripe_library(str(double_server.make_url("/")).rstrip("/")) as client:
        yield client


def base_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def client_settings(base_url: str, **overrides: Any) -> Settings:
    """Billing-on settings for the gate's own Stripe client talking to ``base_url`` with the
    double's default key and no retries (``overrides``: typed fields, e.g. ``stripe_timeout``)."""
    settings = load_settings(
        {
            "BILLING_MODE": "on",
            "STRIPE_SECRET_KEY": DEFAULT_API_KEY,
            "STRIPE_PRICE_IDS": "price_demo_monthly",
            "STRIPE_MAX_RETRIES": "0",
        },
        demo=True,
    )
    return dataclasses.replace(settings, stripe_api_base=base_url, **overrides)


@pytest.fixture
async def api(double_server: TestServer) -> AsyncIterator[StripeClientAPI]:
    """The gate's Stripe client (:class:`StripeClientAPI`) for ``double_server``, closed after
    the test."""
    client = await StripeClientAPI.create(client_settings(base_url(double_server)))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


#: How long :func:`eventually` waits unless told: a bound, generous for 2 shared cores.
EVENTUALLY_SECONDS = 30.0


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = EVENTUALLY_SECONDS
) -> None:
    """Poll ``check`` (a function or a coroutine function) until it is true; fail with
    ``what`` after ``timeout`` seconds (a bound that stops a broken test from hanging, not a
    timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def owned(ents: Entitlements) -> AsyncIterator[Entitlements]:
    """``ents``, closed on the way out."""
    try:
        yield ents
    finally:
        await ents.close()


# ---- shared fakes (Stripe-side data and a StripeAPI fake), used by several test modules

PRICE = "price_demo_monthly"


def billing_settings(**overrides: Any) -> Settings:
    """Billing-on settings for unit tests of the billing side (demo: no session secret
    needed), through the loader and its consistency checks."""
    return load_settings(
        {
            "UPSTREAM_URL": NO_UPSTREAM,
            "BILLING_MODE": "on",
            "STRIPE_SECRET_KEY": "sk_test_double",
            "STRIPE_PRICE_IDS": f"{PRICE},price_demo_yearly",
            "STRIPE_MAX_RETRIES": "0",
            "CACHE_TTL": "1h",
            "NEGATIVE_CACHE_TTL": "60s",
            "L1_TTL": "5s",
            "STALE_IF_ERROR": "24h",
        },
        demo=True,
        **overrides,
    )


def subscription(
    sub_id: str,
    now: datetime,
    *,
    status: str = "active",
    price: str = PRICE,
    period_end: datetime | None = None,
    product: str = "prod_1",
    **fields: Any,
) -> dict[str, Any]:
    end = period_end or now + timedelta(days=30)
    start = end - timedelta(days=30)
    return {
        "id": sub_id,
        "object": "subscription",
        "status": status,
        "cancel_at_period_end": False,
        "cancel_at": None,
        "trial_end": None,
        "pause_collection": None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": f"si_{sub_id}",
                    "price": {"id": price, "product": product},
                    "current_period_start": int(start.timestamp()),
                    "current_period_end": int(end.timestamp()),
                }
            ],
        },
        **fields,
    }


class FakeStripe:
    """StripeAPI with canned answers, call counting, injectable failures and a gate that holds
    calls until opened (to make concurrency deterministic). It implements the interface directly:
    its ``breaker`` is never asked (a test of the breaker uses the real client on the double)."""

    def __init__(self) -> None:
        self.breaker = CircuitBreaker()
        self.subscriptions: dict[str, list[dict[str, Any]]] = {}
        self.customers: dict[str, list[str]] = {}  # email → customer ids
        self.features: dict[str, list[str]] = {}  # product → its features' lookup keys
        self.calls: Counter[str] = Counter()
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def held(self, calls: Iterable[Coroutine[Any, Any, T]]) -> list[asyncio.Task[T]]:
        """``calls`` started as tasks with every Stripe call held at the gate; returns once
        one of them is inside Stripe (:meth:`release` lets them all go on)."""
        self.gate = asyncio.Event()
        self.entered.clear()
        tasks = [asyncio.create_task(call) for call in calls]
        await self.entered.wait()
        return tasks

    def release(self) -> None:
        """Open the gate that :meth:`held` closed."""
        assert self.gate is not None, "release() without held()"
        self.gate.set()

    async def _enter(self, name: str) -> None:
        self.calls[name] += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        snapshot = copy.deepcopy(self.subscriptions.get(customer_id, []))  # state at the call
        await self._enter("list_subscriptions")
        return snapshot

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        keys = list(self.features.get(product_id, []))
        await self._enter("list_product_features")
        return [
            {"object": "product_feature", "entitlement_feature": {"lookup_key": k}} for k in keys
        ]

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        await self._enter("find_customers")
        return [{"id": c, "email": email} for c in self.customers.get(email, [])]

    async def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        await self._enter("get_customer")
        return {"id": customer_id}

    async def create_customer(self, email: str, idempotency_key: str) -> dict[str, Any]:
        await self._enter("create_customer")
        return {"id": "cus_new", "email": email}

    async def get_price(self, price_id: str) -> dict[str, Any]:
        await self._enter("get_price")
        return {"id": price_id}

    async def create_checkout_session(
        self, params: dict[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        await self._enter("create_checkout_session")
        return {"id": "cs_1"}

    async def get_checkout_session(self, session_id: str) -> dict[str, Any]:
        await self._enter("get_checkout_session")
        return {"id": session_id}

    async def create_portal_session(
        self, customer_id: str, return_url: str, flow_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        await self._enter("create_portal_session")
        return {"id": "bps_1"}

    async def list_events(self, created_gte: int, types: list[str]) -> list[dict[str, Any]]:
        await self._enter("list_events")
        return []

    async def create_meter_event(
        self, *, event_name: str, customer_id: str, value: int, identifier: str, timestamp: int
    ) -> dict[str, Any]:
        await self._enter("create_meter_event")
        payload = {"stripe_customer_id": customer_id, "value": str(value)}
        return {"object": "billing.meter_event", "event_name": event_name, "payload": payload}

    async def list_meters(self) -> list[dict[str, Any]]:
        await self._enter("list_meters")
        return []

    async def meter_event_summaries(
        self, *, meter_id: str, customer_id: str, start_time: int, end_time: int
    ) -> list[dict[str, Any]]:
        await self._enter("meter_event_summaries")
        return []

    async def close(self) -> None:
        return None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Release the ports :func:`closed_port` held for the run."""
    while _HELD:
        _HELD.pop().close()


# ---- PostgreSQL (tests/postgres.py): one server per test run, a new database per test


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole run (started on first use)."""
    yield from running_postgres()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """The URL of a new, empty database on :func:`pg_server` (one per test)."""
    if not pg_server.running:  # a fault test stopped it
        pg_server.start()
    return pg_server.create_database()


# ---- both store backends (tests/stores.py): a test taking ``store`` runs on each


@pytest.fixture
def store_clock() -> Callable[[], datetime]:
    """The clock of the ``store`` fixture's store (a module overrides it to fix "now")."""
    return utcnow


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, store_clock: Callable[[], datetime]
) -> AsyncIterator[Backend]:
    """A new, empty, opened store: SQLite in ``tmp_path``, then PostgreSQL (a new database on
    the run's server)."""
    url = backend_url(request, request.param, tmp_path)
    async with opened(new_store(url, clock=store_clock)) as s:
        yield s


@pytest.fixture(params=BACKENDS)
def database_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """``DATABASE_URL`` of a new, empty store of each backend (SQLite in ``tmp_path/db``), for
    a gate started with it."""
    (tmp_path / "db").mkdir()
    return {"DATABASE_URL": backend_url(request, request.param, tmp_path / "db")}
