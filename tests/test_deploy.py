"""The shipped deployment files: docker-compose passes every setting of the operator's ``.env``
to the gate (``env_file``), and the Kubernetes example is one replica on SQLite with an Ingress,
pointing to the PostgreSQL variant. ``tests/test_image.py`` runs the compose environment in the
built image's process (``test_every_setting_reaches_the_containers_process``)."""

import re
from pathlib import Path
from typing import Any

import yaml

from gateway.settings import TABLE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"

#: What compose's ``environment:`` may set over the ``.env`` for each gate service: the
#: compose network's app, the container's address and volume, the replicas' database.
COMPOSE_OWN = {
    "gateway": {"UPSTREAM_URL", "HOST", "PORT", "DATABASE_PATH"},
    "gate-1": {"UPSTREAM_URL", "HOST", "PORT", "PUBLIC_URL", "DATABASE_URL", "TRUSTED_PROXIES"},
}

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def compose_file() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${NAME}`` / ``${NAME:-default}`` (from ``--env-file``)."""
    return _VAR.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value)


def compose_env(
    service: str, dotenv: dict[str, str], image_env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment compose gives ``service``'s container (``docker compose --env-file
    ../.env up``): the image's ``ENV``, then each ``env_file`` (all of them the one ``.env``
    here, checked by the tests), then ``environment:`` (interpolated), which wins."""
    svc = compose_file()["services"][service]
    env = dict(image_env or {})
    for path in svc.get("env_file", []):
        assert (COMPOSE.parent / path).resolve() == ROOT / ".env", path
        env.update(dotenv)
    for name, value in (svc.get("environment") or {}).items():
        env[name] = interpolate(str(value), dotenv)
    return env


def every_setting() -> dict[str, str]:
    """A ``.env`` that sets every setting of the table to a value of its own."""
    return {spec.name: f"from-env-file-{spec.name.lower()}" for spec in TABLE}


def test_compose_gate_services_read_the_env_file() -> None:
    services = compose_file()["services"]
    for name, own in COMPOSE_OWN.items():
        svc = services[name]
        assert svc["env_file"] == ["../.env"], name
        environment = svc.get("environment") or {}
        # Only what compose decides itself; a `${STRIPE_SECRET_KEY:-}` copy of a setting
        # would blank the .env's value whenever compose runs without --env-file.
        assert set(environment) <= own, (name, set(environment) - own)
    for replica in ("gate-2", "gate-3"):  # the YAML anchor: the same as gate-1
        assert services[replica] == services["gate-1"]


def test_every_setting_of_the_env_file_reaches_the_gate_services() -> None:
    dotenv = {**every_setting(), "POSTGRES_PASSWORD": "pw"}
    for service, own in COMPOSE_OWN.items():
        env = compose_env(service, dotenv)
        missing = [s.name for s in TABLE if s.name not in own and env.get(s.name) != dotenv[s.name]]
        assert not missing, (service, missing)
        assert env["UPSTREAM_URL"] == "http://app:80"
    assert compose_env("gateway", dotenv)["DATABASE_PATH"] == "/data/gateway.sqlite3"
    assert (
        compose_env("gate-1", dotenv)["DATABASE_URL"] == "postgresql://gate:pw@postgres:5432/gate"
    )


def test_k8s_example_is_one_replica_on_sqlite_with_an_ingress() -> None:
    text = (DEPLOY / "k8s" / "gateway.yaml").read_text()
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    assert docs["Deployment"]["spec"]["replicas"] == 1
    assert "several replicas each with its own" not in text
    assert "gateway-replicas.yaml" in text  # where several replicas go
    ingress = docs["Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "gateway", "port": {"number": 80}}
    assert docs["Service"]["metadata"]["name"] == "gateway"


def test_deploy_files_name_readme_sections_that_exist() -> None:
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M))
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for section in re.findall(r'README "([^"]+)"', path.read_text()):
                assert section in headings, (path.name, section)
