"""The PostgreSQL backend (via asyncpg): one truth shared by several gate replicas.

:class:`PostgresStore` implements :class:`~gateway.store.interface.Store` with the same tables and
columns as the SQLite backend (datetimes as Unix seconds in ``DOUBLE PRECISION``), so rows copy
across unchanged (:mod:`gateway.store.copy`), and the statements both backends share
(:mod:`gateway.store.reads`, :mod:`gateway.store.writes`); what is PostgreSQL's own is here:

- **A pool** of connections (``min_size``..``max_size``); a connection the server dropped is
  replaced on the next acquire, so the store reconnects by itself when the server is back.
- **Bounded**: connecting takes at most ``connect_timeout``, each statement ``command_timeout``,
  and every call as a whole at most ``connect_timeout + command_timeout`` (waiting for a pool
  slot included). A down or slow server makes calls fail with :class:`StoreError`, never hang.
- **Atomic across replicas**: each call is one statement or one transaction. "Newer wins"
  entitlement writes are one ``INSERT … ON CONFLICT … DO UPDATE … WHERE`` (the row lock makes
  the comparison and the write one step); an event id is recorded by exactly one
  ``INSERT … ON CONFLICT DO NOTHING``; a sign-in token is consumed by one ``DELETE … RETURNING``;
  a count and the write it allows (sign-in tokens, rate limits) share a transaction holding an
  advisory lock (a transaction's ``lock``).
- **Migrations**: the ``schema_version`` table lists the :data:`PG_MIGRATIONS` applied; they run
  in one transaction holding an advisory lock, so replicas starting at once apply each one once.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from gateway.dburl import DatabaseURL
from gateway.logs import log_event
from gateway.model import utcnow
from gateway.store.base import Row, StoreError, Tx, need
from gateway.store.interface import Store
from gateway.store.schema import migrate, migrations
from gateway.store.teams import TeamRows

__all__ = ["FAILURES", "OPEN_FAILURES", "PG_MIGRATIONS", "PostgresStore"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")

#: ``pg_advisory_xact_lock`` key held while migrating (any constant; "gate" in ASCII).
_MIGRATION_LOCK = 0x67617465

#: The migrations in PostgreSQL's types (:func:`~gateway.store.schema.migrations`), numbered
#: as SQLite's.
PG_MIGRATIONS = migrations(real="DOUBLE PRECISION", bigint="BIGINT")

#: :meth:`_Tx.lock`: a transaction's advisory lock on (a space, a text), the two-key form,
#: whose key space is not the migration lock's.
_LOCK = "SELECT pg_advisory_xact_lock($1::integer, hashtext($2))"

#: What a failing server or network raises through asyncpg (all become :class:`StoreError`).
FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

#: Opening (a pool or a dedicated connection) also fails with ValueError on options the
#: driver refuses.
OPEN_FAILURES: tuple[type[BaseException], ...] = (*FAILURES, ValueError)


def _count(status: str) -> int:
    """The row count of a command status such as ``DELETE 3`` or ``INSERT 0 1``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


Conn = Any  # an asyncpg connection (asyncpg ships no type hints)


class _Tx:
    """:class:`~gateway.store.base.Tx` on a pooled connection inside ``c.transaction()``."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _count(await self._conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(sql, *args))

    async def lock(self, space: int, key: str) -> None:
        """An advisory lock, released at commit or rollback: it serializes the transactions
        of every replica that lock the same key."""
        await self._conn.execute(_LOCK, space, key)


class PostgresStore(Store, TeamRows):
    """:class:`Store` on a PostgreSQL database (see the module docstring)."""

    def __init__(
        self,
        url: DatabaseURL,
        *,
        clock: Callable[[], datetime] = utcnow,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._clock = clock
        self._min, self._max = min_size, max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None

    def __repr__(self) -> str:
        return f"PostgresStore({self.url.shown!r})"

    @property
    def connect_timeout(self) -> float:
        """Seconds a connection attempt may take (the replica bus's listener uses it too)."""
        return self._connect_timeout

    @property
    def command_timeout(self) -> float:
        """Seconds one statement may take."""
        return self._command_timeout

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the pool and bring the schema up to date. :class:`StoreError` naming
        ``DATABASE_URL`` (password hidden) if the database cannot be reached or used."""
        if self._pool is not None:
            return
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                self._pool = await asyncpg.create_pool(
                    dsn=self.url.raw,
                    min_size=self._min,
                    max_size=self._max,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                )
        except OPEN_FAILURES as exc:
            raise StoreError(self._cannot("open", exc)) from None
        try:
            await self._migrate()
            await self.prune(self._clock())
        except BaseException:
            await self.close()
            raise

    def _cannot(self, what: str, exc: BaseException) -> str:
        reason = self.url.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return f"DATABASE_URL={self.url.shown}: cannot {what}: {type(exc).__name__}: {reason}"

    async def _migrate(self) -> None:
        async def work(c: Conn) -> None:
            await c.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            version = int(await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            tx = _Tx(c)
            await migrate(
                tx,
                PG_MIGRATIONS,
                version,
                f"DATABASE_URL={self.url.shown}",
                lambda number: tx.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                    number,
                    need(self._clock()),
                ),
                database=self.url.shown,
            )

        await self._tx("migrate", work)

    async def schema_version(self) -> int:
        """The number of migrations applied."""
        value = await self._run(
            "schema_version", lambda c: c.fetchval("SELECT MAX(version) FROM schema_version")
        )
        return int(value or 0)

    async def close(self) -> None:
        """Close the pool (bounded: connections that do not close in time are terminated)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(self._command_timeout):
                await pool.close()
        except TimeoutError:
            pool.terminate()

    async def file_problem(self) -> str | None:
        """Always None: there is no file to be replaced (see :meth:`readiness`)."""
        return None

    async def readiness(self) -> str | None:
        """None if a write commits now; else why not (for ``/readyz``)."""
        if self._pool is None:
            return "the store is not open"
        try:
            await self._write_check()
        except StoreError as exc:
            log_event(
                log,
                "store_not_writable",
                level=logging.WARNING,
                database=self.url.shown,
                error=str(exc),
            )
            return f"database unreachable: {exc}"
        return None

    async def check_writable(self) -> bool:
        """True if a write transaction commits now (for ``/readyz``)."""
        return await self.readiness() is None

    # --- running calls ------------------------------------------------------------------------

    async def _run(self, op: str, work: Callable[[Conn], Awaitable[T]]) -> T:
        """``work`` on a pooled connection, bounded in time; failures as :class:`StoreError`."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"store {op}: the store is not open")
        try:
            async with asyncio.timeout(self._connect_timeout + self._command_timeout):
                async with pool.acquire() as conn:
                    return await work(conn)
        except StoreError:
            raise
        except FAILURES as exc:
            raise StoreError(
                f"store {op} failed: {type(exc).__name__}: {self._scrubbed(exc)}"
            ) from exc

    def _scrubbed(self, exc: BaseException) -> str:
        text = self.url.scrub(str(exc))
        return text or ("timed out" if isinstance(exc, TimeoutError) else "no detail")

    async def _tx(self, op: str, work: Callable[[Conn], Awaitable[T]]) -> T:
        """``work`` in one transaction."""

        async def inside(c: Conn) -> T:
            async with c.transaction():
                return await work(c)

        return await self._run(op, inside)

    async def _transaction(self, op: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        return await self._tx(op, lambda c: work(_Tx(c)))

    async def _execute(self, op: str, sql: str, *args: Any) -> int:
        status: str = await self._run(op, lambda c: c.execute(sql, *args))
        return _count(status)

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._run(op, lambda c: c.fetch(sql, *args))
        return rows

    _select = _returning = _fetch

    # --- copying in (``gateway migrate --from``) ----------------------------------------------

    async def insert_missing(
        self, table: str, columns: Sequence[str], keys: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> tuple[int, int]:
        """Insert ``rows`` into ``table`` (one of :data:`~gateway.store.schema.COPIED_TABLES`,
        whose names are constants) skipping those whose ``keys`` exist already; a table without
        keys (``hits``) is filled only while empty. One transaction. Returns (new rows, rows
        now)."""
        cols = ", ".join(columns)
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        conflict = f" ON CONFLICT ({', '.join(keys)}) DO NOTHING" if keys else ""
        insert = f"INSERT INTO {table} ({cols}) VALUES ({marks}){conflict}"  # noqa: S608
        count = f"SELECT COUNT(*) FROM {table}"  # noqa: S608 - a constant table name

        async def work(c: Conn) -> tuple[int, int]:
            await c.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
            before = int(await c.fetchval(count))
            if rows and (keys or before == 0):
                await c.executemany(insert, [tuple(r) for r in rows])
            after = int(await c.fetchval(count))
            return after - before, after

        return await self._tx(f"copy {table}", work)
