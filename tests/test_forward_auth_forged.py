"""A client that forges every header the gate or the app reads, through every proxy config this
project ships, each run for real: ``deploy/nginx/gateway-forward-auth.conf`` (nginx),
``deploy/caddy/Caddyfile`` (Caddy 2.6), ``deploy/traefik/dynamic.yml`` (Traefik 3) and
``deploy/nginx/replicas.conf`` (nginx in front of the gate itself).

The attacker's headers are a table: the original request of both forward-auth modes
(``X-Original-URI``/``-Method``, ``X-Forwarded-Uri``/``-Method``), the client facts
(``X-Forwarded-For``/``-Host``/``-Proto``), the trusted identity header (``IDENTITY_HEADER`` is
set here: a proxy that passes on the client's own makes the client whoever it names), every
header of :data:`gateway.gate.UPSTREAM_HEADERS` (the gate's own list, so a new one cannot be
forgotten), and the underscore spelling of each (WSGI, PHP and Rails apps read ``X_Gate_User``
as ``X-Gate-User``). With them, no access decision changes, and the app sees only what the
proxy and the gate set.
"""

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gateway.forward_auth import ORIGINAL_REQUEST_HEADERS
from gateway.gate import UPSTREAM_HEADERS
from tests.shipped import (
    FORWARD_AUTH_PROXIES,
    ProxyRunner,
    running_shipped_replicas,
    stack_behind,
)
from tests.stack import Stack, echoed_headers
from tests.tiers import BASIC, PRO, subscriber

HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
IDENTITY = "X-Forwarded-Email"
VICTIM = "victim@example.com"  # a Pro customer the attacker names
FORGED_IP = "203.0.113.9"
PAID = "/api/echo/paid"  # any subscriber
PRO_ONLY = "/api/echo/pro"  # FEATURE_RULES: the `analysis` feature (Pro)
PUBLIC = "/api/echo/public/page"  # PUBLIC_PATHS
ENV = {
    "STRIPE_PRICE_IDS": f"{BASIC},{PRO}",
    "FEATURE_RULES": "/api/echo/pro*=analysis",
    "PUBLIC_PATHS": "/api/echo/public/*",
    "IDENTITY_HEADER": IDENTITY,
    # Pro is sold per seat: its customer owns a team (X-Gate-Team, X-Gate-Role).
    "SEAT_PRICE_IDS": PRO,
    # The Pro path is metered too (X-Gate-Quota), far from its quota.
    "USAGE_RULES": "/api/echo/pro*=analysis",
    "PRICE_QUOTAS": f"{PRO}=analysis:1000",
}
#: The original request as each forward-auth mode reads it (nginx's, then Caddy's and Traefik's).
ORIGINAL = ["X-Original-URI", "X-Original-Method", "X-Forwarded-Uri", "X-Forwarded-Method"]

SHIPPED: dict[str, ProxyRunner] = {**FORWARD_AUTH_PROXIES, "replicas": running_shipped_replicas}


def attacks(uri: str) -> dict[str, dict[str, str]]:
    """The attacker's headers by kind, and all of them at once: the original request named as
    ``uri`` (a gate path, or a path the user may see), the client somewhere else, the user a
    paying victim, every ``X-Gate-*`` of the gate's list, and each in its underscore spelling."""
    kinds = {
        "original request": {
            name: (uri if name.endswith(("URI", "Uri")) else "GET") for name in ORIGINAL
        },
        "client facts": {
            "X-Forwarded-For": FORGED_IP,
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
        },
        "identity": {IDENTITY: VICTIM},
        "gate headers": {name: f"forged-{name.lower()}" for name in UPSTREAM_HEADERS},
    }
    every = {name: value for headers in kinds.values() for name, value in headers.items()}
    kinds["underscore spellings"] = {name.replace("-", "_"): v for name, v in every.items()}
    kinds["all"] = every | kinds["underscore spellings"]
    return kinds


@pytest.fixture(params=list(SHIPPED))
async def shipped(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, Stack, str]]:
    """The stack selling Basic and Pro behind each shipped proxy config, a Pro victim on it:
    the config's name, the stack, the proxy's base URL."""
    name: str = request.param
    async with stack_behind(tmp_path, SHIPPED[name], ENV) as (stack, base):
        stack.double.entitlements.seed()
        victim = stack.double.create_customer(VICTIM)
        stack.double.create_subscription(victim["id"], PRO)
        yield name, stack, base


async def test_forged_headers_change_no_decision(shipped: tuple[str, Stack, str]) -> None:
    """Each kind of forgery, then all at once: an anonymous request for a paid path (GET, the
    SSE stream, an upload) is still refused, the browser's redirect stays on the proxy's host,
    and a Basic customer still gets no Pro path. A gate path as the original request is the
    Caddyfile's bypass; the victim's email in the identity header is the proxies' pass-on."""
    _, stack, base = shipped
    port = URL(base).port
    got: dict[str, list[object]] = {}
    async with stack.session() as anonymous, stack.session() as basic:
        await subscriber(stack, basic, "basil@example.com", BASIC)
        async with basic.get(base + PAID, headers=JSON) as resp:
            assert resp.status == 200, await resp.text()  # the control: their plan's path
        for kind, headers in attacks("/_gate/x").items():
            outcome: list[object] = []
            for method, path in (("GET", PAID), ("GET", "/api/stream"), ("POST", "/api/upload")):
                async with anonymous.request(
                    method,
                    base + path,
                    headers={**JSON, **headers},
                    data=b"x" if method == "POST" else None,
                ) as resp:
                    outcome.append(resp.status)
            async with anonymous.get(
                base + PAID, headers={**HTML, **headers}, allow_redirects=False
            ) as resp:
                # absolute on the proxy's host (forward auth) or relative (the gate's proxy)
                location = URL(base).join(URL(resp.headers.get("Location", "")))
                outcome += [resp.status, location.host, location.port, location.path]
            for uri in (PAID, "/_gate/x"):  # a path of the Basic plan, a gate path
                pro_path = {**JSON, **attacks(uri)[kind]}
                async with basic.get(base + PRO_ONLY, headers=pro_path) as resp:
                    outcome.append(resp.status)
            # the gate's own pages believe the identity header too (the account, the portal)
            async with anonymous.get(base + "/_gate/api/me", headers={**JSON, **headers}) as resp:
                outcome.append(VICTIM in await resp.text())
            got[kind] = outcome
    refused = [401, 401, 401, 303, "127.0.0.1", port, "/_gate/subscribe", 402, 402, False]
    assert got == dict.fromkeys(got, refused)


async def test_the_app_sees_only_what_the_proxy_and_the_gate_set(
    shipped: tuple[str, Stack, str],
) -> None:
    """With each kind of forgery (and all at once), a Pro customer's request reaches the app
    with every header of the gate's list set to the gate's answer, and nothing forged; a public
    path (the gate's answer has no ``X-Gate-*``) with none of them at all — neither the
    client's nor a proxy's unfilled ``{placeholder}``. (In front of the gate's own proxy, the
    replicas config, the original-request headers are just more client headers: the gate does
    not read them there, and passes them on like any other.)"""
    name, stack, base = shipped
    host = URL(base).raw_authority
    vouched = [*ORIGINAL, IDENTITY] if name != "replicas" else [IDENTITY]
    problems: dict[str, list[str]] = {}
    async with stack.session() as pro:
        customer_id, _ = await subscriber(stack, pro, "pia@example.com", PRO)
        # The table of the gate's headers: one row per name of its list.
        expected: dict[str, str | re.Pattern[str] | None] = {
            "X-Gate-User": customer_id,
            "X-Gate-Email": "pia@example.com",
            "X-Gate-Status": "active",
            "X-Gate-Plan": PRO,
            "X-Gate-Features": "analysis,export,search",
            "X-Gate-Team": customer_id,
            "X-Gate-Role": "owner",
            "X-Gate-Key": None,  # a cookie session: none (a forged one is dropped)
            "X-Gate-Quota": re.compile(r"analysis=\d+/1000"),
        }
        assert list(expected) == list(UPSTREAM_HEADERS)  # a new header needs its row here
        for kind, headers in attacks(PAID).items():
            async with pro.get(base + PRO_ONLY, headers={**JSON, **headers}) as resp:
                seen = await app_saw(resp)
            wrong = [
                f"{name}: {seen.get(name.lower())}"
                for name, value in expected.items()
                if not _as_expected(seen.get(name.lower()), value)
            ]
            problems[f"{kind}, paid path"] = wrong + forgeries(seen, host, vouched)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as anonymous:
        for kind, headers in attacks(PAID).items():
            async with anonymous.get(base + PUBLIC, headers={**JSON, **headers}) as resp:
                seen = await app_saw(resp)
            present = [f"{n}: {seen[n.lower()]}" for n in UPSTREAM_HEADERS if n.lower() in seen]
            problems[f"{kind}, public path"] = present + forgeries(seen, host, vouched)
    bad = {kind: found for kind, found in problems.items() if found}
    assert not bad, "\n".join(f"{kind}: {found}" for kind, found in bad.items())


async def app_saw(resp: aiohttp.ClientResponse) -> dict[str, list[str]]:
    """The headers the demo app's echo saw, or ``{"status": [...]}`` when the request did not
    reach it (the caller's problem list then says so)."""
    if resp.status != 200:
        return {"status": [f"{resp.status} {await resp.text()}"]}
    return echoed_headers(await resp.json())


def forgeries(seen: dict[str, list[str]], host: str, vouched: list[str]) -> list[str]:
    """What of :func:`attacks` reached the app: one of the ``vouched`` headers (which only a
    proxy or the gate may send), an underscore spelling, a forged value, client facts other
    than the proxy's own, a ``{…}`` placeholder."""
    if "status" in seen:
        return seen["status"]
    found = [f"{n}: {seen[n.lower()]}" for n in vouched if n.lower() in seen]
    found += [f"{n}: {v}" for n, v in seen.items() if "_" in n]
    found += [f"{n}: {v}" for n, v in seen.items() if any("forged-" in x for x in v)]
    if FORGED_IP in " ".join(seen.get("x-forwarded-for", [])):
        found.append(f"x-forwarded-for: {seen['x-forwarded-for']}")
    if seen.get("x-forwarded-host") != [host]:
        found.append(f"x-forwarded-host: {seen.get('x-forwarded-host')}")
    if seen.get("x-forwarded-proto") != ["http"]:
        found.append(f"x-forwarded-proto: {seen.get('x-forwarded-proto')}")
    found += [f"{n}: {v}" for n, v in seen.items() if any(re.search(r"\{\w+\.", x) for x in v)]
    return found


def test_the_table_forges_every_original_request_header_the_gate_reads() -> None:
    assert [name for pair in ORIGINAL_REQUEST_HEADERS.values() for name in pair] == ORIGINAL


def test_every_x_gate_header_the_gate_sets_is_in_its_list() -> None:
    """The gate's list (:data:`UPSTREAM_HEADERS`) is where the shipped configs and the table
    above come from: every ``X-Gate-*`` name in the gate's code is on it, or is one of the
    forward-auth answer's own headers (which never go to the app), or the app's usage report
    on its responses (which the gate removes)."""
    root = Path(__file__).parent.parent / "gateway"
    answer_only = {"X-Gate-Denial", "X-Gate-Location", "X-Gate-Denial-Body", "X-Gate-Usage"}
    names = {
        match
        for path in root.rglob("*.py")
        if "demo" not in path.parts
        for match in re.findall(r"\"(X-Gate-[A-Za-z-]+)\"", path.read_text())
    }
    assert names - answer_only <= set(UPSTREAM_HEADERS), names - answer_only - set(UPSTREAM_HEADERS)
    assert set(UPSTREAM_HEADERS) <= names


@pytest.mark.parametrize("config", ["nginx", "caddy", "traefik"])
def test_every_shipped_forward_auth_config_names_every_gate_header(config: str) -> None:
    """Each shipped forward-auth config sets every header of the gate's list from the gate's
    answer (read as text; the tests above run them)."""
    path = {
        "nginx": "deploy/nginx/gateway-forward-auth.conf",
        "caddy": "deploy/caddy/Caddyfile",
        "traefik": "deploy/traefik/dynamic.yml",
    }[config]
    text = (Path(__file__).parent.parent / path).read_text()
    for name in UPSTREAM_HEADERS:
        assert name in text, (path, name)


def _as_expected(seen: list[str] | None, value: "str | re.Pattern[str] | None") -> bool:
    """The app saw the header once, with ``value`` (a pattern: a value that changes per
    request, such as the quota's count), or (``None``) not at all."""
    if value is None:
        return seen is None
    if seen is None or len(seen) != 1:
        return False
    return bool(value.fullmatch(seen[0])) if isinstance(value, re.Pattern) else seen[0] == value
