"""Child processes for the tests and the benchmarks: start one in its own process group, learn
the port it listens on, wait until it accepts connections, stop it and whatever it forked.

A port is never picked by binding a socket, closing it and handing the number over (another
program may take it in between). A child that can bind port 0 does so and reports the port it
got on its output: the gate's ``port_chosen`` line (``PORT=0``), which the Python helpers here
print too (:func:`serve_app`); :func:`reported_port` reads it. nginx, Caddy, Traefik and
PostgreSQL cannot: :func:`start_on_free_port` is the one place that picks a port for a child,
and it closes that race by starting again on another port when the child could not bind it.

Everything here blocks (``subprocess``, polling with a deadline); async callers run it with
``asyncio.to_thread``.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = [
    "BIND_FAILURE",
    "PORT_LINE",
    "Child",
    "StartError",
    "accepts",
    "port_line",
    "reported_port",
    "serve_app",
    "spawn",
    "start_on_free_port",
    "stop",
    "wait_for_port",
]

#: The gate's ``port_chosen`` log line, as text (``event=port_chosen port=8123``) or JSON.
PORT_LINE = re.compile(r"port_chosen\W+port\W+(\d+)")
#: What nginx, Caddy, Traefik, PostgreSQL and the gate say when their port is taken.
BIND_FAILURE = re.compile(
    r"address already in use|bind\(\) to .* failed|could not bind|bind_failed", re.I
)
#: Attempts of :func:`start_on_free_port` (each one lost only to another program's bind).
ATTEMPTS = 5
_POLL = 0.05  # seconds between two looks at a child: a poll interval, not a readiness guess


class StartError(RuntimeError):
    """A child exited, or did not listen in time; the message ends with its output's tail."""


@dataclass
class Child:
    """A started child: its ``popen`` (the leader of its own process group) and its output."""

    name: str
    popen: "subprocess.Popen[bytes]"
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def failed(self, why: str) -> StartError:
        return StartError(f"{self.name}: {why}\n{self.log_tail(40)}".rstrip())


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    append: bool = False,
    **popen: Any,
) -> Child:
    """Start ``argv`` in a new session (its own process group: :func:`stop` reaches everything
    it forks), stdout and stderr into ``log_path`` (emptied first unless ``append``), stdin
    from /dev/null. ``popen``: more ``subprocess.Popen`` arguments (``user``, ``preexec_fn``...)."""
    with log_path.open("ab" if append else "wb") as log:  # the child keeps its own copy
        process = subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )
    return Child(name, process, log_path)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts a TCP connection on ``host:port`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(child: Child, port: int, timeout: float, host: str = "127.0.0.1") -> None:
    """Until ``child`` accepts on ``port``; :class:`StartError` if it exits or ``timeout``
    seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        code = child.popen.poll()
        if code is not None:
            raise child.failed(f"exited with code {code}")
        if accepts(port, host):
            return
        if time.monotonic() > deadline:
            raise child.failed(f"port {port} not open after {timeout:.0f} s")
        time.sleep(_POLL)


def port_line(text: str) -> int | None:
    """The port of the first ``port_chosen`` line in ``text``, or None."""
    match = PORT_LINE.search(text)
    return int(match.group(1)) if match else None


def reported_port(child: Child, timeout: float, host: str = "127.0.0.1") -> int:
    """The port ``child`` bound (port 0) and reported in its ``port_chosen`` line, once it
    accepts connections there."""
    deadline = time.monotonic() + timeout
    while (port := port_line(child.log())) is None:
        code = child.popen.poll()
        if code is not None:
            raise child.failed(f"exited with code {code} before it reported its port")
        if time.monotonic() > deadline:
            raise child.failed(f"no port_chosen line after {timeout:.0f} s")
        time.sleep(_POLL)
    wait_for_port(child, port, max(deadline - time.monotonic(), 1.0), host)
    return port


def start_on_free_port(start: Callable[[int], Child], timeout: float) -> tuple[Child, int]:
    """``start(port)`` on a free port, once it accepts there: for the children that cannot
    bind port 0 and say which port they got (nginx, Caddy, Traefik, PostgreSQL).

    The only place here with the bind-close-reuse race: the port is free when picked, and
    another program may bind it before the child does. Then the child exits saying the
    address is in use (:data:`BIND_FAILURE`), and it is started again on another port."""
    for _ in range(ATTEMPTS):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        child = start(port)
        try:
            wait_for_port(child, port, timeout)
        except StartError:
            stop(child)
            if BIND_FAILURE.search(child.log()):
                continue
            raise
        return child, port
    raise StartError(f"no free port taken in {ATTEMPTS} attempts")


def stop(child: Child, timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``timeout`` seconds (or
    at once for forked workers that outlived their parent), and reap the child."""
    if child.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.popen.wait()


def serve_app(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backlog: int = 128,  # web.run_app's own default
    **run_app: Any,
) -> None:
    """``web.run_app`` on a socket bound here, its port reported first (a ``port_chosen``
    line on stdout, as the gate logs it): the Python helpers of the tests and benchmarks
    listen on port 0 this way. ``run_app``: more ``web.run_app`` arguments."""
    sock = socket.create_server((host, port), backlog=backlog)
    print(f"event=port_chosen port={sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, print=None, **run_app)
