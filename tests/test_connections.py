"""Bounded connections on a real gate process (``gateway.connections``): started with a
1,024-descriptor limit (the systemd default), it keeps answering healthz and a paying user while
1,100 idle or slow-header connections are held; with every connection busy a new one gets a
fast 503; slow heads and idle keep-alive connections are closed after their timeouts.

Everything is on 127.0.0.1; raw sockets are bounded in number (1,100) and every wait is a
deadline, never a timed assertion.
"""

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.connections import ConnectionLimiter, LimitedSite, client_key
from gateway.demo.upstream import create_upstream_app
from gateway.limits import PROBE_SLOTS, RETRY_AFTER, connection_budget, plan_limits
from gateway.server import runner_kwargs
from tests.conftest import NO_UPSTREAM, GateProcess, Hold, make_settings, spawn_gate
from tests.conftest import eventually as wait_until
from tests.stack import (
    billing_env,
    subscribed_cookie,
    upstream_and_double,
)

NOFILE = 1024
ATTACK = 1100
DEADLINE = 30.0
HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # never finished


def _nofile_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@contextlib.asynccontextmanager
async def gate_with_1024_fds(tmp_path: Path, env: Mapping[str, str]) -> AsyncIterator[GateProcess]:
    """``python -m gateway.server`` with RLIMIT_NOFILE soft = hard = 1,024, once listening
    (on PORT=0: the port is read from its ``port_chosen`` line, as ``gate_process`` does)."""
    log_path = tmp_path / f"gate-{time.monotonic_ns()}.log"
    env = {"LOG_LEVEL": "info", **env}
    gate = await spawn_gate(env, log_path, preexec_fn=_nofile_limit)
    try:
        await gate.wait_ready()
        yield gate
    finally:
        await gate.kill_group()


@contextlib.asynccontextmanager
async def billing_gate(
    tmp_path: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[GateProcess, Hold]]:
    """Demo upstream (plus ``/hold``) and the Stripe double in this process, the gate with
    billing on as a 1,024-descriptor subprocess in front of them."""
    hold = Hold()
    app = create_upstream_app()
    app.router.add_get("/hold", hold.handler)
    async with upstream_and_double(app) as (upstream, double, _double_server):
        gate_env = {
            **billing_env(upstream, double),
            "ALLOWED_HOSTS": "127.0.0.1:*",  # required with billing on (Host-header poisoning)
            "DATABASE_PATH": str(tmp_path / "gate.sqlite3"),
            "STRIPE_MAX_RETRIES": "0",
            **(env or {}),
        }
        try:
            async with gate_with_1024_fds(tmp_path, gate_env) as gate:
                double.webhook_urls = [gate.url("/_gate/webhooks/stripe")]
                yield gate, hold
        finally:
            hold.release.set()


async def subscribe(gate: GateProcess, email: str) -> str:
    """Pay on the double the way a browser does; returns the ``Cookie`` header it ends with."""
    return await subscribed_cookie(gate.url, email)


async def fresh_get(gate: GateProcess, path: str, headers: Mapping[str, str]) -> int:
    """Status of one GET on a new connection; a hang fails at the deadline."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as client,
        client.get(gate.url(path), headers=headers, allow_redirects=False) as resp,
    ):
        await resp.read()
        return resp.status


@contextlib.contextmanager
def raw_sockets() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def connect_many(port: int, count: int, first: bytes, into: list[socket.socket]) -> None:
    """Open ``count`` connections to ``port`` (100 at a time) and send ``first`` on each."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        sock = socket.socket()
        into.append(sock)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        if first:
            await loop.sock_sendall(sock, first)

    async def all_of_them() -> None:
        for start in range(0, count, 100):
            await asyncio.gather(*(one() for _ in range(min(100, count - start))))

    await asyncio.wait_for(all_of_them(), 4 * DEADLINE)


def readable(sock: socket.socket) -> bool:
    """The gate sent something, or closed."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the gate sends until it closes the connection (bounded by DEADLINE)."""
    loop = asyncio.get_running_loop()
    data = b""

    async def read() -> None:
        nonlocal data
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk

    await asyncio.wait_for(read(), DEADLINE)
    return data


async def eventually(check: Callable[[], bool], what: str) -> None:
    """conftest's :func:`~tests.conftest.eventually` with this module's ``DEADLINE``."""
    await wait_until(check, what, DEADLINE)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(autouse=True)
def enough_descriptors_here() -> None:
    """This process holds 1,100 sockets plus the servers': raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = ATTACK + 2 * NOFILE
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, f"RLIMIT_NOFILE hard {hard} < {need}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


# ---------------------------------------------------------------- descriptor exhaustion


async def test_1100_idle_and_slow_header_connections_do_not_lock_out_healthz_or_a_payer(
    tmp_path: Path,
) -> None:
    # Long timeouts: here only the connection cap stands between the attacker and the gate.
    env = {"HEADER_TIMEOUT": "600s", "KEEPALIVE_TIMEOUT": "600s"}
    async with billing_gate(tmp_path, env) as (gate, _):
        cap = connection_budget(NOFILE)
        assert f"event=limits nofile={NOFILE} " in gate.log()
        assert f"max_connections={cap} " in gate.log()
        cookie = await subscribe(gate, "payer@example.com")
        paying = {**JSON, "Cookie": cookie}
        assert await fresh_get(gate, "/api/search?q=x", paying) == 200
        # What a started gate uses besides client connections fits the reserve's base.
        assert fd_count(gate.pid) < 64

        with raw_sockets() as socks:
            await connect_many(gate.port, ATTACK // 2, SLOW_HEAD, socks)
            await connect_many(gate.port, ATTACK - ATTACK // 2, b"", socks)
            assert len(socks) == ATTACK

            assert await fresh_get(gate, "/_gate/healthz", JSON) == 200
            assert await fresh_get(gate, "/api/search?q=x", paying) == 200
            assert await fresh_get(gate, "/_gate/healthz", JSON) == 200

            # The gate held at most its cap of them and closed the longest-idle rest.
            await eventually(
                lambda: sum(map(closed_by_peer, socks)) >= ATTACK - cap,
                f"the gate to close all but {cap} of the idle connections",
            )
            assert sum(not closed_by_peer(s) for s in socks) <= cap
        log = gate.log()
        assert "event=connections_at_limit" in log
        assert "Too many open files" not in log
        assert "out of system resource" not in log


async def answer_on_new_connection(port: int, request: bytes) -> list[str]:
    """Send ``request`` on a new raw connection; the head lines of what comes back before the
    gate closes it."""
    with socket.socket() as sock:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        answer = await read_until_closed(sock)
    return answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")


async def test_with_every_connection_busy_probes_are_answered_and_the_rest_get_a_fast_503(
    tmp_path: Path,
) -> None:
    async with billing_gate(tmp_path) as (gate, hold):
        cap = connection_budget(NOFILE)  # the automatic cap for 1,024 descriptors: 400
        cookie = await subscribe(gate, "streamer@example.com")
        paying = {**JSON, "Cookie": cookie}
        busy = f"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode()
        with raw_sockets() as socks:
            # Every slot a proxied request in progress: two descriptors each, still < 1,024.
            await connect_many(gate.port, cap, busy, socks)
            await eventually(lambda: hold.in_flight == cap, f"{cap} requests in progress")

            # A probe still gets its answer (on a probe slot); anything else a fast 503.
            assert await fresh_get(gate, "/_gate/healthz", JSON) == 200
            assert await fresh_get(gate, "/_gate/readyz", JSON) == 200
            request = b"GET /api/search?q=x HTTP/1.1\r\nHost: x\r\n\r\n"
            head = await answer_on_new_connection(gate.port, request)
            assert head[0] == "HTTP/1.1 503 Service Unavailable"
            assert f"Retry-After: {RETRY_AFTER}" in head
            assert "Connection: close" in head
            assert await fresh_get(gate, "/api/search?q=x", paying) == 503  # any client parses it

            # With the probe slots held too (connections that send nothing), the 503 is
            # written at once, without reading the request.
            with raw_sockets() as slots:
                await connect_many(gate.port, PROBE_SLOTS, b"", slots)
                request = b"GET /_gate/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                head = await answer_on_new_connection(gate.port, request)
                assert head[0] == "HTTP/1.1 503 Service Unavailable"
                assert f"Retry-After: {RETRY_AFTER}" in head
            # ... and they are short-lived: PROBE_HEADER_TIMEOUT frees the slots for probes.
            assert await fresh_get(gate, "/_gate/healthz", JSON) == 200
            assert hold.in_flight == cap  # nobody in progress was dropped for the newcomers

            for sock in socks[:10]:
                sock.close()
            del socks[:10]
            await eventually(lambda: hold.in_flight == cap - 10, "the closed requests to end")
            assert await fresh_get(gate, "/_gate/healthz", JSON) == 200
            assert await fresh_get(gate, "/api/search?q=x", paying) == 200
        assert "event=connections_at_limit" in gate.log()
        assert "refused=" in gate.log()


# ---------------------------------------------------------------- trickled bodies

TRICKLERS = 420
#: A loopback address of its own for the attacker (not in TRUSTED_PROXIES, which is
#: 127.0.0.1 by default), so the per-IP cap sees it as one client, and the probe and the payer
#: (from 127.0.0.1) as others.
ATTACKER_IP = "127.0.0.2"
#: A full head for a body just under aiohttp's 1 MiB client_max_size: the webhook endpoint,
#: open to anyone, reads the whole body before it checks the signature.
TRICKLE_HEAD = (
    b"POST /_gate/webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1048000\r\n\r\n{"
)


class Trickler:
    """``count`` raw connections from ``source`` that each send ``head`` and then one more
    byte every ``interval`` seconds; each one the gate closes is opened again half an interval
    later (the attacker keeps its connections) until :meth:`stop_reopening`. Records what the
    gate answered on each closed connection."""

    def __init__(self, port: int, source: str, head: bytes, interval: float) -> None:
        self.port, self.source, self.head, self.interval = port, source, head, interval
        self.answers: list[bytes] = []  # one per connection the gate closed
        self.open = 0
        self._reopen = True
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, count: int) -> None:
        """Open ``count`` connections (100 at a time), each with its head sent."""
        for first in range(0, count, 100):
            connected = [asyncio.Event() for _ in range(min(100, count - first))]
            self._tasks += [asyncio.create_task(self._slot(ev)) for ev in connected]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in connected)), DEADLINE)

    def stop_reopening(self) -> None:
        self._reopen = False

    async def _slot(self, connected: asyncio.Event) -> None:
        while True:
            self.answers.append(await self._one(connected))
            if not self._reopen:
                return
            await asyncio.sleep(self.interval / 2)  # a persistent attacker, not a flood

    async def _one(self, connected: asyncio.Event) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""

        async def read() -> None:
            nonlocal data
            with contextlib.suppress(ConnectionError):
                while chunk := await loop.sock_recv(sock, 65536):
                    data += chunk

        with socket.socket() as sock:
            sock.setblocking(False)
            sock.bind((self.source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            self.open += 1
            try:
                with contextlib.suppress(ConnectionError):
                    await loop.sock_sendall(sock, self.head)
                connected.set()
                reader = asyncio.create_task(read())
                try:
                    while not reader.done():
                        done, _ = await asyncio.wait([reader], timeout=self.interval)
                        if not done:
                            with contextlib.suppress(ConnectionError):
                                await loop.sock_sendall(sock, b" ")
                finally:
                    reader.cancel()
            finally:
                self.open -= 1
        return data

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


async def test_trickled_bodies_from_one_ip_do_not_lock_out_healthz_or_a_payer(
    tmp_path: Path,
) -> None:
    # The attack at 1,024 descriptors (cap 400), scaled in time: a byte a second, a body
    # timeout of a few seconds. Long header and keep-alive timeouts: not what saves the gate.
    body_timeout = 3.0
    env = {
        "BODY_TIMEOUT": f"{body_timeout:g}s",
        "HEADER_TIMEOUT": "600s",
        "KEEPALIVE_TIMEOUT": "600s",
    }
    async with billing_gate(tmp_path, env) as (gate, _):
        cookie = await subscribe(gate, "payer@example.com")
        paying = {**JSON, "Cookie": cookie}

        async def everyone_else_is_answered() -> None:
            assert await fresh_get(gate, "/_gate/healthz", JSON) == 200
            assert await fresh_get(gate, "/_gate/readyz", JSON) == 200
            assert await fresh_get(gate, "/api/search?q=x", paying) == 200

        attack = Trickler(gate.port, ATTACKER_IP, TRICKLE_HEAD, interval=1.0)
        try:
            await attack.start(TRICKLERS)
            # Throughout the attack, for several body timeouts (the attacker reconnecting):
            until = time.monotonic() + 4 * body_timeout
            while time.monotonic() < until:
                await everyone_else_is_answered()
                await asyncio.sleep(0.2)
            # The attacker stops reconnecting; still trickling, each of its connections ends.
            attack.stop_reopening()
            deadline = time.monotonic() + DEADLINE
            while attack.open:
                assert time.monotonic() < deadline, f"{attack.open} trickling connections open"
                await everyone_else_is_answered()
                await asyncio.sleep(0.2)
        finally:
            await attack.close()
        statuses = Counter(status_line(a) for a in attack.answers)
        # Those the per-IP cap let in were cut for their body (408); the others were refused
        # (503) or, still waiting for their head, closed for the attacker's next connection.
        cut = statuses.pop("HTTP/1.1 408 Request Timeout", 0)
        statuses.pop("HTTP/1.1 503 Service Unavailable", 0)
        statuses.pop("", 0)
        assert cut >= connection_budget(NOFILE) // 4, cut  # MAX_CONNECTIONS_PER_IP's default
        assert not statuses, statuses
        log = gate.log()
        assert "event=body_timeout" in log
        assert "Too many open files" not in log
        assert "Traceback" not in log


# ---------------------------------------------------------------- timeouts


@contextlib.asynccontextmanager
async def plain_gate(tmp_path: Path, **env: str) -> AsyncIterator[GateProcess]:
    upstream = TestServer(create_upstream_app(), host="127.0.0.1")
    await upstream.start_server()
    try:
        gate_env = {"UPSTREAM_URL": f"http://127.0.0.1:{upstream.port}", "BILLING_MODE": "off"}
        async with gate_with_1024_fds(tmp_path, {**gate_env, **env}) as gate:
            yield gate
    finally:
        await upstream.close()


async def request_on(sock: socket.socket, path: str) -> bytes:
    """One complete request on an open keep-alive connection; returns the status line."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _ = await response_of(sock)
    return status


async def connected(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_a_slow_request_head_is_closed_after_header_timeout(tmp_path: Path) -> None:
    # KEEPALIVE_TIMEOUT far away: whatever closes these within DEADLINE is the header timeout.
    async with plain_gate(tmp_path, HEADER_TIMEOUT="1s", KEEPALIVE_TIMEOUT="600s") as gate:
        with await connected(gate.port) as slow:
            await asyncio.get_running_loop().sock_sendall(slow, SLOW_HEAD)
            assert await read_until_closed(slow) == b""
        with await connected(gate.port) as silent:  # connected, never sends a byte
            assert await read_until_closed(silent) == b""

        with await connected(gate.port) as keep:
            assert await request_on(keep, "/_gate/healthz") == b"HTTP/1.1 200 OK"
            # Idle between requests is not a slow head: longer than HEADER_TIMEOUT is fine.
            await asyncio.sleep(2.5)
            assert await request_on(keep, "/api/search?q=a") == b"HTTP/1.1 200 OK"
            # A further request that starts and stalls is cut like the first one.
            await asyncio.get_running_loop().sock_sendall(keep, SLOW_HEAD)
            assert await read_until_closed(keep) == b""


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    tmp_path: Path,
) -> None:
    async with plain_gate(tmp_path, HEADER_TIMEOUT="600s", KEEPALIVE_TIMEOUT="2s") as gate:
        assert "keepalive_timeout_s=2" in gate.log().split()
        with await connected(gate.port) as keep:
            assert await request_on(keep, "/_gate/healthz") == b"HTTP/1.1 200 OK"
            assert await request_on(keep, "/api/search?q=b") == b"HTTP/1.1 200 OK"
            assert await read_until_closed(keep) == b""


# ---------------------------------------------------------------- eviction order, in process


class SlowReader:
    """An app route (``POST /upload``) that reads its body only once ``go`` is set, then
    answers with the body's length."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.go.set()

    async def handler(self, request: web.Request) -> web.Response:
        await self.go.wait()
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.Response(text=str(size))


@contextlib.asynccontextmanager
async def limited_server(
    hold: Hold | None = None, reader: SlowReader | None = None, **env: str
) -> AsyncIterator[tuple[int, ConnectionLimiter]]:
    """A tiny app behind :class:`LimitedSite` in this process (port 0): ``/``, the gate's
    probe paths (``/_gate/healthz``, ``/_gate/readyz``), ``/hold`` and ``POST /upload``."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/_gate/healthz", hello)
    app.router.add_get("/_gate/readyz", hello)
    app.router.add_get("/hold", (hold or Hold()).handler)
    app.router.add_post("/upload", (reader or SlowReader()).handler)
    settings = make_settings({"UPSTREAM_URL": NO_UPSTREAM, "BILLING_MODE": "off", **env})
    runner = web.AppRunner(app, **runner_kwargs(settings))
    await runner.setup()
    site = LimitedSite(runner, "127.0.0.1", 0, plan_limits(settings, NOFILE))
    await site.start()
    try:
        assert site.limiter is not None
        port: int = runner.addresses[0][1]
        assert (site.port, site.name) == (port, f"http://127.0.0.1:{port}")  # not 0
        yield port, site.limiter
    finally:
        if hold is not None:
            hold.release.set()
        await runner.cleanup()


async def test_at_the_cap_the_least_recently_active_idle_connection_is_closed() -> None:
    async with limited_server(MAX_CONNECTIONS="2") as (port, limiter):
        with await connected(port) as first, await connected(port) as second:
            await eventually(lambda: limiter.connections == 2, "two connections")
            # The older one is served a request: now the other one is the longest idle.
            assert await request_on(first, "/") == b"HTTP/1.1 200 OK"
            with await connected(port) as third:
                assert await read_until_closed(second) == b""
                assert await request_on(third, "/") == b"HTTP/1.1 200 OK"
                assert await request_on(first, "/") == b"HTTP/1.1 200 OK"
            assert (limiter.evicted, limiter.refused) == (1, 0)


# ---------------------------------------------------------------- body timeout, in process


def post_head(length: int, path: str = "/upload", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


async def response_of(sock: socket.socket) -> tuple[bytes, bytes]:
    """The status line and body of one response on ``sock`` (Content-Length framed)."""
    loop = asyncio.get_running_loop()
    data = b""

    async def read() -> tuple[bytes, bytes]:
        nonlocal data
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"closed before an answer: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"closed mid-answer: {data!r}"
            body += chunk
        return head.split(b"\r\n", 1)[0], body

    return await asyncio.wait_for(read(), DEADLINE)


async def test_a_stalled_request_body_is_cut_with_408_and_the_connection_closed() -> None:
    async with limited_server(BODY_TIMEOUT="1s") as (port, limiter):
        loop = asyncio.get_running_loop()
        with await connected(port) as sock:
            await loop.sock_sendall(sock, post_head(1000) + b"x" * 10)  # then nothing
            answer = await read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert b"\r\nConnection: close\r\n" in answer
        # A trickle (a byte every 0.3 s: below BODY_MIN_RATE's default) is cut as well.
        with await connected(port) as sock:
            await loop.sock_sendall(sock, post_head(1000))
            deadline = time.monotonic() + DEADLINE
            while not readable(sock):
                assert time.monotonic() < deadline, "the trickle was not cut"
                with contextlib.suppress(ConnectionError):
                    await loop.sock_sendall(sock, b"x")
                await asyncio.sleep(0.3)
            assert (await read_until_closed(sock)).startswith(b"HTTP/1.1 408 ")
        assert limiter.body_timeouts == 2
        assert limiter.connections == 0


async def test_slow_steady_bodies_and_bodies_the_app_reads_late_are_not_cut() -> None:
    reader = SlowReader()
    async with limited_server(reader=reader, BODY_TIMEOUT="2s", BODY_MIN_RATE="100") as (
        port,
        limiter,
    ):
        loop = asyncio.get_running_loop()
        # 1,000 bytes every 0.25 s for 4 s: ten times BODY_MIN_RATE, twice BODY_TIMEOUT long.
        chunks = 16
        with await connected(port) as sock:
            await loop.sock_sendall(sock, post_head(1000 * chunks))
            for _ in range(chunks):
                await loop.sock_sendall(sock, b"x" * 1000)
                await asyncio.sleep(0.25)
            assert await response_of(sock) == (b"HTTP/1.1 200 OK", str(1000 * chunks).encode())

        # The app reads nothing for three BODY_TIMEOUTs (aiohttp stops reading the socket
        # once its buffer is full): the stall is the gate's, not the client's.
        reader.go.clear()
        mib = b"y" * 2**20
        size = 64 * len(mib)  # more than socket buffers can take (rmem_max here: 32 MiB)

        async def send(sock: socket.socket) -> None:
            for _ in range(size // len(mib)):
                await loop.sock_sendall(sock, mib)

        with await connected(port) as sock:
            await loop.sock_sendall(sock, post_head(size))
            sending = asyncio.create_task(send(sock))
            await asyncio.sleep(6)
            assert not sending.done()  # the client is held back: the gate is not reading
            reader.go.set()
            await asyncio.wait_for(sending, DEADLINE)
            assert await response_of(sock) == (b"HTTP/1.1 200 OK", str(size).encode())
        assert limiter.body_timeouts == 0


# ---------------------------------------------------------------- per-IP cap, in process


async def test_the_per_ip_cap_counts_a_direct_peers_connections() -> None:
    hold = Hold()
    async with limited_server(hold, MAX_CONNECTIONS_PER_IP="3") as (port, limiter):
        attacker = "127.0.0.2"
        busy = b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"
        loop = asyncio.get_running_loop()
        with raw_sockets() as socks:
            for _ in range(3):
                socks.append(await connected(port, attacker))
                await loop.sock_sendall(socks[-1], busy)
            await eventually(lambda: hold.in_flight == 3, "three requests in progress")
            # The fourth connection of that IP: probes are answered, the rest get the 503.
            with await connected(port, attacker) as fourth:
                assert await request_on(fourth, "/_gate/healthz") == b"HTTP/1.1 200 OK"
                assert await read_until_closed(fourth) == b""  # one probe per probe slot
            with await connected(port, attacker) as fourth:
                assert await request_on(fourth, "/") == b"HTTP/1.1 503 Service Unavailable"
            # Another client is not affected.
            with await connected(port, "127.0.0.3") as other:
                assert await request_on(other, "/") == b"HTTP/1.1 200 OK"
            assert limiter.client_limited == 2

            # An idle connection of the IP gives way to its next one.
            hold.release.set()
            for sock in socks:
                assert (await response_of(sock))[0] == b"HTTP/1.1 200 OK"
            await eventually(lambda: hold.in_flight == 0, "the held requests to end")
            evicted = limiter.evicted
            with await connected(port, attacker) as fourth:
                assert await request_on(fourth, "/") == b"HTTP/1.1 200 OK"
            assert limiter.evicted == evicted + 1
            assert sum(map(closed_by_peer, socks)) == 1  # the longest idle of the three
        await eventually(lambda: not limiter.clients, "no client counted")


async def test_behind_a_trusted_proxy_the_cap_counts_the_forwarded_clients_requests() -> None:
    hold = Hold()
    async with limited_server(hold, MAX_CONNECTIONS_PER_IP="3") as (port, limiter):
        loop = asyncio.get_running_loop()

        def via_proxy(path: str, client: str | None) -> bytes:
            xff = f"X-Forwarded-For: {client}\r\n" if client else ""
            return f"GET {path} HTTP/1.1\r\nHost: x\r\n{xff}\r\n".encode()

        async def answer(path: str, client: str | None) -> bytes:
            with await connected(port) as sock:  # from 127.0.0.1: a trusted proxy
                await loop.sock_sendall(sock, via_proxy(path, client))
                return (await response_of(sock))[0]

        with raw_sockets() as socks:
            for _ in range(3):
                socks.append(await connected(port))
                await loop.sock_sendall(socks[-1], via_proxy("/hold", "203.0.113.7"))
            await eventually(lambda: hold.in_flight == 3, "three requests in progress")
            assert await answer("/", "203.0.113.7") == b"HTTP/1.1 503 Service Unavailable"
            # The rightmost untrusted hop is the client, as for X-Forwarded-For elsewhere.
            spoofed = "203.0.113.8, 203.0.113.7"
            assert await answer("/", spoofed) == b"HTTP/1.1 503 Service Unavailable"
            assert await answer("/_gate/healthz", "203.0.113.7") == b"HTTP/1.1 200 OK"
            assert await answer("/_gate/readyz", "203.0.113.7") == b"HTTP/1.1 200 OK"
            assert await answer("/", "203.0.113.8") == b"HTTP/1.1 200 OK"
            assert await answer("/", None) == b"HTTP/1.1 200 OK"  # the proxy's own
            assert await answer("/", "127.0.0.1") == b"HTTP/1.1 200 OK"  # a trusted one
            assert await answer("/", "2001:db8:1:2::7") == b"HTTP/1.1 200 OK"
            hold.release.set()
            for sock in socks:
                assert (await response_of(sock))[0] == b"HTTP/1.1 200 OK"
            assert await answer("/", "203.0.113.7") == b"HTTP/1.1 200 OK"  # claims released
        assert not limiter.requests_by_client
        assert limiter.client_limited == 2


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::2", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", None),
        ("", None),
    ],
)
def test_client_key(ip: str, key: str | None) -> None:
    assert client_key(ip) == key
