"""Host-header poisoning. Every absolute URL the gate hands out (the emailed sign-in
link, Stripe's success / cancel / return URLs, forward-auth redirects and JSON URLs) starts with
a configured origin: ``PUBLIC_URL``, or the request's host once it is in ``ALLOWED_HOSTS``. A
forged ``Host`` or ``X-Forwarded-Host`` (from a trusted, loopback peer) never reaches them.

The attack is the attacker's own browser: it fetches a form, then posts it with a forged Host
and a matching Origin; on ``main`` the victim was mailed ``http://evil.example/…?token=…``."""

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
import pytest

from gateway.mailer import LogMailer
from gateway.settings import SettingsError, load_settings
from tests.conftest import run_gate_once
from tests.stack import PRICES, Stack, form_fields, running_stack

EVIL = "evil.example"
PRICE = PRICES.split(",")[0]
HTML = {"Accept": "text/html"}
# "allowed": the suite's default (ALLOWED_HOSTS=127.0.0.1); "public": PUBLIC_URL and no list.
CONFIGS = {
    "allowed": {},
    "public": {"ALLOWED_HOSTS": "", "PUBLIC_URL": "https://gate.example"},
}
FORGED = {"host": {"Host": EVIL}, "x-forwarded-host": {"X-Forwarded-Host": EVIL}}
CASES = [(c, f) for c in CONFIGS for f in FORGED]


def forged(config: str, how: str) -> dict[str, str]:
    """The forged header, with the Origin a browser on that site would send (so the CSRF
    origin check, which follows the same base URL, is no obstacle to the attack)."""
    origin = "https://gate.example" if config == "public" else f"http://{EVIL}"
    return {**FORGED[how], "Origin": origin}


def sent_links(stack: Stack) -> list[str]:
    mailer = stack.services.mailer
    assert isinstance(mailer, LogMailer)
    return [link for _, link in mailer.sent]


async def form(
    client: aiohttp.ClientSession,
    url: str,
    action: str,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    async with client.get(url, headers={**HTML, **(headers or {})}) as resp:
        assert resp.status == 200, await resp.text()
        return form_fields(await resp.text(), action)


async def post(
    client: aiohttp.ClientSession, url: str, data: Mapping[str, str], headers: dict[str, str]
) -> aiohttp.ClientResponse:
    resp = await client.post(url, data=data, headers={**HTML, **headers}, allow_redirects=False)
    await resp.read()
    return resp


async def as_payer(stack: Stack, client: aiohttp.ClientSession) -> None:
    """``client`` signed in as a new customer with a subscription (the account page's Manage
    billing form is theirs)."""
    customer_id = str(stack.double.create_customer("payer@example.com")["id"])
    stack.double.create_subscription(customer_id, PRICE)
    await stack.sign_in(client, customer_id, "payer@example.com")


def checkout_urls(stack: Stack) -> list[str]:
    """The success and cancel URLs of every Checkout session the gate created."""
    sessions = stack.double.checkout_sessions.values()
    return [str(s[k]) for s in sessions for k in ("success_url", "cancel_url")]


def portal_returns(stack: Stack) -> list[str]:
    """The return URL of every portal session the gate created."""
    return [str(s["return_url"]) for s in stack.double.portal_sessions.values()]


@dataclasses.dataclass(frozen=True)
class Flow:
    """A form whose answer hands out absolute URLs: the page it is on, where it posts, the
    gate's answer when it works, the URLs it handed out, and what they must be then."""

    page: str
    action: str
    ok_status: int
    handed_out: Callable[[Stack], list[str]]
    expected: Callable[[list[str]], bool]
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    signed_in: bool = False


FLOWS = {
    "emailed-link": Flow(
        "/_gate/login",
        "/_gate/login",
        200,
        sent_links,
        lambda urls: (
            len(urls) == 1 and urls[0].startswith("https://gate.example/_gate/login/verify?")
        ),
        fields={"email": "victim@example.com"},
    ),
    "checkout-urls": Flow(
        "/_gate/subscribe?next=/app",
        "/_gate/checkout",
        303,
        checkout_urls,
        lambda urls: bool(urls) and all(u.startswith("https://gate.example/_gate/") for u in urls),
    ),
    "portal-return-url": Flow(
        "/_gate/account",
        "/_gate/portal",
        303,
        portal_returns,
        lambda urls: urls == ["https://gate.example/_gate/account"],
        signed_in=True,
    ),
}


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize(("config", "how"), CASES)
async def test_forged_host_never_reaches_the_urls_a_form_hands_out(
    tmp_path: Path, config: str, how: str, flow: str
) -> None:
    """The attacker's browser posts the form with a forged host: refused where the host is
    checked against ALLOWED_HOSTS; with PUBLIC_URL the URLs start with it."""
    f = FLOWS[flow]
    async with running_stack(tmp_path, CONFIGS[config]) as stack, stack.session() as client:
        if f.signed_in:
            await as_payer(stack, client)
        fields = {**await form(client, stack.url(f.page), f.action), **f.fields}
        resp = await post(client, stack.url(f.action), fields, forged(config, how))
        urls = f.handed_out(stack)
        assert not any(EVIL in url for url in urls), urls
        if config == "allowed":
            assert resp.status == 400 and urls == []
        else:
            assert resp.status == f.ok_status
            assert f.expected(urls), urls


@pytest.mark.parametrize(("config", "how"), CASES)
@pytest.mark.parametrize("accept", ["text/html", "application/json"])
@pytest.mark.parametrize("mode", ["default", "nginx"])
async def test_forged_host_never_reaches_forward_auth_answers(
    tmp_path: Path, config: str, how: str, accept: str, mode: str
) -> None:
    async with running_stack(tmp_path, CONFIGS[config]) as stack, stack.session() as client:
        headers = {**FORGED[how], "X-Original-URI": "/app", "Accept": accept}
        async with client.get(
            stack.url(f"/_gate/auth?mode={mode}"), headers=headers, allow_redirects=False
        ) as resp:
            body = await resp.text()
            assert resp.status in (303, 401, 402), body
            answer = " ".join([body, *resp.headers.values()])
        assert EVIL not in answer
        location = resp.headers.get("Location") or resp.headers.get("X-Gate-Location")
        if location:
            expected = "https://gate.example/" if config == "public" else "/_gate/"
            assert location.startswith(expected), location


@pytest.mark.parametrize("how", list(FORGED))
async def test_forged_host_never_reaches_json_urls_on_the_proxied_path(
    tmp_path: Path, how: str
) -> None:
    async with running_stack(tmp_path, CONFIGS["public"]) as stack, stack.session() as client:
        headers = {**FORGED[how], "Accept": "application/json"}
        async with client.get(stack.url("/api/search?q=x"), headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
        assert EVIL not in str(body)
        assert body["subscribe_url"].startswith("/_gate/subscribe")


async def test_a_listed_host_builds_the_urls(tmp_path: Path) -> None:
    """A gate for several domains: the (listed) host of the request is the link's host."""
    env = {"ALLOWED_HOSTS": "127.0.0.1:*,*.gate.test"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        fields = await form(client, stack.url("/_gate/login"), "/_gate/login")
        fields["email"] = "multi@example.com"
        headers = {"Host": "shop.gate.test", "Origin": "http://shop.gate.test"}
        resp = await post(client, stack.url("/_gate/login"), fields, headers)
        assert resp.status == 200
        [link] = sent_links(stack)
        assert link.startswith("http://shop.gate.test/_gate/login/verify?")


@pytest.mark.parametrize(
    ("host", "status"),
    [
        (EVIL, 400),
        ("127.0.0.1", 200),
        ("shop.gate.test", 200),
        ("shop.gate.test:8443", 400),  # *.gate.test names the default port only
        ("gate.test", 400),
    ],
)
async def test_unlisted_host_is_a_400_before_anything_else(
    tmp_path: Path, host: str, status: int
) -> None:
    env = {"ALLOWED_HOSTS": "127.0.0.1:*,*.gate.test"}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        for path in ("/_gate/login", "/api/search?q=x", "/_gate/nonexistent"):
            async with client.get(stack.url(path), headers={**HTML, "Host": host}) as resp:
                if status == 400:
                    assert resp.status == 400, path
                    assert "does not answer for that host name" in await resp.text()
                else:
                    assert resp.status != 400, path
        async with client.get(
            stack.url("/api/search"), headers={"Host": host, "Accept": "application/json"}
        ) as resp:
            if status == 400:
                assert await resp.json() == {
                    "error": "bad_host",
                    "message": "This server does not answer for that host name.",
                }
        # Probes carry no host-built URL and must work whatever Host the prober sends.
        async with client.get(stack.url("/_gate/healthz"), headers={"Host": host}) as resp:
            assert resp.status == 200


# --------------------------------------------------------------------------- startup rule

BILLING_ON = {
    "UPSTREAM_URL": "http://127.0.0.1:9",
    "BILLING_MODE": "on",
    "STRIPE_SECRET_KEY": "sk_test_1",
    "STRIPE_PRICE_IDS": "price_A",
    "SESSION_SECRET": "s" * 40,
}


def test_billing_on_without_public_url_or_allowed_hosts_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^PUBLIC_URL is not set"):
        load_settings(BILLING_ON)
    assert load_settings({**BILLING_ON, "PUBLIC_URL": "https://a.example"}).public_url
    assert load_settings({**BILLING_ON, "ALLOWED_HOSTS": "a.example"}).allowed_hosts == (
        "a.example",
    )
    assert load_settings({**BILLING_ON, "BILLING_MODE": "off"}).public_url == ""  # no billing
    assert load_settings(BILLING_ON, demo=True).billing_enabled  # the demo sets its own


def test_the_gate_exits_2_naming_public_url() -> None:
    proc = run_gate_once(["gateway"], {"PATH": "/usr/bin:/bin", **BILLING_ON})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "PUBLIC_URL" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("App.Example.com, *.example.org", ("app.example.com", "*.example.org")),
        ("[::1],127.0.0.1", ("[::1]", "127.0.0.1")),
        (
            "A.example:8443, *.b.example:*, [::1]:80",
            ("a.example:8443", "*.b.example:*", "[::1]:80"),
        ),
        ("", ()),
    ],
)
def test_allowed_hosts_parse(raw: str, parsed: tuple[str, ...]) -> None:
    assert load_settings({**BILLING_ON, "ALLOWED_HOSTS": raw or "x.example"}).allowed_hosts == (
        parsed or ("x.example",)
    )


@pytest.mark.parametrize(
    "raw",
    [
        "*",
        "https://a.example",
        "a.example/x",
        "a b",
        "a.example:0",
        "a.example:65536",
        "a.example:99999",
        "a.example:",
        "a.example:x",
        "a.example:80:80",
    ],
)
def test_allowed_hosts_refuses_what_is_not_a_host(raw: str) -> None:
    with pytest.raises(SettingsError, match=r"^ALLOWED_HOSTS="):
        load_settings({**BILLING_ON, "ALLOWED_HOSTS": raw})


def test_a_bad_allowed_hosts_port_is_one_line_and_exit_2() -> None:
    env = {"PATH": "/usr/bin:/bin", **BILLING_ON, "ALLOWED_HOSTS": "app.example.com:99999"}
    proc = run_gate_once(["gateway"], env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gateway: ALLOWED_HOSTS="), proc.stderr
    assert lines[0].endswith("in 'app.example.com:99999' a port is 1 to 65535")


# --------------------------------------------------------------------------- ports

APP = "app.example.com"
JSON = {"Accept": "application/json"}
#: The request's port, in the Host or in a trusted proxy's X-Forwarded-Host (loopback peer).
PORTED = {
    "host": {"Host": f"{APP}:8443"},
    "x-forwarded-host": {"Host": APP, "X-Forwarded-Host": f"{APP}:4444"},
}


def origin_of(headers: Mapping[str, str]) -> str:
    """The Origin a browser on the site named by ``headers`` sends."""
    scheme = headers.get("X-Forwarded-Proto", "http")
    return f"{scheme}://{headers.get('X-Forwarded-Host') or headers['Host']}"


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("how", list(PORTED))
async def test_a_port_the_list_does_not_name_never_reaches_the_urls(
    tmp_path: Path, how: str, flow: str
) -> None:
    """``ALLOWED_HOSTS=app.example.com`` names the default port only: whoever listens on
    app.example.com:8443 must not receive the mailed token or Stripe's return URLs."""
    f = FLOWS[flow]
    async with running_stack(tmp_path, {"ALLOWED_HOSTS": APP}) as stack, stack.session() as client:
        if f.signed_in:
            await as_payer(stack, client)
        fields = {**await form(client, stack.url(f.page), f.action, {"Host": APP}), **f.fields}
        headers = {**PORTED[how], "Origin": origin_of(PORTED[how])}
        resp = await post(client, stack.url(f.action), fields, headers)
        urls = f.handed_out(stack)
        assert not any(":8443" in url or ":4444" in url for url in urls), urls
        assert resp.status == 400 and urls == []


@pytest.mark.parametrize(
    ("allowed", "headers", "link_base"),
    [
        (f"{APP}:8443", {"Host": f"{APP}:8443"}, f"http://{APP}:8443"),
        (f"{APP},{APP}:8443", {"Host": f"{APP}:8443"}, f"http://{APP}:8443"),
        (APP, {"Host": f"{APP}:80"}, f"http://{APP}"),  # the default port, said out loud
        (
            APP,
            {"Host": APP, "X-Forwarded-Proto": "https", "X-Forwarded-Host": f"{APP}:443"},
            f"https://{APP}",
        ),
        (
            "*.gate.test:4444",
            {"Host": APP, "X-Forwarded-Host": "Shop.Gate.test:4444"},
            "http://shop.gate.test:4444",
        ),
        ("[::1]:8080", {"Host": "[::1]:8080"}, "http://[::1]:8080"),
        ("127.0.0.1:*", {"Host": "127.0.0.1:6553"}, "http://127.0.0.1:6553"),
    ],
)
async def test_a_listed_port_is_kept_and_the_default_port_dropped(
    tmp_path: Path, allowed: str, headers: dict[str, str], link_base: str
) -> None:
    async with running_stack(tmp_path, {"ALLOWED_HOSTS": allowed}) as stack, stack.session() as c:
        fields = await form(c, stack.url("/_gate/login"), "/_gate/login", headers)
        fields["email"] = "ported@example.com"
        resp = await post(c, stack.url("/_gate/login"), fields, {**headers, "Origin": link_base})
        assert resp.status == 200
        [link] = sent_links(stack)
        assert link.startswith(f"{link_base}/_gate/login/verify?"), link


@pytest.mark.parametrize(
    ("allowed", "host", "status"),
    [
        (APP, f"{APP}:8443", 400),
        (APP, f"{APP}:80", 200),
        (APP, APP, 200),
        (f"{APP}:8443", APP, 400),  # a pattern with a port names that port only
        (f"{APP}:8443", f"{APP}:8443", 200),
        (f"{APP}:*", f"{APP}:1", 200),
        (f"{APP}:*", f"{APP}:0", 400),
        (f"{APP}:*", f"{APP}:65536", 400),
        ("*.gate.test", "a.gate.test:8443", 400),
        ("*.gate.test:*", "a.gate.test:8443", 200),
    ],
)
async def test_the_port_decides_with_the_name(
    tmp_path: Path, allowed: str, host: str, status: int
) -> None:
    async with running_stack(tmp_path, {"ALLOWED_HOSTS": allowed}) as stack, stack.session() as c:
        resp = await c.get(stack.url("/_gate/login"), headers={**HTML, "Host": host})
        await resp.read()
        assert resp.status == status


FORM_POSTS = [
    "/_gate/checkout",
    "/_gate/portal",
    "/_gate/login",
    "/_gate/login/verify",
    "/_gate/logout",
    "/_gate/logout/everywhere",
]
PORT_CONFIGS = {
    "allowed": {"ALLOWED_HOSTS": APP},
    "any-port": {"ALLOWED_HOSTS": f"{APP}:*"},
    "public": {"ALLOWED_HOSTS": "", "PUBLIC_URL": f"http://{APP}"},
}


@pytest.mark.parametrize("config", list(PORT_CONFIGS))
@pytest.mark.parametrize("how", ["host", "x-forwarded-host"])
async def test_an_out_of_range_port_is_a_400_on_every_form_post(
    tmp_path: Path, config: str, how: str
) -> None:
    """``Host: app.example.com:99999`` was a 500 (``ValueError: Port out of range``) on every
    form POST: it is a 400, a page for browsers and JSON for APIs."""
    bad = f"{APP}:99999"
    headers = {"Host": bad} if how == "host" else {"Host": APP, "X-Forwarded-Host": bad}
    async with running_stack(tmp_path, PORT_CONFIGS[config]) as stack, stack.session() as client:
        await as_payer(stack, client)
        fields = await form(client, stack.url("/_gate/account"), "/_gate/portal", {"Host": APP})
        for action in FORM_POSTS:
            for accept in (HTML, JSON):
                async with client.post(
                    stack.url(action),
                    data=fields,
                    headers={**accept, **headers, "Origin": f"http://{bad}"},
                    allow_redirects=False,
                ) as resp:
                    if config == "public":  # the Host builds nothing there; never a 500
                        assert resp.status < 500, (action, accept, await resp.text())
                        continue
                    assert resp.status == 400, (action, accept, await resp.text())
                    if accept is JSON:
                        assert (await resp.json())["error"] == "bad_host", action
                    else:
                        assert "does not answer for that host name" in await resp.text()
        assert not stack.double.checkout_sessions and not stack.double.portal_sessions
