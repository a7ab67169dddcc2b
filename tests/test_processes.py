"""tests/processes.py, which the tests and the benchmarks start their processes with: a reported
port, a picked port tried again when it was taken, and stopping a whole process group."""

import os
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, eventually
from tests.processes import (
    Child,
    StartError,
    accepts,
    reported_port,
    spawn,
    start_on_free_port,
    stop,
)

ENV = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}


def python(tmp_path: Path, name: str, code: str) -> list[str]:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    return [sys.executable, str(script)]


def test_a_child_reports_the_port_it_bound(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tests.probes"]  # port 0: serve_app reports it
    child = spawn("upstream", argv, tmp_path / "upstream.log", env=ENV, cwd=ROOT)
    try:
        port = reported_port(child, 30.0)
        assert accepts(port)
    finally:
        stop(child)
    assert child.popen.returncode is not None


def test_a_child_that_exits_before_reporting_fails_with_its_output(tmp_path: Path) -> None:
    argv = python(tmp_path, "crash", 'print("no port for you"); raise SystemExit(3)')
    child = spawn("crash", argv, tmp_path / "crash.log", env=ENV)
    with pytest.raises(StartError, match=r"(?s)exited with code 3.*no port for you"):
        reported_port(child, 30.0)


def test_a_picked_port_taken_meanwhile_is_tried_again_on_another(tmp_path: Path) -> None:
    """As nginx does when another program took its port: the first start says the address is
    in use; the next one gets another port and listens."""
    taken = python(tmp_path, "taken", 'print("bind() to 127.0.0.1 failed (98: Address in use)")')
    attempts: list[int] = []

    def start(port: int) -> Child:
        attempts.append(port)
        if len(attempts) == 1:
            return spawn("proxy", taken, tmp_path / "proxy.log", env=ENV)
        argv = [sys.executable, "-m", "tests.probes", "--port", str(port)]
        return spawn("proxy", argv, tmp_path / "proxy.log", env=ENV, cwd=ROOT)

    child, port = start_on_free_port(start, 30.0)
    try:
        assert len(attempts) == 2 and port == attempts[1]
        assert accepts(port)
    finally:
        stop(child)


def test_any_other_failure_is_not_tried_again(tmp_path: Path) -> None:
    broken = python(tmp_path, "broken", 'print("unknown directive"); raise SystemExit(1)')
    attempts: list[int] = []

    def start(port: int) -> Child:
        attempts.append(port)
        return spawn("proxy", broken, tmp_path / "proxy.log", env=ENV)

    with pytest.raises(StartError, match="unknown directive"):
        start_on_free_port(start, 30.0)
    assert len(attempts) == 1


async def test_stop_ends_what_the_child_forked(tmp_path: Path) -> None:
    """A worker that outlives its parent (as the gate's and nginx's workers may) goes too."""
    pid_file = tmp_path / "grandchild.pid"
    argv = python(
        tmp_path,
        "forks",
        f"""
        import os, signal, time
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(600)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        time.sleep(600)
        """,
    )
    child = spawn("forks", argv, tmp_path / "forks.log", env=ENV)
    try:
        await eventually(lambda: pid_file.exists() and bool(pid_file.read_text()), "its pid")
    finally:
        stop(child, timeout=10.0)
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    # Killed, then reaped by init: gone from the process table, or a zombie on its way out.
    await eventually(
        lambda: not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z",
        "the grandchild killed",
    )
