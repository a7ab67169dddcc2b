"""The README's run command with no configuration: `gateway` runs the demo (demo app + Stripe
double + gate with billing on), prints the URL, and the journey works; SIGTERM stops it."""

import asyncio
import io
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp

from gateway.mailer import LogMailer
from tests.conftest import ROOT
from tests.stack import page_form


async def wait_http(url: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as client:
        while True:
            try:
                async with client.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def banner_ports(log: Path, proc: asyncio.subprocess.Process) -> tuple[int, int]:
    """The gate's and the Stripe double's ports, read from the demo's banner (both started on
    port 0: the kernel picks free ones at bind time, so nothing else can take them)."""
    deadline = time.monotonic() + 30
    while True:
        text = log.read_text(errors="replace")
        gate = re.search(r"open   http://127\.0\.0\.1:(\d+)/", text)
        stripe = re.search(r"Stripe http://127\.0\.0\.1:(\d+)", text)
        if gate and stripe:
            return int(gate.group(1)), int(stripe.group(1))
        assert proc.returncode is None, text
        assert time.monotonic() < deadline, f"no banner:\n{text}"
        await asyncio.sleep(0.05)


async def wait_for_text(log: Path, needle: str, deadline_s: float = 30.0) -> str:
    """The log once it holds ``needle`` (access lines are written in batches)."""
    deadline = time.monotonic() + deadline_s
    while True:
        text = log.read_text(errors="replace")
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"no {needle!r} in:\n{text}"
        await asyncio.sleep(0.05)


def test_sign_in_links_are_framed_in_the_demo() -> None:
    out = io.StringIO()
    mailer = LogMailer(framed=True, stream=out)
    asyncio.run(
        mailer.send_login_link(
            "a@example.com", "http://127.0.0.1:8080/_gate/login/verify?token=abc"
        )
    )
    lines = out.getvalue().strip().splitlines()
    assert lines[0] == lines[-1] and set(lines[0]) == {"+", "-"}
    assert (
        lines[2]
        == "| http://127.0.0.1:8080/_gate/login/verify?token=abc"
        + " " * (len(lines[0]) - 4 - len("http://127.0.0.1:8080/_gate/login/verify?token=abc"))
        + " |"
    )
    assert "a@example.com" in lines[1]
    assert mailer.sent == [("a@example.com", "http://127.0.0.1:8080/_gate/login/verify?token=abc")]


async def test_gateway_without_configuration_runs_the_demo(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "PORT": "0",
        "DEMO_STRIPE_PORT": "0",
    }
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", env=env, cwd=tmp_path, stdout=out, stderr=out
        )
    try:
        port, stripe_port = await banner_ports(log, proc)
        await wait_http(f"http://127.0.0.1:{port}/_gate/healthz")
        text = log.read_text()
        assert f"open   http://127.0.0.1:{port}/" in text
        assert re.search(r"billing mode=on", text), text
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as client:
            async with client.get(
                f"http://127.0.0.1:{port}/", headers={"Accept": "text/html"}
            ) as resp:
                # followed to the landing page, which shows the double's plan
                assert resp.url.path == "/_gate/subscribe"
                assert "PatentLLM Pro" in await resp.text()
            async with client.get(f"http://127.0.0.1:{stripe_port}/v1/prices") as resp:
                assert resp.status == 401  # the double really is Stripe-shaped
            # A sign-in link (nobody has paid: none is sent, but the page is the same) ...
            base = f"http://127.0.0.1:{port}"
            form = await page_form(client, f"{base}/_gate/login", "/_gate/login")
            async with client.post(
                f"{base}/_gate/login", data={**form, "email": "demo@example.com"}
            ) as resp:
                assert resp.status == 200
            for path in ("/favicon.ico", "/_gate/healthz"):
                async with client.get(base + path) as resp:
                    assert resp.status == 200, path
            async with client.get(f"http://127.0.0.1:{stripe_port}/favicon.ico") as resp:
                assert resp.status == 200
        # ... and every request, one access-log line each, as the README promises; the stripe
        # library's per-call INFO lines stay out (LOG_LEVEL=info).
        text = await wait_for_text(log, "path=/favicon.ico")
        assert re.search(r"event=request method=GET path=/_gate/subscribe status=200", text), text
        assert "Request to Stripe api" not in text and "logger=stripe" not in text, text
        assert "promotion code WELCOME20" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log.read_text()


def test_the_demo_sells_pro_monthly_with_the_doubles_overage_price() -> None:
    from gateway.demo.runner import demo_settings
    from gateway.demo.stripe_double import StripeDouble
    from gateway.demo.stripe_double.meters import DEMO_METERED_PRICE

    settings = demo_settings(
        {},
        port=8080,
        upstream_url="http://127.0.0.1:1",
        stripe_url="http://127.0.0.1:2",
        database_path="/nonexistent/demo.sqlite3",
    )
    assert settings.metered_price_map == {"price_demo_monthly": (DEMO_METERED_PRICE["id"],)}
    double = StripeDouble()
    price = double.meters.seed(double.add_price)
    meter = double.meters.meters[price["recurring"]["meter"]]
    assert (meter["event_name"], price["recurring"]["interval"]) == ("analysis", "month")


def test_the_demos_plans_both_analyse_basic_20_a_period_pro_500_with_overage() -> None:
    """The demo's tiers are coherent: the analysis path needs the ``analysis`` feature, both
    products carry it, and the quotas tell them apart (Pro's monthly Checkout adds overage)."""
    from gateway.demo.runner import demo_settings, seed_demo_double
    from gateway.demo.stripe_double import StripeDouble

    settings = demo_settings(
        {},
        port=8080,
        upstream_url="http://127.0.0.1:1",
        stripe_url="http://127.0.0.1:2",
        database_path="/nonexistent/demo.sqlite3",
    )
    usage = settings.usage
    assert usage.meter_for("GET", "/api/stream", "/api/stream?n=1") == "analysis"
    assert usage.meter_for("GET", "/api/search", "/api/search") is None
    for price, included in [
        ("price_basic_monthly", 20),
        ("price_basic_yearly", 20),
        ("price_demo_monthly", 500),
        ("price_demo_yearly", 500),
    ]:
        assert usage.quota(price, "analysis") == included, price
    assert settings.feature_table.required("/api/stream", "/api/stream") == "analysis"
    double = StripeDouble()
    seed_demo_double(double)
    for product in ("prod_basic", "prod_demo"):
        keys = [
            a["entitlement_feature"]["lookup_key"]
            for a in double.entitlements.product_features[product]
        ]
        assert "analysis" in keys, (product, keys)
    assert "20 LLM analyses a month" in [
        f["name"] for f in double.products["prod_basic"]["marketing_features"]
    ]
    # The operator's env still wins over the demo's defaults.
    custom = demo_settings(
        {"PRICE_QUOTAS": "price_basic_monthly=analysis:3"},
        port=8080,
        upstream_url="http://127.0.0.1:1",
        stripe_url="http://127.0.0.1:2",
        database_path="/nonexistent/demo.sqlite3",
    )
    assert custom.usage.quota("price_basic_monthly", "analysis") == 3
    assert custom.usage.quota("price_demo_monthly", "analysis") is None
