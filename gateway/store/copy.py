"""``gateway migrate --from sqlite:///… --to postgresql://…``: copy a SQLite store into a
(migrated) PostgreSQL database, table by table, idempotently.

The SQLite file is read through a read-only connection (the copy never changes it) and must be
at this gateway's schema version. Rows whose key already exists in PostgreSQL are kept as they
are (after a cut-over the PostgreSQL rows are the truth), so running the copy twice adds
nothing; ``hits`` (rate-limit counters, no key) is copied only into an empty table.
"""

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.dburl import DatabaseURL
from gateway.store.base import TABLES, StoreError
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import MIGRATIONS

__all__ = ["Copied", "copy_sqlite_to_postgres"]


@dataclass(frozen=True)
class Copied:
    """One table's outcome: rows in the SQLite file, rows added, rows now in PostgreSQL."""

    table: str
    source: int
    added: int
    target: int


def _read_sqlite(path: str) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
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
        out: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
        for table, _ in TABLES:
            cur = conn.execute(f"SELECT * FROM {table}")  # noqa: S608 - constant table names
            columns = [d[0] for d in cur.description]
            out[table] = (columns, [tuple(r) for r in cur.fetchall()])
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
        for table, keys in TABLES:
            columns, rows = data[table]
            added, now = await store.insert_missing(table, columns, keys, rows)
            done.append(Copied(table, len(rows), added, now))
        return done
    finally:
        await store.close()
