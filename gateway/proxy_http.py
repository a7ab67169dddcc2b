"""HTTP reverse proxy: stream a request to the upstream app and its answer back.

Nothing is buffered: the request body is handed to the upstream request as a stream (chunked
when the client sent no Content-Length) and the response is relayed chunk by chunk, so uploads,
downloads and SSE streams of any size or duration use bounded memory. Paths, queries and bodies
(compressed ones included) pass byte-exact; hop-by-hop headers are stripped both ways.
WebSocket upgrades are handed to :mod:`gateway.proxy_ws`.
"""

import asyncio
import html
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.forwarded import ClientInfo
from gateway.inject import MAX_INJECT_BYTES, badge_tag, inject, should_inject
from gateway.logs import log_event
from gateway.proxy_ws import WebSocketPair, proxy_websocket
from gateway.settings import SESSION_COOKIE, Settings

log = logging.getLogger(__name__)

#: Headers that describe one connection, not the message (RFC 9110 §7.6.1); never forwarded.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
    }
)
# Host is the upstream's own (unless PRESERVE_HOST). Expect is answered by the gate (aiohttp
# sends the 100 Continue), so it is not repeated upstream. (X-Forwarded-* and X-Request-Id are
# always overwritten from ClientInfo.)
_REPLACED = frozenset({"host", "expect"})
# Client-controlled claims about the client that only a trusted proxy may make.
_TRUSTED_ONLY = frozenset({"forwarded", "x-real-ip"})
_GATE_HEADER_PREFIX = "x-gate-"
_X_REQUEST_ID = "X-Request-Id"
_EMPTY_BODY_STATUS = frozenset({204, 304})

#: Upstream connection pool. WebSockets hold a connection each, so the bound is generous.
MAX_CONNECTIONS = 1024
# Below the idle timeout of common app servers (uvicorn 5 s), so a pooled connection is not
# reused just as the app closes it.
KEEPALIVE_TIMEOUT = 4.0


class _UpstreamRequest(ClientRequest):
    """A client request that carries the client's headers and nothing aiohttp would invent.

    aiohttp adds Accept, Accept-Encoding, User-Agent and a body Content-Type when they are
    missing; upstream, an invented Accept-Encoding makes the app compress for a client that
    never asked. (The session's ``skip_auto_headers`` option does the same, but rebuilds its
    skip set on every request.)
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


#: Distinct header-name lists (and stripped Cookie values) remembered by a :class:`HeaderPolicy`;
#: past this many the memo starts over (a client inventing header names can't grow it).
PLAN_CACHE_SIZE = 512
#: Cookie headers longer than this are stripped every time rather than remembered.
MAX_MEMO_COOKIE = 4096


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to do with one list of incoming header names (in order, as sent)."""

    remove: tuple[str, ...]  # lower-case names to drop: policy, X-Gate-*
    connection: bool  # a Connection header: drop the headers it names too
    cookie: bool  # a Cookie header: strip the gate's cookie from it


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Header sets precomputed once from settings (the per-request path only does lookups).

    Requests from one kind of client carry the same header names in the same order, so what
    to remove is worked out once per distinct name list (and peer trust) and remembered, as is
    each distinct ``Cookie`` value with the gate's cookie stripped.
    """

    drop_trusted: frozenset[str]
    drop_untrusted: frozenset[str]
    preserve_host: bool
    _plans: dict[tuple[bool, tuple[str, ...]], _Plan] = field(
        default_factory=dict, compare=False, repr=False
    )
    _cookies: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "HeaderPolicy":
        trusted = HOP_BY_HOP | _REPLACED
        untrusted = trusted | _TRUSTED_ONLY
        if settings.identity_header:
            untrusted |= {settings.identity_header.lower()}
        return cls(trusted, untrusted, settings.preserve_host)

    def plan(self, names: tuple[str, ...], peer_trusted: bool) -> _Plan:
        key = (peer_trusted, names)
        plan = self._plans.get(key)
        if plan is None:
            drop = self.drop_trusted if peer_trusted else self.drop_untrusted
            lower = {name.lower() for name in names}
            remove = sorted(n for n in lower if n in drop or n.startswith(_GATE_HEADER_PREFIX))
            plan = _Plan(tuple(remove), "connection" in lower, "cookie" in lower)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def strip_gate_cookie(self, value: str) -> str:
        """``value`` (a Cookie header) without the gate's cookie (remembered); ``value`` itself
        when it has none."""
        if SESSION_COOKIE not in value:
            return value
        kept = self._cookies.get(value)
        if kept is None:
            kept = strip_cookie(value, SESSION_COOKIE)
            if len(value) <= MAX_MEMO_COOKIE:
                if len(self._cookies) >= PLAN_CACHE_SIZE:
                    self._cookies.clear()
                self._cookies[value] = kept
        return kept


def upstream_request_headers(
    request: web.BaseRequest,
    client: ClientInfo,
    settings: Settings,
    gate_headers: Mapping[str, str],
) -> CIMultiDict[str]:
    """The headers to send upstream for ``request`` (see :func:`build_request_headers`)."""
    return build_request_headers(
        request, client, HeaderPolicy.from_settings(settings), gate_headers
    )


def build_request_headers(
    request: web.BaseRequest,
    client: ClientInfo,
    policy: HeaderPolicy,
    gate_headers: Mapping[str, str],
) -> CIMultiDict[str]:
    """Incoming headers minus hop-by-hop ones, ``X-Gate-*``, untrusted identity claims and the
    gate's cookie; plus ``X-Forwarded-*``, ``X-Request-Id`` and ``gate_headers``.

    Written for the hot path: the headers are copied in C and the few unwanted ones removed by
    name (names worked out once per distinct list of incoming names, see :class:`HeaderPolicy`),
    rather than every header being inspected in Python.
    """
    incoming = request.headers
    out: CIMultiDict[str] = CIMultiDict(incoming)
    plan = policy.plan(tuple(incoming.keys()), client.peer_trusted)
    if plan.connection:
        _remove(out, incoming.get(hdrs.CONNECTION), frozenset())
    for name in plan.remove:
        out.popall(name, None)
    if plan.cookie:
        _strip_gate_cookie(out, policy)
    # Always overwritten (or removed): only ClientInfo speaks about the client.
    if client.forwarded_for:
        out[hdrs.X_FORWARDED_FOR] = client.forwarded_for
    else:
        out.popall(hdrs.X_FORWARDED_FOR, None)
    out[hdrs.X_FORWARDED_PROTO] = client.scheme
    if client.host:
        out[hdrs.X_FORWARDED_HOST] = client.host
    else:
        out.popall(hdrs.X_FORWARDED_HOST, None)
    if client.request_id:
        out[_X_REQUEST_ID] = client.request_id
    else:
        out.popall(_X_REQUEST_ID, None)
    if policy.preserve_host:
        host = incoming.get(hdrs.HOST)
        if host:
            out[hdrs.HOST] = host
    if gate_headers:
        out.update(gate_headers)
    return out


def _strip_gate_cookie(headers: CIMultiDict[str], policy: HeaderPolicy) -> None:
    """Remove the gate's cookie from every Cookie header (one left empty goes); headers
    without it stay as they are, in place."""
    values = headers.getall(hdrs.COOKIE, ())
    if len(values) == 1:  # the usual case
        kept = policy.strip_gate_cookie(values[0])
        if kept is values[0]:
            return
        if kept:
            headers[hdrs.COOKIE] = kept
        else:
            del headers[hdrs.COOKIE]
        return
    if SESSION_COOKIE not in "\n".join(values):
        return
    headers.popall(hdrs.COOKIE)
    for value in values:
        kept = policy.strip_gate_cookie(value)
        if kept:
            headers.add(hdrs.COOKIE, kept)


def strip_cookie(header: str, name: str) -> str:
    """``header`` (a Cookie value) without the ``name`` cookie; other pairs stay byte-exact."""
    kept = [p for p in header.split(";") if p.split("=", 1)[0].strip() != name]
    return ";".join(kept).strip()


def copy_response_headers(upstream: CIMultiDictProxy[str], out: CIMultiDict[str]) -> None:
    """Upstream response headers minus hop-by-hop ones (multiple Set-Cookie kept). Copied in
    C, then the few hop-by-hop names removed, like the request headers."""
    out.extend(upstream)
    _remove(out, upstream.get(hdrs.CONNECTION), HOP_BY_HOP)


def _remove(headers: CIMultiDict[str], connection: str | None, names: frozenset[str]) -> None:
    """Remove ``names`` and the headers that ``connection`` (the Connection header) names."""
    if connection is not None:
        for token in connection.split(","):
            token = token.strip()
            if token and token in headers:
                del headers[token]
    for name in names:
        if name in headers:
            del headers[name]


def error_response(request: web.BaseRequest, status: int, code: str, message: str) -> web.Response:
    """A small HTML page for browsers, JSON ``{"error", "message"}`` for everything else."""
    headers = {hdrs.CACHE_CONTROL: "no-store"}
    if "text/html" in request.headers.get(hdrs.ACCEPT, ""):
        title = html.escape(f"{status} {_TITLES.get(code, code)}")
        page = _PAGE.format(title=title, message=html.escape(message))
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


_TITLES = {
    "bad_gateway": "Bad Gateway",
    "gateway_timeout": "Gateway Timeout",
    "bad_request": "Bad Request",
    "not_found": "Not Found",
}
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:15vh auto;padding:0 1rem;
color:#222}}h1{{font-size:1.4rem}}</style></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""
MSG_UNREACHABLE = "The app is not reachable right now. Please try again in a moment."
MSG_TIMEOUT = "The app took too long to answer. Please try again in a moment."


def upstream_failure(
    request: web.BaseRequest, client: ClientInfo | None, exc: BaseException
) -> web.Response:
    """Log an upstream failure (before any response byte was sent) and answer 502 or 504."""
    timeout = isinstance(exc, TimeoutError)
    status, code = (504, "gateway_timeout") if timeout else (502, "bad_gateway")
    log_event(
        log,
        "upstream_error",
        level=logging.WARNING,
        status=status,
        method=request.method,
        path=request.path,
        error=type(exc).__name__,
        detail=str(exc),
        rid=client.request_id if client else "-",
    )
    return error_response(request, status, code, MSG_TIMEOUT if timeout else MSG_UNREACHABLE)


class UpstreamProxy:
    """Forwards requests to ``settings.upstream_url`` over one shared ClientSession."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._base = settings.upstream_url.rstrip("/")
        self._policy = HeaderPolicy.from_settings(settings)
        self._session: ClientSession | None = None
        self._websockets: set[WebSocketPair] = set()
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
            limit=MAX_CONNECTIONS, limit_per_host=0, keepalive_timeout=KEEPALIVE_TIMEOUT
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
            return error_response(request, 400, "bad_request", "Unsupported request target.")
        url = URL(self._base + raw, encoded=True)  # byte-exact: no re-encoding, no normalizing
        headers = build_request_headers(request, client, self._policy, gate_headers)
        upgrade = request.headers.get(hdrs.UPGRADE)
        if upgrade is not None and upgrade.lower() == "websocket" and request.method == "GET":
            return await proxy_websocket(
                request, self.session, url, headers, self._settings, registry=self._websockets
            )
        return await self._forward(request, client, url, headers)

    async def _forward(
        self, request: web.Request, client: ClientInfo, url: URL, headers: CIMultiDict[str]
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
            return upstream_failure(request, client, exc)
        try:
            return await self._relay(request, client, upstream)
        finally:
            # Closes the upstream connection unless its body was read to the end, which is
            # what cancels the upstream request when the client went away.
            upstream.release()

    async def _relay(
        self, request: web.Request, client: ClientInfo, upstream: ClientResponse
    ) -> web.StreamResponse:
        no_body = request.method == hdrs.METH_HEAD or upstream.status in _EMPTY_BODY_STATUS
        if (
            self._badge is not None
            and not no_body
            and should_inject(upstream.status, upstream.headers)
        ):
            return await self._with_badge(request, client, upstream, self._badge)
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
        return await self._pump(request, client, reader, response)

    async def _pump(
        self,
        request: web.Request,
        client: ClientInfo,
        reader: StreamReader,
        response: web.StreamResponse,
    ) -> web.StreamResponse:
        """Copy the rest of the upstream body to the prepared ``response`` as it arrives."""
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
        self, request: web.Request, client: ClientInfo, upstream: ClientResponse, tag: bytes
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
                return upstream_failure(request, client, exc)
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
        return await self._pump(request, client, reader, stream)

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
        log_event(
            log,
            "upstream_error_mid_stream",
            level=logging.WARNING,
            method=request.method,
            path=request.path,
            error=type(exc).__name__,
            detail=str(exc),
            rid=client.request_id,
        )
        if request.transport is not None:
            request.transport.close()
