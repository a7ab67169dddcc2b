"""The PostgreSQL backend (via asyncpg): one truth shared by several gate replicas.

:class:`PostgresStore` implements :class:`~gateway.store.base.Store` with the same tables and
columns as the SQLite backend (datetimes as Unix seconds in ``DOUBLE PRECISION``), so rows copy
across unchanged (:mod:`gateway.store.copy`).

- **A pool** of connections (``min_size``..``max_size``); a connection the server dropped is
  replaced on the next acquire, so the store reconnects by itself when the server is back.
- **Bounded**: connecting takes at most ``connect_timeout``, each statement ``command_timeout``,
  and every call as a whole at most ``connect_timeout + command_timeout`` (waiting for a pool
  slot included). A down or slow server makes calls fail with :class:`StoreError`, never hang.
- **Atomic across replicas**: each call is one statement or one transaction. "Newer wins"
  entitlement writes are one ``INSERT … ON CONFLICT … DO UPDATE … WHERE`` (the row lock makes
  the comparison and the write one step); an event id is recorded by exactly one
  ``INSERT … ON CONFLICT DO NOTHING``; a sign-in token is consumed by one ``DELETE … RETURNING``.
- **Migrations**: the ``schema_version`` table lists the :data:`PG_MIGRATIONS` applied; they run
  in one transaction holding an advisory lock, so replicas starting at once apply each one once.
"""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from gateway.dburl import DatabaseURL
from gateway.emails import mailbox_key
from gateway.logs import log_event
from gateway.model import Entitlement, utcnow
from gateway.store.base import (
    ENT_COLUMNS,
    EVENTS_RETENTION,
    EXPIRED,
    HITS_RETENTION,
    SESSION_COLUMNS,
    TOKENS_HELD,
    USED,
    SessionRow,
    StoreError,
    ent_row,
    need,
    normalize_email,
    session_from,
    session_params,
    subject,
    token_limits,
)
from gateway.store.reads import SQLReads
from gateway.store.schema import BACKFILLS, ent_upsert, migrations, migrations_due

__all__ = ["FAILURES", "OPEN_FAILURES", "PG_MIGRATIONS", "PostgresStore"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")

#: ``pg_advisory_xact_lock`` key held while migrating (any constant; "gate" in ASCII).
_MIGRATION_LOCK = 0x67617465

#: The migrations in PostgreSQL's types (:func:`~gateway.store.schema.migrations`), numbered
#: as SQLite's.
PG_MIGRATIONS = migrations(real="DOUBLE PRECISION", bigint="BIGINT")

_ENT_INSERT = ent_upsert([f"${i}" for i in range(1, len(ENT_COLUMNS) + 1)])
#: A transaction's advisory lock on (a class, a text): the two-key form, whose key space is
#: not the migration lock's.
_LOCK = "SELECT pg_advisory_xact_lock($1::integer, hashtext($2))"
_TOKENS_LOCK = 0x6C6F6731  # "log1": an address's sign-in tokens
_HITS_LOCK = 0x6C6F6732  # "log2": a rate-limit bucket
_MARK = "INSERT INTO hits (bucket, at) VALUES ($1, $2)"

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


class PostgresStore(SQLReads):
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
            async with c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
                )
                version = int(
                    await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                )
                where = f"DATABASE_URL={self.url.shown}"
                for number in migrations_due(version, len(PG_MIGRATIONS), where):
                    for statement in PG_MIGRATIONS[number - 1]:
                        await c.execute(statement)
                    for select, update in BACKFILLS.get(number, ()):
                        for row in await c.fetch(select):
                            await c.execute(update, mailbox_key(row["email"]), row["key"])
                    await c.execute(
                        "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                        number,
                        need(self._clock()),
                    )
                    log_event(log, "store_migrated", database=self.url.shown, version=number)

        await self._run("migrate", work)

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

    async def _write_check(self) -> None:
        stamp = str(self._clock().timestamp())
        await self._run(
            "check_writable",
            lambda c: c.execute(
                "INSERT INTO meta (key, value) VALUES ('write_check', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                stamp,
            ),
        )

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

    async def _execute(self, op: str, sql: str, *args: Any) -> int:
        status: str = await self._run(op, lambda c: c.execute(sql, *args))
        return _count(status)

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._run(op, lambda c: c.fetch(sql, *args))
        return rows

    _select = _fetch

    # --- entitlements -------------------------------------------------------------------------

    async def put_entitlement(self, ent: Entitlement) -> None:
        await self._execute("put_entitlement", _ENT_INSERT, *ent_row(ent))

    async def put_entitlement_if_newer(self, ent: Entitlement, *, strictly: bool = False) -> bool:
        """Write ``ent`` unless the stored one comes from a newer event (``strictly``: or from
        the same second); True if it was written. One statement: two replicas writing for one
        customer at once cannot interleave into the older state."""
        op = "<" if strictly else "<="
        sql = (
            _ENT_INSERT
            + f" WHERE entitlements.event_created {op} EXCLUDED.event_created RETURNING 1"
        )
        rows = await self._fetch("put_entitlement_if_newer", sql, *ent_row(ent))
        return bool(rows)

    async def delete_entitlement(self, customer_id: str) -> None:
        await self._execute(
            "delete_entitlement", "DELETE FROM entitlements WHERE customer_id = $1", customer_id
        )

    # --- customers ----------------------------------------------------------------------------

    async def put_customer(self, customer_id: str, email: str | None) -> None:
        """Remember a customer (and its email). A known email drops its cached negative lookup."""
        mail = normalize_email(email) if email else None
        box = mailbox_key(mail) if mail else None
        now = need(self._clock())

        async def work(c: Conn) -> None:
            await c.execute(
                "INSERT INTO customers (customer_id, email, mailbox, updated_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO UPDATE SET "
                "email = COALESCE(EXCLUDED.email, customers.email), "
                "mailbox = COALESCE(EXCLUDED.mailbox, customers.mailbox), "
                "updated_at = EXCLUDED.updated_at",
                customer_id,
                mail,
                box,
                now,
            )
            if mail:
                await c.execute("DELETE FROM email_lookups WHERE email = $1", mail)

        await self._tx("put_customer", work)

    async def forget_customer(self, customer_id: str) -> None:
        """Drop a (deleted) customer: its email mapping, entitlement and cached lookups."""

        async def work(c: Conn) -> None:
            emails = await c.fetch(
                "DELETE FROM customers WHERE customer_id = $1 RETURNING email", customer_id
            )
            await c.execute("DELETE FROM entitlements WHERE customer_id = $1", customer_id)
            for row in emails:
                if row["email"]:
                    await c.execute("DELETE FROM email_lookups WHERE email = $1", row["email"])

        await self._tx("forget_customer", work)

    async def put_email_lookup(
        self, email: str, customer_ids: Sequence[str], checked_at: datetime
    ) -> None:
        await self._execute(
            "put_email_lookup",
            "INSERT INTO email_lookups (email, customer_ids, checked_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (email) DO UPDATE SET customer_ids = EXCLUDED.customer_ids, "
            "checked_at = EXCLUDED.checked_at",
            normalize_email(email),
            json.dumps(list(customer_ids)),
            need(checked_at),
        )

    # --- webhook events -----------------------------------------------------------------------

    async def record_event(self, event_id: str, type_: str, created: int) -> bool:
        """Remember a webhook event; False if it was seen before (a duplicate delivery, on
        this replica or another: the primary key decides, exactly one insert wins)."""
        rows = await self._fetch(
            "record_event",
            "INSERT INTO webhook_events (event_id, type, created, processed_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING RETURNING 1",
            event_id,
            type_,
            int(created),
            need(self._clock()),
        )
        return bool(rows)

    async def forget_event(self, event_id: str) -> None:
        """Undo :meth:`record_event` (processing failed: let Stripe's retry be processed)."""
        await self._execute(
            "forget_event", "DELETE FROM webhook_events WHERE event_id = $1", event_id
        )

    # --- sign-in ------------------------------------------------------------------------------

    async def put_login_token(
        self,
        token_hash: str,
        email: str,
        expires_at: datetime,
        now: datetime | None = None,
        *,
        max_live: int | None = None,
        issued_since: datetime | None = None,
    ) -> bool:
        """Store a sign-in token issued at ``now``; the address's other tokens keep working.
        With ``max_live`` / ``issued_since``, only if the address holds fewer than ``max_live``
        unexpired tokens, none of them issued after ``issued_since``: counted and written in
        one transaction holding the address's advisory lock, so requests on several replicas
        at once cannot both pass. True if it was stored."""
        address = normalize_email(email)
        box = mailbox_key(address)
        expires = need(expires_at)
        now_ts = need(now or self._clock())
        checked, limit, since = token_limits(max_live, issued_since)

        async def work(c: Conn) -> bool:
            if checked:
                await c.execute(_LOCK, _TOKENS_LOCK, box)
                row = await c.fetchrow(TOKENS_HELD, box, now_ts, since)
                if int(row["live"]) >= limit or int(row["recent"]) > 0:
                    return False
            await c.execute(
                "INSERT INTO login_tokens (token_hash, email, mailbox, expires_at, created_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_hash) DO UPDATE SET "
                "email = EXCLUDED.email, mailbox = EXCLUDED.mailbox, "
                "expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at",
                token_hash,
                address,
                box,
                expires,
                now_ts,
            )
            return True

        return await self._tx("put_login_token", work)

    async def forget_login_token(self, token_hash: str) -> None:
        """Delete a token that was never delivered (its mail failed), leaving no mark."""
        await self._execute(
            "forget_login_token", "DELETE FROM login_tokens WHERE token_hash = $1", token_hash
        )

    async def consume_login_token(self, token_hash: str, now: datetime) -> str | None:
        """The token's email if it exists and has not expired. Single use across replicas: one
        ``DELETE … RETURNING`` hands the row to exactly one caller; it leaves a ``used`` (or
        ``expired``) mark for :meth:`login_token_fate`."""
        stamp = need(now)

        async def work(c: Conn) -> Any:
            row = await c.fetchrow(
                "DELETE FROM login_tokens WHERE token_hash = $1 RETURNING email, expires_at",
                token_hash,
            )
            if row is not None:
                fate = USED if float(row["expires_at"]) > stamp else EXPIRED
                await c.execute(_MARK, f"{fate}{token_hash}", stamp)
            return row

        row = await self._tx("consume_login_token", work)
        if row is None or float(row["expires_at"]) <= stamp:
            return None
        return str(row["email"])

    async def hit(self, bucket: str, at: datetime) -> None:
        stamp = need(at)
        horizon = stamp - HITS_RETENTION.total_seconds()

        async def work(c: Conn) -> None:
            await c.execute("INSERT INTO hits (bucket, at) VALUES ($1, $2)", bucket, stamp)
            await c.execute("DELETE FROM hits WHERE bucket = $1 AND at < $2", bucket, horizon)

        await self._tx("hit", work)

    async def hit_if(
        self,
        buckets: Sequence[str],
        since: datetime,
        at: datetime,
        allow: Callable[[Sequence[int]], bool],
    ) -> bool:
        """Count each bucket's hits since ``since``; if ``allow(counts)``, record a hit at
        ``at`` in each and return True. One transaction holding the advisory lock of the first
        bucket: calls sharing it are serialized across replicas, so their limit holds."""
        since_ts, stamp = need(since), need(at)
        horizon = stamp - HITS_RETENTION.total_seconds()

        async def work(c: Conn) -> bool:
            await c.execute(_LOCK, _HITS_LOCK, buckets[0])
            counts = [
                int(
                    await c.fetchval(
                        "SELECT COUNT(*) FROM hits WHERE bucket = $1 AND at >= $2",
                        bucket,
                        since_ts,
                    )
                )
                for bucket in buckets
            ]
            if not allow(counts):
                return False
            for bucket in buckets:
                await c.execute(_MARK, bucket, stamp)
                await c.execute("DELETE FROM hits WHERE bucket = $1 AND at < $2", bucket, horizon)
            return True

        return await self._tx("hit_if", work)

    # --- grants -------------------------------------------------------------------------------

    async def put_grant(self, customer_or_email: str, until: datetime, note: str) -> None:
        await self._execute(
            "put_grant",
            "INSERT INTO grants (subject, until, note, created_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (subject) DO UPDATE SET until = EXCLUDED.until, "
            "note = EXCLUDED.note, created_at = EXCLUDED.created_at",
            subject(customer_or_email),
            need(until),
            note,
            need(self._clock()),
        )

    async def delete_grant(self, customer_or_email: str) -> bool:
        changed = await self._execute(
            "delete_grant", "DELETE FROM grants WHERE subject = $1", subject(customer_or_email)
        )
        return changed > 0

    # --- sessions -----------------------------------------------------------------------------

    async def create_session(self, row: SessionRow) -> None:
        """Insert a new session (its id is fresh: an existing hash is an error, never reused)."""
        await self._execute(
            "create_session",
            f"INSERT INTO sessions ({SESSION_COLUMNS}) "  # noqa: S608 - constant columns
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            *session_params(row),
        )

    async def touch_session(self, id_hash: str, at: datetime) -> None:
        """Record that the session was seen at ``at`` (never moves ``last_seen`` back)."""
        await self._execute(
            "touch_session",
            "UPDATE sessions SET last_seen = GREATEST(last_seen, $1) "
            "WHERE id_hash = $2 AND revoked_at IS NULL",
            need(at),
            id_hash,
        )

    async def revoke_session(self, id_hash: str, at: datetime) -> SessionRow | None:
        """Revoke one session; the session as it was if it was active, else None."""
        rows = await self._fetch(
            "revoke_session",
            "UPDATE sessions SET revoked_at = $1 WHERE id_hash = $2 AND revoked_at IS NULL "  # noqa: S608
            f"RETURNING {SESSION_COLUMNS}",
            need(at),
            id_hash,
        )
        return session_from(rows[0]) if rows else None

    async def revoke_sessions_of(self, customer_id: str, at: datetime) -> list[str]:
        """Revoke every session of ``customer_id``; the id hashes of those that were active."""
        rows = await self._fetch(
            "revoke_sessions_of",
            "UPDATE sessions SET revoked_at = $1 "
            "WHERE customer_id = $2 AND revoked_at IS NULL RETURNING id_hash",
            need(at),
            customer_id,
        )
        return sorted(str(r["id_hash"]) for r in rows)

    # --- housekeeping -------------------------------------------------------------------------

    async def prune(self, now: datetime) -> int:
        """Delete what has outlived its use (see :meth:`SQLiteStore.prune`); rows deleted."""
        stamp = need(now)
        hits_horizon = stamp - HITS_RETENTION.total_seconds()
        events_horizon = stamp - EVENTS_RETENTION.total_seconds()

        async def work(c: Conn) -> int:
            statements: tuple[tuple[str, float], ...] = (
                ("DELETE FROM login_tokens WHERE expires_at <= $1", stamp),
                ("DELETE FROM hits WHERE at < $1", hits_horizon),
                ("DELETE FROM email_lookups WHERE checked_at < $1", hits_horizon),
                ("DELETE FROM webhook_events WHERE processed_at < $1", events_horizon),
                ("DELETE FROM sessions WHERE expires_at <= $1", stamp),
                ("DELETE FROM leases WHERE until < $1", hits_horizon),
            )
            total = 0
            for sql, arg in statements:
                total += _count(await c.execute(sql, arg))
            return total

        return await self._tx("prune", work)

    # --- copying in (``gateway migrate --from``) ----------------------------------------------

    async def insert_missing(
        self, table: str, columns: Sequence[str], keys: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> tuple[int, int]:
        """Insert ``rows`` into ``table`` (one of :data:`~gateway.store.base.TABLES`, whose
        names are constants) skipping those whose ``keys`` exist already; a table without keys
        (``hits``) is filled only while empty. One transaction. Returns (new rows, rows now)."""
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
