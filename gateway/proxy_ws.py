"""WebSocket proxy: connect upstream first, then upgrade the client and pump frames both ways.

The upstream handshake happens before the client's, so a refusal is answered with a 502
(:func:`gateway.responses.websocket_refused`) and the client is never upgraded into a dead
socket; the subprotocol the client sees is the one the upstream picked. Text frames are relayed
as raw bytes (no decode/encode round trip). Pings are answered on each side (autoping); close
codes and reasons are relayed both ways. The two pump tasks belong to the handler: whichever
way the socket ends, both are cancelled and awaited.
"""

import asyncio
import logging
from collections.abc import Callable, MutableSet
from dataclasses import dataclass
from typing import Protocol

from aiohttp import (
    ClientError,
    ClientSession,
    ClientWebSocketResponse,
    ClientWSTimeout,
    WSCloseCode,
    WSMsgType,
    WSServerHandshakeError,
    hdrs,
    web,
)
from aiohttp.http import WSMessageNoDecodeText
from multidict import CIMultiDict
from yarl import URL

from gateway.logs import log_event
from gateway.responses import bad_handshake, upstream_failure, websocket_refused
from gateway.settings import Settings

__all__ = ["CLIENT_MAX_MSG_SIZE", "CLOSE_TIMEOUT", "OnOpen", "WebSocketPair", "proxy_websocket"]

log = logging.getLogger(__name__)

#: Largest message a client may send (aiohttp's default is 4 MiB); upstream messages are
#: not limited: the app is trusted and may send large payloads (Streamlit dataframes).
CLIENT_MAX_MSG_SIZE = 16 * 1024 * 1024
#: How long either side gets to answer a close frame.
CLOSE_TIMEOUT = 10.0
# Generated per connection by the client library; the client's own values must not leak.
_HANDSHAKE_HEADERS = (
    hdrs.SEC_WEBSOCKET_KEY,
    hdrs.SEC_WEBSOCKET_VERSION,
    hdrs.SEC_WEBSOCKET_EXTENSIONS,
    hdrs.SEC_WEBSOCKET_PROTOCOL,
)
# Codes that may not be sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})


class _Socket(Protocol):
    """What the pumps need from either side (server- and client-side sockets)."""

    async def receive(self, timeout: float | None = None) -> WSMessageNoDecodeText: ...  # noqa: ASYNC109

    async def send_frame(
        self, message: bytes, opcode: WSMsgType, compress: int | None = None
    ) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


@dataclass(eq=False, slots=True)
class WebSocketPair:
    """An open proxied socket: the client side and the upstream side."""

    client: web.WebSocketResponse[bool]
    upstream: ClientWebSocketResponse[bool]

    async def close(self, code: int, message: bytes = b"") -> None:
        """Close both sides (their pumps see CLOSING and end)."""
        await asyncio.gather(
            self.client.close(code=code, message=message),
            self.upstream.close(code=code, message=message),
        )

    async def end(self, code: int, reason: str) -> None:
        """Close both sides with ``code`` and a text ``reason`` (a re-check's denial)."""
        await self.close(code, reason.encode()[:123])


#: Called once a proxied socket is open; returns what to call when it ends.
OnOpen = Callable[[WebSocketPair], Callable[[], None]]


async def proxy_websocket(
    request: web.Request,
    session: ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    settings: Settings,
    *,
    registry: MutableSet[WebSocketPair] | None = None,
    on_open: OnOpen | None = None,
    request_id: str = "-",
) -> web.StreamResponse:
    """Proxy one WebSocket connection. ``headers`` are the filtered upstream headers (cookies,
    auth, X-Forwarded-*); ``registry`` (optional) tracks open sockets for shutdown; ``on_open``
    (optional) is called with the pair once both sides are open and returns what to call when
    the socket ends (the re-check watch, :mod:`gateway.watch`); ``request_id`` goes into the
    log line of a failed handshake. The upstream handshake is
    bounded by the session's READ_TIMEOUT; an open socket has no idle timeout. ``settings``
    renders the refusals."""
    offered = _offered_protocols(request)
    # The probe only validates the handshake; it knows the client's protocols so that aiohttp
    # does not log a false "protocols don't overlap" warning for every socket (the upstream
    # picks the protocol, below).
    probe: web.WebSocketResponse[bool] = web.WebSocketResponse(protocols=_probe_protocols(request))
    if not probe.can_prepare(request).ok:
        return bad_handshake()
    for name in _HANDSHAKE_HEADERS:
        headers.popall(name, None)
    try:
        upstream = await session.ws_connect(
            url,
            headers=headers,
            protocols=offered,
            compress=0,  # localhost hop: compression would only cost CPU
            max_msg_size=0,
            decode_text=False,
            autoclose=False,  # a close is relayed to the client before it is answered
            timeout=ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
        )
    except WSServerHandshakeError as exc:
        return websocket_refused(request, settings, exc, request_id)
    except (ClientError, TimeoutError) as exc:
        return upstream_failure(request, settings, exc, request_id)
    try:
        return await _serve(request, upstream, registry, on_open)
    finally:
        # No-op after a relayed close; otherwise (the handler was cancelled because the client
        # vanished) the app hears "going away".
        await upstream.close(code=WSCloseCode.GOING_AWAY)


async def _serve(
    request: web.Request,
    upstream: ClientWebSocketResponse[bool],
    registry: MutableSet[WebSocketPair] | None,
    on_open: OnOpen | None,
) -> web.StreamResponse:
    client: web.WebSocketResponse[bool] = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        max_msg_size=CLIENT_MAX_MSG_SIZE,
        timeout=CLOSE_TIMEOUT,
        decode_text=False,
        autoclose=False,  # a close is relayed upstream before it is answered
    )
    try:
        await client.prepare(request)
    except ConnectionError:
        return client  # the client left during the handshake
    pair = WebSocketPair(client, upstream)
    if registry is not None:
        registry.add(pair)
    on_end = on_open(pair) if on_open is not None else None
    going_away, failed = WSCloseCode.GOING_AWAY, WSCloseCode.INTERNAL_ERROR
    tasks = (
        asyncio.create_task(_pump(client, upstream, vanished=going_away, failed=failed)),
        asyncio.create_task(_pump(upstream, client, vanished=failed, failed=going_away)),
    )
    try:
        # The pump that sees the end closes both sides, which ends the other pump.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait(tasks, timeout=2 * CLOSE_TIMEOUT)
    finally:
        if registry is not None:
            registry.discard(pair)
        if on_end is not None:
            on_end()
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log_event(
                    log,
                    "websocket_pump_failed",
                    level=logging.WARNING,
                    path=request.path,
                    error=type(result).__name__,
                    detail=str(result),
                )
    return client


async def _pump(src: _Socket, dst: _Socket, *, vanished: int, failed: int) -> None:
    """Relay frames from ``src`` to ``dst`` until ``src`` ends.

    A close frame is relayed to ``dst`` (same code and reason) and then answered on ``src``.
    ``vanished`` is sent to ``dst`` when ``src`` disappears without a close frame, ``failed`` to
    ``src`` when ``dst`` can no longer be written to. CLOSING means we are closing ``src``
    ourselves (the other pump relaying a close, or shutdown): nothing left to do here.
    """
    while True:
        msg = await src.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            try:
                await dst.send_frame(msg.data, kind)
            except ConnectionError:
                await src.close(code=failed)
                return
            continue
        if kind is WSMsgType.CLOSE:
            code, reason = _sendable(msg.data), (msg.extra or "").encode()[:123]
            await dst.close(code=code, message=reason)
            await src.close(code=code, message=reason)
        elif kind is WSMsgType.ERROR or kind is WSMsgType.CLOSED:
            log_event(log, "websocket_ended", level=logging.DEBUG, kind=kind.name,
                      detail=str(msg.data))  # fmt: skip
            await dst.close(code=vanished)
        elif kind is not WSMsgType.CLOSING:
            continue  # PING/PONG only surface with autoping off
        return


def _sendable(code: int | None) -> int:
    if code is None or code in _UNSENDABLE or not 1000 <= code <= 4999:
        return WSCloseCode.OK
    return code


def _probe_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    # Exactly the list aiohttp's handshake compares with (the first header, split on commas).
    return tuple(p.strip() for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(","))


def _offered_protocols(request: web.BaseRequest) -> list[str]:
    return [
        proto.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for proto in value.split(",")
        if proto.strip()
    ]
