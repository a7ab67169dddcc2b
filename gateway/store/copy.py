"""``gateway migrate --from sqlite:///… --to postgresql://…``: copy a SQLite store into a
(migrated) PostgreSQL database, table by table, idempotently.

The SQLite file is read through a read-only connection (the copy never changes it) and must be
at this gateway's schema version. Rows whose key already exists in PostgreSQL are kept as they
are (after a cut-over the PostgreSQL rows are the truth), so running the copy twice adds
nothing; ``hits`` (rate-limit counters, no key) is copied only into an empty table. Every
table the migrations create is copied (each by the primary key the schema gives it) but the
live-only ones (:data:`~gateway.store.schema.LIVE_ONLY`).
"""

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.dburl import DatabaseURL
from gateway.store.base import StoreError
from gateway.store.postgres import PostgresStore
from gateway.store.schema import COPIED_TABLES
from gateway.store.sqlite import MIGRATIONS

__all__ = ["Copied", "copy_sqlite_to_postgres"]


@dataclass(frozen=True)
class Copied:
    """One table's outcome: rows in the SQLite file, rows added, rows now in PostgreSQL."""

    table: str
    source: int
    added: int
    target: int


@dataclass(frozen=True)
class _Source:
    """One table of the SQLite file: its columns, its primary key's, its rows."""

    columns: list[str]
    keys: list[str]
    rows: list[tuple[Any, ...]]


def _read_sqlite(path: str) -> dict[str, _Source]:
    if not Path(path).is_file():
        raise StoreError(f"--from sqlite://{path}: no such file")
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"--from sqlite://{path}: cannot open: {exc}") from exc
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version != len(MIGRATIONS):
            raise StoreError(
                f"--from sqlite://{path}: schema version {version}, this gateway has "
                f"{len(MIGRATIONS)}: run `gateway migrate` on it first (DATABASE_URL=sqlite://…)"
            )
        out: dict[str, _Source] = {}
        for table in COPIED_TABLES:
            # (cid, name, type, notnull, default, pk): pk is the column's place in the key
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
            keys = [str(c[1]) for c in sorted(info, key=lambda c: int(c[5])) if int(c[5]) > 0]
            cur = conn.execute(f"SELECT * FROM {table}")  # noqa: S608 - constant table names
            columns = [d[0] for d in cur.description]
            out[table] = _Source(columns, keys, [tuple(r) for r in cur.fetchall()])
        return out
    except sqlite3.Error as exc:
        raise StoreError(f"--from sqlite://{path}: cannot read: {exc}") from exc
    finally:
        conn.close()


async def copy_sqlite_to_postgres(source: DatabaseURL, target: DatabaseURL) -> list[Copied]:
    """Copy every table of ``source`` (sqlite) into ``target`` (postgresql, migrated first)."""
    if source.scheme != "sqlite" or target.scheme != "postgresql":
        raise StoreError("migrate --from must be sqlite:///… and --to postgresql://…")
    data = await asyncio.to_thread(_read_sqlite, source.path)
    store = PostgresStore(target)
    await store.open()
    try:
        done: list[Copied] = []
        for table in COPIED_TABLES:
            src = data[table]
            added, now = await store.insert_missing(table, src.columns, src.keys, src.rows)
            done.append(Copied(table, len(src.rows), added, now))
        return done
    finally:
        await store.close()
