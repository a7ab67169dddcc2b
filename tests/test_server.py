"""Running the gate as real processes (workers, signals, exit codes) and its logging."""

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.logs import BufferedLineHandler, JsonFormatter, TextFormatter, log_event
from gateway.store import SQLiteStore
from tests.conftest import (
    ROOT,
    GateFactory,
    GateProcess,
    StartGate,
    Upstream,
    closed_port,
    gate_settings,
    run_gate_once,
    served,
    spawn_gate,
)
from tests.stack import API_KEY, PRICES, SESSION_SECRET


class Slow:
    """An upstream whose /slow answers only when the test says so."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/slow", self.slow)

    async def slow(self, request: web.Request) -> web.Response:
        self.started.set()
        await self.release.wait()
        return web.Response(text="late but complete")


@pytest.fixture
async def slow(upstream: Upstream) -> AsyncIterator[tuple[Slow, TestServer]]:
    async with served(upstream, Slow()) as both:
        yield both


async def wait_for_log(proc: GateProcess, needle: str, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while needle not in proc.log():
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{proc.log()}"
        await asyncio.sleep(0.02)


async def worker_pids(proc: GateProcess, want: int, attempts: int = 400) -> set[int]:
    """Ask /healthz over fresh connections until ``want`` distinct workers answered."""
    pids: set[int] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(attempts):
            async with session.get(proc.url("/_gate/healthz")) as resp:
                pids.add((await resp.json())["pid"])
            if len(pids) >= want:
                break
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_workers_share_one_port(
    slow: tuple[Slow, TestServer], gate_process: StartGate
) -> None:
    proc = await gate_process({"UPSTREAM_URL": f"http://127.0.0.1:{slow[1].port}", "WORKERS": "2"})
    pids = await worker_pids(proc, 2)
    assert len(pids) == 2
    assert proc.pid not in pids  # the parent only supervises


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_lets_in_flight_request_finish(
    slow: tuple[Slow, TestServer], gate_process: StartGate, workers: str
) -> None:
    s, server = slow
    proc = await gate_process(
        {
            "UPSTREAM_URL": f"http://127.0.0.1:{server.port}",
            "WORKERS": workers,
            "SHUTDOWN_TIMEOUT": "20s",
        }
    )
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.get(proc.url("/slow")))
        await asyncio.wait_for(s.started.wait(), 10)
        proc.proc.send_signal(signal.SIGTERM)
        await wait_for_log(proc, "event=stopping ")
        s.release.set()
        resp = await asyncio.wait_for(request, 10)
        assert resp.status == 200
        assert await resp.text() == "late but complete"
        resp.release()
    assert await proc.wait_exit(15) == 0, proc.log()
    assert "event=stopped" in proc.log()
    assert " event=request method=GET path=/slow status=200 " in proc.log()


async def test_dead_worker_stops_the_rest_with_nonzero_exit(
    slow: tuple[Slow, TestServer], gate_process: StartGate
) -> None:
    proc = await gate_process({"UPSTREAM_URL": f"http://127.0.0.1:{slow[1].port}", "WORKERS": "2"})
    victim, survivor = sorted(await worker_pids(proc, 2))
    os.kill(victim, signal.SIGKILL)
    assert await proc.wait_exit(20) == 1
    assert "event=worker_died" in proc.log()
    assert not alive(survivor)


async def test_port_in_use_is_a_one_line_error(gate_process: StartGate) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"UPSTREAM_URL": "http://127.0.0.1:9", "PORT": str(port)}
        proc = await gate_process(env, ready=False)
        assert await proc.wait_exit(15) == 1
    assert "event=bind_failed" in proc.log()
    assert "Traceback" not in proc.log()


def test_bad_settings_exit_2_with_one_line() -> None:
    done = run_gate_once(["gateway.server"], {"PORT": "nope"}, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "PORT" in done.stderr


async def test_json_logs_one_event_per_line(
    slow: tuple[Slow, TestServer], gate_process: StartGate
) -> None:
    proc = await gate_process(
        {"UPSTREAM_URL": f"http://127.0.0.1:{slow[1].port}", "LOG_FORMAT": "json"}
    )
    headers = {"X-Request-Id": "rid-7"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(proc.url("/nothing?token=secret"), headers=headers) as resp,
    ):
        assert resp.status == 404
    await wait_for_log(proc, '"rid-7"')
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait_exit(15) == 0
    events = [json.loads(line) for line in proc.log().splitlines() if line.strip()]
    access = [e for e in events if e["event"] == "request"]
    assert access == [
        {
            "ts": access[0]["ts"],
            "level": "info",
            "logger": "gateway.access",
            "event": "request",
            "method": "GET",
            "path": "/nothing",
            "status": 404,
            "ms": access[0]["ms"],
            "bytes": access[0]["bytes"],
            "rid": "rid-7",
            "ip": "127.0.0.1",
        }
    ]
    assert {"listening", "stopping", "stopped"} <= {e["event"] for e in events}


# ---- formatters (in-process)


def record_for(name: str, **fields: Any) -> logging.LogRecord:
    logger = logging.getLogger("test.logs")
    captured: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        log_event(logger, name, **fields)
    finally:
        logger.removeHandler(handler)
    return captured[0]


def test_text_format_quotes_and_redacts() -> None:
    record = record_for(
        "upstream_error",
        status=502,
        detail='refused "x"\nnext',
        token="s3cret",
        session_cookie="c",
        ts="shadow",
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.startswith("ts=")
    assert " level=info logger=test.logs event=upstream_error status=502 " in line
    assert 'detail="refused \\"x\\"\\nnext"' in line
    assert "token=<redacted>" in line and "s3cret" not in line
    assert "session_cookie=<redacted>" in line
    assert line.endswith(" ts_=shadow")


def test_json_format_and_exceptions_stay_one_line() -> None:
    logger = logging.getLogger("test.exc")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord(
            "test.exc", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = TextFormatter().format(record)
    assert "\n" not in text and "ValueError: boom" in text
    data = json.loads(JsonFormatter().format(record))
    assert data["event"] == "failed" and "ValueError: boom" in data["exc"]


async def test_access_log_record(
    gate: GateFactory, slow: tuple[Slow, TestServer], caplog: pytest.LogCaptureFixture
) -> None:
    client = await gate(gate_settings(f"http://127.0.0.1:{closed_port()}"))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        async with client.get("/x?secret=1", headers={"X-Request-Id": "abc"}) as resp:
            assert resp.status == 502
        async with client.get("/_gate/healthz") as resp:
            assert resp.status == 200
    lines = [TextFormatter().format(r) for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 2
    assert " method=GET path=/x status=502 " in lines[0]
    assert "rid=abc ip=127.0.0.1" in lines[0]
    assert "secret" not in lines[0]
    assert "rid=- ip=127.0.0.1" in lines[1]


async def test_access_log_can_be_turned_off(
    gate: GateFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await gate(gate_settings(f"http://127.0.0.1:{closed_port()}", access_log=False))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        async with client.get("/_gate/healthz") as resp:
            assert resp.status == 200
    assert not [r for r in caplog.records if r.name == "gateway.access"]


async def test_buffered_handler_batches_lines_and_flushes() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("test.buffered")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, "first")
        log_event(logger, "second")
        assert stream.getvalue() == ""  # waiting for the timer (inside an event loop)
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\n") < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        log_event(logger, "third")
        log_event(logger, "bad", level=logging.WARNING)  # urgent: written at once, in order
        lines = stream.getvalue().splitlines()
        assert [line.split("event=")[1].split()[0] for line in lines] == [
            "first",
            "second",
            "third",
            "bad",
        ]
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_buffered_handler_without_event_loop_writes_at_once() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream)
    handler.add_line("plain")
    assert stream.getvalue() == "plain\n"


# ---------------------------------------------------------------- startup on SQLite


def sqlite_billing_env(database: Mapping[str, str]) -> dict[str, str]:
    """Billing on (so the store is opened at startup), Stripe unreachable (never needed to
    start: the plan check is bounded and not fatal), ``database`` as DATABASE_PATH or _URL."""
    return {
        "UPSTREAM_URL": "http://127.0.0.1:9",
        "BILLING_MODE": "on",
        "STRIPE_SECRET_KEY": API_KEY,
        "STRIPE_API_BASE": f"http://127.0.0.1:{closed_port()}",
        "STRIPE_MAX_RETRIES": "0",
        "STRIPE_PRICE_IDS": PRICES,
        "SESSION_SECRET": SESSION_SECRET,
        "PUBLIC_URL": "http://127.0.0.1",
        **database,
    }


COLD_STARTS = 20
COLD_WORKERS = 4
COLD_BATCH = 4  # gates starting at once (each with COLD_WORKERS workers)


async def test_twenty_cold_starts_with_four_workers_all_become_ready(tmp_path: Path) -> None:
    """Each start on a new SQLite file: its workers used to switch the file to WAL at the same
    moment, and one could die of "database is locked" and stop the gate."""

    async def cold_start(i: int) -> None:
        env = sqlite_billing_env({"DATABASE_PATH": str(tmp_path / f"cold-{i}" / "gate.sqlite3")})
        (tmp_path / f"cold-{i}").mkdir()
        gate = await spawn_gate(
            {**env, "WORKERS": str(COLD_WORKERS)}, tmp_path / f"cold-{i}" / "gate.log"
        )
        try:
            await gate.wait_ready(deadline_s=60)
            # Every worker listens only once its store is open: all of them answer.
            assert len(await worker_pids(gate, COLD_WORKERS)) == COLD_WORKERS, gate.log()
            async with (
                aiohttp.ClientSession() as session,
                session.get(gate.url("/_gate/readyz")) as resp,
            ):
                assert resp.status == 200, await resp.text()
            assert gate.proc.returncode is None, gate.log()
            assert "database is locked" not in gate.log()
            assert "event=worker_died" not in gate.log()
        finally:
            await gate.kill_group()

    for start in range(0, COLD_STARTS, COLD_BATCH):
        await asyncio.wait_for(
            asyncio.gather(*(cold_start(i) for i in range(start, start + COLD_BATCH))), 180
        )


#: Runs its arguments in a private mount namespace with the paths after ``--ro`` bind-mounted
#: read-only over themselves: as root, where permissions never stop a write, this is what
#: makes SQLite really fail (a read-only volume, e.g. readOnlyRootFilesystem). The mounts end
#: with the process; nothing outside sees them.
_READ_ONLY = (
    'for p in "$@"; do [ "$p" = -- ] && break; '
    'mount --bind -o ro "$p" "$p" || exit 99; shift; done; shift; exec "$@"'
)


def run_with_read_only(
    paths: Sequence[Path], args: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` with ``env``, with ``paths`` read-only (see ``_READ_ONLY``)."""
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _READ_ONLY,
            "sh",
            *map(str, paths),
            "--",
            sys.executable,
            "-m",
            *args,
        ],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 99, f"could not mount read-only: {done.stderr}"
    return done


async def _made_database(path: Path) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    await store.close()


@pytest.mark.parametrize("entry", [["gateway"], ["gateway.server"]])
@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("read-only directory, new file", "DATABASE_PATH"),
        ("read-only directory, existing database", "DATABASE_PATH"),
        ("read-only file", "DATABASE_PATH"),
        ("read-only directory, new file", "DATABASE_URL"),
    ],
)
async def test_a_read_only_database_is_a_one_line_error_naming_the_setting(
    tmp_path: Path, entry: list[str], case: str, setting: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "gate.sqlite3"
    read_only = [folder]
    if case != "read-only directory, new file":
        await _made_database(db)  # left by an earlier run, then the volume became read-only
    if case == "read-only file":
        read_only = [db]  # the directory stays writable (-wal and -shm could be made)
    value = str(db) if setting == "DATABASE_PATH" else f"sqlite://{db}"
    done = run_with_read_only(read_only, entry, sqlite_billing_env({setting: value}))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"gateway: {setting}={value}: "), lines[0]
    assert "read-only" in lines[0] or "readonly" in lines[0], lines[0]
