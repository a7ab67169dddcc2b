"""The container image: built from the repository's Dockerfile with podman (on a debootstrap
stand-in for ``python:3.11-slim``, cached between runs; wheels built on the host), then the gate
started from the image's filesystem as the image's user, in front of a real upstream and the
Stripe double on 127.0.0.1. See ``tests/images.py`` and TESTING.md ("Container images")."""

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.settings import TABLE
from tests import images
from tests.processes import Child, spawn, start_on_free_port
from tests.stack import (
    billing_env,
    echoed_headers,
    pay_as_browser,
    upstream_and_double,
)
from tests.test_deploy import compose_env

#: Settings an image must never carry (they are given at run time).
SECRET_SETTINGS = ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "SESSION_SECRET")


@dataclass
class BuiltImage:
    tag: str
    info: dict[str, Any]
    rootfs: Path
    data: Path  # the host directory mounted at /data (a named volume's stand-in)
    uid: int
    gid: int

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.info["Config"]
        return config

    @property
    def env(self) -> dict[str, str]:
        return images.image_env(self.config)


@contextlib.contextmanager
def _mount(source: str, target: Path, *options: str) -> Iterator[None]:
    images.run(["mount", *options, source, target])
    try:
        yield
    finally:
        images.run(["umount", target])


@pytest.fixture(scope="module")
def image() -> Iterator[BuiltImage]:
    """The image, built once for this module, its filesystem mounted with what a container
    runtime adds (/proc, /dev, a volume at /data owned by the image's user)."""
    missing = images.missing_tools()
    assert not missing, f"install {' '.join(missing)} (scripts/test does: apt-get install)"
    assert images.is_root(), "building and chrooting into the image needs root"
    base = images.ensure_base()
    tag = f"localhost/gateway-test:{os.getpid()}-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="gate-image-") as scratch:
        wheelhouse = images.build_wheelhouse(Path(scratch) / "wheels")
        images.build_image(tag, base, wheelhouse)
        try:
            info = images.inspect_image(tag)
            with images.mounted(tag) as rootfs:
                user = info["Config"].get("User") or "root"
                uid, gid = images.user_ids(rootfs, user)
                data = Path(scratch) / "data"
                data.mkdir()
                os.chown(data, uid, gid)  # as docker does for a new named volume
                with (
                    _mount("/dev", rootfs / "dev", "--bind"),
                    _mount("proc", rootfs / "proc", "-t", "proc"),
                    _mount(str(data), rootfs / "data", "--bind"),
                ):
                    yield BuiltImage(tag, info, rootfs, data, uid, gid)
        finally:
            images.remove_image(tag)


def test_image_metadata(image: BuiltImage) -> None:
    config = image.config
    assert config["Entrypoint"] == ["gateway"]
    assert image.uid != 0 and image.gid != 0, config.get("User")
    assert "/data" in (config.get("Volumes") or {})
    assert Path(image.env["DATABASE_PATH"]).parent == Path("/data")
    assert "8080/tcp" in (config.get("ExposedPorts") or {})
    assert not [name for name in SECRET_SETTINGS if name in image.env]
    labels = config["Labels"]
    version = tomllib.loads(Path(images.ROOT, "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.title"] == "gateway"
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert images.healthcheck_argv(image.info)[0] == "/opt/gate/bin/python"  # no curl in slim
    # The venv is in the image, the build's wheels and sources are not.
    assert (image.rootfs / "opt/gate/bin/gateway").exists()
    assert not (image.rootfs / "wheels").exists()
    assert not (image.rootfs / "src").exists()


@dataclass
class ImageGate:
    """The gate started from the image: its process, port and environment."""

    child: Child
    port: int
    env: dict[str, str]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self) -> int:
        """SIGTERM, as a container runtime stops it; its exit code."""
        if self.child.popen.poll() is None:
            self.child.popen.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.child.popen.wait, 45)


async def gate_from_image(
    image: BuiltImage, log_path: Path, argv: list[str], env_for: Callable[[int], dict[str, str]]
) -> ImageGate:
    """``argv`` run from the image as its user with the environment ``env_for(port)``, once it
    accepts on ``port``. PORT must be known up front (the HEALTHCHECK and PUBLIC_URL read the
    same PORT as the gate), so it is picked (:func:`tests.processes.start_on_free_port`: the
    gate exits with ``bind_failed`` if another program took it, then it starts on another)."""
    envs: dict[int, dict[str, str]] = {}

    def start(port: int) -> Child:
        envs[port] = env_for(port)
        cmd = images.chroot_cmd(image.rootfs, image.uid, image.gid, argv)
        return spawn("gate", cmd, log_path, env=envs[port])

    child, port = await asyncio.to_thread(start_on_free_port, start, 30.0)
    return ImageGate(child, port, envs[port])


def _healthcheck(image: BuiltImage, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, run inside the image as its user with the
    container's environment (what the runtime does every interval)."""
    argv = images.healthcheck_argv(image.info)
    cmd = images.chroot_cmd(image.rootfs, image.uid, image.gid, argv)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, check=False)


async def test_gate_runs_from_image(image: BuiltImage, tmp_path: Path) -> None:
    async with upstream_and_double() as (upstream, double, _double_server):

        def env_for(port: int) -> dict[str, str]:
            return images.environ_for(
                image.env,
                {
                    # what an operator passes with `docker run -e` (no DATABASE_PATH: the default)
                    **billing_env(upstream, double),
                    "PORT": str(port),
                    "HOST": "127.0.0.1",
                    "PUBLIC_URL": f"http://127.0.0.1:{port}",
                    "PUBLIC_PATHS": "/api/echo",
                },
            )

        argv = [*image.config["Entrypoint"], "serve"]
        gate = await gate_from_image(image, tmp_path / "gate.log", argv, env_for)
        env = gate.env
        try:
            uid = images.proc_uid(gate.child.pid)
            assert uid == image.uid != 0, f"gate runs as uid {uid}"

            async with aiohttp.ClientSession() as client:
                async with client.get(gate.url("/_gate/healthz")) as resp:
                    assert resp.status == 200, await resp.text()
                async with client.get(gate.url("/api/echo?from=image")) as resp:
                    assert resp.status == 200, await resp.text()
                    body = await resp.json()
                assert body["path"] == "/api/echo?from=image"
                assert "x-forwarded-for" in echoed_headers(body)
                # Billing is on: the app itself is behind the subscription.
                async with client.get(
                    gate.url("/"), allow_redirects=False, headers={"Accept": "text/html"}
                ) as resp:
                    assert resp.status != 200, "unpaid request reached the app"
            # A subscriber gets through: checkout on the double, the gate records it in /data.
            double.webhook_urls = [gate.url("/_gate/webhooks/stripe")]
            jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP host
            async with aiohttp.ClientSession(cookie_jar=jar) as browser:
                await pay_as_browser(browser, gate.url, "image@example.com")
                async with browser.get(gate.url("/api/search?q=battery")) as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["query"] == "battery"

            database = image.data / Path(env["DATABASE_PATH"]).name
            assert database.is_file(), sorted(p.name for p in image.data.iterdir())
            assert database.stat().st_uid == image.uid

            ok = _healthcheck(image, env)
            assert ok.returncode == 0, ok.stderr
        finally:
            assert await gate.stop() == 0, gate.child.log()
        down = _healthcheck(image, env)
        assert down.returncode != 0, "healthcheck passed with the gate stopped"


def _compose_dotenv(port: int, billing: dict[str, str]) -> dict[str, str]:
    """An operator's ``.env`` that sets every setting of the table: a value the gate starts
    with, not its default where one is easy to tell apart (empty where it must stay unset)."""
    chosen = {
        **billing,
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "APP_NAME": "ComposeApp",
        "TRIAL_DAYS": "3",
        "ALLOW_PROMOTION_CODES": "true",
        "FEATURE_RULES": "/export=export",
        "SMTP_HOST": "smtp.invalid",  # only contacted when a sign-in link is sent
        "SMTP_FROM": "gate@example.com",
        "LOGIN_RATE_LIMIT": "7",
        "LOG_FORMAT": "json",
        "CACHE_TTL": "30m",
    }
    unset = {"ALLOWED_HOSTS", "DATABASE_URL", "IDENTITY_HEADER", "PRICE_FEATURES"}
    return {s.name: chosen.get(s.name, "" if s.name in unset else s.default) for s in TABLE}


async def test_every_setting_reaches_the_containers_process(
    image: BuiltImage, tmp_path: Path
) -> None:
    """deploy/docker-compose.yml's `gateway` service (`env_file: ../.env`): every setting of
    the table in the operator's .env is in the gate process's environment inside the image, and
    the gate uses them (APP_NAME on its page). Compose's own `environment:` lines win (the app
    service, 0.0.0.0:8080, /data); on this host the test stands in for compose's network with
    the real upstream and a free port."""
    async with upstream_and_double() as (upstream, double, _double_server):
        dotenvs: dict[int, dict[str, str]] = {}

        def env_for(port: int) -> dict[str, str]:
            dotenv = dotenvs[port] = _compose_dotenv(port, billing_env(upstream, double))
            env = compose_env("gateway", dotenv, image.env)
            assert env["UPSTREAM_URL"] == "http://app:80" and env["PORT"] == "8080"
            env.update({"UPSTREAM_URL": dotenv["UPSTREAM_URL"], "PORT": str(port)})
            return images.environ_for(env, {})

        gate = await gate_from_image(image, tmp_path / "gate.log", ["gateway", "serve"], env_for)
        dotenv = dotenvs[gate.port]
        try:
            raw = Path(f"/proc/{gate.child.pid}/environ").read_bytes()
            seen = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
            own = {"UPSTREAM_URL", "PORT", "HOST", "DATABASE_PATH"}  # compose's (and the test's)
            wrong = {
                s.name: seen.get(s.name)
                for s in TABLE
                if s.name not in own and seen.get(s.name) != dotenv[s.name]
            }
            assert not wrong, wrong
            assert (seen["HOST"], seen["DATABASE_PATH"]) == ("0.0.0.0", "/data/gateway.sqlite3")
            async with (
                aiohttp.ClientSession() as client,
                client.get(gate.url("/_gate/subscribe"), headers={"Accept": "text/html"}) as resp,
            ):
                page = await resp.text()
            assert resp.status == 200 and "ComposeApp" in page and "3-day free trial" in page
            assert '"logger"' in gate.child.log()  # LOG_FORMAT=json from the .env
        finally:
            assert await gate.stop() == 0, gate.child.log()
