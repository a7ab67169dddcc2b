"""Which gateway modules one proxied request walks through, in order (sys.setprofile).

Runs the real app (billing on, a canned Stripe, a real SQLite store, a tiny aiohttp upstream)
and traces, from the catch-all handler's first line to its response, every change of the
gateway module executing (calls and returns), for a paying user whose entitlement is in L1:

- ``cookie, decided``: the session cookie, no remembered verdict (identify → lookup → decide);
- ``cookie, remembered``: the same request again (the remembered verdict answers);
- ``header, decided`` / ``header, remembered``: the same user named by a trusted
  ``X-Forwarded-Email``.

A hop is a call from one gateway module into another (see :class:`Walk`). For each request it
prints the number of hops, how many modules they enter, the modules entered more than once,
and with ``--walk`` every hop (``caller→callee``).

With ``--time N``, also the CPU time of :func:`gateway.gate.check` alone for each case (N calls
on one mocked request, no network: the gate's own cost per request, far steadier than wrk's
ratios on a shared machine).

Usage: ``.venv/bin/python bench/hops.py [--walk] [--time N]``.
"""

import argparse
import asyncio
import functools
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.model import Clock
from gateway.services import SERVICES
from gateway.settings import SESSION_COOKIE, Settings, load_settings
from gateway.stripe_api import StripeAPI
from gateway.stripe_breaker import CircuitBreaker

PRICE = "price_demo_monthly"
EMAIL = "solo@bench.test"
CUSTOMER = "cus_solo"


class CannedStripe:
    """The few Stripe reads a paying user's first request makes."""

    def __init__(self) -> None:
        self.breaker = CircuitBreaker()  # never asked: the canned answers never fail
        now = int(time.time())
        item = {
            "price": {"id": PRICE, "product": "prod_1"},
            "current_period_start": now - 86400,
            "current_period_end": now + 30 * 86400,
            "quantity": 1,
        }
        self.subscription = {
            "id": "sub_1",
            "object": "subscription",
            "customer": CUSTOMER,
            "status": "active",
            "items": {"data": [item]},
            "current_period_start": now - 86400,
            "current_period_end": now + 30 * 86400,
            "cancel_at_period_end": False,
            "cancel_at": None,
            "trial_end": None,
            "pause_collection": None,
            "created": now - 86400,
        }

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        return [self.subscription] if customer_id == CUSTOMER else []

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        return [{"id": CUSTOMER, "email": EMAIL}] if email == EMAIL else []

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        return []

    async def get_price(self, price_id: str) -> dict[str, Any]:
        return {
            "id": price_id,
            "object": "price",
            "active": True,
            "currency": "usd",
            "unit_amount": 900,
            "recurring": {"interval": "month"},
            "product": "prod_1",
        }

    async def close(self) -> None:
        return None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def unexpected(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"unexpected Stripe call {name}")

        return unexpected


def _module(frame: FrameType | None) -> str | None:
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("gateway.") or name == "gateway":
            return str(name)
        return None
    return None


class Walk:
    """Every call from one gateway module into another (a *hop*), in order: the callee's
    module per new frame whose caller is in another gateway module (a coroutine counts when it
    starts, not at each resume; calls from aiohttp or the event loop are not hops)."""

    def __init__(self) -> None:
        self.hops: list[tuple[str, str]] = []
        self._seen: set[FrameType] = set()

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or frame in self._seen:
            return
        self._seen.add(frame)
        callee = _module(frame)
        caller = _module(frame.f_back)
        if callee is not None and caller is not None and callee != caller:
            self.hops.append((caller, callee))


async def traced(
    app: web.Application, request: Callable[[], Awaitable[None]]
) -> list[tuple[str, str]]:
    walk = Walk()
    handler = list(app.router.resources())[-1]  # the catch-all: the proxied request's handler
    route = next(iter(handler))
    inner = route._handler

    async def traced_handler(req: web.Request) -> web.StreamResponse:
        sys.setprofile(walk)
        try:
            return await inner(req)
        finally:
            sys.setprofile(None)

    route._handler = traced_handler
    try:
        await request()
    finally:
        route._handler = inner
    return walk.hops


def settings_for(upstream: str, db: Path) -> Settings:
    return load_settings(
        {
            "UPSTREAM_URL": upstream,
            "BILLING_MODE": "on",
            "STRIPE_SECRET_KEY": "sk_test_hops",
            "STRIPE_PRICE_IDS": PRICE,
            "STRIPE_MAX_RETRIES": "0",
            "DATABASE_PATH": str(db),
            "IDENTITY_HEADER": "X-Forwarded-Email",
            "L1_TTL": "60s",
        },
        demo=True,
    )


def clear_verdicts(app: web.Application) -> None:
    svc = app[SERVICES]
    verdicts = getattr(svc, "verdicts", None) or svc.entitlements._verdicts  # type: ignore[attr-defined]
    verdicts.clear()


def report(name: str, hops: list[tuple[str, str]], show_walk: bool) -> None:
    entered = Counter(callee for _, callee in hops)
    again = {m: n for m, n in entered.items() if n > 1}

    def short(m: str) -> str:
        return m.removeprefix("gateway.")

    listed = ", ".join(f"{short(m)} x{n}" for m, n in sorted(again.items())) or "none"
    print(f"{name}: {len(hops)} hops into {len(entered)} modules; entered more than once: {listed}")
    if show_walk:
        print("   " + " ".join(f"{short(a)}→{short(b)}" for a, b in hops))


async def time_check(app: web.Application, headers: dict[str, str], calls: int) -> float:
    """Microseconds per :func:`gateway.gate.check` of a request with ``headers`` (median of 5
    batches of ``calls``)."""
    from aiohttp.test_utils import make_mocked_request

    from gateway.forwarded import ClientInfo
    from gateway.gate import check

    svc = app[SERVICES]
    client = ClientInfo("127.0.0.1", "http", "127.0.0.1", True, "127.0.0.1", "rid")
    request = make_mocked_request("GET", "/api/x?q=1", headers=headers, app=app)
    batches = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(calls):
            await check(request, client, svc)
        batches.append((time.process_time() - start) / calls * 1e6)
    return sorted(batches)[2]


async def main(show_walk: bool, calls: int) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    upstream_app = web.Application()
    upstream_app.router.add_get("/{tail:.*}", hello)
    fake = CannedStripe()

    async def stripe(_settings: Settings, _clock: Clock) -> StripeAPI:
        return fake

    with tempfile.TemporaryDirectory() as tmp:
        async with TestServer(upstream_app) as up:
            settings = settings_for(str(up.make_url("/")).rstrip("/"), Path(tmp) / "gate.db")
            app = create_app(settings, stripe_factory=stripe)
            async with TestServer(app) as gate, aiohttp.ClientSession() as http:
                svc = app[SERVICES]
                value = await svc.sessions.create(CUSTOMER, EMAIL)
                cookie = {"Cookie": f"{SESSION_COOKIE}={value}", "Accept": "application/json"}
                header = {"X-Forwarded-Email": EMAIL, "Accept": "application/json"}
                url = str(gate.make_url("/api/x?q=1"))

                async def get(headers: dict[str, str]) -> None:
                    async with http.get(url, headers=headers) as resp:
                        assert resp.status == 200, (resp.status, await resp.text())
                        await resp.read()

                for headers in (cookie, header):  # warm: Stripe read, L1, session cache
                    await get(headers)
                    await get(headers)
                for name, headers in (("cookie", cookie), ("header", header)):
                    clear_verdicts(app)
                    once = functools.partial(get, headers)
                    report(f"{name}, decided", await traced(app, once), show_walk)
                    report(f"{name}, remembered", await traced(app, once), show_walk)
                if calls:
                    for name, headers in (("cookie", cookie), ("header", header)):
                        await get(headers)  # remembered again, where the gate remembers
                        took = await time_check(app, headers, calls)
                        print(f"check() {name}, warm: {took:.1f} µs per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walk", action="store_true", help="print each walk")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="time N check() calls")
    args = parser.parse_args()
    asyncio.run(main(args.walk, args.time))
