"""The shipped multi-replica deployment files: ``deploy/nginx/replicas.conf`` run by a real
nginx in front of three gate processes on one PostgreSQL (round robin, any replica serves any
request, a sign-out on one holds through nginx), and the compose profile and the Kubernetes
variant say what the README promises (checked as text: no YAML parser is a dependency)."""

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.proxies import running_nginx
from tests.replicas import API, get_status, running_replicas, sign_out, subscribe, wait_for_log
from tests.shipped import assert_events_stream
from tests.shipped_configs import REPLICAS_EXAMPLE, nginx_replicas

pytestmark = pytest.mark.timeout(240)

DEADLINE = 5.0


def replicas_site(port: int, gate_ports: list[int]) -> str:
    """The shipped file with its `listen` line and the three `server gate-N:8080` addresses
    replaced by local ones; nothing else changes."""
    gates = [f"127.0.0.1:{gate_port}" for gate_port in gate_ports]
    return nginx_replicas(REPLICAS_EXAMPLE.read_text(), port=port, gates=gates)


async def test_nginx_round_robin_over_three_replicas(tmp_path: Path, pg_url: str) -> None:
    async with running_replicas(tmp_path, pg_url, env={"L1_TTL": "300s"}) as replicas:
        ports = [gate.port for gate in replicas.gates]
        cookie = await subscribe(replicas.gates[0], "lb@example.com")
        async with running_nginx(lambda port: replicas_site(port, ports)) as base:
            async with aiohttp.ClientSession() as client:
                statuses = [await get_status(base + API, cookie, client) for _ in range(30)]
            assert statuses == [200] * 30
            async with aiohttp.ClientSession(headers={"Cookie": cookie}) as client:
                await assert_events_stream(client, base)  # streams pass event by event
            for gate in replicas.gates:  # round robin: every replica served its share
                await wait_for_log(gate, "path=/api/search", DEADLINE, count=10)
            assert await sign_out(replicas.gates[1], cookie) == 303
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            async with aiohttp.ClientSession() as client:
                while True:
                    statuses = [await get_status(base + API, cookie, client) for _ in range(6)]
                    if statuses == [401] * 6 or loop.time() > deadline:
                        break
                    await asyncio.sleep(0.05)
            assert statuses == [401] * 6


def test_compose_profile_runs_postgres_three_replicas_and_nginx() -> None:
    text = (ROOT / "deploy" / "docker-compose.yml").read_text()
    for service in ("postgres:", "gate-1: &replica", "gate-2: *replica", "gate-3: *replica", "lb:"):
        assert f"\n  {service}" in text, service
    assert text.count("profiles: [replicas]") == 3  # postgres, the replica anchor, lb
    assert "DATABASE_URL: postgresql://gate:${POSTGRES_PASSWORD:-}@postgres:5432/gate" in text
    assert "./nginx/replicas.conf:/etc/nginx/conf.d/default.conf:ro" in text
    # the single-replica service is unchanged: same image, SQLite on the /data volume
    assert "\n  gateway:\n" in text and '"gate-data:/data"' in text


def test_k8s_variant_has_three_replicas_a_pdb_readiness_and_the_url_from_a_secret() -> None:
    text = (ROOT / "deploy" / "k8s" / "gateway-replicas.yaml").read_text()
    assert "replicas: 3" in text
    assert "kind: PodDisruptionBudget" in text and "minAvailable: 2" in text
    assert "readinessProbe:\n            httpGet: { path: /_gate/readyz, port: http }" in text
    assert "  DATABASE_URL: postgresql://" in text
    assert "envFrom: [{ secretRef: { name: gateway-replicas-secrets } }]" in text
    assert "runAsUser: 10001" in text
