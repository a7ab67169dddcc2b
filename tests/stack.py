"""The whole product on 127.0.0.1 for functional and browser tests: the demo upstream app, the
local Stripe double and the gate with billing on, each a real server on its own port; and the
browser steps through the gate's pages that several test modules share."""

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from babel.dates import format_date
from yarl import URL

from gateway.app import create_app
from gateway.demo.stripe_double import StripeDouble
from gateway.mailer import LogMailer
from gateway.model import Clock
from gateway.server import runner_kwargs
from gateway.services import SERVICES, Services, StripeFactory
from gateway.settings import SESSION_COOKIE, Settings, load_settings
from tests.probes import probe_upstream_app

API_KEY = "sk_test_stack"
WEBHOOK_SECRET = "whsec_stack"
SESSION_SECRET = "s" * 48
PRICES = "price_demo_monthly,price_demo_yearly"


@dataclasses.dataclass
class Stack:
    upstream: TestServer
    double: StripeDouble
    double_server: TestServer
    #: the gate on ``settings`` (served by :meth:`start_gate`; a new one after a restart)
    gate_server: TestServer = dataclasses.field(init=False)
    settings: Settings
    stripe_factory: StripeFactory | None = None
    #: the gate's clock, when the test moves it (None: the system's)
    clock: Clock | None = None

    def __post_init__(self) -> None:
        self.gate_server = self._new_gate()

    def _new_gate(self) -> TestServer:
        app = create_app(self.settings, stripe_factory=self.stripe_factory, clock=self.clock)
        return TestServer(app, host="127.0.0.1")

    async def start_gate(self) -> None:
        """Serve :attr:`gate_server` with the production runner options and send the double's
        webhooks to it."""
        await self.gate_server.start_server(**runner_kwargs(self.settings))
        self.double.webhook_urls = [self.url("/_gate/webhooks/stripe")]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gate_server.port}"

    def url(self, path: str = "/") -> str:
        return self.base + path

    @property
    def services(self) -> Services:
        return self.gate_server.app[SERVICES]

    def process_env(self) -> dict[str, str]:
        """The environment of another gate process on this stack (more workers, the CLI):
        :func:`billing_env` for the same upstream and double, on the same DATABASE_PATH."""
        return {
            **billing_env(self.upstream, self.double),
            "DATABASE_PATH": str(self.settings.database_path),
        }

    async def restart_gate(self) -> None:
        """Stop the gate and start a new one (a new process, as far as the gate can tell) on
        the same settings and DATABASE_PATH; the upstream and the double keep running."""
        await self.gate_server.close()
        self.gate_server = self._new_gate()
        await self.start_gate()

    async def sign_in(
        self,
        client: aiohttp.ClientSession,
        customer_id: str,
        email: str | None = None,
        *,
        user_agent: str = "",
    ) -> str:
        """Create a real server-side session for ``customer_id`` (through the gate's session
        service, as a sign-in does) and put its cookie in ``client``'s jar (for tests that are
        not about signing in). Returns the cookie value."""
        value = await self.services.sessions.create(customer_id, email, user_agent)
        client.cookie_jar.update_cookies({SESSION_COOKIE: value}, response_url=URL(self.base))
        return value

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """A client with its own cookie jar (a 'browser'); redirects not followed by default."""
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP host
        return aiohttp.ClientSession(cookie_jar=jar, **kwargs)

    def days_left(self, email: str) -> int:
        """Whole days (rounded up) until the period end of ``email``'s subscription on the
        double, on the double's clock: what the gate must show, computed independently of it
        (months have 28 to 31 days, so no test may hard-code the count)."""
        days: int = math.ceil((self._period_end_ts(email) - self.double.now()) / 86400)
        return days

    def _period_end_ts(self, email: str) -> int:
        """The latest ``current_period_end`` of ``email``'s subscriptions on the double."""
        ends = [
            item["current_period_end"]
            for sub in self.double.subscriptions.values()
            if self.double.customers[sub["customer"]].get("email") == email
            for item in sub["items"]["data"]
        ]
        assert ends, f"no subscription on the double for {email}"
        latest: int = max(ends)
        return latest

    def period_end(self, email: str) -> datetime:
        """The latest period end of ``email``'s subscriptions on the double (UTC)."""
        return datetime.fromtimestamp(self._period_end_ts(email), UTC)

    def ends_on(self, email: str) -> str:
        """:meth:`period_end` as users must read it (``1 Jan 2027``), formatted here with
        babel, independently of the gate."""
        return str(format_date(self.period_end(email), "medium", locale="en_GB"))

    async def start_checkout(
        self, client: aiohttp.ClientSession, next_path: str = "/", *, price: str | None = None
    ) -> str:
        """The landing page's Subscribe button (``price``: as for :meth:`subscribe`), asserted
        to be answered with a 303; the URL of the double's Checkout page it sends to."""
        async with client.get(
            self.url(f"/_gate/subscribe?next={next_path}"),
            headers={"Accept": "text/html"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.text()
        form = checkout_form(page, price)
        async with client.post(
            self.url("/_gate/checkout"), data=form, allow_redirects=False
        ) as resp:
            assert resp.status == 303, await resp.text()
            return resp.headers["Location"]

    async def subscribe(
        self,
        client: aiohttp.ClientSession,
        email: str,
        next_path: str = "/",
        *,
        price: str | None = None,
        pay: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """The journey a browser makes: landing → checkout → pay on the double → success.
        ``price``: the plan whose Subscribe button is pressed (default: the first, as
        listed first in STRIPE_PRICE_IDS); ``pay``: more fields of the double's Pay form
        (``promotion_code``, ``without_card``). Returns the final response of /success (a
        303 to ``next_path`` when it worked)."""
        checkout_url = await self.start_checkout(client, next_path, price=price)
        session_id = checkout_url.rsplit("/", 1)[1]
        async with client.post(
            f"{checkout_url}/pay", data={"email": email, **(pay or {})}, allow_redirects=False
        ) as resp:
            assert resp.status == 303, await resp.text()
            success_url = resp.headers["Location"]
        assert session_id in success_url
        resp = await client.get(success_url, allow_redirects=False)
        await resp.read()
        return resp


def echoed_headers(body: dict[str, Any]) -> dict[str, list[str]]:
    """The demo upstream's ``/api/echo`` header list as lower-case name → values."""
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def form_fields(html: str, action: str) -> dict[str, str]:
    """The hidden inputs of the form posting to ``action`` in ``html``."""
    match = re.search(rf'<form[^>]*action="{re.escape(action)}"[^>]*>(.*?)</form>', html, re.S)
    assert match, f"no form for {action}"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', match.group(1)))


def checkout_form(html: str, price: str | None = None) -> dict[str, str]:
    """The hidden inputs of the landing page's Subscribe form for ``price`` (default: the
    first form, the first plan)."""
    if price is None:
        return form_fields(html, "/_gate/checkout")
    forms = re.findall(r'<form[^>]*action="/_gate/checkout"[^>]*>(.*?)</form>', html, re.S)
    for body in forms:
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body))
        if fields.get("price") == price:
            return fields
    raise AssertionError(f"no Subscribe form for {price} among {len(forms)} forms")


def stack_settings(
    upstream: TestServer,
    double: StripeDouble,
    database: Path,
    env: Mapping[str, str] | None = None,
) -> Settings:
    return load_settings(
        {
            **billing_env(upstream, double),
            "DATABASE_PATH": str(database),
            "STRIPE_MAX_RETRIES": "0",
            "LOG_LEVEL": "warning",
            # Absolute URLs come from the validated request host (no Host-header poisoning);
            # app.example.com is the public host the forward-auth tests name in X-Forwarded-Host.
            "ALLOWED_HOSTS": "127.0.0.1:*,app.example.com",
            **(env or {}),
        }
    )


@asynccontextmanager
async def running_stack(
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    stripe_factory: StripeFactory | None = None,
    upstream_app: web.Application | None = None,
    double_kwargs: Mapping[str, Any] | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[Stack]:
    """Start upstream, Stripe double and gate; stop them in reverse order.
    ``double_kwargs`` go to :class:`StripeDouble` (e.g. ``prices=[...]``); ``clock`` is the
    gate's (a :class:`~gateway.model.ManualClock` the test moves)."""
    async with upstream_and_double(upstream_app, double_kwargs) as (
        upstream,
        double,
        double_server,
    ):
        settings = stack_settings(upstream, double, tmp_path / "gate.sqlite3", env)
        stack = Stack(upstream, double, double_server, settings, stripe_factory, clock)
        try:
            await stack.start_gate()
            yield stack
        finally:
            await stack.gate_server.close()  # the one running now (see Stack.restart_gate)


@asynccontextmanager
async def upstream_and_double(
    upstream_app: web.Application | None = None, double_kwargs: Mapping[str, Any] | None = None
) -> AsyncIterator[tuple[TestServer, StripeDouble, TestServer]]:
    """The demo upstream (or ``upstream_app``) and the Stripe double, each a real server on
    127.0.0.1: ``(upstream, double, double_server)``; closed in reverse order."""
    upstream = TestServer(upstream_app or probe_upstream_app(), host="127.0.0.1")
    await upstream.start_server()
    try:
        double = StripeDouble(
            api_key=API_KEY, webhook_secret=WEBHOOK_SECRET, **(double_kwargs or {})
        )
        double_server = TestServer(double.app, host="127.0.0.1")
        await double_server.start_server()
        try:
            double.public_url = f"http://127.0.0.1:{double_server.port}"
            yield upstream, double, double_server
        finally:
            await double_server.close()
    finally:
        await upstream.close()


def billing_env(upstream: TestServer, double: StripeDouble) -> dict[str, str]:
    """The environment of a gate process with billing on in front of ``upstream`` and the
    ``double`` (plain-HTTP cookies, as on 127.0.0.1)."""
    return {
        "UPSTREAM_URL": f"http://127.0.0.1:{upstream.port}",
        "BILLING_MODE": "on",
        "STRIPE_SECRET_KEY": API_KEY,
        "STRIPE_API_BASE": double.public_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_PRICE_IDS": PRICES,
        "SESSION_SECRET": SESSION_SECRET,
        "COOKIE_SECURE": "false",
    }


async def pay_as_browser(
    client: aiohttp.ClientSession,
    url: Callable[[str], str],
    email: str,
    choose: Callable[[str], dict[str, str]] | None = None,
) -> None:
    """Landing → checkout → pay on the double → success, on the gate whose addresses
    ``url(path)`` gives, each step answered with a 303 (the short form of
    :meth:`Stack.subscribe`, for gates in other processes). ``choose``: the Checkout form
    from the landing page (default: its first)."""
    async with client.get(url("/_gate/subscribe?next=/"), headers={"Accept": "text/html"}) as resp:
        page = await resp.text()
    form = choose(page) if choose else form_fields(page, "/_gate/checkout")
    async with client.post(url("/_gate/checkout"), data=form, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        checkout_url = resp.headers["Location"]
    async with client.post(
        f"{checkout_url}/pay", data={"email": email}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
        success_url = resp.headers["Location"]
    async with client.get(success_url, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


async def subscribed_cookie(url: Callable[[str], str], email: str) -> str:
    """:func:`pay_as_browser` in a new browser; the ``Cookie`` header it ends with."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP host
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        await pay_as_browser(client, url, email)
        cookies = jar.filter_cookies(URL(url("/")))
        return "; ".join(f"{k}={m.value}" for k, m in cookies.items())


# ---- browser steps several test modules share

_HTML = {"Accept": "text/html,application/xhtml+xml"}
_JSON = {"Accept": "application/json"}
#: seconds: a bound for waiting (``until_refused``), never an assertion on timing
_DEADLINE = 30.0


async def status_of(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> int:
    """The status of ``GET url`` (JSON unless ``headers`` say otherwise; no redirect
    followed)."""
    async with client.get(url, headers=headers or _JSON, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def page_form(client: aiohttp.ClientSession, url: str, action: str) -> dict[str, str]:
    """GET an _HTML page and return the hidden fields of its form posting to ``action``."""
    async with client.get(url, headers=_HTML, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
        return form_fields(await resp.text(), action)


async def me(stack: Stack, client: aiohttp.ClientSession) -> dict[str, Any]:
    """``client``'s ``/_gate/api/me`` (asserted 200)."""
    async with client.get(stack.url("/_gate/api/me"), headers=_JSON) as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def subscribed(
    stack: Stack, client: aiohttp.ClientSession, email: str = "alice@example.com"
) -> str:
    """Subscribe through the browser journey; the new customer's id."""
    resp = await stack.subscribe(client, email)
    assert resp.status == 303, await resp.text()
    customer_id = (await me(stack, client))["customer_id"]
    assert isinstance(customer_id, str) and customer_id.startswith("cus_")
    return customer_id


async def open_portal(stack: Stack, client: aiohttp.ClientSession) -> str:
    """Manage billing from the account page; the URL of the double's portal page."""
    form = await page_form(client, stack.url("/_gate/account"), "/_gate/portal")
    async with client.post(stack.url("/_gate/portal"), data=form, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(stack.double.public_base + "/portal/")
    return location


async def portal_action(client: aiohttp.ClientSession, portal_url: str, action: str) -> None:
    """Press a button of the double's portal page (a real form POST)."""
    async with client.get(portal_url) as resp:
        assert resp.status == 200
        page = await resp.text()
    match = re.search(rf'<form method="post" action="([^"]+/{re.escape(action)})"', page)
    assert match, f"no {action} form on the portal page"
    target = str(URL(portal_url).join(URL(match.group(1))))
    async with client.post(target, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


async def request_link(
    stack: Stack, client: aiohttp.ClientSession, email: str, headers: dict[str, str] | None = None
) -> str:
    """Submit the sign-in form; the page it answers."""
    form = await page_form(client, stack.url("/_gate/login?next=/api/search"), "/_gate/login")
    async with client.post(
        stack.url("/_gate/login"),
        data={**form, "email": email},
        headers={**_HTML, **(headers or {})},
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.text()


async def follow_link(
    stack: Stack, client: aiohttp.ClientSession, link: str
) -> aiohttp.ClientResponse:
    """Open a sign-in link (a Continue form) and press Continue; the POST's response."""
    form = await page_form(client, link, "/_gate/login/verify")
    resp = await client.post(
        stack.url("/_gate/login/verify"), data=form, headers=_HTML, allow_redirects=False
    )
    await resp.read()
    return resp


async def confirm_email(stack: Stack, client: aiohttp.ClientSession, email: str) -> None:
    """Sign ``client`` in with the emailed link for ``email`` (as a user confirming the email
    typed on Stripe's Checkout does): its session then carries the verified email."""
    await request_link(stack, client, email)
    mailer = stack.services.mailer
    assert isinstance(mailer, LogMailer), mailer
    to, link = mailer.sent[-1]
    assert to == email.lower(), (to, email)
    resp = await follow_link(stack, client, link)
    assert resp.status == 303, resp.status


def session_value(client: aiohttp.ClientSession) -> str:
    """The ``gate_session`` cookie in ``client``'s jar."""
    values = [m.value for m in client.cookie_jar if m.key == SESSION_COOKIE]
    assert len(values) == 1, values
    return values[0]


async def replay(base: str, value: str, path: str = "/api/search?q=x") -> int:
    """The attacker: a fresh client sending only the copied cookie. The status it gets."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as attacker,
        attacker.get(
            base + path,
            headers={"Cookie": f"{SESSION_COOKIE}={value}", "Accept": "application/json"},
            allow_redirects=False,
        ) as resp,
    ):
        await resp.read()
        return resp.status


async def until_refused(base: str, value: str) -> int:
    """Replay ``value`` until it is refused (or the deadline passes); the last status."""
    deadline = time.monotonic() + _DEADLINE
    status = await replay(base, value)
    while status == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status = await replay(base, value)
    return status
