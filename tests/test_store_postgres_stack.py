"""The whole gate on each store backend (real servers: upstream, Stripe double, gate and, for
``postgres``, a real PostgreSQL): the subscribe → pay → cancel → denied flow, a sign-in link
used once, ``/readyz`` while the database is away, and startup with a wrong ``DATABASE_URL``."""

import asyncio
import subprocess
from pathlib import Path

import pytest

from gateway.store import PostgresStore
from tests.conftest import closed_port, run_gate_once
from tests.postgres import PostgresServer
from tests.stack import (
    API_KEY,
    PRICES,
    SESSION_SECRET,
    follow_link,
    me,
    open_portal,
    portal_action,
    request_link,
    running_stack,
    status_of,
    subscribed,
)

pytestmark = pytest.mark.timeout(180)


async def test_subscribe_pay_cancel_denied(tmp_path: Path, database_env: dict[str, str]) -> None:
    async with running_stack(tmp_path, database_env) as stack, stack.session() as client:
        if "postgresql" in database_env["DATABASE_URL"]:
            assert isinstance(stack.services.store, PostgresStore)
        await subscribed(stack, client)
        assert await status_of(client, stack.url("/api/search?q=x")) == 200
        portal_url = await open_portal(stack, client)
        await portal_action(client, portal_url, "cancel-now")  # the webhook lands
        assert await status_of(client, stack.url("/api/search?q=x")) == 402
        assert (await me(stack, client))["status"] == "canceled"


async def test_sign_in_link_works_once(tmp_path: Path, database_env: dict[str, str]) -> None:
    async with running_stack(tmp_path, database_env) as stack:
        async with stack.session() as first:
            await subscribed(stack, first, "bob@example.com")
        async with stack.session() as device:
            await request_link(stack, device, "bob@example.com")
            _, link = stack.services.mailer.sent[-1]  # type: ignore[attr-defined]
            assert (await follow_link(stack, device, link)).status == 303
            assert await status_of(device, stack.url("/api/search?q=x")) == 200
        async with stack.session() as other:
            assert (await follow_link(stack, other, link)).status == 400


async def test_readyz_follows_the_database(
    tmp_path: Path, pg_url: str, pg_server: PostgresServer
) -> None:
    env = {"DATABASE_URL": pg_url}
    async with running_stack(tmp_path, env) as stack, stack.session() as client:
        await subscribed(stack, client)
        assert await status_of(client, stack.url("/_gate/readyz")) == 200
        await asyncio.to_thread(pg_server.stop)
        try:
            async with client.get(stack.url("/_gate/readyz")) as resp:
                assert resp.status == 503
                body = await resp.json()
            assert "unreachable" in body["checks"]["store"]
            # A paying user already in L1 keeps access while the database is away.
            assert await status_of(client, stack.url("/api/search?q=x")) == 200
        finally:
            await asyncio.to_thread(pg_server.start)
        assert await status_of(client, stack.url("/_gate/readyz")) == 200  # reconnected


def _serve(database_url: str) -> subprocess.CompletedProcess[str]:
    env = {
        "UPSTREAM_URL": "http://127.0.0.1:9",
        "BILLING_MODE": "on",
        "STRIPE_SECRET_KEY": API_KEY,
        "STRIPE_PRICE_IDS": PRICES,
        "SESSION_SECRET": SESSION_SECRET,
        "PUBLIC_URL": "http://127.0.0.1:8080",
        "PORT": "0",
        "DATABASE_URL": database_url,
    }
    return run_gate_once(["gateway", "serve"], env)


@pytest.mark.parametrize("wrong", ["port", "database", "user"])
def test_startup_with_a_wrong_database_url_is_one_line_exit_2(
    pg_server: PostgresServer, wrong: str
) -> None:
    if not pg_server.running:
        pg_server.start()
    port = pg_server.port
    if wrong == "port":
        port = closed_port()
    database = "no_such_db" if wrong == "database" else "postgres"
    user = "nobody" if wrong == "user" else "gate"
    done = _serve(f"postgresql://{user}:hunter2-pw@127.0.0.1:{port}/{database}")
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert message.count("\n") == 0, message
    assert message.startswith("gateway: DATABASE_URL=postgresql://")
    assert ":***@" in message and "hunter2-pw" not in done.stderr + done.stdout
