"""The SQLite backend (via aiosqlite): the embedded default for one host.

:class:`SQLiteStore` implements :class:`~gateway.store.base.Store` on one file:

- **WAL** journal, ``synchronous=NORMAL``, ``busy_timeout`` (another process — a second worker, the
  CLI — may hold the write lock for a moment; SQLite waits instead of failing).
- **One writer**: every write is a job on one queue, run by one task on one connection, each in
  its own ``BEGIN IMMEDIATE`` transaction. Tasks of this process never contend for the lock, so
  "database is locked" cannot come from inside the process, and a caller that is cancelled
  cannot leave a transaction half done (the writer finishes or never starts the job).
- **Reads** use a second, read-only connection; in WAL mode they never wait for the writer and
  see every write that has returned.
- **Migrations**: ``PRAGMA user_version`` is the number of :data:`MIGRATIONS` applied; each one runs
  in one transaction, so re-opening is idempotent and a crash mid-migration leaves the old schema.

Datetimes are stored as Unix seconds (REAL) and returned timezone-aware UTC. Emails are stored
lower-cased. Every SQLite failure surfaces as :class:`StoreError`.
"""

import asyncio
import functools
import json
import logging
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiosqlite

from gateway.emails import mailbox_key
from gateway.logs import log_event
from gateway.model import Entitlement, utcnow
from gateway.store.base import ENT_COLUMNS as _ENT_COLUMNS
from gateway.store.base import (
    EVENTS_RETENTION,
    HITS_RETENTION,
    SessionRow,
    StoreError,
    normalize_email,
)
from gateway.store.base import EXPIRED as _EXPIRED
from gateway.store.base import SESSION_COLUMNS as _SESSION_COLUMNS
from gateway.store.base import TOKENS_HELD as _TOKENS_HELD
from gateway.store.base import USED as _USED
from gateway.store.base import ent_row as _ent_row
from gateway.store.base import need as _need
from gateway.store.base import session_from as _session_from
from gateway.store.base import session_params as _session_params
from gateway.store.base import subject as _subject
from gateway.store.base import token_limits as _token_limits
from gateway.store.base import wrap as _wrap
from gateway.store.reads import SQLReads
from gateway.store.schema import BACKFILLS, ent_upsert, migrations, migrations_due

__all__ = ["MIGRATIONS", "SQLiteStore"]

log = logging.getLogger("gateway.store")

#: The migrations in SQLite's types (:func:`~gateway.store.schema.migrations`).
MIGRATIONS = migrations(real="REAL", bigint="INTEGER")

_MARK = "INSERT INTO hits (bucket, at) VALUES (?, ?)"

_ENT_INSERT = ent_upsert(["?"] * len(_ENT_COLUMNS))


_SESSION_REVOKE = (
    "UPDATE sessions SET revoked_at = ? WHERE id_hash = ? AND revoked_at IS NULL "  # noqa: S608
    f"RETURNING {_SESSION_COLUMNS}"
)


Conn = aiosqlite.Connection
_Work = Callable[[Conn], Awaitable[Any]]


@dataclass
class _Job:
    op: str
    work: _Work
    future: "asyncio.Future[Any]"
    transaction: bool


@functools.cache
def _numbered(sql: str) -> str:
    """PostgreSQL's ``$1`` placeholders (:mod:`gateway.store.reads`) as SQLite's ``?1``."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


def _fail(job: _Job, exc: BaseException, level: int, **fields: Any) -> None:
    """Hand ``exc`` to the job's caller or, when the caller has gone, log ``fields``."""
    if not job.future.done():
        job.future.set_exception(exc)
    else:
        log_event(log, "store_write_failed", level=level, op=job.op, **fields)


async def _exec(conn: Conn, sql: str, params: Iterable[Any] = ()) -> int:
    """Run one statement; the number of rows it changed."""
    async with conn.execute(sql, tuple(params)) as cur:
        return cur.rowcount


async def _fetch(conn: Conn, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
    return list(await conn.execute_fetchall(sql, tuple(params)))


class SQLiteStore(SQLReads):
    """:class:`Store` on one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.path = path
        self._busy_ms = int(busy_timeout * 1000)
        self._clock = clock
        self._memory = path == ":memory:" or path.startswith("file::memory:")
        self._writer_conn: Conn | None = None
        self._reader_conn: Conn | None = None
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened

    # --- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open both connections, switch to WAL and bring the schema up to date."""
        if self._writer is not None:
            return
        self._closing = False
        if not self._memory:
            # Checked here rather than left to sqlite3.connect(): a clearer message, and a failed
            # aiosqlite connect leaves its worker thread to finish after we return.
            folder = await asyncio.to_thread(_missing_folder, self.path)
            if folder is not None:
                raise StoreError(f"cannot open {self.path}: directory {folder} does not exist")
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            self._writer_conn = conn
            conn.row_factory = sqlite3.Row
            await _exec(conn, f"PRAGMA busy_timeout = {self._busy_ms}")
            mode = await self._enable_wal(conn)
            if mode != "wal" and not self._memory:
                raise StoreError(f"{self.path}: cannot enable WAL (journal_mode={mode})")
            await _exec(conn, "PRAGMA synchronous = NORMAL")
            await _exec(conn, "PRAGMA foreign_keys = ON")
            await self._migrate(conn)
            if not self._memory:
                reader = await aiosqlite.connect(self.path, isolation_level=None)
                self._reader_conn = reader
                reader.row_factory = sqlite3.Row
                await _exec(reader, f"PRAGMA busy_timeout = {self._busy_ms}")
                await _exec(reader, "PRAGMA query_only = ON")
        except (sqlite3.Error, ValueError) as exc:
            await self._close_connections()
            hint = "" if self._memory else await asyncio.to_thread(_write_problem, self.path)
            raise StoreError(f"cannot open {self.path}: {exc}{hint}") from exc
        except BaseException:
            await self._close_connections()
            raise
        if not self._memory:
            st = await asyncio.to_thread(os.stat, self.path)
            self._file_id = (st.st_dev, st.st_ino)
        self._writer = asyncio.get_running_loop().create_task(
            self._write_loop(conn), name=f"store-writer:{self.path}"
        )
        await self.prune(self._clock())

    async def _enable_wal(self, conn: Conn) -> str:
        """``PRAGMA journal_mode = WAL``; the journal mode it ends in.

        Switching a file to WAL takes an exclusive lock *without* calling the busy handler, so
        while another process reads the header of the same new file (the other workers of a
        cold start, the CLI) it fails at once with "database is locked". Retried here for as
        long as ``busy_timeout`` would have waited."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_ms / 1000
        delay = 0.005
        while True:
            try:
                rows = await _fetch(conn, "PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # extended codes too
                if not busy or loop.time() >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            return str(rows[0][0]).lower() if rows else "?"

    async def _migrate(self, conn: Conn) -> None:
        # BEGIN IMMEDIATE before reading the version: two processes opening a fresh file at the
        # same time run each migration once.
        await _exec(conn, "BEGIN IMMEDIATE")
        try:
            version = int((await _fetch(conn, "PRAGMA user_version"))[0][0])
            for number in migrations_due(version, len(MIGRATIONS), self.path):
                for statement in MIGRATIONS[number - 1]:
                    await _exec(conn, statement)
                for select, update in BACKFILLS.get(number, ()):
                    for row in await _fetch(conn, select):
                        params = (mailbox_key(row["email"]), row["key"])
                        await _exec(conn, _numbered(update), params)
                await _exec(conn, f"PRAGMA user_version = {number}")
                log_event(log, "store_migrated", path=self.path, version=number)
            await _exec(conn, "COMMIT")
        except BaseException:
            if conn.in_transaction:
                await _exec(conn, "ROLLBACK")
            raise

    async def schema_version(self) -> int:
        rows = await self._read("schema_version", "PRAGMA user_version")
        return int(rows[0][0])

    async def journal_mode(self) -> str:
        rows = await self._read("journal_mode", "PRAGMA journal_mode")
        return str(rows[0][0]).lower()

    async def close(self) -> None:
        """Finish queued writes, stop the writer, close both connections. Idempotent."""
        self._closing = True
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put_nowait(None)
            await writer
        await self._close_connections()
        self._file_id = None

    async def _close_connections(self) -> None:
        # Reader first: the last connection to close checkpoints and removes the WAL file.
        reader, self._reader_conn = self._reader_conn, None
        conn, self._writer_conn = self._writer_conn, None
        for c in (reader, conn):
            if c is not None:
                await c.close()

    async def file_problem(self) -> str | None:
        """Why ``DATABASE_PATH`` no longer is the file this store opened (deleted, replaced,
        unreadable), or None. SQLite keeps writing to an open file that was deleted or renamed
        away; nothing would fail, but every write would be lost and other processes (the CLI,
        a second worker) would see another database. ``/readyz`` asks."""
        if self._file_id is None:  # in memory, or not open
            return None
        try:
            st = await asyncio.to_thread(os.stat, self.path)
        except FileNotFoundError:
            return f"DATABASE_PATH {self.path} was deleted while the gate had it open"
        except OSError as exc:
            return f"DATABASE_PATH {self.path}: {exc.strerror or exc}"
        if (st.st_dev, st.st_ino) != self._file_id:
            return f"DATABASE_PATH {self.path} was replaced by another file while open"
        return None

    async def readiness(self) -> str | None:
        """None if ready (:meth:`check_writable`); else why not (for ``/readyz``)."""
        problem = await self.file_problem()
        if await self.check_writable():
            return None
        return problem or "not writable"

    async def check_writable(self) -> bool:
        """True if the file is still the one opened and a write transaction commits now (for
        ``/readyz``)."""
        if self._writer is None or self._closing:
            return False
        problem = await self.file_problem()
        if problem is not None:
            log_event(log, "store_file_changed", level=logging.ERROR, problem=problem)
            return False
        try:
            await self._write(
                "check_writable",
                lambda c: _exec(
                    c,
                    "INSERT INTO meta (key, value) VALUES ('write_check', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(self._clock().timestamp()),),
                ),
            )
        except StoreError as exc:
            log_event(
                log, "store_not_writable", level=logging.WARNING, path=self.path, error=str(exc)
            )
            return False
        return True

    # --- the writer ---------------------------------------------------------------------------

    async def _write_loop(self, conn: Conn) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            if job.future.done():  # the caller was cancelled before the job started
                continue
            try:
                result = await self._run(conn, job)
            except (sqlite3.Error, ValueError, StoreError) as exc:
                _fail(job, _wrap(job.op, exc), logging.WARNING, error=str(exc), caller="gone")
            except Exception as exc:  # a bug in a job: hand it to the caller, keep writing
                _fail(job, exc, logging.ERROR, error=repr(exc))
            else:
                if not job.future.done():
                    job.future.set_result(result)

    @staticmethod
    async def _run(conn: Conn, job: _Job) -> Any:
        if not job.transaction:
            return await job.work(conn)
        await _exec(conn, "BEGIN IMMEDIATE")
        try:
            result = await job.work(conn)
        except BaseException:
            if conn.in_transaction:
                await _exec(conn, "ROLLBACK")
            raise
        await _exec(conn, "COMMIT")
        return result

    async def _submit(self, op: str, work: _Work, *, transaction: bool) -> Any:
        if self._writer is None or self._closing:
            raise StoreError(f"store {op}: the store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(op, work, future, transaction))
        return await future

    async def _write(self, op: str, work: _Work) -> Any:
        """Run ``work`` in its own transaction on the writer connection."""
        return await self._submit(op, work, transaction=True)

    async def _select(self, op: str, sql: str, *args: Any) -> list[sqlite3.Row]:
        return await self._read(op, _numbered(sql), args)

    async def _read(self, op: str, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        reader = self._reader_conn
        if reader is None:  # in-memory database: one connection, reads queue with the writes
            rows: list[sqlite3.Row] = await self._submit(
                op, lambda c: _fetch(c, sql, params), transaction=False
            )
            return rows
        if self._closing:
            raise StoreError(f"store {op}: the store is not open")
        try:
            return await _fetch(reader, sql, params)
        except (sqlite3.Error, ValueError) as exc:
            raise _wrap(op, exc) from exc

    # --- entitlements -------------------------------------------------------------------------

    async def put_entitlement(self, ent: Entitlement) -> None:
        row = _ent_row(ent)
        await self._write("put_entitlement", lambda c: _exec(c, _ENT_INSERT, row))

    async def put_entitlement_if_newer(self, ent: Entitlement, *, strictly: bool = False) -> bool:
        """Write ``ent`` unless the stored one comes from a newer event (webhook ordering).

        ``strictly``: also keep a stored state from the *same* second. A state built from an
        event's payload must be strictly newer: two events of one second cannot be ordered
        (``created`` has whole seconds), while a Stripe read of that second is the truth."""
        row = _ent_row(ent)
        op = ">" if strictly else ">="
        sql = _ENT_INSERT + f" WHERE excluded.event_created {op} entitlements.event_created"
        changed: int = await self._write("put_entitlement_if_newer", lambda c: _exec(c, sql, row))
        return changed > 0

    async def delete_entitlement(self, customer_id: str) -> None:
        await self._write(
            "delete_entitlement",
            lambda c: _exec(c, "DELETE FROM entitlements WHERE customer_id = ?", (customer_id,)),
        )

    # --- customers ----------------------------------------------------------------------------

    async def put_customer(self, customer_id: str, email: str | None) -> None:
        """Remember a customer (and its email). A known email drops its cached negative lookup."""
        mail = normalize_email(email) if email else None
        box = mailbox_key(mail) if mail else None
        now = _need(self._clock())

        async def work(c: Conn) -> None:
            await _exec(
                c,
                "INSERT INTO customers (customer_id, email, mailbox, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE SET "
                "email = COALESCE(excluded.email, customers.email), "
                "mailbox = COALESCE(excluded.mailbox, customers.mailbox), "
                "updated_at = excluded.updated_at",
                (customer_id, mail, box, now),
            )
            if mail:
                await _exec(c, "DELETE FROM email_lookups WHERE email = ?", (mail,))

        await self._write("put_customer", work)

    async def forget_customer(self, customer_id: str) -> None:
        """Drop a (deleted) customer: its email mapping, entitlement and cached lookups."""

        async def work(c: Conn) -> None:
            rows = await _fetch(
                c, "SELECT email FROM customers WHERE customer_id = ?", (customer_id,)
            )
            await _exec(c, "DELETE FROM customers WHERE customer_id = ?", (customer_id,))
            await _exec(c, "DELETE FROM entitlements WHERE customer_id = ?", (customer_id,))
            for row in rows:
                if row["email"]:
                    await _exec(c, "DELETE FROM email_lookups WHERE email = ?", (row["email"],))

        await self._write("forget_customer", work)

    async def put_email_lookup(
        self, email: str, customer_ids: Sequence[str], checked_at: datetime
    ) -> None:
        params = (normalize_email(email), json.dumps(list(customer_ids)), _need(checked_at))
        await self._write(
            "put_email_lookup",
            lambda c: _exec(
                c,
                "INSERT INTO email_lookups (email, customer_ids, checked_at) VALUES (?, ?, ?) "
                "ON CONFLICT (email) DO UPDATE SET customer_ids = excluded.customer_ids, "
                "checked_at = excluded.checked_at",
                params,
            ),
        )

    # --- webhook events -----------------------------------------------------------------------

    async def record_event(self, event_id: str, type_: str, created: int) -> bool:
        """Remember a webhook event; False if it was seen before (a duplicate delivery)."""
        params = (event_id, type_, int(created), _need(self._clock()))
        changed: int = await self._write(
            "record_event",
            lambda c: _exec(
                c,
                "INSERT INTO webhook_events (event_id, type, created, processed_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                params,
            ),
        )
        return changed > 0

    async def forget_event(self, event_id: str) -> None:
        """Undo :meth:`record_event` (processing failed: let Stripe's retry be processed)."""
        await self._write(
            "forget_event",
            lambda c: _exec(c, "DELETE FROM webhook_events WHERE event_id = ?", (event_id,)),
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
        unexpired tokens, none of them issued after ``issued_since``: checked and written in
        one write transaction, so concurrent requests (other workers too) cannot both pass.
        True if it was stored."""
        address = normalize_email(email)
        box = mailbox_key(address)
        now_ts = _need(now or self._clock())
        checked, limit, since = _token_limits(max_live, issued_since)

        async def work(c: Conn) -> bool:
            if checked:
                [row] = await _fetch(c, _numbered(_TOKENS_HELD), (box, now_ts, since))
                if int(row["live"]) >= limit or int(row["recent"]) > 0:
                    return False
            await _exec(
                c,
                "INSERT INTO login_tokens (token_hash, email, mailbox, expires_at, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO UPDATE SET "
                "email = excluded.email, mailbox = excluded.mailbox, "
                "expires_at = excluded.expires_at, created_at = excluded.created_at",
                (token_hash, address, box, _need(expires_at), now_ts),
            )
            return True

        stored: bool = await self._write("put_login_token", work)
        return stored

    async def forget_login_token(self, token_hash: str) -> None:
        """Delete a token that was never delivered (its mail failed), leaving no mark."""
        await self._write(
            "forget_login_token",
            lambda c: _exec(c, "DELETE FROM login_tokens WHERE token_hash = ?", (token_hash,)),
        )

    async def consume_login_token(self, token_hash: str, now: datetime) -> str | None:
        """The token's email if it exists and has not expired. Single use: it is deleted, and
        leaves a ``used`` (or ``expired``) mark for :meth:`login_token_fate`."""
        ts = _need(now)

        async def work(c: Conn) -> list[sqlite3.Row]:
            rows = await _fetch(
                c,
                "DELETE FROM login_tokens WHERE token_hash = ? RETURNING email, expires_at",
                (token_hash,),
            )
            if rows:
                fate = _USED if float(rows[0]["expires_at"]) > ts else _EXPIRED
                await _exec(c, _MARK, (f"{fate}{token_hash}", ts))
            return rows

        rows: list[sqlite3.Row] = await self._write("consume_login_token", work)
        if not rows or float(rows[0]["expires_at"]) <= ts:
            return None
        return str(rows[0]["email"])

    async def hit(self, bucket: str, at: datetime) -> None:
        ts = _need(at)
        horizon = ts - HITS_RETENTION.total_seconds()

        async def work(c: Conn) -> None:
            await _exec(c, "INSERT INTO hits (bucket, at) VALUES (?, ?)", (bucket, ts))
            await _exec(c, "DELETE FROM hits WHERE bucket = ? AND at < ?", (bucket, horizon))

        await self._write("hit", work)

    async def hit_if(
        self,
        buckets: Sequence[str],
        since: datetime,
        at: datetime,
        allow: Callable[[Sequence[int]], bool],
    ) -> bool:
        """Count each bucket's hits since ``since``; if ``allow(counts)``, record a hit at
        ``at`` in each and return True. One write transaction: no other write (of any worker
        on this file) comes between the counts and the hits."""
        since_ts, ts = _need(since), _need(at)
        horizon = ts - HITS_RETENTION.total_seconds()

        async def work(c: Conn) -> bool:
            counts = []
            for bucket in buckets:
                [row] = await _fetch(
                    c, "SELECT COUNT(*) FROM hits WHERE bucket = ? AND at >= ?", (bucket, since_ts)
                )
                counts.append(int(row[0]))
            if not allow(counts):
                return False
            for bucket in buckets:
                await _exec(c, _MARK, (bucket, ts))
                await _exec(c, "DELETE FROM hits WHERE bucket = ? AND at < ?", (bucket, horizon))
            return True

        taken: bool = await self._write("hit_if", work)
        return taken

    # --- grants -------------------------------------------------------------------------------

    async def put_grant(self, customer_or_email: str, until: datetime, note: str) -> None:
        params = (_subject(customer_or_email), _need(until), note, _need(self._clock()))
        await self._write(
            "put_grant",
            lambda c: _exec(
                c,
                "INSERT INTO grants (subject, until, note, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (subject) DO UPDATE SET until = excluded.until, "
                "note = excluded.note, created_at = excluded.created_at",
                params,
            ),
        )

    async def delete_grant(self, customer_or_email: str) -> bool:
        subject = _subject(customer_or_email)
        changed: int = await self._write(
            "delete_grant",
            lambda c: _exec(c, "DELETE FROM grants WHERE subject = ?", (subject,)),
        )
        return changed > 0

    # --- sessions -----------------------------------------------------------------------------

    async def create_session(self, row: SessionRow) -> None:
        """Insert a new session (its id is fresh: an existing hash is an error, never reused)."""
        params = _session_params(row)
        await self._write(
            "create_session",
            lambda c: _exec(
                c,
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) "  # noqa: S608 - constant columns
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                params,
            ),
        )

    async def touch_session(self, id_hash: str, at: datetime) -> None:
        """Record that the session was seen at ``at`` (never moves ``last_seen`` back)."""
        params = (_need(at), id_hash)
        await self._write(
            "touch_session",
            lambda c: _exec(
                c,
                "UPDATE sessions SET last_seen = MAX(last_seen, ?) "
                "WHERE id_hash = ? AND revoked_at IS NULL",
                params,
            ),
        )

    async def revoke_session(self, id_hash: str, at: datetime) -> SessionRow | None:
        """Revoke one session; the session as it was if it was active, else None."""

        async def work(c: Conn) -> list[sqlite3.Row]:
            return await _fetch(
                c,
                _SESSION_REVOKE,
                (_need(at), id_hash),
            )

        rows: list[sqlite3.Row] = await self._write("revoke_session", work)
        return _session_from(rows[0]) if rows else None

    async def revoke_sessions_of(self, customer_id: str, at: datetime) -> list[str]:
        """Revoke every session of ``customer_id``; the id hashes of those that were active."""

        async def work(c: Conn) -> list[sqlite3.Row]:
            return await _fetch(
                c,
                "UPDATE sessions SET revoked_at = ? "
                "WHERE customer_id = ? AND revoked_at IS NULL RETURNING id_hash",
                (_need(at), customer_id),
            )

        rows: list[sqlite3.Row] = await self._write("revoke_sessions_of", work)
        return sorted(str(r["id_hash"]) for r in rows)

    # --- housekeeping -------------------------------------------------------------------------

    async def prune(self, now: datetime) -> int:
        """Delete what has outlived its use (expired tokens, old hits, old event ids, old email
        lookups). Returns the number of rows deleted. Runs on :meth:`open`."""
        ts = _need(now)
        hits_horizon = ts - HITS_RETENTION.total_seconds()
        events_horizon = ts - EVENTS_RETENTION.total_seconds()

        async def work(c: Conn) -> int:
            return (
                await _exec(c, "DELETE FROM login_tokens WHERE expires_at <= ?", (ts,))
                + await _exec(c, "DELETE FROM hits WHERE at < ?", (hits_horizon,))
                + await _exec(c, "DELETE FROM email_lookups WHERE checked_at < ?", (hits_horizon,))
                + await _exec(
                    c, "DELETE FROM webhook_events WHERE processed_at < ?", (events_horizon,)
                )
                # Expired sessions go; revoked ones stay until they would have expired, so a
                # replayed copy keeps meeting a revoked row (not that it matters: unknown
                # ids are refused too).
                + await _exec(c, "DELETE FROM sessions WHERE expires_at <= ?", (ts,))
            )

        deleted: int = await self._write("prune", work)
        return deleted


def _missing_folder(path: str) -> str | None:
    folder = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(folder) else folder


def _write_problem(path: str) -> str:
    """Why SQLite may not write ``path`` (it needs the file and, for WAL, its directory, where
    it makes ``-wal`` and ``-shm`` files), as a parenthesis for an error message; "" if no
    reason is visible. ``access`` tells read-only file systems and immutable files apart from
    permissions even for root, whom permissions never stop."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    for what, where in (("the file", target), ("its directory", folder)):
        if not os.path.exists(where) or os.access(where, os.W_OK):
            continue
        try:
            read_only_fs = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
        except OSError:
            read_only_fs = False
        why = "is on a read-only file system" if read_only_fs else "is not writable (permissions?)"
        return (
            f" ({what} {where} {why}; the gate writes the database and, beside it, its -wal "
            "and -shm files)"
        )
    return ""
