"""FEATURE_RULES miss ``;`` path parameters, which Servlet containers (Tomcat,
Jetty, Undertow; so Spring, Quarkus, Keycloak-style apps) strip from every segment before they
route: ``/export;jsessionid=1`` *is* ``/export`` to them (Servlet spec, "path parameters";
Spring's ``UrlPathHelper.removeSemicolonContent`` defaults to true). The gate matches the rules
on the path with the parameters kept, so a Basic customer reaches Pro routes there.

The upstream here is a small aiohttp app that routes the way a Servlet container does (strips
``;…`` from each segment, then matches exactly) — no JVM is installed on the test machine. The
gate already knows the semantics: ``paths._segment_ok`` refuses ``..;`` for PUBLIC_PATHS
because "/static/..;/api is /api to Tomcat and friends"."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.path_rules import PathRules
from tests.tiers import BASIC, basic_and_pro, subscriber, tiers_stack

JSON = {"Accept": "application/json"}
ROUTES = {"/export", "/api/analysis/run", "/api/search"}
ENV = {"FEATURE_RULES": "/export=export,/api/analysis/*=analysis,/api/*=search"}


def servlet_path(raw: str) -> str:
    """The path a Servlet container maps: each segment without its ``;`` parameters."""
    path = raw.partition("?")[0]
    return "/".join(seg.split(";", 1)[0] for seg in path.split("/"))


@asynccontextmanager
async def routing_app(route_of: Callable[[str], str]) -> AsyncIterator[str]:
    """An upstream that answers ROUTES as ``route_of(raw path)`` names them (404 otherwise),
    with the features the gate sent."""

    async def handler(request: web.Request) -> web.StreamResponse:
        route = route_of(request.raw_path)
        if route not in ROUTES:
            return web.json_response({"route": None}, status=404)
        return web.json_response(
            {"route": route, "features": request.headers.get("X-Gate-Features", "")}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


#: (as the attacker spells it, the route the upstream answers)
PRO_SPELLINGS = [
    ("/export;jsessionid=1", "/export"),
    ("/export;", "/export"),
    ("/api;x/analysis/run", "/api/analysis/run"),
    ("/api/analysis;x/run", "/api/analysis/run"),
]


@pytest.mark.parametrize(("path", "route"), PRO_SPELLINGS)
async def test_basic_customer_is_refused_pro_routes_with_path_parameters(
    tmp_path: Path, path: str, route: str
) -> None:
    async with (
        routing_app(servlet_path) as app,
        tiers_stack(tmp_path, UPSTREAM_URL=app, **ENV) as stack,
        basic_and_pro(stack) as (basic, pro),
    ):
        async with pro.get(stack.url(path), headers=JSON) as resp:  # the premise
            assert resp.status == 200 and (await resp.json())["route"] == route
        async with basic.get(stack.url(path), headers=JSON) as resp:
            body = await resp.json()
            assert resp.status == 402, f"Basic customer got {resp.status} {body} on {path}"


# Rails: every `get "/export"` route takes an optional format suffix by default (`(.:format)`),
# so /export.json, /export.csv are the export action (Spring MVC before 5.3 matched suffixes
# the same way). The gate's exact pattern /export does not match them.
def rails_path(raw: str) -> str:
    path = raw.partition("?")[0]
    head, _, last = path.rpartition("/")
    return f"{head}/{last.split('.', 1)[0]}" if last else path


@pytest.mark.parametrize("path", ["/export.json", "/export.csv"])
async def test_basic_customer_is_refused_pro_routes_with_a_format_suffix(
    tmp_path: Path, path: str
) -> None:
    async with (
        routing_app(rails_path) as app,
        tiers_stack(tmp_path, UPSTREAM_URL=app, **ENV) as stack,
        stack.session() as basic,
    ):
        await subscriber(stack, basic, "basic@example.com", BASIC)
        async with basic.get(stack.url(path), headers=JSON) as resp:
            body = await resp.json()
            assert resp.status == 402, f"Basic customer got {resp.status} {body} on {path}"


RULES = [("/export", "export"), ("/api/analysis/*", "analysis"), ("/api/*", "search")]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/export;jsessionid=1", "export"),
        ("/EXPORT;x=1/", "export"),
        ("/export.json", "export"),
        ("/Export.CSV", "export"),
        ("/exportx", None),
        ("/export/x.json", None),
        ("/export.json/x", None),
        ("/.json", None),
        # the first rule in order that matches any spelling wins (not the first spelling)
        ("/api/analysis;x/run", "analysis"),
        ("/api;x/analysis/run", "analysis"),
        ("/api/analysis.json", "analysis"),
        ("/api/search;x", "search"),
    ],
)
def test_rules_match_path_parameters_and_format_suffixes(path: str, expected: str | None) -> None:
    assert PathRules(RULES).match(path) == expected
