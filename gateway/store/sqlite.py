"""The SQLite backend (via aiosqlite): the embedded default for one host.

:class:`SQLiteStore` implements :class:`~gateway.store.interface.Store` on one file, with the
statements both backends share (:mod:`gateway.store.reads`, :mod:`gateway.store.writes`) and
what is SQLite's own here:

- **WAL** journal, ``synchronous=NORMAL``, ``busy_timeout`` (another process — a second worker, the
  CLI — may hold the write lock for a moment; SQLite waits instead of failing).
- **One writer**: every write is a job on one queue, run by one task on one connection, each in
  its own ``BEGIN IMMEDIATE`` transaction. Tasks of this process never contend for the lock, so
  "database is locked" cannot come from inside the process, and a caller that is cancelled
  cannot leave a transaction half done (the writer finishes or never starts the job). The
  write lock serializes every write transaction on the file, so a transaction's ``lock`` takes
  nothing more.
- **Reads** use a second, read-only connection; in WAL mode they never wait for the writer and
  see every write that has returned.
- **Migrations**: ``PRAGMA user_version`` is the number of :data:`MIGRATIONS` applied; each one runs
  in one transaction, so re-opening is idempotent and a crash mid-migration leaves the old schema.

Datetimes are stored as Unix seconds (REAL) and returned timezone-aware UTC. Emails are stored
lower-cased. Every SQLite failure surfaces as :class:`StoreError`.
"""

import asyncio
import functools
import logging
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import aiosqlite

from gateway.logs import log_event
from gateway.model import utcnow
from gateway.store.base import Row, StoreError, Tx, wrap
from gateway.store.interface import Store
from gateway.store.schema import migrate, migrations
from gateway.store.teams import TeamRows

__all__ = ["MIGRATIONS", "SQLiteStore"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")

#: The migrations in SQLite's types (:func:`~gateway.store.schema.migrations`).
MIGRATIONS = migrations(real="REAL", bigint="INTEGER")

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


class _Tx:
    """:class:`~gateway.store.base.Tx` on the writer connection, inside ``BEGIN IMMEDIATE``."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return await _exec(self._conn, _numbered(sql), args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await _fetch(self._conn, _numbered(sql), args)

    async def lock(self, space: int, key: str) -> None:
        """Nothing to take: a write transaction holds the file's one write lock (no other
        process writes until it ends) and this process runs one at a time."""


class SQLiteStore(Store, TeamRows):
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
            tx = _Tx(conn)
            await migrate(
                tx,
                MIGRATIONS,
                version,
                self.path,
                lambda number: tx.execute(f"PRAGMA user_version = {number}"),
                path=self.path,
            )
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
            await self._write_check()
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
                _fail(job, wrap(job.op, exc), logging.WARNING, error=str(exc), caller="gone")
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

    async def _execute(self, op: str, sql: str, *args: Any) -> int:
        changed: int = await self._write(op, lambda c: _exec(c, _numbered(sql), args))
        return changed

    async def _returning(self, op: str, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._write(op, lambda c: _fetch(c, _numbered(sql), args))
        return rows

    async def _transaction(self, op: str, work: Callable[[Tx], Awaitable[T]]) -> T:
        result: T = await self._write(op, lambda c: work(_Tx(c)))
        return result

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
            raise wrap(op, exc) from exc


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
