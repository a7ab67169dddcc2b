"""Bounded client connections: a header-read timeout and a per-worker connection cap.

aiohttp's server has a keep-alive timeout (``keepalive_timeout``, passed through the runner:
it closes a connection that has not completed a request head that long after connecting or
after its last response) but no header-read timeout and no connection cap. This module adds
both with as little of aiohttp's inside as possible:

* :class:`LimitedSite` is a ``web.TCPSite`` whose protocol factory is a
  :class:`ConnectionLimiter` instead of the runner's ``web.Server``;
* :class:`LimitedHandler` is a ``web.RequestHandler`` that knows its phase — waiting for or
  reading a request head, busy with a request, or idle between requests — from public hooks
  (``data_received``; the server's ``request_factory``, which is called once per complete
  head; ``log_access``, called once when each response is done), and closes itself when a
  head takes longer than ``HEADER_TIMEOUT``.

The header timeout runs from the accept (a connection that sends nothing is as bad as one that
dribbles) and, on a keep-alive connection, from the first byte of each further request; the
idle time between requests is the keep-alive timeout's business (as nginx's
``client_header_timeout`` and ``keepalive_timeout``). aiohttp's keep-alive timer also runs from
the accept, so a new connection has ``min(HEADER_TIMEOUT, KEEPALIVE_TIMEOUT)`` for its first head.

At ``MAX_CONNECTIONS`` a new connection first takes the place of the longest-idle one (waiting
for a head or between requests; nothing in progress is lost, and HTTP clients retry on a closed
keep-alive connection) — so idle or slow-header connections can never lock out a real
request, which is what nginx does when its ``worker_connections`` run out. Only when every
connection has a request in progress does the new one get a canned ``503`` with
``Retry-After`` and ``Connection: close``, written at once, without reading the request.
"""

import asyncio
import enum
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from gateway.limits import MAX_LINGERING_REFUSALS, RETRY_AFTER, Limits
from gateway.logs import log_event

__all__ = [
    "REFUSAL",
    "REFUSAL_LINGER",
    "ConnectionLimiter",
    "LimitedHandler",
    "LimitedSite",
    "Phase",
]

log = logging.getLogger("gateway.connections")

_REFUSAL_BODY = b"Service busy: too many connections. Retry in a few seconds.\n"
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: %d\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n%s" % (RETRY_AFTER, len(_REFUSAL_BODY), _REFUSAL_BODY)
)
#: How long a refused socket may stay half-closed while its unread request is drained: closing
#: with unread bytes would send a reset, and the client could lose the 503 with it.
REFUSAL_LINGER = 2.0
#: At most one warning per this many seconds while connections are evicted or refused.
_LOG_INTERVAL = 60.0

_RequestFactory = Callable[
    [
        RawRequestMessage,
        StreamReader,
        web.RequestHandler,
        AbstractStreamWriter,
        "asyncio.Task[None]",
    ],
    web.BaseRequest,
]


class Phase(enum.Enum):
    HEAD = "head"  # connected or between requests with bytes of a head arriving
    BUSY = "busy"  # a request (or an upgraded WebSocket) in progress
    IDLE = "idle"  # keep-alive, between requests


class LimitedHandler(web.RequestHandler):
    """aiohttp's request handler plus phase tracking for the header timeout and eviction."""

    __slots__ = ("_head_deadline", "_head_timer", "_limiter", "_phase")

    def __init__(self, manager: web.Server, limiter: "ConnectionLimiter", **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limiter = limiter
        self._phase = Phase.HEAD
        self._head_deadline = 0.0
        self._head_timer: asyncio.TimerHandle | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_clock()

    # The three hooks below (data_received, head_received, log_access) run on every request:
    # they work on the limiter's idle list directly instead of calling its methods.
    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is not Phase.BUSY and data:
            limiter = self._limiter
            if phase is Phase.IDLE:
                self._phase = Phase.HEAD
                self._start_head_clock()
            # Bytes of a head just arrived (perhaps a whole one, not yet handled): this
            # connection is the last to be evicted.
            idle = limiter.idle_handlers
            if self in idle:
                idle.move_to_end(self)
        super().data_received(data)

    def head_received(self) -> None:
        """A complete request head was parsed (called by the limiter's request factory)."""
        self._phase = Phase.BUSY
        self._limiter.idle_handlers.pop(self, None)

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # aiohttp calls this once at the end of every finish_response (the response written,
        # or the client gone): the one synchronous "response done" hook. Overriding the async
        # finish_response instead cost a coroutine frame per request. (If aiohttp stopped
        # calling it, tests/test_connections.py's 503 and header-timeout tests fail.)
        self._phase = Phase.IDLE
        limiter = self._limiter
        if self in limiter.live_handlers:  # not evicted meanwhile: idle, newest last
            idle = limiter.idle_handlers
            if self in idle:  # defensive: every response follows a head_received today
                idle.move_to_end(self)
            else:
                idle[self] = None  # (head_received took it off the list)
        super().log_access(request, response, time)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._limiter.closed(self)
        super().connection_lost(exc)

    # One timer per connection at a time, not one per request: a head that completes leaves
    # the timer to fire and find nothing to do (or a later head's deadline to wait for), which
    # keeps the keep-alive hot path to a clock read (as aiohttp's own keep-alive timer does).
    def _start_head_clock(self) -> None:
        self._head_deadline = self._limiter.loop.time() + self._limiter.limits.header_timeout
        if self._head_timer is None:
            self._head_timer = self._limiter.loop.call_at(self._head_deadline, self._head_check)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_check(self) -> None:
        self._head_timer = None
        if self._phase is not Phase.HEAD:
            return
        if self._limiter.loop.time() < self._head_deadline:  # a later head's clock
            self._head_timer = self._limiter.loop.call_at(self._head_deadline, self._head_check)
            return
        self._limiter.header_timeouts += 1
        self.force_close()


class _Refusal(asyncio.Protocol):
    """A connection beyond the cap: answered 503 at once, then closed."""

    def __init__(self, limiter: "ConnectionLimiter") -> None:
        self._limiter = limiter
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a server socket's transport
        transport.write(REFUSAL)
        if transport.can_write_eof() and self._limiter.lingering < MAX_LINGERING_REFUSALS:
            # Half-close: the client reads the 503 and closes; its request is read and dropped
            # meanwhile (eof_received then closes our side), bounded by REFUSAL_LINGER.
            self._lingering = True
            self._limiter.lingering += 1
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.abort)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        """The request we answered without reading: dropped."""

    def eof_received(self) -> bool:
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._lingering:
            self._limiter.lingering -= 1


class ConnectionLimiter:
    """The protocol factory of a :class:`LimitedSite`: one :class:`LimitedHandler` per
    connection up to ``limits.max_connections``, evicting the longest-idle one at the cap and
    refusing (503) when none is idle."""

    def __init__(self, server: web.Server, limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.live_handlers: set[LimitedHandler] = set()
        # Handlers not busy, oldest first: the eviction order.
        self.idle_handlers: OrderedDict[LimitedHandler, None] = OrderedDict()
        self.lingering = 0
        self.evicted = 0
        self.refused = 0
        self.header_timeouts = 0
        self._logged_at = -_LOG_INTERVAL
        # The server's request factory runs once per complete request head: the one hook
        # aiohttp offers between "head parsed" and "handler runs". Handlers copy it when they
        # are created, so it is wrapped before the first one.
        inner: _RequestFactory = server.request_factory

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: "asyncio.Task[None]",
        ) -> web.BaseRequest:
            if isinstance(protocol, LimitedHandler):
                protocol.head_received()
            return inner(message, payload, protocol, writer, task)

        server.request_factory = request_factory

    @property
    def connections(self) -> int:
        return len(self.live_handlers)

    def __call__(self) -> asyncio.Protocol:
        if len(self.live_handlers) >= self.limits.max_connections and not self._evict_one():
            self.refused += 1
            self._warn()
            return _Refusal(self)
        # Counted from here, not from connection_made: asyncio creates the protocols of a whole
        # accept burst before any of them is connected. (``_kwargs`` are the runner's handler
        # options — keepalive_timeout, access log — exactly what web.Server.__call__ passes.)
        handler = LimitedHandler(self.server, self, loop=self.loop, **self.server._kwargs)
        self.live_handlers.add(handler)
        self.idle_handlers[handler] = None
        return handler

    def _evict_one(self) -> bool:
        if not self.idle_handlers:
            return False
        victim, _ = self.idle_handlers.popitem(last=False)
        self.live_handlers.discard(victim)
        victim.force_close()
        self.evicted += 1
        self._warn()
        return True

    def closed(self, handler: LimitedHandler) -> None:
        self.live_handlers.discard(handler)
        self.idle_handlers.pop(handler, None)

    def _warn(self) -> None:
        now = self.loop.time()
        if now - self._logged_at < _LOG_INTERVAL:
            return
        self._logged_at = now
        log_event(
            log,
            "connections_at_limit",
            level=logging.WARNING,
            max_connections=self.limits.max_connections,
            evicted=self.evicted,
            refused=self.refused,
            hint="raise LimitNOFILE / MAX_CONNECTIONS or WORKERS if this is real traffic",
        )


class LimitedSite(web.TCPSite):
    """``web.TCPSite`` with :class:`ConnectionLimiter` as the protocol factory."""

    __slots__ = ("_limits", "limiter")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: Limits,
        *,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port)
        self._limits = limits
        self.limiter: ConnectionLimiter | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        # BaseSite's (registers the site), not TCPSite's: that one would serve with the plain
        # protocol factory.
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("Call runner.setup() before starting a site")
        self.limiter = ConnectionLimiter(server, self._limits)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.limiter,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        # As TCPSite.start does: ``port`` (and ``name``) report the bound port for PORT=0.
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
