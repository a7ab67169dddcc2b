"""Both store backends for store-level tests: ``BACKENDS`` to parametrize over, and
:func:`new_store` to build one (SQLite in ``tmp_path``; PostgreSQL: a new empty database on the
session's real server, from the ``pg_url`` fixture); and the rows those tests write (``ent``,
``session_row``, at ``T0``)."""

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest

from gateway.dburl import parse_database_url
from gateway.model import Entitlement, utcnow
from gateway.store import Backend, PostgresStore, SessionRow, SQLiteStore

__all__ = [
    "BACKENDS",
    "T0",
    "backend_url",
    "ent",
    "new_store",
    "opened",
    "session_row",
    "set_read_only",
]

S = TypeVar("S", bound=Backend)

BACKENDS = ("sqlite", "postgres")


def backend_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A ``DATABASE_URL`` for a new, empty store of ``backend``."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'gate.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")  # starts PostgreSQL on first use only
    return url


def new_store(url: str, *, clock: Callable[[], datetime] = utcnow, **pg: float) -> Backend:
    """An unopened store on ``url`` (``pg``: PostgresStore timeouts/sizes)."""
    parsed = parse_database_url(url)
    if parsed.scheme == "sqlite":
        return SQLiteStore(parsed.path, clock=clock)
    return PostgresStore(parsed, clock=clock, **pg)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def opened(store: S) -> AsyncIterator[S]:
    """``store``, opened, and closed on the way out (the body of a store fixture)."""
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def set_read_only(store: Backend, on: bool) -> None:
    """Make every write of ``store`` fail inside the database (as a full disk or a read-only
    volume does), or work again. SQLite: ``PRAGMA query_only`` on the writer connection;
    PostgreSQL: the database's ``default_transaction_read_only``, and the pool's connections
    renewed so that they take it."""
    if isinstance(store, SQLiteStore):
        conn = store._writer_conn
        assert conn is not None
        await conn.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")
        return
    name = urlsplit(store.url.raw).path.lstrip("/")
    admin = await asyncpg.connect(
        store.url.raw, server_settings={"default_transaction_read_only": "off"}
    )
    try:
        value = "on" if on else "off"
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}')
    finally:
        await admin.close()
    await store._pool.expire_connections()


#: The store tests' fixed "now".
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def ent(customer_id: str = "cus_1", **changes: object) -> Entitlement:
    """An active monthly entitlement checked at ``T0`` (``changes`` on top)."""
    values: dict[str, object] = {
        "customer_id": customer_id,
        "status": "active",
        "checked_at": T0,
        "expires_at": T0 + timedelta(hours=1),
        "subscription_id": "sub_1",
        "price_id": "price_demo_monthly",
        "period_end": T0 + timedelta(days=30),
        "cancel_at_period_end": False,
        "cancel_at": None,
        "trial_end": None,
        "paused": False,
        "source": "stripe",
        "event_created": 0,
        "period_start": T0 - timedelta(days=1),
    }
    values.update(changes)
    return Entitlement(**values)  # type: ignore[arg-type]


def session_row(id_hash: str, customer_id: str = "cus_1", **kw: object) -> SessionRow:
    """A live session row created at ``T0`` (``kw`` on top)."""
    fields: dict[str, object] = {
        "id_hash": id_hash,
        "customer_id": customer_id,
        "email": "A@Example.com",
        "created_at": T0,
        "last_seen": T0,
        "expires_at": T0 + timedelta(days=30),
        "device": "Chrome on Linux",
        "revoked_at": None,
        **kw,
    }
    return SessionRow(**fields)  # type: ignore[arg-type]
