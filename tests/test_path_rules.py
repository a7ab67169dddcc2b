"""gateway.path_rules: per-path rules hold for every spelling a lenient app routes.

The table tests are pure. The others put the gate (and the shipped nginx, Caddy, Traefik examples)
in front of a real case-insensitive upstream — an Express 4 app with Express's default routing
(tests/express.py) — and send a Basic customer to Pro routes spelled as Express answers them:
``/EXPORT``, ``/Export/``, ``/api/Analysis/run``, ``/Reports/1``. WebSocket upgrades are
checked on the demo upstream (Express has no WebSocket without more packages; the gate decides
the upgrade before the upstream sees it).
"""

from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSServerHandshakeError

from gateway.path_rules import PathRules, fold_path
from gateway.paths import PublicPaths
from tests.express import running_express
from tests.shipped import (
    ProxyRunner,
    running_shipped_caddy,
    running_shipped_nginx,
    running_shipped_traefik,
)
from tests.stack import status_of
from tests.tiers import BASIC, PRO, basic_and_pro, subscriber, tiers_stack

JSON = {"Accept": "application/json"}
DEADLINE = 10.0

# ------------------------------------------------------------------ the matcher (pure)

RULES = PathRules(
    [
        ("/export", "export"),
        ("/api/analysis/*", "analysis"),
        ("/reports/*", "export"),
        ("/api/stream*", "stream"),
        ("/api/*", "search"),
    ]
)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/export", "export"),
        ("/EXPORT", "export"),  # case-insensitive
        ("/Export", "export"),
        ("/export/", "export"),  # with or without a trailing slash
        ("/Export/", "export"),
        ("/exports", None),  # an exact pattern is still a whole path
        ("/export/x", None),
        ("/api/analysis/run", "analysis"),
        ("/API/analysis/run", "analysis"),
        ("/api/Analysis/run", "analysis"),
        ("/api/analysis/run/", "analysis"),
        ("/api/analysis", "analysis"),  # a prefix /x/* covers /x itself (a mounted router)
        ("/API/ANALYSIS/", "analysis"),
        ("/api/analysisx", "search"),  # ... but not /xy: the next rule decides
        ("/Reports/1", "export"),
        ("/reports", "export"),
        ("/reportsx", None),
        ("/API/STREAMED", "stream"),
        ("/api", "search"),
        ("/API/", "search"),
        ("/apix", None),
        ("/", None),
        ("/\uff25\uff38\uff30\uff2f\uff32\uff34", "export"),  # full-width EXPORT (NFKC)
        ("/EXPORT\u017f", None),  # long s folds to s: /exports, not /export
    ],
)
def test_rules_match_case_insensitively_with_or_without_a_trailing_slash(
    path: str, value: str | None
) -> None:
    assert RULES.match(path) == value
    assert RULES.match(path) == value  # remembered: the same answer
    assert RULES.match(path, path + "?q=1") == value


def test_a_pattern_differing_only_in_case_or_slash_is_the_same_pattern() -> None:
    rules = PathRules([("/Export/", "a"), ("/export", "b"), ("/API/Reports/*", "c")])
    assert rules.match("/export") == "a"  # the first rule: /Export/ is /export
    assert rules.match("/api/reports/1") == "c"
    assert rules.values == ("a", "b", "c")
    assert fold_path("/A/B/") == "/a/b" and fold_path("/") == "/"


def test_an_ambiguous_raw_path_is_matched_as_sent_too() -> None:
    # An upstream that keeps %2F routes /Reports/..%2Fx under /reports although it
    # normalizes to /x.
    assert RULES.match("/x", "/Reports/..%2Fx") == "export"
    assert RULES.match("/x", "/Export/..%2Fx") is None  # an exact pattern stays a whole path
    assert RULES.match("/x", "/API/Analysis/../x") == "analysis"
    assert RULES.match("/x", "/x") is None


def test_a_bad_pattern_is_refused_as_in_public_paths() -> None:
    for bad in ("api/*", "/api/*x", "/a*b"):
        with pytest.raises(ValueError, match="public path"):
            PathRules([(bad, "x")])
    assert not PathRules([]) and RULES


def test_public_paths_stay_exact() -> None:
    """The gate's waiver must not widen: only requirements match leniently."""
    public = PublicPaths(["/static/*", "/favicon.ico"])
    assert public.matches("/static/app.js")
    assert not public.matches("/STATIC/app.js")
    assert not public.matches("/Favicon.ico")
    assert not public.matches("/favicon.ico/")


# ------------------------------------------------------------------ a real lenient upstream

#: Express routes (lower case, no trailing slash: Express answers every other spelling).
ROUTES = ["/export", "/api/analysis/run", "/reports/:id", "/api/search"]
ENV = {
    "FEATURE_RULES": "/export=export,/api/analysis/*=analysis,/reports/*=export,/api/*=search",
    "PUBLIC_PATHS": "/static/*",
}
#: (path as the attacker spells it, the Express route it reaches, the feature it needs).
PRO_PATHS = [
    ("/export", "/export", "export"),
    ("/EXPORT", "/export", "export"),
    ("/Export", "/export", "export"),
    ("/Export/", "/export", "export"),
    ("/export/", "/export", "export"),
    ("/api/analysis/run", "/api/analysis/run", "analysis"),
    ("/API/analysis/run", "/api/analysis/run", "analysis"),
    ("/api/Analysis/run", "/api/analysis/run", "analysis"),
    ("/api/analysis/run/", "/api/analysis/run", "analysis"),
    ("/reports/1", "/reports/:id", "export"),
    ("/Reports/1", "/reports/:id", "export"),
    ("/REPORTS/1/", "/reports/:id", "export"),
]
BASIC_PATHS = ["/api/search", "/API/Search", "/api/search/"]


async def test_express_routes_every_spelling() -> None:
    """The premise: the upstream answers all of them (else the gate tests prove nothing)."""
    async with running_express(ROUTES) as app, aiohttp.ClientSession() as client:
        for path, route, _ in PRO_PATHS:
            async with client.get(app + path) as resp:
                assert resp.status == 200, path
                assert (await resp.json())["route"] == route, path
        async with client.get(app + "/exports") as resp:
            assert resp.status == 404


async def test_basic_customer_is_refused_pro_routes_in_every_spelling(tmp_path: Path) -> None:
    async with (
        running_express(ROUTES) as app,
        tiers_stack(tmp_path, UPSTREAM_URL=app, **ENV) as stack,
        basic_and_pro(stack) as (basic, pro),
    ):
        for path in BASIC_PATHS:  # first: the remembered verdict must not answer for Pro paths
            for _ in range(2):
                async with basic.get(stack.url(path), headers=JSON) as resp:
                    assert resp.status == 200, path
                    assert (await resp.json())["features"] == "search"
        for path, route, feature in PRO_PATHS:
            async with basic.get(stack.url(path), headers=JSON) as resp:
                body = await resp.json()
                assert resp.status == 402, (path, body)
            assert (body["error"], body["feature"]) == ("feature_required", feature), path
            async with pro.get(stack.url(path), headers=JSON) as resp:
                assert resp.status == 200, path
                body = await resp.json()
            assert body["route"] == route
            assert body["features"] == "analysis,export,search"
        # Public paths stay exact: /STATIC/x is gated like any other path.
        async with stack.session() as anonymous:
            assert await status_of(anonymous, stack.url("/STATIC/x")) == 401


async def test_forward_auth_refuses_every_spelling(tmp_path: Path) -> None:
    async with (
        running_express(ROUTES) as app,
        tiers_stack(tmp_path, UPSTREAM_URL=app, **ENV) as stack,
        stack.session() as basic,
    ):
        await subscriber(stack, basic, "fa@example.com", BASIC)
        for header in ("X-Original-URI", "X-Forwarded-Uri"):
            mode = "" if header == "X-Original-URI" else "?mode=passthrough"
            for path, _, feature in PRO_PATHS:
                fa = {header: path, "X-Forwarded-Host": "app.example.com", **JSON}
                async with basic.get(stack.url(f"/_gate/auth{mode}"), headers=fa) as resp:
                    if mode:
                        assert resp.status == 402, path
                        assert (await resp.json())["feature"] == feature
                    else:
                        assert resp.status == 401, path
                        assert resp.headers["X-Gate-Denial"] == "feature_required"
            fa = {header: "/API/Search", "X-Forwarded-Host": "app.example.com"}
            async with basic.get(stack.url(f"/_gate/auth{mode}"), headers=fa) as resp:
                assert resp.status == 200
                assert resp.headers["X-Gate-Features"] == "search"


@pytest.mark.parametrize(
    "proxy",
    [running_shipped_nginx, running_shipped_caddy, running_shipped_traefik],
    ids=["nginx", "caddy", "traefik"],
)
async def test_behind_the_shipped_proxies(tmp_path: Path, proxy: ProxyRunner) -> None:
    """The shipped forward-auth examples in front of Express: the same refusals, and nginx's
    auth cache (keyed on the cookie, not the path) never answers a Pro spelling with a Basic
    customer's allow."""
    async with (
        running_express(ROUTES) as app,
        tiers_stack(tmp_path, UPSTREAM_URL=app, L1_TTL="30s", **ENV) as stack,
        stack.session() as basic,
        stack.session() as pro,
    ):
        app_port = int(app.rsplit(":", 1)[1])
        assert stack.gate_server.port is not None
        async with proxy(stack.gate_server.port, app_port) as base:
            await subscriber(stack, basic, "nb@example.com", BASIC)
            await subscriber(stack, pro, "np@example.com", PRO)
            for _ in range(2):
                async with basic.get(f"{base}/api/search", headers=JSON) as resp:
                    assert resp.status == 200
                for path, _, feature in PRO_PATHS:
                    async with basic.get(base + path, headers=JSON) as resp:
                        assert resp.status == 402, path
                        body = await resp.json()
                    assert body["error"] == "feature_required", path
                    assert f"feature={feature}&" in body["upgrade_url"], path
            for path, route, _ in PRO_PATHS:
                async with pro.get(base + path, headers=JSON) as resp:
                    assert resp.status == 200, path
                    assert (await resp.json())["route"] == route


async def test_websocket_upgrades_are_refused_in_every_spelling(tmp_path: Path) -> None:
    """tiers.ENV makes /ws Pro-only; the gate refuses the upgrade before the upstream (the
    demo's, case-sensitive: it would answer 404) is asked."""
    async with tiers_stack(tmp_path) as stack, basic_and_pro(stack) as (basic, pro):
        for path in ("/ws", "/WS", "/Ws/", "/ws/"):
            with pytest.raises(WSServerHandshakeError) as refused:
                async with basic.ws_connect(stack.url(path)):
                    pass
            assert refused.value.status == 402, path
        async with pro.ws_connect(stack.url("/ws")) as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=DEADLINE) == "hello"
