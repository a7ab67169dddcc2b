"""One client connection: aiohttp's request handler plus the phase (head, busy, idle, cut)
the limiter evicts by, the header and body clocks, and the answer to a request the limiter
gave a verdict (a probe slot's, or the 503 beyond a client's cap)."""

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from gateway.connections.answers import (
    BODY_TIMEOUT_ANSWER,
    PROBE_HEADER_TIMEOUT,
    REFUSAL_LINGER,
    busy_response,
)

if TYPE_CHECKING:
    from gateway.connections.limiter import Client, ConnectionLimiter

RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Phase(enum.Enum):
    HEAD = "head"  # connected or between requests with bytes of a head arriving
    BUSY = "busy"  # a request (or an upgraded WebSocket) in progress
    IDLE = "idle"  # keep-alive, between requests
    CUT = "cut"  # the body timed out: answered 408, drained until closed


class Verdict(enum.Enum):
    """What a request gets instead of the app: set at its head, acted on by the limiter's
    request handler."""

    PROBE = "probe"  # on a probe slot: the app answers the probe, then the connection closes
    BUSY = "busy"  # beyond a cap: the 503


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
        self._client: Client | None = None  # direct peers: the client it counts for
        self._request_client: str | None = None  # trusted peers: the request's client
        self._trusted_peer = False
        self._verdict: Verdict | None = None
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
            self._verdict = Verdict.PROBE if limiter.is_probe(message) else Verdict.BUSY
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

    async def answer(self, request: web.BaseRequest, inner: RequestHandler) -> web.StreamResponse:
        """The answer to a request with a verdict (see :class:`ConnectionLimiter`)."""
        verdict, self._verdict = self._verdict, None
        if verdict is Verdict.PROBE:
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
