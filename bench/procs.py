"""The benchmark's processes: the harness (:class:`Bench`) every target gets, which starts each
process in its own process group with a log in ``bench/out/logs``, learns its port and stops
everything at the end; and reading, from /proc, a process's children and its group's CPU time
and memory, and the gate's counters.

Ports and processes are :mod:`tests.processes`, shared with the tests: a Python child (the gate
with ``PORT=0``, the upstream, the bare proxy, the Stripe double) binds port 0 and reports the
port it got; nginx and Caddy get a port picked for them and are started again on another one if
it was taken in between (:func:`tests.processes.start_on_free_port`, the only place with that
race).
"""

import contextlib
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.processes import (
    Child,
    StartError,
    reported_port,
    spawn,
    start_on_free_port,
    stop,
)

__all__ = [
    "BENCH_DIR",
    "OUT_DIR",
    "REPO",
    "Bench",
    "StartError",
    "children",
    "gate_auth_answers",
    "group_cpu_seconds",
    "group_pids",
    "group_rss_kib",
]

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
OUT_DIR = BENCH_DIR / "out"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_FA_METRIC = re.compile(r"^gate_forward_auth_responses_total\{[^}]*\}\s+([\d.e+]+)$", re.MULTILINE)


class Bench:
    """What targets get from the harness: a scratch dir, the upstream, ``spawn``."""

    def __init__(self, workdir: Path, logdir: Path) -> None:
        self.workdir = workdir
        self.logdir = logdir
        self.python = sys.executable
        self.upstream_url = ""
        self.children: list[Child] = []

    def base_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        # Works whether or not the project is pip-installed in the venv (and for tests.*).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        log_path = self.logdir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        # A scratch cwd: no stray .env is loaded, no database lands in the repo.
        return spawn(name, command, log_path, env=self.base_env(env), cwd=self.workdir)

    def spawn(self, name: str, command: list[str], env: dict[str, str], timeout: float) -> int:
        """Start ``command``, which binds port 0 and reports the port (the gate with
        ``PORT=0``, the helpers with ``--port 0``); its port, once it accepts there."""
        child = self._spawn(name, command, env)
        self.children.append(child)
        return reported_port(child, timeout)

    def spawn_on_free_port(
        self, name: str, command: Callable[[int], list[str]], env: dict[str, str], timeout: float
    ) -> int:
        """Start ``command(port)`` (nginx, Caddy: they cannot report a port of their own; the
        callable writes the config for ``port``) on a free port; the port, once it accepts."""
        child, port = start_on_free_port(
            lambda port: self._spawn(name, command(port), env), timeout
        )
        self.children.append(child)
        return port

    def child(self, name: str) -> Child:
        """The running process started as ``name``."""
        found = next((c for c in self.children if c.name == name), None)
        if found is None:
            raise RuntimeError(f"{name} is not running")
        return found

    def stop(self, name: str) -> None:
        for child in [c for c in self.children if c.name == name]:
            stop(child)
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            stop(child)
        self.children.clear()


def _processes() -> Iterator[tuple[int, list[str]]]:
    """Every live process: its pid and the fields of /proc/PID/stat after ``pid (comm)``:
    state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ..."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        yield int(stat.parent.name), fields


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (works without CONFIG_PROC_CHILDREN)."""
    return [child for child, fields in _processes() if int(fields[1]) == pid]


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (a target and its workers: each is
    started in its own group)."""
    return [pid for pid, fields in _processes() if int(fields[2]) == pgid]


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``."""
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _processes() if int(f[2]) == pgid)
    return ticks / CLOCK_TICKS


def group_rss_kib(pgid: int) -> int:
    """Resident memory (KiB, VmRSS) of every live process in process group ``pgid``."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:  # gone meanwhile
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def gate_auth_answers(gate_url: str) -> float:
    """Forward-auth answers the gate has given so far (its /_gate/metrics, asked directly)."""
    with urllib.request.urlopen(gate_url + "/_gate/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(n) for n in _FA_METRIC.findall(text))
