"""The canned answers of the connection limiter: the ``503`` of a connection or request
beyond the caps, the ``408`` of a cut body, and :class:`Refusal`, the protocol that writes the
503 to a connection refused before its request is read."""

import asyncio
from typing import TYPE_CHECKING, cast

from aiohttp import web

from gateway.limits import MAX_LINGERING_REFUSALS, RETRY_AFTER

if TYPE_CHECKING:
    from gateway.connections.limiter import ConnectionLimiter

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


class Refusal(asyncio.Protocol):
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
