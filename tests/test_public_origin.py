"""Issue 7.1: Host-header poisoning. Every absolute URL the gate hands out (the emailed sign-in
link, Stripe's success / cancel / return URLs, forward-auth redirects and JSON URLs) starts with
a configured origin: ``PUBLIC_URL``, or the request's host once it is in ``ALLOWED_HOSTS``. A
forged ``Host`` or ``X-Forwarded-Host`` (from a trusted, loopback peer) never reaches them.

The attack is the attacker's own browser: it fetches a form, then posts it with a forged Host
and a matching Origin; on ``main`` the victim was mailed ``http://evil.example/…?token=…``."""

from collections.abc import Mapping
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


async def form(client: aiohttp.ClientSession, url: str, action: str) -> dict[str, str]:
    async with client.get(url, headers=HTML) as resp:
        assert resp.status == 200, await resp.text()
        return form_fields(await resp.text(), action)


async def post(
    client: aiohttp.ClientSession, url: str, data: Mapping[str, str], headers: dict[str, str]
) -> aiohttp.ClientResponse:
    resp = await client.post(url, data=data, headers={**HTML, **headers}, allow_redirects=False)
    await resp.read()
    return resp


@pytest.mark.parametrize(("config", "how"), CASES)
async def test_forged_host_never_reaches_the_emailed_link(
    tmp_path: Path, config: str, how: str
) -> None:
    async with running_stack(tmp_path, CONFIGS[config]) as stack, stack.session() as attacker:
        fields = await form(attacker, stack.url("/_gate/login"), "/_gate/login")
        fields["email"] = "victim@example.com"
        resp = await post(attacker, stack.url("/_gate/login"), fields, forged(config, how))
        links = sent_links(stack)
        assert not any(EVIL in link for link in links), links
        if config == "allowed":
            assert resp.status == 400 and links == []
        else:
            assert resp.status == 200
            [link] = links
            assert link.startswith("https://gate.example/_gate/login/verify?")


@pytest.mark.parametrize(("config", "how"), CASES)
async def test_forged_host_never_reaches_stripe_checkout_urls(
    tmp_path: Path, config: str, how: str
) -> None:
    async with running_stack(tmp_path, CONFIGS[config]) as stack, stack.session() as client:
        fields = await form(client, stack.url("/_gate/subscribe?next=/app"), "/_gate/checkout")
        resp = await post(client, stack.url("/_gate/checkout"), fields, forged(config, how))
        sessions = list(stack.double.checkout_sessions.values())
        urls = [s[k] for s in sessions for k in ("success_url", "cancel_url")]
        assert not any(EVIL in str(url) for url in urls), urls
        if config == "allowed":
            assert resp.status == 400 and sessions == []
        else:
            assert resp.status == 303
            assert urls and all(url.startswith("https://gate.example/_gate/") for url in urls)


@pytest.mark.parametrize(("config", "how"), CASES)
async def test_forged_host_never_reaches_the_portal_return_url(
    tmp_path: Path, config: str, how: str
) -> None:
    async with running_stack(tmp_path, CONFIGS[config]) as stack, stack.session() as client:
        customer_id = str(stack.double.create_customer("payer@example.com")["id"])
        stack.double.create_subscription(customer_id, PRICE)
        await stack.sign_in(client, customer_id, "payer@example.com")
        fields = await form(client, stack.url("/_gate/account"), "/_gate/portal")
        resp = await post(client, stack.url("/_gate/portal"), fields, forged(config, how))
        returns = [str(s["return_url"]) for s in stack.double.portal_sessions.values()]
        assert not any(EVIL in url for url in returns), returns
        if config == "allowed":
            assert resp.status == 400 and returns == []
        else:
            assert resp.status == 303
            assert returns == ["https://gate.example/_gate/account"]


@pytest.mark.parametrize(("config", "how"), CASES)
@pytest.mark.parametrize("accept", ["text/html", "application/json"])
@pytest.mark.parametrize("mode", ["default", "nginx"])
async def test_forged_host_never_reaches_forward_auth_answers(
    tmp_path: Path, config: str, how: str, accept: str, mode: str
) -> None:
    async with running_stack(tmp_path, CONFIGS[config]) as stack, stack.session() as client:
        headers = {**FORGED[how], "X-Forwarded-Uri": "/app", "Accept": accept}
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
    env = {"ALLOWED_HOSTS": "127.0.0.1,*.gate.test"}
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
    [(EVIL, 400), ("127.0.0.1", 200), ("shop.gate.test:8443", 200), ("gate.test", 400)],
)
async def test_unlisted_host_is_a_400_before_anything_else(
    tmp_path: Path, host: str, status: int
) -> None:
    env = {"ALLOWED_HOSTS": "127.0.0.1,*.gate.test"}
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
        ("", ()),
    ],
)
def test_allowed_hosts_parse(raw: str, parsed: tuple[str, ...]) -> None:
    assert load_settings({**BILLING_ON, "ALLOWED_HOSTS": raw or "x.example"}).allowed_hosts == (
        parsed or ("x.example",)
    )


@pytest.mark.parametrize("raw", ["*", "https://a.example", "a.example:443", "a.example/x", "a b"])
def test_allowed_hosts_refuses_what_is_not_a_host(raw: str) -> None:
    with pytest.raises(SettingsError, match=r"^ALLOWED_HOSTS="):
        load_settings({**BILLING_ON, "ALLOWED_HOSTS": raw})
