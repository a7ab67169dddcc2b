"""Memory an nginx worker holds per open proxied WebSocket and per in-flight streaming request.

The shipped nginx examples (deploy/nginx/gateway-forward-auth.conf, deploy/nginx/replicas.conf)
proxy with ``proxy_buffering off`` and ``proxy_buffer_size 64k; proxy_buffers 4 64k;`` instead of
nginx's default ``proxy_buffer_size`` (4k on x86-64). This script measures what that costs, per
connection, in the one worker process, for both settings (``4k default`` and ``64k``) and four
cases:

- ``ws small``: N WebSockets held open, each after one 4-byte echo;
- ``ws 100 KiB``: the same, each after one 100 KiB message each way;
- ``stream small``: N streaming responses in flight, each after a small first chunk;
- ``stream 100 KiB``: the same with a 100 KiB first chunk.

How: one in-process aiohttp upstream on 127.0.0.1 (a WebSocket echo at ``/ws``; ``/slow`` sends
its headers and a first chunk, ``hello\\n`` plus 100 KiB with ``?big=1``, then waits until the
client goes away or 30 s). For every (config, case) a freshly started nginx (``worker_processes
1``, ``access_log off``, config and temp paths in a ``tempfile.mkdtemp()`` prefix: the main config
of tests/proxies.py, a free port on 127.0.0.1) gets one warm-up
WebSocket echo; then the worker's Rss and Pss are read from ``/proc/PID/smaps_rollup``, the N
connections are opened (50 at a time) and used once, and the memory is read again while all of
them are still open. Everything started is stopped at the end, also on errors, Ctrl-C and SIGTERM.

    .venv/bin/python bench/nginx_memory.py                    # 500 WebSockets, 200 streams
    .venv/bin/python bench/nginx_memory.py --websockets 200 --streams 100

Reading the table: ``before → with`` is the worker's memory in KiB with no client connection and
with the N connections open; ``per conn`` is the difference divided by N. Rss counts only the
pages written to: a proxied connection's ``proxy_buffer_size`` buffers (one for a stream, one per
direction for a WebSocket) cost a page or so while only small messages have passed, whatever the
setting; once a 100 KiB message or chunk has gone through, a 64k buffer is resident in full (and
stays so while the connection lives), a 4k one cannot grow. So expect the two settings to agree
on the small cases and on the 4k rows, and the 64k 100 KiB rows to be higher by about
64 - 4 KiB per buffer. Pss and Rss agree closely because the growth is the worker's private heap.
Numbers are for this machine's nginx build; compare rows with each other, not across machines.
"""

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from held import Held, open_many, raise_nofile
from procs import children

from tests.processes import Child, spawn, start_on_free_port, stop
from tests.proxies import write_nginx_config

BIG = 100 * 1024  # the "100 KiB" of the big cases
FIRST_CHUNK = b"hello\n"
SLOW_HOLD = 30.0  # how long /slow keeps a response open at most
OPEN_CONCURRENCY = 50  # connections being opened at once
MAX_COUNT = 1500  # bound for --websockets / --streams (nginx: 2 connections each, 4096 max)
SETTLE = 0.5  # seconds between the last connection opened and the memory reading


@dataclass(frozen=True)
class Config:
    """One nginx setting under test: ``directives`` go into the proxied location."""

    name: str
    directives: str


@dataclass(frozen=True)
class Case:
    """One kind of connection held open: a WebSocket (``ws``) or an in-flight stream."""

    name: str
    websocket: bool
    big: bool


@dataclass(frozen=True)
class Result:
    """The worker's memory (from smaps_rollup) before and with the connections open."""

    config: str
    case: str
    rss: Held
    pss: Held


CONFIGS = (
    Config("4k default", "# proxy_buffer_size: nginx's default (one memory page, 4k)"),
    Config("64k", "proxy_buffer_size 64k;\n            proxy_buffers 4 64k;"),
)
CASES = (
    Case("ws small", websocket=True, big=False),
    Case("ws 100 KiB", websocket=True, big=True),
    Case("stream small", websocket=False, big=False),
    Case("stream 100 KiB", websocket=False, big=True),
)

#: The site of every nginx here (tests/proxies.py writes the main config around it).
NGINX_SITE = """\
map $http_upgrade $connection_upgrade {{ "" ""; default upgrade; }}
upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
server {{
    listen 127.0.0.1:{port} backlog=2048;
    location / {{
        proxy_pass http://up;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_buffering off;
        proxy_read_timeout 1h;
        {directives}
    }}
}}
"""


# -- the upstream -------------------------------------------------------------------------------


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Echo every text and binary message back."""
    ws = web.WebSocketResponse(max_msg_size=4 * BIG)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def slow(request: web.Request) -> web.StreamResponse:
    """Headers and a first chunk, then nothing until the client goes away or SLOW_HOLD passes.

    The runner enables handler cancellation, so a client (nginx) closing the connection cancels
    this handler; that cancellation is how it ends early, and it propagates."""
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await resp.prepare(request)
    await resp.write(FIRST_CHUNK + (b"x" * BIG if request.query.get("big") else b""))
    await asyncio.sleep(SLOW_HOLD)
    await resp.write(b"bye\n")
    return resp


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[int]:
    """Run the upstream on a free 127.0.0.1 port; yields the port."""
    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()


# -- nginx --------------------------------------------------------------------------------------


def nginx_version(nginx: str) -> str:
    """``nginx version: nginx/1.x.y`` (nginx -v prints it on stderr)."""
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=True, timeout=10)
    return (out.stderr or out.stdout).strip()


def memory(pid: int) -> dict[str, int]:
    """Rss and Pss (KiB) of ``pid`` from /proc/PID/smaps_rollup."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0])
    return values


@contextlib.contextmanager
def nginx_running(
    nginx: str, prefix: Path, config: Config, upstream_port: int
) -> Iterator[tuple[int, int]]:
    """Start a fresh nginx for ``config`` in ``prefix`` on a free port (in its own process
    group: Ctrl-C reaches only us, and stopping it takes the master and its worker together);
    yields (port, worker pid)."""

    def start(port: int) -> Child:
        site = NGINX_SITE.format(
            upstream_port=upstream_port, port=port, directives=config.directives
        )
        argv = write_nginx_config(
            prefix,
            site,
            worker_connections=4096,
            access_log=False,
            error_level="warn",
            rlimit_nofile=8192,
        )
        return spawn("nginx", [nginx, *argv[1:]], prefix / "nginx.out")

    child, port = start_on_free_port(start, 10.0)
    try:
        workers = children(child.pid)
        if len(workers) != 1:
            raise RuntimeError(f"expected one nginx worker, found {workers}")
        yield port, workers[0]
    finally:
        stop(child)


# -- the measurement ----------------------------------------------------------------------------


async def open_websockets(
    session: aiohttp.ClientSession, url: str, n: int, big: bool
) -> list[aiohttp.ClientWebSocketResponse]:
    """Open ``n`` WebSockets, each used for one echo; returns them still open."""
    payload = b"x" * BIG if big else b"ping"

    async def one(_i: int) -> aiohttp.ClientWebSocketResponse:
        ws = await session.ws_connect(
            url + "/ws", max_msg_size=4 * BIG, autoping=False, heartbeat=None
        )
        await ws.send_bytes(payload)
        msg = await ws.receive(timeout=10)
        if msg.type != WSMsgType.BINARY or msg.data != payload:
            raise RuntimeError(f"bad echo: {msg.type} ({len(msg.data or b'')} bytes)")
        return ws

    return await open_many(n, one, OPEN_CONCURRENCY)


async def open_streams(
    session: aiohttp.ClientSession, url: str, n: int, big: bool
) -> list[aiohttp.ClientResponse]:
    """Start ``n`` /slow requests and read each one's first chunk; returns them in flight."""
    expected = FIRST_CHUNK + (b"x" * BIG if big else b"")

    async def one(_i: int) -> aiohttp.ClientResponse:
        resp = await session.get(url + ("/slow?big=1" if big else "/slow"))
        body = await asyncio.wait_for(resp.content.readexactly(len(expected)), 10)
        if resp.status != 200 or body != expected:
            raise RuntimeError(f"bad stream: {resp.status}, {len(body)} bytes")
        return resp

    return await open_many(n, one, OPEN_CONCURRENCY)


async def warm_up(session: aiohttp.ClientSession, url: str) -> None:
    """One WebSocket echo, so first-use allocations land in the baseline, not the per-conn."""
    async with session.ws_connect(url + "/ws") as ws:
        await ws.send_str("warm")
        msg = await ws.receive(timeout=10)
        if msg.data != "warm":
            raise RuntimeError(f"warm-up echo failed: {msg.type}")


async def measure(port: int, worker: int, config: Config, case: Case, n: int) -> Result:
    """Worker memory before and with ``n`` connections of ``case`` open through nginx."""
    url = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await warm_up(session, url)
        await asyncio.sleep(SETTLE)
        before = memory(worker)
        websockets: list[aiohttp.ClientWebSocketResponse] = []
        streams: list[aiohttp.ClientResponse] = []
        try:
            if case.websocket:
                websockets = await open_websockets(session, url, n, case.big)
            else:
                streams = await open_streams(session, url, n, case.big)
            await asyncio.sleep(SETTLE)
            loaded = memory(worker)
        finally:
            for resp in streams:
                resp.close()
            await asyncio.gather(*(ws.close() for ws in websockets))
    rss, pss = (Held(n, before[key], loaded[key]) for key in ("Rss", "Pss"))
    return Result(config.name, case.name, rss, pss)


async def run(nginx: str, websockets: int, streams: int) -> list[Result]:
    """Every (config, case), each on a freshly started nginx in a scratch prefix."""
    prefix = Path(tempfile.mkdtemp(prefix="nginx-memory-"))
    # nginx runs as root here with its worker as nobody: let the worker see the prefix.
    prefix.chmod(0o755)
    results = []
    try:
        async with upstream() as upstream_port:
            for config in CONFIGS:
                for case in CASES:
                    n = websockets if case.websocket else streams
                    with nginx_running(nginx, prefix, config, upstream_port) as (port, worker):
                        result = await measure(port, worker, config, case, n)
                    results.append(result)
                    print(f"  {config.name:10}  {case.name:14}  done", file=sys.stderr)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
    return results


def table(results: list[Result]) -> str:
    """The results as a markdown table."""
    lines = [
        "| config | case | N | Rss KiB before → with | Pss KiB before → with "
        "| Rss KiB / conn | Pss KiB / conn |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.case} | {r.rss.count} "
            f"| {r.rss.before} → {r.rss.loaded} | {r.pss.before} → {r.pss.loaded} "
            f"| {r.rss.per_conn:.1f} | {r.pss.per_conn:.1f} |"
        )
    return "\n".join(lines)


def count(text: str) -> int:
    """argparse type: a connection count in 1..MAX_COUNT."""
    value = int(text)
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_COUNT}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every measurement, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--websockets", type=count, default=500, help="WebSockets per ws case")
    parser.add_argument("--streams", type=count, default=200, help="streams per stream case")
    args = parser.parse_args(argv)

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("error: nginx not found (apt-get install nginx-light)", file=sys.stderr)
        return 1
    raise_nofile(2 * max(args.websockets, args.streams) + 256)  # both ends of each connection
    version = nginx_version(nginx)

    async def guarded() -> list[Result]:
        # SIGTERM cancels the run like Ctrl-C does, so every finally block stops what it started.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(nginx, args.websockets, args.streams)

    try:
        results = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{version}, worker_processes 1, proxy_buffering off\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
