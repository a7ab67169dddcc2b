"""``gateway demo``: the whole product on localhost, with no Stripe account and no network.

Starts, in one process: the demo upstream app, the local Stripe test double (hosted Checkout and
Portal pages, signed webhooks) and the gate in front of the app with billing on, then prints the
URL to open. Stop it with Ctrl-C.
"""

import asyncio
import contextlib
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.settings import Settings, load_settings

if TYPE_CHECKING:
    from gateway.demo.stripe_double import StripeDouble

__all__ = [
    "DEMO_ENV",
    "DEMO_KEY",
    "DEMO_PRICES",
    "DEMO_PRODUCT_FEATURES",
    "DEMO_WEBHOOK_SECRET",
    "demo_settings",
    "main",
    "run_demo",
    "seed_demo_double",
]

DEMO_KEY = "sk_test_demo_local"
DEMO_WEBHOOK_SECRET = "whsec_demo_local"  # noqa: S105 - the local double's, not a real one
#: The demo sells both products of the double's catalog, monthly and yearly (Basic first).
DEMO_PRICES = "price_basic_monthly,price_basic_yearly,price_demo_monthly,price_demo_yearly"
DEMO_QUOTAS = (
    "price_basic_monthly=analysis:20,price_basic_yearly=analysis:20,"
    "price_demo_monthly=analysis:500,price_demo_yearly=analysis:500"
)


#: The demo's defaults for the billing settings the operator's env may override: Basic and Pro
#: both analyse (``FEATURE_RULES`` needs the ``analysis`` feature, which both products carry in
#: the demo, see :func:`seed_demo_double`); Basic includes 20 analyses a period, Pro 500 and
#: then $0.10 each (Pro monthly's Checkout also subscribes to the metered overage price on the
#: double's ``analysis`` meter: graduated tiers). Each analysis (``/api/stream``) counts 1.
DEMO_ENV: Mapping[str, str] = {
    "STRIPE_PRICE_IDS": DEMO_PRICES,
    "ALLOW_PROMOTION_CODES": "true",  # try WELCOME20
    "INJECT_BADGE": "true",
    "FEATURE_RULES": "/api/stream*=analysis",
    "CHECKOUT_METERED_PRICES": "price_demo_monthly=price_demo_analysis",
    "USAGE_RULES": "/api/stream*=analysis",
    "PRICE_QUOTAS": DEMO_QUOTAS,
}
#: Entitlements features per product in the demo: the double's default catalog
#: (``DEFAULT_PRODUCT_FEATURES``) with LLM analysis on Basic too: what sets the plans apart is
#: the quota (20 a month, or 500 and overage), not the feature.
DEMO_PRODUCT_FEATURES: Mapping[str, tuple[str, ...]] = {
    "prod_demo": ("search", "analysis", "export"),
    "prod_basic": ("search", "analysis"),
}
#: The landing page's words for the demo's products (Stripe's ``marketing_features``).
DEMO_MARKETING: Mapping[str, tuple[str, ...]] = {
    "prod_basic": ("Patent search", "20 LLM analyses a month", "Saved searches"),
    "prod_demo": (
        "Patent search",
        "LLM analysis of claims: 500 a month, then $0.10 each",
        "Export to PDF and CSV",
    ),
}


def seed_demo_double(double: "StripeDouble") -> None:
    """The demo's catalog on the double: features per product (:data:`DEMO_PRODUCT_FEATURES`),
    the ``analysis`` meter with Pro's overage price, the products' marketing features."""
    double.entitlements.seed(DEMO_PRODUCT_FEATURES)
    double.meters.seed(double.add_price)
    for product_id, names in DEMO_MARKETING.items():
        if product_id in double.products:
            double.products[product_id]["marketing_features"] = [{"name": n} for n in names]


def demo_settings(
    env: Mapping[str, str], *, port: int, upstream_url: str, stripe_url: str, database_path: str
) -> Settings:
    """Settings of the gate in the demo: the operator's env over :data:`DEMO_ENV`, with the
    Stripe parts pointed at the local double. The demo app reports no usage of its own, so
    ``USAGE_REPORT_SECRET`` stays unset (``POST /_gate/usage`` refuses every report)."""
    host = env.get("HOST", "127.0.0.1")
    public_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
    merged = {
        **DEMO_ENV,
        **env,
        "UPSTREAM_URL": upstream_url,
        "PORT": str(port),
        "BILLING_MODE": "on",
        "STRIPE_SECRET_KEY": DEMO_KEY,
        "STRIPE_API_BASE": stripe_url,
        "STRIPE_WEBHOOK_SECRET": DEMO_WEBHOOK_SECRET,
        "DATABASE_PATH": database_path,
        "PUBLIC_URL": env.get("PUBLIC_URL", f"http://{public_host}:{port}"),
        "WORKERS": "1",
    }
    return load_settings(
        merged, demo=True, session_secret=env.get("SESSION_SECRET") or secrets.token_hex(32)
    )


async def _start(
    app: web.Application,
    host: str,
    port: int,
    sock: socket.socket | None = None,
    settings: Settings | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve ``app``; with the gate's ``settings``, with the runner options of ``gateway
    serve`` (its access log, ``ACCESS_LOG``); the demo app and the double log no requests."""
    from gateway.server import runner_kwargs

    options = runner_kwargs(settings) if settings is not None else {"access_log": None}
    runner = web.AppRunner(app, **options)
    await runner.setup()
    site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[-1][1])


async def main(
    env: Mapping[str, str], port: int | None = None, started: asyncio.Event | None = None
) -> None:
    from gateway.app import create_app
    from gateway.demo.stripe_double import StripeDouble
    from gateway.demo.upstream import create_upstream_app
    from gateway.logs import setup_logging

    host = env.get("HOST", "127.0.0.1")
    gate_port = port if port is not None else int(env.get("PORT", "8080") or 8080)
    runners: list[web.AppRunner] = []
    gate_sock: socket.socket | None = None
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        try:
            up_runner, up_port = await _start(create_upstream_app(), "127.0.0.1", 0)
            runners.append(up_runner)
            double = StripeDouble(api_key=DEMO_KEY, webhook_secret=DEMO_WEBHOOK_SECRET)
            seed_demo_double(double)  # features, the `analysis` meter, Pro's overage price
            stripe_port = int(env.get("DEMO_STRIPE_PORT", str(gate_port + 1 if gate_port else 0)))
            st_runner, stripe_port = await _start(double.app, host, stripe_port)
            runners.append(st_runner)
            if gate_port == 0:
                # A free port, bound and listening before the settings are built: PUBLIC_URL
                # (Stripe's return URLs) must name the real port.
                gate_sock = socket.create_server((host, 0))
                gate_port = int(gate_sock.getsockname()[1])
            settings = demo_settings(
                env,
                port=gate_port,
                upstream_url=f"http://127.0.0.1:{up_port}",
                stripe_url=f"http://127.0.0.1:{stripe_port}",
                database_path=str(Path(tmp) / "demo.sqlite3"),
            )
            setup_logging(settings)
            gate_runner, gate_port = await _start(
                create_app(settings), host, gate_port, gate_sock, settings
            )
            runners.append(gate_runner)
            public = settings.public_url
            double.public_url = f"{public.rsplit(':', 1)[0]}:{stripe_port}"
            double.webhook_urls = [
                f"http://127.0.0.1:{gate_port}{settings.gate_prefix}/webhooks/stripe"
            ]
            print(_banner(public, settings, double.public_url), flush=True)
            if started is not None:
                started.set()
            await _wait_for_signal()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            if gate_sock is not None:
                gate_sock.close()


def _banner(public: str, settings: Settings, stripe_url: str) -> str:
    promo = "; promotion code WELCOME20 (20% off)" if settings.allow_promotion_codes else ""
    return (
        "\n  gateway demo is running\n"
        f"  open   {public}/            (the app, behind the billing gate)\n"
        f"  Stripe {stripe_url}   (local test double: hosted Checkout and Portal; its home "
        "page has the clock)\n"
        f"  account page {public}{settings.gate_prefix}/account\n"
        f"  Pay on the double's Checkout page with any email{promo}.\n"
        "  Sign-in links are printed here in a box. Ctrl-C to stop.\n"
    )


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # non-Unix
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_demo(env: Mapping[str, str], port: int | None = None) -> int:
    try:
        asyncio.run(main(env, port))
    except OSError as exc:  # port in use, etc.
        print(f"gateway: demo could not start: {exc}", file=sys.stderr)
        return 1
    return 0
