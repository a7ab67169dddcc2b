"""Several gate replicas on one PostgreSQL: every change reaches every replica within a second.

Each process (every worker of every replica) is one *replica* on the bus, named by a random
:attr:`ReplicaBus.replica_id`.

- **Out**: every change announced locally on :class:`~gateway.changes.Changes` (a customer's
  entitlement, a revoked session, "everyone") is queued and sent as one ``NOTIFY`` with a JSON
  payload ``{"o": origin, "k": kind, "key": …, "u": user}`` (:class:`~gateway.store.bus.PgChannel`).
  A send that fails (the database is away) is retried with backoff; the queue is bounded and
  collapses into one ``everyone`` when full.
- **In**: a dedicated ``LISTEN`` connection hears every notification; those from other origins
  are announced locally as ``Change(…, remote=True)``. The entitlement cache and the session
  cache drop their entries for it (:meth:`gateway.entitlement.Entitlements.on_remote`,
  :meth:`gateway.sessions.Sessions.on_remote`: L1, remembered verdicts, session entries), and
  :mod:`gateway.watch` re-checks the open WebSockets as for a local change. Remote changes are
  never sent on, so nothing loops.
- **Gaps**: while the listener is disconnected notifications are missed, so after every
  *re*-connect (backoff 0.1 s doubling to 5 s) the bus announces a remote ``everyone``: every
  in-process entry is dropped and re-read from the store, and the log says so
  (``replica_bus_reconnected … dropped=everything``). Nothing is dropped at the loss itself:
  while the database is away the in-process entries are what keeps paying users in.

:class:`StoreLeases` is the cross-replica singleflight the entitlement cache uses for cold
customers: a short lease in the database (:class:`~gateway.store.bus.PgLeases`) held by this
replica while it reads Stripe.

SQLite (one host) needs none of this: :func:`gateway.services.open_services` starts the bus
only on PostgreSQL — in the server and in the CLI alike, so ``gateway grant``/``revoke`` reach the
running replicas; closing the bus sends what is still queued first (bounded).
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable

from gateway.changes import Change, Changes
from gateway.logs import log_event
from gateway.store import StoreError
from gateway.store.bus import Listening, PgChannel, PgLeases

__all__ = ["LEASE_TTL", "LEASE_WAIT", "OUTBOX_SIZE", "ReplicaBus", "StoreLeases", "replica_name"]

log = logging.getLogger("gateway.replicas")

#: Changes queued while they cannot be sent; beyond, one ``everyone`` replaces them all.
OUTBOX_SIZE = 1000
#: A lease outlives a dead holder by at most this (seconds): a Stripe read is bounded well below.
LEASE_TTL = 10.0
#: How long a replica that did not get the lease waits for the holder's answer (seconds).
LEASE_WAIT = 2.0
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_PING_EVERY = 2.0
_START_WAIT = 2.0
_DRAIN_WAIT = 2.0
_KINDS = ("customer", "session", "everyone")


def replica_name() -> str:
    """A name for this process on the bus: host, pid and a random tail (a restarted process
    with a recycled pid is a new replica)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _encode(origin: str, change: Change) -> str:
    return json.dumps(
        {"o": origin, "k": change.kind, "key": change.key, "u": change.user},
        separators=(",", ":"),
    )


def _decode(payload: str) -> tuple[str, Change] | None:
    try:
        data = json.loads(payload)
        kind = data["k"]
        if kind not in _KINDS:
            return None
        return str(data["o"]), Change(kind, str(data["key"]), str(data["u"]), remote=True)
    except (ValueError, KeyError, TypeError):
        return None


class ReplicaBus:
    """Sends local changes to the other replicas and announces theirs here (see the module
    docstring). ``start()`` once in the running loop, ``close()`` on shutdown."""

    def __init__(
        self,
        channel: PgChannel,
        changes: Changes,
        *,
        replica_id: str | None = None,
        ping_every: float = _PING_EVERY,
    ) -> None:
        self._channel = channel
        self._changes = changes
        self.replica_id = replica_id or replica_name()
        self._ping_every = ping_every
        self._outbox: deque[Change] = deque()
        self._wake = asyncio.Event()
        #: set while the outbox is empty (``close`` waits on it to drain)
        self._empty = asyncio.Event()
        self._empty.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._unlisten: Callable[[], None] | None = None
        self._listening: Listening | None = None
        #: Whether the listener is connected now (for tests and metrics).
        self.connected = asyncio.Event()
        #: Counters for tests and metrics.
        self.sent = 0
        self.received = 0
        self.reconnects = 0

    async def start(self) -> None:
        """Listen for local changes and start the sender and the listener; the first
        connection is tried before returning (bounded), so a replica that starts with the
        database up hears its peers from its first request."""
        self._unlisten = self._changes.listen(self._on_local)
        self._tasks.append(asyncio.create_task(self._send_loop(), name="replica-bus-send"))
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="replica-bus-listen"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_START_WAIT):
                await self.connected.wait()

    async def close(self, drain: float = _DRAIN_WAIT) -> None:
        """Stop listening and sending. Changes still queued get up to ``drain`` seconds to go
        out first (a CLI command's grant or revoke is sent before the process exits); what is
        left unsent is logged."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._tasks and not self._empty.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await self._empty.wait()
        for task in self._tasks:
            task.cancel()
        for result in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log_event(log, "replica_bus_task_failed", level=logging.ERROR, error=repr(result))
        self._tasks.clear()
        if self._listening is not None:
            await self._listening.close()
            self._listening = None
        if self._outbox:
            log_event(log, "replica_bus_unsent", level=logging.WARNING, count=len(self._outbox))

    # --- out ----------------------------------------------------------------------------------

    def _on_local(self, change: Change) -> None:
        # A Changes listener: synchronous and quick; the send runs in _send_loop.
        if change.remote:
            return  # heard from another replica: it told everyone already
        if len(self._outbox) >= OUTBOX_SIZE:
            self._outbox.clear()
            change = Change("everyone")
        self._outbox.append(change)
        self._empty.clear()
        self._wake.set()

    async def _send_loop(self) -> None:
        backoff = _BACKOFF_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                change = self._outbox[0]
                try:
                    await self._channel.notify(_encode(self.replica_id, change))
                except StoreError as exc:
                    log_event(
                        log,
                        "replica_bus_send_failed",
                        level=logging.WARNING,
                        kind=change.kind,
                        queued=len(self._outbox),
                        retry_in=backoff,
                        error=str(exc),
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                backoff = _BACKOFF_FIRST
                if self._outbox and self._outbox[0] is change:
                    self._outbox.popleft()
                self.sent += 1
            self._empty.set()

    # --- in -----------------------------------------------------------------------------------

    def _on_notify(self, payload: str) -> None:
        decoded = _decode(payload)
        if decoded is None:
            log_event(log, "replica_bus_bad_payload", level=logging.WARNING, size=len(payload))
            return
        origin, change = decoded
        if origin == self.replica_id:
            return  # our own NOTIFY, heard back
        self.received += 1
        self._changes.announce(change)

    async def _listen_loop(self) -> None:
        backoff = _BACKOFF_FIRST
        first = True
        while True:
            try:
                listening = await self._channel.listen(self._on_notify)
            except StoreError as exc:
                log_event(
                    log,
                    "replica_bus_connect_failed",
                    level=logging.WARNING,
                    retry_in=backoff,
                    error=str(exc),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            self._listening = listening
            backoff = _BACKOFF_FIRST
            if first:
                log_event(log, "replica_bus_listening", replica=self.replica_id)
            else:
                # Notifications sent while we were away are lost: forget everything derived.
                self.reconnects += 1
                log_event(
                    log,
                    "replica_bus_reconnected",
                    level=logging.WARNING,
                    replica=self.replica_id,
                    dropped="everything",
                )
                self._changes.announce(Change("everyone", remote=True))
            first = False
            self.connected.set()
            try:
                await listening.wait_lost(self._ping_every)
            finally:
                self.connected.clear()
                self._listening = None
                await listening.close()
            log_event(log, "replica_bus_lost", level=logging.WARNING, replica=self.replica_id)


class StoreLeases:
    """The entitlement cache's cross-replica singleflight: ``acquire(name)`` /
    ``release(name)`` of a :data:`LEASE_TTL` lease held as this replica."""

    def __init__(self, leases: PgLeases, holder: str, ttl: float = LEASE_TTL) -> None:
        self._leases = leases
        self._holder = holder
        self._ttl = ttl
        #: How long a replica without the lease waits for its holder (seconds).
        self.wait = LEASE_WAIT

    async def acquire(self, name: str) -> bool:
        """Whether this replica now holds ``name``. Raises :class:`StoreError`."""
        return await self._leases.acquire(name, self._holder, self._ttl)

    async def release(self, name: str) -> None:
        """Give ``name`` back. Raises :class:`StoreError`."""
        await self._leases.release(name, self._holder)
