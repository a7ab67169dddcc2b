"""The connection limiter: the protocol factory that counts connections, evicts the
longest-idle one at ``MAX_CONNECTIONS``, hands out probe slots, refuses beyond them, and
keeps each client's share (connections of a direct peer, requests in progress of a forwarded
client). The rules are in the package docstring."""

import asyncio
import functools
import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from gateway.connections.answers import PROBE_SLOTS_PER_IP, REFUSAL_LINGER, Refusal
from gateway.connections.handler import LimitedHandler, RequestHandler, Verdict
from gateway.forwarded import TrustedNetworks, forwarded_client
from gateway.limits import PROBE_SLOTS, Limits
from gateway.logs import log_event

log = logging.getLogger("gateway.connections")

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


class Client:
    """One client's share: its connections (direct peers), the idle ones oldest first, and
    the probe slots it holds."""

    __slots__ = ("connections", "idle", "key", "probes")

    def __init__(self, key: str) -> None:
        self.key = key
        self.connections = 0
        self.probes = 0
        self.idle: OrderedDict[LimitedHandler, None] = OrderedDict()


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
        self.clients: dict[str, Client] = {}
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
        self._logged_at: dict[str, float] = {}  # event: when it was last logged
        # The server's request factory runs once per complete request head: the one hook
        # aiohttp offers between "head parsed" and "handler runs"; its request handler is
        # called right after, with the request. Handlers copy both when they are created, so
        # they are wrapped before the first one.
        inner_factory: _RequestFactory = server.request_factory
        inner_handler: RequestHandler = server.request_handler
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
        return Refusal(self)

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
        a probe slot). False: refused, and the transport handed to a :class:`Refusal`."""
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
            client = self.clients[key] = Client(key)
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
        self, handler: LimitedHandler, client: Client, transport: asyncio.BaseTransport
    ) -> bool:
        self.refused += 1
        self._forget(handler)
        if not client.connections and not client.probes:
            self.clients.pop(client.key, None)
        refusal = Refusal(self)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)
        return False

    def is_probe(self, message: RawRequestMessage) -> bool:
        """``GET``/``HEAD`` of ``GATE_PREFIX/healthz`` or ``/readyz``."""
        return message.method in ("GET", "HEAD") and message.url.path in self.limits.probe_paths

    def claim_request(self, handler: LimitedHandler, message: RawRequestMessage) -> Verdict | None:
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
            return Verdict.BUSY
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

    def _evict_idle_of(self, client: Client) -> bool:
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
        limits = self.limits
        self._warn_at_most_every_minute(
            "connections_at_limit",
            max_connections=limits.max_connections,
            max_connections_per_ip=limits.max_connections_per_ip,
            evicted=self.evicted,
            refused=self.refused,
            probe_slots_used=self.probe_slots_used,
            client_limited=self.client_limited,
            hint="raise LimitNOFILE / MAX_CONNECTIONS or WORKERS if this is real traffic",
        )

    def warn_body_timeout(self) -> None:
        limits = self.limits
        self._warn_at_most_every_minute(
            "body_timeout",
            body_timeout_s=limits.body_timeout,
            body_min_rate=limits.body_min_rate,
            body_timeouts=self.body_timeouts,
            hint="raise BODY_TIMEOUT or lower BODY_MIN_RATE if these are real uploads",
        )

    def _warn_at_most_every_minute(self, event: str, **fields: object) -> None:
        """A warning ``event``, logged at most once per ``_LOG_INTERVAL``: a flood of
        evictions or cut bodies is one line a minute, its counts in the fields."""
        now = self.loop.time()
        if now - self._logged_at.get(event, -_LOG_INTERVAL) < _LOG_INTERVAL:
            return
        self._logged_at[event] = now
        log_event(log, event, level=logging.WARNING, **fields)
