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

The package: :mod:`.answers` (the canned 503 and 408, the refused connection's protocol),
:mod:`.handler` (one connection: its phase and clocks), :mod:`.limiter` (the caps, eviction,
probe slots and per-client accounting), :mod:`.site` (the ``TCPSite`` that serves through it).
"""

from gateway.connections.answers import (
    BODY_TIMEOUT_ANSWER,
    PROBE_HEADER_TIMEOUT,
    PROBE_SLOTS_PER_IP,
    REFUSAL,
    REFUSAL_LINGER,
)
from gateway.connections.handler import LimitedHandler, Phase
from gateway.connections.limiter import ConnectionLimiter, client_key
from gateway.connections.site import LimitedSite

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
