"""HTTP reverse proxy: stream a request to the upstream app and its answer back.

Nothing is buffered: the request body is handed to the upstream request as a stream (chunked
when the client sent no Content-Length) and the response is relayed chunk by chunk, so uploads,
downloads and SSE streams of any size or duration use bounded memory. Paths, queries and bodies
(compressed ones included) pass byte-exact; hop-by-hop headers are stripped both ways.
WebSocket upgrades are handed to :mod:`gateway.proxy_ws`; which headers cross is
:mod:`gateway.proxy_headers`; error answers are :mod:`gateway.responses`.
"""

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

from aiohttp import (
    ClientError,
    ClientRequest,
    ClientResponse,
    ClientSession,
    ClientTimeout,
    DummyCookieJar,
    StreamReader,
    TCPConnector,
    WSCloseCode,
    hdrs,
    web,
)
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict
from yarl import URL

from gateway.forwarded import ClientInfo
from gateway.inject import MAX_INJECT_BYTES, badge_tag, inject, should_inject
from gateway.limits import (
    RETRY_AFTER,
    Limits,
    UpstreamPool,
    WebSocketSlots,
    current_fd_limit,
    plan_limits,
    websockets_busy,
)
from gateway.logs import log_event
from gateway.proxy_headers import (
    APP_USAGE_HEADER,
    HeaderPolicy,
    build_request_headers,
    copy_response_headers,
)
from gateway.proxy_ws import OnOpen, WebSocketPair, proxy_websocket
from gateway.responses import error_response, log_upstream_error, upstream_failure
from gateway.settings import Settings
from gateway.watch import Watch

__all__ = ["KEEPALIVE_TIMEOUT", "UpstreamProxy"]

log = logging.getLogger(__name__)

_EMPTY_BODY_STATUS = frozenset({204, 304})

# Below the idle timeout of common app servers (uvicorn 5 s), so a pooled connection is not
# reused just as the app closes it.
KEEPALIVE_TIMEOUT = 4.0


class _UpstreamRequest(ClientRequest):
    """A client request that carries the client's headers and nothing aiohttp would invent.

    aiohttp adds Accept, Accept-Encoding, User-Agent and a body Content-Type when they are
    missing; upstream, an invented Accept-Encoding makes the app compress for a client that
    never asked.

    This leans on aiohttp internals: the ``update_headers`` / ``update_auto_headers`` steps of
    ``ClientRequest.__init__`` and the private ``_skip_auto_headers`` it reads when a body is
    attached and for the default Content-Type. The public way, the session's
    ``skip_auto_headers``, gives the same bytes but rebuilds a skip set and copies the headers
    on every request (the hot path). ``test_aiohttp_request_internals_we_rely_on`` in
    ``tests/test_proxy_http.py`` fails by name when an aiohttp upgrade changes them.
    """

    def update_headers(self, headers: LooseHeaders | None) -> None:
        """The upstream's Host, then ``headers`` copied in C (aiohttp adds them one by one in
        Python). With a Host of its own in ``headers`` (``PRESERVE_HOST``), aiohttp's way."""
        if type(headers) is not CIMultiDict or hdrs.HOST in headers:
            super().update_headers(headers)
            return
        host = self.url.host_port_subcomponent
        assert host is not None  # an absolute URL
        out: CIMultiDict[str] = CIMultiDict()
        out[hdrs.HOST] = host
        out.extend(headers)
        self.headers = out

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _SKIP_CONTENT_TYPE  # read when a body is attached


_SKIP_CONTENT_TYPE: CIMultiDict[None] = CIMultiDict({hdrs.CONTENT_TYPE: None})


class StreamRevoked(Exception):
    """A re-check denied a streamed response (:mod:`gateway.watch`); raised in its pump."""


class UpstreamProxy:
    """Forwards requests to ``settings.upstream_url`` over one shared ClientSession.

    ``watch`` (optional) re-checks open WebSockets and streamed responses of signed-in users
    (:mod:`gateway.watch`); without it they last as long as they are open.
    """

    def __init__(
        self, settings: Settings, watch: Watch | None = None, limits: Limits | None = None
    ) -> None:
        self._settings = settings
        self.watch = watch
        if limits is None:
            limits = plan_limits(settings, current_fd_limit())
        self._ws_slots = WebSocketSlots(limits.max_websockets, limits.max_websockets_per_user)
        #: upstream connections in use; the connector's own limit is the same size
        self.pool = UpstreamPool(limits.upstream_connections)
        self._base = settings.upstream_url.rstrip("/")
        self._policy = HeaderPolicy.from_settings(settings)
        self._session: ClientSession | None = None
        self._websockets: set[WebSocketPair] = set()
        #: Given the request and the app's ``X-Gate-Usage`` values of its response (usage
        #: meters on; :mod:`gateway.usage.hook`).
        self.on_usage: Callable[[web.Request, list[str]], None] | None = None
        # The badge only makes sense where the gate knows who is paying.
        self._badge = (
            badge_tag(settings.gate_prefix)
            if settings.inject_badge and settings.billing_enabled
            else None
        )

    @property
    def session(self) -> ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamProxy.start() was not awaited")
        return self._session

    async def start(self) -> None:
        s = self._settings
        connector = TCPConnector(
            limit=self.pool.size, limit_per_host=0, keepalive_timeout=KEEPALIVE_TIMEOUT
        )
        self._session = ClientSession(
            connector=connector,
            # No total timeout: streams last. sock_read is the idle timeout: it waits for the
            # answer once the request body is sent, then between reads of the response.
            timeout=ClientTimeout(total=None, connect=s.connect_timeout, sock_read=s.read_timeout),
            auto_decompress=False,  # bodies pass through byte-exact, compressed or not
            cookie_jar=DummyCookieJar(),
            trust_env=False,
            request_class=_UpstreamRequest,
            requote_redirect_url=False,
        )

    async def close_websockets(self) -> None:
        """Close open client WebSockets with 1001 (for graceful shutdown: they would otherwise
        hold the shutdown for its whole timeout)."""
        pairs = list(self._websockets)
        await asyncio.gather(
            *(p.close(WSCloseCode.GOING_AWAY, b"server shutting down") for p in pairs)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(
        self, request: web.Request, client: ClientInfo, gate_headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """Proxy ``request``: WebSocket upgrades to :mod:`proxy_ws`, the rest over HTTP."""
        raw = request.raw_path
        if raw[:1] != "/":  # absolute-form or `*` request targets are not for us
            message = "Unsupported request target."
            return error_response(request, self._settings, 400, "bad_request", message)
        url = URL(self._base + raw, encoded=True)  # byte-exact: no re-encoding, no normalizing
        headers = build_request_headers(request, client, self._policy, gate_headers)
        user = gate_headers.get("X-Gate-User")
        upgrade = request.headers.get(hdrs.UPGRADE)
        if upgrade is not None and upgrade.lower() == "websocket" and request.method == "GET":
            slot = self._ws_slots.acquire(user or client.ip)
            if slot is None:
                return websockets_busy()
            with slot:
                if not self.pool.take():
                    return websockets_busy()
                try:
                    return await proxy_websocket(
                        request,
                        self.session,
                        url,
                        headers,
                        self._settings,
                        registry=self._websockets,
                        on_open=self._watch_socket(request, client, user),
                        request_id=client.request_id,
                    )
                finally:
                    self.pool.give()
        if not self.pool.take():
            return self._busy(request)
        try:
            return await self._forward(request, client, url, headers, user)
        finally:
            self.pool.give()

    def _busy(self, request: web.Request) -> web.Response:
        """Every upstream connection is in use: a fast 503 (waiting for one would end in a
        504 after CONNECT_TIMEOUT)."""
        log_event(
            log, "upstream_pool_full", level=logging.WARNING, size=self.pool.size, path=request.path
        )
        message = "The app is busy with other requests; retry shortly."
        headers = {"Retry-After": str(RETRY_AFTER)}
        return error_response(
            request, self._settings, 503, "upstream_busy", message, headers=headers
        )

    def _watch_socket(
        self, request: web.Request, client: ClientInfo, user: str | None
    ) -> OnOpen | None:
        watch = self.watch
        if watch is None or not user:
            return None  # anonymous (a public path): nothing to re-check

        def on_open(pair: WebSocketPair) -> Callable[[], None]:
            watched = watch.add(request, client, user, "websocket", pair.end)
            return lambda: watch.remove(watched)

        return on_open

    async def _forward(
        self,
        request: web.Request,
        client: ClientInfo,
        url: URL,
        headers: CIMultiDict[str],
        user: str | None = None,
    ) -> web.StreamResponse:
        try:
            upstream = await self.session.request(
                request.method,
                url,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except (ClientError, TimeoutError) as exc:
            return upstream_failure(request, self._settings, exc, client.request_id)
        if self.on_usage is not None and APP_USAGE_HEADER in upstream.headers:
            self.on_usage(request, upstream.headers.getall(APP_USAGE_HEADER))
        try:
            return await self._relay(request, client, upstream, user)
        finally:
            # Closes the upstream connection unless its body was read to the end, which is
            # what cancels the upstream request when the client went away.
            upstream.release()

    async def _relay(
        self, request: web.Request, client: ClientInfo, upstream: ClientResponse, user: str | None
    ) -> web.StreamResponse:
        no_body = request.method == hdrs.METH_HEAD or upstream.status in _EMPTY_BODY_STATUS
        if (
            self._badge is not None
            and not no_body
            and should_inject(upstream.status, upstream.headers)
        ):
            return await self._with_badge(request, client, upstream, self._badge, user)
        if upstream.content.is_eof() and not no_body:
            return self._complete(client, upstream)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        copy_response_headers(upstream.headers, response.headers)
        if hdrs.LOCATION in response.headers:
            self._rewrite_location(response.headers, client)
        try:
            await response.prepare(request)
        except ConnectionError:
            return response  # the client is gone; aiohttp logs the request as reset
        if no_body:
            return response
        reader = upstream.content
        return await self._pump(request, client, reader, response, user)

    async def _pump(
        self,
        request: web.Request,
        client: ClientInfo,
        reader: StreamReader,
        response: web.StreamResponse,
        user: str | None,
    ) -> web.StreamResponse:
        """Copy the rest of the upstream body to the prepared ``response`` as it arrives; a
        signed-in user's stream is watched (re-checked) while it lasts."""
        watch = self.watch
        if watch is None or not user:
            return await self._copy(request, client, reader, response)

        async def end(code: int, reason: str) -> None:
            # Cut the client connection at once (abort: a slow reader must not hold it) and
            # wake the pump, wherever it waits.
            if request.transport is not None:
                request.transport.abort()
            reader.set_exception(StreamRevoked(reason))

        watched = watch.add(request, client, user, "stream", end)
        try:
            return await self._copy(request, client, reader, response)
        except StreamRevoked:
            return response
        finally:
            watch.remove(watched)

    async def _copy(
        self,
        request: web.Request,
        client: ClientInfo,
        reader: StreamReader,
        response: web.StreamResponse,
    ) -> web.StreamResponse:
        while True:
            try:
                chunk = await reader.readany()
            except (ClientError, TimeoutError) as exc:
                self._abort_mid_stream(request, client, exc)
                return response
            if not chunk:
                return response
            try:
                await response.write(chunk)
            except ConnectionError:
                return response

    async def _with_badge(
        self,
        request: web.Request,
        client: ClientInfo,
        upstream: ClientResponse,
        tag: bytes,
        user: str | None,
    ) -> web.StreamResponse:
        """An HTML page with the badge's script tag. The page is buffered up to
        MAX_INJECT_BYTES; a larger one (chunked, so its size was unknown) streams untouched."""
        chunks: list[bytes] = []
        size = 0
        reader = upstream.content
        while size <= MAX_INJECT_BYTES:
            try:
                chunk = await reader.readany()
            except (ClientError, TimeoutError) as exc:
                return upstream_failure(request, self._settings, exc, client.request_id)
            if not chunk:
                response = web.Response(
                    body=inject(b"".join(chunks), tag),
                    status=upstream.status,
                    reason=upstream.reason,
                )
                copy_response_headers(upstream.headers, response.headers)
                response.headers.popall(hdrs.CONTENT_LENGTH, None)  # the body grew
                response.headers.popall(hdrs.ETAG, None)  # not the upstream's bytes any more
                if hdrs.LOCATION in response.headers:
                    self._rewrite_location(response.headers, client)
                return response
            chunks.append(chunk)
            size += len(chunk)
        stream = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        copy_response_headers(upstream.headers, stream.headers)
        try:
            await stream.prepare(request)
            await stream.write(b"".join(chunks))
        except ConnectionError:
            return stream
        return await self._pump(request, client, reader, stream, user)

    def _complete(self, client: ClientInfo, upstream: ClientResponse) -> web.Response:
        """The whole body came with the headers (most small responses): send it as one
        ``Response``, so status line, headers and body leave in a single write."""
        response = web.Response(
            body=upstream.content.read_nowait(), status=upstream.status, reason=upstream.reason
        )
        copy_response_headers(upstream.headers, response.headers)
        if hdrs.LOCATION in response.headers:
            self._rewrite_location(response.headers, client)
        return response

    def _rewrite_location(self, headers: CIMultiDict[str], client: ClientInfo) -> None:
        """Absolute redirects to the upstream's own address point at the gate instead (like
        nginx's ``proxy_redirect default``)."""
        location = headers[hdrs.LOCATION]
        if not location.startswith(self._base):
            return
        rest = location[len(self._base) :]
        if rest and rest[0] not in "/?#":
            return  # http://app:80 vs http://app:8080/...: a different origin
        public = self._settings.public_url or (
            f"{client.scheme}://{client.host}" if client.host else ""
        )
        if public:
            headers[hdrs.LOCATION] = public + (rest or "/")

    def _abort_mid_stream(
        self, request: web.Request, client: ClientInfo, exc: BaseException
    ) -> None:
        """The status line is already sent: all we can do is cut the client connection, so
        the client sees a truncated body rather than a falsely complete one."""
        log_upstream_error(log, "upstream_error_mid_stream", request, exc, client.request_id)
        if request.transport is not None:
            request.transport.close()
