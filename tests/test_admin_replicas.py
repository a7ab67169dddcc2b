"""``gateway grant`` and ``gateway revoke`` run from the CLI reach running replicas on
PostgreSQL through the replica bus, as a change made inside a replica does (the CLI builds its
services with the same :func:`gateway.services.open_services` as the server).

``L1_TTL`` is 300 s, so only the bus can make a replica change its answer within the deadline
(the bound is 1 s; the deadline is generous for a loaded machine: a wait, not a timing).
"""

from datetime import timedelta
from pathlib import Path

import pytest

from gateway.model import utcnow
from tests.conftest import run_gate_once
from tests.replicas import running_replicas, until_all
from tests.test_replicas import DEADLINE, LONG_L1, paying

pytestmark = pytest.mark.timeout(240)


def cli(env: dict[str, str], *args: str) -> str:
    proc = run_gate_once(["gateway", *args], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


async def test_cli_revoke_and_grant_reach_two_running_replicas(tmp_path: Path, pg_url: str) -> None:
    async with running_replicas(tmp_path, pg_url, count=2, env=LONG_L1) as replicas:
        cookie, _sub = await paying(replicas, "paid@example.com")
        out = cli(replicas.env, "revoke", "paid@example.com")
        assert "1 session signed out" in out
        took = await until_all(replicas, cookie, 401, DEADLINE)
        print(f"revoke reached both replicas in {took * 1000:.0f} ms")

        # A signed-in customer without a subscription: denied everywhere (and remembered),
        # then let in everywhere by a grant from the CLI.
        customer = replicas.double.create_customer("granted@example.com")["id"]
        unpaid = await replicas.new_session(customer, "granted@example.com")
        await until_all(replicas, unpaid, 402, DEADLINE)
        until = (utcnow() + timedelta(days=30)).date().isoformat()
        assert "granted" in cli(replicas.env, "grant", customer, "--until", until)
        took = await until_all(replicas, unpaid, 200, DEADLINE)
        print(f"grant reached both replicas in {took * 1000:.0f} ms")
