"""API keys on three gate processes sharing one PostgreSQL: a key created with the CLI works on
every replica; revoked on one (its account page), every other replica refuses it within the
bound (1 s; the deadline here is generous, the time it took is printed); the CLI's revoke
reaches them the same way; and no log line of any replica, nor the CLI's, holds the key.

``L1_TTL`` is 300 s, so only the key cache's own 1 s bound and the bus end a key elsewhere.
"""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.apikeys.format import KEY_PATTERN
from tests.replicas import HTML, Replicas, running_replicas, subscribe
from tests.stack import form_fields

pytestmark = pytest.mark.timeout(240)

DEADLINE = 5.0  # the bound is 1 s; a loaded machine gets slack


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", *args],
        env={**env, "LOG_LEVEL": "debug"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def status(url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def until_all(replicas: Replicas, key: str, want: int) -> float:
    started = time.monotonic()
    while True:
        got = [await status(g.url("/api/echo"), key) for g in replicas.gates]
        if all(s == want for s in got):
            return time.monotonic() - started
        assert time.monotonic() - started < DEADLINE, f"replicas answer {got}"
        await asyncio.sleep(0.02)


async def new_key(
    replicas: Replicas, email: str
) -> tuple[str, str, subprocess.CompletedProcess[str]]:
    made = await cli(replicas.env, "keys", "create", email, "--name", "job", "--json")
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    return out["key"], out["id"], made


async def test_revocation_reaches_every_replica_within_a_second(
    tmp_path: Path, pg_url: str
) -> None:
    async with running_replicas(tmp_path, pg_url, env={"L1_TTL": "300s"}) as replicas:
        cookie = await subscribe(replicas.gates[0], "keys@example.com")
        key, key_id, made = await new_key(replicas, "keys@example.com")
        await until_all(replicas, key, 200)
        # Revoked on replica 0's account page (its own CSRF token).
        headers = {"Cookie": cookie, **HTML}
        async with aiohttp.ClientSession() as browser:
            async with browser.get(replicas.gates[0].url("/_gate/account"), headers=headers) as r:
                form = form_fields(await r.text(), "/_gate/api-keys/revoke")
            assert form["key"] == key_id
            async with browser.post(
                replicas.gates[0].url("/_gate/api-keys/revoke"),
                data=form,
                headers=headers,
                allow_redirects=False,
            ) as resp:
                assert resp.status == 303
        took = await until_all(replicas, key, 401)
        print(f"page revoke refused on every replica after {took:.2f} s")
        # The CLI's revoke (another process) likewise.
        key2, key2_id, made2 = await new_key(replicas, "keys@example.com")
        await until_all(replicas, key2, 200)
        revoked = await cli(replicas.env, "keys", "revoke", key2_id)
        assert revoked.returncode == 0, revoked.stderr
        took = await until_all(replicas, key2, 401)
        print(f"CLI revoke refused on every replica after {took:.2f} s")
        # the log lines: every replica's, and the CLI's (its stdout is the key itself, once)
        logs = [g.log() for g in replicas.gates] + [made.stderr, made2.stderr, revoked.stderr]
        logs.append(revoked.stdout)
        for text in logs:
            assert key not in text and key2 not in text
        for text in [g.log() for g in replicas.gates]:
            assert not KEY_PATTERN.search(text)
