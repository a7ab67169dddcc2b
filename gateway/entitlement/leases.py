"""A cross-replica singleflight for cold Stripe reads (PostgreSQL replicas).

:meth:`Leased.run` ``(name, in_store, read)``: the replica that gets the lease ``name`` reads
Stripe (``read``, which writes the store); the others wait up to ``leases.wait`` seconds for
``in_store`` to find the holder's answer — woken by the holder's change notification
(:meth:`Leased.wake`) when there is one, else re-reading every :data:`LEASE_POLL` — and then
read Stripe themselves. A holder first asks ``in_store`` too (the previous holder may have
written it just before). The lease store failing falls back to reading Stripe here; a lease
not released expires by itself. Without leases (SQLite: one host) it is just ``read()``.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from gateway.entitlement.base import EntitlementStats
from gateway.logs import log_event
from gateway.store import StoreError

T = TypeVar("T")

log = logging.getLogger("gateway.entitlement")

#: How often a replica waiting for a lease holder re-reads the store (seconds).
LEASE_POLL = 0.05


class Leases(Protocol):
    """A cross-replica singleflight (:class:`gateway.replicas.StoreLeases`)."""

    #: How long a replica without the lease waits for its holder's answer (seconds).
    wait: float

    async def acquire(self, name: str) -> bool: ...

    async def release(self, name: str) -> None: ...


class Leased:
    """Leased reads of one process (see the module docstring)."""

    def __init__(self, leases: Leases | None, stats: EntitlementStats) -> None:
        self._leases = leases
        self._stats = stats
        self._arrived: dict[str, asyncio.Event] = {}  # lease names a waiter waits for
        self.closed = False

    def wake(self, name: str) -> None:
        """The holder's answer for ``name`` may be in the store now (a change notification)."""
        arrived = self._arrived.get(name)
        if arrived is not None:
            arrived.set()

    async def run(
        self,
        name: str,
        in_store: Callable[[], Awaitable[T | None]],
        read: Callable[[], Awaitable[T]],
    ) -> T:
        """``read()`` by one replica at a time; the others get what it stored (``in_store``:
        the answer another replica stored, or None; may raise :class:`StoreError`)."""
        leases = self._leases
        if leases is None or self.closed:
            return await read()
        try:
            held = await leases.acquire(name)
        except StoreError as exc:
            log_event(log, "lease_failed", level=logging.WARNING, op="acquire", error=str(exc))
            return await read()
        if held:
            try:
                try:
                    found = await self._in_store(in_store)
                except StoreError:
                    found = None
                return found if found is not None else await read()
            finally:
                try:
                    await leases.release(name)
                except StoreError as exc:  # it expires by itself
                    log_event(
                        log, "lease_failed", level=logging.WARNING, op="release", error=str(exc)
                    )
        found = await self._await_holder(name, in_store, leases.wait)
        if found is not None:
            return found
        log_event(log, "lease_wait_ended", level=logging.INFO, lease=name)
        return await read()

    async def _in_store(self, in_store: Callable[[], Awaitable[T | None]]) -> T | None:
        try:
            found = await in_store()
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, error=str(exc))
            raise
        if found is not None:
            self._stats.lease_waits += 1
        return found

    async def _await_holder(
        self, name: str, in_store: Callable[[], Awaitable[T | None]], wait: float
    ) -> T | None:
        """The holder's answer once in the store, or None after ``wait`` seconds (or when
        the store cannot be read)."""
        arrived = self._arrived.setdefault(name, asyncio.Event())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(LEASE_POLL, deadline - loop.time())):
                        await arrived.wait()
                arrived.clear()
                try:
                    found = await self._in_store(in_store)
                except StoreError:
                    return None
                if found is not None:
                    return found
        finally:
            if self._arrived.get(name) is arrived:
                del self._arrived[name]
        return None
