"""Shared fixtures: gate settings, an in-process gate in front of a test upstream, and a gate
running as a real subprocess (for RSS, workers and signals)."""

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.server import runner_kwargs
from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


#: Where :func:`make_settings` points the gate unless told otherwise (nothing listens there).
NO_UPSTREAM = "http://127.0.0.1:9"


def make_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings built the way the gate builds them: the table's defaults, ``env`` (raw
    strings, as from the environment) and typed ``overrides``, through :func:`load_settings`
    and its consistency checks. ``UPSTREAM_URL`` defaults to :data:`NO_UPSTREAM`."""
    return load_settings({"UPSTREAM_URL": NO_UPSTREAM, **(env or {})}, **overrides)


def gate_settings(upstream: TestServer | str, **overrides: Any) -> Settings:
    """Billing-off settings pointing at ``upstream`` (a test server or a base URL)."""
    url = upstream if isinstance(upstream, str) else f"http://127.0.0.1:{upstream.port}"
    return make_settings({"UPSTREAM_URL": url, "BILLING_MODE": "off"}, **overrides)


GateFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def gate(aiohttp_client: Any) -> GateFactory:
    """``await gate(settings, gate=hook, extra_setup=fn, **client_kwargs)``: the gate app
    (``create_app``) served with the production runner options on a real port."""

    async def make(settings: Settings, **kwargs: Any) -> TestClient[web.Request, web.Application]:
        app = create_app(settings, kwargs.pop("extra_setup", None), gate=kwargs.pop("gate", None))
        server = TestServer(app)
        # Started here: TestServer ignores runner options given to its constructor.
        await server.start_server(**runner_kwargs(settings))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(server, **kwargs)
        return client

    return make


@pytest.fixture
def upstream(aiohttp_server: Any) -> Callable[[web.Application], Awaitable[TestServer]]:
    """``await upstream(app)``: a real upstream app on 127.0.0.1."""

    async def make(app: web.Application) -> TestServer:
        server: TestServer = await aiohttp_server(app)
        return server

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class GateProcess:
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, deadline_s: float = 20.0) -> None:
        """Poll the port (no fixed sleeps) until it accepts connections."""
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"gate exited with {self.proc.returncode}:\n{self.log()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"gate not listening:\n{self.log()}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


StartGate = Callable[..., Awaitable[GateProcess]]


@pytest.fixture
async def gate_process(
    tmp_path: Path,
) -> AsyncIterator[StartGate]:
    """``await gate_process(env)``: ``python -m gateway.server`` with ``env`` (on a free port
    unless ``env`` has PORT), once it accepts connections (``ready=False``: right away)."""
    started: list[GateProcess] = []

    async def start(env: Mapping[str, str], *, ready: bool = True) -> GateProcess:
        port = int(env["PORT"]) if "PORT" in env else free_port()
        log_path = tmp_path / f"gate-{port}.log"
        full_env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "BILLING_MODE": "off",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            **env,
        }
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.server",
                env=full_env,
                cwd=ROOT,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own process group: teardown reaps workers too
            )
        gp = GateProcess(proc, port, log_path)
        started.append(gp)
        if ready:
            await gp.wait_ready()
        return gp

    yield start
    for gp in started:
        # Whatever is left of the group (parent or orphaned workers) is ours to kill.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gp.pid, signal.SIGKILL)
        await gp.proc.wait()
