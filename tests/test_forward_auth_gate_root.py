"""forward auth answers 200 (no check) for the original URI ``/_gate`` — the bare
prefix, with any query — because it counts as a gate path; but the shipped Caddyfile and
Traefik example route only ``/_gate/*`` to the gate, so ``/_gate`` goes to the *app*, with no
identity and no decision. The gate's own proxy gates the same path (401). An app with a
catch-all or parameter route (``/:page``, an SPA fallback, a CMS slug) answers anyone there.
Fails on main: Express answers 200 to an anonymous client through Caddy and Traefik."""

from pathlib import Path

import aiohttp
import pytest

from tests.express import running_express
from tests.shipped import ProxyRunner, running_shipped_caddy, running_shipped_traefik
from tests.tiers import tiers_stack

JSON = {"Accept": "application/json"}


@pytest.mark.parametrize(
    "proxy", [running_shipped_caddy, running_shipped_traefik], ids=["caddy", "traefik"]
)
async def test_anonymous_never_reaches_the_app_at_the_bare_gate_prefix(
    tmp_path: Path, proxy: ProxyRunner
) -> None:
    async with (
        running_express(["/:page", "/:page/:sub", "/api/search"]) as app,
        tiers_stack(tmp_path, UPSTREAM_URL=app) as stack,
    ):
        app_port = int(app.rsplit(":", 1)[1])
        assert stack.gate_server.port is not None
        async with proxy(stack.gate_server.port, app_port) as base, aiohttp.ClientSession() as c:
            async with c.get(base + "/anything", headers=JSON) as resp:
                assert resp.status == 401  # the control: the app's route is gated
            got = {}
            for path in ("/_gate", "/_gate?x=1", "/%5Fgate"):
                async with c.get(base + path, headers=JSON, allow_redirects=False) as resp:
                    got[path] = (resp.status, (await resp.text())[:80])
            assert all(status == 401 for status, _ in got.values()), got
