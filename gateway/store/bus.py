"""Cross-replica coordination on PostgreSQL: ``LISTEN/NOTIFY`` and short leases.

The SQL half of :mod:`gateway.replicas` (which owns the logic: what is sent, when to
reconnect, what to drop). Two parts, both on a :class:`~gateway.store.postgres.PostgresStore`:

- :class:`PgChannel`: ``notify(payload)`` sends ``pg_notify(channel, payload)`` on a pooled
  connection (bounded in time like every store call); ``listen(callback)`` opens a *dedicated*
  connection (not from the pool: a pooled connection is handed to other work and a listener
  must stay put) that ``LISTEN``\\s on the channel. The returned :class:`Listening` says when
  that connection is lost (:meth:`Listening.wait_lost`: the server's termination, or a failed
  periodic ping for a silently dead network).
- :class:`PgLeases`: ``acquire(name, holder, ttl)`` takes the lease ``name`` unless another
  holder has it and it has not expired; ``release(name, holder)`` gives it back. Expiry is on
  the *database's* clock (``clock_timestamp()``), so replicas with skewed clocks agree; a holder
  that dies simply lets its lease run out.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from gateway.logs import log_event
from gateway.store.base import StoreError
from gateway.store.postgres import OPEN_FAILURES, PostgresStore

__all__ = ["CHANNEL", "Listening", "PgChannel", "PgLeases"]

log = logging.getLogger("gateway.store")

#: The NOTIFY channel every replica of one database listens on.
CHANNEL = "gate_changes"

_NOW = "extract(epoch from clock_timestamp())"


class Listening:
    """A live ``LISTEN`` connection (see :meth:`PgChannel.listen`)."""

    def __init__(self, conn: Any, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout
        self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: self._lost.set())

    async def wait_lost(self, ping_every: float) -> None:
        """Return once the connection is gone: closed by the server or the network (the
        termination callback), or a ``SELECT 1`` every ``ping_every`` s that fails or takes
        longer than the timeout (a network that drops packets closes nothing)."""
        while not self._lost.is_set():
            try:
                async with asyncio.timeout(ping_every):
                    await self._lost.wait()
                return
            except TimeoutError:
                pass
            try:
                async with asyncio.timeout(self._timeout):
                    await self._conn.fetchval("SELECT 1")
            except OPEN_FAILURES as exc:
                log_event(log, "listener_ping_failed", level=logging.WARNING, error=repr(exc))
                return

    async def close(self) -> None:
        """Close the connection (bounded; terminated if it does not close in time)."""
        if self._conn.is_closed():
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._conn.close()
        except OPEN_FAILURES as exc:
            log_event(log, "listener_close_failed", level=logging.DEBUG, error=repr(exc))
            self._conn.terminate()


class PgChannel:
    """``NOTIFY`` / ``LISTEN`` on :data:`CHANNEL` of ``store``'s database."""

    def __init__(self, store: PostgresStore, channel: str = CHANNEL) -> None:
        self._store = store
        self.channel = channel

    async def notify(self, payload: str) -> None:
        """Send ``payload`` to every listener (this one's too). Raises :class:`StoreError`."""
        await self._store._run(
            "notify", lambda c: c.execute("SELECT pg_notify($1, $2)", self.channel, payload)
        )

    async def listen(self, callback: Callable[[str], None]) -> Listening:
        """A dedicated connection calling ``callback(payload)`` for every notification, in the
        event loop, as they arrive. Raises :class:`StoreError` (password hidden)."""
        timeout = self._store.connect_timeout
        conn: Any = None
        try:
            async with asyncio.timeout(timeout + self._store.command_timeout):
                conn = await asyncpg.connect(dsn=self._store.url.raw, timeout=timeout)
                await conn.add_listener(
                    self.channel, lambda _c, _pid, _channel, payload: callback(payload)
                )
        except OPEN_FAILURES as exc:
            if conn is not None:
                conn.terminate()
            reason = self._store.url.scrub(str(exc)) or type(exc).__name__
            raise StoreError(f"store listen failed: {type(exc).__name__}: {reason}") from None
        return Listening(conn, timeout)


class PgLeases:
    """Short named leases in the ``leases`` table (see the module docstring)."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take lease ``name`` for ``ttl`` seconds unless someone else holds it unexpired;
        whether it is now ``holder``'s. One statement (the row lock decides races).
        Raises :class:`StoreError`."""
        sql = (
            f"INSERT INTO leases (name, holder, until) VALUES ($1, $2, {_NOW} + $3) "  # noqa: S608
            "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until "
            f"WHERE leases.until < {_NOW} OR leases.holder = EXCLUDED.holder RETURNING 1"
        )
        rows = await self._store._fetch("lease_acquire", sql, name, holder, float(ttl))
        return bool(rows)

    async def release(self, name: str, holder: str) -> None:
        """Give lease ``name`` back (if ``holder`` still has it). Raises :class:`StoreError`."""
        await self._store._execute(
            "lease_release", "DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder
        )
