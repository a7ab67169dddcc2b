"""How many open WebSockets (and SSE streams) one gate worker holds, and what each costs.

Streamlit runs each browser tab over one long-lived WebSocket, so a worker serves as many
people as it holds sockets. For each N (``--counts``, default 1,000, 5,000, 10,000) this opens N
WebSockets through a billing-on gate (paying users known by a trusted identity header, 100
users, so every socket is watched and re-checked like a signed-in user's), and reports:

- ``open s``: time to open all N (``OPEN_CONCURRENCY`` handshakes at a time, each followed by
  one echo);
- ``gate RSS``: the gate's resident memory (all its processes: ``WORKERS=2`` counts both
  workers and the supervisor) after a warm-up socket, and with the N open; ``KiB/socket`` is
  the difference over N;
- ``echo p50/p99``: round trips of a 16-byte message on ``--sample`` sockets picked at random,
  one at a time, while all N stay open;
- ``WORKERS=2``: the same through two workers (the kernel spreads the connections);
- ``SSE``: N streamed responses held open instead (``/sse`` sends an event every 10 s);
- ``recheck``: with the largest N open on one worker and ``WS_RECHECK_INTERVAL`` = ``--recheck``
  seconds, the gate's CPU seconds (utime + stime from ``/proc``) over ``--recheck-window``
  seconds, against the same window with re-checks off (``WS_RECHECK_INTERVAL=0``): the cost of
  one round over every socket; then one user's subscription is canceled in the Stripe double
  (which sends the signed webhook) and the time until each of that user's sockets is closed
  with ``4402`` is reported (max over their sockets).

Everything runs on 127.0.0.1: the gate as ``python -m gateway.server`` (its descriptor limit
raised; ``MAX_CONNECTIONS``/``MAX_WEBSOCKETS`` set to fit N), the upstream (an echo WebSocket
and an SSE route) as a second process of this script, the Stripe double and the clients in this
process. Bounded: at most ``MAX_COUNT`` sockets, every wait has a deadline, everything started is
stopped at the end (also on errors and Ctrl-C).

    .venv/bin/python bench/ws_capacity.py                      # about 3 minutes
    .venv/bin/python bench/ws_capacity.py --counts 1000 --skip-workers2 --skip-sse
"""

import argparse
import asyncio
import contextlib
import os
import random
import re
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
from aiohttp import WSMsgType, web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from held import Held, open_many, raise_nofile  # noqa: E402
from procs import group_cpu_seconds, group_rss_kib  # noqa: E402

from gateway.demo.stripe_double import StripeDouble  # noqa: E402
from gateway.limits import connection_budget  # noqa: E402
from tests.processes import Child, reported_port, serve_app, spawn, stop  # noqa: E402

API_KEY = "sk_test_wscapacity"
WEBHOOK_SECRET = "whsec_wscapacity"
PRICE = "price_demo_monthly"
USERS = 100
OPEN_CONCURRENCY = 200
MAX_COUNT = 12_000
SSE_EVERY = 10.0
IDENTITY = "X-Forwarded-Email"

C = TypeVar("C")


# ------------------------------------------------------------------ the upstream (a process)


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


async def sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    i = 0
    with contextlib.suppress(ConnectionError):
        while True:
            await resp.write(f"id: {i}\ndata: tick\n\n".encode())
            i += 1
            await asyncio.sleep(SSE_EVERY)
    return resp


def serve_upstream() -> None:
    """The upstream process: on a port of its own, reported (``port_chosen``)."""
    raise_nofile()
    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/sse", sse)
    serve_app(app, backlog=1024, access_log=None)


# ------------------------------------------------------------------ processes


def one_worker_fit() -> int:
    """The most sockets one worker can hold under this machine's hard limit: two descriptors
    each (client and upstream) after the gate's reserve (gateway/limits.py)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return MAX_COUNT
    return connection_budget(hard)


def start(name: str, cmd: Sequence[str], env: dict[str, str], logs: Path) -> Child:
    """``cmd`` in its own process group, its descriptor limit raised (tests/processes.py)."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    return spawn(name, cmd, logs / f"{name}.log", env=env, cwd=ROOT, preexec_fn=raise_nofile)


async def port_of(child: Child) -> int:
    """The port ``child`` reported, once it accepts there."""
    return await asyncio.to_thread(reported_port, child, 30.0)


# ------------------------------------------------------------------ the stack


@dataclass
class Stack:
    double: StripeDouble
    upstream_port: int  # once it reported its port
    emails: list[str]
    subscriptions: dict[str, str]  # email -> subscription id
    logs: Path
    tmp: Path
    started: list[Child] = field(default_factory=list)

    def gate_env(self, count: int, workers: int, recheck: float) -> dict[str, str]:
        return {
            "UPSTREAM_URL": f"http://127.0.0.1:{self.upstream_port}",
            "BILLING_MODE": "on",
            "STRIPE_SECRET_KEY": API_KEY,
            "STRIPE_API_BASE": self.double.public_url,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_PRICE_IDS": PRICE,
            "SESSION_SECRET": "w" * 48,
            "COOKIE_SECURE": "false",
            "ALLOWED_HOSTS": "127.0.0.1:*",
            "IDENTITY_HEADER": IDENTITY,
            "DATABASE_PATH": str(self.tmp / f"gate-{time.monotonic_ns()}.sqlite3"),
            "WORKERS": str(workers),
            "MAX_CONNECTIONS": str(count + 500),
            "MAX_WEBSOCKETS": str(count + 100),
            "MAX_WEBSOCKETS_PER_USER": str(count),
            "WS_RECHECK_INTERVAL": f"{int(recheck)}s",
            "ACCESS_LOG": "false",
            "LOG_LEVEL": "warning",
        }

    @contextlib.asynccontextmanager
    async def gate(self, count: int, workers: int = 1, recheck: float = 0) -> AsyncIterator[str]:
        env = {**self.gate_env(count, workers, recheck), "HOST": "127.0.0.1", "PORT": "0"}
        name = f"gate-n{count}-w{workers}-r{recheck:g}"
        proc = start(name, [sys.executable, "-m", "gateway.server"], env, self.logs)
        self.started.append(proc)
        try:
            port = await port_of(proc)
            self.double.webhook_urls = [f"http://127.0.0.1:{port}/_gate/webhooks/stripe"]
            yield f"127.0.0.1:{port}"
        finally:
            self.double.webhook_urls = []
            await asyncio.to_thread(stop, proc)
            self.started.remove(proc)


@contextlib.asynccontextmanager
async def stack(logs: Path) -> AsyncIterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="ws-capacity-"))
    double = StripeDouble(api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)
    emails = [f"user{i}@wscapacity.test" for i in range(USERS)]
    subscriptions = {}
    for email in emails:
        customer = double.create_customer(email)
        subscriptions[email] = double.create_subscription(customer["id"], PRICE)["id"]
    runner = web.AppRunner(double.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    double.public_url = f"http://127.0.0.1:{port}"
    upstream = start("upstream", [sys.executable, __file__, "--serve-upstream"], {}, logs)
    st = Stack(double, 0, emails, subscriptions, logs, tmp, [upstream])
    try:
        st.upstream_port = await port_of(upstream)
        yield st
    finally:
        for proc in list(st.started):
            await asyncio.to_thread(stop, proc)
        await runner.cleanup()


# ------------------------------------------------------------------ clients


def headers_for(i: int, emails: list[str]) -> dict[str, str]:
    return {IDENTITY: emails[i % len(emails)]}


async def open_websockets(
    client: aiohttp.ClientSession, addr: str, count: int, emails: list[str]
) -> list[aiohttp.ClientWebSocketResponse]:
    async def one(i: int) -> aiohttp.ClientWebSocketResponse:
        ws = await client.ws_connect(f"http://{addr}/ws", headers=headers_for(i, emails))
        await ws.send_str("hi")
        msg = await ws.receive(timeout=60)
        if msg.data != "hi":
            raise RuntimeError(f"socket {i}: {msg}")
        return ws

    return await open_many(count, one, OPEN_CONCURRENCY)


async def open_streams(
    client: aiohttp.ClientSession, addr: str, count: int, emails: list[str]
) -> list[aiohttp.ClientResponse]:
    async def one(i: int) -> aiohttp.ClientResponse:
        headers = {**headers_for(i, emails), "Accept": "text/event-stream"}
        resp = await client.get(f"http://{addr}/sse", headers=headers)
        if resp.status != 200:
            raise RuntimeError(f"stream {i}: {resp.status} {await resp.text()}")
        await resp.content.readline()
        return resp

    return await open_many(count, one, OPEN_CONCURRENCY)


async def echo_latencies(
    sockets: list[aiohttp.ClientWebSocketResponse], sample: int
) -> list[float]:
    rtts = []
    for ws in random.sample(sockets, min(sample, len(sockets))):
        start = time.perf_counter()
        await ws.send_str("0123456789abcdef")
        msg = await ws.receive(timeout=30)
        rtts.append((time.perf_counter() - start) * 1000)
        if msg.data != "0123456789abcdef":
            raise RuntimeError(f"echo: {msg}")
    return rtts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Row:
    kind: str
    workers: int
    open_s: float
    rss: Held  # the gate's, all its processes
    p50: float | None = None
    p99: float | None = None


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
    )


async def held(
    pgid: int, open_all: Callable[[], Awaitable[list[C]]]
) -> tuple[list[C], float, Held]:
    """Open the connections ``open_all`` makes; them, the seconds that took and the gate's
    RSS before and with them."""
    await asyncio.sleep(0.5)
    before = group_rss_kib(pgid)
    start = time.monotonic()
    conns = await open_all()
    open_s = time.monotonic() - start
    await asyncio.sleep(0.5)
    return conns, open_s, Held(len(conns), before, group_rss_kib(pgid))


async def measure_ws(st: Stack, count: int, workers: int, sample: int) -> Row:
    async with st.gate(count, workers) as addr, client_session() as client:
        # One socket per user first (their identities resolved, the code paths warm), closed
        # again so that N fit under the cap.
        warm = await open_websockets(client, addr, len(st.emails), st.emails)
        await asyncio.gather(*(ws.close() for ws in warm))
        pgid = st.started[-1].popen.pid
        sockets, open_s, rss = await held(
            pgid, lambda: open_websockets(client, addr, count, st.emails)
        )
        rtts = await echo_latencies(sockets, sample)
        await asyncio.gather(*(ws.close() for ws in sockets))
        return Row("websocket", workers, open_s, rss, pct(rtts, 0.5), pct(rtts, 0.99))


async def measure_sse(st: Stack, count: int) -> Row:
    async with st.gate(count) as addr, client_session() as client:
        for resp in await open_streams(client, addr, len(st.emails), st.emails):
            resp.close()
        pgid = st.started[-1].popen.pid
        streams, open_s, rss = await held(
            pgid, lambda: open_streams(client, addr, count, st.emails)
        )
        for resp in streams:
            resp.close()
        return Row("sse", 1, open_s, rss)


@dataclass
class Recheck:
    count: int
    interval: float
    window: float
    cpu_with: float
    cpu_without: float
    cancel_s: float
    victims: int

    @property
    def per_round(self) -> float:
        rounds = self.window / self.interval
        return (self.cpu_with - self.cpu_without) / rounds


async def idle_cpu(
    st: Stack, count: int, recheck: float, window: float, cancel: bool
) -> tuple[float, float, int]:
    async with st.gate(count, 1, recheck) as addr, client_session() as client:
        pgid = st.started[-1].popen.pid
        sockets = await open_websockets(client, addr, count, st.emails)
        await asyncio.sleep(min(recheck or 1.0, 5.0))  # the first spread round starts
        before = group_cpu_seconds(pgid)
        await asyncio.sleep(window)
        used = group_cpu_seconds(pgid) - before
        cancel_s, victims = 0.0, 0
        if cancel:
            victim = st.emails[7]
            mine = [ws for i, ws in enumerate(sockets) if i % len(st.emails) == 7]
            start = time.monotonic()
            await st.double.cancel_subscription(st.subscriptions[victim])
            closes = await asyncio.gather(*(ws.receive(timeout=30) for ws in mine))
            cancel_s = time.monotonic() - start
            bad = [m for m in closes if m.type is not WSMsgType.CLOSE or m.data != 4402]
            if bad:
                raise RuntimeError(f"victim sockets not closed with 4402: {bad[:3]}")
            victims = len(mine)
        await asyncio.gather(*(ws.close() for ws in sockets))
        return used, cancel_s, victims


async def measure_recheck(st: Stack, count: int, interval: float, window: float) -> Recheck:
    without, _, _ = await idle_cpu(st, count, 0, window, cancel=False)
    with_, cancel_s, victims = await idle_cpu(st, count, interval, window, cancel=True)
    return Recheck(count, interval, window, with_, without, cancel_s, victims)


# ------------------------------------------------------------------ report


SECTION = "ws-capacity"


def write_section(path: Path, report: str) -> None:
    """Put ``report`` into ``path`` between this script's markers (bench/bench.py keeps them
    when it rewrites the file), replacing the previous run's."""
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    block = f"\n{start}\n{report.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"\n{re.escape(start)}\n.*?\n{re.escape(end)}\n", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text + block
    path.write_text(text)


def render(rows: list[Row], recheck: Recheck | None, argv: list[str]) -> str:
    import aiohttp as _a

    lines = [
        "## WebSocket and SSE capacity (`bench/ws_capacity.py`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; nproc={os.cpu_count()}; "
        f"python {sys.version.split()[0]}, aiohttp {_a.__version__}",
        f"- run: `{' '.join(['bench/ws_capacity.py', *argv])}`; billing on, "
        f"{USERS} paying users by trusted identity header, every socket watched",
        "- gate RSS = all of the gate's processes; clients, upstream and Stripe double share the "
        "same 2 cores",
        "",
        "| kind | N | workers | open s | gate RSS before → with N (MiB) | KiB / conn "
        "| echo p50 ms | echo p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        p50 = f"{r.p50:.2f}" if r.p50 is not None else "-"
        p99 = f"{r.p99:.2f}" if r.p99 is not None else "-"
        rss = f"{r.rss.before / 1024:.0f} → {r.rss.loaded / 1024:.0f}"
        lines.append(
            f"| {r.kind} | {r.rss.count:,} | {r.workers} | {r.open_s:.1f} | {rss} | "
            f"{r.rss.per_conn:.1f} | {p50} | {p99} |"
        )
    if recheck is not None:
        lines += [
            "",
            f"Re-check with {recheck.count:,} sockets open on one worker, "
            f"`WS_RECHECK_INTERVAL={recheck.interval:g}s`, over {recheck.window:g} s: gate CPU "
            f"{recheck.cpu_with:.2f} s (re-checks off: {recheck.cpu_without:.2f} s), so "
            f"**{recheck.per_round:.2f} CPU s per round over every socket** "
            f"({recheck.per_round / recheck.count * 1e6:.0f} µs per socket; at the default 30 s "
            f"interval {recheck.per_round / 30 * 100:.1f} % of one core). A cancellation "
            f"(webhook from the double) closed all {recheck.victims} of the user's sockets with "
            f"4402 within **{recheck.cancel_s * 1000:.0f} ms**.",
        ]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> str:
    logs = ROOT / "bench" / "out" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    recheck = None
    async with stack(logs) as st:
        for count in args.counts:
            rows.append(await measure_ws(st, count, 1, args.sample))
            print(rows[-1], flush=True)
        if not args.skip_workers2:
            rows.append(await measure_ws(st, args.workers2_count, 2, args.sample))
            print(rows[-1], flush=True)
        if not args.skip_sse:
            rows.append(await measure_sse(st, max(args.counts)))
            print(rows[-1], flush=True)
        if not args.skip_recheck:
            recheck = await measure_recheck(st, max(args.counts), args.recheck, args.recheck_window)
            print(recheck, flush=True)
    return render(rows, recheck, args.argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--counts",
        type=int,
        nargs="+",
        help="socket counts for one worker (default: 1,000, 5,000 and 10,000 or as many as "
        "the hard descriptor limit allows one worker); SSE and the re-check use the largest",
    )
    parser.add_argument("--workers2-count", type=int, default=10_000, help="sockets with WORKERS=2")
    parser.add_argument("--sample", type=int, default=500, help="echo round trips measured")
    parser.add_argument("--recheck", type=int, default=5, help="WS_RECHECK_INTERVAL, s")
    parser.add_argument("--recheck-window", type=float, default=20.0)
    parser.add_argument("--skip-workers2", action="store_true")
    parser.add_argument("--skip-sse", action="store_true")
    parser.add_argument("--skip-recheck", action="store_true")
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "RESULTS.md",
        help="the section is written into this file (replacing its previous one)",
    )
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream()
        return 0
    raise_nofile()
    if args.counts is None:
        args.counts = [1000, 5000, min(10_000, one_worker_fit() - 2 * USERS)]
    if max(*args.counts, args.workers2_count) > MAX_COUNT:
        parser.error(f"--counts: at most {MAX_COUNT}")
    args.argv = argv
    report = asyncio.run(run(args))
    print(report)
    write_section(args.results, report)
    print(f"written to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
