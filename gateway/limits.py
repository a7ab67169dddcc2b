"""Resource limits: the open-file budget, the connection and WebSocket caps derived from it,
and the per-user / per-worker WebSocket accounting.

Every client connection costs one descriptor, and while it is proxied (an HTTP request in
flight, or a WebSocket) one more for its upstream connection. So with ``N`` open files a worker
can serve ``(N - RESERVED_FDS) / 2`` client connections without ever failing ``accept()`` or an
upstream connect with ``EMFILE``. ``RESERVED_FDS`` covers what is not a client connection:

* ``BASE_FDS`` (64): stdio, the event loop, the listening socket, the store's files (SQLite:
  database, WAL, shared memory), signal pipes, Stripe and SMTP connections (measured at
  startup: well under half of it, see tests/test_limits.py);
* ``ACCEPT_BURST`` (128, the listen backlog): asyncio accepts up to that many sockets in one
  loop iteration before the connection cap sees any of them;
* ``MAX_LINGERING_REFUSALS`` (16): sockets that were answered 503 and are being closed;
* ``PROBE_SLOTS`` (16): connections beyond the cap that may still ask for ``healthz`` or
  ``readyz`` (one descriptor each: probes are answered by the gate, never proxied).

With the systemd default of 1,024 that is 400 connections per worker; the gate raises its soft
limit to the hard one at startup (:func:`raise_fd_limit`), so with the shipped unit
(``LimitNOFILE=65536``) the automatic cap is ``AUTO_MAX_CONNECTIONS``. An explicit
``MAX_CONNECTIONS`` above the budget is lowered to it (and logged): the budget is what keeps
``/_gate/healthz`` answering.
"""

import dataclasses
import logging
import resource
from collections import Counter
from collections.abc import Hashable

from aiohttp import web

from gateway.logs import log_event
from gateway.settings import IPNetwork, Settings

__all__ = [
    "ACCEPT_BURST",
    "AUTO_MAX_CONNECTIONS",
    "BASE_FDS",
    "MAX_LINGERING_REFUSALS",
    "PROBE_SLOTS",
    "RESERVED_FDS",
    "RETRY_AFTER",
    "FdLimit",
    "Limits",
    "UpstreamPool",
    "WebSocketSlot",
    "WebSocketSlots",
    "apply_fd_limit",
    "connection_budget",
    "current_fd_limit",
    "plan_limits",
    "raise_fd_limit",
    "websockets_busy",
]

log = logging.getLogger("gateway.limits")

BASE_FDS = 64
ACCEPT_BURST = 128
MAX_LINGERING_REFUSALS = 16
PROBE_SLOTS = 16
RESERVED_FDS = BASE_FDS + ACCEPT_BURST + MAX_LINGERING_REFUSALS + PROBE_SLOTS
#: Upper bound of the automatic MAX_CONNECTIONS: beyond descriptors, each connection costs
#: memory (parser, buffers, a task); raise it explicitly for more.
AUTO_MAX_CONNECTIONS = 4096
#: Seconds a client is told to wait (``Retry-After``) when a cap answers 503.
RETRY_AFTER = 5
#: When the hard limit is "unlimited", the soft limit is raised to this (Linux's nr_open).
_FALLBACK_FD_LIMIT = 1_048_576


@dataclasses.dataclass(frozen=True)
class FdLimit:
    """``RLIMIT_NOFILE`` before and after :func:`raise_fd_limit`."""

    before: int
    soft: int
    hard: int
    error: str = ""


def current_fd_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> FdLimit:
    """Raise the soft open-file limit to the hard limit (no privilege needed). Returns what it
    was and what it is; a refusal (a hardened kernel, a sandbox) is reported, not raised: the
    caps are then derived from the lower limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _FALLBACK_FD_LIMIT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return FdLimit(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        return FdLimit(soft, soft, hard, error=str(exc))
    return FdLimit(soft, target, hard)


def connection_budget(fd_limit: int) -> int:
    """Client connections that ``fd_limit`` descriptors carry when each one is proxied."""
    return max(1, (fd_limit - RESERVED_FDS) // 2)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The effective per-worker limits (settings resolved against the descriptor budget)."""

    header_timeout: float
    keepalive_timeout: float
    max_connections: int
    max_websockets: int
    max_websockets_per_user: int
    #: connections to the upstream app (the proxy's pool)
    upstream_connections: int
    fd_limit: int
    #: connections (direct peers) or requests in progress (behind TRUSTED_PROXIES) per client
    max_connections_per_ip: int
    body_timeout: float
    body_min_rate: int
    trusted_proxies: tuple[IPNetwork, ...]
    #: the paths answered on the probe slots (``GATE_PREFIX``/healthz and /readyz)
    probe_paths: frozenset[str]
    #: MAX_CONNECTIONS was set above the budget and was lowered to it
    clamped: bool = False


def plan_limits(settings: Settings, fd_limit: int) -> Limits:
    """Resolve the ``0 = automatic`` settings and keep every cap within ``fd_limit``."""
    budget = connection_budget(fd_limit)
    wanted = settings.max_connections or min(budget, AUTO_MAX_CONNECTIONS)
    connections = min(wanted, budget)
    # WebSockets are connections too; by default they may take half of the slots, so plain
    # requests (healthz, page loads) always find room.
    websockets = min(settings.max_websockets or max(1, connections // 2), connections)
    # One client may take a quarter of the slots by default: it takes several to fill them,
    # and an office behind one NAT address still has room.
    per_ip = min(settings.max_connections_per_ip or max(1, connections // 4), connections)
    prefix = settings.gate_prefix
    return Limits(
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=connections,
        max_websockets=websockets,
        max_websockets_per_user=min(settings.max_websockets_per_user, websockets),
        # Each admitted client connection proxies at most one request (or one WebSocket) at a
        # time, so a pool as large as the connection cap never makes anyone wait for a slot.
        upstream_connections=min(settings.upstream_max_connections or connections, connections),
        fd_limit=fd_limit,
        clamped=wanted > budget,
        max_connections_per_ip=per_ip,
        body_timeout=settings.body_timeout,
        body_min_rate=settings.body_min_rate,
        trusted_proxies=settings.trusted_proxies,
        probe_paths=frozenset({f"{prefix}/healthz", f"{prefix}/readyz"}),
    )


def apply_fd_limit(settings: Settings) -> Limits:
    """At startup (before workers fork, so they inherit it): raise the open-file limit and
    log, once, the limit and the caps that follow from it."""
    fd = raise_fd_limit()
    limits = plan_limits(settings, fd.soft)
    level = logging.WARNING if fd.error or limits.clamped else logging.INFO
    log_event(
        log,
        "limits",
        level=level,
        nofile=fd.soft,
        nofile_before=fd.before,
        nofile_hard=fd.hard,
        max_connections=limits.max_connections,
        max_connections_clamped=limits.clamped,
        max_websockets=limits.max_websockets,
        max_websockets_per_user=limits.max_websockets_per_user,
        upstream_max_connections=limits.upstream_connections,
        max_connections_per_ip=limits.max_connections_per_ip,
        header_timeout_s=limits.header_timeout,
        keepalive_timeout_s=limits.keepalive_timeout,
        body_timeout_s=limits.body_timeout,
        body_min_rate=limits.body_min_rate,
        **({"raise_failed": fd.error} if fd.error else {}),
    )
    return limits


# ---------------------------------------------------------------- WebSocket accounting


class WebSocketSlot:
    """One open WebSocket's claim on :class:`WebSocketSlots`; :meth:`release` it when the
    socket ends (idempotent; also a context manager)."""

    __slots__ = ("_key", "_owner")

    def __init__(self, owner: "WebSocketSlots", key: Hashable) -> None:
        self._owner: WebSocketSlots | None = owner
        self._key = key

    def release(self) -> None:
        """Give the slot back (a second call does nothing)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self._key)

    def __enter__(self) -> "WebSocketSlot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WebSocketSlots:
    """Counts open WebSockets per worker and per user key; :meth:`acquire` refuses beyond
    either cap. Not thread-safe (one event loop per worker)."""

    def __init__(self, max_total: int, max_per_user: int) -> None:
        self.max_total = max_total
        self.max_per_user = max_per_user
        self._by_key: Counter[Hashable] = Counter()
        self._total = 0
        self.refused = 0  # for metrics and tests

    @property
    def total(self) -> int:
        return self._total

    def count(self, key: Hashable) -> int:
        return self._by_key[key]

    def acquire(self, key: Hashable) -> WebSocketSlot | None:
        """A slot for one more WebSocket of ``key`` (the customer id, or the client IP when
        anonymous), or None when the worker or that key is at its cap."""
        if self._total >= self.max_total or self._by_key[key] >= self.max_per_user:
            self.refused += 1
            return None
        self._total += 1
        self._by_key[key] += 1
        return WebSocketSlot(self, key)

    def _release(self, key: Hashable) -> None:
        self._total -= 1
        self._by_key[key] -= 1
        if self._by_key[key] <= 0:
            del self._by_key[key]


def websockets_busy() -> web.Response:
    """The answer to a WebSocket handshake beyond a cap (before upgrading): 503, retry later."""
    return web.json_response(
        {"error": "too_many_websockets", "message": "Too many open connections; retry shortly."},
        status=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


class UpstreamPool:
    """Counts the upstream connections in use (one per proxied request until its response is
    released, one per open WebSocket) against the pool's size, so a request that would have to
    wait for a free one is refused at once (:meth:`take` is None) instead of waiting out
    ``CONNECT_TIMEOUT`` and getting a 504. Not thread-safe (one event loop per worker)."""

    __slots__ = ("in_use", "refused", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self.refused = 0

    def take(self) -> bool:
        """Claim one connection; False (and counted) when all are in use."""
        if self.in_use >= self.size:
            self.refused += 1
            return False
        self.in_use += 1
        return True

    def give(self) -> None:
        self.in_use -= 1
