"""Bounded client connections: header and body timeouts, a per-worker and a per-client cap,
and slots kept for health probes.

aiohttp's server has a keep-alive timeout (``keepalive_timeout``, passed through the runner:
it closes a connection that has not completed a request head that long after connecting or
after its last response) but no header or body timeout and no connection cap. This module adds
them with as little of aiohttp's inside as possible:

* :class:`LimitedSite` is a ``web.TCPSite`` whose protocol factory is a
  :class:`ConnectionLimiter` instead of the runner's ``web.Server``;
* :class:`LimitedHandler` is a ``web.RequestHandler`` that knows its phase — waiting for or
  reading a request head, busy with a request, or idle between requests — from public hooks
  (``data_received``; the server's ``request_factory``, which is called once per complete
  head; ``log_access``, called once when each response is done), and closes itself when a
  head takes longer than ``HEADER_TIMEOUT`` or a body stalls (``BODY_TIMEOUT``).

The header timeout runs from the accept (a connection that sends nothing is as bad as one that
dribbles) and, on a keep-alive connection, from the first byte of each further request; the
idle time between requests is the keep-alive timeout's business (as nginx's
``client_header_timeout`` and ``keepalive_timeout``). aiohttp's keep-alive timer also runs from
the accept, so a new connection has ``min(HEADER_TIMEOUT, KEEPALIVE_TIMEOUT)`` for its first head.

The body timeout looks at windows of ``BODY_TIMEOUT`` from the end of the head: a body still
arriving that got fewer than ``BODY_MIN_RATE * BODY_TIMEOUT`` bytes (at least one) in a window
is cut — with a canned ``408`` when no answer has started, then the connection is drained for a
moment (so that closing does not reset the answer away) and closed. While the gate itself does
not read (aiohttp paused the socket: the app or the upstream is slow to take the body), the
clock stops. Like Apache's ``mod_reqtimeout`` and Kestrel's minimum data rate: a trickle of a
byte every few seconds is cut, an upload of any size may take as long as it keeps moving.

At ``MAX_CONNECTIONS`` a new connection first takes the place of the longest-idle one (waiting
for a head or between requests; nothing in progress is lost, and HTTP clients retry on a closed
keep-alive connection) — so idle or slow-header connections can never lock out a real
request, which is what nginx does when its ``worker_connections`` run out. When every
connection has a request in progress the new one gets one of ``PROBE_SLOTS``: its head is read
(within ``PROBE_HEADER_TIMEOUT``) and only ``GATE_PREFIX/healthz`` and ``/readyz`` are served
there, anything else gets a fast ``503`` with ``Retry-After`` and ``Connection: close``; so busy
connections never starve the probes. With the slots taken too, the canned 503 is written at
once, without reading the request.

``MAX_CONNECTIONS_PER_IP`` bounds what one client holds. A direct peer is known when it
connects: beyond its cap its own longest-idle connection makes room, else the new connection
goes to a probe slot (at most ``PROBE_SLOTS_PER_IP`` of them per client), else the canned 503.
Behind ``TRUSTED_PROXIES`` every connection comes from the proxy and carries requests of many
clients in turn; the client (``X-Forwarded-For``) is known only once a head is read, so there
the cap counts requests in progress per forwarded client, and one beyond it gets the 503
(probes, and requests naming no client or a trusted one, are never counted). IPv6 clients are
counted per /64, the block one subscriber usually holds.
"""

import asyncio
import enum
import functools
import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from gateway.forwarded import TrustedNetworks, forwarded_client
from gateway.limits import MAX_LINGERING_REFUSALS, PROBE_SLOTS, RETRY_AFTER, Limits
from gateway.logs import log_event

__all__ = [
    "BODY_TIMEOUT_ANSWER",
    "PROBE_HEADER_TIMEOUT",
    "PROBE_SLOTS_PER_IP",
    "REFUSAL",
    "REFUSAL_LINGER",
    "ConnectionLimiter",
    "LimitedHandler",
    "LimitedSite",
    "Phase",
    "client_key",
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
_TIMEOUT_BODY = b"Request body timeout: the body stopped arriving, or arrived too slowly.\n"
BODY_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
#: How long a refused socket may stay half-closed while its unread request is drained: closing
#: with unread bytes would send a reset, and the client could lose the 503 with it. Also how
#: long a body cut with 408 is drained, and a probe slot lingers after its answer.
REFUSAL_LINGER = 2.0
#: The header timeout of a connection on a probe slot: probes send their request at once.
PROBE_HEADER_TIMEOUT = 2.0
#: Probe slots one client may hold at a time: one client cannot take them all.
PROBE_SLOTS_PER_IP = 2
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
_RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Phase(enum.Enum):
    HEAD = "head"  # connected or between requests with bytes of a head arriving
    BUSY = "busy"  # a request (or an upgraded WebSocket) in progress
    IDLE = "idle"  # keep-alive, between requests
    CUT = "cut"  # the body timed out: answered 408, drained until closed


class _Verdict(enum.Enum):
    """What a request gets instead of the app: set at its head, acted on by the limiter's
    request handler."""

    PROBE = "probe"  # on a probe slot: the app answers the probe, then the connection closes
    BUSY = "busy"  # beyond a cap: the 503


@functools.lru_cache(maxsize=4096)
def client_key(ip: str) -> str | None:
    """What ``MAX_CONNECTIONS_PER_IP`` counts for the address ``ip``: an IPv4 address (also
    when IPv4-mapped), the /64 of an IPv6 one; None for what is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # a scope id is not part of it
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class _Client:
    """One client's share: its connections (direct peers), the idle ones oldest first, and
    the probe slots it holds."""

    __slots__ = ("connections", "idle", "key", "probes")

    def __init__(self, key: str) -> None:
        self.key = key
        self.connections = 0
        self.probes = 0
        self.idle: OrderedDict[LimitedHandler, None] = OrderedDict()


class LimitedHandler(web.RequestHandler):
    """aiohttp's request handler plus phase tracking for the timeouts, eviction and caps."""

    __slots__ = (
        "_body_deadline",
        "_body_mark",
        "_body_timer",
        "_client",
        "_drain_timer",
        "_head_deadline",
        "_head_timer",
        "_header_timeout",
        "_limiter",
        "_linger",
        "_payload",
        "_phase",
        "_probe_slot",
        "_read_paused",
        "_received",
        "_request_client",
        "_trusted_peer",
        "_verdict",
        "_writer",
    )

    def __init__(
        self,
        manager: web.Server,
        limiter: "ConnectionLimiter",
        *,
        probe_slot: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limiter = limiter
        self._phase = Phase.HEAD
        self._head_deadline = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._header_timeout = limiter.limits.header_timeout
        self._probe_slot = False
        if probe_slot:
            self._to_probe_slot()
        self._client: _Client | None = None  # direct peers: the client it counts for
        self._request_client: str | None = None  # trusted peers: the request's client
        self._trusted_peer = False
        self._verdict: _Verdict | None = None
        # the body of the request in progress, while it is still arriving
        self._payload: StreamReader | None = None
        self._writer: AbstractStreamWriter | None = None
        self._received = 0  # bytes received while busy
        self._body_mark = 0  # ... at the start of the current body window
        self._body_deadline = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._linger: StreamReader | None = None  # a body aiohttp drains after the answer

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def probe_slot(self) -> bool:
        return self._probe_slot

    def _to_probe_slot(self) -> None:
        self._probe_slot = True
        self._header_timeout = min(self._header_timeout, PROBE_HEADER_TIMEOUT)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._limiter.admit(self, transport):
            return  # beyond the client's caps: the transport went to a _Refusal
        super().connection_made(transport)
        self._start_head_clock()

    # The three hooks below (data_received, head_received, log_access) run on every request:
    # they work on the limiter's idle lists directly instead of calling its methods.
    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is Phase.BUSY:
            self._received += len(data)
        elif phase is Phase.CUT:
            return  # answered 408: what the client still sends is dropped
        elif data:
            if phase is Phase.IDLE:
                linger = self._linger
                if linger is not None and not linger.is_eof():
                    # the rest of a body answered early, which aiohttp reads and drops for
                    # a while (its lingering_time): not a new head
                    super().data_received(data)
                    return
                self._linger = None
                self._phase = Phase.HEAD
                self._start_head_clock()
            # Bytes of a head just arrived (perhaps a whole one, not yet handled): this
            # connection is the last to be evicted.
            idle = self._limiter.idle_handlers
            if self in idle:
                idle.move_to_end(self)
                client = self._client
                if client is not None and self in client.idle:
                    client.idle.move_to_end(self)
        super().data_received(data)

    def head_received(
        self, message: RawRequestMessage, payload: StreamReader, writer: AbstractStreamWriter
    ) -> None:
        """A complete request head was parsed (called by the limiter's request factory)."""
        self._phase = Phase.BUSY
        limiter = self._limiter
        limiter.idle_handlers.pop(self, None)
        client = self._client
        if client is not None:
            client.idle.pop(self, None)
        if payload.is_eof() or message.upgrade:
            self._payload = None
        else:  # a body still to come
            self._payload = payload
            self._writer = writer
            self._start_body_clock()
        if self._probe_slot:
            self._verdict = _Verdict.PROBE if limiter.is_probe(message) else _Verdict.BUSY
        elif self._trusted_peer:
            self._verdict = limiter.claim_request(self, message)
        else:
            return
        if self._verdict is not None:
            limiter.special.add(self)

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        # aiohttp calls this once at the end of every finish_response (the response written,
        # or the client gone): the one synchronous "response done" hook. Overriding the async
        # finish_response instead cost a coroutine frame per request. (If aiohttp stopped
        # calling it, tests/test_connections.py's 503 and header-timeout tests fail.)
        if self._phase is not Phase.CUT:
            self._phase = Phase.IDLE
            payload = self._payload
            if payload is not None:
                if not payload.is_eof():
                    self._linger = payload  # answered before its body was read
                self._payload = self._writer = None
            limiter = self._limiter
            if self._request_client is not None:
                limiter.release_request(self)
            if self in limiter.live_handlers:  # not evicted meanwhile: idle, newest last
                idle = limiter.idle_handlers
                if self in idle:  # defensive: every response follows a head_received today
                    idle.move_to_end(self)
                else:
                    idle[self] = None  # (head_received took it off the list)
                client = self._client
                if client is not None:
                    client.idle[self] = None
        super().log_access(request, response, time)

    def pause_reading(self) -> None:
        # aiohttp's flow control: the body is not being read as fast as it comes.
        self._read_paused = True
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # (aiohttp's stream reader calls this after reads also when nothing was paused)
        paused, self._read_paused = self._read_paused, False
        super().resume_reading(resume_parser)
        if paused and self._payload is not None and self._phase is Phase.BUSY:
            self._start_body_clock()  # a new window: the client is not to blame for the pause

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._body_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._drain_timer = None
        self._limiter.closed(self)
        super().connection_lost(exc)

    async def answer(self, request: web.BaseRequest, inner: _RequestHandler) -> web.StreamResponse:
        """The answer to a request with a verdict (see :class:`ConnectionLimiter`)."""
        verdict, self._verdict = self._verdict, None
        if verdict is _Verdict.PROBE:
            response = await inner(request)
            response.force_close()  # a probe slot serves one probe
            return response
        return busy_response()

    # One timer per connection at a time, not one per request: a head that completes leaves
    # the timer to fire and find nothing to do (or a later head's deadline to wait for), which
    # keeps the keep-alive hot path to a clock read (as aiohttp's own keep-alive timer does).
    def _start_head_clock(self) -> None:
        self._head_deadline = self._limiter.loop.time() + self._header_timeout
        if self._head_timer is None:
            self._head_timer = self._limiter.loop.call_at(self._head_deadline, self._head_check)

    def _head_check(self) -> None:
        self._head_timer = None
        if self._phase is not Phase.HEAD:
            return
        if self._limiter.loop.time() < self._head_deadline:  # a later head's clock
            self._head_timer = self._limiter.loop.call_at(self._head_deadline, self._head_check)
            return
        self._limiter.header_timeouts += 1
        self.force_close()

    # The body clock, the same way: a new window moves the deadline, the timer follows it.
    def _start_body_clock(self) -> None:
        loop = self._limiter.loop
        self._body_mark = self._received
        self._body_deadline = loop.time() + self._limiter.limits.body_timeout
        if self._body_timer is None:
            self._body_timer = loop.call_at(self._body_deadline, self._body_check)

    def _body_check(self) -> None:
        self._body_timer = None
        payload = self._payload
        if self._phase is not Phase.BUSY or payload is None or payload.is_eof():
            return
        if self._read_paused:
            return  # the gate is not reading: resume_reading starts a new window
        loop = self._limiter.loop
        if loop.time() < self._body_deadline:  # a later window's clock
            self._body_timer = loop.call_at(self._body_deadline, self._body_check)
            return
        if self._received - self._body_mark < self._limiter.body_window_bytes:
            self._cut_body()
        else:
            self._start_body_clock()

    def _cut_body(self) -> None:
        limiter = self._limiter
        limiter.body_timeouts += 1
        limiter.warn_body_timeout()
        transport = self.transport
        writer = self._writer
        self._payload = None
        if transport is None or transport.is_closing():
            return
        if writer is None or writer.output_size:
            self.force_close()  # an answer has started: too late to say why
            return
        # The 408, then the client's further bytes are read and dropped until it closes or
        # REFUSAL_LINGER has passed (a close with unread bytes would reset the 408 away).
        self._phase = Phase.CUT
        transport.write(BODY_TIMEOUT_ANSWER)
        self._drain_timer = limiter.loop.call_later(REFUSAL_LINGER, self.force_close)


def busy_response() -> web.Response:
    """The 503 of a request beyond a cap (the canned :data:`REFUSAL`, as a response)."""
    response = web.Response(
        body=_REFUSAL_BODY,
        status=503,
        content_type="text/plain",
        charset="utf-8",
        headers={"Retry-After": str(RETRY_AFTER)},
    )
    response.force_close()
    return response


class _Refusal(asyncio.Protocol):
    """A connection beyond the caps: answered 503 at once, then closed."""

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
    connection up to ``limits.max_connections``, evicting the longest-idle one at the cap,
    then probe slots, then a canned 503; and the per-client caps (see the module docstring).

    Requests with a verdict (a probe slot's, one beyond a client's cap) are answered through
    the server's request handler, wrapped here: a set lookup when there is any, else nothing.
    """

    def __init__(self, server: web.Server, limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.trusted = TrustedNetworks(limits.trusted_proxies)
        self.body_window_bytes = max(1, int(limits.body_min_rate * limits.body_timeout))
        self.live_handlers: set[LimitedHandler] = set()
        # Handlers not busy, oldest first: the eviction order.
        self.idle_handlers: OrderedDict[LimitedHandler, None] = OrderedDict()
        self.probe_handlers: set[LimitedHandler] = set()
        self.clients: dict[str, _Client] = {}
        self.requests_by_client: Counter[str] = Counter()
        # Handlers whose current request has a verdict, until the request handler takes it.
        self.special: set[LimitedHandler] = set()
        self.lingering = 0
        self.evicted = 0
        self.refused = 0
        self.probe_slots_used = 0
        self.client_limited = 0
        self.header_timeouts = 0
        self.body_timeouts = 0
        self._logged_at = -_LOG_INTERVAL
        self._body_logged_at = -_LOG_INTERVAL
        # The server's request factory runs once per complete request head: the one hook
        # aiohttp offers between "head parsed" and "handler runs"; its request handler is
        # called right after, with the request. Handlers copy both when they are created, so
        # they are wrapped before the first one.
        inner_factory: _RequestFactory = server.request_factory
        inner_handler: _RequestHandler = server.request_handler
        special = self.special

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: "asyncio.Task[None]",
        ) -> web.BaseRequest:
            if isinstance(protocol, LimitedHandler):
                protocol.head_received(message, payload, writer)
            return inner_factory(message, payload, protocol, writer, task)

        def request_handler(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            # Not a coroutine: the app's own handler is returned as it is (no extra frame).
            if special:
                protocol = request.protocol
                if protocol in special:
                    special.discard(protocol)
                    return protocol.answer(request, inner_handler)
            return inner_handler(request)

        server.request_factory = request_factory
        server.request_handler = request_handler

    @property
    def connections(self) -> int:
        return len(self.live_handlers)

    def __call__(self) -> asyncio.Protocol:
        # Counted from here, not from connection_made: asyncio creates the protocols of a whole
        # accept burst before any of them is connected.
        if len(self.live_handlers) < self.limits.max_connections or self._evict_one():
            handler = self._handler()
            self.live_handlers.add(handler)
            self.idle_handlers[handler] = None
            return handler
        if len(self.probe_handlers) < PROBE_SLOTS:
            self.probe_slots_used += 1
            self._warn()
            handler = self._handler(probe_slot=True)
            self.probe_handlers.add(handler)
            return handler
        self.refused += 1
        self._warn()
        return _Refusal(self)

    def _handler(self, *, probe_slot: bool = False) -> LimitedHandler:
        # ``_kwargs`` are the runner's handler options (keepalive_timeout, access log):
        # exactly what web.Server.__call__ passes.
        kwargs = self.server._kwargs
        if probe_slot:  # a refused request on a probe slot is drained briefly, not for 10 s
            kwargs = {**kwargs, "lingering_time": REFUSAL_LINGER}
        return LimitedHandler(self.server, self, probe_slot=probe_slot, loop=self.loop, **kwargs)

    def admit(self, handler: LimitedHandler, transport: asyncio.BaseTransport) -> bool:
        """At connection_made, when the peer is known: count it for its client, within the
        client's cap (evicting the client's longest-idle connection, else moving this one to
        a probe slot). False: refused, and the transport handed to a :class:`_Refusal`."""
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        if not isinstance(ip, str):
            return True  # not an IP peer (a unix socket): nothing to count
        if ip in self.trusted:
            handler._trusted_peer = True  # its clients are known per request
            return True
        key = client_key(ip)
        if key is None:
            return True
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = _Client(key)
        if not handler.probe_slot and client.connections >= self.limits.max_connections_per_ip:
            self.client_limited += 1
            self._warn()
            if not self._evict_idle_of(client) and not self._move_to_probe_slot(handler):
                return self._refuse(handler, client, transport)
        if handler.probe_slot:
            if client.probes >= PROBE_SLOTS_PER_IP:
                return self._refuse(handler, client, transport)
            client.probes += 1
        else:
            client.connections += 1
            client.idle[handler] = None
        handler._client = client
        return True

    def _move_to_probe_slot(self, handler: LimitedHandler) -> bool:
        if len(self.probe_handlers) >= PROBE_SLOTS:
            return False
        self.live_handlers.discard(handler)
        self.idle_handlers.pop(handler, None)
        self.probe_handlers.add(handler)
        handler._to_probe_slot()
        return True

    def _refuse(
        self, handler: LimitedHandler, client: _Client, transport: asyncio.BaseTransport
    ) -> bool:
        self.refused += 1
        self._forget(handler)
        if not client.connections and not client.probes:
            self.clients.pop(client.key, None)
        refusal = _Refusal(self)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)
        return False

    def is_probe(self, message: RawRequestMessage) -> bool:
        """``GET``/``HEAD`` of ``GATE_PREFIX/healthz`` or ``/readyz``."""
        return message.method in ("GET", "HEAD") and message.url.path in self.limits.probe_paths

    def claim_request(self, handler: LimitedHandler, message: RawRequestMessage) -> _Verdict | None:
        """A request from a trusted peer: count it for the client ``X-Forwarded-For`` names;
        the 503 beyond that client's cap. Probes, and requests that name no client or a
        trusted one, are not counted."""
        ip = forwarded_client(message.headers, self.trusted)
        if ip is None or ip in self.trusted:  # the proxy's own request, or another proxy's
            return None
        key = client_key(ip)
        if key is None or self.is_probe(message):
            return None
        if self.requests_by_client[key] >= self.limits.max_connections_per_ip:
            self.client_limited += 1
            self._warn()
            return _Verdict.BUSY
        self.requests_by_client[key] += 1
        handler._request_client = key
        return None

    def release_request(self, handler: LimitedHandler) -> None:
        key, handler._request_client = handler._request_client, None
        if key is not None:
            left = self.requests_by_client[key] - 1
            if left > 0:
                self.requests_by_client[key] = left
            else:
                del self.requests_by_client[key]

    def _evict_one(self) -> bool:
        if not self.idle_handlers:
            return False
        victim = next(iter(self.idle_handlers))
        self._evict(victim)
        return True

    def _evict_idle_of(self, client: _Client) -> bool:
        if not client.idle:
            return False
        self._evict(next(iter(client.idle)))
        return True

    def _evict(self, victim: LimitedHandler) -> None:
        self._forget(victim)
        # Not force_close(): an idle connection may be in aiohttp's lingering read of a body
        # answered early, which takes a transport gone under it for an unhandled error.
        transport = victim.transport
        if transport is not None:
            transport.close()
        else:
            victim.force_close()
        self.evicted += 1
        self._warn()

    def closed(self, handler: LimitedHandler) -> None:
        self._forget(handler)

    def _forget(self, handler: LimitedHandler) -> None:
        """Take ``handler`` off every list and count; idempotent."""
        self.live_handlers.discard(handler)
        self.idle_handlers.pop(handler, None)
        self.probe_handlers.discard(handler)
        self.special.discard(handler)
        self.release_request(handler)
        client, handler._client = handler._client, None
        if client is not None:
            if handler.probe_slot:
                client.probes -= 1
            else:
                client.connections -= 1
                client.idle.pop(handler, None)
            if not client.connections and not client.probes:
                self.clients.pop(client.key, None)

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
            max_connections_per_ip=self.limits.max_connections_per_ip,
            evicted=self.evicted,
            refused=self.refused,
            probe_slots_used=self.probe_slots_used,
            client_limited=self.client_limited,
            hint="raise LimitNOFILE / MAX_CONNECTIONS or WORKERS if this is real traffic",
        )

    def warn_body_timeout(self) -> None:
        now = self.loop.time()
        if now - self._body_logged_at < _LOG_INTERVAL:
            return
        self._body_logged_at = now
        log_event(
            log,
            "body_timeout",
            level=logging.WARNING,
            body_timeout_s=self.limits.body_timeout,
            body_min_rate=self.limits.body_min_rate,
            body_timeouts=self.body_timeouts,
            hint="raise BODY_TIMEOUT or lower BODY_MIN_RATE if these are real uploads",
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
