"""Prometheus metrics (``GET /_gate/metrics``): the text format, that counters move with
traffic, and that only ``METRICS_ALLOW`` clients get them."""

import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast, get_args

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.entitlement import EntitlementStats
from gateway.metrics import render
from gateway.model import DenialKind
from gateway.services import Services
from gateway.settings import SettingsError, load_settings
from gateway.stripe_breaker import CircuitBreaker
from tests.conftest import GateFactory, StartGate, gate_settings
from tests.stack import Stack, running_stack

JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.e+]+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict-enough reader of the text format: every line is a comment or a valid sample,
    every sample's family has a TYPE line before it."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE.match(line)
        assert match, f"bad sample line: {line!r}"
        name, _, labels, value = match.groups()
        assert name in typed, f"{name} has no TYPE line"
        pairs = frozenset(_LABEL.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(
    stack: Stack, client: aiohttp.ClientSession, **headers: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return await scrape_url(client, stack.url("/_gate/metrics"), **headers)


async def scrape_url(
    client: aiohttp.ClientSession, url: str, **headers: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with client.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(await resp.text())


async def status(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with client.get(url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def test_counters_move_with_traffic(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        before = await scrape(stack, client)
        assert value(before, "gate_info", version="0.1.0", billing="on") == 1
        assert value(before, "process_start_time_seconds") > 1.6e9

        assert await status(client, stack.url("/api/search?q=x"), JSON) == 401
        assert await status(client, stack.url("/"), HTML) == 303
        resp = await stack.subscribe(client, "mia@example.com")
        assert resp.status == 303
        for _ in range(3):
            assert await status(client, stack.url("/api/search?q=x"), JSON) == 200
        auth = {"X-Original-URI": "/", "X-Original-Method": "GET", **JSON}
        assert await status(client, stack.url("/_gate/auth"), auth) == 200

        after = await scrape(stack, client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("gate_requests_total", decision="unauthorized") == 1
    assert moved("gate_requests_total", decision="redirect") == 1
    assert moved("gate_requests_total", decision="allow") == 4
    assert moved("gate_forward_auth_responses_total", mode="nginx", status="200") == 1
    assert moved("gate_entitlement_stripe_calls_total") >= 1
    assert moved("gate_entitlement_l1_hits_total") >= 3
    assert moved("gate_stripe_api_calls_total", operation="subscriptions.list") >= 1
    assert moved("gate_stripe_api_calls_total", operation="checkout.sessions.create") == 1
    assert value(after, "gate_stripe_breaker_state") == 0
    assert value(after, "gate_entitlement_errors_total") == 0


async def test_stripe_failures_and_webhooks_are_counted(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as stack, stack.session() as client:
        resp = await stack.subscribe(client, "nora@example.com")
        assert resp.status == 303
        await stack.double.wait_deliveries()  # the checkout's webhooks
        before = await scrape(stack, client)
        assert sum(v for (n, _), v in before.items() if n == "gate_webhook_responses_total") >= 1

        customer = stack.double.create_customer("ola@example.com")
        stack.double.faults.fail_always(500)
        cookie = await stack.services.sessions.create(customer["id"], "ola@example.com")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other:
            headers = {**JSON, "Cookie": f"gate_session={cookie}"}
            assert await status(other, stack.url("/api/search?q=x"), headers) == 503
        stack.double.faults.reset()
        after = await scrape(stack, client)

    failures = sum(v for (n, _), v in after.items() if n == "gate_stripe_api_failures_total")
    failures_before = sum(
        v for (n, _), v in before.items() if n == "gate_stripe_api_failures_total"
    )
    assert failures > failures_before
    assert (
        value(after, "gate_requests_total", decision="unavailable")
        - value(before, "gate_requests_total", decision="unavailable")
        == 1
    )
    assert value(after, "gate_entitlement_errors_total") >= 1


async def test_untrusted_clients_get_403(tmp_path: Path) -> None:
    async with (
        running_stack(tmp_path, {"METRICS_ALLOW": "10.0.0.0/8"}) as stack,
        stack.session() as client,
    ):
        assert await status(client, stack.url("/_gate/metrics"), {}) == 403
        # a trusted proxy (loopback) vouching for an allowed client
        assert (
            await status(client, stack.url("/_gate/metrics"), {"X-Forwarded-For": "10.1.2.3"})
            == 200
        )


async def test_public_client_behind_a_local_proxy_gets_403(tmp_path: Path) -> None:
    """Default METRICS_ALLOW is loopback, and the default trusted proxy is loopback too: a
    public client forwarded by a local proxy is that client, not loopback."""
    async with running_stack(tmp_path) as stack, stack.session() as client:
        assert (
            await status(client, stack.url("/_gate/metrics"), {"X-Forwarded-For": "203.0.113.9"})
            == 403
        )
        assert await status(client, stack.url("/_gate/metrics"), {}) == 200


@pytest.mark.parametrize("allow", ["0.0.0.0/0", "not-an-ip"])
def test_bad_metrics_allow_is_a_startup_error(allow: str) -> None:
    with pytest.raises(SettingsError, match="METRICS_ALLOW"):
        load_settings({"UPSTREAM_URL": "http://127.0.0.1:1", "METRICS_ALLOW": allow})


async def test_billing_off_still_serves_process_metrics(upstream: Any, gate: GateFactory) -> None:
    up = await upstream(web.Application())
    client: TestClient[web.Request, web.Application] = await gate(gate_settings(up))
    resp = await client.get("/_gate/metrics")
    assert resp.status == 200
    samples = parse(await resp.text())
    assert value(samples, "gate_info", version="0.1.0", billing="off") == 1
    assert not any(name.startswith("gate_entitlement_") for name, _ in samples)


def test_label_values_are_escaped() -> None:
    odd = 'we"ird\\op\nx'
    svc = SimpleNamespace(
        entitlements=SimpleNamespace(stats=EntitlementStats(l1_hits=7), breaker=CircuitBreaker()),
        stripe=SimpleNamespace(calls=Counter({odd: 2}), failures=Counter()),
    )
    text = render(gate_settings("http://127.0.0.1:1"), cast(Services, svc))
    samples = parse(text)
    assert value(samples, "gate_stripe_api_calls_total", operation='we\\"ird\\\\op\\nx') == 2
    assert value(samples, "gate_entitlement_l1_hits_total") == 7
    assert 'operation="we\\"ird\\\\op\\nx"' in text


async def test_one_scrape_reports_every_worker(tmp_path: Path, gate_process: StartGate) -> None:
    """WORKERS=2: requests answered by both workers (told apart by healthz ``pid`` on the same
    keep-alive connection), then one scrape — whichever worker answers it — counts them all."""
    proc = await gate_process({"UPSTREAM_URL": "http://127.0.0.1:9", "WORKERS": "2"})
    served: Counter[int] = Counter()
    auth = {"X-Original-URI": "/", "X-Original-Method": "GET", **JSON}
    for _ in range(200):
        # One connection per session: the healthz and the auth request reach the same worker.
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(proc.url("/_gate/healthz")) as resp:
                pid = (await resp.json())["pid"]
            for _ in range(2):
                assert await status(session, proc.url("/_gate/auth"), auth) == 200
            async with session.get(proc.url("/_gate/healthz")) as resp:
                assert (await resp.json())["pid"] == pid  # still the same connection
        served[pid] += 2
        if len(served) == 2 and min(served.values()) >= 4:
            break
    assert len(served) == 2, served
    assert proc.pid not in served
    total = sum(served.values())
    assert total > max(served.values())
    for _ in range(2):  # each scrape, from either worker, sees both workers' requests
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            samples = await scrape_url(session, proc.url("/_gate/metrics"))
        answered = value(samples, "gate_forward_auth_responses_total", mode="nginx", status="200")
        assert answered == total
        assert value(samples, "gate_info", version="0.1.0", billing="off") == 1
        assert value(samples, "process_start_time_seconds") > 1.6e9


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_request_counters_are_listed_at_zero_before_the_first_request(
    gate_process: StartGate, workers: str
) -> None:
    """One process or several: a scrape before any request already lists every decision of
    ``gate_requests_total`` at 0 (so ``rate()`` has a start), and no family without series."""
    proc = await gate_process({"UPSTREAM_URL": "http://127.0.0.1:9", "WORKERS": workers})
    async with aiohttp.ClientSession() as session:
        samples = await scrape_url(session, proc.url("/_gate/metrics"))
        async with session.get(proc.url("/_gate/metrics")) as resp:
            text = await resp.text()
    for decision in ("allow", *get_args(DenialKind)):  # every decision the gate makes
        key = ("gate_requests_total", frozenset({("decision", decision)}))
        assert samples.get(key) == 0, f"{decision} not listed at 0"
    assert "# TYPE gate_webhook_responses_total" not in text  # no webhook answered yet
